"""Issue 12: every way a result could silently differ from the original, one regression test per
class (``test_cNN_...``), each written as a hostile user checks it: build the small model,
``opt = tdd_fx.optimize(model, (x,))``, then compare ``opt`` with the original on fresh inputs at
other batch/time sizes, batch 1 and non-contiguous layouts, in eval and in train mode with the
same seed, outputs and gradients (and what the call wrote into its inputs); the original and the
example inputs must come back unchanged from ``optimize``.  Either the result is equal, or the site
is not rewritten / the call runs the original with a reason — never a silently different result.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

import tdd_fx

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# the hostile user's check


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def strided(x: Tensor) -> Tensor:
    """The same values laid out non-contiguously (axes reversed in memory)."""
    dims = list(range(x.dim()))[::-1]
    return x.permute(*dims).contiguous().permute(*dims)


def _state(model: nn.Module) -> list[tuple[str, Tensor]]:
    return [(k, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()]


def _restore(model: nn.Module, state: list[tuple[str, Tensor]]) -> None:
    with torch.no_grad():
        live = model.state_dict(keep_vars=True)
        for k, v in state:
            if live[k].shape == v.shape and live[k].dtype == v.dtype:
                live[k].copy_(v)


def results(model: nn.Module, xs: Sequence[Any], seed: int, grad: bool = True) -> dict[str, Any]:
    """Outputs (tensors and Python values), gradients of a fixed projection w.r.t. parameters
    and floating inputs, and the inputs as the call left them."""
    xs = [x.detach().clone().requires_grad_(grad and x.is_floating_point())
          if isinstance(x, Tensor) else x for x in xs]
    torch.manual_seed(seed)
    out = model(*xs)
    leaves = tree_leaves(out)
    res: dict[str, Any] = {f"out{i}": (v.detach() if isinstance(v, Tensor) else v)
                           for i, v in enumerate(leaves)}
    tensors = [v for v in leaves if isinstance(v, Tensor) and v.requires_grad]
    wrt = [p for p in model.parameters() if p.requires_grad]
    wrt += [x for x in xs if isinstance(x, Tensor) and x.requires_grad]
    if grad and tensors and wrt:
        loss = sum((t.double() * torch.linspace(-1, 1, t.numel(), dtype=torch.float64)
                    .view(t.shape)).sum() for t in tensors)
        for i, g in enumerate(torch.autograd.grad(loss, wrt, allow_unused=True)):
            res[f"grad{i}"] = None if g is None else g.detach()
    for i, x in enumerate(xs):
        if isinstance(x, Tensor):
            res[f"input{i} after"] = x.detach()
    return res


def assert_same_results(got: dict[str, Any], want: dict[str, Any], where: str,
                        rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert got.keys() == want.keys(), f"{where}: {sorted(got)} != {sorted(want)}"
    for k, a in want.items():
        b = got[k]
        if isinstance(a, Tensor) and isinstance(b, Tensor):
            assert a.dtype == b.dtype, f"{where}: {k} dtype {b.dtype} != {a.dtype}"
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol, equal_nan=True,
                                       msg=lambda m, k=k: f"{where}: {k}: {m}")
        else:
            assert type(a) is type(b) and a == b, f"{where}: {k}: {b!r} != {a!r}"


def compare(opt: nn.Module, model: nn.Module, xs: Sequence[Any], train: bool, where: str = "",
            seed: int = 7, grad: bool = True, **tol: float) -> None:
    """``opt`` and ``model`` in the same mode on the same inputs, same seed, same buffers."""
    saved = [(m, _state(m)) for m in (model, opt)]

    def restore() -> None:
        for m, st in saved:
            _restore(m, st)

    model.train(train)
    opt.train(train)
    try:
        try:
            want = results(model, xs, seed, grad)
        except Exception as exc:  # the original fails here: so must the optimized model
            restore()
            with pytest.raises(type(exc)):
                results(opt, xs, seed, grad)
            return
        restore()
        got = results(opt, xs, seed, grad)
        assert_same_results(got, want, f"{where} ({'train' if train else 'eval'})", **tol)
    finally:
        restore()


def hostile(model: nn.Module, example: tuple, fresh: Sequence[tuple] = (),
            modes: Sequence[bool] = (False, True), grad: bool = True, **tol: float) -> nn.Module:
    """optimize, then compare on the example and on every ``fresh`` input set, in each mode."""
    state = _state(model)
    flags = [m.training for m in model.modules()]
    saved_inputs = [x.clone() if isinstance(x, Tensor) else x for x in example]
    strides = [x.stride() if isinstance(x, Tensor) else None for x in example]
    opt = tdd_fx.optimize(model, example)
    for (k, a), (_, b) in zip(_state(model), state, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), f"optimize changed the original's {k}"
    assert [m.training for m in model.modules()] == flags, "optimize changed training flags"
    for x, y, s in zip(example, saved_inputs, strides):
        if isinstance(x, Tensor):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True,
                                       msg="optimize changed an example input")
            assert x.stride() == s, "optimize changed an example input's layout"
    mode0 = model.training
    try:
        for train in modes:
            for i, xs in enumerate([example, *fresh]):
                compare(opt, model, xs, train, f"input set {i}", grad=grad, **tol)
    finally:
        model.train(mode0)
        opt.train(mode0)
    return opt


def statuses(opt: nn.Module) -> list[str]:
    return [s.status for s in opt.tdd_report.sites]


class Fold(nn.Module):
    """``fc(x.view(-1, F)).view(B, -1, O)`` (a reshape site)."""

    def __init__(self, f: int = 6, o: int = 5) -> None:
        super().__init__()
        self.fc = nn.Linear(f, o)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x.contiguous().view(-1, x.size(-1)))
        return y.view(x.size(0), -1, y.size(-1))


# ---------------------------------------------------------------------------------------------
# 1. loop length feeding Python values


class LoopCounts(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Any:
        outs = [self.fc(x[:, t]) for t in range(x.size(1))]
        y = torch.stack(outs, 1)
        if self.kind == "mean":
            return y.sum(1) / len(outs)
        if self.kind == "middle":
            return y, outs[len(outs) // 2]
        if self.kind == "count":
            return y, len(outs)
        return y * len(outs)  # "scaled"


@pytest.mark.parametrize("kind", ["mean", "middle", "count", "scaled"])
def test_c01_loop_length_feeding_python_values_is_right_at_other_lengths(kind):
    """Class 1: re-rolling a loop must not release the length guard while Python values derived
    from the loop (``len(outs)``, ``outs[len(outs) // 2]``, a mean over the steps) stay
    constants of the example."""
    model = LoopCounts(kind)
    hostile(model, (rand(2, 4, 6),),
            [(rand(2, 3, 6, seed=1),), (rand(3, 7, 6, seed=2),), (rand(1, 4, 6, seed=3),),
             (strided(rand(3, 5, 6, seed=4)),)])


# ---------------------------------------------------------------------------------------------
# 2. an unchecked axis in cat-of-unsqueeze loops


class CatUnsqueeze(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, A, T, F)
        return torch.cat([self.fc(x[:, :, t]).unsqueeze(1) for t in range(x.size(2))], 2)


def test_c02_cat_of_unsqueeze_proved_at_size_one_is_right_at_size_two():
    """Class 2: a loop proved where the kept axis has size 1 must not give another shape (or
    order) when that axis has size 2."""
    hostile(CatUnsqueeze(), (rand(2, 1, 4, 6),),
            [(rand(2, 2, 4, 6, seed=1),), (rand(3, 1, 4, 6, seed=2),), (rand(1, 3, 4, 6, seed=3),),
             (strided(rand(2, 2, 4, 6, seed=4)),)])


# ---------------------------------------------------------------------------------------------
# 3. verification cannot be blinded


def _sabotage():
    from test_verify import by_module, sabotage, scaled
    return sabotage, scaled, by_module


class FixedFold(nn.Module):
    """A fold with literal sizes: no other size is accepted, only the example's."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.view(20, 6)).view(4, 5, 5)


@pytest.mark.parametrize("make", [Fold, FixedFold])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e8])
def test_c03_non_finite_or_huge_example_values_do_not_blind_verification(bad, make):
    """Class 3: one NaN, Inf or 1e8 in the example must not switch the comparison off (also
    when no other size can be tried): a rewrite 1% wrong is still rolled back, and the result
    equals the original."""
    sabotage, scaled, by_module = _sabotage()
    model = make().eval()
    x = rand(4, 5, 6)
    x[1, 2, 3] = bad
    opt, _ = sabotage(model, (x,), "fc", scaled(1.01))
    assert by_module(opt.tdd_report)["fc"].status == "rolled_back", str(opt.tdd_report)
    for train in (False, True):
        compare(opt, model, (rand(4, 5, 6, seed=1),), train)
        compare(opt, model, (x,), train, grad=False)
    if make is Fold:
        compare(opt, model, (rand(3, 7, 6, seed=1),), False)
    hostile(model, (x,), [(rand(4, 5, 6, seed=2),)], grad=False)  # unsabotaged: equal


class Noise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Fold()
        self.drop = nn.Dropout(0.3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inner(x)
        return self.drop(h + 0.5 * torch.randn_like(h))


def test_c03_random_ops_do_not_widen_the_tolerance():
    """Class 3: random ops in forward (``randn_like``, dropout): the float64 reference replays
    the same numbers, so a 1% wrong rewrite is rolled back and a right one verifies tightly."""
    sabotage, scaled, by_module = _sabotage()
    model = Noise().train()
    x = rand(4, 5, 6)
    opt, _ = sabotage(model, (x,), "inner.fc", scaled(1.01))
    assert by_module(opt.tdd_report)["inner.fc"].status == "rolled_back", str(opt.tdd_report)
    opt = hostile(model, (x,), [(rand(3, 7, 6, seed=1),), (strided(rand(1, 5, 6, seed=2)),)])
    assert statuses(opt) == ["rewritten"]
    assert opt.tdd_report.max_error < 1e-5


def wrong_unless_time(x: Tensor, t: int) -> Tensor:
    return x if x.shape[1] == t else x * 1.01


class PairPool(nn.Module):
    """Pairwise pooling over time: the model rejects an odd number of steps."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Fold()

    def forward(self, x: Tensor) -> Tensor:
        h = self.inner(x)
        return h.view(h.size(0), h.size(1) // 2, 2, h.size(2)).mean(2)


def test_c03_model_rejecting_odd_times_is_still_verified_at_another_time():
    """Class 3: when the trial input with another time size is rejected by the model (odd T),
    verification tries another time size rather than varying the batch only."""
    from test_verify import _after
    sabotage, _, by_module = _sabotage()
    model = PairPool().eval()
    opt, _ = sabotage(model, (rand(2, 4, 6),), "inner.fc",
                      lambda rw, node: _after(rw, node, wrong_unless_time, 4))
    assert by_module(opt.tdd_report)["inner.fc"].status == "rolled_back", str(opt.tdd_report)
    hostile(model, (rand(2, 4, 6),), [(rand(3, 6, 6, seed=1),)])


# ---------------------------------------------------------------------------------------------
# 4. a Python branch on self.training


class ModeBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.drop = nn.Dropout(0.25)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x.reshape(-1, 6)).view(x.size(0), x.size(1), 5)
        if self.training:
            return self.drop(h) * 2.0 + 1.0
        return torch.tanh(h)


@pytest.mark.parametrize("optimized_in", ["eval", "train"])
def test_c04_mode_branch_is_right_in_the_mode_used_after_optimize(optimized_in):
    """Class 4: a branch on ``self.training`` is not frozen at capture: ``opt.train()`` and
    ``opt.eval()`` both equal the original in that mode (same seed)."""
    model = ModeBranch().train(optimized_in == "train")
    hostile(model, (rand(2, 4, 6),), [(rand(3, 5, 6, seed=1),), (strided(rand(1, 4, 6, seed=2)),)])


# ---------------------------------------------------------------------------------------------
# 5. autocast inside forward and around the call


class AutocastInside(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.inner = Fold()
        self.fc2 = nn.Linear(5, 5)

    @torch.autocast("cpu", dtype=torch.bfloat16)
    def decorated(self, h: Tensor) -> Tensor:
        return self.inner(h)

    def forward(self, x: Tensor) -> Tensor:
        if self.how == "block":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = self.inner(x)
        elif self.how == "decorator":
            h = self.decorated(x)
        else:  # "no site": autocast around a product of the input with itself
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return x @ x.transpose(1, 2)
        return self.fc2(h.float().reshape(-1, 5)).view(x.size(0), -1, 5), h


@pytest.mark.parametrize("how", ["block", "decorator", "no site"])
def test_c05_autocast_inside_forward_keeps_dtype_and_values(how):
    """Class 5: a ``torch.autocast`` block or decorator inside forward is kept (the original
    returns bfloat16; so must the optimized model)."""
    model = AutocastInside(how)
    hostile(model, (rand(2, 4, 6),), [(rand(3, 5, 6, seed=1),), (strided(rand(1, 4, 6, seed=2)),)],
            rtol=1e-2, atol=1e-2)
    opt = tdd_fx.optimize(model, (rand(2, 4, 6),))
    assert opt(rand(2, 4, 6)).__class__ is model(rand(2, 4, 6)).__class__


class BiasAfterProduct(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.w = nn.Parameter(rand(5, 6, seed=3) / 3)
        self.b = nn.Parameter(rand(5, seed=4))

    def forward(self, x: Tensor) -> Tensor:
        if self.how == "matmul":
            return x @ self.w.t() + self.b
        if self.how == "einsum":
            return torch.einsum("btf,of->bto", x, self.w) + self.b
        return F.linear(x.reshape(-1, 6), self.w, self.b).view(x.size(0), -1, 5)  # "fold"


@pytest.mark.parametrize("how", ["matmul", "einsum", "fold"])
def test_c05_autocast_around_the_call_keeps_dtype_and_values(how):
    """Class 5: under autocast around the call, the bias-fused rewrite of ``x @ W.t() + b`` /
    einsum + b must not change the output's dtype or values."""
    model = BiasAfterProduct(how)
    x = rand(2, 4, 6)
    opt = hostile(model, (x,), [(rand(3, 5, 6, seed=1),)])
    assert opt.tdd_report.rewritten, str(opt.tdd_report)
    for xs in ((x,), (rand(3, 5, 6, seed=1),), (strided(rand(1, 4, 6, seed=2)),)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = results(model, xs, 7)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                got = results(opt, xs, 7)
        assert_same_results(got, want, "under autocast", rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# 6. dropout masks and layouts


class DropBeforeFold(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 5)
        self.drop = nn.Dropout(0.4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(self.drop(x).reshape(-1, 6))
        h = self.fc2(self.drop(torch.relu(h)))
        return self.drop(h.view(x.size(0), x.size(1), 5))


class DropChannelFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.drop = nn.Dropout(0.4)

    def forward(self, x: Tensor) -> Tensor:  # (B, F, T)
        return self.drop(self.fc(x.transpose(1, 2))).transpose(1, 2)


class DropLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.drop = nn.Dropout(0.4)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([self.drop(self.fc(x[:, t])) for t in range(x.size(1))], 1)


@pytest.mark.parametrize("make,example,fresh", [
    (DropBeforeFold, (2, 4, 6), [(3, 5, 6), (1, 4, 6)]),
    (DropChannelFirst, (1, 6, 4), [(3, 6, 4), (1, 6, 7)]),
    (DropLoop, (1, 4, 6), [(3, 4, 6), (1, 4, 6)]),
])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_c06_dropout_draws_the_same_mask_for_the_same_element(make, example, fresh, mode):
    """Class 6: in train mode with the same seed the optimized model draws the same dropout
    mask element for element as the original: non-contiguous inputs, channel-first data with
    batch 1, a loop with dropout optimized (in eval) on a batch-1 example and trained at 3."""
    model = make().train(mode == "train")
    sets = [(rand(*s, seed=i + 1),) for i, s in enumerate(fresh)]
    sets += [(strided(rand(*s, seed=i + 9)),) for i, s in enumerate([example, *fresh])]
    hostile(model, (rand(*example),), sets)


class DropContiguousCopy(nn.Module):
    """Dropout over a ``contiguous()`` copy of the input: on a contiguous example export records
    no copy (``contiguous()`` is a no-op there), so the graph draws the mask over the input
    itself, in *its* memory order."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(x.contiguous())
        return self.fc(h.reshape(-1, 6)).view(x.size(0), -1, 5)


def test_c06_dropout_mask_other_layout_in_train_mode():
    """Class 6, found by the property search: in train mode, a call with the example's values in
    another memory layout draws the original's mask (the graph draws over the input's memory
    order, the original over its contiguous copy: such a call runs the original, with a
    warning); a call in the example's layout still runs the rewritten graph."""
    model = DropContiguousCopy().train()
    example = (rand(2, 4, 6),)
    opt = hostile(model, example, [(strided(rand(2, 4, 6, seed=1)),),
                                   (strided(rand(3, 5, 6, seed=2)),)], modes=(True,))
    assert statuses(opt) == ["rewritten"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fall back in the example's layout
        compare(opt, model, (rand(3, 5, 6, seed=3),), True, "contiguous")


# ---------------------------------------------------------------------------------------------
# 7. aliasing: in-place ops on views, layout-dependent results


class InplaceOnFold(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(6, 6)
        self.drop = nn.Dropout(0.3, inplace=True)

    def forward(self, x: Tensor) -> Any:
        b, t = x.size(0), x.size(1)
        if self.kind == "relu_inplace_on_result":
            h = self.fc(x.reshape(-1, 6))
            F.relu(h, inplace=True)
            return h.view(b, t, 6)
        if self.kind == "dropout_inplace_on_folded_view":
            h = x * 1.0
            return self.fc(self.drop(h.reshape(-1, 6))).view(b, t, 6), h
        if self.kind == "relu_inplace_on_folded_input_view":
            v = x.view(-1, 6)
            y = self.fc(v)
            F.relu(v, inplace=True)  # writes the caller's tensor
            return y.view(b, t, 6)
        if self.kind == "update_through_other_view":
            h = x + 0.0  # keeps x's layout: the reshape below is a view only when x is contiguous
            y = self.fc(h.reshape(-1, 6))
            h.reshape(-1, 6).mul_(2.0)  # reaches h only through a view
            return y.view(b, t, 6), h
        if self.kind == "write_through_contiguous":  # found by the property search
            h = x * 1.0
            h.contiguous().mul_(2.0)  # a no-op on contiguous data (export records nothing)
            return self.fc(h.reshape(-1, 6)).view(b, t, 6)
        # "contiguous_copy_relied_on": the copy makes the in-place write private
        c = x.contiguous()
        y = self.fc(c.view(-1, 6)).view(b, t, 6)
        c.mul_(2.0)
        return y, c


@pytest.mark.parametrize("kind", ["relu_inplace_on_result", "dropout_inplace_on_folded_view",
                                  "relu_inplace_on_folded_input_view",
                                  "update_through_other_view", "contiguous_copy_relied_on",
                                  "write_through_contiguous"])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_c07_inplace_ops_on_views_give_the_originals_result_for_any_layout(kind, layout):
    """Class 7: in-place ops on a folded view, an update through another view after the fold,
    an in-place op relying on a copy: the result (and what the call writes into its input) is
    the original's for contiguous and non-contiguous inputs alike."""
    model = InplaceOnFold(kind)
    make = strided if layout == "strided" and "input_view" not in kind else (lambda t: t)
    other = (lambda t: t) if layout == "strided" else strided
    hostile(model, (make(rand(2, 4, 6)),),
            [(make(rand(3, 5, 6, seed=1)),), (other(rand(2, 4, 6, seed=2)),),
             (other(rand(1, 3, 6, seed=3)),)], grad=False)


class ContiguousViewThenSite(nn.Module):
    """``x.contiguous().view(-1, F)`` kept (the rows are flipped: not a site) before a site that
    is rewritten: on a contiguous example export records a bare ``view`` of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.contiguous().view(-1, x.size(-1))
        h = self.fc(rows).flip(0).view(x.size(0), -1, 4)
        return self.fc2(h.reshape(-1, 4)).view(x.size(0), -1, 3)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_c07_view_recorded_without_its_contiguous_copy_for_any_layout(layout):
    """Class 7, found by the property search: a ``view`` that export recorded without the
    ``contiguous()`` copy before it (a no-op on the example) must not make the optimized model
    raise "view size is not compatible" on an input in another layout, where the original
    copies; the call runs the original instead (a call in the example's layout runs the
    graph)."""
    model = ContiguousViewThenSite()
    make = strided if layout == "strided" else (lambda t: t)
    other = (lambda t: t) if layout == "strided" else strided
    opt = hostile(model, (make(rand(2, 4, 6)),),
                  [(other(rand(2, 4, 6, seed=1)),), (other(rand(3, 5, 6, seed=2)),)])
    assert statuses(opt).count("rewritten") == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fall back in the example's layout
        compare(opt, model, (make(rand(3, 5, 6, seed=3)),), False, "example's layout")


# ---------------------------------------------------------------------------------------------
# 8. the fallback uses the live weights


@pytest.mark.parametrize("how", ["load_state_dict_assign", "functional_call", "parametrization"])
def test_c08_fallback_runs_the_live_weights(how):
    """Class 8: a call that fails a guard runs the original code on the live module tree, so it
    sees weights assigned, swapped in by ``functional_call`` or parametrized after optimize."""
    model = LoopCounts("scaled")  # the loop's length is fixed: another length falls back
    opt = tdd_fx.optimize(model, (rand(2, 4, 6),))
    assert opt.tdd_report.rewritten, str(opt.tdd_report)
    new = {"fc.weight": rand(5, 6, seed=5), "fc.bias": rand(5, seed=6)}
    ref = LoopCounts("scaled")
    ref.load_state_dict(new)
    xs = [rand(2, 4, 6, seed=1), rand(2, 7, 6, seed=2), rand(1, 3, 6, seed=3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if how == "load_state_dict_assign":
            opt.load_state_dict({k: v.clone() for k, v in new.items()}, assign=True)
            got = [opt(x) for x in xs]
        elif how == "functional_call":
            got = [torch.func.functional_call(opt, new, (x,)) for x in xs]
        else:
            torch.nn.utils.parametrize.register_parametrization(opt.fc, "weight", _Times2())
            ref.fc.weight.data.mul_(2)
            ref.fc.bias.data.copy_(model.fc.bias)
            got = [opt(x) for x in xs]
    if how == "parametrization":
        ref.fc.weight.data.copy_(model.fc.weight * 2)
    for x, g in zip(xs, got):
        torch.testing.assert_close(g, ref(x))


class _Times2(nn.Module):
    def forward(self, w: Tensor) -> Tensor:
        return w * 2


# ---------------------------------------------------------------------------------------------
# 9. the sharing contract under dtype/device conversion


class WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Fold()
        self.bn = nn.BatchNorm1d(5)
        self.register_buffer("shift", torch.full((5,), 0.25))

    def forward(self, x: Tensor) -> Tensor:
        h = self.inner(x) + self.shift
        return self.bn(h.transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize("convert", ["double", "to_float64", "half_then_float"])
def test_c09_converting_the_optimized_model_keeps_it_equal_to_the_converted_original(convert):
    """Class 9: ``opt.double()`` / ``opt.to(...)`` convert the parameters the optimized model
    shares with the original; the optimized model then equals the original converted the same
    way (or says clearly why it cannot), and both stay usable."""
    import copy

    model = WithBuffers().eval()
    x = rand(2, 4, 6)
    opt = tdd_fx.optimize(model, (x,))
    assert opt.tdd_report.rewritten
    twin = copy.deepcopy(model)
    conv = {"double": lambda m: m.double(), "to_float64": lambda m: m.to(torch.float64),
            "half_then_float": lambda m: m.half().float()}[convert]
    conv(twin)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        conv(opt)
        dtype = torch.float64 if convert != "half_then_float" else torch.float32
        for xs in ((x.to(dtype),), (rand(3, 5, 6, seed=1, dtype=dtype),)):
            for train in (False, True):
                compare(opt, twin, xs, train, rtol=1e-3 if dtype == torch.float32 else 1e-7)
                compare(model, twin, xs, train, rtol=1e-3 if dtype == torch.float32 else 1e-7)


def test_c09_converting_the_original_keeps_the_optimized_model_consistent():
    """Class 9, the other way: ``model.double()`` converts the shared parameters; the optimized
    model follows (its buffers too) and equals the converted original."""
    import copy

    model = WithBuffers().eval()
    x = rand(2, 4, 6)
    opt = tdd_fx.optimize(model, (x,))
    twin = copy.deepcopy(model).double()
    model.double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for train in (False, True):
            compare(opt, twin, (x.double(),), train, rtol=1e-7)
            compare(model, twin, (x.double(),), train, rtol=1e-7)


# ---------------------------------------------------------------------------------------------
# 10. nothing the user owns changes during optimize


class Meddler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Fold()
        self.log: list[Any] = []
        self.seen: dict[str, Any] = {}
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.log.append(x.shape)
        self.seen["last"] = x.size(1)
        self.calls += 1
        x.mul_(2.0)  # writes the caller's tensor
        return self.inner(x)


def test_c10_optimize_changes_nothing_the_user_owns():
    """Class 10: optimize runs the user's forward; the example input it modifies in place, the
    Python list/dict/counter the model owns come back unchanged."""
    model = Meddler()
    x = rand(2, 4, 6)
    saved = x.clone()
    opt = tdd_fx.optimize(model, (x,))
    assert torch.equal(x, saved), "the example input changed"
    assert model.log == [] and model.seen == {} and model.calls == 0, \
        (model.log, model.seen, model.calls)
    y = rand(3, 5, 6, seed=1)
    a, b = y.clone(), y.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        torch.testing.assert_close(opt(b), model(a))
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# 11. an optional tensor omitted


class Optional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Fold()

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.inner(x)
        return h if mask is None else h * mask.unsqueeze(-1)


def test_c11_optional_tensor_given_then_omitted_falls_back():
    """Class 11: an optional tensor given in the example, then omitted (``opt(x)``), runs the
    original with a warning (never an internal AttributeError)."""
    model = Optional()
    x, mask = rand(2, 4, 6), torch.ones(2, 4)
    opt = hostile(model, (x, mask), [(rand(3, 5, 6, seed=1), torch.zeros(3, 5))])
    assert opt.tdd_report.rewritten
    with pytest.warns(RuntimeWarning, match="running the original forward"):
        got = opt(x)
    torch.testing.assert_close(got, model(x))


# ---------------------------------------------------------------------------------------------
# 12. composition: optimize twice, a new parent around an optimized child


class Parent(nn.Module):
    def __init__(self, child: nn.Module) -> None:
        super().__init__()
        self.child = child
        self.out = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.child(x))


@pytest.mark.parametrize("how", ["optimize_twice", "parent_around_optimized_child",
                                 "optimized_parent_of_optimized_child"])
def test_c12_composition_keeps_the_fallback(how):
    """Class 12: ``optimize(optimize(m))`` and a new parent around an optimized child keep the
    fallback: a call that fails a guard runs the original code (never a GuardError)."""
    child = LoopCounts("scaled")
    x = rand(2, 4, 6)
    fresh = [(rand(2, 7, 6, seed=1),), (rand(1, 3, 6, seed=2),), (strided(rand(3, 4, 6, seed=3)),)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if how == "optimize_twice":
            opt = tdd_fx.optimize(tdd_fx.optimize(child, (x,)), (x,))
            ref: nn.Module = child
        elif how == "parent_around_optimized_child":
            opt = Parent(tdd_fx.optimize(child, (x,)))
            ref = Parent(child)
            ref.out = opt.out
        else:
            ref = Parent(child)
            opt = tdd_fx.optimize(Parent(tdd_fx.optimize(child, (x,))), (x,))
            opt.out = ref.out
        for xs in [(x,), *fresh]:
            for train in (False, True):
                compare(opt, ref, xs, train)


# ---------------------------------------------------------------------------------------------
# 13. empty batch


class ChannelFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize("impl", ["linear", "linear_t", "linear_tc", "baddbmm", "conv", "matmul"])
def test_c13_empty_batch_gives_the_originals_empty_result(impl):
    """Class 13: a batch of 0 returns the original's empty result with every kernel."""
    x = rand(0, 6, 4)
    w, b = rand(5, 6, seed=1), rand(5, seed=2)
    want = F.linear(x.transpose(1, 2), w, b).transpose(1, 2)
    got = tdd_fx.time_distributed_dense(x, w, b, feature_dim=1, impl=impl)
    assert got.shape == want.shape == (0, 5, 4)
    model = ChannelFirst()
    opt = tdd_fx.optimize(model, (rand(2, 6, 4),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        compare(opt, model, (rand(0, 6, 4),), False)
        compare(opt, model, (rand(0, 6, 4),), True)


# ---------------------------------------------------------------------------------------------
# 14. untraceable model: the children keep their attributes


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.factor = 3.0
        self.note = "rare"

    def forward(self, x: Tensor, rare: bool = False) -> Tensor:
        y = self.fc(x.reshape(-1, 6)).view(x.size(0), -1, 5)
        return y * self.factor if rare else y


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Scaled()

    def forward(self, x: Tensor) -> Tensor:
        if float(x.abs().sum()) > 1e6:  # data-dependent: the model cannot be captured whole
            return self.block(x, rare=True) + len(self.block.note)
        return self.block(x)


def test_c14_untraceable_model_children_keep_their_attributes():
    """Class 14: when only subtrees are captured, the replaced children keep their own
    attributes, so a rarely taken branch that reads them still works."""
    model = Untraceable()
    opt = hostile(model, (rand(2, 4, 6),), [(rand(3, 5, 6, seed=1),)])
    assert opt.block.factor == 3.0 and opt.block.note == "rare"
    big = rand(2, 4, 6) * 1e6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        compare(opt, model, (big,), False, rtol=1e-5, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# 15. hooks registered after optimize, pruning


def test_c15_hooks_registered_on_the_optimized_model_fire():
    """Class 15: hooks registered on the optimized module's submodules after optimize fire (and
    their results count), or the call runs the original code — never silently skipped."""
    model = Fold()
    x = rand(2, 4, 6)
    opt = tdd_fx.optimize(model, (x,))
    assert opt.tdd_report.rewritten
    seen = []
    h1 = opt.fc.register_forward_hook(lambda m, i, o: seen.append("fwd") or o * 2)
    h2 = opt.fc.register_forward_pre_hook(lambda m, i: seen.append("pre"))
    grads = []
    h3 = opt.fc.register_full_backward_hook(lambda m, gi, go: grads.append(go[0].shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        y = opt(x.clone().requires_grad_())
        y.sum().backward()
    assert seen == ["pre", "fwd"], seen
    assert grads, "backward hook did not fire"
    torch.testing.assert_close(y, model(x) * 2)
    for h in (h1, h2, h3):
        h.remove()
    model.zero_grad()
    compare(opt, model, (rand(3, 5, 6, seed=1),), True)  # hooks gone: the graph again


def test_c15_pruning_a_submodule_of_the_optimized_model_then_training():
    """Class 15: ``prune`` on a submodule of the optimized model (a pre-hook and a new weight
    attribute), then several training steps, work and match the original pruned the same way."""
    import copy

    from torch.nn.utils import prune

    model = Fold()
    x = rand(2, 4, 6)
    twin = copy.deepcopy(model)
    opt = tdd_fx.optimize(model, (x,))
    prune.l1_unstructured(opt.fc, "weight", amount=0.5)
    prune.l1_unstructured(twin.fc, "weight", amount=0.5)
    for step in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            a = opt(rand(2, 4, 6, seed=step))
        b = twin(rand(2, 4, 6, seed=step))
        torch.testing.assert_close(a, b)
        a.square().sum().backward()
        b.square().sum().backward()
        torch.testing.assert_close(opt.fc.weight_orig.grad, twin.fc.weight_orig.grad)


# ---------------------------------------------------------------------------------------------
# 16. sparse and meta examples


@pytest.mark.parametrize("make,error", [
    (lambda: rand(2, 4, 6).to_sparse(), ValueError),
    (lambda: torch.empty(2, 4, 6, device="meta"), ValueError),
    (lambda: torch.quantize_per_tensor(rand(2, 4, 6), 0.1, 0, torch.quint8), ValueError),
])
@pytest.mark.parametrize("entry", ["optimize", "audit"])
def test_c16_sparse_meta_quantized_examples_are_clear_errors(make, error, entry):
    """Class 16 (and 17's quantized input): a clear, short ``ValueError``, no internal error."""
    fn = getattr(tdd_fx, entry)
    with pytest.raises(error) as info:
        fn(Fold(), (make(),))
    msg = str(info.value)
    assert len(msg) < 300 and "tdd_fx" in msg or "example input" in msg, msg


# ---------------------------------------------------------------------------------------------
# 17. messages and the report


def test_c17_inf_in_the_example_is_not_called_a_capture_failure():
    """Class 17: an Inf in the example is not reported as "the traced graph does not reproduce
    the model"; the site is rewritten (or says why not) and the result equals the original."""
    model = Fold()
    x = rand(4, 5, 6)
    x[0, 1, 2] = math.inf
    opt = tdd_fx.optimize(model, (x,))
    text = str(opt.tdd_report)
    assert "does not reproduce" not in text, text
    assert statuses(opt) == ["rewritten"], text
    assert opt.tdd_report.verified is True
    compare(opt, model, (x,), False, grad=False)
    json.dumps(opt.tdd_report.to_dict(), allow_nan=False)


class ParamOperand(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(rand(6, 3, seed=1))
        self.b = nn.Parameter(rand(3, 5, seed=2))

    def forward(self, x: Tensor) -> Tensor:
        return x @ (self.a @ self.b)


def test_c17_operand_built_from_parameters_is_not_called_computed_from_the_input():
    report = tdd_fx.audit(ParamOperand(), (rand(2, 4, 6),))
    reasons = " ".join(s.reason for s in report.sites)
    assert "computed from the input" not in reasons, str(report)
    assert "from parameters" in reasons, str(report)


def test_c17_scripted_model_gets_a_clear_type_error():
    scripted = torch.jit.script(nn.Linear(6, 5))
    with pytest.raises(TypeError, match="TorchScript"):
        tdd_fx.optimize(scripted, (rand(2, 4, 6),))


def test_c17_not_verified_always_comes_with_a_reason():
    """Class 17: a report saying "NOT verified" says why."""
    from tdd_fx.report import Report

    report = Report("optimize", "M", verified=False, unverified_reason="output[0]: NaN")
    assert "NOT verified (output[0]: NaN)" in report.summary()
    assert "NOT verified (reason not recorded)" in Report("optimize", "M", verified=False).summary()
    assert report.to_dict()["unverified_reason"] == "output[0]: NaN"
    text = str(tdd_fx.optimize(Fold()).tdd_report)  # no example: nothing verified, and why
    assert "NOT verified" in text and "no example inputs were given" in text, text


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_c17_report_to_dict_is_strict_json(bad):
    model = Fold()
    x = rand(4, 5, 6)
    x[0, 0, 0] = bad
    opt = tdd_fx.optimize(model, (x,))
    json.dumps(opt.tdd_report.to_dict(), allow_nan=False)
    from tdd_fx.report import Report, Site
    r = Report("optimize", "M", verified=False, max_error=math.nan, tolerance_used=math.inf,
               sites=[Site("reshape", "rolled_back", "fc", reason="x", max_error=math.inf)])
    json.dumps(r.to_dict(), allow_nan=False)


class Literal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x.view(8, 6)).view(2, 4, 5)
        g = self.fc2(torch.relu(h).view(8, 5)).view(2, 4, 5)
        return self.fc2(g.reshape(8, 5)).reshape(2, 4, 5) + h


def test_c17_guards_are_listed_once():
    """Class 17: ``site.guards`` and ``report.guards`` list each guard once."""
    opt = tdd_fx.optimize(Literal(), (rand(2, 4, 6),))
    report = opt.tdd_report
    assert report.rewritten, str(report)
    assert len(report.guards) == len(set(report.guards)), report.guards
    for s in report.sites:
        assert len(s.guards) == len(set(s.guards)), s.guards
