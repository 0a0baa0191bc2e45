"""Argument errors of optimize/audit: clear exceptions, and the original left untouched; and the
input contract: example inputs are one call of the model, like ``torch.export.export(model,
args, kwargs)`` -- positional arguments (tuple or list), ``example_kwargs``, nested
tuples/lists/dicts of tensors, and constant leaves (None, bool, int, float, str) held constant.
A call outside what was captured runs the original forward, with one RuntimeWarning."""

from __future__ import annotations

import dataclasses
import re
import warnings

import pytest
import torch
from conftest import assert_equivalent
from torch import nn
from torch.utils import _pytree as pytree

import tdd_fx

ENTRIES = ["optimize", "audit"]
FALLBACK = "running the original forward instead"

BUG_SHARED_SIZE = (
    "engine bug: program.InputChecker.check crashes (AttributeError: 'int' object has no "
    "attribute 'is_Integer') when one symbolic size is bound by two input axes (x and bias share "
    "B and T): every candidate fails verification, nothing is rewritten")


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


class Gated(nn.Module):
    """Keyword-only inputs: a per-feature gain, and an optional mask (None by default)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor, *, gain: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, f = x.shape
        y = self.fc(x.reshape(b * t, f)).view(b, t, -1)
        if gain is not None:
            y = y * gain
        if mask is not None:
            y = y * mask
        return y


class Constants(nn.Module):
    """Non-tensor arguments of every constant kind."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor, how: str, k: int, p: float, negate: bool,
                extra: torch.Tensor | None = None) -> torch.Tensor:
        b, t, f = x.shape
        y = self.fc(x.reshape(b * t, f)).view(b, t, -1) * (k * p)
        y = y.sum(-1) if how == "sum" else y.mean(-1)
        y = -y if negate else y
        return y if extra is None else y + extra


class DictIn(nn.Module):
    """A batch dict in, a dict of two tensors out."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["x"]
        b, t, f = x.shape
        h = self.fc(x.reshape(b * t, f)).view(b, t, -1) + batch["shift"]
        return {"logits": self.head(torch.tanh(h)), "hidden": h}


@dataclasses.dataclass
class PlainOut:
    """Not registered with pytree: torch.export cannot return it."""

    y: torch.Tensor
    h: torch.Tensor


@dataclasses.dataclass
class RegisteredOut:
    y: torch.Tensor
    h: torch.Tensor


torch.export.register_dataclass(RegisteredOut)


class Folded(nn.Module):
    def __init__(self, f: int, o: int) -> None:
        super().__init__()
        self.fc = nn.Linear(f, o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, f = x.shape
        return self.fc(x.reshape(b * t, f)).view(b, t, -1)


class DataclassOut(nn.Module):
    def __init__(self, out_type: type) -> None:
        super().__init__()
        self.out_type = out_type
        self.first = Folded(6, 4)
        self.second = Folded(4, 2)

    def forward(self, x: torch.Tensor) -> object:
        h = self.first(x)
        return self.out_type(self.second(torch.relu(h)), h)


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


def fallbacks(record: list[warnings.WarningMessage]) -> list[str]:
    """The messages of tdd_fx's "running the original forward" warnings."""
    return [str(w.message) for w in record
            if issubclass(w.category, RuntimeWarning) and FALLBACK in str(w.message)]


def call(module: nn.Module, args: tuple, kwargs: dict | None = None) -> tuple[object, list[str]]:
    """``module(*args, **kwargs)`` and the fallback warnings it raised."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = module(*args, **(kwargs or {}))
    return out, fallbacks(record)


def assert_same_outputs_and_grads(opt: nn.Module, model: nn.Module, args: tuple,
                                  kwargs: dict | None = None) -> None:
    """Outputs (any pytree, dataclasses included) and the gradients of the parameters and of
    every floating input leaf are equal; ``opt`` must run its program (no fallback)."""

    def run(m: nn.Module) -> tuple[list, list, list[str], object]:
        a, kw = pytree.tree_map_only(
            torch.Tensor, lambda t: t.detach().clone().requires_grad_(t.is_floating_point()),
            (args, kwargs or {}))
        torch.manual_seed(0)
        out, warned = call(m, a, kw)
        outs = [o for o in pytree.tree_leaves(_fields(out)) if isinstance(o, torch.Tensor)]
        loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)
        leaves = list(m.parameters()) + [t for t in pytree.tree_leaves((a, kw))
                                         if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return [o.detach() for o in outs], list(grads), warned, out

    ref_out, ref_grads, _, ref = run(model)
    out, grads, warned, got = run(opt)
    assert warned == [], warned
    assert type(got) is type(ref)
    if isinstance(ref, dict):
        assert list(got) == list(ref)
    for a, b in zip(ref_out, out, strict=True):
        torch.testing.assert_close(b, a)
    for a, b in zip(ref_grads, grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a)


def _fields(out: object) -> object:
    if dataclasses.is_dataclass(out):  # not asdict: it deep-copies the tensors
        return {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    return out


# --------------------------------------------------------------------------------------------
# the model argument


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
def test_torchscript_module_is_a_type_error(entry):
    scripted = torch.jit.script(One())
    with pytest.raises(TypeError, match="TorchScript"):
        getattr(tdd_fx, entry)(scripted, (x3(),))


@pytest.mark.parametrize("entry", ENTRIES)
def test_uninitialized_lazy_module_is_a_value_error_and_stays_uninitialized(entry):
    model = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(ValueError, match="uninitialized lazy modules") as info:
        getattr(tdd_fx, entry)(model, (x3(),))
    assert "(0)" in str(info.value)  # names the module
    assert model[0].has_uninitialized_params()


# --------------------------------------------------------------------------------------------
# example inputs: what is a TypeError


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("args,kwargs,where,kind", [
    ((x3(), object()), None, "args[1]", "object"),
    ((x3(), {1, 2}), None, "args[1]", "set"),
    ((x3(), [torch.zeros(2), nn.Linear(2, 2)]), None, "args[1][1]", "Linear"),
    (({"x": x3(), "extra": lambda: 0},), None, "args[0]['extra']", "function"),
    ((x3(),), {"mask": object()}, "mask", "object"),
    ((x3(),), {"opts": {"deep": [1, object()]}}, "opts['deep'][1]", "object"),
])
def test_leaf_neither_tensor_nor_constant_is_a_type_error_naming_its_position(
        entry, args, kwargs, where, kind):
    model = Net().train()
    before = state(model)
    with pytest.raises(TypeError) as info:
        getattr(tdd_fx, entry)(model, args, kwargs)
    msg = str(info.value)
    assert f"example input {where} is of type {kind}" in msg
    assert "tensors" in msg  # and says what is accepted
    assert_same_state(model, before)


def test_type_error_names_the_bad_position():
    with pytest.raises(TypeError, match=r"args\[1\] is of type object"):
        tdd_fx.optimize(Net(), (x3(), object()))


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("bad,match", [
    ({"x": x3()}, "example_kwargs"),  # a dict is not the positional arguments
    (3, "tuple of positional arguments"),
    ("x", "tuple of positional arguments"),
    (x3().tolist(), "no tensor"),  # nested floats only
    ((1.0, None, "a"), "no tensor"),
])
def test_example_inputs_of_the_wrong_kind_are_a_type_error(entry, bad, match):
    with pytest.raises(TypeError, match=match):
        getattr(tdd_fx, entry)(One(), bad)


@pytest.mark.parametrize("entry", ENTRIES)
def test_example_kwargs_not_a_mapping_is_a_type_error(entry):
    with pytest.raises(TypeError, match="example_kwargs must be a dict, got list"):
        getattr(tdd_fx, entry)(Gated(), (x3(),), [("gain", torch.ones(4))])


# --------------------------------------------------------------------------------------------
# example inputs: what is a ValueError (the model itself fails, or tensors tdd_fx cannot run)


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
@pytest.mark.parametrize("bad,shown", [
    ((x3(), None), "None"),  # a constant the model cannot add
    (([1.0, 2.0], torch.zeros(3, 4, 2)), "[1.0, 2.0]"),  # a list of floats where x goes
])
def test_constants_the_model_cannot_take_are_a_value_error(entry, bad, shown):
    """Constant leaves are accepted by the contract; the model's own failure on them is the
    ValueError, raised after BatchNorm and dropout ran -- and undone."""
    model = Net().train()
    before = state(model)
    with pytest.raises(ValueError, match="fails on the example inputs") as info:
        getattr(tdd_fx, entry)(model, bad)
    assert shown in str(info.value)
    assert isinstance(info.value.__cause__, (TypeError, AttributeError, RuntimeError))
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


@pytest.mark.parametrize("entry", ENTRIES)
def test_unexpected_keyword_is_a_value_error(entry):
    with pytest.raises(ValueError, match="fails on the example inputs") as info:
        getattr(tdd_fx, entry)(One(), (x3(),), {"mask": torch.ones(3, 4, 1)})
    assert "mask=(3, 4, 1):float32" in str(info.value)
    assert isinstance(info.value.__cause__, TypeError)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("make,match", [
    (lambda: x3().to_sparse(), "to_dense"),
    (lambda: torch.empty(3, 4, 6, device="meta"), "meta device"),
])
def test_tensors_tdd_fx_cannot_run_are_a_value_error(entry, make, match):
    with pytest.raises(ValueError, match=match) as info:
        getattr(tdd_fx, entry)(One(), (make(),))
    assert "args[0]" in str(info.value)


# --------------------------------------------------------------------------------------------
# accepted forms


def test_single_tensor_is_accepted():
    model = One().eval()
    x = x3()
    opt = tdd_fx.optimize(model, x)
    assert type(opt) is One
    assert len(opt.tdd_report.rewritten) == 1
    assert opt.tdd_report.verified is True
    assert opt.tdd_report.inputs == "(3, 4, 6):float32"
    assert_equivalent(opt, model, (x,))
    report = tdd_fx.audit(model, x)
    assert len(report.found) == 1


def test_list_of_positional_arguments_is_a_tuple_of_them():
    model = One().eval()
    by_list = tdd_fx.optimize(model, [x3()]).tdd_report
    by_tuple = tdd_fx.optimize(model, (x3(),)).tdd_report
    assert by_list.inputs == by_tuple.inputs == "(3, 4, 6):float32"
    assert [(s.status, s.where) for s in by_list.sites] == [(s.status, s.where)
                                                           for s in by_tuple.sites]
    assert by_list.verified is True


def test_list_of_tensors_is_accepted():
    model = Net().eval()
    opt = tdd_fx.optimize(model, list(good_inputs()))
    assert opt.tdd_report.verified is True
    assert {s.module for s in opt.tdd_report.rewritten} == {"fc", "out"}
    assert_equivalent(opt, model, good_inputs())


def test_float_constant_is_accepted_and_held_constant():
    model = Net().eval()
    opt = tdd_fx.optimize(model, (x3(), 3.0))
    report = opt.tdd_report
    assert report.inputs == "(3, 4, 6):float32, 3.0"
    assert {s.module for s in report.rewritten} == {"fc", "out"}
    assert report.verified is True
    x = x3(2, 7, 6)  # other batch and length: still the captured program
    out, warned = call(opt, (x, 3.0))
    assert warned == []
    torch.testing.assert_close(out, model(x, 3.0))
    for _ in range(2):  # another value: the original code, warned once
        out, warned_again = call(opt, (x, -1.0))
        torch.testing.assert_close(out, model(x, -1.0))
        warned += warned_again
    assert len(warned) == 1
    assert "args[1] is -1.0, captured at 3.0" in warned[0]


def test_constant_leaves_of_every_kind_are_held_constant():
    model = Constants().eval()
    x = x3()
    example = (x, "sum", 2, 0.5, True, None)
    opt = tdd_fx.optimize(model, example)
    report = opt.tdd_report
    assert report.inputs == "(3, 4, 6):float32, 'sum', 2, 0.5, True, None"
    assert len(report.rewritten) == 1 and report.verified is True
    assert_same_outputs_and_grads(opt, model, example)
    changed = {
        1: ((x, "mean", 2, 0.5, True, None), "args[1] is 'mean', captured at 'sum'"),
        2: ((x, "sum", 3, 0.5, True, None), "args[2] is 3, captured at 2"),
        3: ((x, "sum", 2, 0.25, True, None), "args[3] is 0.25, captured at 0.5"),
        4: ((x, "sum", 2, 0.5, False, None), "args[4] is False, captured at True"),
        # same value, other type: 1 is not True
        5: ((x, "sum", 2, 0.5, 1, None), "args[4] is 1, captured at True"),
        # a tensor where None was captured
        6: ((x, "sum", 2, 0.5, True, torch.ones(3, 4)), "args[5] is |captured at None"),
        # the default instead of an explicit None: another number of arguments
        7: ((x, "sum", 2, 0.5, True), "structure differs"),
    }
    for args, why in changed.values():
        out, warned = call(opt, args)
        torch.testing.assert_close(out, model(*args))
        assert len(warned) == 1, (why, warned)
        assert warned[0].startswith("tdd_fx: Constants: ")
        assert all(part in warned[0] for part in why.split("|")), (why, warned)


def test_tensor_where_none_was_captured_warns_once_without_its_values():
    model = Constants().eval()
    x = x3()
    opt = tdd_fx.optimize(model, (x, "sum", 2, 0.5, True, None))
    warned = []
    for extra in (torch.ones(3, 4), torch.zeros(3, 4), torch.full((3, 4), 2.0)):
        out, w = call(opt, (x, "sum", 2, 0.5, True, extra))
        torch.testing.assert_close(out, model(x, "sum", 2, 0.5, True, extra))
        warned += w
    assert len(warned) == 1, warned
    assert "args[5]" in warned[0] and "None" in warned[0]
    assert "tensor(" not in warned[0]


def test_example_kwargs():
    model = Gated().eval()
    x, gain = x3(), torch.linspace(0.5, 2.0, 4)
    opt = tdd_fx.optimize(model, (x,), {"gain": gain})
    report = opt.tdd_report
    assert report.inputs == "(3, 4, 6):float32, gain=(4,):float32"
    assert len(report.rewritten) == 1 and report.verified is True
    assert_same_outputs_and_grads(opt, model, (x,), {"gain": gain})
    audit = tdd_fx.audit(model, (x,), {"gain": gain})
    assert [s.status for s in audit.sites] == ["found"]


def test_example_kwargs_alone():
    model = Gated().eval()
    x, gain = x3(), torch.linspace(0.5, 2.0, 4)
    opt = tdd_fx.optimize(model, example_kwargs={"x": x, "gain": gain})
    assert opt.tdd_report.inputs == "x=(3, 4, 6):float32, gain=(4,):float32"
    assert len(opt.tdd_report.rewritten) == 1
    assert_same_outputs_and_grads(opt, model, (), {"gain": gain, "x": x})  # order is free
    # x positional is another call than the one captured
    out, warned = call(opt, (x,), {"gain": gain})
    torch.testing.assert_close(out, model(x, gain=gain))
    assert len(warned) == 1 and "omitted: x" in warned[0]


def test_dict_input_and_dict_output():
    model = DictIn().eval()
    batch = {"x": x3(), "shift": torch.linspace(-1, 1, 4)}
    opt = tdd_fx.optimize(model, (batch,))
    report = opt.tdd_report
    assert report.inputs == "{x: (3, 4, 6):float32, shift: (4,):float32}"
    assert {s.module for s in report.rewritten} == {"fc"}
    assert report.verified is True
    assert tdd_fx.graphs(opt).keys() == {""}  # captured whole
    assert_same_outputs_and_grads(opt, model, (batch,))
    other = {"x": x3(2, 9, 6), "shift": torch.zeros(4)}
    assert_same_outputs_and_grads(opt, model, (other,))
    # a key the capture did not see: the original code
    out, warned = call(opt, ({**batch, "unused": torch.ones(1)},))
    torch.testing.assert_close(out["logits"], model(batch)["logits"])
    assert len(warned) == 1 and "structure differs" in warned[0]


def test_registered_dataclass_output_is_captured_whole():
    model = DataclassOut(RegisteredOut).eval()
    x = x3()
    opt = tdd_fx.optimize(model, (x,))
    assert {s.module for s in opt.tdd_report.rewritten} == {"first.fc", "second.fc"}
    assert opt.tdd_report.verified is True
    assert tdd_fx.graphs(opt).keys() == {""}
    assert_same_outputs_and_grads(opt, model, (x,))


def test_unregistered_dataclass_output_captures_the_submodules():
    """export cannot return an unregistered class: the root keeps its code (and returns its
    own dataclass); its submodules are captured and rewritten."""
    model = DataclassOut(PlainOut).eval()
    x = x3()
    opt = tdd_fx.optimize(model, (x,))
    report = opt.tdd_report
    assert any(n.startswith("DataclassOut as a whole: torch.export could not capture it")
               and "PlainOut" in n for n in report.notes), report.notes
    assert any(re.fullmatch(r"captured its submodules instead, .*: first, second", n)
               for n in report.notes), report.notes
    assert {s.module for s in report.rewritten} == {"first.fc", "second.fc"}
    assert report.verified is True
    assert tdd_fx.graphs(opt).keys() == {"first", "second"}
    assert_same_outputs_and_grads(opt, model, (x,))


@pytest.mark.parametrize("mask_shape", [
    pytest.param((4,), id="per-feature"),
    pytest.param((3, 4, 1), id="per-step"),
])
def test_optional_mask_omitted_runs_the_original_with_one_warning(mask_shape):
    model = Gated().eval()
    x = x3()
    mask = (torch.rand(mask_shape, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    opt = tdd_fx.optimize(model, (x,), {"mask": mask})
    assert len(opt.tdd_report.rewritten) == 1
    assert_same_outputs_and_grads(opt, model, (x,), {"mask": mask})  # the program, no warning
    warned: list[str] = []
    for _ in range(3):
        out, w = call(opt, (x,))
        torch.testing.assert_close(out, model(x))
        warned += w
    assert len(warned) == 1, warned
    assert "omitted: mask" in warned[0] and "Gated" in warned[0]
    # None in place of the mask: another structure, warned once too
    out, w = call(opt, (x,), {"mask": None})
    torch.testing.assert_close(out, model(x, mask=None))
    assert len(w) == 1 and "mask is a NoneType, captured as a tensor" in w[0]
    # with the mask again: the program still runs
    assert_same_outputs_and_grads(opt, model, (x,), {"mask": mask})


# --------------------------------------------------------------------------------------------
# errors leave no trace


def test_errors_leave_no_trace():
    model = Net().train()
    before = state(model)
    for bad in [(x3(), object()), (x3(), torch.zeros(5, 5, 5)), (x3(), None)]:
        with pytest.raises((TypeError, ValueError)):
            tdd_fx.optimize(model, bad)
    assert_same_state(model, before)


def test_a_valid_call_after_errors_still_works():
    model = Net().train()
    before = state(model)
    for bad in [(x3(), object()), (x3(), torch.zeros(5, 5, 5))]:
        with pytest.raises((TypeError, ValueError)):
            tdd_fx.optimize(model, bad)
    opt = tdd_fx.optimize(model, good_inputs())
    assert_same_state(model, before)
    assert {s.module for s in opt.tdd_report.rewritten} == {"fc", "out"}
    assert opt.tdd_report.verified is True
