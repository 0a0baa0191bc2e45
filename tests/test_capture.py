"""Capture with torch.export (non-strict): the Python constructs that defeat plain ``torch.fx``
(``len(x.size())``, ``x.dim()``, ``range(x.size(1))``, iterating ``unbind``, ``*x.shape[2:]``,
varargs, defaults) are captured and rewritten.  Sizes the capture kept symbolic run the rewritten
graph at any value; a size the capture specialized (a Python loop's length) or a call outside what
it covered (another rank, a size-1 axis, other keyword arguments) runs the original forward with
one RuntimeWarning.  A root export cannot capture (data-dependent control flow) gets its
submodules captured instead."""

from __future__ import annotations

import copy
import inspect
import re
import warnings

import pytest
import torch
import torch.fx as fx
from conftest import assert_equivalent
from torch import nn

import tdd_fx
from tdd_fx.ops import time_distributed_dense

FALLBACK = "running the original forward instead"


pytestmark = pytest.mark.usefixtures("one_thread")


def _canonical(gm: fx.GraphModule) -> list:
    return [n for n in gm.graph.nodes if n.target is time_distributed_dense]


def _linears(gm: fx.GraphModule) -> list:
    return [n for n in gm.graph.nodes
            if n.target in (torch.ops.aten.linear.default, torch.ops.aten.addmm.default,
                            torch.ops.aten.mm.default)]


def _line_of(obj, text: str) -> int:
    """The line of ``obj``'s source holding ``text`` (exactly one)."""
    lines, start = inspect.getsourcelines(obj)
    hits = [start + i for i, line in enumerate(lines) if text in line]
    assert len(hits) == 1, hits
    return hits[0]


def _no_warning_call(opt: nn.Module, *args, **kwargs) -> torch.Tensor:
    """The rewritten graph runs: no fallback (no warning at all)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return opt(*args, **kwargs)


def _fallback_call(opt: nn.Module, *args, match: str = "", **kwargs) -> torch.Tensor:
    """The original forward runs, with exactly one fallback warning (matching ``match``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = opt(*args, **kwargs)
    msgs = [str(w.message) for w in caught
            if issubclass(w.category, RuntimeWarning) and FALLBACK in str(w.message)]
    assert len(msgs) == 1, [str(w.message) for w in caught]
    assert re.search(match, msgs[0]), msgs[0]
    return out


def _shares_parameters(opt: nn.Module, model: nn.Module) -> None:
    assert type(opt) is type(model)
    assert list(opt.state_dict()) == list(model.state_dict())
    assert [id(p) for p in opt.parameters()] == [id(p) for p in model.parameters()]


# --- each blocker of plain torch.fx ------------------------------------------------------------

class Sandwich(nn.Module):
    """The Keras-port wrapper; ``kind`` picks the Python construct plain fx cannot trace."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.kind
        if kind == "len_rank":
            if len(x.size()) <= 2:
                return self.fc(x)
        elif kind == "dim_rank":
            if x.dim() == 2:
                return self.fc(x)
        elif kind == "ndim_rank":
            if x.ndim <= 2:
                return self.fc(x)
        elif kind == "star_unpack":
            b, t = x.size(0), x.size(1)
            y = self.fc(x.view(b * t, *x.shape[2:]))  # the sandwich's dense call
            return y.view(b, t, *y.shape[1:])
        elif kind == "range_size":
            return torch.stack([self.fc(x[:, t]) for t in range(x.size(1))], 1)
        elif kind == "iterate_unbind":
            return torch.stack([self.fc(xt) for xt in x.unbind(1)], 1)
        return self.fc(x.contiguous().view(-1, x.size(-1))).view(x.size(0), -1, 8)


#: kind -> (what plain symbolic_trace raises, the pattern tdd_fx rewrites)
BLOCKERS = {
    "len_rank": (RuntimeError, "reshape"),  # 'len' is not supported in symbolic tracing
    "dim_rank": (fx.proxy.TraceError, "reshape"),  # control flow on a proxy
    "ndim_rank": (fx.proxy.TraceError, "reshape"),
    "star_unpack": (fx.proxy.TraceError, "reshape"),  # a proxy cannot be iterated
    "range_size": (TypeError, "loop"),  # a proxy cannot be interpreted as an integer
    "iterate_unbind": (fx.proxy.TraceError, "loop"),
}
#: the kinds whose Python loop runs x.size(1) times: the capture fixes the time size
LOOPS = {"range_size", "iterate_unbind"}
#: the kinds that branch on the rank (the original accepts a 2-D input too)
RANKS = {"len_rank", "dim_rank", "ndim_rank"}


@pytest.mark.parametrize("kind", sorted(BLOCKERS))
def test_blocker_defeats_plain_fx_but_is_rewritten(kind: str) -> None:
    error, pattern = BLOCKERS[kind]
    model = Sandwich(kind)
    with pytest.raises(error):
        fx.symbolic_trace(model)
    x = torch.randn(4, 5, 16)
    opt = tdd_fx.optimize(model, (x,))
    report = opt.tdd_report
    assert [(s.pattern, s.status) for s in report.sites] == [(pattern, "rewritten")], str(report)
    assert report.verified is True
    assert not report.notes, report.notes  # captured whole: nothing to excuse
    assert report.guards == []  # no rewrite relied on a size: the rank is checked per call
    graph = tdd_fx.graph_of(opt)
    assert len(_canonical(graph)) == 1, graph.code
    assert not _linears(graph), graph.code  # every per-step / folded dense call is gone
    _shares_parameters(opt, model)
    assert_equivalent(opt, model, (x,))


@pytest.mark.parametrize("kind", sorted(BLOCKERS))
def test_blocker_rewrite_at_other_sizes(kind: str) -> None:
    """Rank checks and star-unpacking keep batch and time symbolic: other sizes run the rewritten
    graph.  A Python loop's length fixes the time size: another time size runs the original,
    with one warning, and gives its answer."""
    model = Sandwich(kind)
    opt = tdd_fx.optimize(model, (torch.randn(4, 5, 16),))
    x_batch = torch.randn(7, 5, 16)  # another batch size only
    torch.testing.assert_close(_no_warning_call(opt, x_batch), model(x_batch))
    x = torch.randn(2, 9, 16)
    if kind in LOOPS:
        got = _fallback_call(opt, x, match=r"shape\[1\] is 9; the capture fixed it at 5")
    else:
        got = _no_warning_call(opt, x)
    torch.testing.assert_close(got, model(x))
    assert got.shape == (2, 9, 8)


@pytest.mark.parametrize("kind", sorted(BLOCKERS))
def test_blocker_size_one_time_axis_runs_the_original(kind: str) -> None:
    """export admits sizes >= 2 on axes it keeps symbolic: a single time step is outside what
    was captured (or, for a loop, not the length it fixed); the original runs."""
    model = Sandwich(kind)
    opt = tdd_fx.optimize(model, (torch.randn(4, 5, 16),))
    x1 = torch.randn(3, 1, 16)
    match = "the capture fixed it at 5" if kind in LOOPS else r"outside the captured range \[2,"
    got = _fallback_call(opt, x1, match=match)
    torch.testing.assert_close(got, model(x1))
    assert got.shape == (3, 1, 8)


@pytest.mark.parametrize("kind", sorted(RANKS))
def test_rank_branch_other_rank_runs_the_original(kind: str) -> None:
    """The example took the 3-D branch; a 2-D input is outside the capture and the original
    runs (its other branch), with a warning naming the rank, once."""
    model = Sandwich(kind)
    opt = tdd_fx.optimize(model, (torch.randn(4, 5, 16),))
    x2 = torch.randn(6, 16)
    got = _fallback_call(opt, x2, match="2-D .* captured as 3-D")
    torch.testing.assert_close(got, model(x2))
    assert got.shape == (6, 8)
    again = torch.randn(3, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        torch.testing.assert_close(opt(again), model(again))


def test_blocker_site_source_is_the_users_call_line() -> None:
    model = Sandwich("star_unpack")
    opt = tdd_fx.optimize(model, (torch.randn(4, 5, 16),))
    (site,) = opt.tdd_report.sites
    line = _line_of(Sandwich.forward, "# the sandwich's dense call")
    assert site.source.endswith(f"test_capture.py:{line}"), site.source
    assert site.where == f"fc ({site.source})"
    assert site.module == "fc"
    (node,) = _canonical(tdd_fx.graph_of(opt))
    assert f"test_capture.py\", line {line}" in node.meta["stack_trace"]  # meta carried over
    assert list(node.meta["nn_module_stack"].values())[-1][0] == "fc"


def test_loop_site_source_is_the_users_call_line() -> None:
    model = Sandwich("iterate_unbind")
    report = tdd_fx.audit(model, (torch.randn(4, 5, 16),))
    (site,) = report.sites
    line = _line_of(Sandwich.forward, "x.unbind(1)")
    assert site.source.endswith(f"test_capture.py:{line}"), site.source


class VarArgs(nn.Module):
    """``forward(self, *xs)``: plain fx cannot iterate the varargs proxy."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        x = torch.cat(xs, -1)
        return self.fc(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], 8)


def test_varargs_forward_is_rewritten() -> None:
    model = VarArgs()
    with pytest.raises(fx.proxy.TraceError):
        fx.symbolic_trace(model)
    a, b = torch.randn(4, 5, 8), torch.randn(4, 5, 8)
    opt = tdd_fx.optimize(model, (a, b))
    report = opt.tdd_report
    assert [(s.pattern, s.status) for s in report.sites] == [("reshape", "rewritten")], str(report)
    assert report.verified is True
    assert len(_canonical(tdd_fx.graph_of(opt))) == 1
    _shares_parameters(opt, model)
    assert_equivalent(opt, model, (a, b))
    a2, b2 = torch.randn(2, 9, 8), torch.randn(2, 9, 8)
    torch.testing.assert_close(_no_warning_call(opt, a2, b2), model(a2, b2))
    # another number of varargs is another call structure: the original runs
    c = [torch.randn(2, 9, 4) for _ in range(4)]
    torch.testing.assert_close(_fallback_call(opt, *c, match="structure differs"), model(*c))


def test_varargs_rewrite_is_verified_on_other_sizes() -> None:
    model = VarArgs()
    opt = tdd_fx.optimize(model, (torch.randn(4, 5, 8), torch.randn(4, 5, 8)))
    assert not any("example inputs only" in n for n in opt.tdd_report.notes), \
        opt.tdd_report.notes


class Defaults(nn.Module):
    """Defaulted arguments: ``if flatten:`` on a proxy defeats plain fx."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, scale: float | None = None,
                flatten: bool = True) -> torch.Tensor:
        if flatten:
            y = self.fc(x.reshape(-1, x.size(-1))).view(x.size(0), -1, 8)
        else:
            y = self.fc(x)
        if scale is not None:
            y = y * scale
        return y


def test_defaults_are_captured_at_the_example_call() -> None:
    model = Defaults()
    with pytest.raises(fx.proxy.TraceError):
        fx.symbolic_trace(model)
    x = torch.randn(4, 5, 16)
    opt = tdd_fx.optimize(model, (x,))
    report = opt.tdd_report
    assert [(s.pattern, s.status) for s in report.sites] == [("reshape", "rewritten")], str(report)
    assert report.verified is True
    assert_equivalent(opt, model, (x,))
    x2 = torch.randn(2, 9, 16)
    torch.testing.assert_close(_no_warning_call(opt, x2), model(x2))
    # a call that sets what the example left at its default runs the original
    got = _fallback_call(opt, x2, scale=3.0, match="keyword arguments differ.*new: scale")
    torch.testing.assert_close(got, model(x2, scale=3.0))
    got = _fallback_call(opt, x2, None, False, match="structure differs")
    torch.testing.assert_close(got, model(x2, None, False))


def test_keyword_defaults_given_at_the_example_are_captured_with_them() -> None:
    model = Defaults()
    x = torch.randn(4, 5, 16)
    opt = tdd_fx.optimize(model, (x,), {"scale": 2.0})
    assert [s.status for s in opt.tdd_report.sites] == ["rewritten"]
    x2 = torch.randn(2, 9, 16)
    torch.testing.assert_close(_no_warning_call(opt, x2, scale=2.0), model(x2, scale=2.0))
    got = _fallback_call(opt, x2, scale=0.5, match="captured at 2.0")  # another constant
    torch.testing.assert_close(got, model(x2, scale=0.5))
    got = _fallback_call(opt, x2, match="omitted: scale")
    torch.testing.assert_close(got, model(x2))


# --- a size comparison becomes a range of the capture; outside it the original runs -------------

class SizeBranch(nn.Module):
    """``if x.size(1) > 1``: the example decides the branch; export keeps x.shape[1] symbolic
    within the branch's range (>= 2)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(1) > 1:
            y = self.fc(x.contiguous().view(-1, x.size(-1))).view(x.size(0), -1, 8)
            return self.drop(y)
        return self.drop(self.fc(x[:, 0]).unsqueeze(1))


def test_size_comparison_defeats_plain_fx_and_becomes_a_range() -> None:
    model = SizeBranch().eval()
    with pytest.raises(fx.proxy.TraceError):
        fx.symbolic_trace(model)
    x = torch.randn(4, 5, 16)
    opt = tdd_fx.optimize(model, (x,))
    report = opt.tdd_report
    assert [(s.pattern, s.status) for s in report.sites] == [("reshape", "rewritten")]
    assert report.guards == []  # the branch pins a range, not the example's size
    assert len(_canonical(tdd_fx.graph_of(opt))) == 1
    assert_equivalent(opt, model, (x,))
    for shape in ((2, 5, 16), (3, 7, 16), (2, 2, 16)):  # any batch, any time size >= 2
        xs = torch.randn(shape)
        torch.testing.assert_close(_no_warning_call(opt, xs), model(xs))


def test_call_outside_the_range_runs_the_original_and_warns_once() -> None:
    model = SizeBranch().eval()
    opt = tdd_fx.optimize(model, (torch.randn(4, 5, 16),))
    x1 = torch.randn(3, 1, 16)  # the other branch of the original
    first = _fallback_call(opt, x1, match=r"shape\[1\] is 1, outside the captured range")
    torch.testing.assert_close(first, model(x1))
    assert first.shape == (3, 1, 8)
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        second = opt(torch.randn(5, 1, 16))
    assert [str(w.message) for w in again] == []
    assert second.shape == (5, 1, 8)
    # and sizes within the range still run the rewritten graph
    x7 = torch.randn(3, 7, 16)
    torch.testing.assert_close(_no_warning_call(opt, x7), model(x7))


def test_fallback_follows_train_and_eval_of_the_optimized_module() -> None:
    model = SizeBranch(p=0.5).train()
    opt = tdd_fx.optimize(model, (torch.randn(4, 5, 16),))
    assert opt.training
    x1 = torch.randn(3, 1, 16)  # outside the capture: the original forward runs
    reference = copy.deepcopy(model).eval()
    opt.eval()
    a = _fallback_call(opt, x1)  # the fallback path, with dropout off
    b = opt(x1)
    torch.testing.assert_close(a, reference(x1))
    torch.testing.assert_close(a, b)
    assert model.training  # the original was not switched
    opt.train()
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = opt(x1)
    assert not torch.allclose(c, a)  # dropout is back on in the fallback
    torch.manual_seed(3)
    torch.testing.assert_close(c, model(x1))  # the same masks as the original's train mode
    # inside the capture, each mode runs its own verified graph, dropout masks included
    x7 = torch.randn(3, 7, 16)
    torch.manual_seed(5)
    d = _no_warning_call(opt, x7)
    torch.manual_seed(5)
    torch.testing.assert_close(d, model(x7))
    opt.eval()
    torch.testing.assert_close(_no_warning_call(opt, x7), reference(x7))


# --- data-dependent control flow: the submodules are captured instead --------------------------

class TD(nn.Module):
    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.fc = nn.Linear(a, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.contiguous().view(-1, x.size(-1))).view(x.size(0), -1, self.fc.out_features)


class Enc(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.td1 = TD(16, 32)
        self.td2 = TD(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.td2(torch.relu(self.td1(x)))


class DataRoot(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = Enc()
        self.head = TD(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.enc(x)
        if x.sum() > 0:  # data-dependent: the root cannot be captured
            y = y * 2
        else:
            y = y - 1
        return self.head(y)


class DataMid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = Enc()
        self.post = TD(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.enc(x)
        if x.mean() > 0:  # the child is data-dependent too
            y = -y
        return self.post(y)


class DeepRoot(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mid = DataMid()
        self.head = TD(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mid(x)
        if x.sum() > 0:
            y = y * 2
        return self.head(y)


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.fc(x.contiguous().view(-1, x.size(-1))).view(x.size(0), -1, 8)
        if isinstance(mask, torch.Tensor):  # false for an fx proxy: the classic fx trap
            y = y * mask.unsqueeze(-1)
        return y


class KeywordRoot(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = Enc()
        self.child = Masked()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.enc(x)
        m = (x[..., 0] > 0).float()
        if x.sum() > 0:
            y = y * 2
        return self.child(y, mask=m)


def _branch_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(4, 6, 16).abs() + 0.1
    return x, -x  # sum > 0 and sum < 0: both branches


def _not_captured_note(notes: list[str], prefix: str, line: int) -> bool:
    return any(n.startswith(prefix) and "torch.export could not capture it" in n
               and n.endswith(f"test_capture.py:{line}") for n in notes)


def test_data_dependent_root_gets_its_submodules_optimized() -> None:
    model = DataRoot()
    with pytest.raises(fx.proxy.TraceError):
        fx.symbolic_trace(model)
    x_pos, x_neg = _branch_inputs()
    opt = tdd_fx.optimize(model, (x_pos,))
    report = opt.tdd_report
    assert [(s.module, s.status) for s in report.sites] == [
        ("enc.td1.fc", "rewritten"), ("enc.td2.fc", "rewritten"), ("head.fc", "rewritten")]
    assert all(s.where.startswith(s.module + " (") for s in report.sites)
    line = _line_of(DataRoot.forward, "if x.sum() > 0")
    assert _not_captured_note(report.notes, "DataRoot as a whole: ", line), report.notes
    assert any(n.startswith("captured its submodules instead") and n.endswith(": enc, head")
               for n in report.notes), report.notes
    assert report.verified is True
    _shares_parameters(opt, model)
    assert "forward" not in opt.__dict__  # the root runs its own (data-dependent) code
    assert {p: set(g) for p, g in tdd_fx.graphs(opt).items()} == {
        "enc": {"train", "eval"}, "head": {"train", "eval"}}
    assert len(_canonical(tdd_fx.graph_of(opt, "enc"))) == 2
    assert len(_canonical(tdd_fx.graph_of(opt, "head"))) == 1
    with pytest.raises(LookupError):
        tdd_fx.graph_of(opt)
    assert_equivalent(opt, model, (x_pos,))
    assert_equivalent(opt, model, (x_neg,))  # the root's other branch, same captured children
    x_other = torch.randn(2, 9, 16)  # the children's batch and time sizes are symbolic
    torch.testing.assert_close(_no_warning_call(opt, x_other), model(x_other))


def test_uncapturable_child_recurses_into_grandchildren() -> None:
    model = DeepRoot()
    x_pos, x_neg = _branch_inputs()
    opt = tdd_fx.optimize(model, (x_pos,))
    report = opt.tdd_report
    assert [(s.module, s.status) for s in report.sites] == [
        ("mid.enc.td1.fc", "rewritten"), ("mid.enc.td2.fc", "rewritten"),
        ("mid.post.fc", "rewritten"), ("head.fc", "rewritten")], str(report)
    mid_line = _line_of(DataMid.forward, "if x.mean() > 0")
    # the first data-dependent branch export meets is the child's, for the root and the child
    assert _not_captured_note(report.notes, "DeepRoot as a whole: ", mid_line), report.notes
    assert _not_captured_note(report.notes, "mid (DataMid) left out: ", mid_line), report.notes
    assert any(n.startswith("captured its submodules instead")
               and n.endswith(": mid.enc, mid.post, head") for n in report.notes), report.notes
    assert type(opt.mid) is DataMid
    assert set(tdd_fx.graphs(opt)) == {"mid.enc", "mid.post", "head"}
    _shares_parameters(opt, model)
    assert_equivalent(opt, model, (x_pos,))
    assert_equivalent(opt, model, (x_neg,))


def test_keyword_tensor_call_of_a_child_is_captured_with_its_keywords() -> None:
    """The child is called with ``mask=`` as a keyword: it is captured with the inputs it
    received (keyword included), so ``isinstance(mask, Tensor)`` holds and the mask is kept."""
    model = KeywordRoot()
    x_pos, x_neg = _branch_inputs()
    opt = tdd_fx.optimize(model, (x_pos,))
    report = opt.tdd_report
    assert [s.module for s in report.rewritten] == ["enc.td1.fc", "enc.td2.fc", "child.fc"], \
        str(report)
    assert any(n.endswith(": enc, child") for n in report.notes), report.notes
    assert type(opt.child) is Masked
    assert opt.child.fc.weight is model.child.fc.weight
    assert set(tdd_fx.graphs(opt)) == {"enc", "child"}
    _shares_parameters(opt, model)
    assert_equivalent(opt, model, (x_pos,))
    assert_equivalent(opt, model, (x_neg,))
    # the child called without its keyword is another call: its original code runs
    y = torch.randn(2, 3, 8)
    got = _fallback_call(opt.child, y, match="omitted: mask")
    torch.testing.assert_close(got, model.child(y))


def test_keyword_tensor_behind_isinstance_is_never_silently_dropped() -> None:
    """A capturable root passing a keyword tensor into `if isinstance(mask, Tensor)`: the
    result must still apply the mask."""

    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.child = Masked()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.child(x, mask=(x[..., 0] > 0).float())

    model = Root()
    x = torch.randn(4, 6, 8)
    opt = tdd_fx.optimize(model, (x,))
    assert [(s.module, s.status) for s in opt.tdd_report.sites] == [("child.fc", "rewritten")]
    assert opt.tdd_report.verified is True
    assert not opt.tdd_report.notes, opt.tdd_report.notes
    graph = tdd_fx.graph_of(opt)
    assert any(n.target is torch.ops.aten.mul.Tensor for n in graph.graph.nodes), graph.code
    assert_equivalent(opt, model, (x,))
    x2 = torch.randn(2, 3, 8)
    torch.testing.assert_close(_no_warning_call(opt, x2), model(x2))


# --- no leaks ----------------------------------------------------------------------------------

def test_plain_tracing_and_export_are_unaffected() -> None:
    """Capturing for tdd_fx changes nothing for torch.fx or torch.export afterwards."""
    tdd_fx.optimize(Sandwich("len_rank"), (torch.randn(2, 3, 16),))
    tdd_fx.optimize(Sandwich("iterate_unbind"), (torch.randn(2, 3, 16),))
    with pytest.raises(RuntimeError, match="len"):
        fx.symbolic_trace(Sandwich("len_rank"))
    with pytest.raises(fx.proxy.TraceError):
        fx.symbolic_trace(Sandwich("dim_rank"))
    plain = Sandwich("plain")
    gm = fx.symbolic_trace(plain)
    assert not _canonical(gm)
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(gm(x), plain(x))
    ep = torch.export.export(plain, (x,), strict=False)
    assert not _canonical(ep.graph_module)
    torch.testing.assert_close(ep.module()(x), plain(x))
