"""Dense layers on folded rows: the reshape sandwich.

Identity (``x: (*L, F)`` with leading axes ``L``, ``R = prod(L)``)::

    dense(x.reshape(R, F)).reshape(*L, O) == time_distributed_dense(x, W, b)

because a reshape keeps row-major order: row ``r`` of the fold is position ``unravel(r, L)`` of
``x``, and a dense layer treats rows independently.  Between the fold and the unfold the rows may
pass through any chain of row-wise ops — elementwise maps, scalar or per-feature arithmetic,
ops over the last axis (LayerNorm, softmax), eval-mode BatchNorm (a per-feature affine map),
dropout, more dense layers, two branches multiplied together (GLU) — each of which is applied to
the unfolded tensor instead.  A *region* is everything reachable from the folds through such ops;
it is rewritten only when every path ends in an unfold back to the same leading sizes
(``reshape(*L, O)``, decided on PyTorch's symbolic sizes for every size the capture admits).

The fold may also merge trailing axes into the features (``x.view(B*T, C, H, W).flatten(1)``
over ``(B, T, C, H, W)``: ``L = (B, T)``, ``F = C·H·W``; applied to ``x.flatten(2)``), and the
unfold may drop a size-1 feature axis (``view(B, m)`` after ``Linear(hw, 1)``, LSTNet's highway).
A literal in the restore (``view(-1, 5)``) that only matches the example's sizes is a guard.

Outside folds: ``nn.Linear`` between a permutation and its inverse (``fc(x.permute(0, 2, 1))
.permute(0, 2, 1)``, ``fc(x.mT).mT``, ``fc(x.T).T``); a reshape that keeps the leading axes and
merges trailing ones into the features before ``nn.Linear`` (speechbrain's ``combine_dims``);
TFT-style scalar embeddings ``Linear(1, E)(x[..., i:i+1])``, one site per variable (one Linear
shared by several variables is the loop family's loop over the feature axis).  An in-place op on
the fold (``rows.relu_()``) is row-wise when the folded tensor is a fresh intermediate that
nothing else reads.

Not equivalent, and rejected with the reason: a restore that splits the rows differently
(``view(-1, x.size(0), E)``), rows that stay folded (returned, summed over, attention between
rows), rows mixed with a tensor from outside the fold, training-mode BatchNorm (statistics pooled
over all rows), an in-place op writing through the fold into the caller's tensor.
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..optables import (
    BINARY,
    IDENTITY,
    IN_PLACE_OF,
    LAST_AXIS,
    METADATA,
    RANDOM,
    RESHAPES,
    UNARY,
    in_place,
    is_op,
)
from .base import (
    Context,
    Match,
    example_shape,
    expr,
    op_label,
    product,
    rejected,
    render,
    same,
)

aten = torch.ops.aten
PATTERN = "reshape"
DENSE = {aten.linear.default: "reshape", aten.addmm.default: "matmul",
         aten.mm.default: "matmul", aten.matmul.default: "matmul"}


@dataclass
class Region:
    """The folded rows of one or more folds of the same leading sizes, and what they pass."""

    lead: tuple[Any, ...]
    #: False for a near-miss fold (not of the leading axes only): never rewritten
    strict: bool = True
    folds: dict[fx.Node, fx.Node] = field(default_factory=dict)  # fold node -> unfolded source
    nodes: list[fx.Node] = field(default_factory=list)  # row-wise ops, in graph order
    dense: list[fx.Node] = field(default_factory=list)
    unfolds: list[fx.Node] = field(default_factory=list)
    metadata: list[fx.Node] = field(default_factory=list)
    reason: str = ""
    culprit: fx.Node | None = None
    guards: dict[Any, int] = field(default_factory=dict)
    #: folds that also merge several trailing axes into the features: fold node -> the first
    #: merged axis of its source (``x.view(B*T, C, H, W).flatten(1)`` over ``(B, T, C, H, W)``)
    merge: dict[fx.Node, int] = field(default_factory=dict)

    def members(self) -> set[fx.Node]:
        return set(self.folds) | set(self.nodes)


def fold_of(node: fx.Node, ctx: Context, guards: dict[Any, int]) -> fx.Node | None:
    """The unfolded source ``x`` when ``node`` is ``x.reshape(prod(x.shape[:-1]), F)`` with
    ``x`` of rank >= 3 (literal sizes guarded); else None."""
    if node.op != "call_function" or node.target not in RESHAPES:
        return None
    src = node.args[0]
    s_in, s_out = ctx.shape(src), ctx.shape(node)
    if s_in is None or s_out is None or len(s_in) < 3 or len(s_out) != 2:
        return None
    if not ctx.equal_shape(s_out, (product(s_in[:-1]), s_in[-1]), guards):
        return None
    return src


def merged_fold_of(node: fx.Node, ctx: Context,
                   guards: dict[Any, int]) -> tuple[fx.Node, int] | None:
    """``(x, k)`` when ``node`` is 2-D and, through a chain of reshapes, lays ``x`` out as
    ``(prod(x.shape[:k]), prod(x.shape[k:]))`` with ``2 <= k < rank - 1``: the leading ``k``
    axes folded into rows, the trailing axes merged into the features of each row (row-major
    order keeps each position's features together).  Else None."""
    if node.op != "call_function" or node.target not in RESHAPES or ctx.rank(node) != 2:
        return None
    rows, feats = ctx.shape(node)
    chain, src = [], node.args[0]
    while isinstance(src, fx.Node) and len(chain) < 8:
        chain.append(src)
        if src.op != "call_function" or src.target not in _CHAIN_VIEWS:
            break
        src = src.args[0]
    for x in reversed(chain):
        s_in = ctx.shape(x)
        for k in range(2, len(s_in or ()) - 1):
            trial = dict(guards)
            if (ctx.equal(rows, product(s_in[:k]), trial)
                    and ctx.equal(feats, product(s_in[k:]), trial)):
                guards.update(trial)
                return x, k
    return None


#: ops a merged fold may pass through on its way from the source (row-major order kept)
_CHAIN_VIEWS = RESHAPES | {aten.contiguous.default, aten.clone.default}


def _chain_step(node: fx.Node) -> bool:
    """Every reader of ``node``'s values is another reshape: a step of a longer chain, judged
    where the chain ends."""
    readers = [u for u in node.users if u.target not in METADATA]
    return bool(readers) and all(u.op == "call_function" and u.target in _CHAIN_VIEWS
                                 for u in readers)


def loose_fold_of(node: fx.Node, ctx: Context) -> fx.Node | None:
    """``x`` when ``node`` folds two or more leading axes of ``x`` into its first axis, however
    it lays out the rest (``x.view(-1)``, ``x.reshape(-1, 1, F)``): a near-miss to report."""
    if node.op != "call_function" or node.target not in RESHAPES:
        return None
    src = node.args[0]
    s_in, s_out = ctx.shape(src), ctx.shape(node)
    if s_in is None or s_out is None or len(s_in) < 2 or len(s_out) > len(s_in):
        return None
    for k in range(2, len(s_in) + 1):
        if same(s_out[0], product(s_in[:k])) and same(product(s_out[1:]), product(s_in[k:])):
            return src
    return None


def _dense_input(node: fx.Node) -> Any:
    return node.args[1] if node.target == aten.addmm.default else node.args[0]


def _dense_weight(node: fx.Node) -> tuple[Any, Any]:
    """(weight as stored, bias) of a dense op."""
    if node.target == aten.addmm.default:
        return node.args[2], node.args[0]
    if node.target == aten.linear.default:
        return node.args[1], node.args[2] if len(node.args) > 2 else None
    return node.args[1], None


class _Grow:
    """Walks forward from the folds, classifying each use of the folded rows."""

    def __init__(self, region: Region, ctx: Context) -> None:
        self.r = region
        self.ctx = ctx

    def fail(self, node: fx.Node, reason: str) -> None:
        if not self.r.reason:
            self.r.reason, self.r.culprit = reason, node

    def run(self) -> None:
        frontier = list(self.r.folds)
        seen = set(frontier)
        while frontier and not self.r.reason:
            node = frontier.pop(0)
            for user in list(node.users):
                if user in seen:
                    continue
                kind = self.classify(user, node)
                if kind == "member":
                    seen.add(user)
                    frontier.append(user)
                    self.r.nodes.append(user)
                    if user.target in DENSE:
                        self.r.dense.append(user)
                elif kind == "unfold":
                    seen.add(user)
                    self.r.unfolds.append(user)
                elif kind == "metadata":
                    self.r.metadata.append(user)
                if self.r.reason:
                    return
        self.r.nodes.sort(key=self.ctx.order.__getitem__)

    def classify(self, user: fx.Node, src: fx.Node) -> str:
        ctx = self.ctx
        if user.op != "call_function":
            self.fail(user, "the rows stay folded: they are returned as they are")
            return ""
        t = user.target
        if t in METADATA:
            return "metadata"
        shape = ctx.shape(user)
        if t in RESHAPES:
            if (shape is not None and len(shape) > 2
                    and ctx.equal_shape(shape[:-1], self.r.lead, self.r.guards)):
                return "unfold"
            if self._restores_without_features(shape, src):
                return "unfold"
            if shape is not None and ctx.equal_shape(shape, (product(self.r.lead),
                                                             ctx.shape(src)[-1]), self.r.guards):
                return "member"
            return self._split(user, shape, src)
        if t in (aten.t.default, aten.transpose.int, aten.permute.default):
            self.fail(user, f"{_op(user)} moves axes inside the fold: the rows are no longer "
                            "positions")
            return ""
        if in_place(user) and src in self.r.folds and not _private_fold(src, user, self.r):
            self.fail(user, f"{_op(user)} writes through the fold into the tensor it was taken from")
            return ""
        t = IN_PLACE_OF.get(t, t)  # relu_ on rows a dense layer made: as relu, on the new rows
        if t in DENSE:
            return self._dense(user, src)
        if t in UNARY or t in IDENTITY or t in RANDOM:
            return "member" if user.args[0] is src else self._other(user)
        if t in BINARY:
            return self._binary(user)
        if t in LAST_AXIS:
            return self._last_axis(user)
        if t in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default):
            return self._batch_norm(user)
        if t is aten.layer_norm.default:
            return self._last_axis(user)
        self.fail(user, f"the fold wraps {_op(user)}, which is not a dense layer: the rows stay "
                        "folded")
        return ""

    def _restores_without_features(self, shape: Any, src: fx.Node) -> bool:
        """``view(B, m)`` of rows with one feature (``Linear(hw, 1)``): the leading axes
        restored and the size-1 feature axis dropped (LSTNet's highway)."""
        s_src, guards = self.ctx.shape(src), dict(self.r.guards)
        if (shape is None or s_src is None or len(shape) != len(self.r.lead)
                or not self.ctx.equal(s_src[-1], 1, guards)
                or not self.ctx.equal_shape(shape, self.r.lead, guards)):
            return False
        self.r.guards.update(guards)
        return True

    def _split(self, user: fx.Node, shape: Any, src: fx.Node) -> str:
        lead = [expr(d) for d in self.r.lead]
        dims = list(shape or ())
        one_feature = same((self.ctx.shape(src) or (0,))[-1], 1)
        got = [expr(d) for d in (dims if one_feature and len(dims) == len(lead) else dims[:-1])]
        if self._reordered(got, lead):
            self.fail(user, f"{_op(user)} restores the rows as {render(shape)}: the folded axes "
                            f"{render(self.r.lead)} in a different order, which scrambles "
                            "positions")
        else:
            self.fail(user, f"{_op(user)} restores the rows as {render(shape)}, a different "
                            f"split than the folded axes {render(self.r.lead)}: not "
                            "time-distributed")
        return ""

    def _reordered(self, got: list[Any], lead: list[Any]) -> bool:
        """``got`` is ``lead`` in another order (on the example's sizes where literals fix them)."""
        if len(got) != len(lead):
            return False
        if sorted(map(str, got)) == sorted(map(str, lead)):
            return True
        return len(lead) <= 4 and any(
            self.ctx.equal_shape(got, [lead[i] for i in perm], {})
            for perm in itertools.permutations(range(len(lead))) if list(perm) != sorted(perm))

    def _other(self, user: fx.Node) -> str:
        self.fail(user, f"the rows stay folded into {_op(user)}")
        return ""

    def _dense(self, user: fx.Node, src: fx.Node) -> str:
        if _dense_input(user) is not src:
            self.fail(user, f"the folded rows are the weight of {_op(user)}, not its input")
            return ""
        w, b = _dense_weight(user)
        if not self.ctx.state_source(w):
            self.fail(user, f"the weight of {_op(user)} is computed from the input, not a "
                            "parameter")
            return ""
        if b is not None and isinstance(b, fx.Node) and not self.ctx.state_source(b):
            self.fail(user, "the bias is computed from the input, not a parameter")
            return ""
        ws = self.ctx.shape(w)
        if ws is None or len(ws) != 2:
            self.fail(user, f"the weight of {_op(user)} is not a matrix")
            return ""
        return "member"

    def _binary(self, user: fx.Node) -> str:
        members = self.r.members()
        for a in user.args[:2]:
            if not isinstance(a, fx.Node) or a in members:
                continue
            s = self.ctx.shape(a)
            if s is None or (len(s) >= 2 and not all(same(d, 1) for d in s[:-1])):
                self.fail(user, f"{_op(user)} mixes the rows with a tensor of shape "
                                f"{render(s)} from outside the fold")
                return ""
        return "member"

    def _last_axis(self, user: fx.Node) -> str:
        idx = LAST_AXIS.get(user.target)
        if user.target is aten.layer_norm.default:
            shape = user.args[1]
            if len(shape) != 1:
                self.fail(user, "layer_norm over more than the feature axis")
                return ""
            return "member"
        if idx is not None and len(user.args) > idx and int(user.args[idx]) % 2 != 1:
            self.fail(user, f"{_op(user)} works across the rows (dim 0), not within each row")
            return ""
        return "member"

    def _batch_norm(self, user: fx.Node) -> str:
        """Kept on a (free) folded view of the unfolded rows: its statistics (training mode)
        and per-feature map are over the same rows as before."""
        return "member" if user.args[0] in self.r.members() else self._other(user)


_op = op_label


def _regions(ctx: Context) -> list[Region]:
    """One region per group of folds whose rows meet; folds of equal leading sizes that meet
    in a binary op are one region."""
    regions: list[Region] = []
    owner: dict[fx.Node, Region] = {}
    for node in ctx.graph.nodes:
        if node in owner or node.name in ctx.claimed or ctx.canonical(node):
            continue
        guards: dict[Any, int] = {}
        src, k = fold_of(node, ctx, guards), None
        if src is None:
            src, k = merged_fold_of(node, ctx, guards) or (None, None)
        strict = src is not None
        if not strict and not _chain_step(node):
            src = loose_fold_of(node, ctx)
        if src is None:
            continue
        region = Region(tuple(ctx.shape(src)[:-1] if k is None else ctx.shape(src)[:k]),
                        strict, guards=guards)
        region.folds[node] = src
        if k is not None:
            region.merge[node] = k
        _absorb_sibling_folds(region, ctx, owner)
        _Grow(region, ctx).run()
        written = _written_after_fold(region, ctx)
        if written is not None and not region.reason:
            region.reason = (f"{_op(written)} writes in place to the tensor the fold was taken "
                             "from, after the fold: whether the folded rows see the write depends "
                             "on the input's memory layout")
            region.culprit = written
        for n in region.members():
            owner[n] = region
        regions.append(region)
    return regions


#: ops whose result is a new tensor, never a view of (or the same tensor as) an input
_FRESH = (UNARY | BINARY | frozenset(DENSE)) - IDENTITY - {aten.to.dtype, aten.type_as.default}


def _private_fold(fold: fx.Node, op: fx.Node, region: Region) -> bool:
    """An in-place op on the fold writes only memory nobody else reads: the folded tensor is a
    fresh intermediate (``(x * 2).view(-1, F).relu_()``, not an input, a parameter or a view of
    one) read by nothing but the fold, and the fold read by nothing but the op — so writing it
    in place is the op applied to the rows."""
    src = region.folds[fold]
    readers = [u for u in src.users if u.target not in METADATA]
    fold_readers = [u for u in fold.users if u.target not in METADATA]
    return (src.op == "call_function" and src.target in _FRESH and not in_place(src)
            and readers == [fold] and fold_readers == [op] and op.args[0] is fold)


def _written_after_fold(region: Region, ctx: Context) -> fx.Node | None:
    """An in-place op on a fold's source (or on a view of it) after the fold: whether the fold
    saw the write depends on the input's memory layout (a view does, a copy does not)."""
    for fold, src in region.folds.items():
        seen = {src}
        frontier = [src]
        while frontier:
            n = frontier.pop()
            for u in n.users:
                if u in seen or u is fold:
                    continue
                seen.add(u)
                if in_place(u) and u.args and u.args[0] is n and ctx.order[u] > ctx.order[fold]:
                    return u
                if u.target in RESHAPES or u.target in (aten.transpose.int, aten.permute.default,
                                                        aten.t.default, aten.slice.Tensor,
                                                        aten.select.int, aten.alias.default):
                    frontier.append(u)
    return None


def _absorb_sibling_folds(region: Region, ctx: Context, owner: dict[fx.Node, Region]) -> None:
    """Other folds of the same source (``fc(x.view(-1, F)) + x.view(-1, F)``)."""
    (src,) = region.folds.values()
    for user in src.users:
        if user not in region.folds and user not in owner and fold_of(user, ctx, region.guards) is src:
            region.folds[user] = src


def _emit(region_names: dict[str, Any]):  # noqa: ANN202
    """The region's ops applied to the unfolded tensors, in graph order."""

    def emit(rw: Any) -> None:
        folds = {rw[k]: rw[v] for k, v in region_names["folds"].items()}
        for name, k in region_names["merge"].items():  # the merged features, unfolded
            fold = rw[name]
            folds[fold] = rw.call(aten.flatten.using_ints, (folds[fold], k, -1), before=fold)
        nodes = [rw[n] for n in region_names["nodes"]]
        unfolds = [rw[n] for n in region_names["unfolds"]]
        meta = [rw[n] for n in region_names["metadata"]]
        new: dict[fx.Node, fx.Node] = dict(folds)
        for n in nodes:
            new[n] = _emit_one(rw, n, new)
        for u in unfolds:
            value = new[u.args[0]]
            if len(u.meta["val"].shape) < len(value.meta["val"].shape):  # drops the size-1 O
                value = rw.call(aten.squeeze.dim, (value, -1), before=u, like=u)
            rw.replace(u, value)
        for m in meta:  # size reads of folded rows: read a (free) folded view of the new value
            src = m.args[0]
            if src in new:
                view = rw.call(aten.flatten.using_ints, (new[src], 0, -2), before=m, like=src)
                m.replace_input_with(src, view)
        for n in reversed(nodes):
            rw.touched.append(n)
        rw.touched.extend(folds)

    return emit


def _emit_one(rw: Any, n: fx.Node, new: dict[fx.Node, fx.Node]) -> fx.Node:
    def m(a: Any) -> Any:
        return new.get(a, a) if isinstance(a, fx.Node) else a

    t = n.target
    if t in DENSE:
        w, b = _dense_weight(n)
        if t is not aten.linear.default:
            w = rw.call(aten.t.default, (w,), before=n)
        # addmm on a stored (in, out) weight (GPT-2's Conv1D) keeps its own kernel (a mirror)
        impl = "addmm" if t is aten.addmm.default else "linear"
        return rw.tdd(m(_dense_input(n)), w, b, feature_dim=-1, site=n.name, before=n, like=n,
                      impl=impl)
    if t in RANDOM:  # one random number per element in memory order: keep row-major order
        x = rw.call(aten.contiguous.default, (m(n.args[0]),), before=n)
        return rw.call(t, (x, *n.args[1:]), dict(n.kwargs), before=n, like=n)
    if t in RESHAPES:  # a reshape of the rows onto themselves
        return m(n.args[0])
    if t in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default):
        x = m(n.args[0])  # per-feature over rows: applied to a (free) folded view of x
        flat = rw.call(aten.flatten.using_ints, (x, 0, -2), before=n)
        y = rw.call(t, (flat, *n.args[1:]), dict(n.kwargs), before=n, like=n)
        if t is not aten.batch_norm.default:
            y = rw.call(operator.getitem, (y, 0), before=n)
        return rw.call(aten.view_as.default, (y, x), before=n)
    args = list(fx.node.map_aggregate(n.args, m))
    idx = LAST_AXIS.get(t)
    if idx is not None and len(args) > idx:
        args[idx] = -1
    return rw.call(t, args, dict(n.kwargs), before=n, like=n)


def _region_match(region: Region, ctx: Context) -> Match | None:
    nodes = [*region.folds, *region.nodes, *region.unfolds]
    if not region.dense:
        return _wrapper_near_miss(region, ctx)
    if not region.reason and not region.strict:
        region.reason = "the fold does not keep the feature axis last"
    if not region.reason and not region.unfolds:
        region.reason = "the rows stay folded: nothing restores the leading axes"
    status = "rejected" if region.reason else "found"
    src = next(iter(region.folds.values()))
    sites = []
    for d in region.dense:
        site = ctx.site(DENSE[d.target], status, d, src, d, region.reason, fd=-1,
                        kernel="" if region.reason else "linear")
        fold = next(iter(region.folds))
        if fold in region.merge:  # the merged features, as the dense layer reads them
            site.in_shape = example_shape((*region.lead, ctx.shape(fold)[-1]))
        if site.in_shape and site.out_shape:  # shapes as seen unfolded
            site.out_shape = (*site.in_shape[:-1], site.out_shape[-1])
        sites.append(site)
    names = {
        "folds": {k.name: v.name for k, v in region.folds.items()},
        "nodes": [n.name for n in region.nodes],
        "unfolds": [n.name for n in region.unfolds],
        "metadata": [n.name for n in region.metadata if n.args[0] in region.members()],
        "merge": {k.name: v for k, v in region.merge.items()},
    }
    emit = None if region.reason else _emit(names)
    return Match(PATTERN, sites, [n.name for n in nodes], emit=emit, reason=region.reason,
                 guards=dict(region.guards))


def _wrapper_near_miss(region: Region, ctx: Context) -> Match | None:
    """A fold around something that is not a dense layer (an Embedding, a BatchNorm, an
    interpolation): reported, never rewritten."""
    at = region.culprit or (region.nodes[0] if region.nodes else None)
    if at is None or (region.culprit is None and not region.unfolds):
        return None
    reason = region.reason or (f"the fold wraps {', '.join(_op(n) for n in region.nodes)}, "
                               "which is not a dense layer: left as it is")
    src = next(iter(region.folds.values()))
    return rejected(ctx, PATTERN, at, src, at, reason, [])


def _merged_features(node: fx.Node, ctx: Context) -> Match | None:
    """A dense layer after a reshape that merges the feature axis with others (``x.view(B, -1)``
    into ``Linear(T * F, O)``): one dense map over the whole sequence, not per position.  A
    reshape that keeps the leading axes and merges only trailing ones into the features
    (speechbrain's ``Linear(combine_dims=True)``: ``(B, T, C1, C2) -> (B, T, C1*C2)``) is the
    dense map over the merged features at every position: a site."""
    src = _dense_input(node)
    if not (isinstance(src, fx.Node) and src.op == "call_function" and src.target in RESHAPES):
        return None
    s_in, s_out = ctx.shape(src.args[0]), ctx.shape(src)
    if s_in is None or s_out is None or len(s_in) < 3 or len(s_out) >= len(s_in):
        return None
    if same(s_out[-1], s_in[-1]):
        return None
    guards: dict[Any, int] = {}
    if _keeps_leading_axes(s_in, s_out, ctx, guards) and _linear_of_state(node, ctx):
        site = ctx.site(PATTERN, "found", node, src, node, fd=-1, kernel="linear")
        return Match(PATTERN, [site], [node.name], emit=_emit_linear(node.name), guards=guards)
    reason = (f"the reshape {render(s_in)} -> {render(s_out)} before it merges the feature axis "
              f"({render(s_in[-1:])[1:-1]}) with other axes: one dense layer over all of them, not one "
              "per position")
    return rejected(ctx, DENSE[node.target], node, src.args[0], node, reason, [])


def _keeps_leading_axes(s_in: Any, s_out: Any, ctx: Context, guards: dict[Any, int]) -> bool:
    """``s_out`` is ``s_in`` with its trailing axes merged into the last one, at least two
    leading axes kept (positions)."""
    k = len(s_out) - 1
    return (k >= 2 and ctx.equal_shape(s_out[:k], s_in[:k], guards)
            and ctx.equal(s_out[-1], product(s_in[k:]), guards))


def _linear_of_state(node: fx.Node, ctx: Context) -> bool:
    """``node`` is ``nn.Linear``'s op with a parameter (or buffer) weight and bias."""
    if node.target is not aten.linear.default:
        return False
    w, b = _dense_weight(node)
    return bool(ctx.state_source(w)) and not (isinstance(b, fx.Node) and not ctx.state_source(b))


def _emit_linear(name: str):  # noqa: ANN202
    """The ``linear`` node replaced by the canonical node on the same input (features last)."""

    def emit(rw: Any) -> None:
        n = rw[name]
        w, b = _dense_weight(n)
        rw.replace(n, rw.tdd(n.args[0], w, b, feature_dim=-1, site=name, before=n, like=n))

    return emit


#: permutations of axes a channel-first dense layer is wrapped in (``mT``: the last two axes,
#: ``numpy_T``: ``x.T``, every axis reversed)
_PERMS = (aten.transpose.int, aten.permute.default, aten.mT.default, aten.numpy_T.default,
          aten.t.default)


def _moved_last(node: fx.Node, rank: int) -> int:
    """The axis of the permutation's input that it moves last."""
    if node.target is aten.permute.default:
        return int(node.args[1][-1]) % rank
    if node.target is aten.transpose.int:
        a, b = (int(d) % rank for d in node.args[1:3])
        return b if a == rank - 1 else a if b == rank - 1 else rank - 1
    return rank - 2 if node.target is aten.mT.default else 0


def _channel_first(node: fx.Node, ctx: Context) -> Match | None:
    """``fc(x.permute(0, 2, 1)).permute(0, 2, 1)``, ``fc(x.mT).mT``, ``fc(x.T).T``: nn.Linear
    between a permutation and its inverse is the dense map along the axis the permutation moved
    last (the Linear is kept on the permuted view: the same function for any permutation)."""
    src = node.args[0]
    users = list(node.users)
    rank = ctx.rank(src) or 0
    if not (isinstance(src, fx.Node) and src.target in _PERMS and len(users) == 1
            and users[0].target in _PERMS and rank >= 2 and _linear_of_state(node, ctx)):
        return None
    fd = _moved_last(src, rank)
    site = ctx.site(PATTERN, "found", node, src.args[0], users[0], fd=fd, kernel="linear")
    return Match(PATTERN, [site], [node.name], emit=_emit_linear(node.name))


def _last_axis_pick(a: Any, ctx: Context) -> tuple[fx.Node, str] | None:
    """``(x, kind)`` when ``a`` reads one variable of the last axis of ``x`` (rank >= 3):
    ``x[..., i:i+1]`` or ``x[..., i].unsqueeze(-1)`` (kind "slice", the feature axis kept) or
    ``x[..., i]`` (kind "select", the axis gone)."""
    kind = "slice"
    if is_op(a, {aten.unsqueeze.default}) and int(a.args[1]) in (-1, (ctx.rank(a) or 0) - 1):
        a = a.args[0]
        if not is_op(a, {aten.select.int}):
            return None
    elif is_op(a, {aten.select.int}):
        kind = "select"
    elif not (is_op(a, {aten.slice.Tensor}) and (len(a.args) < 5 or a.args[4] == 1)):
        return None
    x = a.args[0]
    rank = ctx.rank(x) or 0
    if rank < 3 or int(a.args[1]) % rank != rank - 1:
        return None
    return x, kind


def _per_variable(ctx: Context, owned: set[fx.Node]) -> list[Match]:
    """TFT-style scalar embeddings: ``Linear(1, E)`` of ``x[..., i:i+1]``, one per variable,
    each a dense map at every position of the other axes (a site of its own).  One Linear
    shared by several variables is a loop over the feature axis (the loop family's near-miss);
    ``x[..., i]`` without the kept axis makes the Linear contract the next axis (time)."""
    picks: list[tuple[fx.Node, str, fx.Node]] = []
    for node in ctx.unclaimed({aten.linear.default}):
        pick = _last_axis_pick(node.args[0], ctx) if node not in owned else None
        if pick is not None and _linear_of_state(node, ctx):
            picks.append((node, pick[1], pick[0]))
    weights = [ctx.state_source(node.args[1]) for node, _, _ in picks]
    return [_variable_site(node, kind, x, ctx) for node, kind, x in picks
            if weights.count(ctx.state_source(node.args[1])) == 1]


def _variable_site(node: fx.Node, kind: str, x: fx.Node, ctx: Context) -> Match:
    if kind == "slice":
        site = ctx.site(PATTERN, "found", node, node.args[0], node, fd=-1, kernel="linear")
        return Match(PATTERN, [site], [node.name], emit=_emit_linear(node.name))
    shape = ctx.shape(x)
    reason = (f"{op_label(node)} reads one variable's whole series (x[..., i] of x {render(shape)}) "
              f"as its features: it contracts axis {len(shape) - 2} of {render(shape[-2:-1])[1:-1]} "
              "positions, one dense map over the positions, not one per position")
    return rejected(ctx, PATTERN, node, x, node, reason, [node])


class ReshapeFamily:
    """Folds of leading axes into rows, dense layers on the rows, and the unfold back."""

    pattern = PATTERN

    def find(self, ctx: Context) -> list[Match]:
        out: list[Match] = []
        owned: set[fx.Node] = set()
        for region in _regions(ctx):
            owned |= region.members()
            m = _region_match(region, ctx)
            if m is not None:
                out.append(m)
        for node in ctx.graph.nodes:
            if node.target not in DENSE or node in owned or node.name in ctx.claimed:
                continue
            m = _merged_features(node, ctx) or _channel_first(node, ctx)
            if m is not None:
                out.append(m)
                owned.add(node)
        out.extend(_per_variable(ctx, owned))
        return out
