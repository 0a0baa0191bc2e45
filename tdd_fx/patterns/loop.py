"""``"loop"``: a per-step Python loop, unrolled by the trace, re-rolled into one node.

Identity proved, for ``x`` with steps along axis ``a`` and ``f`` a chain of dense / pointwise /
per-feature ops acting on the last (feature) axis::

    stack([f(x.select(a, t)) for t in range(T)], d) == f(x).movedim(a, d)
    cat([f(x.narrow(a, t, 1)) for t in range(T)], a) == f(x)

when (1) every step runs the *same* ops on the *same* module objects and parameters (a
``ModuleList`` holding one module T times is tied; T distinct modules are not), (2) the steps are
disjoint, in order, and cover the whole axis, (3) no step reads another step's output (no
recurrence), and (4) nothing in ``f`` depends on which rows are processed together: training-mode
``BatchNorm`` (per-step batch statistics) and training-mode dropout (one random mask per step) are
rejected.  ``f`` acts on the last axis only, so applying it to all steps at once changes nothing.

The trace unrolled the loop because Python saw ``range(x.size(a))`` or iterated ``x.unbind(a)``;
that fact pinned ``x.shape[a]``.  Once the loop is one node it no longer matters, so the guard is
released: the optimized module accepts other sequence lengths.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..capture import META_KEYS
from ..report import Site
from ..shapes import Sym
from .base import Candidate, Context
from .roles import Role, classify, is_metadata

PATTERN = "loop"
STACKS = frozenset({torch.stack, torch.cat, torch.concat, torch.concatenate})


@dataclass
class Step:
    index: int  # which step along the axis
    keepdim: bool  # the step keeps a size-1 axis (x[:, t:t+1], split(1, a))


def _norm(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _step_of(n: fx.Node, ctx: Context) -> tuple[fx.Node, int, Step, fx.Node | None] | None:
    """(source x, axis, step, helper node such as unbind/split) when ``n`` selects one step."""
    if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node):
        src, idx = n.args
        if src.op in ("call_method", "call_function") and getattr(src.target, "__name__",
                                                                  src.target) in (
                "unbind", "split", "chunk") and isinstance(idx, int):
            name = getattr(src.target, "__name__", src.target)
            x = src.args[0]
            rank = len(ctx.shape(x) or ())
            if not rank:
                return None
            if name == "unbind":
                a = src.kwargs.get("dim", src.args[1] if len(src.args) > 1 else 0)
                return x, _norm(a, rank), Step(idx, False), src
            size = src.args[1] if len(src.args) > 1 else None
            a = src.kwargs.get("dim", src.args[2] if len(src.args) > 2 else 0)
            shape = ctx.shape(x)
            steps = shape[_norm(a, rank)].value if shape else None
            if (name == "split" and size == 1) or (name == "chunk" and size == steps):
                return x, _norm(a, rank), Step(idx, True), src
            return None
        x = src
        shape = ctx.shape(x)
        if shape is None:
            return None
        rank = len(shape)
        items = idx if isinstance(idx, tuple) else (idx,)
        if len(items) > rank or any(i is Ellipsis or i is None for i in items):
            return None
        picked = [(k, i) for k, i in enumerate(items) if i != slice(None)]
        if len(picked) != 1:
            return None
        a, i = picked[0]
        if isinstance(i, int):
            return x, a, Step(i, False), None
        if isinstance(i, slice) and isinstance(i.start, int) and i.stop == i.start + 1 \
                and i.step in (None, 1):
            return x, a, Step(i.start, True), None
        return None
    if n.op == "call_method" and n.target in ("select", "narrow") and isinstance(n.args[0],
                                                                                fx.Node):
        x = n.args[0]
        rank = len(ctx.shape(x) or ())
        if not rank or not all(isinstance(v, int) for v in n.args[1:]):
            return None
        if n.target == "select":
            return x, _norm(n.args[1], rank), Step(n.args[2], False), None
        if n.args[3] == 1:
            return x, _norm(n.args[1], rank), Step(n.args[2], True), None
    return None


@dataclass
class Branch:
    source: tuple[fx.Node, int, Step, fx.Node | None]
    body: list[tuple[fx.Node, Role | None]]  # data-flow order; Role None = trailing unsqueeze
    step: fx.Node | None = None  # the node that selects this step


def _branch(out: fx.Node, ctx: Context) -> Branch | str | None:
    body: list[tuple[fx.Node, Role | None]] = []
    cur = out
    if cur.op == "call_method" and cur.target == "unsqueeze":
        body.append((cur, None))
        cur = cur.args[0]
    for _ in range(64):
        src = _step_of(cur, ctx)
        if src is not None:
            body.reverse()
            return Branch(src, body, cur)
        role = classify(cur, ctx)
        if role is None or role.kind not in ("dense", "pointwise", "lastaxis", "featurewise"):
            return None
        if role.blocked:
            return role.blocked
        body.append((cur, role))
        cur = cur.args[role.data]
        if not isinstance(cur, fx.Node):
            return None
    return None


def _signature(n: fx.Node, data: Any, ctx: Context, inside: set[fx.Node]) -> Any:
    def arg(a: Any) -> Any:
        if a is data:
            return "<step>"
        if isinstance(a, fx.Node):
            if a in inside:
                return ("<other step>", a.name)
            return ("node", a)
        if isinstance(a, (tuple, list)):
            return tuple(arg(v) for v in a)
        return ("const", a)

    target: Any = ctx.module(n) if n.op == "call_module" else n.target
    return (n.op, id(target) if n.op == "call_module" else target,
            tuple(arg(a) for a in n.args), tuple((k, arg(v)) for k, v in n.kwargs.items()))


RECURRENCE = "each step reads the previous step's output: a recurrence, not time-distributed"


def _reaches(node: fx.Node, target: fx.Node, limit: int = 64) -> bool:
    """Whether ``target`` is among ``node``'s ancestors (a short, bounded walk)."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack and len(seen) < limit:
        n = stack.pop()
        if n is target:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(a for a in n.all_input_nodes if not is_metadata(a))  # sizes are not data
    return False


def _site(node: fx.Node, first: fx.Node, x: fx.Node, ctx: Context, status: str,
          reason: str) -> Site:
    return ctx.site(PATTERN, status, first, x, node, reason, fd=-1)


def prove(node: fx.Node, ctx: Context) -> Candidate | None:
    items = node.args[0] if node.args else None
    if not isinstance(items, (list, tuple)) or len(items) < 2 or \
            not all(isinstance(i, fx.Node) for i in items):
        return None
    d = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    branches = [_branch(i, ctx) for i in items]
    if any(b is None for b in branches):
        # not a loop we can re-roll; say so when it is because each step feeds the next
        for k in range(1, len(items)):
            if _reaches(items[k], items[k - 1]):
                site = _site(node, items[k], items[k], ctx, "rejected", RECURRENCE)
                return Candidate(PATTERN, [site], reason=RECURRENCE, nodes=[node.name])
        return None
    first_body = next((b.body for b in branches if isinstance(b, Branch) and b.body), None)
    if first_body is None:
        blocked = next((b for b in branches if isinstance(b, str)), None)
        if blocked:
            site = _site(node, items[0], items[0], ctx, "rejected", blocked)
            return Candidate(PATTERN, [site], reason=blocked, nodes=[node.name])
        return None
    dense = [n for n, r in first_body if r is not None and r.kind == "dense"]
    anchor = dense[0] if dense else first_body[0][0]
    x0 = next(b.source[0] for b in branches if isinstance(b, Branch))

    def reject(reason: str) -> Candidate:
        nodes = [node.name] + [n.name for b in branches if isinstance(b, Branch) for n, _ in b.body]
        return Candidate(PATTERN, [_site(node, anchor, x0, ctx, "rejected", reason)],
                         reason=reason, nodes=nodes)

    blocked = next((b for b in branches if isinstance(b, str)), None)
    if blocked:
        return reject(blocked)
    bs: list[Branch] = branches  # type: ignore[assignment]
    x, a, _, helper = bs[0].source
    reader = helper if helper is not None else bs[0].step  # reads x: args[0]
    if any(b.source[0] is not x or b.source[1] != a for b in bs):
        return reject("the steps read different tensors or axes")
    shape = ctx.shape(x)
    if shape is None:
        return reject("needs example inputs to prove the steps cover the axis")
    rank = len(shape)
    steps = [b.source[2] for b in bs]
    keep = {s.keepdim for s in steps}
    if len(keep) != 1 or [s.index for s in steps] != list(range(len(bs))):
        return reject("the steps are not taken in order, one each, from the first")
    if shape[a].value != len(bs):
        return reject(f"the steps cover {len(bs)} of {shape[a].value} positions along axis {a}")
    if a == rank - 1:
        return reject("the loop runs over the feature axis")
    # the same ops on the same modules, no step reading another
    inside = {n for b in bs for n, _ in b.body} | {s for b in bs for s in [b.source[3]] if s}
    sigs = []
    for b in bs:
        data: Any = None
        sig = []
        for n, r in b.body:
            data_in = n.args[0] if r is None else n.args[r.data]
            own = {m for m, _ in b.body}
            sig.append(_signature(n, data_in, ctx, inside - own))
            data = n
        del data
        sigs.append(sig)
    for k, sig in enumerate(sigs[1:], 1):
        if sig != sigs[0]:
            if any(isinstance(s, tuple) and "<other step>" in str(s) for s in sig):
                return reject(f"step {k} reads another step's output: a recurrence, "
                              "not time-distributed")
            mods0 = [s[1] for s in sigs[0] if s[0] == "call_module"]
            mods = [s[1] for s in sig if s[0] == "call_module"]
            if len(mods0) == len(mods) and mods0 != mods:
                return reject("the steps use different module objects (an untied ModuleList): "
                              "different weights per step, not time-distributed")
            return reject(f"step {k} does not run the same ops as step 0")
    for n, r in bs[0].body:
        if r is None:
            continue
        if n.op == "call_module":
            m = ctx.module(n)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                return reject(f"{type(m).__name__} inside the loop: in training mode each step is "
                              "normalised with its own batch statistics, so re-rolled it would "
                              "differ after opt.train()")
            if isinstance(m, (nn.Dropout, nn.AlphaDropout)) and m.training and m.p > 0:
                return reject("Dropout in training mode draws one random mask per step; "
                              "re-rolled it would draw them differently")
        elif n.target is F.dropout and n.kwargs.get("training", True):
            return reject("F.dropout in training mode draws one random mask per step")
    trailing = bs[0].body[-1][1] is None
    dn = _norm(d, rank)  # the result has x's rank (stack of selected steps, or cat of slices)
    if node.target is torch.stack:
        if keep == {True} or trailing:
            return reject("stacks steps that keep their axis")
        move = (a, dn)
    else:
        if keep == {False} and not trailing:
            return reject("concatenates steps that dropped their axis")
        if dn != a:
            return reject(f"concatenates along axis {dn}, the steps were taken along {a}")
        move = (a, a)
    out_shape = ctx.shape(node)
    if out_shape is None:
        return reject("the shape of the result is unknown")
    sites = []
    x_t = ctx.shapes.tensor(x) if ctx.shapes else None
    for d in dense or [anchor]:  # one site per dense layer of the step, as for folds
        site = _site(node, d, x, ctx, "found", "")
        site.kernel, site.node = "linear", d.name
        t_in, t_out = ctx.shapes.tensor(d.args[0]), ctx.shapes.tensor(d)
        if x_t is not None and t_in is not None and t_out is not None and dense:
            lead = tuple(x_t.shape[:-1])
            site.in_shape, site.out_shape = lead + (t_in.shape[-1],), lead + (t_out.shape[-1],)
            if move[0] != move[1]:
                site.out_shape = tuple(ctx.shapes.tensor(node).shape)
        sites.append(site)
    site = sites[0]
    template = [(n.name, r) for n, r in bs[0].body if r is not None]
    nodes = [node.name] + [n.name for b in bs for n, _ in b.body]

    def rewrite(gm: fx.GraphModule) -> fx.Node:
        return _emit(gm, node.name, reader.name, template, move)

    # a count read from the input (range(x.size(a)), x.unbind(a)) follows the input: the guard
    # the trace put on it is released; a fixed count (range(6)) stays a guard
    mine = _count_nodes(x, a, rank, helper) & ctx.loop_counts
    guards_assumed = ctx.assumption_guards([x])
    # the node that reads x for step 0 (x itself may be replaced by an earlier rewrite)
    guards: list = list(guards_assumed)
    if not mine and not ctx.same_size(shape[a], Sym.lit(len(bs)), guards):
        return reject(f"the loop runs a fixed {len(bs)} steps over an axis whose size "
                      "cannot be guarded")
    site.guards = [str(g) for g in guards]
    for other in sites[1:]:
        other.guards = site.guards
    return Candidate(PATTERN, sites, rewrite=rewrite, nodes=nodes, output=node.name,
                     guards=guards, releases=mine)


def _count_nodes(x: fx.Node, a: int, rank: int, helper: fx.Node | None) -> set[str]:
    """Nodes whose value could have set this loop's count: ``x.size(a)``, ``x.shape[a]``, and the
    ``unbind``/``split`` the loop iterated."""
    out = {helper.name} if helper is not None else set()
    for u in x.users:
        if u.op == "call_method" and u.target == "size" and len(u.args) > 1:
            if isinstance(u.args[1], int) and u.args[1] in (a, a - rank):
                out.add(u.name)
        elif (u.op == "call_method" and u.target == "size" and len(u.args) == 1) or (
                u.op == "call_function" and u.target is getattr and u.args[1] == "shape"):
            out.update(g.name for g in u.users
                       if g.target is operator.getitem and g.args[1] in (a, a - rank))
    return out


def _emit(gm: fx.GraphModule, out_name: str, reader: str, template: list[tuple[str, Role]],
          move: tuple[int, int]) -> fx.Node:
    from ..rewrite import _dense_params, erase_dead, node_named

    g = gm.graph
    out = node_named(gm, out_name)
    cur = node_named(gm, reader).args[0]  # x, as it is now
    with g.inserting_before(out):
        for name, role in template:
            op = node_named(gm, name)
            data_in = op.args[role.data]
            if role.kind == "dense":
                w, b = _dense_params(gm, op)
                new = g.call_function(ops.time_distributed_dense, (cur, w, b),
                                      {"feature_dim": -1, "impl": "linear"})
                new.meta["tdd_site"] = name
            elif role.kind in ("pointwise", "lastaxis"):
                new = g.node_copy(op, lambda n, d=data_in, c=cur: c if n is d else n)
            elif op.op == "call_function":
                kwargs = dict(op.kwargs)
                args = (cur,) + tuple(op.args[1:])
                if "dim" in kwargs:
                    kwargs["dim"] = -1
                else:
                    args = (cur, -1) + tuple(op.args[2:])
                new = g.call_function(op.target, args, kwargs)
            else:
                rows = g.call_method("flatten", (cur, 0, -2))
                y = g.call_module(str(op.target), (rows,) + tuple(op.args[1:]), dict(op.kwargs))
                new = g.call_method("view_as", (y, cur))
            new.meta.update({k: v for k, v in op.meta.items()
                             if k in META_KEYS})
            cur = new
        if move[0] != move[1]:
            cur = g.call_method("movedim", (cur, move[0], move[1]))
    out.replace_all_uses_with(cur)
    # the stack and whatever fed only the steps (getitems, unbind/split, the bodies) is dead now
    work, erased = [out], set()
    while work:
        n = work.pop()
        if n in erased or n.users or n.op not in ("call_method", "call_function", "call_module"):
            continue  # what still has users (x itself) stays; what fed only the steps goes
        inputs = list(n.all_input_nodes)
        g.erase_node(n)
        erased.add(n)
        work.extend(inputs)
    del erase_dead
    return cur


def find(ctx: Context) -> list[Candidate]:
    out = []
    for node in ctx.gm.graph.nodes:
        if node.op == "call_function" and node.target in STACKS and node.name not in ctx.claimed:
            cand = prove(node, ctx)
            if cand is not None:
                out.append(cand)
    return out
