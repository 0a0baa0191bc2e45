"""Verification and rollback: a rewrite that computes something else never survives.

The rewrites are sabotaged from outside (a wrapper around ``tdd_fx.rewrite.emit_region`` or
around the kernels of ``tdd_fx.ops.KERNELS``), for one site only, and the site must come back
``rolled_back`` while the others stay ``rewritten`` and the model stays equivalent.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.fx as fx
from conftest import assert_equivalent
from torch import nn

import tdd_fx
import tdd_fx.ops
import tdd_fx.patterns.reshape
import tdd_fx.rewrite
from tdd_fx.verify import Verdict, alternative_inputs, compare, fp64_reference, run, verify

# --------------------------------------------------------------------------------------------
# models


class Wrap(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.module(x.contiguous().view(-1, x.size(-1)))
        return y.view(x.size(0), -1, y.size(-1))


def swish(h: torch.Tensor) -> torch.Tensor:
    """Two users of ``h``: ends a region, so the sites around it are separate rewrite units."""
    return h * torch.sigmoid(h)


class Three(nn.Module):
    """Three separate sites (separate rewrite units): enc, mid, dec."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = Wrap(nn.Linear(6, 8))
        self.mid = Wrap(nn.Linear(8, 8))
        self.dec = Wrap(nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(swish(self.mid(swish(self.enc(x)))))


class MixedLayout(nn.Module):
    """A channel-last site and a channel-first site (x is (B, F, T))."""

    def __init__(self) -> None:
        super().__init__()
        self.cf = nn.Linear(6, 8)
        self.cl = Wrap(nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(1, 2)
        b, t, f = h.shape
        h = self.cf(h.reshape(b * t, f)).view(b, t, -1).transpose(1, 2)  # channel-first site
        return self.cl(swish(h).transpose(1, 2))  # channel-last site


class BNTrain(nn.Module):
    """A fold chain with BatchNorm1d and dropout; used in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(8, 3)
        self.other = Wrap(nn.Linear(3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, f = x.shape
        h = self.fc2(self.drop(self.bn(self.fc1(x.reshape(b * t, f))))).view(b, t, -1)
        return self.other(swish(h))


def inp(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# sabotage helpers


def _targets(gm: fx.GraphModule, spec) -> set[str]:
    names = {name for name, _ in spec}
    return {str(n.target) for n in gm.graph.nodes if n.name in names and n.op == "call_module"}


def _install(monkeypatch, make_node, victim: str) -> list[str]:
    """Wrap emit_region so that the region containing module ``victim`` gets ``make_node``
    applied to its result (``make_node(graph, node) -> node``).  Returns a log of hits."""
    real = tdd_fx.rewrite.emit_region
    hits: list[str] = []

    def sabotaged(gm, entry_name, spec, *args, **kwargs):
        hit = victim in _targets(gm, spec)
        out = real(gm, entry_name, spec, *args, **kwargs)
        if not hit:
            return out
        hits.append(victim)
        g = gm.graph
        with g.inserting_after(out):
            bad = make_node(g, out)
        out.replace_all_uses_with(bad, delete_user_cb=lambda u: u is not bad)
        return bad

    monkeypatch.setattr(tdd_fx.rewrite, "emit_region", sabotaged)
    # in case a family imported the name itself
    monkeypatch.setattr(tdd_fx.patterns.reshape, "emit_region", sabotaged, raising=False)
    return hits


def _scaled(g: fx.Graph, node: fx.Node) -> fx.Node:
    return g.call_function(operator.mul, (node, 1.001))


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * 1.01


def grad_scaled(x: torch.Tensor) -> torch.Tensor:
    """Identity forward, gradient scaled by 1.01."""
    return _GradScale.apply(x)


def wrong_at_other_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Exact on the example's batch size, wrong on any other."""
    return x if x.shape[0] == batch else x * 1.001


def canonical_count(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is tdd_fx.time_distributed_dense)


def calls_module(gm: fx.GraphModule, target: str) -> bool:
    return any(n.op == "call_module" and n.target == target for n in gm.graph.nodes)


def by_module(report: tdd_fx.Report) -> dict[str, tdd_fx.Site]:
    return {s.module: s for s in report.sites}


# --------------------------------------------------------------------------------------------
# rollback


def test_unsabotaged_baseline_rewrites_all_three():
    model = Three().eval()
    opt = tdd_fx.optimize(model, (inp(4, 5, 6),))
    sites = by_module(opt.tdd_report)
    assert {m: s.status for m, s in sites.items()} == {
        "enc.module": "rewritten", "mid.module": "rewritten", "dec.module": "rewritten"}
    assert canonical_count(opt) == 3
    assert opt.tdd_report.verified is True


def test_wrong_numbers_at_one_site_are_rolled_back(monkeypatch):
    model = Three().eval()
    inputs = (inp(4, 5, 6),)
    hits = _install(monkeypatch, _scaled, "mid.module")
    opt = tdd_fx.optimize(model, inputs)
    assert hits, "the sabotage never ran"
    sites = by_module(opt.tdd_report)
    assert sites["mid.module"].status == "rolled_back"
    assert "verif" in sites["mid.module"].reason.lower()
    assert sites["mid.module"].kernel == ""
    assert sites["enc.module"].status == "rewritten"
    assert sites["dec.module"].status == "rewritten"
    assert sites["enc.module"].reason == sites["dec.module"].reason == ""
    assert [s.module for s in opt.tdd_report.rolled_back] == ["mid.module"]
    # what comes back is verified, the rolled-back site runs the original code
    assert opt.tdd_report.verified is True
    assert canonical_count(opt) == 2
    assert calls_module(opt, "mid.module")
    assert_equivalent(opt, model, inputs, rtol=0, atol=1e-6)
    assert_equivalent(opt, model, (inp(2, 9, 6, seed=3),), rtol=0, atol=1e-6)
    assert "rolled back" in str(opt.tdd_report)


@pytest.mark.parametrize("victim", ["enc.module", "dec.module"])
def test_rollback_of_first_or_last_site(monkeypatch, victim):
    model = Three().eval()
    inputs = (inp(4, 5, 6),)
    _install(monkeypatch, _scaled, victim)
    opt = tdd_fx.optimize(model, inputs)
    statuses = {m: s.status for m, s in by_module(opt.tdd_report).items()}
    assert statuses.pop(victim) == "rolled_back"
    assert set(statuses.values()) == {"rewritten"}
    assert canonical_count(opt) == 2
    assert_equivalent(opt, model, inputs, rtol=0, atol=1e-6)


def test_wrong_gradient_alone_is_rolled_back(monkeypatch):
    model = Three().eval()
    inputs = (inp(4, 5, 6),)
    _install(monkeypatch, lambda g, n: g.call_function(grad_scaled, (n,)), "mid.module")
    opt = tdd_fx.optimize(model, inputs)
    mid = by_module(opt.tdd_report)["mid.module"]
    assert mid.status == "rolled_back"
    assert "grad" in mid.reason
    assert len(opt.tdd_report.rewritten) == 2
    assert_equivalent(opt, model, inputs, rtol=0, atol=1e-6)


def test_wrong_only_at_other_batch_size_is_rolled_back(monkeypatch):
    """Verification also runs inputs with other batch/time sizes."""
    model = Three().eval()
    inputs = (inp(4, 5, 6),)
    _install(monkeypatch, lambda g, n: g.call_function(wrong_at_other_batch, (n, 4)), "dec.module")
    opt = tdd_fx.optimize(model, inputs)
    dec = by_module(opt.tdd_report)["dec.module"]
    assert dec.status == "rolled_back"
    assert "verif" in dec.reason.lower()
    assert len(opt.tdd_report.rewritten) == 2
    other = (inp(7, 2, 6, seed=4),)
    assert_equivalent(opt, model, other, rtol=0, atol=1e-6)


def test_rewrite_that_raises_while_building_is_rolled_back(monkeypatch):
    model = Three().eval()
    inputs = (inp(4, 5, 6),)

    def explode(g, n):
        raise RuntimeError("sabotaged build")

    _install(monkeypatch, explode, "enc.module")
    opt = tdd_fx.optimize(model, inputs)
    sites = by_module(opt.tdd_report)
    assert sites["enc.module"].status == "rolled_back"
    assert "sabotaged build" in sites["enc.module"].reason
    assert sites["mid.module"].status == sites["dec.module"].status == "rewritten"
    assert calls_module(opt, "enc.module")
    assert_equivalent(opt, model, inputs, rtol=0, atol=1e-6)


def test_all_sites_wrong_gives_back_an_equivalent_model(monkeypatch):
    model = Three().eval()
    inputs = (inp(4, 5, 6),)
    real = tdd_fx.rewrite.emit_region

    def every(gm, entry_name, spec, *args, **kwargs):
        out = real(gm, entry_name, spec, *args, **kwargs)
        with gm.graph.inserting_after(out):
            bad = gm.graph.call_function(operator.mul, (out, 1.01))
        out.replace_all_uses_with(bad, delete_user_cb=lambda u: u is not bad)
        return bad

    monkeypatch.setattr(tdd_fx.rewrite, "emit_region", every)
    monkeypatch.setattr(tdd_fx.patterns.reshape, "emit_region", every, raising=False)
    opt = tdd_fx.optimize(model, inputs)
    assert opt.tdd_report.rewritten == []
    assert len(opt.tdd_report.rolled_back) == 3
    assert canonical_count(opt) == 0
    assert_equivalent(opt, model, inputs, rtol=0, atol=0)
    assert list(opt.state_dict()) == list(model.state_dict())


def test_wrong_kernel_rolls_back_channel_first_site_only(monkeypatch):
    """Sabotage every kernel for features off the last axis: the channel-first site (which uses
    a kernel) is rolled back; the channel-last one is kept."""
    for name, fn in list(tdd_fx.ops.KERNELS.items()):
        def bad(x, w, b, d, fn=fn):
            y = fn(x, w, b, d)
            return y if d == x.dim() - 1 else y * 1.001
        monkeypatch.setitem(tdd_fx.ops.KERNELS, name, bad)
    model = MixedLayout().eval()
    inputs = (inp(3, 6, 5),)
    opt = tdd_fx.optimize(model, inputs)
    sites = by_module(opt.tdd_report)
    assert sites["cf"].status == "rolled_back", str(opt.tdd_report)
    assert "verif" in sites["cf"].reason.lower()
    assert sites["cl.module"].status == "rewritten"
    assert_equivalent(opt, model, inputs, rtol=0, atol=1e-6)


def test_kernels_unsabotaged_mixed_layout_is_rewritten():
    model = MixedLayout().eval()
    inputs = (inp(3, 6, 5),)
    opt = tdd_fx.optimize(model, inputs)
    sites = by_module(opt.tdd_report)
    assert sites["cf"].status == "rewritten"
    assert sites["cf"].feature_dim == 1
    assert sites["cl.module"].status == "rewritten"
    assert_equivalent(opt, model, inputs)


# --------------------------------------------------------------------------------------------
# verification leaves no trace


def test_rollback_in_train_mode_leaves_bn_stats_and_rng(monkeypatch):
    torch.manual_seed(0)
    model = BNTrain().train()
    with torch.no_grad():
        model(inp(2, 3, 6, seed=8))
    stats = {n: b.clone() for n, b in model.named_buffers()}
    flags = {n: m.training for n, m in model.named_modules()}
    _install(monkeypatch, _scaled, "fc2")
    rng = torch.get_rng_state()
    opt = tdd_fx.optimize(model, (inp(4, 5, 6),))
    assert torch.equal(torch.get_rng_state(), rng)
    assert by_module(opt.tdd_report)["fc2"].status == "rolled_back"
    for n, b in model.named_buffers():
        torch.testing.assert_close(b, stats[n], rtol=0, atol=0, msg=n)
    assert int(model.bn.num_batches_tracked) == 1
    assert {n: m.training for n, m in model.named_modules()} == flags


def test_verify_directly_changes_nothing_and_passes_on_a_copy():
    torch.manual_seed(0)
    model = BNTrain().train()
    cand = copy.deepcopy(model)
    stats = {n: b.clone() for n, b in (*model.named_buffers(), *cand.named_buffers())}
    rng = torch.get_rng_state()
    sets = [(inp(4, 5, 6),), (inp(2, 7, 6, seed=1),)]
    v = verify(model, cand, sets, fp64_reference(model))
    assert v.ok, v.detail
    assert v.checked > 0
    assert torch.equal(torch.get_rng_state(), rng)
    for n, b in (*model.named_buffers(), *cand.named_buffers()):
        torch.testing.assert_close(b, stats[n], rtol=0, atol=0)
    assert model.training and cand.training
    assert all(m.training for m in cand.modules())


def test_verify_fails_on_a_perturbed_copy_and_says_where():
    model = BNTrain().eval()
    cand = copy.deepcopy(model)
    with torch.no_grad():
        cand.fc2.bias.add_(1e-3)
    v = verify(model, cand, [(inp(4, 5, 6),)], fp64_reference(model))
    assert not v.ok
    assert "output[0]" in v.detail or "grad" in v.detail
    assert "4x5x6" in v.detail


def test_verify_checks_the_other_mode_too():
    """A candidate that is right in eval mode but not in train mode fails (train-mode model,
    eval-mode check; and the reverse)."""
    model = BNTrain().eval()
    cand = copy.deepcopy(model)
    cand.drop.p = 0.5  # identical in eval mode, different in train mode
    sets = [(inp(4, 5, 6),)]
    v = verify(model, cand, sets, None)
    assert not v.ok
    assert "train" in v.detail
    model.train()
    cand.train()
    v = verify(model, cand, sets, None)
    assert not v.ok


def test_run_is_deterministic_and_restores_state():
    torch.manual_seed(0)
    model = BNTrain().train()
    before = {n: b.clone() for n, b in model.named_buffers()}
    a = run(model, (inp(4, 5, 6),))
    b = run(model, (inp(4, 5, 6),))
    assert a.keys() == b.keys()
    assert "output[0]" in a and "grad fc1.weight" in a and "grad input[0]" in a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    for n, buf in model.named_buffers():
        torch.testing.assert_close(buf, before[n], rtol=0, atol=0)
    assert model.fc1.weight.grad is None


# --------------------------------------------------------------------------------------------
# the tolerance rule of compare()


def _ref(*vals: float) -> torch.Tensor:
    return torch.tensor(vals, dtype=torch.float64)


def test_compare_exact_passes():
    r = _ref(1.0, -0.5, 0.25)
    v = compare({"output[0]": r.float()}, {"output[0]": r.float()}, {"output[0]": r})
    assert v.ok and v.max_error == 0.0


def test_compare_floor_is_64_eps_times_scale():
    r = _ref(2.0, 0.5, -1.0)  # scale 2, exactly representable: the original's own error is 0
    eps = torch.finfo(torch.float32).eps
    allowed = 64 * eps * 2.0
    orig = {"output[0]": r.float()}
    ref = {"output[0]": r}
    within = r.clone()
    within[1] += 0.5 * allowed
    beyond = r.clone()
    beyond[1] += 2.0 * allowed
    assert compare(orig, {"output[0]": within.float()}, ref).ok
    v = compare(orig, {"output[0]": beyond.float()}, ref)
    assert not v.ok
    assert "output[0]" in v.detail


def test_compare_allows_a_small_multiple_of_the_originals_own_error():
    r = _ref(1.0, 0.5, -1.0, 0.75)
    e = 1e-3
    orig = r.clone()
    orig[0] += e  # the original itself is off by 1e-3 against float64
    ref = {"g": r}
    ok = r.clone()
    ok[2] -= 3 * e  # 3x the original's error: fine
    bad = r.clone()
    bad[2] -= 6 * e  # 6x: too much
    assert compare({"g": orig.float()}, {"g": ok.float()}, ref).ok
    v = compare({"g": orig.float()}, {"g": bad.float()}, ref)
    assert not v.ok
    assert v.detail.startswith("g")


def test_compare_without_reference_uses_the_original():
    a = torch.linspace(-1, 1, 7)
    assert compare({"o": a}, {"o": a + 1e-7}, None).ok
    assert not compare({"o": a}, {"o": a + 1e-3}, None).ok


def test_compare_large_error_fails_small_relative_to_scale_passes():
    big = torch.linspace(-1000, 1000, 11)
    assert compare({"o": big}, {"o": big + 1e-3}, None).ok  # 1e-6 relative
    assert not compare({"o": big}, {"o": big + 1.0}, None).ok


def test_compare_shape_mismatch_fails():
    a = torch.zeros(2, 3)
    v = compare({"output[0]": a}, {"output[0]": a.reshape(3, 2)}, None)
    assert not v.ok
    assert "shape" in v.detail


def test_compare_different_keys_fail():
    a = torch.zeros(2)
    v = compare({"output[0]": a, "grad w": a}, {"output[0]": a}, None)
    assert not v.ok
    assert "grad w" in v.detail


def test_compare_nan_only_in_candidate_fails():
    a = torch.ones(3)
    c = a.clone()
    c[1] = float("nan")
    assert not compare({"o": a}, {"o": c}, None).ok
    # NaN where the original has NaN too is fine
    a2 = c.clone()
    assert compare({"o": a2}, {"o": c}, None).ok


def test_compare_integer_outputs_must_be_equal():
    a = torch.tensor([1, 2, 3])
    assert compare({"o": a}, {"o": a.clone()}, None).ok
    assert not compare({"o": a}, {"o": torch.tensor([1, 2, 4])}, None).ok


def test_compare_missing_gradient_only_ok_when_zero():
    g = torch.tensor([0.5, 1.0])
    assert compare({"grad b": None}, {"grad b": torch.zeros(2)}, None).ok
    assert not compare({"grad b": None}, {"grad b": g}, None).ok
    assert isinstance(compare({"grad b": None}, {"grad b": None}, None), Verdict)


# --------------------------------------------------------------------------------------------
# alternative_inputs


class ChannelFirst(nn.Module):
    """(B, F=6, T) through a pointwise Conv1d: the feature axis (1) cannot change."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, series: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        return self.fc(series + self.emb(cat))


class Literal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.view(40, 16)).view(4, 10, 8)


def test_alternative_inputs_change_batch_and_time_channel_last():
    model = Three().eval()
    x = inp(4, 5, 6)
    alt = alternative_inputs(model, (x,), set())
    assert alt is not None and len(alt) == 1
    (y,) = alt
    assert y.shape[0] != 4 and y.shape[1] != 5 and y.shape[2] == 6
    assert y.dtype == x.dtype
    model(*alt)  # accepted


def test_alternative_inputs_keep_guarded_dims():
    model = Three().eval()
    alt = alternative_inputs(model, (inp(4, 5, 6),), {(0, 1)})
    assert alt is not None
    assert alt[0].shape[1] == 5 and alt[0].shape[0] != 4 and alt[0].shape[2] == 6
    alt = alternative_inputs(model, (inp(4, 5, 6),), {(0, 0)})
    assert alt is not None
    assert alt[0].shape[0] == 4 and alt[0].shape[1] != 5


def test_alternative_inputs_channel_first_keep_feature_axis():
    model = ChannelFirst()
    alt = alternative_inputs(model, (inp(3, 6, 5),), set())
    assert alt is not None
    assert alt[0].shape[1] == 6
    assert alt[0].shape[0] != 3 and alt[0].shape[2] != 5
    model(*alt)


def test_alternative_inputs_several_inputs_consistent_and_in_range():
    model = TwoInputs()
    series = inp(4, 5, 6)
    cat = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(0))
    alt = alternative_inputs(model, (series, cat), set())
    assert alt is not None
    s, c = alt
    assert s.shape[:2] == c.shape and s.shape[:2] != (4, 5)
    assert c.dtype == torch.int64 and int(c.min()) >= 0 and int(c.max()) <= 9
    model(s, c)


def test_alternative_inputs_none_when_nothing_else_is_accepted():
    assert alternative_inputs(Literal(), (inp(4, 10, 16),), set()) is None


def test_alternative_inputs_do_not_touch_the_model_state():
    torch.manual_seed(0)
    model = BNTrain().train()
    before = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    assert alternative_inputs(model, (inp(4, 5, 6),), set()) is not None
    assert torch.equal(torch.get_rng_state(), rng)
    for n, b in model.named_buffers():
        torch.testing.assert_close(b, before[n], rtol=0, atol=0)


def test_optimize_notes_when_no_second_input_set_is_accepted():
    model = Literal().eval()
    opt = tdd_fx.optimize(model, (inp(4, 10, 16),))
    notes = " ".join(opt.tdd_report.notes)
    assert "example inputs only" in notes
    assert opt.tdd_report.verified is True
    assert_equivalent(opt, model, (inp(4, 10, 16, seed=2),))
