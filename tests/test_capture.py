"""Shape-aware capture: Python control flow on shapes resolves on the example inputs and becomes a
guard; a failing guard runs the original instead; data-dependent roots get their children traced."""

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


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads; on a busy 2-core box their spinning
    costs seconds per test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _canonical(gm: nn.Module) -> list:
    return [n for n in gm.graph.nodes if n.target is time_distributed_dense]


def _line_of(obj, text: str) -> int:
    """The line of ``obj``'s source holding ``text`` (exactly one)."""
    lines, start = inspect.getsourcelines(obj)
    hits = [start + i for i, line in enumerate(lines) if text in line]
    assert len(hits) == 1, hits
    return hits[0]


def _no_warning_call(opt: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return opt(x)


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
    assert not report.notes, report.notes  # traced whole: no partial tracing, nothing to excuse
    assert isinstance(opt, fx.GraphModule)
    assert len(_canonical(opt)) == 1, opt.code
    assert "x.dim() == 3" in report.guards  # the rank the trace decided on
    assert list(opt.state_dict()) == list(model.state_dict())
    assert_equivalent(opt, model, (x,))


@pytest.mark.parametrize("kind", sorted(BLOCKERS))
def test_blocker_rewrite_holds_for_other_sizes(kind: str) -> None:
    """Rank checks pin the rank, not the sizes; star-unpacking and loop counts follow the input:
    other batch and time sizes run the rewritten graph, without a fallback."""
    model = Sandwich(kind)
    opt = tdd_fx.optimize(model, (torch.randn(4, 5, 16),))
    assert not any("shape[" in g for g in opt.tdd_report.guards), opt.tdd_report.guards
    for shape in ((2, 9, 16), (7, 1, 16)):
        x = torch.randn(shape)
        torch.testing.assert_close(_no_warning_call(opt, x), model(x))


@pytest.mark.parametrize("kind", ["len_rank", "dim_rank", "ndim_rank"])
def test_rank_guard_other_rank_runs_the_original(kind: str) -> None:
    """The example took the 3-D branch; a 2-D input fails the rank guard and the original runs
    (its other branch), with a warning naming the rank."""
    model = Sandwich(kind)
    opt = tdd_fx.optimize(model, (torch.randn(4, 5, 16),))
    x2 = torch.randn(6, 16)
    with pytest.warns(RuntimeWarning, match="3-D"):
        got = opt(x2)
    torch.testing.assert_close(got, model(x2))
    assert got.shape == (6, 8)


def test_rank_guard_site_source_is_the_users_call_line() -> None:
    model = Sandwich("star_unpack")
    opt = tdd_fx.optimize(model, (torch.randn(4, 5, 16),))
    (site,) = opt.tdd_report.sites
    line = _line_of(Sandwich.forward, "# the sandwich's dense call")
    assert site.source.endswith(f"test_capture.py:{line}"), site.source
    assert site.where == f"fc ({site.source})"
    assert site.module == "fc"


def test_loop_site_source_is_the_users_call_line() -> None:
    model = Sandwich("iterate_unbind")
    report = tdd_fx.audit(model, (torch.randn(4, 5, 16),))
    (site,) = report.sites
    line = _line_of(Sandwich.forward, "x.unbind(1)")
    assert site.source.endswith(f"test_capture.py:{line}"), site.source


# --- a size comparison becomes a guard; a failing guard falls back -----------------------------

class SizeBranch(nn.Module):
    """``if x.size(1) > 1``: the example decides the branch; the decision pins x.shape[1]."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(1) > 1:
            y = self.fc(x.contiguous().view(-1, x.size(-1))).view(x.size(0), -1, 8)
            return self.drop(y)
        return self.fc(x[:, 0]).unsqueeze(1)


def test_size_comparison_defeats_plain_fx_and_becomes_a_guard() -> None:
    model = SizeBranch().eval()
    with pytest.raises(fx.proxy.TraceError):
        fx.symbolic_trace(model)
    x = torch.randn(4, 5, 16)
    opt = tdd_fx.optimize(model, (x,))
    report = opt.tdd_report
    assert [(s.pattern, s.status) for s in report.sites] == [("reshape", "rewritten")]
    assert "x.shape[1] == 5" in report.guards, report.guards
    assert "x.dim() == 3" in report.guards
    assert "x.shape[1] == 5" in str(report)  # the table lists the guards too
    assert len(_canonical(opt)) == 1
    assert_equivalent(opt, model, (x,))
    # the guard pins the time size only: another batch size runs the rewrite
    x_b = torch.randn(2, 5, 16)
    torch.testing.assert_close(_no_warning_call(opt, x_b), model(x_b))


def test_failing_guard_runs_the_original_and_warns_once() -> None:
    model = SizeBranch().eval()
    opt = tdd_fx.optimize(model, (torch.randn(4, 5, 16),))
    x7 = torch.randn(3, 7, 16)
    with pytest.warns(RuntimeWarning, match=re.escape("x.shape[1] == 5")) as caught:
        first = opt(x7)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    torch.testing.assert_close(first, model(x7))
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        second = opt(x7)
        x1 = torch.randn(3, 1, 16)  # the other branch of the original, also through the fallback
        third = opt(x1)
    assert [str(w.message) for w in again] == []
    torch.testing.assert_close(second, model(x7))
    torch.testing.assert_close(third, model(x1))
    assert third.shape == (3, 1, 8)
    # and the example's size still runs the rewritten graph
    x5 = torch.randn(3, 5, 16)
    torch.testing.assert_close(opt(x5), model(x5))


def test_fallback_follows_train_and_eval_of_the_optimized_module() -> None:
    model = SizeBranch(p=0.5).train()
    opt = tdd_fx.optimize(model, (torch.randn(4, 5, 16),))
    assert opt.training
    x7 = torch.randn(3, 7, 16)
    reference = copy.deepcopy(model).eval()
    opt.eval()
    with pytest.warns(RuntimeWarning):
        a = opt(x7)  # the fallback path, with dropout off
    b = opt(x7)
    torch.testing.assert_close(a, reference(x7))
    torch.testing.assert_close(a, b)
    assert model.training  # the original was not switched
    opt.train()
    torch.manual_seed(3)
    c = opt(x7)
    assert not torch.allclose(c, a)  # dropout is back on in the fallback
    torch.manual_seed(3)
    torch.testing.assert_close(c, model(x7))  # the same masks as the original's train mode


# --- data-dependent control flow: partial tracing ----------------------------------------------

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
        if x.sum() > 0:  # data-dependent: the root cannot be traced
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
        if isinstance(mask, torch.Tensor):  # false for a proxy: the classic fx trap
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


def test_data_dependent_root_gets_its_children_optimized() -> None:
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
    assert any(f"test_capture.py:{line}" in n and "cannot trace DataRoot" in n
               for n in report.notes), report.notes
    assert any(n.startswith("traced its submodules instead") and n.endswith(": enc, head")
               for n in report.notes), report.notes
    assert report.verified is True
    assert type(opt) is DataRoot
    assert isinstance(opt.enc, fx.GraphModule) and isinstance(opt.head, fx.GraphModule)
    assert len(_canonical(opt.enc)) == 2 and len(_canonical(opt.head)) == 1
    assert list(opt.state_dict()) == list(model.state_dict())
    assert [id(p) for p in opt.parameters()] == [id(p) for p in model.parameters()]
    assert_equivalent(opt, model, (x_pos,))
    assert_equivalent(opt, model, (x_neg,))
    x_other = torch.randn(2, 9, 16)  # the children's guards pin the rank only
    torch.testing.assert_close(_no_warning_call(opt, x_other), model(x_other))


def test_untraceable_child_recurses_into_grandchildren() -> None:
    model = DeepRoot()
    x_pos, x_neg = _branch_inputs()
    opt = tdd_fx.optimize(model, (x_pos,))
    report = opt.tdd_report
    assert [(s.module, s.status) for s in report.sites] == [
        ("mid.enc.td1.fc", "rewritten"), ("mid.enc.td2.fc", "rewritten"),
        ("mid.post.fc", "rewritten"), ("head.fc", "rewritten")], str(report)
    mid_line = _line_of(DataMid.forward, "if x.mean() > 0")
    assert any(n.startswith("mid: cannot trace DataMid") and f"test_capture.py:{mid_line}" in n
               for n in report.notes), report.notes
    assert any(n.endswith(": mid.enc, mid.post, head") for n in report.notes), report.notes
    assert type(opt) is DeepRoot and type(opt.mid) is DataMid
    assert isinstance(opt.mid.enc, fx.GraphModule) and isinstance(opt.mid.post, fx.GraphModule)
    assert list(opt.state_dict()) == list(model.state_dict())
    assert [id(p) for p in opt.parameters()] == [id(p) for p in model.parameters()]
    assert_equivalent(opt, model, (x_pos,))
    assert_equivalent(opt, model, (x_neg,))


def test_keyword_tensor_call_leaves_that_child_as_is() -> None:
    model = KeywordRoot()
    x_pos, x_neg = _branch_inputs()
    opt = tdd_fx.optimize(model, (x_pos,))
    report = opt.tdd_report
    assert [s.module for s in report.rewritten] == ["enc.td1.fc", "enc.td2.fc"], str(report)
    assert not any(s.module.startswith("child") for s in report.sites)
    assert type(opt.child) is Masked and not isinstance(opt.child, fx.GraphModule)
    assert opt.child.fc.weight is model.child.fc.weight
    assert isinstance(opt.enc, fx.GraphModule)
    assert list(opt.state_dict()) == list(model.state_dict())
    assert_equivalent(opt, model, (x_pos,))
    assert_equivalent(opt, model, (x_neg,))


def test_keyword_tensor_behind_isinstance_is_never_silently_dropped() -> None:
    """A traceable root passing a keyword tensor into `if isinstance(mask, Tensor)`: whatever the
    tracer makes of it, the result must still apply the mask."""

    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.child = Masked()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.child(x, mask=(x[..., 0] > 0).float())

    model = Root()
    x = torch.randn(4, 6, 8)
    opt = tdd_fx.optimize(model, (x,))
    assert not opt.tdd_report.rewritten or opt.tdd_report.verified is True  # never unverified
    assert_equivalent(opt, model, (x,))
    x2 = torch.randn(2, 3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(opt(x2), model(x2))


# --- no leaks ----------------------------------------------------------------------------------

def test_plain_symbolic_trace_is_unaffected() -> None:
    """Our tracer's proxies know their values; torch.fx's own must not learn that from us."""
    tdd_fx.optimize(Sandwich("len_rank"), (torch.randn(2, 3, 16),))
    tdd_fx.optimize(Sandwich("iterate_unbind"), (torch.randn(2, 3, 16),))
    with pytest.raises(RuntimeError, match="len"):
        fx.symbolic_trace(Sandwich("len_rank"))
    with pytest.raises(fx.proxy.TraceError):
        fx.symbolic_trace(Sandwich("dim_rank"))
    plain = Sandwich("plain")
    gm = fx.symbolic_trace(plain)
    assert not any(n.target is time_distributed_dense for n in gm.graph.nodes)
    assert not any("tdd_source" in n.meta for n in gm.graph.nodes)
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(gm(x), plain(x))
