"""Per-step Python loops, unrolled by the capture, rolled back into one canonical node per dense
layer.

Identity: stacking the same row-wise body applied to each step ``select(x, a, t)`` for
t = 0..T-1 along axis ``d`` equals the body applied once to ``x`` (with the time axis moved to
``d``), when every step uses the same weights, every position 0..T-1 is covered exactly once and
in order, no value passes from one step to another (recurrence), and every op of the body is
row-wise::

    stack([f(select(x, a, t)) for t in range(T)], d) == movedim(f(x), a, d)
    cat([f(slice(x, a, t, t + 1)) for t in range(T)], a) == f(x)
    cat([f(select(x, a, t)).unsqueeze(d) for t in range(T)], d) == movedim(f(x), a, d)

``f`` acts on the last (feature) axis only, each row on its own — elementwise maps, scalar or
per-feature arithmetic (``optables.UNARY``/``BINARY``), ops over the last axis
(``optables.LAST_AXIS``: LayerNorm, softmax), dropout that is off, and dense layers
(``optables.DENSE``) whose weight and bias are parameters or buffers — so applying it to every
step at once changes nothing.  The steps may be read as ``x[:, t]`` (``select``), ``x[:, t:t+1]``
or ``narrow`` (a kept size-1 axis), or as the pieces of ``unbind``, ``split(1)`` or ``chunk(T)``.

Weights are the same when every step reads the same parameter placeholders: a ``ModuleList``
holding one module T times is tied; T distinct modules are not.  The count T is the capture's:
``range(x.size(a))`` and ``x.unbind(a)`` specialize axis ``a`` to the example's size (the
program's input checker then sends other lengths to the original code).  A literal count
(``range(6)``) over an axis the capture keeps symbolic is rolled back when the example's axis has
exactly that many positions: the body is applied to the first T positions,
``narrow(x, a, 0, T)``, which is the loop for every length the capture admits (the loop's last
``select`` made the capture require at least T).  When the example's axis is longer, the loop
reads only part of it and is reported instead.

A step is what lies between the join's argument and the step's reads of ``x`` (every node that
depends on those reads); a node two steps share is a value passed between them.  When the time
axis moves (``d != a``) the result is a contiguous copy, as the join's was.

Rejected, with the reason: untied weights, a recurrence (a step reads another step's output),
steps that read more than one position, positions missing, repeated or out of order, a loop over
the feature axis, BatchNorm in the body (training mode normalises each step with its own
statistics; the loop is left alone in eval mode too), training-mode dropout or any other random op
(the masks would be drawn in another order), an op that is not row-wise, a step mixed with a
tensor from outside the loop that is not per-feature, steps that kept a size-1 axis stacked (or
steps that dropped it concatenated: their features are joined).  Joins whose steps hold no dense
layer are not reported.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx

from ..optables import (
    ANY_RANDOM,
    BATCH_NORMS,
    BINARY,
    DENSE,
    DROPOUTS,
    IDENTITY,
    JOINS,
    LAST_AXIS,
    METADATA,
    PICKS,
    SPLITS,
    UNARY,
    in_place,
    is_op,
)
from .base import (
    Context,
    Match,
    example_shape,
    expr,
    first_failure,
    op_label,
    rejected,
    render,
    same,
)

aten = torch.ops.aten
PATTERN = "loop"
_END = 2**62  # a slice end at or past this reads to the end of the axis
ROWWISE = UNARY | IDENTITY | BINARY | frozenset(LAST_AXIS) | DENSE | ANY_RANDOM | BATCH_NORMS
BATCH_NORM = ("BatchNorm inside the loop: in training mode each step is normalised with its own "
              "batch statistics (and the running statistics move once per step), so one call on "
              "all steps would differ; the loop is left as it is in both modes")


# --- reading one step of x -------------------------------------------------------------------
@dataclass(frozen=True)
class Pick:
    """A step's read of the loop's input: position ``index`` of axis ``axis`` of ``x``."""

    x: fx.Node
    axis: int
    index: int
    keep: bool  # the step keeps a size-1 axis there (``x[:, t:t+1]``, ``split(1, a)``)
    reader: fx.Node  # the node that reads ``x`` itself (a full slice, the pick, unbind/split)


def _slice_args(n: fx.Node) -> list[Any]:
    """(dim, start, end, step) of ``aten.slice.Tensor``."""
    vals = list(n.args[1:]) + [0, None, None, 1][len(n.args) - 1:]
    for i, k in enumerate(("dim", "start", "end", "step")):
        vals[i] = n.kwargs.get(k, vals[i])
    return vals[:4]


def _is(v: Any, k: int) -> bool:
    """``v == k`` for a plain int (never a comparison of a SymInt, which would add a guard)."""
    return isinstance(v, int) and v == k


def full_slice(n: Any, ctx: Context) -> bool:
    """``x[:]`` along one axis (Python's ``x[:, t]`` records one before the ``select``)."""
    if not is_op(n, {aten.slice.Tensor}):
        return False
    dim, start, end, step = _slice_args(n)
    if not (start is None or _is(start, 0)) or not _is(step, 1):
        return False
    if end is None or (isinstance(end, int) and end >= _END):
        return True
    shape = ctx.shape(n.args[0])
    return shape is not None and same(end, shape[dim])


def _source(src: fx.Node, reader: fx.Node, ctx: Context) -> tuple[fx.Node, fx.Node]:
    """The tensor under full slices, and the node that reads it."""
    while full_slice(src, ctx):
        reader, src = src, src.args[0]
    return src, reader


def _axis_index(n: fx.Node) -> tuple[Any, Any, bool] | None:
    """(axis, position, keeps the axis) of a ``select``/``slice``/``narrow`` of one position."""
    if n.target is aten.select.int:
        return n.args[1], n.args[2], False
    if n.target is aten.narrow.default:
        return (n.args[1], n.args[2], True) if _is(n.args[3], 1) else None
    dim, start, end, step = _slice_args(n)
    if isinstance(start, int) and isinstance(end, int) and end == start + 1 and _is(step, 1):
        return dim, start, True
    return None


def _normal(index: int, size: Any) -> int:
    """A negative position counted from the end, when the axis has a fixed size."""
    e = expr(size)
    return index + int(e) if index < 0 and e.is_Integer else index


def pick_of(n: fx.Node, ctx: Context) -> Pick | None:
    """The step ``n`` reads, when it reads one position of one axis of a tensor."""
    if is_op(n, {operator.getitem}):
        return _piece(n, ctx)
    if not is_op(n, PICKS) or full_slice(n, ctx):
        return None
    found = _axis_index(n)
    if found is None or not isinstance(found[0], int) or not isinstance(found[1], int):
        return None
    x, reader = _source(n.args[0], n, ctx)
    shape = ctx.shape(x)
    if not shape:
        return None
    axis = found[0] % len(shape)
    return Pick(x, axis, _normal(found[1], shape[axis]), found[2], reader)


def _split_axis(src: fx.Node, shape: tuple[Any, ...]) -> tuple[int, bool] | None:
    """(axis, keeps the axis) when ``src`` cuts its input into all its positions."""
    t, a = src.target, list(src.args)
    if t is aten.unbind.int:
        return int(src.kwargs.get("dim", a[1] if len(a) > 1 else 0)) % len(shape), False
    dim = int(src.kwargs.get("dim", a[2] if len(a) > 2 else 0)) % len(shape)
    if t in (aten.split.Tensor, aten.unsafe_split.Tensor) and _is(a[1], 1):
        return dim, True
    if t is aten.split_with_sizes.default and all(_is(s, 1) for s in a[1]):
        return dim, True
    if t is aten.chunk.default and same(a[1], shape[dim]):
        return dim, True
    return None


def _piece(n: fx.Node, ctx: Context) -> Pick | None:
    src, index = n.args
    if not is_op(src, SPLITS) or not isinstance(index, int):
        return None
    x, reader = _source(src.args[0], src, ctx)
    shape = ctx.shape(x)
    found = _split_axis(src, shape) if shape else None
    if found is None:
        return None
    return Pick(x, found[0], index, found[1], reader)


# --- the steps of one join -------------------------------------------------------------------
_NONE: frozenset[fx.Node] = frozenset()


class Scan:
    """The picks of a graph, and for every node the tensors whose picks it depends on (computed
    once per graph)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.picks: dict[fx.Node, Pick] = {}
        self.deps: dict[fx.Node, frozenset[fx.Node]] = {}
        for n in ctx.graph.nodes:
            if n.op != "call_function" or is_op(n, METADATA):
                continue
            deps = _NONE
            for i in n.all_input_nodes:
                more = self.deps.get(i, _NONE)
                deps = deps if more <= deps else deps | more
            pick = pick_of(n, ctx)
            if pick is not None:
                self.picks[n] = pick
                deps = deps | {pick.x}
            if deps:
                self.deps[n] = deps

    def source(self, items: list[fx.Node]) -> fx.Node | None:
        """The tensor every item depends on through picks; the latest one when there are several
        (a loop over the result of an earlier loop depends on that loop's input too)."""
        common = frozenset.intersection(*(self.deps.get(i, _NONE) for i in items))
        return max(common, key=self.ctx.order.__getitem__) if common else None


@dataclass
class Step:
    """What one step of the loop computes: from its picks to the value the join receives."""

    item: fx.Node  # the join's argument
    out: fx.Node  # the step's value (``item`` without a trailing unsqueeze)
    unsqueeze: int | None = None
    nodes: list[fx.Node] = field(default_factory=list)  # its ops, in graph order (no picks)
    picks: list[fx.Node] = field(default_factory=list)


def _start(item: fx.Node, ctx: Context) -> tuple[fx.Node, int | None]:
    if is_op(item, {aten.unsqueeze.default}):
        return item.args[0], int(item.args[1]) % (ctx.rank(item) or 1)
    return item, None


def _walk(step: Step, k: int, owner: dict[fx.Node, int], scan: Scan, x: fx.Node) -> int | None:
    """Fill ``step`` with the ops between its picks of ``x`` and its value; the step that owns
    one of them already (a recurrence), if any."""
    stack, seen = [step.out], set()
    while stack:
        n = stack.pop()
        if n in seen or x not in scan.deps.get(n, _NONE):
            continue  # a value from outside the loop
        seen.add(n)
        pick = scan.picks.get(n)
        if pick is not None and pick.x is x:
            step.picks.append(n)
            continue
        if owner.get(n, k) != k:
            return owner[n]
        owner[n] = k
        step.nodes.append(n)
        stack.extend(n.all_input_nodes)
    step.nodes.sort(key=scan.ctx.order.__getitem__)
    return None


def walk_steps(items: list[fx.Node], scan: Scan, x: fx.Node) -> tuple[list[Step], str]:
    """Each item's step (walking back to its picks of ``x``), or the first recurrence found:
    (the steps so far, its reason)."""
    owner: dict[fx.Node, int] = {}
    first: dict[fx.Node, int] = {}
    steps: list[Step] = []
    for k, item in enumerate(items):
        if item in first:  # the same value twice: a repeated position, said by the coverage
            steps.append(steps[first[item]])
            continue
        first[item] = owner[item] = k
        step = Step(item, *_start(item, scan.ctx))
        steps.append(step)
        other = _walk(step, k, owner, scan, x)
        if other is not None:
            return steps, (f"step {k} uses the output of step {other} (a recurrence): each step "
                           "depends on the one before, not time-distributed")
    return steps, ""


# --- the loop and its conditions -------------------------------------------------------------
@dataclass
class Loop:
    """A join of per-step values, with what the conditions need."""

    join: fx.Node
    steps: list[Step]
    scan: Scan
    to: int = 0  # the axis the steps end on
    prefix: int | None = None  # T, when the steps are the first T positions of a longer axis

    @property
    def ctx(self) -> Context:
        return self.scan.ctx

    @property
    def first(self) -> Pick:
        return self.scan.picks[self.steps[0].picks[0]]

    @property
    def shape(self) -> tuple[Any, ...]:
        return self.ctx.shape(self.first.x) or ()

    def dense(self) -> list[fx.Node]:
        return [n for n in self.steps[0].nodes if n.target in DENSE]

    def index(self, step: Step) -> int:
        return self.scan.picks[step.picks[0]].index


def _one_source(loop: Loop) -> str:
    """Every step reads one position of the same axis of the same tensor, laid out alike."""
    missing = next((k for k, s in enumerate(loop.steps) if not s.picks), None)
    if missing is not None:
        return f"step {missing} does not read one position of the loop's input"
    p0 = loop.first
    for k, step in enumerate(loop.steps):
        picks = [loop.scan.picks[p] for p in step.picks]
        if any((p.x, p.axis, p.keep) != (p0.x, p0.axis, p0.keep) for p in picks):
            return "the steps read different tensors or axes"
        positions = sorted({p.index for p in picks})
        if len(positions) > 1:
            return (f"step {k} reads positions {positions} of axis {p0.axis}: it mixes steps, "
                    "not time-distributed")
        if step.unsqueeze != loop.steps[0].unsqueeze:
            return f"step {k} is laid out differently from step 0"
    return ""


def _not_features(loop: Loop) -> str:
    a = loop.first.axis
    if a == len(loop.shape) - 1:
        return (f"the loop runs over the feature axis (axis {a}, the one the dense layers read): "
                "not time-distributed")
    return ""


def _short(xs: list[int]) -> str:
    return str(xs) if len(xs) <= 8 else f"[{', '.join(map(str, xs[:8]))}, ...]"


def _coverage(loop: Loop) -> str:
    """Positions 0..T-1, once each and in order, and T is the whole axis."""
    idx = [loop.index(s) for s in loop.steps]
    n, a = len(idx), loop.first.axis
    if sorted(idx) != list(range(n)):
        return (f"the steps read positions {_short(idx)} of axis {a}: they do not cover positions "
                f"0..{n - 1} once each")
    if idx != list(range(n)):
        return f"the steps read the positions of axis {a} out of order ({_short(idx)})"
    size = loop.shape[a]
    if same(size, n):
        return ""
    have = example_shape((size,))[0]
    if have == n and _at_least(loop.ctx, size, n):
        loop.prefix = n
        return ""
    return (f"the steps cover {n} of the {have} positions along axis {a}: the loop reads only "
            "part of the axis")


def _at_least(ctx: Context, size: Any, n: int) -> bool:
    """Every size the capture admits for ``size`` is at least ``n``."""
    e = expr(size)
    bound = ctx.captured.range_constraints.get(e) if isinstance(e, sympy.Symbol) else None
    lower = getattr(bound, "lower", None)
    return lower is not None and bool(lower >= n)


def _layout(loop: Loop) -> str:
    """Where the time axis ends (``loop.to``), or why the join is not a re-stacking."""
    join, rank, step = loop.join, len(loop.shape), loop.steps[0]
    d = join.args[1] if len(join.args) > 1 else join.kwargs.get("dim", 0)
    keep, unsq = loop.first.keep, step.unsqueeze
    if join.target is aten.stack.default:
        if keep or unsq is not None:
            return "stacks steps that kept their time axis: the result has an extra axis"
        loop.to = int(d) % rank
        return ""
    d = int(d) % rank
    if keep == (unsq is not None):
        return ("concatenates steps that dropped their time axis: their features are joined, "
                "not their steps") if not keep else "unsqueezes steps that kept their time axis"
    at = loop.first.axis if keep else unsq
    if d != at:
        return f"concatenates the steps along axis {d}, but their time axis is {at}"
    loop.to = at
    return ""


def dense_parts(n: fx.Node) -> tuple[Any, Any, Any]:
    """(input, weight as stored, bias) of a dense op; the weight is (out, in) for ``linear`` and
    (in, out) otherwise."""
    if n.target is aten.addmm.default:
        return n.args[1], n.args[2], n.args[0]
    if n.target is aten.linear.default:
        return n.args[0], n.args[1], n.args[2] if len(n.args) > 2 else None
    return n.args[0], n.args[1], None


def _dense_reason(n: fx.Node, inside: set[fx.Node], ctx: Context) -> str:
    x, w, b = dense_parts(n)
    op = op_label(n)
    if x not in inside:
        return f"the step is the weight of {op}, not its input"
    if w in inside or not ctx.state_source(w):
        return f"the weight of {op} is computed, not a parameter or buffer"
    if len(ctx.shape(w) or ()) != 2:
        return f"the weight of {op} is not a matrix"
    if isinstance(b, fx.Node) and (b in inside or not ctx.state_source(b)):
        return f"the bias of {op} is computed, not a parameter or buffer"
    if any(n.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")):
        return f"{op} scales its terms"
    return ""


def _last_axis_reason(n: fx.Node, ctx: Context) -> str:
    idx = LAST_AXIS[n.target]
    if idx is None:
        if len(n.args[1]) != 1:
            return f"{op_label(n)} normalises over more than the feature axis"
        return ""
    rank = ctx.rank(n.args[0]) or 1
    if len(n.args) > idx and int(n.args[idx]) % rank != rank - 1:
        return f"{op_label(n)} works along another axis than the features"
    return ""


def _operand_reason(n: fx.Node, inside: set[fx.Node], ctx: Context) -> str:
    """Tensors from outside the step broadcast along the features only (per-feature values)."""
    rank = ctx.rank(n) or 0
    for a in n.all_input_nodes:
        s = ctx.shape(a)
        if a in inside or s is None:
            continue
        if len(s) > rank or not all(same(d, 1) for d in s[:-1]):
            return (f"{op_label(n)} mixes each step with a tensor of shape {render(s)} from "
                    "outside the loop")
    return ""


def dropout_off(n: fx.Node) -> bool:
    if n.target not in DROPOUTS:
        return False
    p = n.args[1]
    return n.args[2] is False or (isinstance(p, (int, float)) and p == 0)


def _random_reason(n: fx.Node) -> str:
    if n.target in DROPOUTS:
        return ("Dropout in training mode inside the loop draws one random mask per step: one "
                "call on all steps would draw them in another order")
    return (f"{op_label(n)} draws random numbers at each step: one call on all steps would draw "
            "them in another order")


def op_reason(n: fx.Node, inside: set[fx.Node], ctx: Context) -> str:
    """Why ``n`` (an op of a step) is not row-wise ("" when it is)."""
    t = n.target
    if in_place(n):
        return f"{op_label(n)} writes in place inside the loop"
    if t in BATCH_NORMS:
        return BATCH_NORM
    if t in ANY_RANDOM and not dropout_off(n):
        return _random_reason(n)
    if t in DENSE:
        return _dense_reason(n, inside, ctx)
    if full_slice(n, ctx):
        return ""
    if t not in ROWWISE:
        return f"the step passes through {op_label(n)}, which is not row-wise"
    return (_last_axis_reason(n, ctx) if t in LAST_AXIS else "") or \
        _operand_reason(n, inside, ctx)


def _rowwise(loop: Loop) -> str:
    step = loop.steps[0]
    inside = set(step.nodes) | set(step.picks)
    for n in step.nodes:
        reason = op_reason(n, inside, loop.ctx)
        if reason:
            return reason
    return ""


# --- same ops, same weights ------------------------------------------------------------------
def _outside_key(a: Any, ctx: Context, depth: int = 0) -> Any:
    """What a value from outside the step is: a parameter by name, a small computation from
    parameters by its structure (``W.t()`` recorded once per step), anything else by node."""
    if isinstance(a, (list, tuple)):
        return tuple(_outside_key(v, ctx, depth) for v in a)
    if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", str(a.node.expr))  # compared as text: comparing SymInts adds guards
    if not isinstance(a, fx.Node):
        return ("const", a)
    if a in ctx.state:
        return ("state", ctx.state[a])
    if (a.op == "call_function" and depth < 4 and a.target not in ANY_RANDOM
            and not in_place(a)):
        return (a.target, _outside_key(a.args, ctx, depth + 1),
                _outside_key(tuple(sorted(a.kwargs.items())), ctx, depth + 1))
    return ("node", a.name)


def signature(step: Step, ctx: Context) -> tuple[Any, ...]:
    """The step's ops with their operands named relative to the step (full slices, which the
    capture records for some steps only, left out)."""
    kept = [n for n in step.nodes if not full_slice(n, ctx)]
    index = {n: i for i, n in enumerate(kept)}
    inside, picks = set(step.nodes), set(step.picks)

    def arg(a: Any) -> Any:
        if isinstance(a, (list, tuple)):
            return tuple(arg(v) for v in a)
        if isinstance(a, fx.Node) and a in picks:
            return ("step",)
        if isinstance(a, fx.Node) and a in index:
            return ("op", index[a])
        if isinstance(a, fx.Node) and a in inside:  # a full slice: its input
            return arg(a.args[0])
        return _outside_key(a, ctx)

    ops = tuple((n.target, arg(n.args), arg(tuple(sorted(n.kwargs.items())))) for n in kept)
    return (*ops, ("out", arg(step.out), step.unsqueeze))


def _states(key: Any) -> list[str]:
    if isinstance(key, tuple) and len(key) == 2 and key[0] == "state":
        return [key[1]]
    if isinstance(key, tuple):
        return [s for k in key for s in _states(k)]
    return []


def _unnamed(key: Any) -> Any:
    if isinstance(key, tuple) and len(key) == 2 and key[0] == "state":
        return ("state",)
    return tuple(_unnamed(k) for k in key) if isinstance(key, tuple) else key


def _same_ops(loop: Loop) -> str:
    sigs = [signature(s, loop.ctx) for s in loop.steps]
    for k, sig in enumerate(sigs[1:], 1):
        if sig == sigs[0]:
            continue
        if _unnamed(sig) == _unnamed(sigs[0]):
            w0, wk = next((a, b) for a, b in zip(_states(sigs[0]), _states(sig)) if a != b)
            return (f"the steps use different weights ({w0} in step 0, {wk} in step {k}): an "
                    "untied ModuleList (one layer per step) is not time-distributed")
        return f"step {k} does not run the same ops as step 0"
    return ""


# --- the rewrite -----------------------------------------------------------------------------
@dataclass
class Plan:
    """Names in the captured graph (the emit runs on a fresh copy of it)."""

    join: str
    reader: str  # reads x for step 0
    picks: list[str]  # step 0's picks
    body: list[tuple[str, str]]  # step 0's ops in graph order, with how each is emitted
    out: str  # step 0's value
    erase: list[str]  # every op of every step, and the picks and readers
    axis: int
    to: int
    rank: int
    prefix: int | None


def _kind(n: fx.Node, ctx: Context) -> str:
    if full_slice(n, ctx) or dropout_off(n):
        return "skip"
    return "dense" if n.target in DENSE else "op"


def _plan(loop: Loop) -> Plan:
    ctx, s0 = loop.ctx, loop.steps[0]
    erase = [n.name for s in loop.steps for n in (s.item, *reversed(s.nodes))]
    for s in loop.steps:
        for p in s.picks:
            erase += [p.name, loop.scan.picks[p].reader.name]
    return Plan(loop.join.name, loop.first.reader.name, [p.name for p in s0.picks],
                [(n.name, _kind(n, ctx)) for n in s0.nodes], s0.out.name, erase,
                loop.first.axis, loop.to, len(loop.shape), loop.prefix)


def _out_in(rw: Any, w: fx.Node, before: fx.Node) -> fx.Node:
    """A weight stored (in, out), as the canonical node reads it: (out, in)."""
    if is_op(w, {aten.t.default}):
        return w.args[0]
    return rw.call(aten.t.default, (w,), before=before, like=w)


def _emit_op(rw: Any, n: fx.Node, kind: str, new: dict[fx.Node, Any], before: fx.Node) -> Any:
    def m(a: Any) -> Any:
        return new.get(a, a) if isinstance(a, fx.Node) else a

    if kind == "skip":
        return m(n.args[0])
    if kind == "dense":
        x, w, b = dense_parts(n)
        if n.target is not aten.linear.default:
            w = _out_in(rw, w, before)
        return rw.tdd(m(x), w, b, feature_dim=-1, site=n.name, before=before, like=n)
    args = list(fx.node.map_aggregate(n.args, m))
    idx = LAST_AXIS.get(n.target)
    if idx is not None and len(args) > idx:
        args[idx] = -1
    return rw.call(n.target, args, dict(fx.node.map_aggregate(n.kwargs, m)), before=before,
                   like=n)


def _dense_copy(rw: Any, x: fx.Node, before: fx.Node) -> fx.Node:
    """A contiguous copy: the join's result was contiguous (later views of it rely on that), and
    a strided input makes shape inference guard on the sizes that decide its strides."""
    return rw.call(aten.clone.default, (x,), {"memory_format": torch.contiguous_format},
                   before=before, like=x)


def _emit(plan: Plan) -> Callable[[Any], None]:
    def emit(rw: Any) -> None:
        join = rw[plan.join]
        x = rw[plan.reader].args[0]  # as it is now (an earlier rewrite may have replaced it)
        if plan.prefix is not None:
            x = _dense_copy(rw, rw.call(aten.slice.Tensor, (x, plan.axis, 0, plan.prefix),
                                        before=join, like=rw[plan.reader]), join)
        new: dict[fx.Node, Any] = {rw[p]: x for p in plan.picks}
        for name, kind in plan.body:
            new[rw[name]] = _emit_op(rw, rw[name], kind, new, join)
        out = new[rw[plan.out]]
        if plan.axis != plan.to:
            perm = [d for d in range(plan.rank) if d != plan.axis]
            perm.insert(plan.to, plan.axis)
            out = _dense_copy(rw, rw.call(aten.permute.default, (out, perm), before=join,
                                          like=join), join)
        rw.replace(join, out)
        rw.touched.extend(rw[n] for n in dict.fromkeys(plan.erase))

    return emit


# --- the family ------------------------------------------------------------------------------
def _anchor(steps: list[Step], join: fx.Node) -> fx.Node:
    return next((n for s in steps for n in s.nodes if n.target in DENSE), join)


def _nodes(join: fx.Node, steps: list[Step], scan: Scan) -> list[fx.Node]:
    """The join, every step's ops and picks, and the nodes that read the loop's input."""
    nodes = [join] + [n for s in steps for n in (s.item, *s.nodes, *s.picks)]
    nodes += [scan.picks[p].reader for s in steps for p in s.picks]
    return list(dict.fromkeys(nodes))


def _found(loop: Loop) -> Match:
    ctx = loop.ctx
    names = [n.name for n in _nodes(loop.join, loop.steps, loop.scan)]
    lead = list(example_shape(loop.shape)[:-1])
    sites = []
    for d in loop.dense():
        site = ctx.site(PATTERN, "found", d, loop.first.x, loop.join, fd=-1, kernel="linear")
        fin, fout = (example_shape(ctx.shape(v)) for v in (dense_parts(d)[0], d))
        site.in_shape, site.out_shape = (*lead, fin[-1]), (*lead, fout[-1])
        sites.append(site)
    return Match(PATTERN, sites, names, emit=_emit(_plan(loop)))


def prove(join: fx.Node, scan: Scan) -> Match | None:
    """The match of one join (None when its arguments are not the steps of a loop with a dense
    layer)."""
    ctx = scan.ctx
    items = join.args[0] if join.args else None
    if not isinstance(items, (list, tuple)) or len(items) < 2 or \
            not all(isinstance(i, fx.Node) for i in items):
        return None
    x = scan.source(list(items))
    if x is None:
        return None
    steps, recurrence = walk_steps(list(items), scan, x)
    anchor = _anchor(steps, join)
    if anchor is join or any(n.name in ctx.claimed for n in _nodes(join, steps, scan)):
        return None
    loop = Loop(join, steps, scan)
    reason = recurrence or first_failure(
        lambda: _one_source(loop), lambda: _not_features(loop), lambda: _coverage(loop),
        lambda: _layout(loop), lambda: _rowwise(loop), lambda: _same_ops(loop))
    if reason:
        return rejected(ctx, PATTERN, anchor, x, join, reason, _nodes(join, steps, scan))
    return _found(loop)


class LoopFamily:
    """Python loops over the steps of a sequence (see the module docstring)."""

    pattern = PATTERN

    def find(self, ctx: Context) -> list[Match]:
        scan: Scan | None = None
        out: list[Match] = []
        for node in ctx.unclaimed(JOINS):
            scan = scan or Scan(ctx)
            match = prove(node, scan)
            if match is not None:
                out.append(match)
        return out
