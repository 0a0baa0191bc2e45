"""The loop family: per-step Python loops are rolled back into one canonical node per dense layer
of the exported graph; loops that are not time-distributed (untied weights, recurrences, per-step
statistics or masks, partial or reordered steps, loops over features) are left alone, with the
reason."""

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

aten = torch.ops.aten
T = 6  # time steps of the example input
B = 4  # batch of the example input
FEAT = 16

#: what an unrolled loop leaves in the exported graph (a step's read, its dense op, the join)
STEP_OPS = {aten.select.int, aten.unbind.int, aten.split.Tensor, aten.split_with_sizes.default,
            aten.chunk.default, aten.narrow.default, aten.stack.default, aten.cat.default,
            aten.linear.default, aten.matmul.default, aten.mm.default, aten.addmm.default}
SPLITS = {aten.unbind.int, aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}


pytestmark = pytest.mark.usefixtures("one_thread")


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
        self.ctx = nn.Parameter(torch.randn(B, 8))  # one row per batch element

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


class Recurrent(Steps):
    """The same, with a GRU and an LSTM in front of the loop."""

    def __init__(self, fn) -> None:
        super().__init__(fn)
        self.gru = nn.GRU(FEAT, FEAT, batch_first=True)
        self.lstm = nn.LSTM(FEAT, FEAT, batch_first=True)


class Cell(Steps):
    """The same, with an LSTM cell stepped by hand."""

    def __init__(self, fn) -> None:
        super().__init__(fn)
        self.lc = nn.LSTMCell(FEAT, 8)


class Inline(nn.Module):
    """The loop written in ``forward`` itself (the capture records ``forward`` frames only)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(FEAT, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.fc(x[:, t]) for t in range(x.size(1))], 1)


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


def over_chunk(m, x):
    return torch.cat([m.fc(xt) for xt in x.chunk(x.size(1), dim=1)], 1)


def over_narrow(m, x):
    return torch.cat([m.fc(x.narrow(1, t, 1)) for t in range(x.size(1))], 1)


def matmul_spelling(m, x):  # x_t @ W.t() + b: aten.t and aten.matmul per step
    return torch.stack([x[:, t] @ m.fc.weight.t() + m.fc.bias for t in range(x.size(1))], 1)


def chain(m, x):
    return torch.stack([m.fc2(m.ln(m.gelu(F.relu(m.fc1(x[:, t]))))) for t in range(x.size(1))], 1)


def chain_scaled(m, x):
    return torch.stack([m.fc2(m.gelu(m.fc1(x[:, t])) * 0.5) for t in range(x.size(1))], 1)


def gated(m, x):  # two branches of one step multiplied (GLU): the body is a graph, not a chain
    return torch.stack([torch.sigmoid(m.fc(x[:, t])) * m.cell(x[:, t])
                        for t in range(x.size(1))], 1)


def time_major(m, x):  # (T, B, F) data, steps along axis 0, stacked back on axis 0
    return torch.stack([m.fc(x[t]) for t in range(x.size(0))], 0)


def stack_time_first(m, x):  # batch-first steps stacked on axis 0: (T, B, O)
    return torch.stack([m.fc(x[:, t]) for t in range(x.size(1))], 0)


def stack_last(m, x):  # batch-first steps stacked on axis 2: (B, O, T)
    return torch.stack([m.fc(x[:, t]) for t in range(x.size(1))], 2)


def stack_minus_one(m, x):  # the same layout as stack_last, spelled with a negative dim
    return torch.stack([m.fc(x[:, t]) for t in range(x.size(1))], -1)


def stack_last_viewed(m, x):  # a view of the result relies on the stack being contiguous
    return torch.stack([m.fc(x[:, t]) for t in range(x.size(1))], 2).view(x.size(0), -1)


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
    "over_chunk": (over_chunk, Steps, 1, False, (B, T, 8)),
    "over_narrow": (over_narrow, Steps, 1, False, (B, T, 8)),
    "matmul_spelling": (matmul_spelling, Steps, 1, False, (B, T, 8)),
    "chain": (chain, Steps, 2, False, (B, T, 8)),
    "chain_scaled": (chain_scaled, Steps, 2, False, (B, T, 8)),
    "gated": (gated, Steps, 2, False, (B, T, 8)),
    "time_major": (time_major, Steps, 1, True, (T, B, 8)),
    "stack_time_first": (stack_time_first, Steps, 1, False, (T, B, 8)),
    "stack_last": (stack_last, Steps, 1, False, (B, 8, T)),
    "stack_minus_one": (stack_minus_one, Steps, 1, False, (B, 8, T)),
    "stack_last_viewed": (stack_last_viewed, Steps, 1, False, (B, 8 * T)),
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


def _graph(opt: nn.Module) -> torch.fx.GraphModule | None:
    """The rewritten graph that runs in the module's current mode (None: none was installed)."""
    try:
        return tdd_fx.graph_of(opt)
    except LookupError:
        return None


def _canonical(opt: nn.Module) -> list:
    gm = _graph(opt)
    return [] if gm is None else [n for n in gm.graph.nodes if n.target is time_distributed_dense]


def _code(opt: nn.Module) -> str:
    gm = _graph(opt)
    return "(no graph)" if gm is None else gm.code


def _is_step_node(n: torch.fx.Node) -> bool:
    """A node of the unrolled loop: the join, a step's read or dense op, or dead code."""
    if n.op != "call_function":
        return False
    if n.target in STEP_OPS:
        return True
    if n.target is aten.slice.Tensor:  # x[:, t] records a full slice first; x[:, t:t+1] a slab
        _, start, end = (list(n.args[1:]) + [0, 0, 0])[:3]
        return isinstance(end, int) and (end >= 2**62 or end - (start or 0) == 1)
    if n.target is operator.getitem:  # `h, _ = self.gru(x)` is the user's own unpacking
        return n.args[0].target in SPLITS
    return not n.users  # computed and thrown away


def _per_step_leftovers(opt: nn.Module) -> list:
    return [n.format_node() for n in _graph(opt).graph.nodes if _is_step_node(n)]


def _line_of(fn, text: str) -> int:
    lines, start = inspect.getsourcelines(fn)
    hits = [start + i for i, line in enumerate(lines) if text in line]
    assert len(hits) == 1, hits
    return hits[0]


def _calls_quietly(opt: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``opt(x)`` running the rewritten graph: a fallback to the original warns, an error here."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return opt(x)


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
    assert len(_canonical(opt)) == n_dense, _code(opt)
    assert opt.training is training
    assert list(opt.state_dict()) == list(model.state_dict())
    assert {id(p) for p in opt.parameters()} == {id(p) for p in model.parameters()}
    assert tuple(opt(x).shape) == layout
    assert_equivalent(opt, model, (x,))


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_loop_leaves_no_per_step_nodes(name: str) -> None:
    """The unrolled steps are gone: no stack/cat, no select/slice/unbind/split per step, no
    per-step dense op, nothing computed and thrown away."""
    _, _, opt = _optimized(name, False)
    assert opt.tdd_report.rewritten
    assert _per_step_leftovers(opt) == [], _code(opt)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_loop_follows_other_batches_and_keeps_its_length(name: str, training: bool) -> None:
    """The capture fixed the loop's length (``range(x.size(1))`` specializes the axis): other
    batch sizes run the rewritten graph and give the same answer; another length runs the
    original code (warning once), never a wrong answer.  No guard is added by the rewrite."""
    major = POSITIVE[name][3]
    model, _, opt = _optimized(name, training)
    assert opt.tdd_report.guards == [], opt.tdd_report.guards
    for b in (3, 2, 5):
        x = _input(major, b, T)
        torch.testing.assert_close(_calls_quietly(opt, x), model(x))
    for b, t in ((3, 9), (2, 1)):
        x = _input(major, b, t)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(opt(x), model(x))


def test_another_length_runs_the_original_with_a_warning() -> None:
    torch.manual_seed(0)
    model = Steps(stack_range).eval()
    opt = tdd_fx.optimize(model, (_input(False),))
    longer = _input(False, 3, T + 3)
    with pytest.warns(RuntimeWarning, match=re.escape(f"shape[1] is {T + 3}")):
        got = opt(longer)
    torch.testing.assert_close(got, model(longer))


def test_site_names_the_dense_layer_and_the_users_line() -> None:
    model = Inline().eval()
    x = _input(False)
    opt = tdd_fx.optimize(model, (x,))
    site = opt.tdd_report.sites[0]
    line = _line_of(Inline.forward, "self.fc(x[:, t])")
    assert (site.pattern, site.status) == ("loop", "rewritten")
    assert site.module == "fc"
    assert site.source.endswith(f"test_loop_family.py:{line}"), site.source
    assert f"test_loop_family.py:{line}" in site.where
    assert site.in_shape == (B, T, FEAT) and site.out_shape == (B, T, 8)
    assert_equivalent(opt, model, (x,))


def test_site_shapes_follow_each_dense_layer() -> None:
    _, _, opt = _optimized("chain", False)
    shapes = [(s.module, s.in_shape, s.out_shape) for s in opt.tdd_report.sites]
    assert shapes == [("fc1", (B, T, FEAT), (B, T, 12)), ("fc2", (B, T, 12), (B, T, 8))]


def test_audit_finds_the_loop_and_changes_nothing() -> None:
    model = Steps(over_unbind).eval()
    x = _input(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = tdd_fx.audit(model, (x,))
    assert [(s.pattern, s.status) for s in report.sites] == [("loop", "found")]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_two_loops_in_sequence_are_both_rewritten(training: bool) -> None:
    """The second loop reads the first one's result: its rewrite reads the first rewrite's
    node (whatever is rewritten, the answer is the original's)."""
    torch.manual_seed(0)
    model = Steps(two_loops).train(training)
    x = _input(False)
    opt = tdd_fx.optimize(model, (x,))
    sites = opt.tdd_report.sites
    assert [(s.pattern, s.status) for s in sites] == [("loop", "rewritten")] * 2, \
        str(opt.tdd_report)
    assert [s.module for s in sites] == ["fc", "fc8"]
    assert len(_canonical(opt)) == 2
    assert _per_step_leftovers(opt) == [], _code(opt)
    assert_equivalent(opt, model, (x,))
    x2 = _input(False, 3, T)
    torch.testing.assert_close(_calls_quietly(opt, x2), model(x2))
    x3 = _input(False, 3, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(opt(x3), model(x3))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_tied_modulelist_with_fixed_count_is_rewritten_on_the_first_steps(training: bool) -> None:
    """`range(T)` is a literal: the capture keeps the time axis symbolic (at least T), and the
    loop reads its first T positions.  Rolled back onto ``x[:, :T]`` the rewrite holds at every
    length the capture admits, with no guard: a longer input runs the rewritten graph and, like
    the original, uses the first T steps only."""
    torch.manual_seed(0)
    model = Steps(tied_fixed).train(training)
    x = _input(False)
    opt = tdd_fx.optimize(model, (x,))
    report = opt.tdd_report
    assert [(s.pattern, s.status) for s in report.sites] == [("loop", "rewritten")], str(report)
    assert report.guards == []
    assert len(_canonical(opt)) == 1
    assert _per_step_leftovers(opt) == [], _code(opt)
    assert_equivalent(opt, model, (x,))
    for b, t in ((3, T), (3, T + 3)):
        other = _input(False, b, t)
        got = _calls_quietly(opt, other)
        torch.testing.assert_close(got, model(other))
        assert tuple(got.shape) == (b, T, 8)
    shorter = _input(False, 3, T - 1)  # the original fails (index out of range): so does opt
    with pytest.warns(RuntimeWarning, match="outside the captured range"), \
            pytest.raises(IndexError):
        opt(shorter)


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


def repeated_step(m, x):
    return torch.stack([m.fc(x[:, min(t, 4)]) for t in range(x.size(1))], 1)


def backwards(m, x):
    return torch.stack([m.fc(x[:, t]) for t in reversed(range(x.size(1)))], 1)


def over_features(m, x):
    return torch.cat([m.f1(x[:, :, f : f + 1]) for f in range(x.size(2))], 2)


def window(m, x):  # each step reads its own position and the next one
    return torch.stack([m.fc(x[:, t] + x[:, (t + 1) % x.size(1)]) for t in range(x.size(1))], 1)


def per_batch_context(m, x):  # a (B, 8) tensor added at every step: not per-feature
    return torch.stack([m.fc(x[:, t]) + m.ctx for t in range(x.size(1))], 1)


def features_joined(m, x):  # steps that dropped their axis, concatenated along the features
    return torch.cat([m.fc(x[:, t]) for t in range(x.size(1))], 1)


#: name -> (forward, training, phrase of the reason)
NEGATIVE = {
    "untied_modulelist": (untied, False, "untied"),
    "recurrence": (recurrence, False, "recurrence"),
    "batchnorm_train": (with_batchnorm, True, "BatchNorm"),
    "batchnorm_eval": (with_batchnorm, False, "BatchNorm"),
    "dropout_train": (with_dropout, True, "Dropout"),
    "partial_cover": (first_three, False, "cover"),
    "repeated_step": (repeated_step, False, "cover"),
    "reversed_order": (backwards, False, "order"),
    "feature_axis": (over_features, False, "feature axis"),
    "window": (window, False, "mixes steps"),
    "per_batch_context": (per_batch_context, False, "outside the loop"),
    "features_joined": (features_joined, False, "features are joined"),
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


def test_eval_dropout_in_the_body_is_rewritten() -> None:
    """Dropout that is off (eval mode) is the identity: the loop is rolled back in eval mode,
    and left alone in train mode, where it draws a mask per step."""
    torch.manual_seed(0)
    model = Steps(with_dropout).eval()
    x = _input(False)
    opt = tdd_fx.optimize(model, (x,))
    assert [(s.pattern, s.status) for s in opt.tdd_report.sites] == [("loop", "rewritten")]
    assert len(_canonical(opt)) == 1
    assert_equivalent(opt, model, (x,))
    assert any("Dropout" in n for n in opt.tdd_report.notes), opt.tdd_report.notes


# --- more spellings and near-misses (one mode each: the capture is the same code) ---------------

def full_colons(m, x):  # x[:, t, :] records a full slice of the step (for some steps only)
    return torch.stack([m.fc(x[:, t, :]) for t in range(x.size(1))], 1)


def negative_index(m, x):
    return torch.stack([m.fc(x[:, t - x.size(1)]) for t in range(x.size(1))], 1)


def addmm_spelling(m, x):
    return torch.stack([torch.addmm(m.fc.bias, x[:, t], m.fc.weight.t())
                        for t in range(x.size(1))], 1)


def softmax_last(m, x):
    return torch.stack([torch.softmax(m.fc(x[:, t]), -1) for t in range(x.size(1))], 1)


def kept_and_returned(m, x):  # a step's value is also returned on its own: it stays computed
    ys = [m.fc(x[:, t]) for t in range(x.size(1))]
    return torch.stack(ys, 1), ys[-1]


MORE_POSITIVE = {
    "full_colons": full_colons,
    "negative_index": negative_index,
    "addmm_spelling": addmm_spelling,
    "softmax_last": softmax_last,
    "kept_and_returned": kept_and_returned,
}


@pytest.mark.parametrize("name", sorted(MORE_POSITIVE))
def test_more_spellings_are_rewritten(name: str) -> None:
    torch.manual_seed(0)
    model = Steps(MORE_POSITIVE[name]).eval()
    x = _input(False)
    opt = tdd_fx.optimize(model, (x,))
    report = opt.tdd_report
    assert [(s.pattern, s.status) for s in report.sites] == [("loop", "rewritten")], str(report)
    assert len(_canonical(opt)) == 1, _code(opt)
    assert_equivalent(opt, model, (x,))
    x2 = _input(False, 3, T)
    torch.testing.assert_close(_calls_quietly(opt, x2), model(x2))


def softmax_over_batch(m, x):
    return torch.stack([torch.softmax(m.fc(x[:, t]), 0) for t in range(x.size(1))], 1)


def summed(m, x):
    return torch.stack([m.fc(x[:, t]).sum(-1) for t in range(x.size(1))], 1)


def lstm_cell(m, x):
    h = c = x.new_zeros(x.size(0), 8)
    outs = []
    for t in range(x.size(1)):
        h, c = m.lc(x[:, t], (h, c))
        outs.append(m.fc8(h))
    return torch.stack(outs, 1)


def loop_over_loop_with_mean(m, x):  # the second loop adds a mean over its whole input
    y = torch.stack([m.fc(x[:, t]) for t in range(x.size(1))], 1)
    return torch.stack([m.fc8(y[:, t]) + y.mean(1) for t in range(y.size(1))], 1)


def stacked_slabs(m, x):  # steps that kept their axis, stacked: a new axis next to it
    return torch.stack([m.fc(x[:, t : t + 1]) for t in range(x.size(1))], 1)


#: name -> (forward, phrase of the reason, sites of other loops rewritten first)
MORE_NEGATIVE = {
    "softmax_over_batch": (softmax_over_batch, "another axis than the features", 0),
    "summed": (summed, "not row-wise", 0),
    "lstm_cell": (lstm_cell, "recurrence", 0),
    "loop_over_loop_with_mean": (loop_over_loop_with_mean, "outside the loop", 1),
    "stacked_slabs": (stacked_slabs, "kept their time axis", 0),
}


@pytest.mark.parametrize("name", sorted(MORE_NEGATIVE))
def test_audit_explains_more_near_misses(name: str) -> None:
    fn, phrase, found = MORE_NEGATIVE[name]
    report = tdd_fx.audit(Cell(fn).eval(), (_input(False),))
    loops = [s for s in report.sites if s.pattern == "loop"]
    assert [s.status for s in loops] == ["found"] * found + ["rejected"], str(report)
    assert phrase in loops[-1].reason, str(report)
