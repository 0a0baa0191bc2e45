"""The canonical operation, its kernels, the TimeDistributed layer, and the entry guards."""

from __future__ import annotations

import copy
import warnings

import pytest
import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F
from conftest import assert_equivalent
from torch import nn
from zoo import Literal, Wrap

import tdd_fx
from tdd_fx.ops import KERNELS, MIRRORS, check_input, choose_kernel, time_distributed_dense


def reference(x, w, b, d):
    return F.linear(x.movedim(d, -1), w, b).movedim(-1, d)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# (input shape, feature_dim as written, positive feature axis)
LAYOUTS = [
    ((3, 5, 6), -1, 2),  # channel-last 3-D
    ((3, 5, 6), 2, 2),
    ((3, 6, 5), 1, 1),  # channel-first 3-D
    ((3, 6, 5), -2, 1),
    ((2, 3, 4, 6), -1, 3),  # channel-last 4-D
    ((2, 6, 3, 4), 1, 1),  # channel-first 4-D (image-like)
    ((2, 3, 6, 4), 2, 2),  # features in the middle of 4-D
    ((6, 7), 0, 0),  # features first, 2-D
]


def _check_against_reference(fn, shape, d, bias: bool) -> None:
    f = shape[d]
    x = rand(*shape).requires_grad_()
    w = rand(4, f, seed=1).requires_grad_()
    b = rand(4, seed=2).requires_grad_() if bias else None
    leaves = [x, w] + ([b] if bias else [])
    y = fn(x, w, b)
    want = reference(x, w, b, d)
    assert y.shape == want.shape
    torch.testing.assert_close(y, want)
    cot = rand(*want.shape, seed=3)
    got_g = torch.autograd.grad(y, leaves, cot)
    want_g = torch.autograd.grad(want, leaves, cot)
    for g1, g2 in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(g1, g2)


def _off_last_axis_linear(impl: str, shape: tuple, d: int) -> bool:
    return impl == "linear" and d != len(shape) - 1


def kernel_cases() -> list:
    """Every kernel x layout."""
    return [pytest.param(impl, shape, fd, d, id=f"{impl}-{'x'.join(map(str, shape))}-fd{fd}")
            for impl in sorted(KERNELS) for shape, fd, d in LAYOUTS]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("impl,shape,fd,d", kernel_cases())
def test_time_distributed_dense_every_kernel(impl, shape, fd, d, bias):
    _check_against_reference(
        lambda x, w, b: time_distributed_dense(x, w, b, feature_dim=fd, impl=impl), shape, d, bias)


@pytest.mark.parametrize("impl,shape,fd,d", kernel_cases())
def test_pointwise_conv_weight_is_the_same_map_for_every_kernel(impl, shape, fd, d):
    """A pointwise convolution's ``(out, in, 1, ...)`` weight, passed as it is (what the conv
    family emits for the ``conv`` kernel), computes what its ``(out, in)`` view computes; its
    gradient reaches the 3-D parameter."""
    _check_against_reference(
        lambda x, w, b: time_distributed_dense(x, w[(...,) + (None,) * (len(shape) - 2)], b,
                                               feature_dim=fd, impl=impl), shape, d, True)


def test_a_weight_with_a_real_kernel_is_refused():
    x, w = rand(2, 3, 5), rand(4, 3, 3)
    with pytest.raises(ValueError, match=r"neither \(out, in\) nor a pointwise"):
        time_distributed_dense(x, w, None, feature_dim=1, impl="conv")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("impl,shape,fd,d", kernel_cases())
def test_kernel_called_directly(impl, shape, fd, d, bias):
    """Each kernel is correct on its own, also for the last axis (which the dispatcher sends
    to F.linear), so any kernel may be chosen anywhere."""
    kernel = KERNELS[impl]
    _check_against_reference(lambda x, w, b: kernel(x, w, b, d), shape, d, bias)


@pytest.mark.parametrize("impl", sorted(set(KERNELS) - {"linear"}))
def test_kernels_on_float32_and_noncontiguous_input(impl):
    x = torch.randn(4, 7, 6).transpose(1, 2)  # (4, 6, 7), features on axis 1, not contiguous
    w, b = torch.randn(3, 6), torch.randn(3)
    want = reference(x, w, b, 1)
    got = time_distributed_dense(x, w, b, feature_dim=1, impl=impl)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_kernel_off_the_last_axis(bias):
    """The layouts left out of the sweeps above, for impl='linear' (dispatcher and kernel)."""
    for shape, fd, d in LAYOUTS:
        if not _off_last_axis_linear("linear", shape, d):
            continue
        _check_against_reference(
            lambda x, w, b, fd=fd: time_distributed_dense(x, w, b, feature_dim=fd, impl="linear"),
            shape, d, bias)
        _check_against_reference(lambda x, w, b, d=d: KERNELS["linear"](x, w, b, d), shape, d, bias)


def test_linear_kernel_off_the_last_axis_is_not_silently_wrong():
    """(B, F, T) with F == T: the 'linear' kernel runs without error on the wrong axis."""
    x, w = rand(2, 6, 6), rand(4, 6, seed=1)
    want = reference(x, w, None, 1)
    try:
        got = time_distributed_dense(x, w, None, feature_dim=1, impl="linear")
    except Exception:  # refusing would be acceptable too; a silent wrong result is not
        return
    torch.testing.assert_close(got, want)


def test_unknown_kernel_is_an_error_off_the_last_axis():
    with pytest.raises(KeyError):
        time_distributed_dense(torch.randn(2, 3, 4), torch.randn(5, 3), None, feature_dim=1,
                               impl="no-such-kernel")


def test_choose_kernel_heuristic():
    assert choose_kernel(-1, 3) == "linear"
    assert choose_kernel(2, 3) == "linear"
    assert choose_kernel(1, 3, "cpu") in KERNELS
    assert choose_kernel(1, 3, "cpu") != "linear"  # 'linear' alone is channel-last only
    assert choose_kernel(1, 3, "cuda") in KERNELS
    assert choose_kernel(1, 4) in KERNELS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("prefer", sorted(MIRRORS - {"addmm", "conv_span"}))
def test_choose_kernel_keeps_the_replaced_codes_own_kernel(prefer, dtype):
    """Never slower by default: a site whose hand-written code *was* one of the kernels keeps
    it (off the last axis; on it, ``linear`` is ``nn.Linear`` itself)."""
    assert choose_kernel(1, 3, "cpu", prefer=prefer, dtype=dtype) == prefer
    assert choose_kernel(1, 4, "cpu", prefer=prefer, dtype=dtype) == prefer
    assert choose_kernel(1, 3, "cuda", prefer=prefer, dtype=dtype) == prefer
    assert choose_kernel(2, 3, "cpu", prefer=prefer, dtype=dtype) == "linear"


def test_choose_kernel_for_the_spectrogram_stem():
    """``Conv2d(1, O, (F, 1))`` keeps its own ``conv2d`` (``conv_span``) where CPUs disagreed or
    nothing was measured (bfloat16, CUDA); on CPU in float32 ``baddbmm`` for a small weight
    (ahead of it on both CPUs), and for a larger one ``conv`` in a training graph (the stem's
    own backward is several times slower) and its own ``conv_span`` otherwise."""
    for dtype in (torch.bfloat16, torch.float16):
        assert choose_kernel(1, 3, "cpu", prefer="conv_span", dtype=dtype, size=(40, 64)) == \
            "conv_span"
    assert choose_kernel(1, 3, "cuda", prefer="conv_span", dtype=torch.float32,
                         size=(40, 64)) == "conv_span"
    assert choose_kernel(1, 3, "cpu", prefer="conv_span", dtype=torch.float32,
                         size=(40, 64)) == "baddbmm"
    large = {"prefer": "conv_span", "dtype": torch.float32, "size": (128, 256)}
    assert choose_kernel(1, 3, "cpu", **large) == "conv_span"  # mode unknown
    for training, want in ((True, "conv"), (False, "conv_span")):
        with tdd_fx.ops.kernel_policy(speculate=not training, training=training):
            assert choose_kernel(1, 3, "cpu", **large) == want
    assert choose_kernel(2, 3, "cpu", prefer="conv_span", dtype=torch.bfloat16) == "linear"


def test_conv_span_is_the_stems_own_conv2d():
    """Bit-identical to ``Conv2d(1, O, (F, 1))`` on the unsqueezed input, gradients included."""
    torch.manual_seed(0)
    stem = torch.nn.Conv2d(1, 6, (5, 1)).to(torch.bfloat16)
    x = torch.randn(3, 5, 7, dtype=torch.bfloat16, requires_grad=True)
    ref = stem(x.unsqueeze(1)).squeeze(2)
    got = KERNELS["conv_span"](x, stem.weight.reshape(6, -1), stem.bias, 1)
    assert torch.equal(ref, got)
    g = torch.randn_like(ref)
    ga = torch.autograd.grad(ref, (x, stem.weight, stem.bias), g)
    gb = torch.autograd.grad(got, (x, stem.weight, stem.bias), g)
    assert all(torch.equal(a, b) for a, b in zip(ga, gb))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_choose_kernel_keeps_gpt2s_addmm_on_the_last_axis(dtype):
    """GPT-2's ``Conv1D`` ran ``addmm`` on its (in, out) weight: kept, features last."""
    assert choose_kernel(-1, 3, "cpu", prefer="addmm", dtype=dtype) == "addmm"
    assert choose_kernel(2, 3, "cpu", prefer="addmm", dtype=dtype) == "addmm"
    assert choose_kernel(1, 3, "cpu", prefer="addmm", dtype=dtype) != "addmm"


def test_choose_kernel_without_a_mirror_follows_the_measurements():
    """A site whose code was no kernel (a spanning conv stem): on CPU, 3-D channel-first
    float32 runs ``baddbmm`` for a small weight (F * O <= 64 * 64: faster than a pointwise conv
    on both CPUs measured) and ``conv`` for a larger or unknown one (``baddbmm`` fell behind it
    at (128, 256) on one of them), bfloat16 ``conv``; CUDA ``conv``; 4-D float32 ``conv``."""
    small, large = (40, 64), (128, 256)
    assert choose_kernel(1, 3, "cpu", dtype=torch.float32, size=small) == "baddbmm"
    assert choose_kernel(1, 3, "cpu", dtype=torch.float64, size=(64, 64)) == "baddbmm"
    assert choose_kernel(1, 3, "cpu", dtype=torch.float32, size=(64, 65)) == "conv"
    assert choose_kernel(1, 3, "cpu", dtype=torch.float32, size=large) == "conv"
    assert choose_kernel(1, 3, "cpu", dtype=torch.float32) == "conv"  # size unknown
    assert choose_kernel(1, 3, "cpu", dtype=torch.float32, size=(sympy.Symbol("s0"), 4)) == "conv"
    assert choose_kernel(1, 3, "cpu", dtype=torch.bfloat16, size=small) == "conv"
    assert choose_kernel(1, 3, "cuda", dtype=torch.float32, size=small) == "conv"
    assert choose_kernel(1, 4, "cpu", dtype=torch.float32, size=small) == "conv"
    assert choose_kernel(1, 4, "cpu", dtype=torch.bfloat16) == "linear_t"


def test_addmm_kernel_runs_the_stored_in_out_weight_as_it_is():
    """The ``addmm`` kernel gets ``W.t()`` of a stored ``(in, out)`` weight and multiplies by
    ``W`` itself: GPT-2's own computation, bit for bit."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, generator=g)
    w_in_out = torch.randn(4, 3, generator=g)
    b = torch.randn(3, generator=g)
    want = torch.addmm(b, x.view(-1, 4), w_in_out).view(2, 5, 3)
    got = time_distributed_dense(x, w_in_out.t(), b, impl="addmm")
    assert torch.equal(got, want)
    empty = time_distributed_dense(x[:0], w_in_out.t(), b, impl="addmm")
    assert empty.shape == (0, 5, 3)


# --------------------------------------------------------------------------------------------
# TimeDistributed


def per_step(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([module(x[:, t]) for t in range(x.shape[1])], 1)


def test_time_distributed_linear_equals_linear():
    lin = nn.Linear(6, 4).double()
    td = tdd_fx.TimeDistributed(lin)
    x = rand(3, 5, 6).requires_grad_()
    y = td(x)
    assert y.shape == (3, 5, 4)
    want = lin(x)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(y, per_step(lin, x))
    g1 = torch.autograd.grad(y.sum(), [x, lin.weight, lin.bias])
    g2 = torch.autograd.grad(want.sum(), [x, lin.weight, lin.bias])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    # the same Parameters
    assert list(td.parameters()) == [lin.weight, lin.bias]
    assert list(td.state_dict()) == ["module.weight", "module.bias"]


def test_time_distributed_linear_on_4d_steps():
    lin = nn.Linear(6, 4).double()
    x = rand(2, 3, 5, 6)
    torch.testing.assert_close(tdd_fx.TimeDistributed(lin)(x), per_step(lin, x))


def test_time_distributed_sequential_folds_time_into_batch():
    seq = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    td = tdd_fx.TimeDistributed(seq)
    x = rand(3, 5, 6)
    y = td(x)
    assert y.shape == (3, 5, 2)
    torch.testing.assert_close(y, per_step(seq, x))
    torch.testing.assert_close(y, seq(x.flatten(0, 1)).unflatten(0, (3, 5)))


def test_time_distributed_conv1d_per_step():
    conv = nn.Conv1d(4, 3, kernel_size=3, padding=1).double()
    td = tdd_fx.TimeDistributed(conv)
    x = rand(2, 5, 4, 7)  # (B, T, C, L): a Conv1d on each of the T steps
    y = td(x)
    assert y.shape == (2, 5, 3, 7)
    torch.testing.assert_close(y, per_step(conv, x))


def test_time_distributed_rejects_non_modules():
    with pytest.raises(TypeError, match="Module"):
        tdd_fx.TimeDistributed(lambda x: x)


def test_time_distributed_linear_subclass_is_not_short_circuited():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    layer = Scaled(6, 4).double()
    x = rand(3, 5, 6)
    torch.testing.assert_close(tdd_fx.TimeDistributed(layer)(x), per_step(layer, x))


def test_time_distributed_linear_runs_the_inner_layers_hooks():
    lin = nn.Linear(6, 4).double()
    seen = []
    lin.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    lin.register_forward_pre_hook(lambda m, i: (i[0] * 0,))
    x = rand(3, 5, 6)
    y = tdd_fx.TimeDistributed(lin)(x)
    assert seen, "forward hook of the inner Linear never ran"
    torch.testing.assert_close(y, per_step(lin, x))


def test_time_distributed_linear_traces_to_the_canonical_node():
    td = tdd_fx.TimeDistributed(nn.Linear(6, 4))
    gm = fx.symbolic_trace(td)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls] == [tdd_fx.time_distributed_dense]
    assert not any(n.op == "call_module" for n in gm.graph.nodes)
    x = torch.randn(3, 5, 6)
    torch.testing.assert_close(gm(x), td(x))
    assert set(dict(gm.named_parameters())) == {"module.weight", "module.bias"}


def test_canonical_node_in_a_user_graph_gets_its_own_node():
    def f(x, w, b):
        return time_distributed_dense(torch.relu(x), w, b, feature_dim=1, impl="linear_t")

    gm = fx.symbolic_trace(f)
    node = next(n for n in gm.graph.nodes if n.target is tdd_fx.time_distributed_dense)
    assert node.kwargs == {"feature_dim": 1, "impl": "linear_t"}
    x, w, b = torch.randn(2, 6, 5), torch.randn(3, 6), torch.randn(3)
    torch.testing.assert_close(gm(x, w, b), reference(torch.relu(x), w, b, 1))


class UsesTD(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = tdd_fx.TimeDistributed(nn.Linear(6, 8))
        self.out = tdd_fx.TimeDistributed(nn.Linear(8, 3))

    def forward(self, x):
        return self.out(torch.relu(self.inp(x)))


def test_optimize_of_time_distributed_model_is_left_alone_or_rewritten():
    """A model already written with ``tdd_fx.TimeDistributed``: its dense ops are canonical
    already.  Whether optimize leaves it alone or rewrites it, nothing is rolled back, the result
    is equivalent, and a rewrite keeps exactly one canonical node per layer."""
    model = UsesTD()
    inputs = (torch.randn(3, 5, 6),)
    opt = tdd_fx.optimize(model, inputs)
    report = opt.tdd_report
    assert report.rolled_back == []
    assert type(opt) is UsesTD
    assert list(opt.state_dict()) == list(model.state_dict())
    assert [id(p) for p in opt.parameters()] == [id(p) for p in model.parameters()]
    assert_equivalent(opt, model, inputs)
    if report.rewritten:
        assert report.verified is True
        graph = tdd_fx.graph_of(opt)
        assert sum(n.target is tdd_fx.time_distributed_dense for n in graph.graph.nodes) == 2
    else:
        assert tdd_fx.graphs(opt) == {}  # left alone: its own code runs
        assert "forward" not in opt.__dict__
        assert tdd_fx.audit(model, inputs).rewritten == []
    other = torch.randn(2, 9, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(opt(other), model(other))


# --------------------------------------------------------------------------------------------
# guards


def test_guard_rejects_another_rank_with_a_clear_message():
    model = Wrap(nn.Linear(6, 4))
    opt = tdd_fx.optimize(model, (torch.randn(3, 5, 6),))
    assert len(opt.tdd_report.rewritten) == 1
    x4 = torch.randn(2, 3, 5, 6)
    expected = model(x4)  # the original accepts it (and gives (2, 15, 4))
    with pytest.warns(RuntimeWarning) as record:
        got = opt(x4)  # the guard fails: the original runs instead, with one warning
    torch.testing.assert_close(got, expected)
    msg = str(record[0].message)
    assert "4-D" in msg and "captured as 3-D" in msg and "original forward" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only (per reason)
        x4b = torch.randn(1, 2, 7, 6)
        torch.testing.assert_close(opt(x4b), model(x4b))
    x2 = torch.randn(3, 6)  # another reason (another rank): its own warning, once
    with pytest.warns(RuntimeWarning, match="2-D .*captured as 3-D"):
        torch.testing.assert_close(opt(x2), model(x2))
    # a deep copy keeps the fallback (it was a GuardError before): the original runs
    copied = copy.deepcopy(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the copy carries the "warned once" record along
        torch.testing.assert_close(copied(x4), expected)
    # the right rank with other sizes is fine
    x = torch.randn(7, 2, 6)
    torch.testing.assert_close(opt(x), model(x))


def test_guard_error_is_a_runtime_error():
    assert issubclass(tdd_fx.GuardError, RuntimeError)


def test_literal_sizes_are_guarded():
    model = Literal()
    x = torch.randn(4, 10, 16)
    opt = tdd_fx.optimize(model, (x,))
    assert len(opt.tdd_report.rewritten) == 1
    assert any("== 4" in g or "== 40" in g for g in opt.tdd_report.guards)
    torch.testing.assert_close(opt(x), model(x))
    other = torch.randn(2, 20, 16)
    expected = model(other)
    assert expected.shape == (4, 10, 8)  # the original regroups rows
    with pytest.warns(RuntimeWarning, match="relied on"):
        torch.testing.assert_close(opt(other), expected)  # the original ran: same answer


def test_check_input_directly():
    x = torch.zeros(2, 3, 4)
    assert check_input(x, 3, (((0, 1), 6),), "x") is x
    with pytest.raises(tdd_fx.GuardError, match=r"x\.shape\[0\]\*x\.shape\[1\] == 6, got 8"):
        check_input(torch.zeros(2, 4, 4), 3, (((0, 1), 6),), "x")
    with pytest.raises(tdd_fx.GuardError, match="'x' was optimized for 3-D"):
        check_input(torch.zeros(2, 3), 3, (), "x")
