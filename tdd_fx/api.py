"""``optimize`` and ``audit``: capture -> find -> rewrite -> verify -> report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from . import fallback, tune
from . import rewrite as rw
from ._state import preserved
from .capture import CaptureError, capture, copy_module_tree, example_summary
from .guards import Guard, UnguardableFact, facts_to_guards
from .patterns import FAMILIES
from .patterns.base import Candidate, Context
from .report import Report
from .shapes import ShapeAnalysis
from .verify import Verdict, alternative_inputs, fp64_reference, reference, site_errors, verify

__all__ = ["audit", "optimize"]

#: per-site errors need two interpreted runs of the graph: measured for models up to this many
#: rewrites (the whole-model verification covers every model)
SITE_ERRORS_UP_TO = 200

NO_INPUTS = ("no example_inputs were given: only shape-free proofs were possible, and the result "
             "was NOT verified numerically")


def _check_args(model: Any, example_inputs: Any) -> tuple[Tensor, ...] | None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"tdd_fx expects a torch.nn.Module, got {type(model).__name__}")
    lazy = [name or type(model).__name__ for name, m in model.named_modules()
            if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:
        raise ValueError(f"the model has uninitialized lazy modules ({', '.join(lazy)}): run it "
                         "once on real inputs before tdd_fx (running it here would initialize "
                         "them, changing your model)")
    if example_inputs is None:
        return None
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError("example_inputs must be a tuple of tensors (like torch.export), got "
                        f"{type(example_inputs).__name__}")
    bad = [i for i, x in enumerate(example_inputs) if not isinstance(x, Tensor)]
    if bad:
        kinds = ", ".join(f"[{i}] {type(example_inputs[i]).__name__}" for i in bad)
        raise TypeError(f"example_inputs must all be tensors; not tensors: {kinds}")
    inputs = tuple(example_inputs)
    try:
        with preserved([model]), torch.no_grad():
            model(*inputs)
    except Exception as exc:
        raise ValueError(
            f"the model itself fails on the example inputs ({example_summary(inputs)}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return inputs


def _device(model: nn.Module, inputs: tuple[Tensor, ...] | None) -> torch.device:
    for t in (*(inputs or ()), *model.parameters()):
        return t.device
    return torch.device("cpu")


class _Session:
    """One optimize/audit run."""

    def __init__(self, model: nn.Module, inputs: tuple[Tensor, ...] | None, mode: str) -> None:
        self.model = model
        self.inputs = inputs
        self.report = Report(mode=mode, model=type(model).__name__,  # type: ignore[arg-type]
                             inputs=example_summary(inputs) if inputs else "")
        self.gm: fx.GraphModule | None = None
        self.candidates: list[Candidate] = []
        self.ranks: dict[str, int] = {}
        self.trace_guards: list[Guard] = []
        #: why the model as a whole could not be captured ("" when it could)
        self.untraceable = ""
        self.autotune = False
        self.timing_train = model.training
        self.keep_canonical = False

    def _cannot(self, why: str) -> None:
        self.untraceable = why
        self.report.notes.append(why)

    def find(self) -> None:
        if getattr(self, "_found", False):
            return
        self._found = True
        try:
            captured = capture(self.model, self.inputs)
        except CaptureError as exc:
            self._cannot(str(exc))
            return
        gm = captured.gm
        shapes = None
        if self.inputs is not None:
            shapes = ShapeAnalysis(gm)
            try:
                shapes.analyse(*self.inputs)
            except Exception as exc:
                self._cannot(f"the traced graph of {type(self.model).__name__} fails on the "
                             f"example inputs ({type(exc).__name__}: {exc})")
                return
            self.ranks = {n.name: v.dim() for n, v in shapes.values.items()
                          if n.op == "placeholder" and isinstance(v, Tensor)}
            try:
                self.trace_guards = facts_to_guards(captured.facts, shapes)
            except UnguardableFact as exc:
                self._cannot(f"cannot trace {type(self.model).__name__}: {exc}")
                return
        else:
            self.report.notes.append(NO_INPUTS)
        self.gm = gm
        ctx = Context(gm, shapes, _device(self.model, self.inputs))
        ctx.loop_counts = {g.fact for g in self.trace_guards if g.releasable}
        for family in FAMILIES:
            try:
                found = family.find(ctx)
            except Exception as exc:  # a matcher bug must cost its rewrites, never the model
                self.report.notes.append(f"the {family.PATTERN} matcher failed ({type(exc).__name__}:"
                                         f" {exc}); its sites were not examined")
                continue
            for cand in found:
                ctx.claimed.update(cand.nodes)
            self.candidates.extend(found)

    # ----------------------------------------------------------------------------------------
    def audit(self) -> Report:
        self.find()
        if self.untraceable and self.inputs is not None:
            for path, sub in self._parts():
                self._merge(path, sub.audit())
            return self.report
        for cand in self.candidates:
            for site in cand.sites:
                site.status = "found" if cand.proved else "rejected"
            self.report.sites.extend(cand.sites)
        return self.report

    def optimize(self) -> nn.Module:
        self.find()
        if self.untraceable and self.inputs is not None:
            return self._optimize_parts()
        return self._optimized()

    def _optimized(self) -> nn.Module:
        """The rest of optimize(), once find() has run."""
        if self.gm is None:
            out = copy_module_tree(self.model)
            self.report.notes.append("the model is returned unchanged")
            out.tdd_report = self.report
            return out
        proved = [c for c in self.candidates if c.proved]
        if self.inputs is None and not proved:  # an unverifiable re-trace gains nothing
            for cand in self.candidates:
                for site in cand.sites:
                    site.status = "rejected"
                self.report.sites.extend(cand.sites)
            out = copy_module_tree(self.model)
            out.tdd_report = self.report
            return out
        if self.inputs is None:
            good, bad = proved, {}
            verdict = None
        else:
            good, bad, verdict = self._verified(proved)
        if good is None:  # the capture itself does not reproduce the model
            out = copy_module_tree(self.model)
            self.report.verified = False
            self.report.notes.append(f"the traced graph does not reproduce the model "
                                     f"({verdict.detail}); the model is returned unchanged")
            for cand in self.candidates:
                for site in cand.sites:
                    site.status = "rejected" if not cand.proved else "rolled_back"
                    site.reason = site.reason or "the traced graph does not reproduce the model"
                self.report.sites.extend(cand.sites)
            out.tdd_report = self.report
            return out
        built = getattr(self, "_built", None)
        if built is not None and built[0] == [id(c) for c in good]:
            gm, _, guards = built[1]
        else:
            gm, _, guards = rw.apply(self.gm, good, self.ranks if self.inputs else {},
                                     self.trace_guards, self.inputs)
        errors: dict[int, float] = {}
        if self.inputs is not None and good and len(good) <= SITE_ERRORS_UP_TO:
            try:  # each site's own result, before the peephole merges it with its neighbours
                raw, results, _ = rw.apply(self.gm, good, {}, (), None, cleanup=False)
                pairs = {i: (c.output, results[i]) for i, c in enumerate(good) if c.output}
                errors = site_errors(self.gm, raw, pairs, self.inputs)
            except Exception:
                errors = {}
        position = {id(c): i for i, c in enumerate(good)}
        for cand in self.candidates:
            for site in cand.sites:
                if id(cand) in position:
                    site.status = "rewritten"
                    site.max_error = errors.get(position[id(cand)])
                elif id(cand) in bad:
                    site.status = "rolled_back"
                    site.reason = bad[id(cand)]
                    site.kernel = ""
                else:
                    site.status = "rejected"
            self.report.sites.extend(cand.sites)
        self.report.guards = guards
        _kernels_in_graph(gm, self.report)
        if verdict is not None:
            self.report.verified = True
            self.report.max_error = verdict.max_error
            self.report.tolerance_used = verdict.tolerance_used
        if self.autotune and self.inputs is not None and good:
            gm = self._tune(gm, good)
        gm.tdd_report = self.report
        gm.meta.setdefault("_user_preserved_attributes", {})["tdd_report"] = self.report  # deepcopy
        if guards:
            fallback.install(gm, self.model)
        return gm

    def _tune(self, gm: fx.GraphModule, good: list[Candidate]) -> fx.GraphModule:
        """Measured kernels; whole-model time before/after; never slower (unless asked)."""
        train = self.timing_train
        times = tune.tune(gm, self.inputs, train)
        for site in self.report.rewritten:
            if site.node in times:
                site.kernel_ms = {k: round(v * 1e3, 4) for k, v in times[site.node].items()}
                site.kernel = min(times[site.node], key=times[site.node].__getitem__)
        ref = getattr(self, "_ref", None)
        if ref is not None:  # kernels are equivalent, but the returned model is always verified
            v = verify(self.model, gm, self._sets, None, ref)
            if not v.ok:
                self.report.notes.append(f"measured kernels failed verification ({v.detail}); "
                                         "kept the default kernels")
                gm, _, _ = rw.apply(self.gm, good, self.ranks, self.trace_guards, self.inputs)
        before, after, noise = tune.compare_models(self.model, gm, self.inputs, train)
        self.report.time_before_ms, self.report.time_after_ms = before * 1e3, after * 1e3
        self.report.timing_mode = "train" if train else "eval"
        if after > before * (1 + max(noise, 0.05)) and not self.keep_canonical:
            reason = (f"the optimized model measured slower ({after * 1e3:.3g} ms vs "
                      f"{before * 1e3:.3g} ms per {self.report.timing_mode} step, noise "
                      f"{100 * noise:.0f}%); pass keep_canonical=True to keep it anyway")
            for site in self.report.rewritten:
                site.status, site.reason = "rolled_back", reason
            gm, _, self.report.guards = rw.apply(self.gm, [], self.ranks, self.trace_guards,
                                                 self.inputs)
            self.report.time_after_ms = before * 1e3
        return gm

    # --- partial tracing ---------------------------------------------------------------------
    def _parts(self) -> list[tuple[str, _Session]]:
        """Sessions for the largest traceable submodules, each with the inputs it received
        during one run of the model on the example inputs (recursing into untraceable ones)."""
        calls = _record_calls(self.model, self.inputs or ())
        parts: list[tuple[str, _Session]] = []

        def visit(module: nn.Module, prefix: str) -> None:
            for name, child in module.named_children():
                path = prefix + name
                if path not in calls:
                    continue  # never called on these inputs
                args = calls[path]
                if args is None:  # called with keywords or non-tensors: look inside it
                    visit(child, path + ".")
                    continue
                if _is_standard_layer(child):
                    if isinstance(child, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                        parts.append((path, _Session(child, args, self.report.mode)))
                    continue
                sub = _Session(child, args, self.report.mode)
                sub.find()
                if sub.untraceable and "fails on the example" not in sub.untraceable:
                    self.report.notes.append(f"{path}: {sub.untraceable}")
                    visit(child, path + ".")
                else:
                    parts.append((path, sub))

        visit(self.model, "")
        names = ", ".join(p for p, _ in parts) or "none"
        self.report.notes.append(f"traced its submodules instead, with the inputs each received "
                                 f"on the example: {names}")
        return parts

    def _merge(self, path: str, sub: Report) -> None:
        for site in sub.sites:
            if site.module:
                site.module = f"{path}.{site.module}"
                site.where = f"{path}.{site.where}"
            else:  # the submodule itself (a layer traced on its own)
                site.module, site.source, site.where = path, "", path
            self.report.sites.append(site)
        self.report.guards.extend(f"{path}: {g}" for g in sub.guards)
        self.report.notes.extend(f"{path}: {n}" for n in sub.notes
                                 if not n.startswith("no second input set"))

    def _optimize_parts(self) -> nn.Module:
        root = copy_module_tree(self.model)
        worst = 0.0
        for path, sub in self._parts():
            sub.find()
            optimized = sub._optimized()
            self._merge(path, optimized.tdd_report)
            if optimized.tdd_report.rewritten:
                parent, _, name = path.rpartition(".")
                owner = root.get_submodule(parent) if parent else root
                owner._modules[name] = optimized
                worst = max(worst, optimized.tdd_report.max_error or 0.0)
        # the assembled model, verified as a whole against the original
        sets = [self.inputs]
        ref64 = fp64_reference(self.model)
        v = verify(self.model, root, sets, ref64) if self.inputs is not None else None
        if v is not None and not v.ok:
            for site in self.report.rewritten:
                site.status, site.reason = "rolled_back", f"verification failed: {v.detail}"
            root = copy_module_tree(self.model)
        self.report.verified = v.ok if v is not None else None
        self.report.max_error = v.max_error if v is not None and v.ok else None
        root.tdd_report = self.report
        return root

    def _verified(self, proved: list[Candidate]
                  ) -> tuple[list[Candidate] | None, dict[int, str], Verdict]:
        """Candidates that pass verification (bisecting failures), those rolled back (with why)."""
        assert self.gm is not None and self.inputs is not None
        fixed = set()
        names = [n for n in self.ranks]
        released = set().union(*(c.releases for c in proved))
        kept = [g for g in self.trace_guards if not (g.releasable and g.fact in released)]
        for c in [*proved, Candidate("trace", [], guards=kept)]:
            for g in c.guards:
                if g.placeholder in names:
                    fixed.update((names.index(g.placeholder), d) for d in g.dims)
        alt = alternative_inputs(self.model, self.inputs, fixed)
        sets = [self.inputs] + ([alt] if alt is not None else [])
        if alt is None:
            self.report.notes.append("no second input set with other batch/time sizes was "
                                     "accepted by the model: verified on the example inputs only")
        ref64 = fp64_reference(self.model)
        if ref64 is None:
            self.report.notes.append("the model could not be copied to float64: verified "
                                     "against the original only")
        ref = reference(self.model, sets, ref64)
        self._ref, self._sets = ref, sets
        last: dict[str, Verdict] = {}

        def check(cands: list[Candidate]) -> bool:
            try:
                built = rw.apply(self.gm, cands, self.ranks, self.trace_guards, self.inputs)
                v = verify(self.model, built[0], sets, ref64, ref)
                if v.ok:  # the module that passed is the one returned: no need to build it again
                    self._built = ([id(c) for c in cands], built)
            except Exception as exc:  # a rewrite that cannot even be built is rolled back
                v = Verdict(False, float("inf"), f"rewrite failed: {type(exc).__name__}: {exc}")
            last["v"] = v
            return v.ok

        bad: dict[int, str] = {}

        def bisect(cands: list[Candidate], accepted: list[Candidate]) -> list[Candidate]:
            if not cands or check(accepted + cands):
                return cands
            if len(cands) == 1:
                bad[id(cands[0])] = f"verification failed: {last['v'].detail}"
                return []
            mid = len(cands) // 2
            left = bisect(cands[:mid], accepted)
            return left + bisect(cands[mid:], accepted + left)

        if proved and check(proved):  # the common case: everything verifies at once
            return proved, bad, last["v"]
        if not check([]):  # the capture itself does not reproduce the model
            return None, {}, last["v"]
        good = bisect(proved, [])
        if good != proved:
            check(good)
        return good, bad, last["v"]


def _is_standard_layer(m: nn.Module) -> bool:
    mod = type(m).__module__
    return mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")


def _record_calls(model: nn.Module, inputs: tuple[Any, ...]) -> dict[str, tuple[Any, ...]]:
    """The positional tensor arguments each submodule received first, during one run."""
    calls: dict[str, tuple[Any, ...]] = {}
    handles = []
    for path, m in model.named_modules():
        if not path:
            continue

        def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                path: str = path) -> None:
            if path in calls:
                return
            ok = not kwargs and args and all(isinstance(a, Tensor) for a in args)
            calls[path] = tuple(a.detach().clone() for a in args) if ok else None  # type: ignore[assignment]

        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with preserved([model]), torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


def _kernels_in_graph(gm: fx.GraphModule, report: Report) -> None:
    """Report the kernel each rewritten site ended with (the peephole may change it)."""
    from .ops import time_distributed_dense

    used = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is time_distributed_dense and "tdd_site" in n.meta:
            fd = n.kwargs.get("feature_dim", -1)
            used[n.meta["tdd_site"]] = "linear" if fd == -1 else n.kwargs.get("impl", "linear")
    for site in report.rewritten:
        if site.node in used:
            site.kernel = used[site.node]


def optimize(model: nn.Module, example_inputs: Sequence[Tensor] | Tensor | None = None, *,
             autotune: bool = False, mode: str | None = None, keep_canonical: bool = False
             ) -> nn.Module:
    """Rewrite every provably time-distributed dense site of ``model`` into one canonical node.

    Returns a new module (a ``torch.fx.GraphModule`` holding the same module tree, sharing the
    original ``Parameter`` objects) whose outputs and gradients were verified against ``model``
    on ``example_inputs`` and on inputs with other batch/time sizes; ``.tdd_report`` says what was
    done.  ``model`` itself is never modified.

    ``autotune=True`` times every applicable kernel of each canonical node on the example
    shapes (forward-only for ``mode="eval"``, forward+backward for ``mode="train"``; default: the
    model's own mode), fixes the fastest, and times the whole model before and after.  If the
    result is slower than the original beyond measured noise, the rewrites are rolled back, unless
    ``keep_canonical=True`` (e.g. to export the canonical form regardless).
    """
    if mode not in (None, "train", "eval"):
        raise ValueError(f"mode must be 'train', 'eval' or None, got {mode!r}")
    inputs = _check_args(model, example_inputs)
    session = _Session(model, inputs, "optimize")
    session.autotune = autotune
    session.timing_train = model.training if mode is None else mode == "train"
    session.keep_canonical = keep_canonical
    return session.optimize()


def audit(model: nn.Module, example_inputs: Sequence[Tensor] | Tensor | None = None) -> Report:
    """Find and prove time-distributed dense sites without changing anything; explain near-misses."""
    inputs = _check_args(model, example_inputs)
    return _Session(model, inputs, "audit").audit()

