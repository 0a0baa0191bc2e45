"""The executable form of a captured graph: ATen overloads called through their direct bindings.

A graph from ``torch.export`` calls every op as an ``OpOverload`` (``torch.ops.aten.view.default``),
whose Python ``__call__`` costs 3-5 µs more than the same op through the C++ bindings the user's
eager code went through (``x.view(...)``, ``torch.add``, ``F.linear``: measured on this project's
CPU, ``tests/test_lower.py`` names the ops).  On a model of small ops that is the whole difference
between the original and the optimized graph, so :func:`lowered` gives each :class:`Program` an
executable copy of its graph where the overloads of :data:`LOWERINGS` are calls of the binding
that dispatches to *the same overload* (the inspectable graph, ``tdd_fx.graphs``, keeps the ATen
spelling).  Identity: each entry below is the same ATen operator with the same arguments — the
binding parses them to that overload and runs the same kernel, autograd formula and random
number draws.  ``tests/test_lower.py`` checks every entry on real tensors (values, strides,
aliasing, gradients), and each lowered graph is verified with the rest of the program.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from . import ops

aten = torch.ops.aten

#: overload -> the binding that reaches it: a Tensor method name (``str``: a ``call_method``
#: node) or a function of ``torch``/``torch._C._nn``; only overloads whose arguments the binding
#: takes in the same positions and keyword names
LOWERINGS: dict[Any, str | Callable[..., Any]] = {
    # views and shape changes (aliasing exactly as the overload)
    aten.view.default: "view",
    aten.reshape.default: "reshape",
    aten.t.default: "t",
    aten.permute.default: "permute",
    aten.transpose.int: "transpose",
    aten.unsqueeze.default: "unsqueeze",
    aten.squeeze.dim: "squeeze",
    aten.squeeze.dims: "squeeze",
    aten.select.int: "select",
    aten.flatten.using_ints: "flatten",
    aten.unflatten.int: "unflatten",
    aten.movedim.int: "movedim",
    aten.expand.default: "expand",
    aten.contiguous.default: "contiguous",
    # dense ops
    aten.linear.default: torch._C._nn.linear,
    aten.addmm.default: torch.addmm,
    aten.mm.default: torch.mm,
    aten.bmm.default: torch.bmm,
    aten.baddbmm.default: torch.baddbmm,
    aten.matmul.default: torch.matmul,
    aten.conv1d.default: torch.conv1d,
    aten.conv2d.default: torch.conv2d,
    aten.conv3d.default: torch.conv3d,
    # elementwise, reductions, normalisation
    aten.add.Tensor: torch.add,
    aten.sub.Tensor: torch.sub,
    aten.mul.Tensor: torch.mul,
    aten.div.Tensor: torch.div,
    aten.neg.default: torch.neg,
    aten.tanh.default: torch.tanh,
    aten.sigmoid.default: torch.sigmoid,
    aten.relu.default: torch.relu,
    aten.exp.default: torch.exp,
    aten.gelu.default: torch._C._nn.gelu,
    aten.silu.default: torch._C._nn.silu,
    aten.softmax.int: torch.softmax,
    aten.layer_norm.default: torch.layer_norm,
    aten.dropout.default: torch.dropout,
    aten.cat.default: torch.cat,
    aten.stack.default: torch.stack,
    aten.clone.default: torch.clone,
    aten.mean.dim: torch.mean,
    aten.sum.dim_IntList: torch.sum,
    aten.unbind.int: torch.unbind,
}


def lowered(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` (sharing its attributes) whose :data:`LOWERINGS` overloads are called
    through their bindings and whose canonical nodes call their kernel directly
    (:func:`direct_kernel`); ``gm`` itself is unchanged.  For eager calls only: under
    ``torch.compile``/``torch.export`` the program runs ``gm`` itself."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is ops.time_distributed_dense:
            _direct(n)
            continue
        to = LOWERINGS.get(n.target)
        if to is None:
            continue
        if isinstance(to, str):
            n.op, n.target = "call_method", to
        else:
            n.target = to
    return fx.GraphModule(gm, graph)


def _rank(a: Any) -> int | None:
    v = a.meta.get("val") if isinstance(a, fx.Node) else None
    return v.dim() if isinstance(v, torch.Tensor) else None


def _direct(n: fx.Node) -> None:
    """``time_distributed_dense(x, w, b, feature_dim=d, impl=k)`` → ``kernel(x, w, b)``: the
    same kernel without the dispatch on ``impl``, ``feature_dim`` and the weight's rank (decided
    here, from the node's captured ranks), a few microseconds a call."""
    x, w = n.args[0], n.args[1]
    b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    rank, w_rank = _rank(x), _rank(w)
    if rank is None or w_rank is None or len(n.args) > 3 or set(n.kwargs) - {
            "feature_dim", "impl", "bias"}:
        return
    d = n.kwargs.get("feature_dim", -1) % rank
    impl = n.kwargs.get("impl", "linear")
    fn = direct_kernel(rank, d, w_rank, impl, b is not None)
    if fn is None:
        return
    n.target, n.args, n.kwargs = fn, (x, w, b), {}
    col = _column(b)
    if fn is _baddbmm_bias and col is not None:  # b = col.view(-1): baddbmm takes col itself
        n.target, n.args = _baddbmm_col, (x, w, col)
        _erase_if_unused(b)
    stored = _transposed(w)
    if impl == "addmm" and d == rank - 1 and stored is not None:  # w = W.t(): addmm takes W
        n.target, n.args = ops.addmm_in_out, (x, stored, b)
        _erase_if_unused(w)
    kernel4 = _stem_weight(w)
    if impl == "conv_span" and d == 1 and rank == 3 and kernel4 is not None:
        n.target, n.args = ops.stem_conv2d, (x, kernel4, b)  # w = W.reshape(O, -1): takes W
        _erase_if_unused(w)


def _erase_if_unused(n: fx.Node) -> None:
    if not n.users:
        n.graph.erase_node(n)


def _transposed(w: Any) -> fx.Node | None:
    """``W`` when ``w`` is ``W.t()`` (GPT-2's ``Conv1D`` weight, stored ``(in, out)``)."""
    if isinstance(w, fx.Node) and w.op == "call_method" and w.target == "t" and isinstance(
            w.args[0], fx.Node):
        return w.args[0]
    return None


def _stem_weight(w: Any) -> fx.Node | None:
    """``W`` when ``w`` is ``W.reshape(O, -1)`` of a ``Conv2d(1, O, (F, 1))`` weight."""
    if not (isinstance(w, fx.Node) and w.op == "call_method" and w.target == "reshape"
            and len(w.args) == 2 and isinstance(w.args[0], fx.Node)):
        return None
    v = w.args[0].meta.get("val")
    ok = isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[1] == 1 and v.shape[3] == 1
    return w.args[0] if ok else None


def _column(b: Any) -> fx.Node | None:
    """``c`` when ``b`` is ``c.view(-1)`` of an ``(out, 1)`` column (an expanded-``baddbmm``
    bias as hand-written code stores it)."""
    if not (isinstance(b, fx.Node) and b.op == "call_method" and b.target == "view"
            and len(b.args) == 2 and list(b.args[1]) == [-1] and isinstance(b.args[0], fx.Node)):
        return None
    v = b.args[0].meta.get("val")
    ok = isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == 1
    return b.args[0] if ok else None


def direct_kernel(rank: int, d: int, w_rank: int, impl: str, bias: bool
                  ) -> Callable[..., Any] | None:
    """The function ``(x, w, b) -> y`` that :func:`tdd_fx.ops.time_distributed_dense` ends up
    calling for these static facts, or None (then the node keeps the generic call)."""
    if w_rank == rank and d == 1 and impl in ("conv", "conv1d") and rank in ops._CONVS:
        return ops._CONVS[rank]  # the conv's own pointwise weight, as time_distributed_dense does
    if w_rank != 2:
        return None
    if d == rank - 1 and impl != "addmm":
        return torch._C._nn.linear
    if impl == "baddbmm" and rank == 3 and d == 1:
        return _baddbmm_bias if bias else _bmm
    kernel = ops.KERNELS.get(impl)
    return None if kernel is None else _with_axis(kernel, d)


def _baddbmm_bias(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _baddbmm_col(x, w, b.unsqueeze(-1))


def _baddbmm_col(x: torch.Tensor, w: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    # the (out, 1) bias broadcasts inside baddbmm, as hand-written code passes it (eager only:
    # baddbmm's meta function rejects a broadcast bias on symbolic sizes)
    return torch.baddbmm(col, w.expand(x.shape[0], -1, -1), x)


def _bmm(x: torch.Tensor, w: torch.Tensor, b: None) -> torch.Tensor:
    return torch.bmm(w.expand(x.shape[0], -1, -1), x)


@functools.cache
def _with_axis(kernel: Callable[..., Any], d: int) -> Callable[..., Any]:
    def call(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return kernel(x, w, b, d)

    call.__name__ = call.__qualname__ = f"{kernel.__name__.lstrip('_')}_axis{d}"
    return call
