"""tdd_fx on real models from transformers, timm, speechbrain, pytorch-forecasting and asteroid,
built tiny with random weights by ``thirdparty_models.py`` (which says how they are installed,
and skips a model whose package cannot be imported, with the reason).

Only the public API is used: ``tdd_fx.optimize`` / ``tdd_fx.audit`` with ``example_inputs`` and
``example_kwargs``, the report's sites (``pattern``, ``status``, ``where``), and the returned
module.  Expected sites are counted here from the models' own modules, independently of tdd_fx.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import thirdparty_models as tm
import torch
from torch import nn
from torch.utils import _pytree as pytree

import tdd_fx

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# helpers


def module_of(site) -> str:
    """The module path of a site (``where`` reads ``path (file.py:line)``)."""
    return getattr(site, "module", "") or site.where.split(" (")[0]


def sites(report, pattern: str | None = None, status: str | None = None) -> set[str]:
    return {module_of(s) for s in report.sites
            if (pattern is None or s.pattern == pattern) and (status is None or s.status == status)}


def _fresh(tree):
    """A copy of the inputs: floating tensors become new leaves that require grad."""
    def leaf(x):
        if isinstance(x, torch.Tensor):
            x = x.detach().clone()
            return x.requires_grad_(x.is_floating_point())
        return x
    return pytree.tree_map(leaf, tree)


def outputs_and_grads(model: nn.Module, args: tuple, kwargs: dict, seed: int = 0):
    args, kwargs = _fresh((args, kwargs))
    torch.manual_seed(seed)
    out = model(*args, **kwargs)
    outs = [o for o in pytree.tree_leaves(out)
            if isinstance(o, torch.Tensor) and o.is_floating_point()]
    assert outs, f"no floating outputs in {type(out).__name__}"
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)
    leaves = [p for p in model.parameters() if p.requires_grad]
    leaves += [x for x in pytree.tree_leaves((args, kwargs))
               if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [o.detach() for o in outs], grads


def assert_same(opt: nn.Module, model: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
    """The optimized module computes the original's outputs and parameter/input gradients: equal
    within ``assert_close``'s float32 tolerance, or — where a site runs another kernel than the
    original (a pointwise ``Conv1d`` as ``baddbmm``: another summation order) — no further from a
    float64 run of the original than 4x the original's own float32 error (the verification's
    criterion; a wrong rewrite is off by the values' own size)."""
    kwargs = kwargs or {}
    want_out, want_grads = outputs_and_grads(model, args, kwargs)
    got_out, got_grads = outputs_and_grads(opt, args, kwargs)
    assert len(got_out) == len(want_out)
    assert len(got_grads) == len(want_grads)
    pairs = list(zip(got_out, want_out)) + list(zip(got_grads, want_grads))
    for got, want in pairs:
        assert (got is None) == (want is None)
    try:
        for got, want in pairs:
            if got is not None:
                torch.testing.assert_close(got, want)
    except AssertionError:
        _assert_within_float32_error(pairs, model, args, kwargs)


def _assert_within_float32_error(pairs: list, model: nn.Module, args: tuple, kwargs: dict) -> None:
    """The verification's rule (``tdd_fx.verify.compare``), here on the test's own inputs and
    cotangent: each tensor's error against a float64 run of the original may exceed the
    original's own float32 error by at most 3x it (plus float32 noise on the model's scale)."""
    from tdd_fx.verify import compare

    m64 = copy.deepcopy(model).double()
    to64 = pytree.tree_map(lambda x: x.double() if isinstance(x, torch.Tensor)
                           and x.is_floating_point() else x, (args, kwargs))
    ref_out, ref_grads = outputs_and_grads(m64, *to64)
    refs = list(ref_out) + list(ref_grads)
    keep = [i for i, (got, _) in enumerate(pairs) if got is not None]
    names = {i: f"output[{i}]" if i < len(ref_out) else f"grad[{i}]" for i in keep}
    verdict = compare({names[i]: pairs[i][1] for i in keep}, {names[i]: pairs[i][0] for i in keep},
                      {names[i]: refs[i] for i in keep})
    assert verdict.ok, verdict.detail


@contextlib.contextmanager
def mode(training: bool, *modules: nn.Module):
    before = [m.training for m in modules]
    for m in modules:
        m.train(training)
    try:
        yield
    finally:
        for m, t in zip(modules, before):
            m.train(t)


def assert_invariants(opt: nn.Module, model: nn.Module) -> None:
    assert {id(p) for p in opt.parameters()} == {id(p) for p in model.parameters()}
    assert list(opt.state_dict()) == list(model.state_dict())
    assert isinstance(opt, type(model))


def assert_clean(report) -> None:
    """Verified (or nothing to verify), and nothing rolled back."""
    assert report.verified is not False, str(report)
    assert not [s for s in report.sites if s.status == "rolled_back"], str(report)


def assert_same_both_modes(opt, model, examples) -> None:
    for training in (True, False):
        with mode(training, opt, model):
            for args, kwargs in examples:
                assert_same(opt, model, args, kwargs)


# ---------------------------------------------------------------------------------------------
# transformers: GPT2LMHeadModel (Conv1D = addmm on a folded view)


@pytest.fixture(scope="module")
def gpt2():
    model, args, kwargs = tm.gpt2_lm()
    kwargs = {**kwargs, "labels": args[0]}
    opt = tdd_fx.optimize(model, example_inputs=args, example_kwargs=kwargs)
    return model, args, kwargs, opt


def test_gpt2_every_conv1d_rewritten(gpt2):
    model, _, _, opt = gpt2
    report = opt.tdd_report
    assert_clean(report)
    assert report.verified is True, str(report)
    assert sites(report, "matmul", "rewritten") == tm.gpt2_conv1d_paths(), str(report)
    assert len(report.rewritten) == 8, str(report)


def test_gpt2_logits_loss_and_gradients(gpt2):
    model, args, kwargs, opt = gpt2
    ids = torch.randint(1, 100, (3, 9))
    other = ((ids,), {"attention_mask": torch.ones(3, 9, dtype=torch.long), "use_cache": False,
                      "labels": ids})
    assert_same_both_modes(opt, model, [(args, kwargs), other])
    with mode(False, opt, model), torch.no_grad():
        got, want = opt(*args, **kwargs), model(*args, **kwargs)
        torch.testing.assert_close(got.loss, want.loss)
        torch.testing.assert_close(got.logits, want.logits)


def test_gpt2_module_invariants_and_config(gpt2):
    model, _, _, opt = gpt2
    assert_invariants(opt, model)
    assert opt.config.to_dict() == model.config.to_dict()
    assert opt.config.n_layer == 2 and opt.get_output_embeddings() is not None


@pytest.mark.parametrize("use_cache", [True, False])
def test_gpt2_generate_greedy_same_tokens(gpt2, use_cache):
    model, args, _, opt = gpt2
    prompt = args[0][:, :6]
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
              use_cache=use_cache)
    with mode(False, opt, model), torch.no_grad():
        want = model.generate(prompt, **kw)
        got = opt.generate(prompt, **kw)
    assert torch.equal(got, want)


def test_gpt2_call_with_cache(gpt2):
    """A call outside the example (``use_cache=True``, no labels) still computes the original."""
    model, args, kwargs, opt = gpt2
    kw = {"attention_mask": kwargs["attention_mask"], "use_cache": True}
    with mode(False, opt, model), torch.no_grad():
        got, want = opt(*args, **kw), model(*args, **kw)
    torch.testing.assert_close(got.logits, want.logits)
    assert got.past_key_values is not None


# ---------------------------------------------------------------------------------------------
# timm: pointwise convolutions (1x1, stride 1, no padding, groups 1), in train and in eval mode


# Optimized in train mode, each model is then checked in both modes; optimizing in eval mode too
# (the other primary mode, reported first) is checked on mobilenetv3, whose timm BatchNormAct2d
# branches on `self.training` (efficientnet shares that layer; the others would repeat the same
# two captures, at 20-30 s each).
_TIMM_CASES = [(name, True) for name in tm.TIMM_MODELS] + [("mobilenetv3_small_100", False)]


@pytest.mark.parametrize("name,training", _TIMM_CASES,
                         ids=[f"{n}-{'train' if t else 'eval'}" for n, t in _TIMM_CASES])
def test_timm_pointwise_convs_rewritten(name, training):
    model, args, kwargs = tm.timm_model(name)
    pointwise = tm.pointwise_convs(model)
    assert pointwise, name  # every one of these networks has 1x1 convs
    model.train(training)
    opt = tdd_fx.optimize(model, example_inputs=args, example_kwargs=kwargs)
    report = opt.tdd_report
    assert_clean(report)
    assert report.verified is True, str(report)
    assert sites(report, "conv", "rewritten") == pointwise, str(report)
    assert_invariants(opt, model)
    other = ((torch.randn(3, 3, 96, 96),), {})
    # in the mode it was optimized in, then after switching both modules to the other mode; the
    # captured graphs must serve both sizes (no fallback to the original forward)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="tdd_fx: .*running the original forward")
        for mode_now in (training, not training):
            with mode(mode_now, opt, model):
                for a, k in ((args, kwargs), other):
                    assert_same(opt, model, a, k)


# ---------------------------------------------------------------------------------------------
# speechbrain


def test_ecapa_tdnn_pointwise_conv1d_rewritten():
    model, args, kwargs = tm.ecapa_tdnn()
    pointwise = tm.pointwise_convs(model)
    assert len(pointwise) == 16  # counted from the modules; see thirdparty_models.ecapa_tdnn
    opt = tdd_fx.optimize(model, example_inputs=args, example_kwargs=kwargs)
    report = opt.tdd_report
    assert_clean(report)
    assert sites(report, "conv", "rewritten") == pointwise, str(report)
    # the dilated (kernel 5/3) and Res2Net convs are real convolutions
    assert not sites(report, "conv", "rewritten") & (tm.convs(model) - pointwise), str(report)
    assert_invariants(opt, model)
    # batch stays 2: under export speechbrain's length_to_mask specializes it (len(length))
    assert_same_both_modes(opt, model, [(args, kwargs), ((torch.randn(2, 37, 40),), {})])


def test_speechbrain_linear_combine_dims():
    """``Linear(combine_dims=True)`` reshapes (B, T, 3, 4) -> (B, T, 12) before ``nn.Linear``:
    the leading (B, T) axes are kept, so it is the dense map over the two merged feature axes at
    every position (issue 13, item 6): rewritten, and the result is still the original's."""
    model, args, kwargs = tm.speechbrain_linear()
    opt = tdd_fx.optimize(model, example_inputs=args, example_kwargs=kwargs)
    report = opt.tdd_report
    assert_clean(report)
    assert sites(report) <= {"w"}, str(report)
    assert [s.module for s in report.rewritten] == ["w"], str(report)
    assert_invariants(opt, model)
    assert_same_both_modes(opt, model, [(args, kwargs), ((torch.randn(3, 7, 3, 4),), {})])


# ---------------------------------------------------------------------------------------------
# pytorch-forecasting (TFT sub-modules and the whole TFT)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_major"])
def test_pf_time_distributed_linear_rewritten(batch_first):
    model, args, kwargs = tm.pf_time_distributed(batch_first=batch_first)
    opt = tdd_fx.optimize(model, example_inputs=args, example_kwargs=kwargs)
    report = opt.tdd_report
    assert_clean(report)
    assert report.verified is True, str(report)
    assert {(s.pattern, module_of(s), s.status) for s in report.sites} == \
        {("reshape", "module", "rewritten")}, str(report)
    assert_invariants(opt, model)
    other = (torch.randn(2, 7, 6),) if batch_first else (torch.randn(7, 2, 6),)
    assert_same_both_modes(opt, model, [(args, kwargs), (other, {})])


def test_pf_time_distributed_audit_leaves_the_model_alone():
    model, args, kwargs = tm.pf_time_distributed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = tdd_fx.audit(model, example_inputs=args, example_kwargs=kwargs)
    assert {(s.pattern, module_of(s), s.status) for s in report.sites} == \
        {("reshape", "module", "found")}, str(report)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _every_provable_site_rewritten(opt: nn.Module, model: nn.Module) -> None:
    """Whatever is found is rewritten and verified; only dense layers are rewritten."""
    report = opt.tdd_report
    assert_clean(report)
    assert not [s for s in report.sites if s.status == "found"], str(report)
    assert sites(report, status="rewritten") <= tm.linears(model), str(report)
    assert_invariants(opt, model)


@pytest.mark.parametrize("factory", ["pf_grn", "pf_variable_selection"])
def test_pf_tft_modules_every_provable_site_rewritten(factory):
    """The GRN and the variable selection network apply ``nn.Linear`` to 3-D tensors directly
    (already one dense op per position), interpolate folded rows (``TimeDistributedInterpolation``
    in ``ResampleNorm``) and select among distinct per-variable networks."""
    model, args, kwargs = tm.FACTORIES[factory]()
    opt = tdd_fx.optimize(model, example_inputs=args, example_kwargs=kwargs)
    _every_provable_site_rewritten(opt, model)
    assert_same_both_modes(opt, model, [(args, kwargs)])


@pytest.fixture(scope="module")
def pf_tft():
    model, args, kwargs = tm.pf_tft()
    return model, args, kwargs, tdd_fx.optimize(model, example_inputs=args, example_kwargs=kwargs)


def test_pf_tft_every_provable_site_rewritten(pf_tft):
    """The whole TFT (a dict batch in, a namedtuple out; not exportable whole, see
    ``thirdparty_models.pf_tft``)."""
    model, args, kwargs, opt = pf_tft
    _every_provable_site_rewritten(opt, model)
    assert_same_both_modes(opt, model, [(args, kwargs)])


def test_pf_tft_other_sizes(pf_tft):
    """Another batch size and other encoder/decoder lengths than the example."""
    model, _, _, opt = pf_tft
    assert_same_both_modes(opt, model, [((tm.pf_tft_inputs(3, 5, 4),), {})])


# ---------------------------------------------------------------------------------------------
# asteroid


@pytest.mark.parametrize("norm_type", ["gLN", "cLN"])
def test_conv_tasnet_pointwise_convs(norm_type):
    """With the default gLN the whole model cannot be exported (see
    ``thirdparty_models.conv_tasnet``); its pointwise convs must still be found in the parts that
    can be, and rewritten; with cLN the model is captured whole."""
    model, args, kwargs = tm.conv_tasnet(norm_type=norm_type)
    pointwise = tm.pointwise_convs(model)
    assert len(pointwise) == 14
    opt = tdd_fx.optimize(model, example_inputs=args, example_kwargs=kwargs)
    report = opt.tdd_report
    assert_clean(report)
    assert sites(report, "conv", "rewritten") == pointwise, str(report)
    assert_invariants(opt, model)
    assert_same_both_modes(opt, model, [(args, kwargs), ((torch.randn(3, 560),), {})])
