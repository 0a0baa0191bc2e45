"""The matmul family: dense layers written by hand (einsum, ``@``, ``bmm``/``baddbmm`` with an
expanded weight, GPT-2's ``addmm`` Conv1D) become one canonical node; products whose second
operand is not a weight are left alone."""

from __future__ import annotations

import operator
from collections.abc import Callable

import pytest
import torch
from conftest import assert_equivalent
from torch import nn

import tdd_fx
from tdd_fx.ops import time_distributed_dense

B, T, FEAT, OUT = 2, 5, 6, 3


class Hand(nn.Module):
    """``forward`` is ``fn(self, x)``; holds weights in both layouts, a bias and a buffer."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn
        self.W = nn.Parameter(torch.randn(OUT, FEAT) / 4)  # (out, in)
        self.Wio = nn.Parameter(torch.randn(FEAT, OUT) / 4)  # (in, out)
        self.b = nn.Parameter(torch.randn(OUT))
        self.b_to = nn.Parameter(torch.randn(T, OUT))
        self.register_buffer("fb", torch.rand(FEAT, OUT))  # a mel filterbank: not trained

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


class GPT2Conv1D(nn.Module):
    """``transformers.pytorch_utils.Conv1D``: a Linear with its weight stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / 4)
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        x = x.view(size_out)
        return x


class GPT2MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc = GPT2Conv1D(OUT, FEAT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_fc(x)


BTF, BFT = (B, T, FEAT), (B, FEAT, T)
BIG_BTF, BIG_BFT = (B + 3, T + 4, FEAT), (B + 3, FEAT, T + 4)

#: name -> (forward, input shape, bigger input shape, the "+ b" must be fused)
POSITIVE: dict[str, tuple[Callable[..., torch.Tensor], tuple[int, ...], tuple[int, ...], bool]] = {
    "einsum_btf_of_plus_bias": (
        lambda s, x: torch.einsum("btf,of->bto", x, s.W) + s.b, BTF, BIG_BTF, True),
    "einsum_ellipsis_in_out": (
        lambda s, x: torch.einsum("...i,ij->...j", x, s.Wio), BTF, BIG_BTF, False),
    "einsum_channel_first": (
        lambda s, x: torch.einsum("bft,of->bot", x, s.W), BFT, BIG_BFT, False),
    "matmul_op_weight_t_plus_bias": (lambda s, x: x @ s.W.t() + s.b, BTF, BIG_BTF, True),
    "bias_plus_matmul_op": (lambda s, x: s.b + x @ s.W.t(), BTF, BIG_BTF, True),
    "torch_matmul_in_out_plus_bias": (
        lambda s, x: torch.matmul(x, s.Wio) + s.b, BTF, BIG_BTF, True),
    "weight_matmul_channel_first": (lambda s, x: s.W @ x, BFT, BIG_BFT, False),
    "mel_filterbank_buffer": (
        lambda s, x: torch.matmul(x.transpose(-1, -2), s.fb), BFT, BIG_BFT, False),
    "bmm_expanded_weight": (
        lambda s, x: torch.bmm(x, s.Wio.unsqueeze(0).expand(x.size(0), FEAT, OUT)), BTF, BIG_BTF,
        False),
    "baddbmm_expanded_weight": (
        lambda s, x: torch.baddbmm(s.b.view(1, OUT, 1), s.W.expand(x.size(0), OUT, FEAT), x), BFT,
        BIG_BFT, False),
    "fold_matmul_unfold": (
        lambda s, x: (x.reshape(-1, FEAT) @ s.Wio).view(x.size(0), x.size(1), OUT), BTF, BIG_BTF,
        False),
}


def _input(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _canonical(gm: torch.nn.Module) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target is time_distributed_dense]


def _adds(gm: torch.nn.Module) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes
            if (n.op == "call_function" and n.target in (operator.add, torch.add))
            or (n.op == "call_method" and n.target in ("add", "add_"))]


def _products(gm: torch.nn.Module) -> list[torch.fx.Node]:
    fns = (torch.einsum, torch.matmul, operator.matmul, torch.bmm, torch.baddbmm, torch.addmm,
           torch.mm)
    return [n for n in gm.graph.nodes
            if (n.op == "call_function" and n.target in fns)
            or (n.op == "call_method" and n.target in ("matmul", "bmm", "mm"))]


def _check_rewritten(model: nn.Module, x: torch.Tensor) -> torch.nn.Module:
    opt = tdd_fx.optimize(model, (x,))
    report = opt.tdd_report
    assert [(s.pattern, s.status) for s in report.sites] == [("matmul", "rewritten")], str(report)
    assert report.verified is True
    assert len(_canonical(opt)) == 1, opt.code
    assert not _products(opt), opt.code
    assert list(opt.state_dict()) == list(model.state_dict())
    assert {k: v.shape for k, v in opt.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    assert {id(p) for p in opt.parameters()} == {id(p) for p in model.parameters()}
    assert_equivalent(opt, model, (x,))
    return opt


@pytest.mark.parametrize("name", sorted(POSITIVE))
@pytest.mark.parametrize("training", [False, True])
def test_matmul_spelling_is_rewritten(name: str, training: bool) -> None:
    fn, shape, _, fused = POSITIVE[name]
    model = Hand(fn).train(training)
    opt = _check_rewritten(model, _input(shape))
    if fused:
        assert not _adds(opt), opt.code
        (node,) = _canonical(opt)
        assert node.args[2] is not None, "the bias should be fused into the canonical node"


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_matmul_rewrite_generalises_to_other_sizes(name: str) -> None:
    fn, shape, bigger_shape, _ = POSITIVE[name]
    model = Hand(fn).eval()
    opt = tdd_fx.optimize(model, (_input(shape),))
    assert opt.tdd_report.rewritten, str(opt.tdd_report)
    bigger = _input(bigger_shape, seed=2)
    torch.testing.assert_close(opt(bigger), model(bigger))
    assert_equivalent(opt, model, (bigger,), atol=1e-4, rtol=1e-4)


def test_filterbank_stays_a_buffer() -> None:
    model = Hand(POSITIVE["mel_filterbank_buffer"][0]).eval()
    x = _input(BFT)
    opt = _check_rewritten(model, x)
    buffers = dict(opt.named_buffers())
    assert buffers["fb"] is model.fb
    assert "fb" not in dict(opt.named_parameters())
    assert not any(p is model.fb for p in opt.parameters())
    assert "fb" in opt.state_dict()
    torch.testing.assert_close(opt.state_dict()["fb"], model.fb)
    # a changed filterbank is seen by the optimized model (no stale copy was baked in)
    with torch.no_grad():
        model.fb.mul_(2)
    torch.testing.assert_close(opt(x), model(x))


def test_gpt2_conv1d_addmm_is_rewritten() -> None:
    model = GPT2MLP()
    x = _input(BTF)
    opt = _check_rewritten(model, x)
    (site,) = opt.tdd_report.sites
    assert site.module.startswith("c_fc"), str(opt.tdd_report)
    (node,) = _canonical(opt)
    assert node.args[2] is not None, "addmm's bias should become the canonical node's bias"
    assert dict(opt.named_parameters())["c_fc.weight"] is model.c_fc.weight
    (g_opt,) = torch.autograd.grad(opt(x).square().sum(), model.c_fc.weight)
    (g_ref,) = torch.autograd.grad(model(x).square().sum(), model.c_fc.weight)
    torch.testing.assert_close(g_opt, g_ref)
    bigger = _input(BIG_BTF, seed=2)
    torch.testing.assert_close(opt(bigger), model(bigger))


def test_fold_matmul_plus_bias_is_rewritten() -> None:
    model = Hand(lambda s, x: (x.reshape(-1, FEAT) @ s.Wio + s.b).view(x.size(0), -1, OUT))
    _check_rewritten(model, _input(BTF))


# ------------------------------------------------------------------------------------------
#: name -> (forward, input shape, words the rejection reason must contain)
NEGATIVE: dict[str, tuple[Callable[..., torch.Tensor], tuple[int, ...], str]] = {
    "weight_computed_from_input": (
        lambda s, x: x @ (x.mean(0).t() @ x.mean(0)), BTF, "computed from the input"),
    "einsum_weight_computed_from_input": (
        lambda s, x: torch.einsum("btf,of->bto", x, (x.mean(1).t() @ x.mean(1))[:OUT]), BTF,
        "computed from the input"),
    "einsum_reorders_axes": (
        lambda s, x: torch.einsum("btf,of->tbo", x, s.W), BTF, "reorders"),
}


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_matmul_near_miss_is_rejected_with_reason(name: str) -> None:
    fn, shape, words = NEGATIVE[name]
    model = Hand(fn).eval()
    x = _input(shape)
    report = tdd_fx.audit(model, (x,))
    assert report.sites, f"{name}: the near-miss should be reported"
    assert all(s.pattern == "matmul" and s.status == "rejected" for s in report.sites), str(report)
    assert any(words in s.reason for s in report.sites), str(report)
    opt = tdd_fx.optimize(model, (x,))
    assert not opt.tdd_report.rewritten, str(opt.tdd_report)
    assert not _canonical(opt), opt.code
    torch.testing.assert_close(opt(x), model(x))


def test_attention_is_not_a_site() -> None:
    model = Hand(lambda s, x: torch.softmax(x @ x.transpose(1, 2), dim=-1) @ x).eval()
    x = _input(BTF)
    assert tdd_fx.audit(model, (x,)).sites == []
    opt = tdd_fx.optimize(model, (x,))
    assert opt.tdd_report.sites == []
    assert not _canonical(opt)
    assert len(_products(opt)) == 2
    torch.testing.assert_close(opt(x), model(x))


def test_per_step_bias_is_not_fused() -> None:
    """``+ b`` with ``b`` of shape (T, O) differs per step: the product may be rewritten but the
    add must stay outside the canonical node."""
    model = Hand(lambda s, x: x @ s.W.t() + s.b_to).eval()
    x = _input(BTF)
    opt = tdd_fx.optimize(model, (x,))
    assert [(s.pattern, s.status) for s in opt.tdd_report.sites] == [("matmul", "rewritten")]
    (node,) = _canonical(opt)
    assert node.args[2] is None, opt.code
    (add,) = _adds(opt)
    assert node in add.args, opt.code
    assert list(opt.state_dict()) == list(model.state_dict())
    assert_equivalent(opt, model, (x,))
