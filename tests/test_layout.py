"""Layout across regions (tdd_fx/layout.py): consecutive channel-first sites and the row-wise ops
between them run features-last, one transpose in and one out, where that removes work: sites
whose kernels transpose (channel-first sandwiches, ``linear_tc``) fed channel-first values.  The
pass never fires where it would add transposes (pointwise-conv stacks: the ``conv`` kernel reads
channel-first rows as they are) or could change a result (random ops, a single site, ops that mix
positions, costly escapes)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_equivalent
from torch import nn

import tdd_fx
from tdd_fx import layout
from tdd_fx.ops import time_distributed_dense

pytestmark = pytest.mark.usefixtures("one_thread")

C, H, G = 6, 10, 3


def row_major(mode: str) -> str:
    """The kernel of these small pointwise convs (float32, CPU) in a graph of ``mode``: one that
    reads and writes channel-first rows (``baddbmm`` in eval mode, their own ``conv`` in
    training)."""
    with tdd_fx.ops.kernel_policy(speculate=mode == "eval"):
        return tdd_fx.ops.choose_kernel(1, 3, "cpu", prefer="conv", dtype=torch.float32,
                                        size=(C, H))
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




# --- channel-first sandwiches: features on axis 2 of (B, G, C, T), kernel linear_tc ---------
class Sand4(nn.Module):
    """``Linear`` over axis 2 spelled ``fc(x.transpose(2, 3)).transpose(2, 3)``: its site reads
    features innermost (``linear_tc`` copies channel-first rows first) and leaves them there."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.fc = nn.Linear(i, o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.transpose(2, 3)).transpose(2, 3)


class Residual4(nn.Module):
    """``k`` blocks ``x + b(drop(relu(a(x))))``: each sum is channel-first (its first operand
    decides), so each block's first site copies its input; ``escape`` also returns block 0's
    sum (channel-first)."""

    def __init__(self, k: int, dropout: float = 0.0, escape: bool = False) -> None:
        super().__init__()
        self.a = nn.ModuleList([Sand4(C, H) for _ in range(k)])
        self.b = nn.ModuleList([Sand4(H, C) for _ in range(k)])
        self.drop, self.escape = nn.Dropout(dropout), escape

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        sums = []
        for a, b in zip(self.a, self.b):
            x = x + b(self.drop(torch.relu(a(x))))
            sums.append(x)
        return (x, sums[0]) if self.escape else x


class Gated4(nn.Module):
    """``b(x * sigmoid(a(x)))``: the gate's product is channel-first, so ``b`` copies it too;
    ``escape`` also returns the gate (features innermost)."""

    def __init__(self, escape: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.escape = Sand4(C, C), Sand4(C, H), escape

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        gate = torch.sigmoid(self.a(x))
        y = self.b(x * gate)
        return (y, gate) if self.escape else y


class Split4(nn.Module):
    """Two gated halves on either side of an op that mixes time steps (its output is
    channel-first rows)."""

    def __init__(self, mix: str) -> None:
        super().__init__()
        self.first, self.second, self.mix = Gated4(), Gated4(), mix
        self.first.b = Sand4(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        if self.mix == "avg_pool":  # a moving average over 3 time steps
            return self.second(F.avg_pool2d(h, (1, 3), stride=1, padding=(0, 1)))
        return self.second(torch.roll(h, 1, 3))


def _kind(n) -> str:
    return getattr(n.target, "__name__", str(n.target)).split(".")[0]


def layout_ops(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and _kind(n) in _LAYOUT]


def copies(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and _kind(n) == "contiguous"]


def canonical(gm) -> list:
    """The canonical nodes of a graph module or of a rewriter's graph."""
    return [n for n in gm.graph.nodes if n.target is time_distributed_dense]


def rank3(b: int, t: int) -> torch.Tensor:
    return torch.randn(b, C, t)


def rank4(b: int, t: int) -> torch.Tensor:
    return torch.randn(b, G, C, t)


@dataclass
class Said:
    """What the layout pass saw and said, over every graph built: the kernels of the sites it
    was given, and why it left regions as they were."""

    kernels: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)


@pytest.fixture
def said(monkeypatch) -> Said:
    log = Said()
    real = layout.features_last

    def spy(rw) -> list[str]:
        log.kernels.update(n.kwargs["impl"] for n in canonical(rw))
        out = real(rw)
        log.notes.extend(out)
        return out

    monkeypatch.setattr(layout, "features_last", spy)
    return log


def optimized(model: nn.Module, mode: str = "eval", make=rank3) -> tuple[nn.Module, object]:
    model.train(mode == "train")
    opt = tdd_fx.optimize(model, (make(4, 9),))
    assert len(opt.tdd_report.rewritten) >= 1, str(opt.tdd_report)
    return opt, tdd_fx.graph_of(opt, mode=mode)


def assert_same_everywhere(opt: nn.Module, model: nn.Module, make=rank3) -> None:
    for b, t in SIZES:
        assert_equivalent(opt, model, (make(b, t),))


def assert_same_layouts(opt: nn.Module, model: nn.Module, make=rank4) -> None:
    """Each output keeps the memory layout the original gave it (copied back to channel-first
    rows where they were, a view where the features were innermost)."""
    x = make(2, 5)
    with torch.no_grad():
        want, got = model(x), opt(x)
    for w, g in zip(want if isinstance(want, tuple) else (want,),
                    got if isinstance(got, tuple) else (got,), strict=True):
        assert g.stride() == w.stride()


def assert_features_last(gm, sites: int, outs: int = 1) -> None:
    """One transpose into the region, ``outs`` out of it, every canonical node features-last."""
    nodes = canonical(gm)
    assert len(nodes) == sites
    assert all(n.kwargs["feature_dim"] == -1 and n.kwargs["impl"] == "linear" for n in nodes)
    moves = layout_ops(gm)
    assert len(moves) == 1 + outs, gm.code
    first, last = nodes[0], nodes[-1]
    order = list(gm.graph.nodes)
    assert order.index(moves[0]) < order.index(first)
    assert all(order.index(first) < order.index(m) for m in moves[1:])
    assert order.index(last) < order.index(moves[-1])


def assert_left_alone(gm, said: Said, sites: int, impl: str, reason: str) -> None:
    """Every canonical node keeps its channel-first kernel; each region left says why."""
    nodes = canonical(gm)
    assert len(nodes) == sites
    assert all(n.kwargs["feature_dim"] != -1 and n.kwargs["impl"] == impl for n in nodes)
    assert said.notes and all(reason in n for n in said.notes), said.notes


# --- the pass fires: transposing sites fed channel-first values ----------------------------
@pytest.mark.parametrize("make,sites,copied", [
    (lambda: Residual4(3), 6, 2), (Gated4, 2, 1)], ids=["residual_x3", "gated"])
def test_transposing_region_runs_features_last(make, sites, copied, said) -> None:
    model = make()
    opt, gm = optimized(model, make=rank4)
    assert said.kernels == {"linear_tc"} and said.notes == []
    assert_features_last(gm, sites)
    # the input copied once in; the result copied back only where it was channel-first rows
    assert len(copies(gm)) == copied
    assert_same_everywhere(opt, model, rank4)
    assert_same_layouts(opt, model)


def test_train_mode_without_random_ops_moves_too(said) -> None:
    model = Residual4(3)
    opt, gm = optimized(model, "train", rank4)
    assert_features_last(gm, 6)
    assert_same_everywhere(opt, model, rank4)


def test_eval_dropout_is_the_identity(said) -> None:
    model = Residual4(3, dropout=0.3)
    opt, gm = optimized(model, "eval", rank4)
    assert_features_last(gm, 6)
    assert_same_everywhere(opt, model, rank4)


@pytest.mark.parametrize("mix", ["avg_pool", "roll"])
def test_ops_mixing_positions_split_the_region(mix, said) -> None:
    model = Split4(mix)
    opt, gm = optimized(model, make=rank4)
    nodes = canonical(gm)
    assert len(nodes) == 4 and all(n.kwargs["feature_dim"] == -1 for n in nodes)
    assert len(layout_ops(gm)) == 4  # in and out of each half
    mixer = next(n for n in gm.graph.nodes
                 if n.op == "call_function" and _kind(n) in ("avg_pool2d", "roll"))
    assert _kind(mixer.args[0]) == "permute"  # reads the value moved back (a view)
    assert _kind(next(iter(mixer.users))) == "permute"  # and is moved again after
    assert_same_everywhere(opt, model, rank4)
    assert_same_layouts(opt, model)


def test_escape_with_features_innermost_leaves_as_a_view(said) -> None:
    model = Gated4(escape=True)
    opt, gm = optimized(model, make=rank4)
    assert_features_last(gm, 2, outs=2)
    assert len(copies(gm)) == 1  # the input; the gate and the result leave as views
    assert_same_everywhere(opt, model, rank4)
    assert_same_layouts(opt, model)


def test_channel_first_escape_is_copied_back(said) -> None:
    model = Residual4(4, escape=True)
    opt, gm = optimized(model, make=rank4)
    assert_features_last(gm, 8, outs=2)
    assert len(copies(gm)) == 3  # in; the result and block 0's sum back to channel-first rows
    assert_same_everywhere(opt, model, rank4)
    assert_same_layouts(opt, model)


# --- the pass does not fire ----------------------------------------------------------------
_NO_GAIN = "features-last would copy"


@pytest.mark.parametrize("make,sites,own", [
    (TCN, 2, 0), (TasNetBlock, 2, 2), (Chain3, 3, 0), (lambda: Split("cumsum"), 4, 0),
    (lambda: Escape(3), 3, 0)],
    ids=["tcn", "tasnet_layernorm", "chain3_gelu", "split", "escape"])
def test_conv_stacks_are_left_alone(make, sites, own, said) -> None:
    """The pointwise convs' kernel (their own ``conv``) reads and writes channel-first rows: the
    move would only add the transposes in and out (and switch the kernels to ``linear``)."""
    model = make()
    opt, gm = optimized(model)
    kernels = {row_major("eval"), row_major("train")}
    assert kernels == {"baddbmm", "conv"} and said.kernels == kernels  # (both graphs built)
    assert_left_alone(gm, said, sites, row_major("eval"), _NO_GAIN)
    assert all(re.search(r"\(kernels (conv|baddbmm)/\1", n) for n in said.notes), said.notes
    assert len(layout_ops(gm)) == own  # the model's own (a layer norm's transposes)
    assert copies(gm) == []
    assert_same_everywhere(opt, model)


@pytest.mark.parametrize("blocks,saved", [(1, 1), (2, 2)])
def test_transposing_blocks_that_would_not_gain_are_left_alone(blocks, saved, said) -> None:
    """One residual block copies its input once; moving it copies the input and the sum back
    (2); two blocks: 2 for 2, a tie, left alone."""
    model = Residual4(blocks)
    opt, gm = optimized(model, make=rank4)
    assert_left_alone(gm, said, 2 * blocks, "linear_tc",
                      f"would copy 2 tensor(s) between layouts to save {saved} ")
    assert layout_ops(gm) == []
    assert_same_everywhere(opt, model, rank4)


def test_escape_mid_region_too_costly_keeps_kernels(said) -> None:
    """Block 0's sum leaving costs a copy back: 3 for the 3 the blocks copy."""
    model = Residual4(3, escape=True)
    opt, gm = optimized(model, make=rank4)
    assert_left_alone(gm, said, 6, "linear_tc", "would copy 3 tensor(s) between layouts to save 3")
    assert layout_ops(gm) == []
    assert_same_everywhere(opt, model, rank4)


@pytest.mark.parametrize("make,impl,sizes", [
    (lambda: TCN(dropout=0.3), row_major("train"), rank3),
    (lambda: Residual4(3, dropout=0.3), "linear_tc", rank4)], ids=["conv", "transposing"])
def test_train_dropout_keeps_per_site_kernels(make, impl, sizes, said) -> None:
    model = make()
    opt, gm = optimized(model, "train", sizes)
    nodes = canonical(gm)
    assert len(nodes) >= 2 and all(n.kwargs["feature_dim"] in (1, 2) for n in nodes)
    assert {n.kwargs["impl"] for n in nodes} == {impl}
    assert layout_ops(gm) == []
    # (the eval-mode graph, built too, has no random op)
    assert any("random op dropout: the pass does not run" in n for n in said.notes), said.notes


class Single(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(C, H, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)) * 2.0


def test_single_site_keeps_its_kernel(said) -> None:
    opt, gm = optimized(Single())
    (node,) = canonical(gm)
    assert node.kwargs["feature_dim"] == 1
    assert node.kwargs["impl"] == row_major("eval")
    assert layout_ops(gm) == []
    assert all("a single site keeps its kernel" in n for n in said.notes)
