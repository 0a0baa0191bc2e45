"""Argument errors of optimize/audit: clear exceptions, and the original left untouched."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_equivalent
from torch import nn

import tdd_fx

ENTRIES = ["optimize", "audit"]


class Net(nn.Module):
    """Train-mode BatchNorm and dropout run *before* the second input is used, so a failure on
    the example inputs happens after state (running stats, RNG) was already touched."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, f = x.shape
        h = self.drop(self.bn(self.fc(x.reshape(b * t, f))))
        return self.out(h).view(b, t, -1) + bias


class One(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.contiguous().view(-1, x.size(-1))).view(x.size(0), -1, 3)


def x3(*shape: int) -> torch.Tensor:
    return torch.randn(*(shape or (3, 4, 6)), generator=torch.Generator().manual_seed(0))


def good_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return x3(), torch.zeros(3, 4, 2)


def state(model: nn.Module) -> dict:
    return {
        "sd": {k: v.clone() for k, v in model.state_dict().items()},
        "ids": [id(p) for p in model.parameters()],
        "flags": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def assert_same_state(model: nn.Module, before: dict) -> None:
    after = state(model)
    assert after["ids"] == before["ids"]
    assert after["flags"] == before["flags"]
    assert torch.equal(after["rng"], before["rng"])
    assert after["sd"].keys() == before["sd"].keys()
    for k, v in before["sd"].items():
        torch.testing.assert_close(after["sd"][k], v, rtol=0, atol=0, msg=k)
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("thing,name", [
    (lambda x: x, "function"),
    ("model", "str"),
    (nn.Linear, "type"),  # the class, not an instance
    (None, "NoneType"),
])
def test_not_a_module_is_a_type_error_naming_the_type(entry, thing, name):
    with pytest.raises(TypeError, match=name) as info:
        getattr(tdd_fx, entry)(thing, (x3(),))
    assert "Module" in str(info.value)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("bad", [
    ([1.0, 2.0], torch.zeros(3, 4, 2)),
    (x3(), 3.0),
    (x3(), None),
])
def test_non_tensor_example_inputs_are_a_type_error(entry, bad):
    model = Net().train()
    before = state(model)
    with pytest.raises(TypeError, match="tensor"):
        getattr(tdd_fx, entry)(model, bad)
    assert_same_state(model, before)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("bad", [{"x": x3()}, 3, "x", x3().tolist()])
def test_example_inputs_of_the_wrong_kind_are_a_type_error(entry, bad):
    model = One()
    with pytest.raises(TypeError):
        getattr(tdd_fx, entry)(model, bad)


def test_type_error_names_the_bad_position():
    with pytest.raises(TypeError, match=r"\[1\] float"):
        tdd_fx.optimize(Net(), (x3(), 3.0))


@pytest.mark.parametrize("entry", ENTRIES)
def test_inputs_the_model_fails_on_are_a_value_error(entry):
    model = Net().train()
    with torch.no_grad():
        model(*good_inputs())  # non-default running stats
    before = state(model)
    bad = (x3(), torch.zeros(5, 5, 5))  # fails after BatchNorm and dropout ran
    with pytest.raises(ValueError, match="fails on the example inputs") as info:
        getattr(tdd_fx, entry)(model, bad)
    msg = str(info.value)
    assert "(3, 4, 6)" in msg and "(5, 5, 5)" in msg  # says what the inputs were
    assert "RuntimeError" in msg  # and why the model failed
    assert isinstance(info.value.__cause__, RuntimeError)
    assert_same_state(model, before)


@pytest.mark.parametrize("entry", ENTRIES)
def test_wrong_feature_size_is_a_value_error(entry):
    model = One()
    before = state(model)
    with pytest.raises(ValueError, match="fails on the example inputs"):
        getattr(tdd_fx, entry)(model, (x3(3, 4, 7),))
    assert_same_state(model, before)


@pytest.mark.parametrize("entry", ENTRIES)
def test_wrong_number_of_inputs_is_a_value_error(entry):
    model = Net().eval()
    before = state(model)
    with pytest.raises(ValueError, match="fails on the example inputs"):
        getattr(tdd_fx, entry)(model, (x3(),))
    assert_same_state(model, before)


# --------------------------------------------------------------------------------------------
# accepted forms


def test_single_tensor_is_accepted():
    model = One().eval()
    x = x3()
    opt = tdd_fx.optimize(model, x)
    assert len(opt.tdd_report.rewritten) == 1
    assert opt.tdd_report.verified is True
    assert opt.tdd_report.inputs == "(3, 4, 6):float32"
    assert_equivalent(opt, model, (x,))
    report = tdd_fx.audit(model, x)
    assert len(report.found) == 1


def test_list_of_tensors_is_accepted():
    model = Net().eval()
    opt = tdd_fx.optimize(model, list(good_inputs()))
    assert opt.tdd_report.verified is True
    assert_equivalent(opt, model, good_inputs())


def test_errors_leave_no_trace_and_a_valid_call_still_works():
    model = Net().train()
    before = state(model)
    for bad in [(x3(), 3.0), (x3(), torch.zeros(5, 5, 5))]:
        with pytest.raises((TypeError, ValueError)):
            tdd_fx.optimize(model, bad)
    assert_same_state(model, before)
    opt = tdd_fx.optimize(model, good_inputs())
    assert opt.tdd_report.rewritten
    assert_same_state(model, before)
