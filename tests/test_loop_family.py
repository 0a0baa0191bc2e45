"""The loop family: per-step Python loops are re-rolled into one canonical node per dense layer;
loops that are not time-distributed (untied weights, recurrences, per-step statistics or masks,
partial or reordered steps, loops over features) are left alone, with the reason."""

from __future__ import annotations

import inspect
import json
import operator
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_equivalent
from torch import nn

import tdd_fx
from tdd_fx.ops import time_distributed_dense

T = 6  # time steps of the example input
B = 4  # batch of the example input
FEAT = 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads; on a busy 2-core box their spinning
    costs seconds per test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Steps(nn.Module):
    """Every layer a case may use; ``fn(self, x)`` is the forward."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn
        self.fc = nn.Linear(FEAT, 8)
        self.fc1 = nn.Linear(FEAT, 12)
        self.fc2 = nn.Linear(12, 8)
        self.fc8 = nn.Linear(8, 8)
        self.gelu = nn.GELU()
        self.ln = nn.LayerNorm(12)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.3)
        self.cell = nn.Linear(FEAT, 8)
        self.f1 = nn.Linear(1, 1)
        self.tied = nn.ModuleList([self.fc] * T)
        self.untied = nn.ModuleList([nn.Linear(FEAT, 8) for _ in range(T)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


class Recurrent(Steps):
    """The same, with a GRU and an LSTM in front of the loop."""

    def __init__(self, fn) -> None:
        super().__init__(fn)
        self.gru = nn.GRU(FEAT, FEAT, batch_first=True)
        self.lstm = nn.LSTM(FEAT, FEAT, batch_first=True)


# --- the spellings (positive) ------------------------------------------------------------------

def stack_range(m, x):
    return torch.stack([m.fc(x[:, t]) for t in range(x.size(1))], 1)


def stack_shape(m, x):
    return torch.stack([m.fc(x[:, t]) for t in range(x.shape[1])], 1)


def cat_slices(m, x):
    return torch.cat([m.fc(x[:, t : t + 1]) for t in range(x.size(1))], 1)


def cat_unsqueezed(m, x):
    return torch.cat([m.fc(x[:, t]).unsqueeze(1) for t in range(x.size(1))], 1)


def over_unbind(m, x):
    return torch.stack([m.fc(xt) for xt in x.unbind(1)], 1)


def over_split(m, x):
    return torch.cat([m.fc(xt) for xt in x.split(1, dim=1)], 1)


def chain(m, x):
    return torch.stack([m.fc2(m.ln(m.gelu(F.relu(m.fc1(x[:, t]))))) for t in range(x.size(1))], 1)


def chain_scaled(m, x):
    return torch.stack([m.fc2(m.gelu(m.fc1(x[:, t])) * 0.5) for t in range(x.size(1))], 1)


def time_major(m, x):  # (T, B, F) data, steps along axis 0, stacked back on axis 0
    return torch.stack([m.fc(x[t]) for t in range(x.size(0))], 0)


def stack_time_first(m, x):  # batch-first steps stacked on axis 0: (T, B, O)
    return torch.stack([m.fc(x[:, t]) for t in range(x.size(1))], 0)


def stack_last(m, x):  # batch-first steps stacked on axis 2: (B, O, T)
    return torch.stack([m.fc(x[:, t]) for t in range(x.size(1))], 2)


def stack_minus_one(m, x):  # the same layout as stack_last, spelled with a negative dim
    return torch.stack([m.fc(x[:, t]) for t in range(x.size(1))], -1)


def after_gru(m, x):
    h, _ = m.gru(x)
    return torch.stack([m.fc(h[:, t]) for t in range(h.size(1))], 1)


def after_lstm(m, x):
    h, _ = m.lstm(x)
    return torch.stack([m.fc(h[:, t]) for t in range(h.size(1))], 1)


def two_loops(m, x):
    y = torch.stack([m.fc(x[:, t]) for t in range(x.size(1))], 1)
    return torch.stack([m.fc8(y[:, t]) for t in range(y.size(1))], 1)


def tied_fixed(m, x):
    return torch.stack([m.tied[t](x[:, t]) for t in range(T)], 1)


#: name -> (forward, model class, dense layers in the step body, time-major data, output layout)
POSITIVE = {
    "stack_range": (stack_range, Steps, 1, False, (B, T, 8)),
    "stack_shape": (stack_shape, Steps, 1, False, (B, T, 8)),
    "cat_slices": (cat_slices, Steps, 1, False, (B, T, 8)),
    "cat_unsqueezed": (cat_unsqueezed, Steps, 1, False, (B, T, 8)),
    "over_unbind": (over_unbind, Steps, 1, False, (B, T, 8)),
    "over_split": (over_split, Steps, 1, False, (B, T, 8)),
    "chain": (chain, Steps, 2, False, (B, T, 8)),
    "chain_scaled": (chain_scaled, Steps, 2, False, (B, T, 8)),
    "time_major": (time_major, Steps, 1, True, (T, B, 8)),
    "stack_time_first": (stack_time_first, Steps, 1, False, (T, B, 8)),
    "stack_last": (stack_last, Steps, 1, False, (B, 8, T)),
    "after_gru": (after_gru, Recurrent, 1, False, (B, T, 8)),
    "after_lstm": (after_lstm, Recurrent, 1, False, (B, T, 8)),
}


def _input(time_major: bool, b: int = B, t: int = T) -> torch.Tensor:
    return torch.randn(t, b, FEAT) if time_major else torch.randn(b, t, FEAT)


_CACHE: dict = {}


def _optimized(name: str, training: bool, table: dict = POSITIVE) -> tuple:
    """(model, example input, optimized) for a case; optimized once per session."""
    key = (name, training)
    if key not in _CACHE:
        fn, cls, _, major, _ = table[name]
        torch.manual_seed(0)
        model = cls(fn).train(training)
        x = _input(major)
        _CACHE[key] = (model, x, tdd_fx.optimize(model, (x,)))
    return _CACHE[key]


def _canonical(gm: nn.Module) -> list:
    return [n for n in gm.graph.nodes if n.target is time_distributed_dense]


def _is_step_node(n: torch.fx.Node, gm: nn.Module) -> bool:
    """A node of the unrolled loop: stack/cat, step selection, a per-step Linear, or dead code."""
    if n.op == "call_function" and n.target is operator.getitem:
        src = n.args[0]  # `h, _ = self.gru(x)` is the user's own unpacking, not a step
        return not (src.op == "call_module"
                    and isinstance(gm.get_submodule(src.target), nn.RNNBase))
    if n.op == "call_function" and n.target in (torch.stack, torch.cat):
        return True
    if n.op == "call_method" and n.target in ("unbind", "split", "select", "narrow"):
        return True
    if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear):
        return True
    return n.op not in ("output", "placeholder") and not n.users  # computed and thrown away


def _per_step_leftovers(gm: nn.Module) -> list:
    return [n for n in gm.graph.nodes if _is_step_node(n, gm)]


def _line_of(fn, text: str) -> int:
    lines, start = inspect.getsourcelines(fn)
    hits = [start + i for i, line in enumerate(lines) if text in line]
    assert len(hits) == 1, hits
    return hits[0]


# --- positive ----------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_loop_is_rewritten(name: str, training: bool) -> None:
    _, _, n_dense, _, layout = POSITIVE[name]
    model, x, opt = _optimized(name, training)
    report = opt.tdd_report
    # one site per dense layer of the step body, as for folds
    assert [(s.pattern, s.status) for s in report.sites] == [("loop", "rewritten")] * n_dense, \
        str(report)
    assert all(s.reason == "" for s in report.sites)
    assert report.verified is True
    assert len(_canonical(opt)) == n_dense, opt.code
    assert opt.training is training
    assert list(opt.state_dict()) == list(model.state_dict())
    assert {id(p) for p in opt.parameters()} == {id(p) for p in model.parameters()}
    assert tuple(opt(x).shape) == layout
    assert_equivalent(opt, model, (x,))


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_loop_leaves_no_per_step_nodes(name: str) -> None:
    """The unrolled steps are gone: no stack/cat/getitem/unbind/split, no per-step Linear calls,
    nothing computed and thrown away."""
    _, _, opt = _optimized(name, False)
    assert opt.tdd_report.rewritten
    assert _per_step_leftovers(opt) == [], opt.code


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_loop_follows_other_lengths_and_batches(name: str, training: bool) -> None:
    """The count came from the input, so the time-size guard was released: other sequence lengths
    and batch sizes run the rewritten graph (no fallback warning) and give the same answer."""
    major = POSITIVE[name][3]
    model, _, opt = _optimized(name, training)
    assert not any(re.search(r"shape\[[01]\]", g) for g in opt.tdd_report.guards), \
        opt.tdd_report.guards
    for b, t in ((3, 9), (2, 1), (5, 4)):
        x = _input(major, b, t)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback warns: that would be an error here
            got = opt(x)
        torch.testing.assert_close(got, model(x))


def test_site_names_the_dense_layer_and_the_users_line() -> None:
    _, _, opt = _optimized("stack_range", False)
    site = opt.tdd_report.sites[0]
    line = _line_of(stack_range, "m.fc(x[:, t])")
    assert site.module == "fc"
    assert site.source.endswith(f"test_loop_family.py:{line}"), site.source
    assert f"test_loop_family.py:{line}" in site.where
    assert site.in_shape == (B, T, FEAT) and site.out_shape == (B, T, 8)


def test_audit_finds_the_loop_and_changes_nothing() -> None:
    model = Steps(over_unbind).eval()
    x = _input(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = tdd_fx.audit(model, (x,))
    assert [(s.pattern, s.status) for s in report.sites] == [("loop", "found")]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_stack_with_negative_dim_is_rewritten(training: bool) -> None:
    torch.manual_seed(0)
    model = Steps(stack_minus_one).train(training)
    x = _input(False)
    opt = tdd_fx.optimize(model, (x,))
    assert [(s.pattern, s.status) for s in opt.tdd_report.sites] == [("loop", "rewritten")], \
        str(opt.tdd_report)
    assert len(_canonical(opt)) == 1
    assert_equivalent(opt, model, (x,))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_two_loops_in_sequence_are_both_rewritten(training: bool) -> None:
    torch.manual_seed(0)
    model = Steps(two_loops).train(training)
    x = _input(False)
    opt = tdd_fx.optimize(model, (x,))
    sites = opt.tdd_report.sites
    assert [(s.pattern, s.status) for s in sites] == [("loop", "rewritten")] * 2, \
        str(opt.tdd_report)
    assert [s.module for s in sites] == ["fc", "fc8"]
    assert len(_canonical(opt)) == 2
    assert _per_step_leftovers(opt) == [], opt.code
    assert_equivalent(opt, model, (x,))
    x2 = _input(False, 3, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = opt(x2)
    torch.testing.assert_close(got, model(x2))


def test_two_loops_in_sequence_stay_correct() -> None:
    """Whatever is rewritten, the answer is the original's, at the example and other sizes."""
    torch.manual_seed(0)
    model = Steps(two_loops).eval()
    x = _input(False)
    opt = tdd_fx.optimize(model, (x,))
    assert opt.tdd_report.rewritten
    assert [s.pattern for s in opt.tdd_report.sites] == ["loop", "loop"]
    assert_equivalent(opt, model, (x,))
    x2 = _input(False, 3, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(opt(x2), model(x2))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_tied_modulelist_with_fixed_count_is_rewritten_under_a_guard(training: bool) -> None:
    """`range(T)` is a literal: the rewrite holds only at that length, so it keeps a guard on the
    time size; another length runs the original instead, with a warning."""
    torch.manual_seed(0)
    model = Steps(tied_fixed).train(training)
    x = _input(False)
    opt = tdd_fx.optimize(model, (x,))
    report = opt.tdd_report
    assert [(s.pattern, s.status) for s in report.sites] == [("loop", "rewritten")], str(report)
    guard = f"x.shape[1] == {T}"
    assert guard in report.guards, report.guards
    assert guard in report.sites[0].guards
    assert len(_canonical(opt)) == 1
    assert_equivalent(opt, model, (x,))
    with warnings.catch_warnings():  # another batch size at the same length: the rewrite runs
        warnings.simplefilter("error")
        x3 = _input(False, 3, T)
        torch.testing.assert_close(opt(x3), model(x3))
    longer = _input(False, 3, T + 3)  # the original only reads the first T steps
    with pytest.warns(RuntimeWarning, match=re.escape(f"x.shape[1] == {T}")):
        got = opt(longer)
    torch.testing.assert_close(got, model(longer))
    assert tuple(got.shape) == (3, T, 8)


# --- negative ----------------------------------------------------------------------------------

def untied(m, x):
    return torch.stack([m.untied[t](x[:, t]) for t in range(T)], 1)


def recurrence(m, x):
    h = x.new_zeros(x.size(0), 8)
    outs = []
    for t in range(x.size(1)):
        h = torch.tanh(m.cell(x[:, t]) + h)
        outs.append(h)
    return torch.stack(outs, 1)


def with_batchnorm(m, x):
    return torch.stack([m.bn(m.fc(x[:, t])) for t in range(x.size(1))], 1)


def with_dropout(m, x):
    return torch.stack([m.drop(m.fc(x[:, t])) for t in range(x.size(1))], 1)


def first_three(m, x):
    return torch.stack([m.fc(x[:, t]) for t in range(3)], 1)


def backwards(m, x):
    return torch.stack([m.fc(x[:, t]) for t in reversed(range(x.size(1)))], 1)


def over_features(m, x):
    return torch.cat([m.f1(x[:, :, f : f + 1]) for f in range(x.size(2))], 2)


#: name -> (forward, training, phrase of the reason)
NEGATIVE = {
    "untied_modulelist": (untied, False, "untied"),
    "recurrence": (recurrence, False, "recurrence"),
    "batchnorm_train": (with_batchnorm, True, "BatchNorm"),
    "batchnorm_eval": (with_batchnorm, False, "BatchNorm"),
    "dropout_train": (with_dropout, True, "Dropout"),
    "partial_cover": (first_three, False, "cover"),
    "reversed_order": (backwards, False, "order"),
    "feature_axis": (over_features, False, "feature axis"),
}


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_near_miss_loop_is_rejected_with_reason(name: str) -> None:
    fn, training, phrase = NEGATIVE[name]
    torch.manual_seed(0)
    model = Steps(fn).train(training)
    x = _input(False)
    opt = tdd_fx.optimize(model, (x,))
    report = opt.tdd_report
    loops = [s for s in report.sites if s.pattern == "loop"]
    assert loops, str(report)
    assert all(s.status == "rejected" for s in loops), str(report)
    assert any(phrase in s.reason for s in loops), str(report)
    assert not report.rewritten
    assert not _canonical(opt)
    assert list(opt.state_dict()) == list(model.state_dict())
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    torch.testing.assert_close(opt(x), expected)
    assert model.training is training and opt.training is training


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_audit_explains_the_near_miss(name: str) -> None:
    fn, training, phrase = NEGATIVE[name]
    model = Steps(fn).train(training)
    report = tdd_fx.audit(model, (_input(False),))
    loops = [s for s in report.sites if s.pattern == "loop"]
    assert loops and all(s.status == "rejected" for s in loops), str(report)
    assert any(phrase in s.reason for s in loops)
    assert phrase in json.dumps(report.to_dict())  # the JSON form carries the reason too
