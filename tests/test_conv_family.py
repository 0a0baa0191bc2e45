"""The conv family: convolutions that only mix features at each step become one canonical node;
real convolutions (and anything not proved) are left alone, with the reason."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.fx as fx
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
    aten,
    canonical_nodes,
    conv_nodes,
    data_nodes,
    layout_ops_on_data,
    rewritten_graphs,
    sample,
)
from conv_models import call as _call  # noqa: E402
from torch import nn

import tdd_fx
from tdd_fx.capture import node_module_path
from tdd_fx.ops import time_distributed_dense

#: name -> (forward, conv factory, input shape, bigger input shape, the layout ops left on the
#: data path, each next to the canonical node: "permute" where the output's layout differs from
#: the input's, "flatten" where several axes are merged into the features)
POSITIVE: dict[str, tuple[Callable[..., torch.Tensor], Callable[[], nn.Module],
                          tuple[int, ...], tuple[int, ...], tuple[str, ...]]] = {
    "f1_squeeze": (
        lambda s, x: s.conv(x.unsqueeze(1)).squeeze(2),
        lambda: nn.Conv2d(1, OUT, kernel_size=(FEAT, 1)), (B, FEAT, T), (B + 3, FEAT, T + 4), ()),
    "f1_squeeze_permute": (
        lambda s, x: s.conv(x.unsqueeze(1)).squeeze(2).permute(0, 2, 1),
        lambda: nn.Conv2d(1, OUT, kernel_size=(FEAT, 1)), (B, FEAT, T), (B + 3, FEAT, T + 4),
        ("permute",)),
    "f1_flatten": (
        lambda s, x: s.conv(x.unsqueeze(1)).flatten(1, 2),
        lambda: nn.Conv2d(1, OUT, kernel_size=(FEAT, 1)), (B, FEAT, T), (B + 3, FEAT, T + 4), ()),
    "f1_view_sizes": (
        lambda s, x: s.conv(x.unsqueeze(1)).view(x.size(0), OUT, x.size(2)),
        lambda: nn.Conv2d(1, OUT, kernel_size=(FEAT, 1)), (B, FEAT, T), (B + 3, FEAT, T + 4), ()),
    "1f_squeeze3": (
        lambda s, x: s.conv(x.unsqueeze(1)).squeeze(3),
        lambda: nn.Conv2d(1, OUT, kernel_size=(1, FEAT)), (B, T, FEAT), (B + 3, T + 4, FEAT),
        ("permute",)),
    "1f_squeeze3_permute": (
        lambda s, x: s.conv(x.unsqueeze(1)).squeeze(3).permute(0, 2, 1),
        lambda: nn.Conv2d(1, OUT, kernel_size=(1, FEAT)), (B, T, FEAT), (B + 3, T + 4, FEAT), ()),
    "channels_and_axis_merged": (  # ShallowConvNet: C channels x F rows contracted together
        lambda s, x: s.conv(x).squeeze(2),
        lambda: nn.Conv2d(C, OUT, (FEAT, 1)), (B, C, FEAT, T), (B + 3, C, FEAT, T + 4),
        ("flatten",)),
    "two_axes_spanned_conv3d": (
        lambda s, x: s.conv(x.unsqueeze(1)).flatten(1, 3),
        lambda: nn.Conv3d(1, OUT, (FEAT, 4, 1)), (B, FEAT, 4, T), (B + 3, FEAT, 4, T + 4),
        ("flatten",)),
    "conv1d_pointwise": (
        _call, lambda: nn.Conv1d(FEAT, OUT, 1), (B, FEAT, T), (B + 3, FEAT, T + 4), ()),
    "conv1d_pointwise_no_bias": (
        _call, lambda: nn.Conv1d(FEAT, OUT, 1, bias=False), (B, FEAT, T), (B + 3, FEAT, T + 4),
        ()),
    "conv2d_pointwise": (
        _call, lambda: nn.Conv2d(C, OUT, 1), (B, C, 3, T), (B + 3, C, 5, T + 4), ()),
    "conv3d_pointwise": (
        _call, lambda: nn.Conv3d(C, OUT, 1), (B, C, 2, 3, T), (B + 3, C, 3, 4, T + 4), ()),
    "functional_conv1d": (
        lambda s, x: F.conv1d(x, s.conv.weight, s.conv.bias),
        lambda: nn.Conv1d(FEAT, OUT, 1), (B, FEAT, T), (B + 3, FEAT, T + 4), ()),
    "functional_conv2d": (
        lambda s, x: F.conv2d(x, s.conv.weight, s.conv.bias),
        lambda: nn.Conv2d(C, OUT, 1), (B, C, 3, T), (B + 3, C, 5, T + 4), ()),
    "padding_same_k1": (
        _call, lambda: nn.Conv1d(FEAT, OUT, 1, padding="same"), (B, FEAT, T), (B + 3, FEAT, T + 4),
        ()),
    "padding_valid_k1": (
        _call, lambda: nn.Conv1d(FEAT, OUT, 1, padding="valid"), (B, FEAT, T),
        (B + 3, FEAT, T + 4), ()),
    "dilation_k1": (
        _call, lambda: nn.Conv1d(FEAT, OUT, 1, dilation=2), (B, FEAT, T), (B + 3, FEAT, T + 4),
        ()),
    "unbatched_conv1d": (
        _call, lambda: nn.Conv1d(FEAT, OUT, 1), (FEAT, T), (FEAT, T + 4), ()),
}


def _make(name: str) -> tuple[Holder, torch.Tensor]:
    fn, factory, shape, _, _ = POSITIVE[name]
    return Holder(fn, factory()), sample(shape)


def _op(n: fx.Node) -> str:
    return n.target.overloadpacket.__name__


def _run_optimized(opt: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``opt(x)``, failing if the call fell back to the original forward."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=f".*{FALLBACK}", category=RuntimeWarning)
        return opt(x)


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
    assert set(tdd_fx.graphs(opt)[""]) == {"train", "eval"}
    for gm in rewritten_graphs(opt):  # both modes: one canonical node, no conv left
        assert len(canonical_nodes(gm)) == 1, gm.code
        assert not conv_nodes(gm), gm.code
    # the same layer (parameters, outputs, gradients), also at other sizes: the proof holds
    # there and the optimized graph itself runs
    assert_same_layer(opt, model, x, sample(POSITIVE[name][3], seed=2))
    # the sandwich is gone: only the expected layout op is left on the data path, next to the
    # canonical node
    gm = tdd_fx.graph_of(opt)
    (node,) = canonical_nodes(gm)
    left = layout_ops_on_data(gm)
    assert sorted(_op(n) for n in left) == sorted(POSITIVE[name][4]), gm.code
    for n in left:
        assert n is node.args[0] or n in node.users, gm.code


def test_squeeze_permute_leaves_one_permute_after_the_canonical_node() -> None:
    """``squeeze(2).permute(0, 2, 1)`` collapses to the canonical node plus the user's own permute
    (it changes the layout): the size-1 channel/kernel axes cost nothing."""
    model, x = _make("f1_squeeze_permute")
    opt = tdd_fx.optimize(model, (x,))
    gm = tdd_fx.graph_of(opt)
    data = [n for n in gm.graph.nodes if n in data_nodes(gm) and n.op == "call_function"]
    assert [_op(n) if n.target is not time_distributed_dense else "tdd" for n in data] == [
        "tdd", "permute"], gm.code
    (node,) = canonical_nodes(gm)
    assert node.kwargs["feature_dim"] == 1
    assert list(node.users) == [data[1]]


def test_transposed_output_folds_into_feature_dim() -> None:
    """``Conv2d(1, O, (1, F))`` over ``(B, 1, T, F)`` then ``squeeze(3).permute(0, 2, 1)``: the
    features stay last, so nothing but the canonical node (``feature_dim`` = the last axis)."""
    model, x = _make("1f_squeeze3_permute")
    opt = tdd_fx.optimize(model, (x,))
    gm = tdd_fx.graph_of(opt)
    data = [n for n in gm.graph.nodes if n in data_nodes(gm) and n.op == "call_function"]
    assert [n.target for n in data] == [time_distributed_dense], gm.code
    assert data[0].kwargs["feature_dim"] % 3 == 2
    assert opt.tdd_report.sites[0].kernel == "linear"


def test_full_span_kernel_size_is_guarded() -> None:
    """The (F, 1) kernel was proved for F features (export fixed the axis at F): another F is
    outside the capture, so the original runs instead (the conv then produces 2 rows, which
    ``squeeze(2)`` keeps), with a one-time warning: never silently wrong.  A copy keeps the
    fallback."""
    model, x = _make("f1_squeeze")
    opt = tdd_fx.optimize(model, (x,))
    assert opt.tdd_report.rewritten
    other = sample((B, FEAT + 1, T))
    with pytest.warns(RuntimeWarning, match=rf"shape\[1\] is {FEAT + 1}; the capture fixed it "
                                            rf"at {FEAT}.*{FALLBACK}"):
        got = opt(other)
    assert got.shape == (B, OUT, 2, T)
    torch.testing.assert_close(got, model(other))
    with warnings.catch_warnings():  # warned once
        warnings.simplefilter("error")
        torch.testing.assert_close(opt(other), model(other))
    torch.testing.assert_close(copy.deepcopy(opt)(other), model(other))


def test_unbatched_conv_is_verified_at_another_time_size() -> None:
    model, x = _make("unbatched_conv1d")
    report = tdd_fx.optimize(model, (x,)).tdd_report
    assert report.rewritten, str(report)
    assert not any("example inputs only" in note for note in report.notes), report.notes


def test_batch_of_one_example_is_admitted_at_one_and_more() -> None:
    """A batch-1 example is captured at batch 2 (so the batch stays symbolic) and verified at 1:
    the optimized graph runs at batch 1 and at other batches alike."""
    model = Holder(_call, nn.Conv1d(FEAT, OUT, 1))
    x = sample((1, FEAT, T))
    opt = tdd_fx.optimize(model, (x,))
    assert [s.status for s in opt.tdd_report.sites] == ["rewritten"], str(opt.tdd_report)
    assert opt.tdd_report.verified is True
    for batch in (1, 2, 5):
        y = sample((batch, FEAT, T + 2), seed=batch)
        torch.testing.assert_close(_run_optimized(opt, y), model(y))


def test_channels_last_weights_after_optimize() -> None:
    """The canonical node reads the live weight: converting the model to channels-last after
    ``optimize`` (a merged ``(O, C, F, 1)`` kernel no longer viewable as ``(O, C·F)``) still
    runs the optimized graph, with the original's result."""
    model, x = _make("channels_and_axis_merged")
    opt = tdd_fx.optimize(model, (x,))
    assert opt.tdd_report.rewritten
    opt = opt.to(memory_format=torch.channels_last)  # the parameters are shared with model
    assert not model.conv.weight.is_contiguous()
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        torch.testing.assert_close(_run_optimized(opt, inp), model(inp))


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
    """A conv subclass from torch itself whose forward fake-quantises the weight."""
    from torch.ao.quantization import disable_observer, get_default_qat_qconfig

    conv = torch.ao.nn.qat.Conv1d(FEAT, OUT, 1, qconfig=get_default_qat_qconfig())
    with torch.no_grad():
        conv(sample((B, FEAT, T)))  # observers size their buffers on the first call
    conv.apply(disable_observer)
    return conv


def _weight_normed() -> nn.Module:
    return nn.utils.parametrizations.weight_norm(nn.Conv1d(FEAT, OUT, 1))


COMPUTED = "computed in forward"

#: name -> (forward, conv factory, input shape, words the reason must contain)
NEGATIVE: dict[str, tuple[Callable[..., torch.Tensor], Callable[[], nn.Module], tuple[int, ...],
                          tuple[str, ...]]] = {
    "kernel3": (_call, lambda: nn.Conv1d(FEAT, OUT, 3), (B, FEAT, T),
                ("kernel size 3 on axis 2 mixes neighbouring positions", f"axis of size {T}")),
    "kernel3_padding_same": (_call, lambda: nn.Conv1d(FEAT, OUT, 3, padding="same"), (B, FEAT, T),
                             ("kernel size 3 on axis 2 mixes neighbouring positions",
                              "padding='same'")),
    "stride2": (_call, lambda: nn.Conv1d(FEAT, OUT, 1, stride=2), (B, FEAT, T),
                ("stride 2 on axis 2 skips positions",)),
    "f1_time_stride2": (
        lambda s, x: s.conv(x.unsqueeze(1)).squeeze(2),
        lambda: nn.Conv2d(1, OUT, (FEAT, 1), stride=(1, 2)), (B, FEAT, T),
        ("stride 2 on axis 3 skips positions",)),
    "time_padding": (_call, lambda: nn.Conv1d(FEAT, OUT, 1, padding=1), (B, FEAT, T),
                     ("padding 1 on axis 2 adds positions",)),
    "f1_time_padding": (
        lambda s, x: s.conv(x.unsqueeze(1)).squeeze(2),
        lambda: nn.Conv2d(1, OUT, (FEAT, 1), padding=(0, 1)), (B, FEAT, T),
        ("padding 1 on axis 3 adds positions",)),
    "dilation_kernel3": (_call, lambda: nn.Conv1d(FEAT, OUT, 3, dilation=2), (B, FEAT, T + 4),
                         ("kernel size 3 on axis 2 mixes neighbouring positions", "dilation 2")),
    "dilated_kernel_reaches_across_features": (
        # kernel 3, dilation 2 covers all 5 rows but reads only rows 0, 2, 4
        lambda s, x: s.conv(x.unsqueeze(1)).squeeze(2),
        lambda: nn.Conv2d(1, OUT, (3, 1), dilation=(2, 1)), (B, 5, T),
        ("kernel size 3 on axis 2", "axis of size 5, dilation 2")),
    "grouped": (_call, lambda: nn.Conv1d(FEAT, 4, 1, groups=2), (B, FEAT, T),
                ("grouped convolution (groups=2) is block-diagonal",)),
    "depthwise": (_call, lambda: nn.Conv1d(FEAT, FEAT, 1, groups=FEAT), (B, FEAT, T),
                  (f"grouped convolution (groups={FEAT}) is block-diagonal",)),
    "grouped_kernel_2x1": (_call, lambda: nn.Conv2d(4, 8, (2, 1), groups=4), (B, 4, 2, T),
                           ("grouped convolution (groups=4) is block-diagonal",)),
    "functional_grouped": (
        lambda s, x: F.conv1d(x, s.conv.weight, s.conv.bias, groups=2),
        lambda: nn.Conv1d(FEAT, 4, 1, groups=2), (B, FEAT, T),
        ("grouped convolution (groups=2) is block-diagonal",)),
    "kernel_short_of_feature_axis": (
        lambda s, x: s.conv(x.unsqueeze(1)).flatten(1, 2),
        lambda: nn.Conv2d(1, OUT, (FEAT - 1, 1)), (B, FEAT, T),
        (f"kernel size {FEAT - 1} on axis 2", f"axis of size {FEAT}")),
    "kernel_spans_every_axis": (
        _call, lambda: nn.Conv1d(FEAT, OUT, T), (B, FEAT, T), ("the kernel spans every axis",)),
    "torch_subclass_qat": (_call, _qat_conv, (B, FEAT, T),
                           (f"kernel is {COMPUTED} (fused_moving_avg_obs_fake_quant)",)),
    "weight_norm": (_call, _weight_normed, (B, FEAT, T), (f"kernel is {COMPUTED} (_weight_norm)",)),
    "kernel_from_input": (
        lambda s, x: F.conv1d(x, s.conv.weight * x.mean(), s.conv.bias),
        lambda: nn.Conv1d(FEAT, OUT, 1), (B, FEAT, T),
        ("the kernel is computed from the input",)),
    "bias_from_input": (
        lambda s, x: F.conv1d(x, s.conv.weight, s.conv.bias * x.mean()),
        lambda: nn.Conv1d(FEAT, OUT, 1), (B, FEAT, T), ("the bias is computed from the input",)),
}


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_conv_near_miss_is_rejected_with_reason(name: str) -> None:
    fn, factory, shape, words = NEGATIVE[name]
    model = Holder(fn, factory()).eval()
    x = sample(shape)
    report = tdd_fx.audit(model, (x,))
    assert report.sites, f"{name}: the near-miss should be reported"
    assert all(s.pattern == "conv" and s.status == "rejected" for s in report.sites), str(report)
    assert any(all(w in s.reason for w in words) for s in report.sites), str(report)
    opt = tdd_fx.optimize(model, (x,))
    assert not opt.tdd_report.rewritten, str(opt.tdd_report)
    assert all(s.status == "rejected" for s in opt.tdd_report.sites)
    # nothing rewritten: no graph is installed, the original forward runs (silently)
    assert tdd_fx.graphs(opt) == {}
    assert list(opt.state_dict()) == list(model.state_dict())
    # parameters and buffers (the QAT observers) are the model's own objects, buffers still
    # buffers
    assert dict(opt.named_parameters()).keys() == dict(model.named_parameters()).keys()
    for k, v in opt.named_parameters():
        assert v is dict(model.named_parameters())[k]
    for k, v in opt.named_buffers():
        assert v is dict(model.named_buffers())[k]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_equivalent(opt, model, (x,))


def test_hooked_conv_keeps_its_own_code_and_hook() -> None:
    """A module with Python hooks is never captured into a graph (the graph would compute what
    the hook returns but never run the hook itself): the conv is left as it is, the report says
    why, and the hook keeps applying, in both modes and at other sizes."""
    for pre in (False, True):
        model = Holder(_call, _hooked(pre))
        x = sample((B, FEAT, T))
        opt = tdd_fx.optimize(model, (x,))
        assert not opt.tdd_report.rewritten, str(opt.tdd_report)
        assert any("has Python hooks" in n for n in opt.tdd_report.notes), str(opt.tdd_report)
        for inp in (x, sample((B + 3, FEAT, T + 4), seed=2)):
            plain = F.conv1d(inp * 3 if pre else inp, model.conv.weight, model.conv.bias)
            expected = plain if pre else plain * 2
            torch.testing.assert_close(opt(inp), expected)
        opt.train()
        torch.testing.assert_close(opt(x), model.train()(x))


def test_side_effect_of_a_hook_still_happens() -> None:
    seen: list[tuple[int, ...]] = []
    conv = nn.Conv1d(FEAT, OUT, 1)
    conv.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    model = Holder(_call, conv).eval()
    x = sample((B, FEAT, T))
    opt = tdd_fx.optimize(model, (x,))
    seen.clear()
    opt(x)
    assert seen == [(B, OUT, T)]


def test_user_subclass_keeps_its_own_forward() -> None:
    """A user-defined subclass is traced through: the conv inside is rewritten, and the
    subclass' extra arithmetic survives."""
    model = Holder(_call, PlainConvSubclass(FEAT, OUT, 1))
    x = sample((B, FEAT, T))
    opt = tdd_fx.optimize(model, (x,))
    assert [s.status for s in opt.tdd_report.sites] == ["rewritten"], str(opt.tdd_report)
    (node,) = canonical_nodes(tdd_fx.graph_of(opt))
    assert [u.target for u in node.users] == [aten.mul.Tensor]
    assert_equivalent(opt, model, (x,))
    bigger = sample((B + 3, FEAT, T + 4), seed=2)
    torch.testing.assert_close(_run_optimized(opt, bigger), model(bigger))


def test_fresh_qat_conv_is_rejected_not_crashing() -> None:
    """A QAT conv whose observers have not run yet (size-0 min/max buffers): the kernel is
    fake-quantised in forward, so the site is rejected; the model is left as it was (buffer
    shapes and values), and the optimized module updates the observers as the original does."""
    from torch.ao.quantization import get_default_qat_qconfig

    for training in (False, True):
        conv = torch.ao.nn.qat.Conv1d(FEAT, OUT, 1, qconfig=get_default_qat_qconfig())
        model = Holder(_call, conv).train(training)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        x = sample((B, FEAT, T))
        report = tdd_fx.audit(model, (x,))
        assert [s.status for s in report.sites] == ["rejected"], str(report)
        assert "fake_quant" in report.sites[0].reason and COMPUTED in report.sites[0].reason
        opt = tdd_fx.optimize(model, (x,))
        assert [s.status for s in opt.tdd_report.sites] == ["rejected"], str(opt.tdd_report)
        after = model.state_dict()
        assert list(after) == list(before)
        for k, v in before.items():
            assert after[k].shape == v.shape and torch.equal(after[k], v), k
        reference = copy.deepcopy(model)
        torch.testing.assert_close(opt(x), reference(x))
        for (k, a), (_, b) in zip(opt.state_dict().items(), reference.state_dict().items()):
            torch.testing.assert_close(a, b, msg=k)


def test_spatial_cnn_is_not_a_site() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    x = sample((B, 3, 8, 8))
    assert tdd_fx.audit(model, (x,)).sites == []
    opt = tdd_fx.optimize(model, (x,))
    assert opt.tdd_report.sites == []
    assert tdd_fx.graphs(opt) == {}  # the original forward runs
    torch.testing.assert_close(opt(x), model(x))


def test_mixed_model_rewrites_only_the_pointwise_conv() -> None:
    """A 3x3 conv next to a 1x1 conv: only the 1x1 becomes a canonical node."""
    model = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.ReLU(), nn.Conv2d(C, OUT, 1)).eval()
    x = sample((B, C, 5, 5))
    opt = tdd_fx.optimize(model, (x,))
    assert [(s.pattern, s.status, s.module) for s in opt.tdd_report.sites] == [
        ("conv", "rewritten", "2")], str(opt.tdd_report)
    gm = tdd_fx.graph_of(opt)
    assert [node_module_path(n) for n in conv_nodes(gm)] == ["0"], gm.code
    assert [node_module_path(n) for n in canonical_nodes(gm)] == ["2"], gm.code
    assert_equivalent(opt, model, (x,))


# --- default kernels of pointwise convs and stems -------------------------------------------
class _PointwisePair(nn.Module):
    def __init__(self, f: int, o: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv1d(f, o, 1), nn.Conv1d(o, f, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(torch.relu(self.a(x)))


class _Stem(nn.Module):
    def __init__(self, f: int, o: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, o, (f, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x.unsqueeze(1)).squeeze(2))


def _kernels(opt: nn.Module) -> list[str]:
    return [s.kernel for s in opt.tdd_report.sites if s.status == "rewritten"]


def _graph_kernels(opt: nn.Module, mode: str) -> list[str]:
    return [n.kwargs["impl"] for n in tdd_fx.graph_of(opt, mode=mode).graph.nodes
            if n.target is time_distributed_dense]


@pytest.mark.parametrize(("f", "o", "dtype", "want"), [
    (40, 64, torch.float32, "baddbmm"),  # small weight, float32, eval: baddbmm (speculative)
    (128, 256, torch.float32, "conv"),  # large weight: the conv's own kernel
    (40, 64, torch.bfloat16, "conv"),  # reduced precision: the conv's own kernel
])
def test_pointwise_conv_default_kernel(f: int, o: int, dtype: torch.dtype, want: str) -> None:
    """In the eval-mode graph, ``want``; in the training graph always the conv's own kernel
    (bit-identical: batch statistics would amplify another summation order)."""
    torch.manual_seed(0)
    model = _PointwisePair(f, o).to(dtype).eval()
    x = torch.randn(4, f, 9, dtype=dtype)
    opt = tdd_fx.optimize(model, (x,))
    assert _kernels(opt) == [want, want], str(opt.tdd_report)
    # the report names the training graph's kernel where it differs
    other = "" if want == "conv" else "conv (train)"
    assert [s.kernel_other for s in opt.tdd_report.rewritten] == [other, other]
    assert other in str(opt.tdd_report)
    assert _graph_kernels(opt, "eval") == [want, want]
    assert _graph_kernels(opt, "train") == ["conv", "conv"]
    assert_equivalent(opt, model, (x,))
    opt.train(), model.train()
    xg = x.clone().requires_grad_()
    y_opt, y_ref = opt(xg), model(xg.clone())
    assert torch.equal(y_opt, y_ref)  # the training graph runs the convs themselves


@pytest.mark.parametrize(("f", "o", "dtype", "want"), [
    (40, 64, torch.float32, {"eval": "baddbmm", "train": "baddbmm"}),
    (128, 256, torch.float32, {"eval": "conv_span", "train": "conv"}),
    (40, 64, torch.bfloat16, {"eval": "conv_span", "train": "conv_span"}),  # CPUs disagree
])
def test_spectrogram_stem_default_kernel(f: int, o: int, dtype: torch.dtype,
                                         want: dict[str, str]) -> None:
    torch.manual_seed(0)
    model = _Stem(f, o).to(dtype).eval()
    x = torch.randn(4, f, 9, dtype=dtype)
    opt = tdd_fx.optimize(model, (x,))
    assert _kernels(opt) == [want["eval"]], str(opt.tdd_report)
    for mode in ("eval", "train"):
        assert _graph_kernels(opt, mode) == [want[mode]]
    assert_equivalent(opt, model, (x,))
    if want["eval"] == "conv_span":  # the stem's own conv2d: bit-identical, gradients included
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = opt(xa), model(xb)
        assert torch.equal(ya, yb)
        g = torch.randn_like(ya)
        ga = torch.autograd.grad(ya, (xa, *model.parameters()), g)
        gb = torch.autograd.grad(yb, (xb, *model.parameters()), g)
        assert all(torch.equal(a, b) for a, b in zip(ga, gb))
        # the executable graph hands conv2d the stem's own (O, 1, F, 1) weight
        (program,) = [p for m in opt.modules() for p in tdd_fx.program.programs_of(m)
                      if not p.training]
        code = program.graph_fn().__self__.code
        assert "stem_conv2d(" in code and "reshape" not in code, code


def test_speculative_kernel_that_fails_verification_falls_back_to_the_convs_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``baddbmm`` traded for a pointwise conv's own kernel is checked like any rewrite: when
    the program with it does not verify, every site is rebuilt with its conv and verified again
    (no site is lost to a kernel's numerics), and the report says so."""
    import tdd_fx.lower as lower

    def off(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(b.unsqueeze(-1), w.expand(x.shape[0], -1, -1), x) * 1.01

    monkeypatch.setattr(lower, "_baddbmm_bias", off)
    torch.manual_seed(0)
    model = _PointwisePair(40, 64).eval()
    x = torch.randn(4, 40, 9)
    opt = tdd_fx.optimize(model, (x,))
    report = opt.tdd_report
    assert _kernels(opt) == ["conv", "conv"], str(report)
    assert not report.rolled_back, str(report)
    assert any("baddbmm in place of conv did not verify" in n for n in report.notes), str(report)
    assert_equivalent(opt, model, (x,))
