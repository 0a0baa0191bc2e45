"""What the conv and conv_transpose family tests share: sizes, the holder module, the layout ops
a rewrite must cancel, graph queries, and the check that a rewritten conv is the same layer."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.fx as fx
from conftest import assert_equivalent
from torch import nn

import tdd_fx
from tdd_fx.ops import time_distributed_dense
from tdd_fx.optables import CONV_TRANSPOSES, CONVS

B, FEAT, T, OUT, C = 2, 6, 5, 3, 4
aten = torch.ops.aten

#: ATen layout ops: on the data path around a rewritten conv they are the sandwich the peephole
#: (and the family's emit) must cancel against the user's own views
LAYOUT = {aten.unsqueeze, aten.squeeze, aten.permute, aten.transpose, aten.view, aten.reshape,
          aten._unsafe_view, aten.flatten, aten.unflatten, aten.t, aten.movedim, aten.expand}
FALLBACK = "running the original forward instead"


class Holder(nn.Module):
    """``forward`` is ``fn(self, x)``; the layer under test is ``self.conv``."""

    def __init__(self, fn: Callable[..., torch.Tensor], conv: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


def call(s: Holder, x: torch.Tensor) -> torch.Tensor:
    return s.conv(x)


def assert_same_layer(opt: nn.Module, model: Holder, x: torch.Tensor,
                      other: torch.Tensor) -> None:
    """The rewritten conv is the original layer: same parameter objects (still trainable), the
    same outputs and gradients on ``x`` and on ``other`` (another size), all through the
    optimized graph (a fallback to the original code fails the check)."""
    assert list(opt.state_dict()) == list(model.state_dict())
    params = dict(opt.named_parameters())
    assert params["conv.weight"] is model.conv.weight and params["conv.weight"].requires_grad
    if model.conv.bias is not None:
        assert params["conv.bias"] is model.conv.bias
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=f".*{FALLBACK}", category=RuntimeWarning)
        assert_equivalent(opt, model, (x,))
        (g_opt,) = torch.autograd.grad(opt(x).square().sum(), model.conv.weight)
        (g_ref,) = torch.autograd.grad(model(x).square().sum(), model.conv.weight)
        assert g_opt.abs().sum() > 0
        torch.testing.assert_close(g_opt, g_ref)
        torch.testing.assert_close(opt(other), model(other))
        # gradients too (a bias gradient sums many terms to ~0: absolute tolerance)
        assert_equivalent(opt, model, (other,), atol=1e-4, rtol=1e-4)


def sample(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def rewritten_graphs(opt: nn.Module) -> list[fx.GraphModule]:
    """Every rewritten graph of ``opt`` (one per captured mode); [] when nothing was installed."""
    return list(tdd_fx.graphs(opt).get("", {}).values())


def canonical_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target is time_distributed_dense]


def conv_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and n.target in CONVS | CONV_TRANSPOSES]


def data_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes computed from the input ``x`` (the last placeholder: the leading ones are
    parameters and buffers, whose views are free)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    live = {placeholders[-1]}
    for n in gm.graph.nodes:
        if any(a in live for a in n.all_input_nodes):
            live.add(n)
    return live


def layout_ops_on_data(gm: fx.GraphModule) -> list[fx.Node]:
    """Layout ops computed from the input ``x``."""
    live = data_nodes(gm)
    return [n for n in gm.graph.nodes if n in live and n.op == "call_function"
            and getattr(n.target, "overloadpacket", None) in LAYOUT]
