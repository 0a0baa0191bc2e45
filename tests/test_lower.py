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


def _optimized_block() -> tuple[nn.Module, nn.Module, Any, torch.Tensor]:
    """(model, optimized, its eval-mode program, example)"""
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(3, 4, 6)
    opt = tdd_fx.optimize(model, (x,))
    return model, opt, next(p for p in programs_of(opt) if not p.training), x


def test_the_executable_graph_is_lowered_and_the_inspectable_one_is_not() -> None:
    model, opt, program, _ = _optimized_block()
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
    model, opt, program, x = _optimized_block()
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


def _generic_cases() -> list[tuple[int, int, int, str, bool]]:
    out = []
    for rank in (2, 3, 4, 5):
        for d in range(rank):
            for impl in sorted(tdd_fx.ops.KERNELS):
                for bias in (True, False):
                    out.append((rank, d, 2, impl, bias))
            if d == 1 and rank >= 3:
                out += [(rank, 1, rank, "conv", True), (rank, 1, rank, "conv", False)]
    return out


@pytest.mark.parametrize("rank,d,w_rank,impl,bias", _generic_cases())
def test_a_direct_kernel_is_the_canonical_call(rank: int, d: int, w_rank: int, impl: str,
                                               bias: bool) -> None:
    """What the executable graph calls instead of ``time_distributed_dense`` gives the same
    tensor (values, shape, strides) and the same gradients."""
    from tdd_fx.lower import direct_kernel

    fn = direct_kernel(rank, d, w_rank, impl, bias)
    assert fn is not None  # every 2-D weight, and a conv's own pointwise weight
    g = torch.Generator().manual_seed(rank * 10 + d)
    shape = [2, 3, 4, 5, 3][:rank]
    x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    w_shape = (6, shape[d], *([1] * (w_rank - 2)))
    w = torch.randn(*w_shape, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    want = tdd_fx.ops.time_distributed_dense(x, w, b, feature_dim=d, impl=impl)
    got = fn(x, w, b)
    assert got.shape == want.shape and got.stride() == want.stride()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    leaves = [t for t in (x, w, b) if t is not None]
    seed = torch.randn(want.shape, generator=g, dtype=torch.float64)
    for a, c in zip(torch.autograd.grad(want, leaves, seed), torch.autograd.grad(got, leaves, seed)):
        torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-12)


def test_compile_and_export_trace_the_canonical_graph(monkeypatch) -> None:
    """The lowered copy is for eager calls: export and compile never build or run it."""
    from tdd_fx.program import Program

    model, opt, _, x = _optimized_block()

    def eager_only(self: Program) -> Any:
        raise AssertionError("the lowered graph was used while tracing")

    monkeypatch.setattr(Program, "graph_fn", eager_only)
    ep = torch.export.export(opt, (x,), strict=False)
    torch.testing.assert_close(ep.module()(x), model(x))
    torch._dynamo.reset()
    compiled = torch.compile(opt, backend="eager", fullgraph=False)
    torch.testing.assert_close(compiled(x), model(x))
    with pytest.raises(AssertionError, match="lowered graph was used"):
        opt(x)  # (an eager call does use it: the patch is live)


class ExpandedBaddbmm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 6))
        self.bias = nn.Parameter(torch.randn(5, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, self.weight.expand(x.size(0), -1, -1), x)


@pytest.mark.parametrize("training", [False, True])
def test_an_expanded_baddbmm_runs_with_its_own_column_bias(training: bool) -> None:
    """``bias.view(-1)`` into the canonical node, then back to a column inside the kernel, is two
    autograd nodes the original did not have: the executable graph hands baddbmm the column."""
    from conftest import assert_equivalent

    torch.manual_seed(0)
    model = ExpandedBaddbmm().train(training)
    x = torch.randn(3, 6, 7)
    opt = tdd_fx.optimize(model, (x,))
    program = next(p for p in programs_of(opt) if p.training == training)
    run_code = program.graph_fn().__self__.code
    assert "_baddbmm_col(" in run_code and ".view(" not in run_code, run_code
    assert "time_distributed_dense(" in program.gm.code
    assert_equivalent(opt, model, (x,))
    assert_equivalent(opt, model, (torch.randn(2, 6, 11),))


class GPTConv1D(nn.Module):
    """GPT-2's ``Conv1D``: ``addmm`` on a folded view, weight stored ``(in, out)``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 5))
        self.bias = nn.Parameter(torch.randn(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (5,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


@pytest.mark.parametrize("training", [False, True])
def test_gpt2_conv1d_runs_addmm_on_its_stored_weight(training: bool) -> None:
    """The canonical node reads ``W.t()``; the executable graph multiplies by ``W`` itself (no
    transpose there and back, forward or backward)."""
    from conftest import assert_equivalent

    torch.manual_seed(0)
    model = GPTConv1D().train(training)
    x = torch.randn(3, 4, 6)
    opt = tdd_fx.optimize(model, (x,))
    (site,) = opt.tdd_report.rewritten
    assert site.kernel == "addmm"
    program = next(p for p in programs_of(opt) if p.training == training)
    run_code = program.graph_fn().__self__.code
    assert "addmm_in_out(" in run_code and ".t()" not in run_code, run_code
    assert_equivalent(opt, model, (x,))
    assert_equivalent(opt, model, (torch.randn(2, 9, 6),))
