"""Apply proved candidates: canonical nodes in, folds out; peephole; guards.

Rewrites always work on a fresh copy of the captured graph (node names are kept by the copy), so
any subset of candidates can be applied — which is how verification bisects a failing rewrite.
Weights are taken by ``get_attr`` of the original parameter paths: the state_dict, parameter
identity and autograd are untouched.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import ops
from ._state import preserved
from .capture import META_KEYS, graft_tree
from .guards import Guard, insert_guards
from .patterns.roles import Role, is_metadata
from .peephole import simplify

if TYPE_CHECKING:
    from .patterns.base import Candidate


def node_named(gm: fx.GraphModule, name: str) -> fx.Node:
    """The node called ``name`` (names survive the graph copy); indexed once per rewrite pass."""
    index = gm.__dict__.get("_tdd_nodes")
    if index is None or name not in index or getattr(index[name], "_erased", False):
        index = gm.__dict__["_tdd_nodes"] = {n.name: n for n in gm.graph.nodes}
    return index[name]


def _dense_params(gm: fx.GraphModule, op: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    g = gm.graph
    if op.op == "call_module":
        mod = gm.get_submodule(str(op.target))
        w = g.get_attr(f"{op.target}.weight")
        b = g.get_attr(f"{op.target}.bias") if mod.bias is not None else None
        return w, b
    if op.target is ops.time_distributed_dense:
        return op.args[1], (op.args[2] if len(op.args) > 2 else op.kwargs.get("bias"))
    if op.target is torch.addmm:  # addmm(b, x, W) with W stored (in, out)
        return g.call_method("t", (op.args[2],)), op.args[0]
    if op.target in (torch.mm, torch.matmul, operator.matmul, "mm", "matmul"):  # x @ W, (in, out)
        return g.call_method("t", (op.args[1],)), None
    w = op.args[1] if len(op.args) > 1 else op.kwargs["weight"]
    b = op.args[2] if len(op.args) > 2 else op.kwargs.get("bias")
    return w, b


def emit_region(gm: fx.GraphModule, entry_name: str, spec: list[tuple[str, Role]], fd: int,
                kernel: str) -> fx.Node:
    """Replace a proved region by its ops applied directly to the entry tensor.

    Reshapes and permutes vanish; each dense op becomes ``time_distributed_dense(x, W, b,
    feature_dim=fd)``; pointwise ops are re-applied unchanged; featurewise ops get their axis
    re-expressed (functional ``dim=``) or a local fold (modules such as ``BatchNorm1d``).
    """
    g = gm.graph
    region = [(node_named(gm, name), role) for name, role in spec]
    entry = region[0][0].args[region[0][1].data]  # as it is now: an earlier rewrite may have
    del entry_name                                # replaced the node the match saw
    last = region[-1][0]
    cur = entry
    with g.inserting_before(last):
        for op, role in region:
            data_in = op.args[role.data]
            if role.kind in ("reshape", "permute"):
                continue
            if role.kind == "dense":
                w, b = _dense_params(gm, op)
                new = g.call_function(ops.time_distributed_dense, (cur, w, b),
                                      {"feature_dim": fd, "impl": kernel})
                new.meta["tdd_site"] = op.name
            elif role.kind == "pointwise" and fd != -1 and _random(gm, op):
                # a random mask is drawn in memory order: draw it over the same (rows, features)
                # layout as the original, then put the features back
                moved = g.call_method("contiguous", (g.call_method("movedim", (cur, fd, -1)),))
                y = g.node_copy(op, lambda n, d=data_in, c=moved: c if n is d else n)
                new = g.call_method("movedim", (y, -1, fd))
            elif role.kind == "pointwise" or (role.kind == "lastaxis" and fd == -1):
                new = g.node_copy(op, lambda n, d=data_in, c=cur: c if n is d else n)
            elif role.kind == "lastaxis":  # names the last axis: lay features last around it
                moved = g.call_method("movedim", (cur, fd, -1))
                y = g.node_copy(op, lambda n, d=data_in, c=moved: c if n is d else n)
                new = g.call_method("movedim", (y, -1, fd))
            elif op.op == "call_function":  # featurewise functional: re-express the axis
                args = (cur,) + tuple(op.args[1:])
                kwargs = dict(op.kwargs)
                if "dim" in kwargs:
                    kwargs["dim"] = fd
                else:
                    args = (cur, fd) + tuple(op.args[2:])
                new = g.call_function(op.target, args, kwargs)
            elif isinstance(gm.get_submodule(str(op.target)), (torch.nn.Softmax, torch.nn.LogSoftmax)):
                # stateless: the functional form with the axis re-expressed
                fn = F.softmax if isinstance(gm.get_submodule(str(op.target)), torch.nn.Softmax) \
                    else F.log_softmax
                new = g.call_function(fn, (cur,), {"dim": fd})
            else:  # featurewise module: a local fold, exactly the rows it saw before
                src = cur if fd == -1 else g.call_method("movedim", (cur, fd, -1))
                rows = g.call_method("flatten", (src, 0, -2))
                y = g.call_module(str(op.target), (rows,) + tuple(op.args[1:]), dict(op.kwargs))
                new = g.call_method("view_as", (y, src))
                if fd != -1:
                    new = g.call_method("movedim", (new, -1, fd))
            new.meta.update({k: v for k, v in op.meta.items()
                             if k in META_KEYS})
            cur = new
    last.replace_all_uses_with(cur)
    erase_dead([op for op, _ in reversed(region)], g)
    return cur


def _random(gm: fx.GraphModule, op: fx.Node) -> bool:
    """Dropout-like ops: their result depends on the memory order of their input."""
    if op.op == "call_module":
        return isinstance(gm.get_submodule(str(op.target)), (torch.nn.Dropout, torch.nn.AlphaDropout))
    return op.target in (F.dropout, F.alpha_dropout)


def erase_dead(nodes: Iterable[fx.Node], g: fx.Graph) -> None:
    """Erase the given nodes, and the size computations feeding them, once nothing uses them."""
    pending = {n: None for n in nodes}  # ordered set
    changed = True
    while changed:
        changed = False
        for n in list(pending):
            if n.users or n.op in ("placeholder", "output"):
                continue
            del pending[n]
            inputs = list(n.all_input_nodes)
            g.erase_node(n)
            changed = True
            for a in inputs:
                if is_metadata(a) or (a.op == "call_function" and getattr(
                        a.target, "__module__", "") in ("_operator", "operator")):
                    pending.setdefault(a, None)


def apply(base: fx.GraphModule, candidates: list[Candidate], ranks: dict[str, int],
          trace_guards: Iterable[Guard] = (), inputs: tuple[Any, ...] | None = None,
          cleanup: bool = True) -> tuple[fx.GraphModule, dict[int, str], list[str]]:
    """A new GraphModule: ``base``'s module tree with ``candidates`` rewritten.

    Returns the module, the name of each candidate's result node (by position), and the guards
    (those the trace relied on, plus those of the applied candidates).
    """
    with preserved([base]):  # get_attr checks may evaluate parametrizations (power iterations)
        return _apply(base, candidates, ranks, trace_guards, inputs, cleanup)


def _apply(base: fx.GraphModule, candidates: list[Candidate], ranks: dict[str, int],
           trace_guards: Iterable[Guard], inputs: tuple[Any, ...] | None, cleanup: bool
           ) -> tuple[fx.GraphModule, dict[int, str], list[str]]:
    graph = copy.deepcopy(base.graph)
    graph._tracer_cls = getattr(base.graph, "_tracer_cls", None)
    # an empty graph first: GraphModule(base, graph) would copy every referenced submodule path
    # into new intermediate modules, only for graft_tree to replace them all
    gm = fx.GraphModule(base, fx.Graph(), class_name=type(base).__name__)
    graft_tree(gm, base)
    gm.graph = graph
    results: dict[int, str] = {}
    guards: list[Guard] = []
    released: set[str] = set()
    gm.__dict__["_tdd_nodes"] = {n.name: n for n in gm.graph.nodes}
    for i, cand in enumerate(candidates):
        assert cand.rewrite is not None
        results[i] = cand.rewrite(gm).name
        guards.extend(cand.guards)
        released |= cand.releases
    guards = [g for g in trace_guards if not (g.releasable and g.fact in released)] + guards
    del gm.__dict__["_tdd_nodes"]
    if cleanup:
        gm.recompile()
        simplify(gm, inputs, erase_dead)
    erase_dead([n for n in gm.graph.nodes if not n.users and (  # leftovers of the trace
        is_metadata(n) or n.op == "call_function" and n.target is operator.getitem
        and isinstance(n.args[0], fx.Node) and is_metadata(n.args[0])
        or n.op == "call_function" and getattr(n.target, "__module__", "") == "_operator"
        and all(is_metadata(a) or a.op == "call_function" for a in n.all_input_nodes))],
        gm.graph)
    described = insert_guards(gm, ranks, guards) if (candidates or guards) and ranks else []
    gm.graph.lint()
    gm.recompile()
    return gm, results, described
