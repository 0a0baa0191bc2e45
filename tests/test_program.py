"""The call-time path of an optimized module (tdd_fx/program.py) reached directly.

The compiled fast checks must accept exactly the calls the full check accepts (a fast ``True``
where the full check would refuse would run a graph outside what the capture covered); the
compiled state fetch must read the live module tree like ``getattr`` does.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import tdd_fx
from tdd_fx.program import MISS, CallMismatch, programs_of, tree_flags


class Folded(nn.Module):
    """Reshape sandwich with a literal time size (a fixed size) and a derived size (B*T)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        y = self.fc(x.reshape(x.size(0) * x.size(1), 6)) * scale
        return y.view(x.size(0), 4, 5)


class Pair(nn.Module):
    """Two inputs whose batch sizes must agree (one symbol, two places)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = self.fc(x.contiguous().view(-1, 6)).view(x.size(0), -1, 3)
        return z + y


def _full_check_passes(program, flat) -> bool:
    try:
        program.checker.check(flat)
    except CallMismatch:
        return False
    return True


@pytest.mark.parametrize("model,example,calls", [
    (Folded(), (torch.randn(2, 4, 6),),
     [(torch.randn(b, t, f),) for b, t, f in itertools.product((1, 2, 3, 7), (3, 4), (5, 6))]
     + [(torch.randn(2, 4, 6, dtype=torch.float64),), (torch.randn(2, 4),), ("text",)]),
    (Pair(), (torch.randn(2, 5, 6), torch.randn(2, 5, 3)),
     [(torch.randn(b, t, 6), torch.randn(b2, t2, 3))
      for b, t, b2, t2 in itertools.product((1, 2, 3), (4, 5), (1, 2, 3), (4, 5))]),
])
def test_fast_check_agrees_with_full_check(model, example, calls) -> None:
    opt = tdd_fx.optimize(model.eval(), example)
    assert opt.tdd_report.rewritten
    (program,) = [p for p in programs_of(opt) if not p.training]
    assert program.fast_check is not None
    for call in calls:
        flat = list(call)
        assert program.fast_check(flat) == _full_check_passes(program, flat), call


def test_fast_check_guards_a_fixed_size() -> None:
    """A size the rewrite relied on (the literal 4 in ``view(B, 4, O)``) is checked by both."""
    opt = tdd_fx.optimize(Folded().eval(), (torch.randn(2, 4, 6),))
    (program,) = [p for p in programs_of(opt) if not p.training]
    assert program.fast_check([torch.randn(3, 4, 6)])
    assert not program.fast_check([torch.randn(3, 5, 6)])


def test_state_fetch_is_live() -> None:
    """Parameters replaced after optimize (assign=True, a parametrization) are what runs."""
    model = Folded().eval()
    x = torch.randn(2, 4, 6)
    opt = tdd_fx.optimize(model, (x,))
    (program,) = [p for p in programs_of(opt) if not p.training]
    assert [t is getattr(opt.fc, n) for t, n in zip(program.fetch(opt), ("weight", "bias"))] \
        == [True, True]
    new = {"fc.weight": torch.randn(5, 6), "fc.bias": torch.randn(5)}
    opt.load_state_dict(new, assign=True)
    ref = Folded().eval()
    ref.load_state_dict(new)
    torch.testing.assert_close(opt(x), ref(x))
    torch.nn.utils.parametrize.register_parametrization(opt.fc, "weight", _Double())
    ref.fc.weight.data.mul_(2)
    torch.testing.assert_close(opt(x), ref(x))


class _Double(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


def test_tree_flags_follow_modules_order() -> None:
    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, nn.Sequential(nn.ReLU(), shared), nn.Dropout())
    model[1].eval()
    assert tree_flags(model) == tuple(m.training for m in model.modules())


def _guarded_model() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    model = Folded().eval()
    x = torch.randn(2, 4, 6)
    opt = tdd_fx.optimize(model, (x,))
    opt(x)  # the first call takes the full path and compiles the guarded one
    return model, opt, x


def test_guarded_path_is_compiled_after_the_first_call_and_runs_the_program() -> None:
    model, opt, _ = _guarded_model()
    d = opt.forward.dispatch
    assert d.guarded is not None and not d.last.training
    for b in (2, 3, 5):  # (batch 1 is outside the captured range: export specialises it)
        x = torch.randn(b, 4, 6)
        got = d.guarded((x,), {})
        assert got is not MISS
        torch.testing.assert_close(got, model(x))


def _hook(*_):
    return None


CHANGES = {
    "a size outside the captured range": lambda opt, x: (opt, (torch.randn(1, 4, 6),), {}),
    "another argument": lambda opt, x: (opt, (x, 2.0), {}),
    "keyword call": lambda opt, x: (opt, (), {"x": x}),
    "a submodule in train mode": lambda opt, x: (opt.fc.train() and opt, (x,), {}),
    "a hook on a submodule": lambda opt, x: (opt.fc.register_forward_hook(_hook) and opt, (x,), {}),
    "a global hook": lambda opt, x: (
        nn.modules.module.register_module_forward_pre_hook(_hook) and opt, (x,), {}),
    "a replaced submodule": lambda opt, x: (setattr(opt, "fc", nn.Linear(6, 5)) or opt, (x,), {}),
    "converted state": lambda opt, x: (opt.double(), (x.double(),), {}),
}


@pytest.mark.parametrize("change", CHANGES)
def test_guarded_path_misses_every_change_the_full_path_checks(change) -> None:
    """Each change the full path refuses (or treats otherwise) makes the guarded path miss, and
    the call then gives what the original forward gives on the changed tree."""
    _, opt, x = _guarded_model()
    d = opt.forward.dispatch
    opt, args, kwargs = CHANGES[change](opt, x)
    try:
        assert d.guarded(args, kwargs) is MISS
        want = type(opt).forward(opt, *args, **kwargs)
        with torch.autocast("cpu", enabled=False):
            got = opt(*args, **kwargs)
        torch.testing.assert_close(got, want)
    finally:
        nn.modules.module._global_forward_pre_hooks.clear()


def test_guarded_path_misses_under_autocast() -> None:
    _, opt, x = _guarded_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert opt.forward.dispatch.guarded((x,), {}) is MISS


def test_a_replaced_submodule_runs_the_original_code_with_a_warning() -> None:
    """The graph inlines the captured submodule's code: after ``opt.fc = <another module>`` the
    original forward runs (before, the graph ran with whatever ``opt.fc.weight`` was)."""
    _, opt, x = _guarded_model()

    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 3 * super().forward(x)

    opt.fc = Scaled(6, 5)
    with pytest.warns(RuntimeWarning, match="fc was replaced after optimize"):
        got = opt(x)
    want = 3 * nn.functional.linear(x, opt.fc.weight, opt.fc.bias)
    torch.testing.assert_close(got, want)


def test_a_parametrization_registered_after_optimize_names_itself() -> None:
    """``register_parametrization`` swaps the submodule's class and adds a ``parametrizations``
    child: the original runs (with the parametrized weight), and the warning says what changed,
    not that no graph was captured for the mode."""
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    model, opt, x = _guarded_model()
    parametrize.register_parametrization(opt.fc, "weight", Doubled())
    with pytest.warns(RuntimeWarning, match="fc changed class after optimize .*parametrization"):
        got = opt(x)
    assert opt.fc.weight.shape == model.fc.weight.shape
    want = model.fc.weight  # the same Parameter, shared: the parametrization doubles it
    torch.testing.assert_close(opt.fc.weight, 2 * want)
    torch.testing.assert_close(got, type(model).forward(opt, x))


def test_a_submodule_added_after_optimize_is_named() -> None:
    _, opt, x = _guarded_model()
    opt.extra = nn.Identity()
    with pytest.warns(RuntimeWarning, match="submodule extra was added after optimize"):
        got = opt(x)
    torch.testing.assert_close(got, type(opt).forward(opt, x))


def test_copies_compile_their_own_guarded_path() -> None:
    import copy

    _, opt, x = _guarded_model()
    twin = copy.deepcopy(opt)
    assert twin.forward.dispatch.guarded is None
    torch.testing.assert_close(twin(x), opt(x))
    twin.fc.register_forward_hook(_hook)
    assert twin.forward.dispatch.guarded((x,), {}) is MISS
    assert opt.forward.dispatch.guarded((x,), {}) is not MISS
