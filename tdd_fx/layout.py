"""Layout across regions: chains of channel-first sites run features-last, one transpose in and
one out, instead of a transpose pair per site, where that copies fewer tensors between layouts
(:func:`fewer_transposes`: a chain of ``conv`` or ``baddbmm`` sites, which transpose nothing,
stays as it is).

The identity the pass relies on.  Let R be a region of the rewritten graph: canonical nodes
``time_distributed_dense(., W, b, feature_dim=d)`` with the same non-last ``d`` on tensors of the
same rank ``r``, connected through ops that act on each position's feature vector independently
and identically:

- unary elementwise ops (:data:`~tdd_fx.optables.UNARY`; a dropout that is the identity: eval
  mode or ``p == 0``);
- binary elementwise ops (:data:`~tdd_fx.optables.BINARY`) with a scalar, with a parameter
  broadcast along ``d`` (a ``(C, 1)`` bias: it becomes ``(1, 1, C)``, broadcast along the last
  axis), or with another rank-``r`` tensor (a residual add: both operands moved);
- a layer norm (or any op) over the feature axis as channel-first code spells it,
  ``P(norm(P(v)))`` with ``P`` the transpose of ``d`` and the last axis: the inner ``P(v)`` *is*
  the moved ``v`` and the outer ``P`` brings it back, so both transposes cancel.

Then ``R(x) == movedim(R'(movedim(x, d, -1)), -1, d)`` where ``R'`` is ``R`` with every
``feature_dim`` set to ``-1`` (kernel ``linear``): every op of R commutes with the same
permutation of axes applied to all of its operands (elementwise ops and broadcasting between
same-rank operands do; the dense map reads only the feature axis, which the permutation sends to
the last axis).  Each value that leaves R is moved back (``movedim(v', -1, d)``) in the layout
it had: copied to contiguous rows where a channel-first op gave it those, a view where its
features were innermost (a transposing kernel's output).

Conditions (each a named check returning the reason it fails): at least two canonical nodes (one
site keeps its kernel); every op in the allowed tables; no view or reshape inside; no in-place op
on a value of the region, on its inputs or on the transposes it replaces; a region value used as
a weight is not moved; and the move removes work (:func:`fewer_transposes`): it copies fewer
tensors between layouts than the region copies as it stands.  The pass does nothing at all in a
graph that draws random numbers (dropout masks depend on the memory layout of what they drop).

The cost rule.  A transpose costs a copy where data changes layout; a ``movedim`` view costs
nothing.  Before the move, each value of the region is either channel-first rows (a ``conv``,
``matmul`` or ``baddbmm`` kernel's output, a graph input) or features innermost (a transposing
kernel's output: ``linear_t``/``linear_tc`` run ``F.linear`` on the features moved last and move
the result back as a view); elementwise ops keep their first full operand's layout.  Copies
before: each site whose input is not in the layout its kernel reads (transposing kernels read
features innermost, the others channel-first rows), each transpose out of the layout of a
channel-first value (a layer norm then copies it).  Copies after: each full input from outside
not already features innermost, each value leaving that was channel-first rows (it is copied
back to them; one whose features were innermost leaves as a view, the layout it had).  So a
stack of pointwise convs (each site reads and writes channel-first rows, no copy) is left as it
is, and a stack of transposing sites is moved when it copies a channel-first value more than the
one move in and out would (e.g. after each residual add, whose channel-first input decides the
sum's layout).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from . import ops
from .optables import ANY_RANDOM, BINARY, DROPOUTS, LAST_AXIS, METADATA, RESHAPES, UNARY, in_place

if TYPE_CHECKING:
    from .rewrite import Rewriter

aten = torch.ops.aten

_PERMS = {aten.permute.default, aten.transpose.int}
_TDD = ops.time_distributed_dense


def _val(a: Any) -> Any:
    return a.meta.get("val") if isinstance(a, fx.Node) else None


def _rank(a: Any) -> int | None:
    v = _val(a)
    return v.dim() if isinstance(v, torch.Tensor) else None


def to_last(d: int, r: int) -> list[int]:
    """The permutation of ``movedim(x, d, -1)``."""
    return [i for i in range(r) if i != d] + [d]


def from_last(d: int, r: int) -> list[int]:
    """The permutation of ``movedim(x, -1, d)``."""
    p = list(range(r - 1))
    p.insert(d, r - 1)
    return p


def _perm(n: fx.Node) -> list[int] | None:
    r = _rank(n)
    if n.op != "call_function" or n.target not in _PERMS or r is None:
        return None
    if n.target == aten.transpose.int:
        a, b = (int(i) % r for i in n.args[1:3])
        p = list(range(r))
        p[a], p[b] = p[b], p[a]
        return p
    return [int(i) % r for i in n.args[1]]


def site_key(n: fx.Node) -> tuple[int, int] | None:
    """``(feature_dim, rank)`` of a canonical node whose features are not last."""
    if n.op != "call_function" or n.target is not _TDD:
        return None
    r = _rank(n.args[0])
    if r is None or _rank(n) != r:
        return None
    d = n.kwargs.get("feature_dim", -1) % r
    return None if d == r - 1 else (d, r)


def inert_dropout(n: fx.Node) -> bool:
    """A dropout that draws nothing: ``train`` False or ``p`` 0 (eval mode)."""
    if n.op != "call_function" or n.target not in DROPOUTS or n.kwargs or len(n.args) != 3:
        return False
    return n.args[2] is False or n.args[1] == 0


def _scalars(args: Any) -> bool:
    return all(not isinstance(a, fx.Node) for a in args)


def row_op(n: fx.Node, r: int) -> bool:
    """An op on each position's features alone, the same at every position, of rank ``r``."""
    if n.op != "call_function" or in_place(n) or _rank(n) != r or not _scalars(n.kwargs.values()):
        return False
    if n.target in UNARY and n.target != aten.type_as.default or inert_dropout(n):
        return _scalars(n.args[1:])
    if n.target in BINARY:
        return _scalars(n.args[2:]) and all(
            not isinstance(a, fx.Node) or (_rank(a) or 0) <= r for a in n.args[:2])
    return False


def data_args(n: fx.Node, key: tuple[int, int]) -> list[fx.Node]:
    """The operands of ``n`` that carry channel-first values of the region (a site's input, an
    elementwise op's tensors; a transpose into the region carries a features-last one)."""
    if n.target is _TDD:
        return [n.args[0]] if isinstance(n.args[0], fx.Node) else []
    if n.target in _PERMS:
        return []
    return [a for a in n.args[:2 if n.target in BINARY else 1] if isinstance(a, fx.Node)]


def _is_into(n: fx.Node, key: tuple[int, int]) -> bool:
    """A transpose from features-last into the region's layout, of a value outside any region:
    the moved value is its input, free."""
    if _perm(n) != from_last(*key):
        return False
    src = n.args[0]
    return not (site_key(src) == key or row_op(src, key[1]) or _perm(src) == from_last(*key))


def _is_out(n: fx.Node, key: tuple[int, int]) -> bool:
    """A transpose out of the region's layout: the moved value itself, free."""
    return _perm(n) == to_last(*key)


# --- regions -------------------------------------------------------------------------------
@dataclass
class Region:
    """One connected region of channel-first values of layout ``key`` = ``(d, rank)``."""

    key: tuple[int, int]
    members: list[fx.Node]
    sites: list[fx.Node] = field(default_factory=list)
    #: operands from outside -> whether moving them costs a transpose (a full rank-r tensor)
    entries: dict[fx.Node, bool] = field(default_factory=dict)
    #: member -> its users outside the region (they read the value moved back)
    exits: dict[fx.Node, list[fx.Node]] = field(default_factory=dict)
    #: member -> users that read only its sizes (a free view back)
    sizes: dict[fx.Node, list[fx.Node]] = field(default_factory=dict)
    #: transposes out of the region's layout (each becomes the moved value itself)
    outs: list[fx.Node] = field(default_factory=list)
    #: members read by a member other than as a channel-first operand (as a weight)
    weights: list[fx.Node] = field(default_factory=list)
    #: member or input -> whether its features are innermost in memory before the move (the
    #: rest are channel-first rows): see :func:`layouts`
    inner: dict[fx.Node, bool] = field(default_factory=dict)


def _member(n: fx.Node, key: tuple[int, int]) -> bool:
    return site_key(n) == key or row_op(n, key[1])


def candidates(graph: fx.Graph, key: tuple[int, int]) -> set[fx.Node]:
    """Sites of layout ``key`` and transposes into it, and every row op they feed."""
    roots = [n for n in graph.nodes if site_key(n) == key or _is_into(n, key)]
    found, todo = set(roots), list(roots)
    while todo:
        n = todo.pop()
        for u in n.users:
            if u not in found and n in data_args(u, key) and _member(u, key):
                found.add(u)
                todo.append(u)
    return found


def _feature_op(n: fx.Node, r: int) -> bool:
    return n.op == "call_function" and (n.target in LAST_AXIS or row_op(n, r))


def linked(n: fx.Node, key: tuple[int, int], found: set[fx.Node]) -> list[fx.Node]:
    """Transposes into the region reached from ``n`` through a transpose out of it and row-wise
    ops on the features-last value (``P(norm(P(n)))``: a channel-first layer norm)."""
    frontier = [p for p in n.users if _is_out(p, key)]
    hits = []
    for _ in range(4):
        nxt = []
        for m in frontier:
            for u in m.users:
                if u in found and u.target in _PERMS:
                    hits.append(u)
                elif _feature_op(u, key[1]) and u.args[0] is m:
                    nxt.append(u)
        frontier = nxt
    return hits


def components(graph: fx.Graph, key: tuple[int, int]) -> list[list[fx.Node]]:
    """The connected regions among :func:`candidates`, each in graph order."""
    found = candidates(graph, key)
    parent = {n: n for n in found}

    def root(n: fx.Node) -> fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in found:
        for a in [*data_args(n, key), *linked(n, key, found)]:
            if a in found:
                parent[root(a)] = root(n)
    groups: dict[fx.Node, list[fx.Node]] = {}
    for n in graph.nodes:
        if n in found:
            groups.setdefault(root(n), []).append(n)
    return list(groups.values())


def _paid(a: fx.Node, key: tuple[int, int]) -> bool:
    """Moving ``a`` copies a full tensor (not a per-feature parameter or a scalar tensor)."""
    v, (d, r) = _val(a), key
    if v is None or v.dim() != r:
        return False
    return any(not (isinstance(s, int) and s == 1) for i, s in enumerate(v.shape) if i != d)


def _classify_user(reg: Region, m: fx.Node, u: fx.Node, inside: set[fx.Node]) -> None:
    if u in inside:
        if m not in data_args(u, reg.key) or m in _other_inputs(u, reg.key):
            reg.weights.append(m)
    elif _is_out(u, reg.key):
        reg.outs.append(u)
    elif u.op == "call_function" and u.target in METADATA:
        reg.sizes.setdefault(m, []).append(u)
    else:
        reg.exits.setdefault(m, []).append(u)


def _other_inputs(n: fx.Node, key: tuple[int, int]) -> list[fx.Node]:
    """Inputs of ``n`` outside its channel-first operand positions (a site's weight, bias)."""
    out: list[fx.Node] = []
    fx.node.map_arg((n.args[2 if n.target in BINARY else 1:], n.kwargs), out.append)
    return out


def analyse(key: tuple[int, int], members: list[fx.Node]) -> Region:
    """Sites, inputs from outside, values leaving, transposes out, of one region."""
    reg, inside = Region(key, members), set(members)
    for m in members:
        if m.target is _TDD:
            reg.sites.append(m)
        for a in data_args(m, key):
            if a not in inside:
                reg.entries[a] = reg.entries.get(a, False) or _paid(a, key)
        if m.target in _PERMS:
            continue  # a transpose into the region: outside users keep reading it
        for u in m.users:
            _classify_user(reg, m, u, inside)
    reg.inner = layouts(reg)
    return reg


# --- layouts before the move ---------------------------------------------------------------
#: kernels (:data:`tdd_fx.ops.KERNELS`) that run ``F.linear`` on the features moved last and move
#: the result back: they read features innermost (copying channel-first rows first) and leave
#: features innermost; ``conv`` (on axis 1 of a 3-5-D input), ``matmul`` and ``baddbmm`` read and
#: write channel-first rows
TRANSPOSING = frozenset({"linear", "linear_t", "linear_tc"})


def transposing(site: fx.Node) -> bool:
    """The site's kernel moves the features last and back (``conv`` does too off axis 1 or
    outside 3-5-D inputs: it falls back to ``linear_t``)."""
    impl = site.kwargs.get("impl", "linear")
    d, r = site_key(site) or (-1, 0)
    if impl in ("conv", "conv1d"):
        return not (d == 1 and 3 <= r <= 5)
    return impl in TRANSPOSING


def _hint(s: Any) -> int:
    return int(s.node.hint) if isinstance(s, torch.SymInt) else int(s)


def inner_on_example(a: Any, d: int) -> bool:
    """``a``'s features (axis ``d``) are innermost in memory on the example: ``movedim(d, -1)``
    is contiguous (axes of size 1 aside)."""
    v = _val(a)
    if not isinstance(v, torch.Tensor) or v.dim() <= d:
        return False
    try:
        dims = [(_hint(v.shape[i]), _hint(v.stride()[i])) for i in to_last(d, v.dim())]
    except (TypeError, ValueError, RuntimeError):
        return False
    want = 1
    for size, stride in reversed(dims):
        if size != 1 and stride != want:
            return False
        want *= size
    return True


def layouts(reg: Region) -> dict[fx.Node, bool]:
    """Whether each member and input of ``reg`` has its features innermost before the move:
    inputs as on the example; a site as its kernel leaves them; a transpose into the region as
    on the example; an elementwise op as its first full operand (the one that decides the
    layout of the result), else its first operand."""
    d, _ = reg.key
    inner = {a: inner_on_example(a, d) for a in reg.entries}
    for m in reg.members:  # in graph order: operands first
        if m.target is _TDD:
            inner[m] = transposing(m)
        elif m.target in _PERMS:
            inner[m] = inner_on_example(m, d)
        else:
            args = data_args(m, reg.key)
            full = [a for a in args if _paid(a, reg.key)] or args
            inner[m] = bool(full) and inner.get(full[0], False)
    return inner


def copies(reg: Region) -> tuple[int, int]:
    """Tensors copied from one layout to the other by the region as it stands, and after the
    move (see the module's cost rule)."""
    inner = reg.inner
    before = sum(inner.get(s.args[0], False) != transposing(s) for s in reg.sites)
    before += sum(not inner.get(p.args[0], False) for p in reg.outs)
    after = sum(paid and not inner[a] for a, paid in reg.entries.items())
    after += sum(not inner[m] for m in reg.exits)
    return before, after


# --- conditions ----------------------------------------------------------------------------
def enough_sites(reg: Region) -> str | None:
    n = len(reg.sites)
    return None if n >= 2 else f"{n} site(s): a single site keeps its kernel"


def allowed_ops(reg: Region) -> str | None:
    bad = [m.name for m in reg.members
           if not (site_key(m) == reg.key or row_op(m, reg.key[1]) or _is_into(m, reg.key))]
    return f"ops outside the allowed tables: {', '.join(bad)}" if bad else None


def no_views(reg: Region) -> str | None:
    bad = [m.name for m in reg.members if m.target in RESHAPES]
    return f"a view/reshape inside the region: {', '.join(bad)}" if bad else None


def no_in_place(reg: Region) -> str | None:
    for n in [*reg.members, *reg.outs, *reg.entries]:
        if in_place(n) or any(in_place(u) for u in n.users):
            return f"an in-place op on {n.name}"
    return None


def no_weight_use(reg: Region) -> str | None:
    names = ", ".join(m.name for m in reg.weights)
    return f"a region value used as a weight: {names}" if names else None


def fewer_transposes(reg: Region) -> str | None:
    """The move removes work: it copies fewer tensors between layouts than the region does as it
    stands (sites whose kernels read channel-first rows, ``conv``, copy nothing: moving them
    only adds the transposes in and out)."""
    before, after = copies(reg)
    if after < before:
        return None
    kernels = "/".join(s.kwargs.get("impl", "linear") for s in reg.sites)
    return (f"features-last would copy {after} tensor(s) between layouts to save {before} "
            f"(kernels {kernels})")


CHECKS: list[Callable[[Region], str | None]] = [
    enough_sites, allowed_ops, no_views, no_in_place, no_weight_use, fewer_transposes]


def random_op(graph: fx.Graph) -> str | None:
    """The graph draws random numbers (a mask's elements follow the memory layout)."""
    for n in graph.nodes:
        if n.op == "call_function" and n.target in ANY_RANDOM and not inert_dropout(n):
            return f"random op {n.name}: the pass does not run in this graph"
    return None


def reasons(reg: Region) -> list[str]:
    return [why for check in CHECKS if (why := check(reg)) is not None]


# --- the move ------------------------------------------------------------------------------
def _entry(rw: Rewriter, a: fx.Node, reg: Region, before: fx.Node) -> Any:
    """``a`` in the features-last layout: a per-feature parameter as ``(F,)``, anything else
    padded to rank r and moved (copied when paid)."""
    v, (d, r) = _val(a), reg.key
    if v.dim() == 0 or all(isinstance(s, int) and s == 1 for s in v.shape):
        return a
    sizes = [1] * (r - v.dim()) + list(v.shape)
    if all(isinstance(s, int) and s == 1 for i, s in enumerate(sizes) if i != d):
        return rw.call(aten.reshape.default, (a, [-1]), before=before)  # per feature: (F,)
    x = a
    for _ in range(r - v.dim()):
        x = rw.call(aten.unsqueeze.default, (x, 0), before=before)
    x = rw.call(aten.permute.default, (x, to_last(d, r)), before=before)
    if reg.entries[a]:
        x = rw.call(aten.contiguous.default, (x,), before=before)
    return x


def _rebuilt(rw: Rewriter, m: fx.Node, operand: Callable[[Any], Any]) -> fx.Node:
    if m.target is _TDD:
        new = rw.call(_TDD, (operand(m.args[0]), *m.args[1:]),
                      {**m.kwargs, "feature_dim": -1, "impl": "linear"}, before=m, like=m)
        if "tdd_site" in m.meta:
            new.meta["tdd_site"] = m.meta["tdd_site"]
            rw.sites[m.meta["tdd_site"]] = new
        return new
    k = 2 if m.target in BINARY else 1
    args = [operand(a) if i < k else a for i, a in enumerate(m.args)]
    return rw.call(m.target, args, dict(m.kwargs), before=m, like=m)


def move(rw: Rewriter, reg: Region) -> None:
    """Rebuild the region features-last; values leaving it are moved back."""
    moved: dict[fx.Node, Any] = {}
    for m in reg.members:
        if m.target in _PERMS:
            moved[m] = m.args[0]
            continue

        def operand(a: Any, m: fx.Node = m) -> Any:
            if not isinstance(a, fx.Node):
                return a
            if a not in moved:
                moved[a] = _entry(rw, a, reg, before=m)
            return moved[a]

        moved[m] = _rebuilt(rw, m, operand)
    _leave(rw, reg, moved)
    doomed = [*reg.members, *reg.outs]
    order = {n: i for i, n in enumerate(rw.graph.nodes)}
    for n in sorted(doomed, key=order.__getitem__, reverse=True):
        if not n.users:
            rw.graph.erase_node(n)


def _leave(rw: Rewriter, reg: Region, moved: dict[fx.Node, Any]) -> None:
    """Users outside read the value moved back in the layout it had: copied to channel-first
    rows where it was in them, a view where its features were innermost; size reads a free view;
    transposes out of the layout the moved value itself."""
    d, r = reg.key
    order = {n: i for i, n in enumerate(rw.graph.nodes)}
    for users, copy in [(reg.exits, True), (reg.sizes, False)]:
        for m, us in users.items():
            first = min(us, key=order.__getitem__)
            back = rw.call(aten.permute.default, (moved[m], from_last(d, r)), before=first,
                           like=m)
            if copy and not reg.inner[m]:
                back = rw.call(aten.contiguous.default, (back,), before=first, like=m)
            for u in us:
                u.replace_input_with(m, back)
    for p in reg.outs:
        p.replace_all_uses_with(moved[p.args[0]])


def features_last(rw: Rewriter) -> list[str]:
    """Run every eligible region of ``rw``'s graph features-last; the reasons others stay."""
    why = random_op(rw.graph)
    if why is not None:
        return [why]
    notes = []
    keys = dict.fromkeys(k for n in rw.graph.nodes if (k := site_key(n)) is not None)
    for key in keys:
        for members in components(rw.graph, key):
            reg = analyse(key, members)
            failed = reasons(reg)
            if failed:
                notes.append(f"{', '.join(m.name for m in reg.sites) or '-'}: {failed[0]}")
            else:
                move(rw, reg)
    return notes
