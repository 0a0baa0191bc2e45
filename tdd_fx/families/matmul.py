"""Dense layers written by hand on unfolded tensors: ``einsum``, ``@``, ``bmm``/``baddbmm``.

Identities (``x`` computed from the input; ``W: (O, F)`` a 2-D parameter, buffer or constant, or
a free view of one; ``Wio = W.t()``, the same weight stored ``(F, O)``; ``b: (O,)``)::

    einsum('...f,of->...o', x, W)   == time_distributed_dense(x, W, feature_dim=-1)
    einsum('...f,fo->...o', x, Wio) == time_distributed_dense(x, W, feature_dim=-1)
    einsum('bft,of->bot', x, W)     == time_distributed_dense(x, W, feature_dim=1)
    x @ W.t() == x @ Wio            == time_distributed_dense(x, W, feature_dim=-1)  (x: rank >= 2)
    W @ x                           == time_distributed_dense(x, W, feature_dim=-2)  (x: rank >= 3)
    bmm(x, Wio.expand(B, F, O))     == time_distributed_dense(x, W, feature_dim=-1)
    bmm(W.expand(B, O, F), x)       == time_distributed_dense(x, W, feature_dim=-2)
    baddbmm(c, p, q)                == bmm(p, q) + c                  (beta = alpha = 1)
    P + c                           == time_distributed_dense(x, W, c.reshape(-1), feature_dim=d)

where ``P = time_distributed_dense(x, W, feature_dim=d)`` is any of the products above and ``c``
(a parameter, buffer or constant, or a view of one) holds ``O`` values laid along the output's
axis ``d`` and size 1 on every other axis (``b``, or ``b.view(1, O, 1)`` for ``d = 1``).  Any
other added term stays an ``add`` after the canonical node.

In general an einsum qualifies when exactly one axis ``f`` of ``x`` is contracted with one axis
of the 2-D weight, every other axis of ``x`` is kept in order, and the weight's other axis ``o``
takes ``f``'s place in the output: ``y[.., o, ..] = sum_f x[.., f, ..] * W[o, f]``, the canonical
node's definition (``F.linear`` along ``feature_dim``).  Axis ``f`` must have the weight's size
for every input the capture admits: einsum broadcasts a size-1 axis, which sums the weight's
columns instead.

Not sites (not reported): products of two tensors both computed from the input (attention), or
neither.  Rejected with the reason: a 2-D operand computed from the input or from parameters (not
a parameter or a view of one), einsums that reorder or sum over the input's axes or do not
contract exactly one of them with the weight, a broadcasting contracted axis, ``baddbmm`` with
``beta`` or ``alpha`` other than 1.

The kernel is ``ops.choose_kernel``'s, except in a graph with random ops: there it is one whose
output has the product's memory layout where one does (``linear_t`` for a channel-first einsum,
whose result is strided), since dropout draws one number per element in memory order.

Folded forms (``addmm(b, x.view(-1, F), W)`` and the unfold, GPT-2's ``Conv1D``) belong to the
reshape family, which runs first: its nodes are claimed and skipped here.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .. import ops
from ..optables import ANY_RANDOM, PERMUTES, PRODUCTS, RESHAPES, is_op
from .base import Context, Match, example_shape, first_failure, rejected, same, same_shape

aten = torch.ops.aten
PATTERN = "matmul"
FROM_INPUT = ("the 2-D operand is computed from the input, not a parameter or buffer: not a "
              "dense layer")
FROM_PARAMS = ("the weight is computed in forward (from parameters or constants), not a parameter "
               "or buffer or a view of one: not rewritten")
#: the kernel that mirrors the product being replaced (kept where no kernel is known faster)
_MIRROR = {aten.matmul.default: "matmul", aten.bmm.default: "baddbmm",
           aten.baddbmm.default: "baddbmm"}

_DROPOUTS = frozenset({aten.dropout.default, aten.alpha_dropout.default,
                       aten.feature_dropout.default, aten.feature_alpha_dropout.default,
                       aten.native_dropout.default})
_VECTOR_VIEWS = RESHAPES | {aten.unsqueeze.default}
Where = tuple[int, "int | None"]  # an argument of a node: (index, index in a list argument)


@dataclass
class Product:
    """A product of ``x`` (computed from the input) with a 2-D weight."""

    node: fx.Node
    x: fx.Node
    x_at: Where
    weight: fx.Node  # the 2-D weight (an ``expand`` peeled off)
    in_out: bool  # stored (in, out): the canonical node reads its transpose
    fd: int
    added: fx.Node | None = None  # baddbmm's added term


@dataclass
class Miss:
    """A product near a dense layer that is not one, and why."""

    x: Any
    reason: str


Parsed = Product | Miss | None


def _arg(node: fx.Node, at: Where) -> Any:
    a = node.args[at[0]]
    return a if at[1] is None else a[at[1]]


def _input_dependent(ctx: Context) -> set[fx.Node]:
    """Every node whose value (or size) depends on a user input."""
    users = set(ctx.captured.user_inputs)
    live: set[fx.Node] = set()
    for n in ctx.graph.nodes:
        if (n.op == "placeholder" and n.name in users) or any(a in live for a in n.all_input_nodes):
            live.add(n)
    return live


def _pair(ctx: Context, live: set[fx.Node], node: fx.Node, x_at: Where, w: Any, in_out: bool,
          fd: int, added: fx.Node | None = None) -> Parsed:
    """``x`` (at ``x_at``) times the 2-D ``w``: a Product when ``w`` is a weight, a Miss when it
    is computed (next to an ``x`` of rank >= 3), None when this is no dense layer at all."""
    x = _arg(node, x_at)
    if not isinstance(x, fx.Node) or not isinstance(w, fx.Node) or x not in live:
        return None
    if ctx.state_source(w):
        return Product(node, x, x_at, w, in_out, fd, added)
    if (ctx.rank(x) or 0) < 3:
        return None
    return Miss(x, FROM_INPUT if w in live else FROM_PARAMS)


# --- the three spellings ------------------------------------------------------------------------
def _parse_matmul(node: fx.Node, ctx: Context, live: set[fx.Node]) -> Parsed:
    a, b = node.args[0], node.args[1]
    ra, rb = ctx.rank(a), ctx.rank(b)
    if ra is None or rb is None:
        return None
    if rb == 2 and ra >= 2:  # x @ W_in_out
        return _pair(ctx, live, node, (0, None), b, True, -1)
    if ra == 2 and rb >= 3:  # W @ x: channel-first data
        return _pair(ctx, live, node, (1, None), a, False, -2)
    return None


def _unexpanded(n: Any, ctx: Context) -> fx.Node | None:
    """``W`` from ``W.expand(B, R, C)`` or ``W.unsqueeze(0).expand(B, R, C)`` (the same matrix in
    every batch); None for anything else."""
    if not is_op(n, {aten.expand.default}):
        return None
    w = n.args[0]
    if is_op(w, {aten.unsqueeze.default}) and int(w.args[1]) in (0, -3):
        w = w.args[0]
    shape, ws = ctx.shape(n), ctx.shape(w)
    if shape is None or ws is None or len(ws) != 2 or len(shape) != 3:
        return None
    return w if same_shape(shape[1:], ws) else None


def _parse_bmm(node: fx.Node, ctx: Context, live: set[fx.Node]) -> Parsed:
    off = 1 if node.target is aten.baddbmm.default else 0
    added = node.args[0] if off else None
    w_right, w_left = _unexpanded(node.args[off + 1], ctx), _unexpanded(node.args[off], ctx)
    got: Parsed = None
    if w_right is not None:
        got = _pair(ctx, live, node, (off, None), w_right, True, -1, added)
    if got is None and w_left is not None:
        got = _pair(ctx, live, node, (off + 1, None), w_left, False, -2, added)
    return got


def _parse_equation(eq: str, ranks: list[int]) -> tuple[list[str], str, set[str]] | None:
    """The operands' subscripts and the output's, every ``...`` spelled out with letters the
    equation does not use (right-aligned, as einsum broadcasts them); those letters."""
    eq = eq.replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    ins = lhs.split(",")
    if not arrow:  # implicit output: the ellipsis, then the letters used once, sorted
        out = ("..." if "..." in lhs else "") + "".join(
            sorted(c for c in lhs if c.isalpha() and lhs.count(c) == 1))
    spare = [c for c in string.ascii_letters if c not in eq]
    counts = [r - (len(s) - 3) for s, r in zip(ins, ranks) if "..." in s]
    n = max(counts, default=0)
    if min(counts, default=0) < 0 or n > len(spare):
        return None
    ell = spare[:n]
    ins = [s.replace("...", "".join(ell[n - (r - len(s) + 3):])) if "..." in s else s
           for s, r in zip(ins, ranks)]
    out = out.replace("...", "".join(ell))
    if any(len(s) != r for s, r in zip(ins, ranks)):
        return None
    return ins, out, set(ell)


def _einsum_axes(xs: str, ws: str, out: str) -> tuple[str, str] | str:
    """(contracted letter, the weight's output letter) or what the equation does instead."""
    if len(set(xs)) != len(xs) or len(set(ws)) != 2 or len(ws) != 2:
        return "takes a diagonal (a repeated axis): not a dense layer"
    shared = [c for c in ws if c in xs]
    if len(shared) != 1 or shared[0] in out:
        return "does not contract exactly one axis of the input with the weight: not a dense layer"
    c = shared[0]
    o = ws.replace(c, "")
    if o not in out:
        return "sums over the weight's output axis: not a dense layer"
    summed = [a for a in xs if a != c and a not in out]
    if summed:
        return f"sums over the input's axis '{''.join(summed)}': not time-distributed"
    if out != xs.replace(c, o):
        return "reorders the input's axes (every axis but the contracted one must stay in place)"
    return c, o


def _einsum_product(node: fx.Node, ctx: Context, wi: int) -> Product | Miss:
    eq, operands = node.args[0], node.args[1]
    x, w = operands[1 - wi], operands[wi]
    parsed = _parse_equation(eq, [ctx.rank(o) or 0 for o in operands])
    if parsed is None:
        return Miss(x, f"einsum '{eq}': the subscripts do not match the operands' ranks")
    ins, out, ell = parsed
    xs, ws = ins[1 - wi], ins[wi]
    axes = _einsum_axes(xs, ws, out)
    if isinstance(axes, str):
        return Miss(x, f"einsum '{eq}' {axes}")
    pos = xs.index(axes[0])
    fd = -1 if pos == len(xs) - 1 else (pos - len(xs) if ell & set(xs[:pos]) else pos)
    return Product(node, x, (1, 1 - wi), w, ws.index(axes[0]) == 0, fd)


def _parse_einsum(node: fx.Node, ctx: Context, live: set[fx.Node]) -> Parsed:
    eq, operands = node.args[0], node.args[1]
    if not isinstance(eq, str) or len(operands) != 2:
        return None
    for wi in (1, 0):
        if ctx.rank(operands[wi]) != 2:
            continue
        got = _pair(ctx, live, node, (1, 1 - wi), operands[wi], False, -1)
        if isinstance(got, Product):
            return _einsum_product(node, ctx, wi)
        if got is not None:
            return got
    return None


_PARSERS: dict[Any, Callable[[fx.Node, Context, set[fx.Node]], Parsed]] = {
    aten.einsum.default: _parse_einsum,
    aten.matmul.default: _parse_matmul,
    aten.bmm.default: _parse_bmm,
    aten.baddbmm.default: _parse_bmm,
}


# --- conditions ----------------------------------------------------------------------------------
def _features(p: Product, ctx: Context) -> tuple[Any, Any]:
    """(in, out) sizes of the weight."""
    ws = ctx.shape(p.weight)
    assert ws is not None
    return (ws[0], ws[1]) if p.in_out else (ws[1], ws[0])


def _contracted_size(p: Product, ctx: Context) -> str:
    xs = ctx.shape(p.x)
    f_in, _ = _features(p, ctx)
    if xs is not None and same(xs[p.fd], f_in):
        return ""
    have = example_shape((xs[p.fd],))[0] if xs is not None else "?"
    return (f"the contracted axis of the input has size {have}, the weight's {f_in}: the product "
            "broadcasts it (a sum of the weight's columns), not a dense layer")


def _unscaled(p: Product) -> str:
    beta, alpha = p.node.kwargs.get("beta", 1), p.node.kwargs.get("alpha", 1)
    if beta == 1 and alpha == 1:
        return ""
    return f"baddbmm scales its terms (beta={beta}, alpha={alpha}): not rewritten"


def _per_feature(b: Any, p: Product, ctx: Context) -> bool:
    """``b`` is state holding the ``out`` values laid along the output's feature axis (size 1 on
    every other axis), of the product's dtype."""
    if not isinstance(b, fx.Node) or not ctx.state_source(b):
        return False
    s, out = ctx.shape(b), ctx.shape(p.node)
    if s is None or out is None or len(s) > len(out) or ctx.val(b).dtype != ctx.val(p.node).dtype:
        return False
    sizes = [1] * (len(out) - len(s)) + list(s)
    d = p.fd % len(out)
    _, f_out = _features(p, ctx)
    return same(sizes[d], f_out) and all(same(v, 1) for i, v in enumerate(sizes) if i != d)


def _fusable_add(p: Product, ctx: Context) -> tuple[fx.Node, int] | None:
    """The product's only user ``product + c`` (either order) with ``c`` a per-feature bias:
    (the add, the index of ``c`` in its arguments)."""
    users = list(p.node.users)
    if p.added is not None or len(users) != 1 or not is_op(users[0], {aten.add.Tensor}):
        return None
    add = users[0]
    if add.name in ctx.claimed or add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2:
        return None
    i = 1 if add.args[0] is p.node else 0
    if add.args[1 - i] is not p.node or not same_shape(ctx.shape(add), ctx.shape(p.node)):
        return None
    return (add, i) if _per_feature(add.args[i], p, ctx) else None


# --- the rewrite ---------------------------------------------------------------------------------
@dataclass
class Plan:
    """What the emit needs, by node name (the rewriter's graph is a copy)."""

    node: str
    x_at: Where
    weight: str
    in_out: bool
    fd: int
    kernel: str
    add: str | None = None  # a fused ``+ c``: the node replaced
    term: int | None = None  # index of the added term in the replaced node's arguments
    fuse: bool = False  # the added term is the canonical node's bias (else added after it)


def _swaps(w: fx.Node) -> bool:
    """``w`` is a transpose of a matrix."""
    if not is_op(w, PERMUTES) or not isinstance(w.args[0], fx.Node):
        return False
    if w.target is aten.transpose.int:
        return int(w.args[1]) % 2 != int(w.args[2]) % 2
    if w.target is aten.permute.default:
        return [int(d) % 2 for d in w.args[1]] == [1, 0]
    return True


def _out_in(rw: Any, w: fx.Node, in_out: bool, before: fx.Node) -> fx.Node:
    """The weight as the canonical node reads it, ``(out, in)``."""
    if not in_out:
        return w
    if _swaps(w):
        return w.args[0]
    return rw.call(aten.t.default, (w,), before=before, like=before)


def _as_vector(rw: Any, b: fx.Node, before: fx.Node) -> fx.Node:
    """A per-feature bias as the canonical node reads it, ``(out,)``: the vector it is a view of
    (``b.view(1, O, 1)``, ``b[:, None]``), else ``b.view(-1)``."""
    v = b
    while _rank(v) != 1 and is_op(v, _VECTOR_VIEWS) and isinstance(v.args[0], fx.Node):
        v = v.args[0]
    if _rank(v) == 1 and v.meta["val"].shape == (b.meta["val"].numel(),):
        return v
    return rw.call(aten.view.default, (b, [-1]), before=before, like=before)


def _rank(n: fx.Node) -> int | None:
    v = n.meta.get("val")
    return v.dim() if isinstance(v, torch.Tensor) else None


def _emit(plan: Plan) -> Callable[[Any], None]:
    def emit(rw: Any) -> None:
        node = rw[plan.node]
        last = rw[plan.add] if plan.add else node
        x = _arg(node, plan.x_at)  # read now: an earlier rewrite may have replaced the input
        w = _out_in(rw, rw[plan.weight], plan.in_out, last)
        term = last.args[plan.term] if plan.term is not None else None
        bias = _as_vector(rw, term, last) if term is not None and plan.fuse else None
        y = rw.tdd(x, w, bias, feature_dim=plan.fd, site=plan.node, before=last, like=node,
                   impl=plan.kernel)
        if term is not None and not plan.fuse:
            y = rw.call(aten.add.Tensor, (y, term), before=last, like=node)
        rw.replace(last, y)

    return emit


def _draws(n: fx.Node) -> bool:
    """``n`` draws random numbers (a dropout with its ``train`` flag False, as an eval-mode
    capture records it, does not)."""
    if not is_op(n, ANY_RANDOM):
        return False
    return not (n.target in _DROPOUTS and len(n.args) > 2 and n.args[2] is False)


def _same_layout(p: Product, ctx: Context, kernel: str) -> str:
    """A kernel whose output is laid out in memory as the product's is (a channel-first einsum's
    output is strided): a random op after it draws one number per element in memory order."""
    val = ctx.val(p.node)
    shape, strides = example_shape(val.shape), example_shape(val.stride())
    assert shape is not None and strides is not None
    axes = [i for i, size in enumerate(shape) if size != 1]
    order = sorted(axes, key=lambda i: -strides[i])  # outermost first
    d = p.fd % len(shape)
    if order == axes:  # row-major: every kernel but the transposing ones
        return "matmul" if kernel in ops.STRIDED_OUTPUT and d != len(shape) - 1 else kernel
    if d in axes and order == [i for i in axes if i != d] + [d]:
        return "linear_t"  # features innermost, as F.linear leaves them before moving back
    return kernel


def _plan(p: Product, ctx: Context, random: bool) -> Plan:
    v = ctx.val(p.x)
    kernel = ops.choose_kernel(p.fd, v.dim(), v.device, prefer=_MIRROR.get(p.node.target),
                               dtype=v.dtype, size=_features(p, ctx))
    if random:
        kernel = _same_layout(p, ctx, kernel)
    plan = Plan(p.node.name, p.x_at, p.weight.name, p.in_out, p.fd, kernel)
    if p.added is not None:
        plan.term, plan.fuse = 0, _per_feature(p.added, p, ctx)
    elif (add := _fusable_add(p, ctx)) is not None:
        plan.add, plan.term, plan.fuse = add[0].name, add[1], True
    return plan


def _match(node: fx.Node, ctx: Context, live: set[fx.Node], random: bool) -> Match | None:
    got = _PARSERS[node.target](node, ctx, live)
    if got is None:
        return None
    if isinstance(got, Miss):
        return rejected(ctx, PATTERN, node, got.x, node, got.reason, [node])
    reason = first_failure(lambda: _contracted_size(got, ctx), lambda: _unscaled(got))
    if reason:
        return rejected(ctx, PATTERN, node, got.x, node, reason, [node])
    plan = _plan(got, ctx, random)
    rank = ctx.rank(got.x) or 1
    site = ctx.site(PATTERN, "found", node, got.x, node, fd=got.fd % rank, kernel=plan.kernel)
    names = [node.name] + ([plan.add] if plan.add else [])
    return Match(PATTERN, [site], names, emit=_emit(plan))


class MatmulFamily:
    """Hand-written products of the input with a weight (see the module docstring)."""

    pattern = PATTERN

    def find(self, ctx: Context) -> list[Match]:
        live = _input_dependent(ctx)
        random = any(_draws(n) for n in ctx.graph.nodes)
        out: list[Match] = []
        for node in ctx.unclaimed(PRODUCTS):
            m = _match(node, ctx, live, random)
            if m is not None:
                out.append(m)
        return out
