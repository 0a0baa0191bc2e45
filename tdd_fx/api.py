"""``optimize`` and ``audit``: run the pipeline (see :mod:`tdd_fx.pipeline`) and wrap the result."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import pipeline as pl
from ._state import preserved
from .capture import copy_module_tree
from .families import FAMILIES, Family
from .inputs import Example, make_example
from .report import Report

__all__ = ["audit", "optimize"]

NO_INPUTS = ("no example inputs were given: torch.export needs them to capture the model, so "
             "nothing was examined; the model is returned unchanged and NOT verified")


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"tdd_fx expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("tdd_fx works on Python modules; a TorchScript module cannot be "
                        "captured by torch.export (optimize the module before scripting it)")
    lazy = [name or type(model).__name__ for name, m in model.named_modules()
            if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:
        raise ValueError(f"the model has uninitialized lazy modules ({', '.join(lazy)}): run it "
                         "once on real inputs before tdd_fx (running it here would initialize "
                         "them, changing your model)")


def _check_runs(model: nn.Module, example: Example) -> None:
    try:
        with preserved([model]), torch.no_grad():
            example.clone().call(model)
    except Exception as exc:
        raise ValueError(f"the model itself fails on the example inputs ({example.summary()}): "
                         f"{type(exc).__name__}: {exc}") from exc


def _prepare(model: Any, example_inputs: Any, example_kwargs: Any) -> Example | None:
    _check_model(model)
    example = make_example(example_inputs, example_kwargs)
    if example is not None:
        _check_runs(model, example)
    return example


def _site_guards(res: pl.ModeResult) -> None:
    """Each rewritten site names the sizes its proof fixed, as the user reads them
    (``args[0].shape[2] == 5``): where the spelling is time-distributed only at those sizes."""
    where = res.program.checker.where if res.program is not None else {}
    for match in res.accepted:
        fixed = [f"{where.get(k, k)} == {v}" for k, v in match.guards.items()]
        for site in match.sites:
            site.guards = list(dict.fromkeys([*site.guards, *fixed]))


def _run(model: nn.Module, example: Example, report: Report, optimize: bool,
         families: Sequence[Family] | None) -> list[pl.Part]:
    families = FAMILIES if families is None else families
    parts = pl.plan(model, example, report.notes, families)
    for part in parts:
        pl.run_part(part, optimize, families)
        prefix = f"{part.path}: " if part.path else ""
        for training, why in part.failures.items():
            report.notes.append(f"{prefix}not captured in {pl._mode(training)} mode ({why}); "
                                "that mode runs the original code")
        for res in part.modes.values():
            report.notes.extend(prefix + n for n in res.notes)
            if res.program is not None:
                report.guards.extend(prefix + g for g in res.program.checker.guards())
                _site_guards(res)
        sites = pl.settle(part, optimize, part.module.training)
        for s in sites:
            if part.path:
                s.module = f"{part.path}.{s.module}" if s.module else part.path
                s.where = f"{part.path}.{s.where}"
        report.sites.extend(sites)
        report.notes.extend(prefix + n for n in part.notes)
    report.notes[:] = list(dict.fromkeys(report.notes))
    report.guards[:] = list(dict.fromkeys(report.guards))
    return parts


def optimize(model: nn.Module, example_inputs: Any = None,
             example_kwargs: Mapping[str, Any] | None = None, *, autotune: bool = False,
             mode: str | None = None, keep_canonical: bool = False,
             families: Sequence[Family] | None = None) -> nn.Module:
    """Rewrite every provably time-distributed dense site of ``model`` into one canonical node.

    ``example_inputs``/``example_kwargs`` are one call of the model, as for
    ``torch.export.export(model, args, kwargs)``.  Returns a new module of the model's own class
    (its attributes and methods intact, sharing the original ``Parameter`` and buffer objects)
    whose forward runs a graph captured with ``torch.export`` per train/eval mode, with every
    rewrite verified (outputs and gradients) against ``model`` on the example and on other
    sizes.  A call the capture did not cover runs the original code (warning once).
    ``.tdd_report`` says what was done.  ``model`` itself is never modified.

    ``autotune=True`` times every applicable kernel of each canonical node on the example
    shapes (``mode``: "train" or "eval" timing; default the model's mode) and keeps the fastest;
    a result slower than the original is rolled back unless ``keep_canonical=True``.

    ``families`` replaces the registered pattern families (``tdd_fx.families.FAMILIES``): to
    restrict the pass to some patterns, or to plug in a family of one's own.
    """
    if mode not in (None, "train", "eval"):
        raise ValueError(f"mode must be 'train', 'eval' or None, got {mode!r}")
    example = _prepare(model, example_inputs, example_kwargs)
    report = pl.new_report("optimize", model, example)
    if example is None:
        report.notes.append(NO_INPUTS)
        out = copy_module_tree(model)
        out.tdd_report = report
        return out
    parts = _run(model, example, report, True, families)
    out = pl.finalize(model, parts)
    _summarize(report, parts)
    if autotune and report.rewritten:
        from .tune import tune_result

        out = tune_result(model, out, example, report, mode, keep_canonical, parts)
    out.tdd_report = report
    return out


def _summarize(report: Report, parts: list[pl.Part]) -> None:
    verdicts = [r.verdict for p in parts for r in p.modes.values()
                if r.verdict is not None and r.program is not None and r.accepted]
    if not verdicts:
        report.verified = None
        report.notes.append("nothing was rewritten: the model is returned as it was (its own "
                            "code runs)")
        return
    report.verified = all(v.ok for v in verdicts)
    report.unverified_reason = "; ".join(dict.fromkeys(
        v.detail or "a verification check failed" for v in verdicts if not v.ok))
    report.max_error = max(v.max_error for v in verdicts)
    report.tolerance_used = max(v.tolerance_used for v in verdicts)


def audit(model: nn.Module, example_inputs: Any = None,
          example_kwargs: Mapping[str, Any] | None = None, *,
          families: Sequence[Family] | None = None) -> Report:
    """Find and prove time-distributed dense sites without changing anything; explain
    near-misses."""
    example = _prepare(model, example_inputs, example_kwargs)
    report = pl.new_report("audit", model, example)
    if example is None:
        report.notes.append(NO_INPUTS)
        return report
    _run(model, example, report, False, families)
    return report
