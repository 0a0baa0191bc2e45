"""The matmul family: dense layers written by hand (einsum, ``@``, ``bmm``/``baddbmm`` with an
expanded weight; GPT-2's ``addmm`` Conv1D, proved by the reshape family) become one canonical node
in the exported graph; products whose second operand is not a weight are left alone."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from conftest import assert_equivalent
from torch import nn

import tdd_fx
from tdd_fx.capture import capture
from tdd_fx.families.matmul import MatmulFamily
from tdd_fx.inputs import Example
from tdd_fx.ops import time_distributed_dense
from tdd_fx.pipeline import find

aten = torch.ops.aten
B, T, FEAT, OUT = 2, 5, 6, 3
#: what a product left in the exported graph looks like
PRODUCTS = {aten.einsum.default, aten.matmul.default, aten.bmm.default, aten.baddbmm.default,
            aten.mm.default, aten.addmm.default, aten.linear.default}
ADDS = {aten.add.Tensor, aten.add_.Tensor}


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
BFHT, BIG_BFHT = (B, FEAT, 3, T), (B + 1, FEAT, 4, T + 2)

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
    "einsum_operands_swapped_plus_bias": (
        lambda s, x: torch.einsum("of,btf->bto", s.W, x) + s.b, BTF, BIG_BTF, True),
    "einsum_ellipsis_channel_first": (
        lambda s, x: torch.einsum("bf...,of->bo...", x, s.W), BFHT, BIG_BFHT, False),
    "weight_matmul_channel_first_plus_bias": (
        lambda s, x: s.W @ x + s.b.view(1, OUT, 1), BFT, BIG_BFT, True),
    "mel_filterbank_transposed_back": (
        lambda s, x: (x.transpose(-1, -2) @ s.fb).transpose(-1, -2), BFT, BIG_BFT, False),
    "fold_matmul_unfold": (
        lambda s, x: (x.reshape(-1, FEAT) @ s.Wio).view(x.size(0), x.size(1), OUT), BTF, BIG_BTF,
        False),
}


#: feature_dim of the canonical node where it is not -1
FEATURE_DIM = {"einsum_channel_first": 1, "weight_matmul_channel_first": -2,
               "baddbmm_expanded_weight": -2, "einsum_ellipsis_channel_first": 1,
               "weight_matmul_channel_first_plus_bias": -2,
               # the transposes around the product become the canonical node's feature_dim
               "mel_filterbank_transposed_back": 1}
RESHAPE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def _input(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _canonical(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target is time_distributed_dense]


def _adds(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ADDS]


def _products(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in PRODUCTS]


def _check_rewritten(model: nn.Module, x: torch.Tensor) -> torch.nn.Module:
    opt = tdd_fx.optimize(model, (x,))
    report = opt.tdd_report
    assert [(s.pattern, s.status) for s in report.sites] == [("matmul", "rewritten")], str(report)
    assert report.verified is True
    for mode in ("train", "eval"):  # one graph per mode, each rewritten
        gm = tdd_fx.graph_of(opt, mode=mode)
        assert len(_canonical(gm)) == 1, gm.code
        assert not _products(gm), gm.code
    assert list(opt.state_dict()) == list(model.state_dict())
    assert {k: v.shape for k, v in opt.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    assert {id(p) for p in opt.parameters()} == {id(p) for p in model.parameters()}
    assert_equivalent(opt, model, (x,))
    return opt


def _bias_left_out(opt: nn.Module, adds: int = 1) -> torch.fx.Node:
    """The canonical node of ``opt``'s one site, without a bias: ``adds`` adds stay in the graph,
    one of them reading the node."""
    gm = tdd_fx.graph_of(opt)
    (node,) = _canonical(gm)
    assert node.args[2] is None, gm.code
    found = _adds(gm)
    assert len(found) == adds and any(node in a.args for a in found), gm.code
    return node


@pytest.mark.parametrize("name", sorted(POSITIVE))
@pytest.mark.parametrize("training", [False, True])
def test_matmul_spelling_is_rewritten(name: str, training: bool) -> None:
    """Rewritten in the exported graph of both modes, and the rewrite holds at other batch/time
    sizes than the example's (outputs and gradients)."""
    fn, shape, bigger_shape, fused = POSITIVE[name]
    model = Hand(fn).train(training)
    opt = _check_rewritten(model, _input(shape))
    gm = tdd_fx.graph_of(opt)
    (node,) = _canonical(gm)
    assert node.kwargs["feature_dim"] == FEATURE_DIM.get(name, -1), gm.code
    weight = node.args[1]
    assert weight.op == "placeholder" or weight.target is aten.t.default, gm.code
    if weight.target is aten.t.default:  # a transposed weight is read as stored, never t(t(W))
        assert weight.args[0].op == "placeholder", gm.code
    if fused:
        assert not _adds(gm), gm.code
        assert node.args[2] is not None, "the bias should be fused into the canonical node"
        assert node.args[2].op == "placeholder", gm.code
    bigger = _input(bigger_shape, seed=2)
    with warnings.catch_warnings():  # the rewritten graph runs, not the original as a fallback
        warnings.simplefilter("error", RuntimeWarning)
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
    (node,) = _canonical(tdd_fx.graph_of(opt))
    assert node.args[2] is not None, "addmm's bias should become the canonical node's bias"
    assert dict(opt.named_parameters())["c_fc.weight"] is model.c_fc.weight
    gm = tdd_fx.graph_of(opt)
    assert not [n for n in gm.graph.nodes if n.target in RESHAPE_OPS], gm.code
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
    "einsum_implicit_output_reorders": (
        lambda s, x: torch.einsum("btf,of", x, s.W), BTF, "reorders"),
    "einsum_sums_over_time": (
        lambda s, x: torch.einsum("btf,of->bo", x, s.W), BTF, "sums over the input's axis 't'"),
    "einsum_no_contraction": (
        lambda s, x: torch.einsum("bto,to->bt", x, s.b_to), (B, T, OUT),
        "does not contract exactly one axis"),
    # a size-1 feature axis broadcasts against the weight: a sum of its columns
    "einsum_contracted_axis_broadcasts": (
        lambda s, x: torch.einsum("btf,of->bto", x, s.W), (B, T, 1), "broadcasts"),
    "weight_computed_from_parameters": (
        lambda s, x: x @ (s.Wio * 2), BTF, "computed in forward"),
    "baddbmm_scaled": (
        lambda s, x: torch.baddbmm(s.b.view(1, OUT, 1), s.W.expand(x.size(0), OUT, FEAT), x,
                                   alpha=0.5), BFT, "alpha=0.5"),
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
    assert tdd_fx.graphs(opt) == {}  # nothing rewritten: the model's own code runs
    torch.testing.assert_close(opt(x), model(x))


#: both operands computed from the input (attention), or neither: no site at all
NOT_SITES: dict[str, Callable[..., torch.Tensor]] = {
    "matmul": lambda s, x: torch.softmax(x @ x.transpose(1, 2), dim=-1) @ x,
    "bmm": lambda s, x: torch.bmm(torch.softmax(torch.bmm(x, x.transpose(1, 2)), dim=-1), x),
    "einsum": lambda s, x: torch.einsum(
        "bqk,bkf->bqf", torch.einsum("bqf,bkf->bqk", x, x).softmax(-1), x),
    "unbatched": lambda s, x: (torch.softmax(x[0] @ x[0].t(), dim=-1) @ x[0]).expand_as(x) + x,
    "weights_only": lambda s, x: x * (s.W @ s.Wio).sum() + (s.Wio @ s.W).sum(),
}


@pytest.mark.parametrize("name", sorted(NOT_SITES))
def test_attention_is_not_a_site(name: str) -> None:
    model = Hand(NOT_SITES[name]).eval()
    x = _input(BTF)
    assert tdd_fx.audit(model, (x,)).sites == []
    opt = tdd_fx.optimize(model, (x,))
    assert opt.tdd_report.sites == []
    assert tdd_fx.graphs(opt) == {}  # nothing rewritten: the model's own code runs
    # the family saw both products in the exported graph and made no match of them
    captured = capture(model, Example((x,), {}), None)
    assert len(_products(captured.gm)) == 2, captured.gm.code
    matches, notes = find(captured, [MatmulFamily()])
    assert matches == [] and notes == []
    torch.testing.assert_close(opt(x), model(x))


def test_per_step_bias_is_not_fused() -> None:
    """``+ b`` with ``b`` of shape (T, O) differs per step: the product may be rewritten but the
    add must stay outside the canonical node."""
    model = Hand(lambda s, x: x @ s.W.t() + s.b_to).eval()
    _bias_left_out(_check_rewritten(model, _input(BTF)))


def test_per_feature_term_of_baddbmm_is_the_bias_and_another_is_added() -> None:
    """``baddbmm(c, W.expand(..), x) == tdd(x, W) + c``: a per-feature ``c`` is the canonical
    node's bias; any other ``c`` (here a slice of the input) is added after it."""
    model = Hand(lambda s, x: torch.baddbmm(x[:, :OUT], s.W.expand(x.size(0), OUT, FEAT), x))
    opt = _check_rewritten(model, _input(BFT))
    assert _bias_left_out(opt).kwargs["feature_dim"] == -2
    bigger = _input(BIG_BFT, seed=2)
    torch.testing.assert_close(opt(bigger), model(bigger))


def test_chained_products_are_each_rewritten() -> None:
    """The second product reads the first one's output: its canonical node reads the first
    canonical node (the input is looked up when the rewrite runs, not when it was matched)."""
    model = Hand(lambda s, x: torch.relu(x @ s.Wio + s.b) @ s.W)
    x = _input(BTF)
    opt = tdd_fx.optimize(model, (x,))
    assert [(s.pattern, s.status) for s in opt.tdd_report.sites] == [("matmul", "rewritten")] * 2
    gm = tdd_fx.graph_of(opt)
    first, second = _canonical(gm)
    assert first.args[2] is not None and second.args[2] is None, gm.code
    assert second.args[0].args[0] is first, gm.code
    assert not _products(gm) and not _adds(gm), gm.code
    assert_equivalent(opt, model, (x,))


def test_bias_with_other_users_of_the_product_is_not_fused() -> None:
    """The product is read twice (``y + b`` and ``y.sum()``): the add stays."""
    model = Hand(lambda s, x: (lambda y: y + s.b + y.sum())(x @ s.W.t()))
    _bias_left_out(_check_rewritten(model, _input(BTF)), adds=2)


def test_channel_first_einsum_before_dropout_keeps_its_memory_layout() -> None:
    """``einsum('bft,of->bot')`` returns a strided tensor (features innermost in memory) and
    dropout draws its mask in memory order: in training the canonical node must lay its output
    out the same way (kernel ``linear_t``), or the masks differ and the rewrite is rolled back."""
    model = Hand(lambda s, x: torch.dropout(torch.einsum("bft,of->bot", x, s.W).relu(), 0.3,
                                            s.training)).train()
    x = _input(BFT)
    opt = tdd_fx.optimize(model, (x,))
    assert [(s.status, s.kernel) for s in opt.tdd_report.sites] == [("rewritten", "linear_t")], \
        str(opt.tdd_report)
    (node,) = _canonical(tdd_fx.graph_of(opt, mode="train"))
    assert node.kwargs["impl"] == "linear_t"
    (node,) = _canonical(tdd_fx.graph_of(opt, mode="eval"))  # no random op: the heuristic's
    assert node.kwargs["impl"] == "baddbmm"
    assert_equivalent(opt, model, (x,))
