"""The pass as named stages, each a function of its inputs::

    plan      -> the module(s) to capture: the model, or its largest exportable subtrees
    capture   -> one torch.export graph per train/eval mode         (capture.capture)
    find      -> matches from every registered family               (find)
    verify    -> the verified subset of the proved matches, bisected (verify_mode)
    finalize  -> programs installed on a copy of the user's module tree, and the report

Site statuses are set in one place (:func:`settle`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch import nn

from . import ops, rewrite
from ._state import preserved
from .capture import Captured, CaptureError, capture, copy_module_tree, describe_failure
from .families import FAMILIES, Context, Family, Match
from .inputs import Example, leaf_names, resized_to
from .program import Program, install, tree_flags
from .report import Report, Site
from .verify import Reference, Verdict, fp64_reference, reference, verify


# --- find ------------------------------------------------------------------------------------
def find(captured: Captured, families: Sequence[Family] = FAMILIES) -> tuple[list[Match], list[str]]:
    """Every family's matches on one graph (a family that fails costs its own sites only)."""
    ctx = Context(captured)
    matches: list[Match] = []
    notes: list[str] = []
    for family in families:
        try:
            found = family.find(ctx)
        except Exception as exc:  # a matcher bug must cost its rewrites, never the model
            notes.append(f"the {family.pattern} matcher failed ({type(exc).__name__}: {exc}); "
                         "its sites were not examined")
            continue
        for m in found:
            ctx.claimed.update(m.nodes)
        matches.extend(found)
    return matches, notes


# --- verify ----------------------------------------------------------------------------------
@dataclass
class ModeResult:
    """What verification of one mode's graph decided."""

    training: bool
    program: Program | None
    accepted: list[Match]
    flags: tuple[bool, ...] = ()
    rolled_back: dict[int, str] = field(default_factory=dict)
    verdict: Verdict | None = None
    notes: list[str] = field(default_factory=list)
    #: per site: (kernel, feature_dim) of its canonical node as it ended
    kernels: dict[str, tuple[str, int]] = field(default_factory=dict)
    site_errors: dict[str, float] = field(default_factory=dict)


def build_program(captured: Captured, matches: list[Match], names: list[str],
                  flags: tuple[bool, ...]) -> tuple[Program, dict[str, tuple[str, int]]]:
    gm, kernels = rewrite.apply(captured, matches)
    fixed: dict[Any, int] = {}
    for m in matches:
        fixed.update(m.guards)
    return Program(captured, gm, names, flags, fixed, list(kernels)), kernels


def candidate_module(model: nn.Module, program: Program) -> nn.Module:
    cand = copy_module_tree(model)
    install(cand, [program])
    return cand


def alternative(model: nn.Module, example: Example, program: Program,
                keep: set[Any] = frozenset()) -> Example | None:  # type: ignore[assignment]
    """The example with other sizes for every size symbol the capture kept (except those in
    ``keep``, which rewrites fixed): each symbol grows, every axis follows its expression (an
    axis of ``16 - s`` shrinks as ``s`` grows); accepted by the capture's conditions and by the
    model itself."""
    leaves = example.leaves()
    hints: dict[Any, int] = {}
    for i, d, e in program.checker.plan:
        if isinstance(e, sympy.Symbol) and isinstance(leaves[i], torch.Tensor):
            hints.setdefault(e, int(leaves[i].shape[d]))
    free = [s for s in hints if s not in keep]
    if not free:
        return None
    for step in (3, 2, 5, 1):
        values = {s: v + (step if s in free else 0) for s, v in hints.items()}
        sizes: dict[tuple[int, int], int] = {}
        for i, d, e in program.checker.plan:
            if isinstance(leaves[i], torch.Tensor) and not isinstance(e, int):
                v = sympy.sympify(sympy.sympify(e).xreplace(values))
                if v.is_Integer and int(v) > 0:
                    sizes[(i, d)] = int(v)
        alt = resized_to(example, sizes, seed=0x7DD + step)
        try:
            program.checker.check(program.flatten(alt.args, alt.kwargs))
            with preserved([model]), torch.no_grad():
                alt.clone().call(model)
        except Exception:
            continue
        return alt
    return None


def _extreme(x: Any) -> bool:
    """NaN, Inf, or a value beyond 1000x the typical magnitude: one such element sets the scale
    of every tolerance (or makes it NaN), blinding the comparison of all the others."""
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel()):
        return False
    mag = x.detach().double().abs().flatten()
    if not bool(torch.isfinite(mag).all()):
        return True
    return float(mag.max()) > 1e3 * max(float(mag.median()), 1e-12)


def tamed(model: nn.Module, example: Example) -> list[Example]:
    """``[the example resampled at its own sizes]`` when it holds extreme values (and the model
    accepts the resample), else ``[]``."""
    leaves = example.leaves()
    if not any(_extreme(x) for x in leaves):
        return []
    sizes = {(i, 0): x.shape[0] for i, x in enumerate(leaves)
             if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim()}
    tame = resized_to(example, sizes, seed=0x7DE)
    try:
        with preserved([model]), torch.no_grad():
            tame.clone().call(model)
    except Exception:
        return []
    return [tame]


def verify_mode(model: nn.Module, example: Example, captured: Captured, proved: list[Match],
                flags: tuple[bool, ...]) -> ModeResult:
    """Bisect ``proved`` down to the matches whose rewrite verifies (outputs and gradients
    against the original, in this mode, on the example and on other sizes)."""
    names = leaf_names(example)
    result = ModeResult(captured.training, None, [], flags)
    if not proved:  # nothing to rewrite: this mode keeps running the original code
        return result
    sets = _input_sets(model, example, captured, proved, names, flags, result.notes)
    trial = _Trial(model, captured, names, flags, sets, _mode_reference(model, flags, sets))
    if trial.check(proved) or _with_mirrors(trial, proved, result.notes):
        good = proved
    elif not trial.check([]):
        result.verdict = trial.verdict
        result.notes.append(f"the captured graph does not reproduce the model in "
                            f"{_mode(captured.training)} mode ({trial.verdict.detail})")
        result.rolled_back = {id(m): "the captured graph does not reproduce the model"
                              for m in proved}
        return result
    else:
        good = _bisect(trial, proved, [], result.rolled_back)
        trial.check(good)
    result.accepted, result.verdict = good, trial.verdict
    result.program, result.kernels = trial.program, trial.kernels
    if result.program is not None and good:
        try:
            result.site_errors = site_errors(model, captured, result.program, example)
        except Exception:  # a per-site figure is a report detail; the model is verified whole
            result.site_errors = {}
    return result


def _with_mirrors(trial: _Trial, proved: list[Match], notes: list[str]) -> bool:
    """After a failed check whose program ran speculative kernels: the same matches with every
    site on its own code's kernel (kept for the rest of this mode, bisection included)."""
    if not trial.speculated:
        return False
    traded, detail = ", ".join(trial.speculated), trial.verdict.detail
    trial.mirrors_only = True
    ok = trial.check(proved)
    notes.append(f"kernels: baddbmm in place of {traded} did not verify ({detail}); every site "
                 f"keeps its own code's kernel" + ("" if ok else " (and is checked site by site)"))
    return ok


def _input_sets(model: nn.Module, example: Example, captured: Captured, proved: list[Match],
                names: list[str], flags: tuple[bool, ...], notes: list[str]) -> list[Example]:
    """The example (and, when its values are extreme, the same sizes with tame values), and a
    second input set with other sizes when one is accepted."""
    base, _ = build_program(captured, [], names, flags)
    alt = alternative(model, example, base, {s for m in proved for s in m.guards})
    tame = tamed(model, example)
    if alt is not None:
        return [example, *tame, alt]
    if tame:
        return [example, *tame]
    notes.append("no second input set with other sizes was accepted: verified on "
                 "the example inputs only")
    return [example]


def _mode_reference(model: nn.Module, flags: tuple[bool, ...], sets: list[Example]) -> Reference:
    """The original's results (and its float64 copy's) on ``sets``, in the mode of ``flags``."""
    with preserved([model]):
        for m, f in zip(model.modules(), flags):
            m.training = f
        ref64 = fp64_reference(model)
        return reference(model, sets, ref64)


@dataclass
class _Trial:
    """Builds and verifies one set of matches at a time; keeps the last attempt's results."""

    model: nn.Module
    captured: Captured
    names: list[str]
    flags: tuple[bool, ...]
    sets: list[Example]
    ref: Reference
    verdict: Verdict = field(default_factory=lambda: Verdict(False, float("inf"), "not run"))
    program: Program | None = None
    kernels: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: every site keeps the replaced code's own kernel (set once speculative kernels failed)
    mirrors_only: bool = False
    #: mirrors the last build traded for a speculative kernel (see ``ops.kernel_policy``)
    speculated: list[str] = field(default_factory=list)

    def check(self, matches: list[Match]) -> bool:
        try:
            speculate = not (self.mirrors_only or self.captured.training)
            with ops.kernel_policy(speculate, self.captured.training) as speculated:
                program, kernels = build_program(self.captured, matches, self.names, self.flags)
            self.speculated = sorted(set(speculated))
            v = _verify_program(self.model, program, self.sets, self.ref, self.flags)
        except Exception as exc:
            v, program, kernels = Verdict(False, float("inf"),
                                          f"rewrite failed: {type(exc).__name__}: {exc}"), None, {}
        self.verdict, self.program, self.kernels = v, program, kernels
        return v.ok


def _bisect(trial: _Trial, cands: list[Match], accepted: list[Match],
            rolled_back: dict[int, str]) -> list[Match]:
    """The candidates that verify together with ``accepted``, found by halving; each one that
    fails alone is rolled back with the verdict's detail."""
    if not cands or trial.check(accepted + cands):
        return cands
    if len(cands) == 1:
        rolled_back[id(cands[0])] = f"verification failed: {trial.verdict.detail}"
        return []
    mid = len(cands) // 2
    left = _bisect(trial, cands[:mid], accepted, rolled_back)
    return left + _bisect(trial, cands[mid:], accepted + left, rolled_back)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, keep: Any) -> None:
        super().__init__(gm)
        self.keep = keep
        self.got: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        key = self.keep(n)
        if key and isinstance(out, torch.Tensor):
            self.got[key] = out.detach()
        return out


def site_errors(model: nn.Module, captured: Captured, program: Program,
                example: Example) -> dict[str, float]:
    """Max relative difference of each rewritten site's own result, before vs after (the dense
    op's output in the captured graph against its canonical node's, same elements in order)."""
    from .ops import time_distributed_dense

    flat = program.flatten(example.args, example.kwargs)
    state = [program_state(model, program)]
    names = set(program.sites)
    before = _Recorder(captured.gm, lambda n: n.name if n.name in names else "")
    after = _Recorder(program.gm, lambda n: n.meta.get("tdd_site", "")
                      if n.target is time_distributed_dense else "")
    for rec in (before, after):
        with preserved([model]), torch.no_grad():
            torch.manual_seed(0x7DD)
            rec.run(*state[0], *flat)
    last = {n.meta.get("tdd_site") for n in program.gm.graph.nodes
            if n.target is time_distributed_dense and n.kwargs.get("feature_dim", -1) == -1}
    out: dict[str, float] = {}
    for site, a in before.got.items():
        b = after.got.get(site)
        if b is None or a.numel() != b.numel() or not a.is_floating_point():
            continue
        folded = site in last and a.shape[-1] == b.shape[-1]  # rows of a fold, in order
        if not folded and [d for d in a.shape if d != 1] != [d for d in b.shape if d != 1]:
            continue  # laid out differently (a channel-first site): no element-wise pairing
        scale = float(a.abs().max()) or 1.0
        out[site] = float((a.double().flatten() - b.double().flatten()).abs().max()) / scale
    return out


def program_state(model: nn.Module, program: Program) -> list[Any]:
    from .program import _fetch

    return [_fetch(model, kind, target, program.constants) for kind, target in program.state]


def _verify_program(model: nn.Module, program: Program, sets: list[Example], ref: Reference,
                    flags: tuple[bool, ...]) -> Verdict:
    cand = candidate_module(model, program)
    for m, f in zip(cand.modules(), flags):
        m.training = f
    return verify(model, cand, sets, None, ref)


def _mode(training: bool) -> str:
    return "train" if training else "eval"


# --- one module: capture, find, verify per mode ------------------------------------------------
@dataclass
class Part:
    """One captured module (the model, or a subtree when the model cannot be captured whole)."""

    path: str
    module: nn.Module
    example: Example
    modes: dict[bool, ModeResult] = field(default_factory=dict)
    matches: dict[bool, list[Match]] = field(default_factory=dict)
    failures: dict[bool, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: the capture in the module's own mode, when planning already made it
    first: Captured | None = None


def capture_modes(module: nn.Module, example: Example, first: Captured | None = None
                  ) -> tuple[dict[bool, Captured], dict[bool, str]]:
    """The module's graph as it is (its own flags), and in the other mode."""
    primary = module.training
    out: dict[bool, Captured] = {}
    failures: dict[bool, str] = {}
    for training in (primary, not primary):
        if training == primary and first is not None:
            out[training] = first
            continue
        try:
            out[training] = capture(module, example, training if training != primary else None)
        except CaptureError as exc:
            failures[training] = str(exc)
    return out, failures


def run_part(part: Part, optimize: bool, families: Sequence[Family] = FAMILIES) -> None:
    captured, part.failures = capture_modes(part.module, part.example, part.first)
    flags_now = tree_flags(part.module)
    for training, cap in captured.items():
        part.seconds += cap.seconds
        matches, notes = find(cap, families)
        part.matches[training] = matches
        part.notes.extend(n for n in notes if n not in part.notes)
        if not optimize:
            continue
        flags = flags_now if training == part.module.training else \
            tuple(training for _ in flags_now)
        proved = [m for m in matches if m.proved]
        part.modes[training] = verify_mode(part.module, part.example, cap, proved, flags)


# --- plan: whole model, or its exportable subtrees ---------------------------------------------
def plan(model: nn.Module, example: Example, notes: list[str],
         families: Sequence[Family] = FAMILIES) -> list[Part]:
    """The model itself when it exports in its current mode; otherwise the largest exportable
    subtrees, each with the inputs it received on the example (containers are looked inside;
    a standard layer is captured alone only when a family declares it in ``layers``)."""
    layers = tuple(t for f in families for t in getattr(f, "layers", ()))
    whole = Part("", model, example)
    try:
        whole.first = capture(model, example, None)
        return [whole]
    except CaptureError as exc:
        notes.append(f"{type(model).__name__} as a whole: {exc}")
    calls = record_calls(model, example)
    parts: list[Part] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = prefix + name
            if path not in calls:
                if any(p.startswith(path + ".") for p in calls):
                    visit(child, path + ".")  # a container: its children are called
                continue
            sub = calls[path]
            if _is_standard(child) and not isinstance(child, layers):
                if any(p.startswith(path + ".") for p in calls):
                    visit(child, path + ".")  # a standard container (Sequential): look inside
                continue
            try:
                parts.append(Part(path, child, sub, first=capture(child, sub, None)))
            except CaptureError as exc:
                notes.append(f"{path} ({type(child).__name__}) left out: {exc}")
                visit(child, path + ".")

    visit(model, "")
    names = ", ".join(p.path for p in parts) or "none"
    notes.append(f"captured its submodules instead, with the inputs each received on the "
                 f"example: {names}")
    return parts


def _is_standard(m: nn.Module) -> bool:
    mod = type(m).__module__
    return mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")


def record_calls(model: nn.Module, example: Example) -> dict[str, Example]:
    """The arguments (positional and keyword) each submodule received first, during one run."""
    calls: dict[str, Example] = {}
    handles = []
    for path, m in model.named_modules():
        if not path:
            continue

        def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                path: str = path) -> None:
            if path not in calls:
                calls[path] = Example(tuple(args), dict(kwargs)).clone()

        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with preserved([model]), torch.no_grad():
            example.clone().call(model)
    finally:
        for h in handles:
            h.remove()
    return calls


# --- settle: the report rows, in one place ------------------------------------------------------
def _key(site: Site) -> tuple[str, str, str]:
    return (site.pattern, site.where, site.node)


def settle(part: Part, optimize: bool, primary: bool) -> list[Site]:
    """Each site's final status, from the primary mode (the other mode noted when it differs)."""
    modes = [primary, not primary]
    shown = next((m for m in modes if m in part.matches), None)
    if shown is None:
        return []
    sites: list[Site] = []
    for match in part.matches[shown]:
        for site in match.sites:
            site.status = _status(part, shown, match, optimize)
            if site.status == "rolled_back":
                site.reason = part.modes[shown].rolled_back.get(id(match), site.reason)
                site.kernel = ""
            if site.status == "rewritten":
                res = part.modes[shown]
                site.kernel, site.feature_dim = res.kernels.get(
                    site.node, (site.kernel, site.feature_dim))
                site.max_error = res.site_errors.get(site.node)
            sites.append(site)
    other = not shown
    if optimize and other in part.matches and other in part.modes:
        _note_other_mode(part, shown, other, sites)
    return sites


def _status(part: Part, training: bool, match: Match, optimize: bool) -> str:
    if not match.proved:
        return "rejected"
    if not optimize:
        return "found"
    res = part.modes.get(training)
    if res is None or res.program is None or id(match) in res.rolled_back:
        return "rolled_back"
    return "rewritten" if any(m is match for m in res.accepted) else "rolled_back"


def _note_other_mode(part: Part, shown: bool, other: bool, sites: list[Site]) -> None:
    res = part.modes[other]
    status = {}
    for match in part.matches[other]:
        st = _status(part, other, match, True)
        why = res.rolled_back.get(id(match), match.reason)
        for s in match.sites:
            status[(s.pattern, s.where)] = (st, why)
    for s in sites:
        st, why = status.get((s.pattern, s.where), ("missing", "not found"))
        kernel = res.kernels.get(s.node, ("", None))[0]
        if st == "rewritten" == s.status and kernel and kernel != s.kernel:
            s.kernel_other = f"{kernel} ({_mode(other)})"
        if (st == "rewritten") != (s.status == "rewritten"):
            prefix = f"{part.path}." if part.path else ""
            part.notes.append(f"{prefix}{s.where}: {st} in {_mode(other)} mode"
                              + (f" ({why})" if why and st != "rewritten" else ""))


# --- finalize -----------------------------------------------------------------------------------
def finalize(model: nn.Module, parts: list[Part]) -> nn.Module:
    """A copy of the user's module tree (same classes and attributes, the original parameters
    and buffers) with each captured part running its verified programs."""
    root = copy_module_tree(model)
    for part in parts:
        done = [r for r in part.modes.values() if r.program is not None and r.accepted]
        if not done:
            continue
        target = root.get_submodule(part.path) if part.path else root
        plain = [r.flags for r in part.modes.values() if r not in done and r.program is None
                 and not r.notes]
        install(target, [r.program for r in done], plain)  # type: ignore[misc]
    return root


def describe(exc: BaseException) -> str:
    return describe_failure(exc)


def new_report(kind: str, model: nn.Module, example: Example | None) -> Report:
    return Report(mode=kind, model=type(model).__name__,  # type: ignore[arg-type]
                  inputs=example.summary() if example is not None else "")
