"""Layout across regions (tdd_fx/layout.py): consecutive channel-first sites and the row-wise ops
between them run features-last, one transpose in and one out; the pass never fires where it
could change a result (random ops, a single site, ops that mix positions, costly escapes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_equivalent
from torch import nn

import tdd_fx
from tdd_fx.ops import time_distributed_dense

pytestmark = pytest.mark.usefixtures("one_thread")

C, H = 6, 10
SIZES = [(3, 7), (2, 2), (5, 12), (2, 33)]  # (batch, time)
_LAYOUT = {"permute", "transpose", "movedim", "t", "numpy_T"}


class TCN(nn.Module):
    """``Conv1d(C, H, 1)`` -> ReLU -> (Dropout) -> ``Conv1d(H, C, 1)`` + residual."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.inner, self.outer = nn.Conv1d(C, H, 1), nn.Conv1d(H, C, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.outer(self.drop(torch.relu(self.inner(x))))


class TasNetBlock(nn.Module):
    """Two pointwise convs around a channel-first LayerNorm spelled with transposes."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.outer = nn.Conv1d(C, H, 1), nn.Conv1d(H, C, 1)
        self.ln = nn.LayerNorm(H)
        self.scale = nn.Parameter(torch.rand(C, 1) + 0.5)  # per-channel, broadcast along time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.inner(x))
        h = self.ln(h.transpose(1, 2)).transpose(1, 2)
        return x + self.scale * self.outer(h)


class Chain3(nn.Module):
    """Three pointwise convs with GELU between them."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv1d(C, H, 1), nn.Conv1d(H, H, 1), nn.Conv1d(H, C, 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = conv(x) if i == 0 else conv(F.gelu(x))
        return x


class Split(nn.Module):
    """Pointwise convs on either side of an op that mixes time steps (``mix``)."""

    def __init__(self, mix: str) -> None:
        super().__init__()
        self.a, self.b = nn.Conv1d(C, H, 1), nn.Conv1d(H, H, 1)
        self.c, self.d = nn.Conv1d(H, H, 1), nn.Conv1d(H, C, 1)
        self.mix = mix
        self.k3 = nn.Conv1d(H, H, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(torch.relu(self.a(x)))
        h = self.k3(h) if self.mix == "conv3" else h.cumsum(2)
        return self.d(torch.relu(self.c(h)))


class Escape(nn.Module):
    """A value in the middle of a chain of ``n`` sites is also returned."""

    def __init__(self, n: int) -> None:
        super().__init__()
        dims = [C] + [H] * (n - 1) + [C]
        self.convs = nn.ModuleList([nn.Conv1d(i, o, 1) for i, o in zip(dims, dims[1:])])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.relu(self.convs[0](x))
        mid = x
        for conv in self.convs[1:]:
            x = conv(x)
        return x, mid


def _kind(n) -> str:
    return getattr(n.target, "__name__", str(n.target)).split(".")[0]


def layout_ops(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and _kind(n) in _LAYOUT]


def canonical(gm) -> list:
    return [n for n in gm.graph.nodes if n.target is time_distributed_dense]


def optimized(model: nn.Module, mode: str = "eval") -> tuple[nn.Module, object]:
    model.train(mode == "train")
    opt = tdd_fx.optimize(model, (torch.randn(4, C, 9),))
    assert len(opt.tdd_report.rewritten) >= 1, str(opt.tdd_report)
    return opt, tdd_fx.graph_of(opt, mode=mode)


def assert_same_everywhere(opt: nn.Module, model: nn.Module) -> None:
    for b, t in SIZES:
        assert_equivalent(opt, model, (torch.randn(b, C, t),))


def assert_features_last(gm, sites: int) -> None:
    """One transpose into the region, one out of it, every canonical node features-last."""
    nodes = canonical(gm)
    assert len(nodes) == sites
    assert all(n.kwargs["feature_dim"] == -1 and n.kwargs["impl"] == "linear" for n in nodes)
    moves = layout_ops(gm)
    assert len(moves) == 2, gm.code
    first, last = canonical(gm)[0], canonical(gm)[-1]
    order = list(gm.graph.nodes)
    assert order.index(moves[0]) < order.index(first) < order.index(last) < order.index(moves[1])


# --- the pass fires ------------------------------------------------------------------------
@pytest.mark.parametrize("make,sites", [(TCN, 2), (TasNetBlock, 2), (Chain3, 3)],
                         ids=["tcn", "tasnet_layernorm", "chain3_gelu"])
def test_region_runs_features_last(make, sites) -> None:
    model = make()
    opt, gm = optimized(model)
    assert_features_last(gm, sites)
    assert not any(n.target == torch.ops.aten.layer_norm.default
                   and _kind(n.args[0]) in _LAYOUT for n in gm.graph.nodes)
    assert_same_everywhere(opt, model)


def test_train_mode_without_random_ops_moves_too() -> None:
    model = TCN()
    opt, gm = optimized(model, "train")
    assert_features_last(gm, 2)
    assert_same_everywhere(opt, model)


def test_eval_dropout_is_the_identity() -> None:
    model = TCN(dropout=0.3)
    opt, gm = optimized(model, "eval")
    assert_features_last(gm, 2)
    assert_same_everywhere(opt, model)


# --- the pass does not fire ----------------------------------------------------------------
def test_train_dropout_keeps_per_site_kernels() -> None:
    model = TCN(dropout=0.3)
    opt, gm = optimized(model, "train")
    nodes = canonical(gm)
    assert len(nodes) == 2 and all(n.kwargs["feature_dim"] == 1 for n in nodes)
    assert [n.kwargs["impl"] for n in nodes] == ["conv", "conv"]
    assert layout_ops(gm) == []


class Single(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(C, H, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)) * 2.0


def test_single_site_keeps_its_kernel() -> None:
    opt, gm = optimized(Single())
    (node,) = canonical(gm)
    assert node.kwargs["feature_dim"] == 1 and node.kwargs["impl"] == "conv"
    assert layout_ops(gm) == []


@pytest.mark.parametrize("mix", ["conv3", "cumsum"])
def test_ops_mixing_positions_split_the_region(mix) -> None:
    model = Split(mix)
    opt, gm = optimized(model)
    nodes = canonical(gm)
    assert len(nodes) == 4 and all(n.kwargs["feature_dim"] == -1 for n in nodes)
    assert len(layout_ops(gm)) == 4  # in and out of each half
    mixer = next(n for n in gm.graph.nodes
                 if n.op == "call_function" and _kind(n) in ("conv1d", "cumsum"))
    assert _kind(mixer.args[0]) in ("contiguous", "permute")  # reads the value moved back
    assert _kind(next(iter(mixer.users))) == "permute"  # and is moved again after
    assert_same_everywhere(opt, model)


def test_escape_mid_region_too_costly_keeps_kernels() -> None:
    model = Escape(2)
    opt, gm = optimized(model)
    assert all(n.kwargs["feature_dim"] == 1 for n in canonical(gm))
    assert layout_ops(gm) == []
    assert_same_everywhere(opt, model)


def test_escape_mid_region_is_moved_back() -> None:
    model = Escape(3)
    opt, gm = optimized(model)
    assert all(n.kwargs["feature_dim"] == -1 for n in canonical(gm))
    assert len(layout_ops(gm)) == 3  # in; out for the result and for the escaping value
    assert_same_everywhere(opt, model)
