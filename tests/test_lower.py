"""The executable form of a graph (``tdd_fx.lower``): every lowering is the same ATen op."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import tdd_fx
from tdd_fx.lower import LOWERINGS, lowered
from tdd_fx.program import programs_of

aten = torch.ops.aten


def _t(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


#: per overload: a function of fresh leaf tensors -> (args, kwargs) of one call
SAMPLES: dict[Any, Any] = {
    aten.view.default: lambda: ((_t(2, 3, 4), [6, -1]), {}),
    aten.reshape.default: lambda: ((_t(2, 3, 4).transpose(0, 1), [-1, 4]), {}),
    aten.t.default: lambda: ((_t(3, 5),), {}),
    aten.permute.default: lambda: ((_t(2, 3, 4), [2, 0, 1]), {}),
    aten.transpose.int: lambda: ((_t(2, 3, 4), 1, -1), {}),
    aten.unsqueeze.default: lambda: ((_t(2, 3), 1), {}),
    aten.squeeze.dim: lambda: ((_t(2, 1, 3), 1), {}),
    aten.squeeze.dims: lambda: ((_t(2, 1, 3, 1), [1, 3]), {}),
    aten.select.int: lambda: ((_t(2, 3, 4), 1, -1), {}),
    aten.flatten.using_ints: lambda: ((_t(2, 3, 4), 0, 1), {}),
    aten.unflatten.int: lambda: ((_t(6, 4), 0, [2, 3]), {}),
    aten.movedim.int: lambda: ((_t(2, 3, 4), 1, -1), {}),
    aten.expand.default: lambda: ((_t(3, 1), [2, 3, 4]), {}),
    aten.contiguous.default: lambda: ((_t(3, 4).t(),), {}),
    aten.linear.default: lambda: ((_t(2, 3, 4), _t(5, 4), _t(5)), {}),
    aten.addmm.default: lambda: ((_t(5), _t(3, 4), _t(4, 5)), {"beta": 0.5, "alpha": 2.0}),
    aten.mm.default: lambda: ((_t(3, 4), _t(4, 5)), {}),
    aten.bmm.default: lambda: ((_t(2, 3, 4), _t(2, 4, 5)), {}),
    aten.baddbmm.default: lambda: ((_t(3, 1), _t(2, 3, 4), _t(2, 4, 5)), {}),
    aten.matmul.default: lambda: ((_t(2, 3, 4), _t(4, 5)), {}),
    aten.conv1d.default: lambda: ((_t(2, 3, 7), _t(4, 3, 2), _t(4), [2], [1], [1], 1), {}),
    aten.conv2d.default: lambda: ((_t(2, 2, 5, 5), _t(4, 1, 3, 1), None, [1, 1], [1, 0],
                                   [1, 1], 2), {}),
    aten.conv3d.default: lambda: ((_t(1, 2, 3, 3, 3), _t(2, 2, 1, 1, 1)), {}),
    aten.add.Tensor: lambda: ((_t(2, 3), _t(3)), {"alpha": 2}),
    aten.sub.Tensor: lambda: ((_t(2, 3), 1.5), {}),
    aten.mul.Tensor: lambda: ((_t(2, 3), _t(2, 1)), {}),
    aten.div.Tensor: lambda: ((_t(2, 3), 4), {}),
    aten.neg.default: lambda: ((_t(2, 3),), {}),
    aten.tanh.default: lambda: ((_t(2, 3),), {}),
    aten.sigmoid.default: lambda: ((_t(2, 3),), {}),
    aten.relu.default: lambda: ((_t(2, 3),), {}),
    aten.exp.default: lambda: ((_t(2, 3),), {}),
    aten.gelu.default: lambda: ((_t(2, 3),), {"approximate": "tanh"}),
    aten.silu.default: lambda: ((_t(2, 3),), {}),
    aten.softmax.int: lambda: ((_t(2, 3), -1), {}),
    aten.layer_norm.default: lambda: ((_t(2, 3, 4), [4], _t(4), _t(4), 1e-5), {}),
    aten.dropout.default: lambda: ((_t(50, 40), 0.3, True), {}),
    aten.cat.default: lambda: (([_t(2, 3), _t(1, 3)], 0), {}),
    aten.stack.default: lambda: (([_t(2, 3), _t(2, 3)], 1), {}),
    aten.clone.default: lambda: ((_t(3, 4).t(),), {"memory_format": torch.contiguous_format}),
    aten.mean.dim: lambda: ((_t(2, 3, 4), [1]), {"keepdim": True}),
    aten.sum.dim_IntList: lambda: ((_t(2, 3, 4), [0, 2]), {}),
    aten.unbind.int: lambda: ((_t(2, 3, 4), 1), {}),
}


def test_every_lowering_has_a_sample() -> None:
    assert set(SAMPLES) == set(LOWERINGS)


def _call(to: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if isinstance(to, str):
        return getattr(args[0], to)(*args[1:], **kwargs)
    return to(*args, **kwargs)


def _leaves(args: Any) -> list[torch.Tensor]:
    flat = torch.utils._pytree.tree_leaves(args)
    return [a for a in flat if isinstance(a, torch.Tensor) and a.requires_grad]


@pytest.mark.parametrize("op", list(LOWERINGS), ids=str)
def test_a_lowering_is_the_same_op(op: Any) -> None:
    """Same values, shapes, strides, aliasing, random draws and gradients as the overload."""
    torch.manual_seed(0)
    args, kwargs = SAMPLES[op]()
    rng = torch.get_rng_state()
    want = op(*args, **kwargs)
    torch.set_rng_state(rng)
    got = _call(LOWERINGS[op], args, kwargs)
    want_l = list(want) if isinstance(want, (tuple, list)) else [want]
    got_l = list(got) if isinstance(got, (tuple, list)) else [got]
    assert len(want_l) == len(got_l)
    for w, g in zip(want_l, got_l):
        assert g.shape == w.shape and g.dtype == w.dtype and g.stride() == w.stride()
        assert g.storage_offset() == w.storage_offset()
        torch.testing.assert_close(g, w, rtol=0, atol=0)
        # a view of an input stays a view of that input (in-place ops downstream rely on it)
        first = args[0] if isinstance(args[0], torch.Tensor) else None
        if first is not None:
            assert (g.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()) == (
                w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr())
    leaves = _leaves(args)
    seeds = [torch.randn_like(w) for w in want_l]
    gw = torch.autograd.grad(want_l, leaves, seeds, allow_unused=True)
    gg = torch.autograd.grad(got_l, leaves, seeds, allow_unused=True)
    for a, b in zip(gw, gg):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=0, atol=0)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x.contiguous().view(-1, x.size(-1))).view(x.size(0), -1, 5)
        return torch.tanh(self.norm(y)).transpose(1, 2)


def test_the_executable_graph_is_lowered_and_the_inspectable_one_is_not() -> None:
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(3, 4, 6)
    opt = tdd_fx.optimize(model, (x,))
    program = next(p for p in programs_of(opt) if not p.training)
    code = program.gm.code
    run_code = program.graph_fn().__self__.code
    assert "torch.ops.aten.transpose.int" in code
    assert "torch.ops.aten.transpose" not in run_code and ".transpose(" in run_code
    assert "torch.layer_norm(" in run_code
    for shape in [(3, 4, 6), (5, 9, 6)]:
        xs = torch.randn(*shape)
        torch.testing.assert_close(opt(xs), model(xs))


def test_the_executable_graph_follows_a_recompiled_graph() -> None:
    """Autotune edits a program's graph after it ran: the executable copy is rebuilt."""
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(3, 4, 6)
    opt = tdd_fx.optimize(model, (x,))
    program = next(p for p in programs_of(opt) if not p.training)
    opt(x)
    before = program.graph_fn()
    for n in program.gm.graph.nodes:
        if n.target is torch.ops.aten.tanh.default:
            n.target = torch.ops.aten.sigmoid.default
    program.gm.recompile()
    assert program.graph_fn() is not before
    want = torch.sigmoid(model.norm(model.fc(x))).transpose(1, 2)
    torch.testing.assert_close(opt(x), want)


def test_lowered_leaves_the_original_graph_alone() -> None:
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))
    before = gm.code
    lowered(gm)
    assert gm.code == before
