"""The rewriter: every graph edit goes through here (node lookup, insertion with meta, uses,
dead-code removal, the peephole clean-up), on a fresh copy of the captured graph.

``apply(captured, matches)`` builds the rewritten graph for a set of proved matches.  Each
match's ``emit`` receives a :class:`Rewriter` and looks nodes up by the names they had in the
captured graph.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from . import layout, ops
from .capture import META_KEYS, Captured
from .families.base import Match, same_shape
from .optables import ANY_RANDOM, in_place

aten = torch.ops.aten


class Rewriter:
    """Edits one fresh copy of a captured graph."""

    def __init__(self, captured: Captured) -> None:
        graph = fx.Graph()
        out = graph.graph_copy(captured.gm.graph, {})
        graph.output(out)
        self.gm = fx.GraphModule(captured.gm, graph)
        self.graph = graph
        self.nodes = {n.name: n for n in graph.nodes}
        self.fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes
                                           if n.op == "placeholder"])
        self.touched: list[fx.Node] = []
        self.sites: dict[str, fx.Node] = {}
        self.moved: dict[str, str] = {}

    def __getitem__(self, name: str) -> fx.Node:
        """The node that now stands for ``name`` of the captured graph (following earlier
        replacements: one match's input may be another match's replaced output)."""
        while name in self.moved:
            name = self.moved[name]
        return self.nodes[name]

    # --- insertion ----------------------------------------------------------------------
    def call(self, target: Any, args: Sequence[Any], kwargs: dict[str, Any] | None = None, *,
             before: fx.Node, like: fx.Node | None = None) -> fx.Node:
        """A new ``call_function`` node right before ``before``, with the user-facing meta of
        ``like`` (module path, source line) and its FakeTensor value."""
        with self.graph.inserting_before(before):
            node = self.graph.call_function(target, tuple(args), kwargs or {})
        src = like if like is not None else before
        for key in META_KEYS:
            if key in src.meta:
                node.meta[key] = src.meta[key]
        self._infer(node)
        self.nodes[node.name] = node
        return node

    def _infer(self, node: fx.Node) -> None:
        if self.fake_mode is None:
            return

        def val(a: Any) -> Any:
            return a.meta.get("val") if isinstance(a, fx.Node) else a

        args = fx.node.map_aggregate(node.args, val)
        kwargs = fx.node.map_aggregate(node.kwargs, val)
        try:
            with self.fake_mode:
                node.meta["val"] = node.target(*args, **kwargs)
        except Exception:  # a value we cannot infer only costs the clean-up, never the result
            node.meta.pop("val", None)

    def tdd(self, x: fx.Node, weight: fx.Node, bias: Any, *, feature_dim: int, site: str,
            before: fx.Node, like: fx.Node | None = None, impl: str = "linear") -> fx.Node:
        """The canonical node: ``weight`` (out, in) applied along ``feature_dim`` of ``x``."""
        node = self.call(ops.time_distributed_dense, (x, weight, bias),
                         {"feature_dim": feature_dim, "impl": impl}, before=before, like=like)
        node.meta["tdd_site"] = site
        self.sites[site] = node
        return node

    # --- replacement ----------------------------------------------------------------------
    def replace(self, old: fx.Node, new: fx.Node) -> None:
        """Every use of ``old`` now reads ``new``; ``old`` (and what only it used) is removed
        at :meth:`finish` if nothing else needs it."""
        old.replace_all_uses_with(new)
        self.moved[old.name] = new.name
        self.touched.append(old)

    def finish(self) -> fx.GraphModule:
        erase_dead(self.touched, self.graph)
        cleanup(self)
        layout.features_last(self)
        self.graph.lint()
        self.gm.recompile()
        return self.gm


def removable(n: fx.Node) -> bool:
    return (n.op == "call_function" and not n.users and not in_place(n)
            and n.target not in ANY_RANDOM and not _asserts(n))


def _asserts(n: fx.Node) -> bool:
    name = str(n.target)
    return "assert" in name or "_check" in name


def erase_dead(start: Iterable[fx.Node], graph: fx.Graph) -> None:
    """Remove ``start`` nodes that nothing uses any more, and then their inputs that nothing
    uses; never a placeholder, an in-place op, a random op or an assertion (unless a rewrite
    replaced it explicitly: random ops a region re-emitted are among ``start``)."""
    stack = list(start)
    explicit = set(start)
    while stack:
        n = stack.pop()
        if n.graph is not graph or n.users or n.op != "call_function":
            continue
        if n not in explicit and not removable(n):
            continue
        if in_place(n) and n not in explicit:
            continue
        inputs = list(n.all_input_nodes)
        graph.erase_node(n)
        stack.extend(inputs)


# --- peephole ------------------------------------------------------------------------------
_SQUEEZES = {aten.squeeze.dim, aten.squeeze.dims}
_PERMS = {aten.permute.default, aten.transpose.int}


def _perm(n: fx.Node) -> list[int] | None:
    """The permutation a permute/transpose node applies (None when unknown)."""
    v = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
    if v is None:
        return None
    rank = v.dim()
    if n.target == aten.transpose.int:
        a, b = (int(d) % rank for d in n.args[1:3])
        p = list(range(rank))
        p[a], p[b] = p[b], p[a]
        return p
    return [int(d) % rank for d in n.args[1]]


def _fold_permutes(rw: Rewriter, node: fx.Node) -> bool:
    """``P⁻¹(tdd(P(x), fd=-1)) == tdd(x, fd=P[-1])`` when the output permutation undoes the
    input one: the transposes of a channel-first sandwich become the canonical node's
    ``feature_dim``."""
    src = node.args[0]
    if not (isinstance(src, fx.Node) and src.op == "call_function" and src.target in _PERMS):
        return False
    users = list(node.users)
    if len(users) != 1 or users[0].target not in _PERMS or len(src.users) != 1:
        return False
    p_in, p_out = _perm(src), _perm(users[0])
    if p_in is None or p_out is None or len(p_in) != len(p_out):
        return False
    rank = len(p_in)
    fd = node.kwargs.get("feature_dim", -1) % rank
    if fd != rank - 1 or [p_in[i] for i in p_out] != list(range(rank)):
        return False
    new = rw.tdd(src.args[0], node.args[1], node.args[2], feature_dim=p_in[-1],
                 site=node.meta["tdd_site"], before=users[0], like=node,
                 impl=ops.choose_kernel(p_in[-1], rank, _device(node), prefer="linear_tc",
                                        dtype=_dtype(node),
                                        size=_dense_size(node.args[1]),
                                        random_after=layout.random_op(rw.graph) is not None))
    rw.replace(users[0], new)
    erase_dead([users[0]], rw.graph)
    return True


def _dense_size(weight: Any) -> tuple[Any, Any] | None:
    """(in, out) features of a 2-D ``(out, in)`` weight node."""
    val = weight.meta.get("val") if isinstance(weight, fx.Node) else None
    return (val.shape[1], val.shape[0]) if isinstance(val, torch.Tensor) and val.dim() == 2 else None


def _device(node: fx.Node) -> torch.device | str:
    val = node.meta.get("val")
    return val.device if isinstance(val, torch.Tensor) else "cpu"


def _dtype(node: fx.Node) -> torch.dtype | None:
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else None


def _identity(n: fx.Node) -> bool:
    """A reshape to the shape its input already has, or an unsqueeze undone by a squeeze."""
    if n.op != "call_function" or not isinstance(n.args[0] if n.args else None, fx.Node):
        return False
    src = n.args[0]
    if n.target in _SQUEEZES and src.target == aten.unsqueeze.default:
        v, s = n.meta.get("val"), src.args[0].meta.get("val")
        return v is not None and s is not None and same_shape(v.shape, s.shape)
    if n.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                    aten.contiguous.default):
        v, s = n.meta.get("val"), src.meta.get("val")
        return (v is not None and s is not None and same_shape(v.shape, s.shape)
                and not any(in_place(u) for u in n.users))
    return False


def cleanup(rw: Rewriter) -> None:
    """Free views around canonical nodes: identity reshapes and unsqueeze/squeeze pairs go,
    transposes around a canonical node become its ``feature_dim``."""
    changed = True
    while changed:
        changed = False
        for n in list(rw.graph.nodes):
            if n.graph is not rw.graph:
                continue
            if n.target is ops.time_distributed_dense and _fold_permutes(rw, n):
                changed = True
            elif _identity(n) and _feeds_canonical(n):
                src = n.args[0]
                target = src.args[0] if n.target in _SQUEEZES else src
                n.replace_all_uses_with(target)
                erase_dead([n], rw.graph)
                changed = True


def _feeds_canonical(n: fx.Node, depth: int = 3) -> bool:
    """Only views next to a canonical node are cleaned (the rest of the graph is the user's)."""
    frontier = [n]
    for _ in range(depth):
        nxt = []
        for m in frontier:
            if m.target is ops.time_distributed_dense:
                return True
            nxt.extend(a for a in m.all_input_nodes)
            nxt.extend(m.users)
        frontier = nxt
    return any(m.target is ops.time_distributed_dense for m in frontier)


def apply(captured: Captured, matches: list[Match]) -> tuple[fx.GraphModule, dict[str, str]]:
    """The captured graph with every match emitted; and, per site, the kernel its canonical
    node ended with (the clean-up may have changed it)."""
    rw = Rewriter(captured)
    for m in matches:
        assert m.emit is not None
        m.emit(rw)
    gm = rw.finish()
    kernels = {}
    for n in gm.graph.nodes:
        if n.target is ops.time_distributed_dense and "tdd_site" in n.meta:
            x = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
            fd = n.kwargs.get("feature_dim", -1)
            last = fd == -1 or (x is not None and fd % x.dim() == x.dim() - 1)
            impl = n.kwargs.get("impl", "linear")
            kernel = "linear" if last and impl != "addmm" else impl
            kernels[n.meta["tdd_site"]] = (kernel, -1 if last else fd)
    return gm, kernels
