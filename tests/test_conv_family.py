"""The conv family: convolutions that only mix features at each step become one canonical node;
real convolutions (and anything not proved) are left alone, with the reason."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_equivalent
from torch import nn

import tdd_fx
from tdd_fx.ops import time_distributed_dense

B, FEAT, T, OUT, C = 2, 6, 5, 3, 4

#: ops around the conv that the peephole must cancel against the rewrite's own views
LAYOUT_OPS = {"unsqueeze", "squeeze", "permute", "flatten", "view", "transpose", "reshape"}


class Holder(nn.Module):
    """``forward`` is ``fn(self, x)``; the conv under test is ``self.conv``."""

    def __init__(self, fn: Callable[..., torch.Tensor], conv: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


def _call(s: Holder, x: torch.Tensor) -> torch.Tensor:
    return s.conv(x)


#: name -> (forward, conv factory, input shape, bigger input shape, layout ops must all cancel)
POSITIVE: dict[str, tuple[Callable[..., torch.Tensor], Callable[[], nn.Module],
                          tuple[int, ...], tuple[int, ...], bool]] = {
    "f1_squeeze": (
        lambda s, x: s.conv(x.unsqueeze(1)).squeeze(2),
        lambda: nn.Conv2d(1, OUT, kernel_size=(FEAT, 1)), (B, FEAT, T), (B + 3, FEAT, T + 4), True),
    "f1_squeeze_permute": (
        lambda s, x: s.conv(x.unsqueeze(1)).squeeze(2).permute(0, 2, 1),
        lambda: nn.Conv2d(1, OUT, kernel_size=(FEAT, 1)), (B, FEAT, T), (B + 3, FEAT, T + 4), True),
    "f1_flatten": (
        lambda s, x: s.conv(x.unsqueeze(1)).flatten(1, 2),
        lambda: nn.Conv2d(1, OUT, kernel_size=(FEAT, 1)), (B, FEAT, T), (B + 3, FEAT, T + 4), True),
    "f1_view_sizes": (
        lambda s, x: s.conv(x.unsqueeze(1)).view(x.size(0), OUT, x.size(2)),
        lambda: nn.Conv2d(1, OUT, kernel_size=(FEAT, 1)), (B, FEAT, T), (B + 3, FEAT, T + 4), True),
    "1f_squeeze3": (
        lambda s, x: s.conv(x.unsqueeze(1)).squeeze(3),
        lambda: nn.Conv2d(1, OUT, kernel_size=(1, FEAT)), (B, T, FEAT), (B + 3, T + 4, FEAT), True),
    "1f_squeeze3_permute": (
        lambda s, x: s.conv(x.unsqueeze(1)).squeeze(3).permute(0, 2, 1),
        lambda: nn.Conv2d(1, OUT, kernel_size=(1, FEAT)), (B, T, FEAT), (B + 3, T + 4, FEAT), True),
    "conv1d_pointwise": (
        _call, lambda: nn.Conv1d(FEAT, OUT, 1), (B, FEAT, T), (B + 3, FEAT, T + 4), False),
    "conv1d_pointwise_no_bias": (
        _call, lambda: nn.Conv1d(FEAT, OUT, 1, bias=False), (B, FEAT, T), (B + 3, FEAT, T + 4),
        False),
    "conv2d_pointwise": (
        _call, lambda: nn.Conv2d(C, OUT, 1), (B, C, 3, T), (B + 3, C, 5, T + 4), False),
    "conv3d_pointwise": (
        _call, lambda: nn.Conv3d(C, OUT, 1), (B, C, 2, 3, T), (B + 3, C, 3, 4, T + 4), False),
    "functional_conv1d": (
        lambda s, x: F.conv1d(x, s.conv.weight, s.conv.bias),
        lambda: nn.Conv1d(FEAT, OUT, 1), (B, FEAT, T), (B + 3, FEAT, T + 4), False),
    "functional_conv2d": (
        lambda s, x: F.conv2d(x, s.conv.weight, s.conv.bias),
        lambda: nn.Conv2d(C, OUT, 1), (B, C, 3, T), (B + 3, C, 5, T + 4), False),
    "padding_same_k1": (
        _call, lambda: nn.Conv1d(FEAT, OUT, 1, padding="same"), (B, FEAT, T), (B + 3, FEAT, T + 4),
        False),
    "padding_valid_k1": (
        _call, lambda: nn.Conv1d(FEAT, OUT, 1, padding="valid"), (B, FEAT, T),
        (B + 3, FEAT, T + 4), False),
    "dilation_k1": (
        _call, lambda: nn.Conv1d(FEAT, OUT, 1, dilation=2), (B, FEAT, T), (B + 3, FEAT, T + 4),
        False),
    "unbatched_conv1d": (
        _call, lambda: nn.Conv1d(FEAT, OUT, 1), (FEAT, T), (FEAT, T + 4), False),
}


def _input(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _make(name: str) -> tuple[Holder, torch.Tensor]:
    fn, factory, shape, _, _ = POSITIVE[name]
    return Holder(fn, factory()), _input(shape)


def _canonical(gm: torch.nn.Module) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target is time_distributed_dense]


def _conv_nodes(gm: torch.nn.Module) -> list[torch.fx.Node]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.modules.conv._ConvNd):
            out.append(n)
        if n.op == "call_function" and n.target in (F.conv1d, F.conv2d, F.conv3d):
            out.append(n)
    return out


def _layout_ops_on_data(gm: torch.nn.Module) -> list[str]:
    """Layout ops on the data path (views of a ``get_attr`` weight are free and allowed)."""
    bad = []
    for n in gm.graph.nodes:
        if n.op not in ("call_method", "call_function"):
            continue
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if name not in LAYOUT_OPS:
            continue
        src = n.args[0] if n.args else None
        if isinstance(src, torch.fx.Node) and src.op == "get_attr":
            continue
        bad.append(f"{n.name}: {name}")
    return bad


@pytest.mark.parametrize("name", sorted(POSITIVE))
@pytest.mark.parametrize("training", [False, True])
def test_conv_spelling_is_rewritten(name: str, training: bool) -> None:
    model, x = _make(name)
    model.train(training)
    opt = tdd_fx.optimize(model, (x,))
    report = opt.tdd_report
    assert [(s.pattern, s.status) for s in report.sites] == [("conv", "rewritten")], str(report)
    assert report.verified is True
    assert opt.training is training
    assert len(_canonical(opt)) == 1, opt.code
    assert not _conv_nodes(opt), opt.code
    assert list(opt.state_dict()) == list(model.state_dict())
    # the conv's parameters are the very same objects, still trainable
    params = dict(opt.named_parameters())
    assert params["conv.weight"] is model.conv.weight
    assert params["conv.weight"].requires_grad
    if model.conv.bias is not None:
        assert params["conv.bias"] is model.conv.bias
    assert_equivalent(opt, model, (x,))
    (g_opt,) = torch.autograd.grad(opt(x).square().sum(), model.conv.weight)
    (g_ref,) = torch.autograd.grad(model(x).square().sum(), model.conv.weight)
    assert g_opt.abs().sum() > 0
    torch.testing.assert_close(g_opt, g_ref)
    if POSITIVE[name][4]:
        assert not _layout_ops_on_data(opt), opt.code


def test_squeeze_permute_leaves_at_most_a_movedim() -> None:
    """``squeeze(2).permute(0, 2, 1)`` collapses to the canonical node (plus at most one movedim
    feeding it): the size-1 channel/kernel axes cost nothing."""
    model, x = _make("f1_squeeze_permute")
    opt = tdd_fx.optimize(model, (x,))
    ops = [n for n in opt.graph.nodes if n.op in ("call_method", "call_function", "call_module")]
    data_ops = [n for n in ops if not (n.args and isinstance(n.args[0], torch.fx.Node)
                                       and n.args[0].op == "get_attr")]
    names = [n.target if isinstance(n.target, str) else n.target.__name__ for n in data_ops]
    assert names.count("time_distributed_dense") == 1
    assert set(names) <= {"check_input", "movedim", "time_distributed_dense"}, opt.code
    assert names.count("movedim") <= 1
    for n in data_ops:
        if n.target == "movedim":
            assert list(n.users) == _canonical(opt), opt.code


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_conv_rewrite_generalises_to_other_sizes(name: str) -> None:
    model, x = _make(name)
    model.eval()
    opt = tdd_fx.optimize(model, (x,))
    assert opt.tdd_report.rewritten, str(opt.tdd_report)
    bigger = _input(POSITIVE[name][3], seed=2)
    expected = model(bigger)
    torch.testing.assert_close(opt(bigger), expected)
    # gradients too (the bias gradient sums many terms to ~0: absolute tolerance)
    assert_equivalent(opt, model, (bigger,), atol=1e-4, rtol=1e-4)


def test_full_span_kernel_size_is_guarded() -> None:
    """The (F, 1) kernel was proved for F features: another F fails the guard, and the original
    (which then raises its own error, the conv producing 2 rows) runs instead: never silently
    wrong.  A copy without the fallback raises GuardError."""
    model, x = _make("f1_squeeze")
    opt = tdd_fx.optimize(model, (x,))
    assert opt.tdd_report.rewritten
    other = _input((B, FEAT + 1, T))
    with pytest.warns(RuntimeWarning, match="relied on"):
        got = opt(other)
    torch.testing.assert_close(got, model(other))
    with pytest.raises(tdd_fx.GuardError):
        copy.deepcopy(opt)(other)



def test_unbatched_conv_is_verified_at_another_time_size() -> None:
    model, x = _make("unbatched_conv1d")
    report = tdd_fx.optimize(model, (x,)).tdd_report
    assert report.rewritten, str(report)
    assert not any("example inputs only" in note for note in report.notes), report.notes

# ------------------------------------------------------------------------------------------
class PlainConvSubclass(nn.Conv1d):
    """A user subclass whose forward differs from Conv1d's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2 + 1


def _hooked(pre: bool) -> nn.Module:
    conv = nn.Conv1d(FEAT, OUT, 1)
    if pre:
        conv.register_forward_pre_hook(lambda m, args: (args[0] * 3,))
    else:
        conv.register_forward_hook(lambda m, args, out: out * 2)
    return conv


def _qat_conv() -> nn.Module:
    """A conv subclass from torch itself (a traced leaf) whose forward fake-quantises the weight."""
    from torch.ao.quantization import disable_observer, get_default_qat_qconfig

    conv = torch.ao.nn.qat.Conv1d(FEAT, OUT, 1, qconfig=get_default_qat_qconfig())
    with torch.no_grad():
        conv(_input((B, FEAT, T)))  # observers size their buffers on the first call
    conv.apply(disable_observer)
    return conv


#: name -> (forward, conv factory, input shape, words the reason must contain)
NEGATIVE: dict[str, tuple[Callable[..., torch.Tensor], Callable[[], nn.Module], tuple[int, ...],
                          str]] = {
    "kernel3": (_call, lambda: nn.Conv1d(FEAT, OUT, 3), (B, FEAT, T), "mixes neighbouring steps"),
    "kernel3_padding_same": (_call, lambda: nn.Conv1d(FEAT, OUT, 3, padding="same"), (B, FEAT, T),
                             "mixes neighbouring steps"),
    "stride2": (_call, lambda: nn.Conv1d(FEAT, OUT, 1, stride=2), (B, FEAT, T), "stride"),
    "f1_time_stride2": (
        lambda s, x: s.conv(x.unsqueeze(1)).squeeze(2),
        lambda: nn.Conv2d(1, OUT, (FEAT, 1), stride=(1, 2)), (B, FEAT, T), "stride"),
    "time_padding": (_call, lambda: nn.Conv1d(FEAT, OUT, 1, padding=1), (B, FEAT, T), "padding"),
    "f1_time_padding": (
        lambda s, x: s.conv(x.unsqueeze(1)).squeeze(2),
        lambda: nn.Conv2d(1, OUT, (FEAT, 1), padding=(0, 1)), (B, FEAT, T), "padding"),
    "dilation_kernel3": (_call, lambda: nn.Conv1d(FEAT, OUT, 3, dilation=2), (B, FEAT, T + 4),
                         "mixes neighbouring steps"),
    "dilated_kernel_reaches_across_features": (
        # kernel 3, dilation 2 covers all 5 rows but reads only rows 0, 2, 4
        lambda s, x: s.conv(x.unsqueeze(1)).squeeze(2),
        lambda: nn.Conv2d(1, OUT, (3, 1), dilation=(2, 1)), (B, 5, T), "kernel 3"),
    "grouped": (_call, lambda: nn.Conv1d(FEAT, 4, 1, groups=2), (B, FEAT, T), "block-diagonal"),
    "depthwise": (_call, lambda: nn.Conv1d(FEAT, FEAT, 1, groups=FEAT), (B, FEAT, T),
                  "block-diagonal"),
    "grouped_kernel_2x1": (_call, lambda: nn.Conv2d(4, 8, (2, 1), groups=4), (B, 4, 2, T),
                           "block-diagonal"),
    "functional_grouped": (
        lambda s, x: F.conv1d(x, s.conv.weight, s.conv.bias, groups=2),
        lambda: nn.Conv1d(FEAT, 4, 1, groups=2), (B, FEAT, T), "block-diagonal"),
    "kernel_short_of_feature_axis": (
        lambda s, x: s.conv(x.unsqueeze(1)).flatten(1, 2),
        lambda: nn.Conv2d(1, OUT, (FEAT - 1, 1)), (B, FEAT, T), f"kernel {FEAT - 1}"),
    "contracts_channels_and_axis": (
        lambda s, x: s.conv(x).squeeze(2),
        lambda: nn.Conv2d(4, OUT, (FEAT, 1)), (B, 4, FEAT, T), "contracts"),
    "torch_subclass_qat": (_call, _qat_conv, (B, FEAT, T), "subclass"),
    "forward_hook": (_call, lambda: _hooked(pre=False), (B, FEAT, T), "hooks"),
    "forward_pre_hook": (_call, lambda: _hooked(pre=True), (B, FEAT, T), "hooks"),
}


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_conv_near_miss_is_rejected_with_reason(name: str) -> None:
    fn, factory, shape, words = NEGATIVE[name]
    model = Holder(fn, factory()).eval()
    x = _input(shape)
    report = tdd_fx.audit(model, (x,))
    assert report.sites, f"{name}: the near-miss should be reported"
    assert all(s.pattern == "conv" and s.status == "rejected" for s in report.sites), str(report)
    assert any(words in s.reason for s in report.sites), str(report)
    opt = tdd_fx.optimize(model, (x,))
    assert not opt.tdd_report.rewritten, str(opt.tdd_report)
    assert all(s.status == "rejected" for s in opt.tdd_report.sites)
    assert not _canonical(opt), opt.code
    assert list(opt.state_dict()) == list(model.state_dict())
    torch.testing.assert_close(opt(x), model(x))


def test_user_subclass_keeps_its_own_forward() -> None:
    """A user-defined subclass is traced through (it is not a torch.nn leaf): whatever is done
    with the conv inside, the subclass' extra arithmetic must survive."""
    model = Holder(_call, PlainConvSubclass(FEAT, OUT, 1))
    x = _input((B, FEAT, T))
    opt = tdd_fx.optimize(model, (x,))
    assert all(s.status in ("rewritten", "rejected") for s in opt.tdd_report.sites)
    assert_equivalent(opt, model, (x,))
    bigger = _input((B + 3, FEAT, T + 4), seed=2)
    torch.testing.assert_close(opt(bigger), model(bigger))


def test_fresh_qat_conv_is_rejected_not_crashing() -> None:
    from torch.ao.quantization import get_default_qat_qconfig

    conv = torch.ao.nn.qat.Conv1d(FEAT, OUT, 1, qconfig=get_default_qat_qconfig())
    model = Holder(_call, conv).eval()
    before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    report = tdd_fx.audit(model, (_input((B, FEAT, T)),))
    assert [s.status for s in report.sites] == ["rejected"], str(report)
    assert "subclass" in report.sites[0].reason
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == before


def test_hooked_conv_still_runs_its_hook() -> None:
    model = Holder(_call, _hooked(pre=False))
    x = _input((B, FEAT, T))
    opt = tdd_fx.optimize(model, (x,))
    expected = F.conv1d(x, model.conv.weight, model.conv.bias) * 2
    torch.testing.assert_close(opt(x), expected)


def test_spatial_cnn_is_not_a_site() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    x = _input((B, 3, 8, 8))
    assert tdd_fx.audit(model, (x,)).sites == []
    opt = tdd_fx.optimize(model, (x,))
    assert opt.tdd_report.sites == []
    assert not _canonical(opt)
    assert len(_conv_nodes(opt)) == 2
    torch.testing.assert_close(opt(x), model(x))


def test_mixed_model_rewrites_only_the_pointwise_conv() -> None:
    """A 3x3 conv next to a 1x1 conv: only the 1x1 becomes a canonical node."""
    model = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.ReLU(), nn.Conv2d(C, OUT, 1)).eval()
    x = _input((B, C, 5, 5))
    opt = tdd_fx.optimize(model, (x,))
    assert [(s.pattern, s.status, s.module) for s in opt.tdd_report.sites] == [
        ("conv", "rewritten", "2")], str(opt.tdd_report)
    assert [n.target for n in _conv_nodes(opt)] == ["0"]
    assert_equivalent(opt, model, (x,))
