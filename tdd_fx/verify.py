"""Numeric verification: outputs and gradients of the rewritten model against the original.

Tolerance rule (per output / gradient tensor): with ``ref`` the original model run in float64,
``orig`` the original and ``cand`` the candidate in the model's own dtype::

    max|cand - ref| <= 4 * max|orig - ref| + 64 * eps(dtype) * max|ref|

i.e. the rewrite may not be noticeably less accurate than the code it replaced.  Each run starts
from the same buffers and RNG seed (dropout draws the same masks), and every run is undone
afterwards: verification changes nothing.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ._state import preserved
from .inputs import Example

SEED = 0x7DD
#: the widest relative tolerance, whatever the original's own error against float64
CEILING = 1e-3


@dataclass
class Verdict:
    ok: bool
    #: max relative error of the outputs against float64 (gradients are in ``tolerance_used``)
    max_error: float = 0.0
    detail: str = ""
    checked: int = 0
    #: the largest fraction of its tolerance any output or gradient used (1.0 = at the limit)
    tolerance_used: float = 0.0


def fp64_reference(model: nn.Module) -> nn.Module | None:
    """A float64 copy of ``model`` (None when it cannot be copied)."""
    try:
        ref = copy.deepcopy(model)
    except Exception:
        return None
    return ref.double()


def _cast(example: Example, to64: bool) -> tuple[Example, list[Tensor]]:
    """Fresh copies of the inputs; floating ones require grad (and are float64 with ``to64``)."""
    grads: list[Tensor] = []

    def cast(x: Tensor) -> Tensor:
        x = x.detach().clone()
        if x.is_floating_point():
            if to64:
                x = x.double()
            x.requires_grad_(True)
            grads.append(x)
        return x

    return example.map(cast), grads


class ReplayRandom(TorchFunctionMode):
    """Inside the float64 reference run: every random op draws its numbers exactly as the
    model's own dtype would (same RNG consumption, same values, then widened), so the reference
    sees the same dropout masks and noise as the original and the rewritten model."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        x = args[0] if args else kwargs.get("input")
        if not (isinstance(x, Tensor) and x.dtype == torch.float64):
            return func(*args, **kwargs)
        if func in _DROPOUTS:
            rest = dict(zip(("p", "training", "inplace"), args[1:]))
            rest.update(kwargs)
            if not rest.get("training", True) or rest.get("p", 0.5) == 0:
                return func(*args, **kwargs)
            mask = func(torch.ones_like(x, dtype=self.dtype), rest.get("p", 0.5), True)
            return x * mask.to(x.dtype)
        if func in _LIKE:
            return func(x, *args[1:], **{**kwargs, "dtype": self.dtype}).to(torch.float64)
        if func in (torch.bernoulli, Tensor.bernoulli):
            return func(x.to(self.dtype), *args[1:], **kwargs).to(torch.float64)
        return func(*args, **kwargs)


_DROPOUTS = {F.dropout, F.alpha_dropout, F.feature_alpha_dropout, F.dropout1d, F.dropout2d,
             F.dropout3d, torch.dropout, torch.alpha_dropout}
_LIKE = {torch.randn_like, torch.rand_like}


def _own_dtype(model: nn.Module, example: Example) -> torch.dtype:
    for t in (*example.tensors(), *model.parameters()):
        if t.is_floating_point() and t.dtype != torch.float64:
            return t.dtype
    return torch.float32


def run(model: nn.Module, example: Example, to64: bool = False) -> dict[str, Tensor | None]:
    """Outputs and gradients (parameters and floating inputs, for a fixed random cotangent)."""
    ex, xs = _cast(example, to64)
    replay = ReplayRandom(_own_dtype(model, example)) if to64 else contextlib.nullcontext()
    with preserved([model]), warnings.catch_warnings():  # backward inside: restoring buffers
        if to64:  # bumps their versions; a float64 copy of an optimized model runs its original
            warnings.simplefilter("ignore", RuntimeWarning)  # code: our run, not the user's
        torch.manual_seed(SEED)
        with torch.enable_grad(), replay:
            out = ex.call(model)
        flat, _ = tree_flatten(out)
        outs = [t for t in flat if isinstance(t, Tensor)]
        result: dict[str, Tensor | None] = {f"output[{i}]": o.detach() for i, o in enumerate(outs)}
        named = [(f"grad {n}", p) for n, p in model.named_parameters() if p.requires_grad]
        named += [(f"grad input[{i}]", x) for i, x in enumerate(xs)]
        diff = [(i, o) for i, o in enumerate(outs) if o.requires_grad]
        if diff and named:
            cot = []
            for i, o in diff:
                g = torch.Generator().manual_seed(SEED + i)
                cot.append(torch.randn(o.shape, generator=g, dtype=torch.float64).to(o))
            grads = torch.autograd.grad([o for _, o in diff], [t for _, t in named], cot,
                                        allow_unused=True)
            for (name, _), gr in zip(named, grads):
                result[name] = None if gr is None else gr.detach()
    return result


def compare(orig: dict[str, Tensor | None], cand: dict[str, Tensor | None],
            ref: dict[str, Tensor | None] | None) -> Verdict:
    """Apply the tolerance rule to every output and gradient."""
    if orig.keys() != cand.keys():
        missing = sorted(set(orig) ^ set(cand))
        return _failed(f"outputs/gradients differ in kind: {missing[:4]}")
    worst = frac = 0.0
    overall = _overall_scale(ref or orig)
    for k, a in orig.items():
        r = ref.get(k) if ref is not None else None
        got = _compare_one(k, a, cand[k], r, overall)
        if isinstance(got, Verdict):
            return got
        if got is None:  # nothing to measure: equal non-floating values, or absent in both
            continue
        rel, used = got
        if k.startswith("output"):
            worst = max(worst, rel)
        frac = max(frac, used)
    return Verdict(True, worst, "", len(orig), frac)


def _failed(detail: str) -> Verdict:
    return Verdict(False, float("inf"), detail)


def _overall_scale(values: dict[str, Tensor | None]) -> float:
    """The model's largest floating value (1 when it has none)."""
    return max((_finite_max(t) for t in values.values()
                if t is not None and t.is_floating_point() and t.numel()), default=1.0)


def _finite_max(t: Tensor) -> float:
    """The largest finite magnitude (an Inf or NaN must not make every tolerance infinite)."""
    t = t.detach().double().abs()
    return float(t.nan_to_num(0.0, 0.0, 0.0).max()) if t.numel() else 0.0


def _non_finite_differ(a: Tensor, c: Tensor) -> str:
    """"" when ``c`` has NaN and Inf exactly where ``a`` has them (the same infinities);
    else what differs.  Only the finite elements are then compared numerically."""
    bad_a, bad_c = ~torch.isfinite(a), ~torch.isfinite(c)
    if not torch.equal(bad_a, bad_c):
        return "NaN/Inf in other places than in the original's"
    if bool(bad_a.any()):
        ai, ci = a[bad_a], c[bad_a]
        if not (torch.equal(ai.isnan(), ci.isnan())
                and torch.equal(ai.nan_to_num(0.0), ci.nan_to_num(0.0))):
            return "NaN/Inf differ from the original's"
    return ""


def _compare_one(k: str, a: Tensor | None, c: Tensor | None, r: Tensor | None,
                 overall: float) -> Verdict | tuple[float, float] | None:
    """One output or gradient: a failing verdict, None when there is nothing to measure, or
    (error relative to its scale, fraction of the tolerance used)."""
    if a is None or c is None:
        if (a is None) != (c is None) and not _is_zero(a if c is None else c):
            return _failed(f"{k}: present in only one model")
        return None
    if a.shape != c.shape:
        return _failed(f"{k}: shape {tuple(c.shape)} != {tuple(a.shape)}")
    if not a.is_floating_point():
        return None if torch.equal(a, c) else _failed(f"{k}: values differ")
    return _compare_float(k, a, c, r, overall)


def _max_error(t: Tensor, r64: Tensor) -> float:
    return float((t.double() - r64).abs().max()) if t.numel() else 0.0


def _compare_float(k: str, a: Tensor, c: Tensor, r: Tensor | None,
                   overall: float) -> Verdict | tuple[float, float] | None:
    """A floating tensor against the float64 reference ``r`` (or the original's own ``a``)."""
    r64 = (r if r is not None and r.shape == a.shape else a).double()
    differ = _non_finite_differ(a, c)
    if differ:
        return _failed(f"{k}: {differ}")
    finite = torch.isfinite(a)
    if not bool(finite.all()):  # the same NaN/Inf in both: compare every other element
        a, c, r64 = a[finite], c[finite], r64[finite]
    r64 = torch.where(torch.isfinite(r64), r64, a.double())  # float64 overflowed elsewhere
    scale = float(r64.abs().max()) if r64.numel() else 0.0
    scale = scale if scale > 0 else 1.0
    e_orig, e_cand = _max_error(a, r64), _max_error(c, r64)
    tol = _tolerance(e_orig, scale, overall, torch.finfo(c.dtype).eps)
    if e_cand > tol:
        return Verdict(False, e_cand / scale,
                       f"{k}: error {e_cand:.2e} vs the original's {e_orig:.2e} "
                       f"(against float64, scale {scale:.2e})", tolerance_used=e_cand / tol)
    return e_cand / scale, e_cand / tol


def _tolerance(e_orig: float, scale: float, overall: float, eps: float) -> float:
    """The largest error a candidate may have: the original's own error widens the tolerance,
    up to a ceiling no real error passes (relative to this tensor, or to the model's largest
    value for a tensor that is zero in exact arithmetic, like the gradient of a bias before a
    BatchNorm)."""
    floor = 64 * eps * scale
    return e_orig + min(3 * e_orig, max(CEILING * scale, 64 * eps * overall)) + floor


def _is_zero(t: Tensor | None) -> bool:
    return t is not None and not bool(t.count_nonzero())


@dataclass
class Reference:
    """The original's (and its float64 copy's) outputs and gradients on each input set, in the
    mode being verified; computed once and reused for every candidate bisection tries."""

    sets: list[Example]
    orig: list[dict[str, Tensor | None] | None]
    ref64: list[dict[str, Tensor | None] | None]
    failure: str = ""


def reference(original: nn.Module, input_sets: Iterable[Example],
              ref64: nn.Module | None) -> Reference:
    """Run the original (and its float64 copy) on every input set, in their current mode."""
    sets = list(input_sets)
    ref = Reference(sets, [], [])
    models = [m for m in (original, ref64) if m is not None]
    with preserved(models):
        for inputs in sets:
            try:
                ref.orig.append(run(original, inputs))
            except Exception as exc:  # the original itself fails here: nothing to compare
                ref.orig.append(None)
                if not ref.failure:
                    ref.failure = f"the original fails: {exc}"
            r = None
            if ref64 is not None:
                try:
                    r = run(ref64, inputs, to64=True)
                except Exception:
                    r = None
            ref.ref64.append(r)
    return ref


def verify(original: nn.Module, candidate: nn.Module, input_sets: Iterable[Example],
           ref64: nn.Module | None, ref: Reference | None = None) -> Verdict:
    """Compare ``candidate`` with ``original`` on every input set, both in their current
    modes."""
    ref = ref if ref is not None else reference(original, input_sets, ref64)
    if ref.failure:
        return Verdict(False, float("inf"), ref.failure)
    worst, checked, frac = 0.0, 0, 0.0
    with preserved([candidate]), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback is not a verified rewrite
        for inputs, o, r in zip(ref.sets, ref.orig, ref.ref64):
            if o is None:
                continue
            try:
                c = run(candidate, inputs)
            except Exception as exc:
                return Verdict(False, float("inf"), f"the rewritten model fails: "
                                                    f"{type(exc).__name__}: {exc}")
            v = compare(o, c, r)
            tag = f"(inputs {inputs.summary()})"
            if not v.ok:
                return Verdict(False, v.max_error, f"{v.detail} {tag}")
            worst, checked = max(worst, v.max_error), checked + v.checked
            frac = max(frac, v.tolerance_used)
    return Verdict(True, worst, "", checked, frac)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names = names
        self.got: dict[str, Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.name in self.names and isinstance(result, Tensor):
            self.got[n.name] = result.detach().clone()
        return result


def site_errors(before: fx.GraphModule, after: fx.GraphModule, pairs: dict[int, tuple[str, str]],
                inputs: Sequence[Any]) -> dict[int, float]:
    """Max relative difference of each site's result, before vs after the rewrite."""
    def record(gm: fx.GraphModule, names: set[str]) -> dict[str, Tensor]:
        rec = _Recorder(gm, names)
        with preserved([gm]), torch.no_grad():
            torch.manual_seed(SEED)
            rec.run(*inputs)
        return rec.got

    a = record(before, {p[0] for p in pairs.values()})
    b = record(after, {p[1] for p in pairs.values()})
    out: dict[int, float] = {}
    for i, (x, y) in pairs.items():
        if x in a and y in b and a[x].shape == b[y].shape and a[x].is_floating_point():
            scale = float(a[x].abs().max()) or 1.0
            out[i] = float((a[x].double() - b[y].double()).abs().max()) / scale
    return out


Check = Callable[[nn.Module], Verdict]
