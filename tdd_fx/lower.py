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

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

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
    through their bindings; ``gm`` itself is unchanged."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        to = LOWERINGS.get(n.target)
        if to is None:
            continue
        if isinstance(to, str):
            n.op, n.target = "call_method", to
        else:
            n.target = to
    return fx.GraphModule(gm, graph)
