"""``"matmul"``: dense layers written by hand — einsum, ``@``, ``bmm`` with an expanded weight.

Identities proved (``W`` a 2-D parameter, buffer or constant, or a free view of one; ``b`` 1-D):

* ``einsum('...f,of->...o', x, W)`` — the equation contracts exactly one axis of ``x`` with one
  axis of ``W`` and keeps every other axis of ``x`` in order, ``W``'s other axis in the contracted
  axis' place: ``== tdd(x, W or W.t(), feature_dim=that axis)``.
* ``x @ W`` (``W`` stored ``(in, out)``) ``== tdd(x, W.t(), feature_dim=-1)``; ``W @ x`` with
  ``x`` at least 2-D ``== tdd(x, W, feature_dim=-2)`` (a filterbank over ``(B, F, T)``).
* ``bmm(x, W.expand(B, F, O))`` / ``bmm(W.expand(B, O, F), x)`` and ``baddbmm(b, ...)``: the same
  weight in every batch, so the same two identities.
* A following ``+ b`` whose ``b`` is a constant of ``out`` values laid along the feature axis is
  fused into the node's bias.

A 2-D operand computed from the input is not a weight: such products are rejected ("not a dense
layer").  Folded forms (``addmm(b, x.view(-1, F), W)`` + unfold, GPT-2's ``Conv1D``) are proved by
the reshape family's fold/unfold identity and reported under this pattern's name.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from .. import ops
from ..capture import META_KEYS
from ..report import Site
from ..shapes import Sym
from .base import Candidate, Context
from .roles import constant_base

PATTERN = "matmul"
MATMULS = frozenset({torch.matmul, operator.matmul, torch.bmm})


def _site(node: fx.Node, x: Any, ctx: Context, status: str, reason: str = "",
          fd: int | None = None, kernel: str = "") -> Site:
    return ctx.site(PATTERN, status, node, x, node, reason, fd, kernel)


def _rank(n: Any, ctx: Context) -> int | None:
    s = ctx.shape(n)
    return None if s is None else len(s)


def _unexpanded(n: Any, ctx: Context) -> Any:
    """``W`` from ``W.expand(B, ...)`` / ``W.unsqueeze(0).expand(...)`` (same weight per batch)."""
    if not (isinstance(n, fx.Node) and n.op == "call_method" and n.target == "expand"):
        return None
    w = n.args[0]
    if isinstance(w, fx.Node) and w.op == "call_method" and w.target == "unsqueeze" \
            and w.args[1:] == (0,):
        w = w.args[0]
    return w if _rank(w, ctx) == 2 and constant_base(w) is not None else None


def _parse_einsum(node: fx.Node, ctx: Context) -> tuple[Any, Any, int, bool] | str | None:
    """(x, W, feature_dim, W stored (in, out)) or a reason, or None when not a candidate."""
    eq, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (tuple, list)):
        operands = list(operands[0])
    if not isinstance(eq, str) or len(operands) != 2:
        return None
    eq = eq.replace(" ", "")
    if "->" not in eq:
        return "einsum without an explicit output: not rewritten"
    ins, out = eq.split("->")
    specs = ins.split(",")
    consts = [constant_base(o) is not None and len(s) == 2 for o, s in zip(operands, specs)]
    if consts.count(True) != 1:
        if any(len(s) == 2 for s in specs):
            return "the 2-D operand is computed from the input, not a parameter or buffer: " \
                   "not a dense layer"
        return None
    wi = consts.index(True)
    x, w = operands[1 - wi], operands[wi]
    xs, ws = specs[1 - wi], specs[wi]
    ell = "..." in xs
    if ell:
        if not (xs.startswith("...") and out.startswith("...")) or "..." in ws:
            return f"einsum '{eq}': ellipsis not leading"
        xs, out = xs[3:], out[3:]
    contracted = [c for c in ws if c in xs and c not in out]
    kept = [c for c in ws if c not in xs and c in out]
    if len(set(xs)) != len(xs) or len(set(out)) != len(out) or len(set(ws)) != 2 \
            or len(contracted) != 1 or len(kept) != 1:
        return f"einsum '{eq}' does not contract exactly one axis of the input with the weight"
    c, o = contracted[0], kept[0]
    if out != xs.replace(c, o):
        return (f"einsum '{eq}' reorders the input's axes (expected '{xs.replace(c, o)}'): "
                "not time-distributed")
    fd = xs.index(c) - len(xs)
    return x, w, fd, ws == c + o


def _analyse(node: fx.Node, ctx: Context) -> tuple[Any, Any, Any, int, bool] | str | None:
    """(x, W, bias, feature_dim, W stored (in, out)), a rejection reason, or None."""
    if node.op == "call_function" and node.target is torch.einsum:
        got = _parse_einsum(node, ctx)
        return got if not isinstance(got, tuple) else (got[0], got[1], None, got[2], got[3])
    is_method = node.op == "call_method" and node.target in ("matmul", "bmm")
    if not (node.op == "call_function" and node.target in MATMULS | {torch.baddbmm} or is_method):
        return None
    if node.kwargs:
        return None
    bias = None
    args = list(node.args)
    if node.target is torch.baddbmm:
        if len(args) != 3:
            return None
        bias, args = args[0], args[1:]
    a, b = args[0], args[1]
    batched = node.target in (torch.bmm, torch.baddbmm) or node.target == "bmm"
    wa = _unexpanded(a, ctx) if batched else (a if _rank(a, ctx) == 2 else None)
    wb = _unexpanded(b, ctx) if batched else (b if _rank(b, ctx) == 2 else None)
    ra, rb = _rank(a, ctx), _rank(b, ctx)
    if ra is None or rb is None:
        return None
    if wb is not None and constant_base(wb) is not None and ra >= 2:
        return a, wb, bias, -1, True
    if wa is not None and constant_base(wa) is not None and rb >= 2 and (rb >= 3 or batched):
        return b, wa, bias, -2, False
    if not batched and ((ra == 2 and rb >= 3) or (rb == 2 and ra >= 3)):
        return ("the 2-D operand is computed from the input, not a parameter or buffer: "
                "not a dense layer")
    return None


def _bias_ok(bias: Any, out_features: int, fd: int, ctx: Context, node: fx.Node) -> Any:
    """A constant of ``out_features`` values laid along the feature axis (as broadcast against the
    product's output): returns the laid-out operand (before any ``expand``), else None."""
    lay = bias
    while isinstance(lay, fx.Node) and lay.op == "call_method" and lay.target == "expand":
        lay = lay.args[0]
    if constant_base(lay) is None:
        return None
    s, out = ctx.shape(lay), ctx.shape(node)
    if s is None or out is None or len(s) > len(out):
        return None
    sizes = [1] * (len(out) - len(s)) + [v.value for v in s]
    if sizes.count(out_features) != 1 or any(v not in (1, out_features) for v in sizes):
        return None
    return lay if sizes.index(out_features) == fd % len(out) else None


def prove(node: fx.Node, ctx: Context) -> Candidate | None:
    got = _analyse(node, ctx)
    if got is None:
        return None
    if isinstance(got, str):
        x = node.args[1] if node.target is torch.einsum else node.args[0]
        return Candidate(PATTERN, [_site(node, x, ctx, "rejected", got)], reason=got,
                         nodes=[node.name])
    x, w, bias, fd, w_in_out = got
    wshape = ctx.shape(w)
    out_features = (wshape[1] if w_in_out else wshape[0]).value if wshape else None
    bias_base = None
    if bias is not None:
        bias_base = _bias_ok(bias, out_features, fd, ctx, node) if out_features else None
        if bias_base is None:
            reason = "baddbmm's added term is not a per-feature bias: not rewritten"
            return Candidate(PATTERN, [_site(node, x, ctx, "rejected", reason)], reason=reason,
                             nodes=[node.name])
    # fuse a following "+ b"
    add = None
    users = list(node.users)
    if bias is None and len(users) == 1 and users[0].op == "call_function" and \
            users[0].target in (operator.add, torch.add) and not users[0].kwargs and \
            len(users[0].args) == 2:
        other = users[0].args[1] if users[0].args[0] is node else users[0].args[0]
        if out_features and _bias_ok(other, out_features, fd, ctx, users[0]) is not None:
            add, bias_base = users[0], _bias_ok(other, out_features, fd, ctx, users[0])
    guards = ctx.assumption_guards([x])
    xs, ws = ctx.shape(x), ctx.shape(w)
    if xs is not None and ws is not None:  # the contracted sizes must agree for every input:
        in_features = (ws[0] if w_in_out else ws[1]).value  # einsum would broadcast a size 1
        if not ctx.same_size(xs[fd], Sym.lit(in_features), guards):
            reason = "the contracted axis' size is not the weight's: not rewritten"
            return Candidate(PATTERN, [_site(node, x, ctx, "rejected", reason)], reason=reason,
                             nodes=[node.name])
    rank = _rank(x, ctx) or 3
    # keep what the hand-written product computed (bmm/baddbmm, W @ x) unless measured otherwise
    mirror = {"baddbmm": "baddbmm", "bmm": "baddbmm", "matmul": "matmul"}.get(
        getattr(node.target, "__name__", str(node.target)))
    kernel = ops.choose_kernel(fd, rank, ctx.device, prefer=mirror, dtype=ctx.dtype(x))
    site = _site(add or node, x, ctx, "found", "", fd % rank, kernel)
    site.node = node.name  # the product: what the canonical node records as its site
    names = (node.name, add.name if add is not None else None)
    where = _locate(node, x)

    def rewrite(gm: fx.GraphModule) -> fx.Node:
        return _emit(gm, names, where, w.name, bias_base.name if bias_base is not None else None,
                     w_in_out, fd, kernel)

    nodes = [node.name] + ([add.name] if add is not None else [])
    site.guards = [str(g) for g in guards]
    return Candidate(PATTERN, [site], rewrite=rewrite, nodes=nodes, output=nodes[-1],
                     guards=guards)


def _emit(gm: fx.GraphModule, names: tuple[str, str | None], x: tuple[int, int | None], w: str,
          b: str | None,
          w_in_out: bool, fd: int, kernel: str) -> fx.Node:
    from ..rewrite import node_named

    g = gm.graph
    node = node_named(gm, names[0])
    last = node_named(gm, names[1]) if names[1] else node
    with g.inserting_before(last):
        weight = node_named(gm, w)
        if w_in_out:
            weight = g.call_method("t", (weight,))
        bias = None
        if b is not None:
            bias = g.call_method("reshape", (node_named(gm, b), -1))
        new = g.call_function(ops.time_distributed_dense, (_current(node, x), weight, bias),
                              {"feature_dim": fd, "impl": kernel})
    new.meta.update({k: v for k, v in node.meta.items() if k in META_KEYS})
    new.meta["tdd_site"] = names[0]
    last.replace_all_uses_with(new)
    dead, erased = [last, node], set()
    while dead:  # the product, and the free views (expand, ...) only it used
        n = dead.pop(0)
        if n in erased or n.users or n.op in ("placeholder", "get_attr"):
            continue
        inputs = list(n.all_input_nodes)
        g.erase_node(n)
        erased.add(n)
        dead.extend(a for a in inputs if a.op == "call_method")
    return new


def _locate(node: fx.Node, x: fx.Node) -> tuple[int, int | None]:
    """Where ``x`` sits in the product's arguments: (arg index, index in a list arg or None)."""
    for i, a in enumerate(node.args):
        if a is x:
            return i, None
        if isinstance(a, (list, tuple)) and x in a:
            return i, list(a).index(x)
    raise ValueError("input not found among the arguments")


def _current(node: fx.Node, where: tuple[int, int | None]) -> fx.Node:
    """The input at ``where`` now (an earlier rewrite may have replaced the one matched)."""
    i, j = where
    return node.args[i] if j is None else node.args[i][j]


def find(ctx: Context) -> list[Candidate]:
    out = []
    for node in ctx.gm.graph.nodes:
        if node.name in ctx.claimed:
            continue
        cand = prove(node, ctx)
        if cand is not None:
            out.append(cand)
    return out
