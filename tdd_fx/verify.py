"""Numeric verification: outputs and gradients of the rewritten model against the original.

Tolerance rule (per output / gradient tensor): with ``ref`` the original model run in float64,
``orig`` the original and ``cand`` the candidate in the model's own dtype::

    max|cand - ref| <= 4 * max|orig - ref| + 64 * eps(dtype) * max|ref|

i.e. the rewrite may not be noticeably less accurate than the code it replaced.  Each run starts
from the same buffers and RNG seed (dropout draws the same masks), and every run is undone
afterwards: verification changes nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ._state import preserved
from .ops import GuardError

SEED = 0x7DD


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


def _cast(inputs: Sequence[Any], to64: bool) -> list[Any]:
    out = []
    for x in inputs:
        if isinstance(x, Tensor):
            x = x.detach().clone()
            if x.is_floating_point():
                if to64:
                    x = x.double()
                x.requires_grad_(True)
        out.append(x)
    return out


def run(model: nn.Module, inputs: Sequence[Any], to64: bool = False) -> dict[str, Tensor | None]:
    """Outputs and gradients (parameters and floating inputs, for a fixed random cotangent)."""
    xs = _cast(inputs, to64)
    with preserved([model]):  # backward inside: restoring buffers bumps their versions
        torch.manual_seed(SEED)
        with torch.enable_grad():
            out = model(*xs)
        flat, _ = tree_flatten(out)
        outs = [t for t in flat if isinstance(t, Tensor)]
        result: dict[str, Tensor | None] = {f"output[{i}]": o.detach() for i, o in enumerate(outs)}
        named = [(f"grad {n}", p) for n, p in model.named_parameters() if p.requires_grad]
        named += [(f"grad input[{i}]", x) for i, x in enumerate(xs)
                  if isinstance(x, Tensor) and x.requires_grad]
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
        return Verdict(False, float("inf"), f"outputs/gradients differ in kind: {missing[:4]}")
    worst = frac = 0.0
    for k, a in orig.items():
        c = cand[k]
        if a is None or c is None:
            if (a is None) != (c is None) and not _is_zero(a if c is None else c):
                return Verdict(False, float("inf"), f"{k}: present in only one model")
            continue
        if a.shape != c.shape:
            return Verdict(False, float("inf"), f"{k}: shape {tuple(c.shape)} != {tuple(a.shape)}")
        if not a.is_floating_point():
            if not torch.equal(a, c):
                return Verdict(False, float("inf"), f"{k}: values differ")
            continue
        r = ref.get(k) if ref is not None else None
        r64 = (r if r is not None and r.shape == a.shape else a).double()
        scale = float(r64.abs().max()) if r64.numel() else 0.0
        scale = scale if scale > 0 else 1.0
        e_orig = float((a.double() - r64).abs().max()) if a.numel() else 0.0
        e_cand = float((c.double() - r64).abs().max()) if c.numel() else 0.0
        if e_cand != e_cand:  # NaN
            if bool(torch.isnan(a).any()) and torch.equal(torch.isnan(a), torch.isnan(c)):
                continue
            return Verdict(False, float("inf"), f"{k}: NaN")
        eps = torch.finfo(c.dtype).eps
        tol = 4 * e_orig + 64 * eps * scale
        if k.startswith("output"):
            worst = max(worst, e_cand / scale)
        frac = max(frac, e_cand / tol)
        if e_cand > tol:
            return Verdict(False, e_cand / scale,
                           f"{k}: error {e_cand:.2e} vs the original's {e_orig:.2e} "
                           f"(against float64, scale {scale:.2e})", tolerance_used=e_cand / tol)
    return Verdict(True, worst, "", len(orig), frac)


def _is_zero(t: Tensor | None) -> bool:
    return t is not None and not bool(t.count_nonzero())


@dataclass
class Reference:
    """The original's (and its float64 copy's) outputs and gradients, computed once per plan
    entry and reused for every candidate that bisection tries."""

    mode: bool
    plan: list[tuple[bool, Sequence[Any]]]
    orig: list[dict[str, Tensor | None] | None]
    ref64: list[dict[str, Tensor | None] | None]
    failure: str = ""


def reference(original: nn.Module, input_sets: Iterable[Sequence[Any]],
              ref64: nn.Module | None) -> Reference:
    """Run the original on every input set in its mode, and on the first in the other mode."""
    sets = list(input_sets)
    mode = original.training
    plan = [(mode, s) for s in sets] + ([(not mode, sets[0])] if sets else [])
    ref = Reference(mode, plan, [], [])
    models = [m for m in (original, ref64) if m is not None]
    with preserved(models):
        for training, inputs in plan:
            if training != mode:  # the other mode, as opt.train()/opt.eval() would set it
                for m in models:
                    m.train(training)
            try:
                ref.orig.append(run(original, inputs))
            except Exception as exc:  # the original itself fails here: nothing to compare
                ref.orig.append(None)
                if training == mode and not ref.failure:
                    ref.failure = f"the original fails: {exc}"
            r = None
            if ref64 is not None:
                try:
                    r = run(ref64, inputs, to64=True)
                except Exception:
                    r = None
            ref.ref64.append(r)
    return ref


def verify(original: nn.Module, candidate: nn.Module, input_sets: Iterable[Sequence[Any]],
           ref64: nn.Module | None, ref: Reference | None = None) -> Verdict:
    """Compare ``candidate`` with ``original`` on every input set, in the model's mode, and on the
    first input set in the other mode too (``train()``/``eval()`` must behave as before)."""
    ref = ref if ref is not None else reference(original, input_sets, ref64)
    if ref.failure:
        return Verdict(False, float("inf"), ref.failure)
    worst, checked, frac = 0.0, 0, 0.0
    with preserved([candidate]):
        for (training, inputs), o, r in zip(ref.plan, ref.orig, ref.ref64):
            if o is None:
                continue
            if training != ref.mode:
                candidate.train(training)
            try:
                c = run(candidate, inputs)
            except GuardError:  # outside what the rewrite claims: the guard says so at run time
                continue
            except Exception as exc:
                return Verdict(False, float("inf"), f"the rewritten model fails: "
                                                    f"{type(exc).__name__}: {exc}")
            v = compare(o, c, r)
            tag = f"({'train' if training else 'eval'} mode, inputs {_shapes(inputs)})"
            if not v.ok:
                return Verdict(False, v.max_error, f"{v.detail} {tag}")
            worst, checked = max(worst, v.max_error), checked + v.checked
            frac = max(frac, v.tolerance_used)
    return Verdict(True, worst, "", checked, frac)


def _shapes(inputs: Sequence[Any]) -> str:
    return ", ".join("x".join(map(str, x.shape)) if isinstance(x, Tensor) else type(x).__name__
                     for x in inputs)


def alternative_inputs(model: nn.Module, example: Sequence[Any],
                       fixed: set[tuple[int, int]]) -> tuple[Any, ...] | None:
    """Inputs with other batch/time sizes that the original model accepts (None if none found).

    Leading axes are tried first (batch and time of batch-first data), then batch with the last
    axis (time of channel-first data), then batch alone.  Sizes a guard fixed are kept.
    """
    ranks = [x.dim() for x in example if isinstance(x, Tensor)]
    if not ranks or max(ranks) < 1:
        return None
    r = max(ranks)
    choices = [tuple(range(max(r - 1, 1))), (0, r - 1), (0,), tuple(range(1, r - 1)), (r - 1,)]
    tried: set[tuple[int, ...]] = set()
    for dims in choices:
        if not dims or dims in tried:
            continue
        tried.add(dims)
        alt = _resized(example, dims, fixed)
        if alt is None:
            continue
        try:
            with preserved([model]), torch.no_grad():
                model(*alt)
        except Exception:
            continue
        return alt
    return None


def _resized(example: Sequence[Any], dims: tuple[int, ...],
             fixed: set[tuple[int, int]]) -> tuple[Any, ...] | None:
    g = torch.Generator().manual_seed(SEED)
    new_size: dict[int, int] = {}
    out: list[Any] = []
    changed = False
    for i, x in enumerate(example):
        if not isinstance(x, Tensor) or x.dim() == 0:
            out.append(x)
            continue
        shape = list(x.shape)
        for d in dims:
            if d < x.dim() and (i, d) not in fixed and (shape[d] > 1 or d == 0):
                shape[d] = new_size.setdefault(shape[d], shape[d] + 3)  # a batch of 1 too
                changed = True
        out.append(_like(x, shape, g))
    return tuple(out) if changed else None


def _like(x: Tensor, shape: list[int], g: torch.Generator) -> Tensor:
    if x.is_floating_point() or x.is_complex():
        std = float(x.detach().double().std()) if x.numel() > 1 else 1.0
        mean = float(x.detach().double().mean()) if x.numel() else 0.0
        std = std if std == std and std > 0 else 1.0
        return (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(x)
    if x.dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 1)
    return torch.randint(lo, hi + 1, shape, generator=g, dtype=x.dtype)


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
