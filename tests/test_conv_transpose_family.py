"""The conv_transpose family (reported under the "conv" pattern): a transposed convolution with a
kernel of size 1, stride 1, no padding and one group is a dense map at every position and
becomes one canonical node; every other transposed convolution is left alone, with the reason."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_equivalent
from conv_models import (  # noqa: E402
    FALLBACK,
    FEAT,
    OUT,
    B,
    C,
    Holder,
    T,
    assert_same_layer,
    canonical_nodes,
    conv_nodes,
    layout_ops_on_data,
    rewritten_graphs,
    sample,
)
from conv_models import call as _call  # noqa: E402
from torch import nn

import tdd_fx


def _convolution(s: Holder, x: torch.Tensor) -> torch.Tensor:
    """``torch.convolution(..., transposed=True, ...)``: ``aten.convolution`` in the graph."""
    n = x.dim() - 2
    return torch.convolution(x, s.conv.weight, s.conv.bias, [1] * n, [0] * n, [1] * n, True,
                             [0] * n, 1)


#: name -> (forward, layer factory, input shape, bigger input shape, feature axis)
POSITIVE: dict[str, tuple[Callable[..., torch.Tensor], Callable[[], nn.Module],
                          tuple[int, ...], tuple[int, ...], int]] = {
    "convT1d": (_call, lambda: nn.ConvTranspose1d(FEAT, OUT, 1), (B, FEAT, T),
                (B + 3, FEAT, T + 4), 1),
    "convT1d_no_bias": (_call, lambda: nn.ConvTranspose1d(FEAT, OUT, 1, bias=False),
                        (B, FEAT, T), (B + 3, FEAT, T + 4), 1),
    "convT2d": (_call, lambda: nn.ConvTranspose2d(C, OUT, 1), (B, C, 3, T),
                (B + 3, C, 5, T + 4), 1),
    "convT2d_no_bias": (_call, lambda: nn.ConvTranspose2d(C, OUT, (1, 1), bias=False),
                        (B, C, 3, T), (B + 3, C, 5, T + 4), 1),
    "convT3d": (_call, lambda: nn.ConvTranspose3d(C, OUT, 1), (B, C, 2, 3, T),
                (B + 3, C, 3, 4, T + 4), 1),
    "convT3d_no_bias": (_call, lambda: nn.ConvTranspose3d(C, OUT, 1, bias=False),
                        (B, C, 2, 3, T), (B + 3, C, 3, 4, T + 4), 1),
    "dilation_k1": (  # dilation spaces the taps of a kernel: moot for a single tap
        _call, lambda: nn.ConvTranspose1d(FEAT, OUT, 1, dilation=2), (B, FEAT, T),
        (B + 3, FEAT, T + 4), 1),
    "dilation_k1_2d": (
        _call, lambda: nn.ConvTranspose2d(C, OUT, 1, dilation=(2, 3)), (B, C, 3, T),
        (B + 3, C, 5, T + 4), 1),
    "functional_conv_transpose1d": (
        lambda s, x: F.conv_transpose1d(x, s.conv.weight, s.conv.bias),
        lambda: nn.ConvTranspose1d(FEAT, OUT, 1), (B, FEAT, T), (B + 3, FEAT, T + 4), 1),
    "functional_conv_transpose2d": (
        lambda s, x: F.conv_transpose2d(x, s.conv.weight, s.conv.bias),
        lambda: nn.ConvTranspose2d(C, OUT, 1), (B, C, 3, T), (B + 3, C, 5, T + 4), 1),
    "torch_convolution_transposed": (
        _convolution, lambda: nn.ConvTranspose1d(FEAT, OUT, 1), (B, FEAT, T),
        (B + 3, FEAT, T + 4), 1),
    "unbatched_convT1d": (_call, lambda: nn.ConvTranspose1d(FEAT, OUT, 1), (FEAT, T),
                          (FEAT, T + 4), 0),
}


@pytest.mark.parametrize("name", sorted(POSITIVE))
@pytest.mark.parametrize("training", [False, True])
def test_conv_transpose_is_rewritten(name: str, training: bool) -> None:
    fn, factory, shape, bigger, fd = POSITIVE[name]
    model = Holder(fn, factory()).train(training)
    x = sample(shape)
    opt = tdd_fx.optimize(model, (x,))
    report = opt.tdd_report
    assert [(s.pattern, s.status) for s in report.sites] == [("conv", "rewritten")], str(report)
    assert report.verified is True
    assert report.sites[0].feature_dim == fd
    assert opt.training is training
    graphs = rewritten_graphs(opt)
    assert len(graphs) == 2  # train and eval
    for gm in graphs:
        (node,) = canonical_nodes(gm)
        assert node.kwargs["feature_dim"] == fd, gm.code
        assert not conv_nodes(gm), gm.code
        assert not layout_ops_on_data(gm), gm.code  # nothing but the canonical node on x
    other = sample(bigger, seed=2)
    assert_same_layer(opt, model, x, other)
    with warnings.catch_warnings():  # the other mode's graph runs too
        warnings.filterwarnings("error", message=f".*{FALLBACK}", category=RuntimeWarning)
        opt.train(not training)
        model.train(not training)
        torch.testing.assert_close(opt(other), model(other))


def test_batch_of_one_example() -> None:
    """A batch-1 example is captured at batch 2 and verified at 1; batches 1 and 4 run the
    optimized graph."""
    model = Holder(_call, nn.ConvTranspose2d(C, OUT, 1)).eval()
    opt = tdd_fx.optimize(model, (sample((1, C, 3, T)),))
    assert [s.status for s in opt.tdd_report.sites] == ["rewritten"], str(opt.tdd_report)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=f".*{FALLBACK}", category=RuntimeWarning)
        for batch in (1, 4):
            y = sample((batch, C, 4, T + 1), seed=batch)
            torch.testing.assert_close(opt(y), model(y))


class Tied(nn.Module):
    """An encoder ``Conv1d(F, O, 1)`` and a decoder that is its transpose, with the same weight
    (a tied autoencoder): two sites, one parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv1d(FEAT, OUT, 1, bias=False)
        self.dec_bias = nn.Parameter(torch.randn(FEAT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.enc(x))
        return F.conv_transpose1d(h, self.enc.weight, self.dec_bias)


def test_tied_encoder_decoder_both_rewritten() -> None:
    model = Tied()
    x = sample((B, FEAT, T))
    opt = tdd_fx.optimize(model, (x,))
    assert [(s.pattern, s.status) for s in opt.tdd_report.sites] == [
        ("conv", "rewritten"), ("conv", "rewritten")], str(opt.tdd_report)
    for gm in rewritten_graphs(opt):
        assert len(canonical_nodes(gm)) == 2 and not conv_nodes(gm), gm.code
    assert dict(opt.named_parameters())["enc.weight"] is model.enc.weight
    assert_equivalent(opt, model, (x,))
    other = sample((B + 2, FEAT, T + 3), seed=3)
    assert_equivalent(opt, model, (other,), atol=1e-4, rtol=1e-4)


#: name -> (forward, layer factory, input shape, words the reason must contain)
NEGATIVE: dict[str, tuple[Callable[..., torch.Tensor], Callable[[], nn.Module], tuple[int, ...],
                          tuple[str, ...]]] = {
    "kernel2": (_call, lambda: nn.ConvTranspose1d(FEAT, OUT, 2), (B, FEAT, T),
                ("kernel (2,) spreads each position over its neighbours",)),
    "kernel_1x2": (_call, lambda: nn.ConvTranspose2d(C, OUT, (1, 2)), (B, C, 3, T),
                   ("kernel (1, 2) spreads each position",)),
    "kernel3_padding1": (  # same length out, still a real convolution
        _call, lambda: nn.ConvTranspose1d(FEAT, OUT, 3, padding=1), (B, FEAT, T),
        ("kernel (3,) spreads",)),
    "stride2": (_call, lambda: nn.ConvTranspose1d(FEAT, OUT, 1, stride=2), (B, FEAT, T),
                ("stride [2] spreads positions apart",)),
    "stride_2d": (_call, lambda: nn.ConvTranspose2d(C, OUT, 1, stride=(1, 2)), (B, C, 3, T),
                  ("stride [1, 2] spreads positions apart",)),
    "stride2_output_padding1": (
        _call, lambda: nn.ConvTranspose1d(FEAT, OUT, 1, stride=2, output_padding=1),
        (B, FEAT, T), ("stride [2]",)),
    "padding1": (  # kernel 1: padding crops a position at each end
        _call, lambda: nn.ConvTranspose1d(FEAT, OUT, 1, padding=1), (B, FEAT, T),
        ("padding [1] crops positions",)),
    "padding_2d": (_call, lambda: nn.ConvTranspose2d(C, OUT, 1, padding=(0, 1)), (B, C, 3, T),
                   ("padding [0, 1] crops positions",)),
    "output_padding_dilation2": (  # output_padding < dilation is allowed: one position added
        _call, lambda: nn.ConvTranspose1d(FEAT, OUT, 1, dilation=2, output_padding=1),
        (B, FEAT, T), ("output_padding [1] adds positions",)),
    "groups2": (_call, lambda: nn.ConvTranspose1d(FEAT, 4, 1, groups=2), (B, FEAT, T),
                ("groups=2 is block-diagonal",)),
    "groups_2d": (_call, lambda: nn.ConvTranspose2d(C, C, 1, groups=C), (B, C, 3, T),
                  (f"groups={C} is block-diagonal",)),
    "functional_groups": (
        lambda s, x: F.conv_transpose1d(x, s.conv.weight, s.conv.bias, groups=2),
        lambda: nn.ConvTranspose1d(FEAT, 2, 1, groups=2), (B, FEAT, T),
        ("groups=2 is block-diagonal",)),
    "weight_norm": (
        _call, lambda: nn.utils.parametrizations.weight_norm(nn.ConvTranspose1d(FEAT, OUT, 1)),
        (B, FEAT, T), ("kernel is computed in forward (_weight_norm)",)),
    "kernel_from_input": (
        lambda s, x: F.conv_transpose1d(x, s.conv.weight * x.mean(), s.conv.bias),
        lambda: nn.ConvTranspose1d(FEAT, OUT, 1), (B, FEAT, T),
        ("the kernel is computed from the input",)),
    "bias_from_input": (
        lambda s, x: F.conv_transpose1d(x, s.conv.weight, s.conv.bias * x.mean()),
        lambda: nn.ConvTranspose1d(FEAT, OUT, 1), (B, FEAT, T),
        ("the bias is computed from the input",)),
}


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_conv_transpose_near_miss_is_rejected_with_reason(name: str) -> None:
    fn, factory, shape, words = NEGATIVE[name]
    model = Holder(fn, factory()).eval()
    x = sample(shape)
    report = tdd_fx.audit(model, (x,))
    assert [(s.pattern, s.status) for s in report.sites] == [("conv", "rejected")], str(report)
    assert all(w in report.sites[0].reason for w in words), str(report)
    opt = tdd_fx.optimize(model, (x,))
    assert [s.status for s in opt.tdd_report.sites] == ["rejected"], str(opt.tdd_report)
    assert opt.tdd_report.sites[0].reason == report.sites[0].reason
    assert tdd_fx.graphs(opt) == {}  # nothing rewritten: the original forward runs
    assert list(opt.state_dict()) == list(model.state_dict())
    for k, v in opt.named_parameters():
        assert v is dict(model.named_parameters())[k]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_equivalent(opt, model, (x,))
