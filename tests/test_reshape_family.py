"""The reshape family: every spelling is rewritten exactly; every near-miss is left alone."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_equivalent
from zoo import NEGATIVE, POSITIVE, UNRELATED, Body, make_input

import tdd_fx
from tdd_fx.ops import time_distributed_dense

aten = torch.ops.aten


def _canonical_nodes(opt: torch.nn.Module) -> list:
    """Canonical nodes of the graph the current mode runs (none when nothing was rewritten)."""
    if not tdd_fx.graphs(opt):
        return []
    return [n for n in tdd_fx.graph_of(opt).graph.nodes if n.target is time_distributed_dense]


RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
            aten.flatten.using_ints, aten.unflatten.int, aten.view_as.default,
            aten.contiguous.default, aten.transpose.int, aten.permute.default}


def _is_reshape(n: object) -> bool:
    return isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in RESHAPES


@pytest.mark.parametrize("name", sorted(POSITIVE))
@pytest.mark.parametrize("training", [False, True])
def test_spelling_is_rewritten(name: str, training: bool) -> None:
    fn, shape, n_dense = POSITIVE[name]
    model = Body(fn).train(training)
    x = make_input(shape)
    opt = tdd_fx.optimize(model, (x,))
    report = opt.tdd_report
    assert [s.status for s in report.sites] == ["rewritten"] * n_dense, str(report)
    assert report.verified is True
    assert len(_canonical_nodes(opt)) == n_dense
    # the sandwich is gone: no reshape/transpose node feeds or consumes a canonical node
    for node in _canonical_nodes(opt):
        neighbours = [node.args[0], *node.users]
        # BatchNorm1d keeps a local fold (flatten -> bn -> view_as): it normalises axis 1
        neighbours = [n for n in neighbours if not _local_fold_of_norm(n)]
        assert not any(_is_reshape(n) for n in neighbours), tdd_fx.graph_of(opt).code
    assert list(opt.state_dict()) == list(model.state_dict())
    assert_equivalent(opt, model, (x,))


def _local_fold_of_norm(n: torch.fx.Node) -> bool:
    norms = (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)
    if n.target == aten.flatten.using_ints:
        return any(u.target in norms for u in n.users)
    if n.target == aten.view_as.default:
        return n.args[0].target in norms
    return False


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_spelling_generalises_to_other_sizes(name: str) -> None:
    """A proof on symbolic sizes holds for other batch/time sizes (literal sizes are guarded)."""
    fn, shape, _ = POSITIVE[name]
    model = Body(fn).eval()
    opt = tdd_fx.optimize(model, (make_input(shape),))
    bigger = tuple(s + 3 if i < len(shape) - 1 and s != 16 else s for i, s in enumerate(shape))
    if shape[1] == 16:  # channel-first: features on axis 1, time last
        bigger = (shape[0] + 3, shape[1], shape[2] + 3)
    x = make_input(bigger)
    try:
        expected = model(x)
    except RuntimeError:  # the original itself only works at the example's sizes: the guard
        # fails, the original runs instead and raises its own error (never a silent answer)
        with pytest.warns(RuntimeWarning, match="relied on"), pytest.raises(RuntimeError) as info:
            opt(x)
        assert not isinstance(info.value, tdd_fx.GuardError)
        return
    if name == "literal_ints":
        pytest.fail("the literal spelling should not accept other sizes")
    torch.testing.assert_close(opt(x), expected)


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_near_miss_is_rejected_with_reason(name: str) -> None:
    fn, shape, words = NEGATIVE[name]
    model = Body(fn).eval()
    x = make_input(shape, name)
    report = tdd_fx.audit(model, (x,))
    assert report.sites, f"{name}: the near-miss should be reported"
    assert all(s.status == "rejected" for s in report.sites), str(report)
    assert any(words in s.reason for s in report.sites), str(report)
    opt = tdd_fx.optimize(model, (x,))
    assert not opt.tdd_report.rewritten
    assert not _canonical_nodes(opt)
    torch.testing.assert_close(opt(x), model(x))


@pytest.mark.parametrize("name", sorted(UNRELATED))
def test_unrelated_dense_is_left_alone(name: str) -> None:
    fn, shape = UNRELATED[name]
    model = Body(fn).eval()
    x = make_input(shape, name)
    opt = tdd_fx.optimize(model, (x,))
    assert not opt.tdd_report.rewritten
    assert not _canonical_nodes(opt)
    torch.testing.assert_close(opt(x), model(x))


def test_done_criterion_wrapper_chain() -> None:
    """The issue's acceptance model: one canonical node per Linear, nothing around them."""

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(16, 32)
            self.act = torch.nn.ReLU()
            self.fc2 = torch.nn.Linear(32, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc2(self.act(self.fc1(x.contiguous().view(-1, x.size(-1)))))
            return y.view(x.size(0), -1, 8)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.td = Wrapper()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.td(x)

    model = Model()
    x = torch.randn(3, 7, 16)
    opt = tdd_fx.optimize(model, (x,))
    report = opt.tdd_report
    assert [s.module for s in report.rewritten] == ["td.fc1", "td.fc2"]
    assert all("test_reshape_family.py:" in s.where for s in report.rewritten)
    gm = tdd_fx.graph_of(opt)
    ops = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [n.target for n in ops].count(time_distributed_dense) == 2
    assert not any(_is_reshape(n) for n in ops), gm.code
    assert {id(p) for p in opt.parameters()} == {id(p) for p in model.parameters()}
    assert list(opt.state_dict()) == list(model.state_dict())
    assert_equivalent(opt, model, (x,))
    assert "td.fc1 (" in str(report) and "rewritten" in str(report)


def test_region_stops_where_the_next_wrapper_begins() -> None:
    """TimeDistributed(Linear) then TimeDistributed(module with two parallel Linears, a GLU):
    each wrapper is its own region, and both are rewritten (the GLU's two Linears read the same
    folded rows and meet in a row-wise product)."""

    class TD(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.module = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.module(x.contiguous().view(-1, x.size(-1)))
            return y.contiguous().view(x.size(0), -1, y.size(-1))

    class GLU(torch.nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(d, d), torch.nn.Linear(d, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.fc1(x)) * self.fc2(x)

    model = torch.nn.Sequential(TD(torch.nn.Linear(6, 5)), TD(GLU(5)))
    x = torch.randn(3, 10, 6)
    opt = tdd_fx.optimize(model, (x,))
    assert [(s.module, s.status) for s in opt.tdd_report.sites] == [
        ("0.module", "rewritten"), ("1.module.fc1", "rewritten"), ("1.module.fc2", "rewritten")]
    assert_equivalent(opt, model, (x,))
    assert_equivalent(opt, model, (torch.randn(2, 7, 6),))
