"""Measured kernel choice and whole-model timing (``optimize(..., autotune=True)``).

Every kernel of :data:`tdd_fx.ops.KERNELS` computes the same function; which is fastest depends on
device, dtype, shape and whether a backward pass follows (``shared/anchors`` and
``benchmarks/results`` disagree between an H100 and this CPU, and between shapes).  So each
canonical node whose features are not on the last axis is timed with each applicable kernel on
random data of its actual input shape — forward-only in eval mode, forward+backward in training
mode — the kernels interleaved round after round, and another kernel replaces the heuristic's
choice only when it is faster by more than the measured noise.

Measurements are cached in memory and on disk (``$TDD_FX_CACHE``, default
``~/.cache/tdd_fx/kernels.json``; ``TDD_FX_CACHE=off`` disables the file), keyed by torch
version, device, dtype, shape bucket (each size rounded up to a power of two), feature axis,
output size and mode, so a second process tunes the same model for free.  Tuning a model is
bounded (:data:`BUDGET_S` seconds of measurement; sites left when it runs out keep the heuristic
kernel, and the report says how many), and so is the whole of autotune (:data:`TOTAL_BUDGET_S`:
the whole-model timing gets what is left, and is skipped, with a note, for models too slow to
time in it).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from . import ops
from ._state import preserved
from .capture import copy_module_tree
from .families.base import example_shape
from .inputs import Example

#: seconds of kernel measurement per ``optimize(..., autotune=True)``
BUDGET_S = 1.0
#: seconds for all of autotune: kernel measurement, the check of changed kernels, whole-model
#: timing (which gets what is left, at least :data:`MIN_TIMING_S`)
TOTAL_BUDGET_S = 2.0
MIN_TIMING_S = 0.5
#: kernel timings: (median seconds, relative noise) by kernel name, per cache key
Times = dict[str, tuple[float, float]]
_CACHE: dict[str, Times] = {}


def cache_file() -> Path | None:
    """Where measured kernel times persist across processes (None: memory only)."""
    env = os.environ.get("TDD_FX_CACHE", "")
    if env.lower() in ("off", "0", "none"):
        return None
    return Path(env) if env else Path.home() / ".cache" / "tdd_fx" / "kernels.json"


def _load() -> dict[str, Times]:
    path = cache_file()
    if path is None or not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        return {k: {n: (float(t[0]), float(t[1])) for n, t in v.items()} for k, v in raw.items()}
    except (OSError, ValueError, TypeError, IndexError, AttributeError):
        return {}  # a damaged cache is measured again, never trusted


def _store(key: str, times: Times) -> None:
    path = cache_file()
    if path is None:
        return
    try:
        data = _load()
        data[key] = times
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(data, f)
        os.replace(f.name, path)  # atomic: concurrent processes never read half a file
    except OSError:
        pass  # a read-only home: memory cache only


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], device: torch.device, repeats: int = 5,
                min_time: float = 0.01) -> tuple[float, float]:
    """(median seconds per call, relative spread between the quartiles) over ``repeats`` rounds."""
    return interleaved({"fn": fn}, device, repeats, min_time)["fn"]


def interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, rounds: int = 5,
                min_time: float = 0.01) -> Times:
    """Per function, (median seconds per call, relative interquartile spread), measured round
    after round with the functions interleaved (a load spike hits all of them alike)."""
    iters = {}
    for name, fn in fns.items():  # warm up, then calibrate calls per round
        fn()
        _sync(device)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min_time:
            fn()
            n += 1
        _sync(device)
        iters[name] = max(1, n)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(iters[name]):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / iters[name])
    out: Times = {}
    for name, v in samples.items():
        med = statistics.median(v)
        q = statistics.quantiles(v, n=4) if len(v) >= 4 else [min(v), max(v)]
        out[name] = (med, (q[-1] - q[0]) / med if med else 0.0)
    return out


def candidates_for(ndim: int, feature_dim: int) -> list[str]:
    d = feature_dim % ndim
    if d == ndim - 1:
        return ["linear"]
    names = ["linear_t", "linear_tc", "matmul"]
    if ndim == 3 and d == 1:
        names += ["baddbmm", "conv_span"]
    if d == 1 and 3 <= ndim <= 5:
        names.append("conv")
    return names


def _bucket(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(1 << max(0, int(s) - 1).bit_length() for s in shape)


def cache_key(shape: Sequence[int], feature_dim: int, out_features: int, dtype: torch.dtype,
              device: torch.device, train: bool) -> str:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.machine()} {platform.processor()} x{torch.get_num_threads()}"
    return "|".join(map(str, (torch.__version__, device.type, where, dtype, _bucket(shape),
                              feature_dim % len(shape), out_features,
                              "train" if train else "eval")))


def kernel_times(shape: Sequence[int], feature_dim: int, out_features: int, dtype: torch.dtype,
                 device: torch.device, train: bool) -> Times:
    """(seconds per call, relative noise) of each applicable kernel; cached in memory and on
    disk."""
    key = cache_key(shape, feature_dim, out_features, dtype, device, train)
    if key not in _CACHE:
        _CACHE.update(_load())
    if key in _CACHE:
        return _CACHE[key]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tuple(shape), generator=g).to(device=device, dtype=dtype)
    w = torch.randn(out_features, shape[feature_dim], generator=g).to(device=device, dtype=dtype)
    b = torch.randn(out_features, generator=g).to(device=device, dtype=dtype)
    for t in (x, w, b):
        t.requires_grad_(train)

    def step(name: str) -> Callable[[], None]:
        def run() -> None:
            if train:
                y = ops.time_distributed_dense(x, w, b, feature_dim=feature_dim, impl=name)
                y.backward(torch.ones_like(y))
            else:
                with torch.no_grad():
                    ops.time_distributed_dense(x, w, b, feature_dim=feature_dim, impl=name)
        return run

    fns = {}
    for name in candidates_for(len(shape), feature_dim):
        try:  # a kernel that cannot run here is simply not a choice
            step(name)()
        except Exception:
            continue
        fns[name] = step(name)
    out = interleaved(fns, device, rounds=5, min_time=0.002) if fns else {}
    _CACHE[key] = out
    _store(key, out)
    return out


def decide(times: Times, default: str) -> str:
    """The measured fastest kernel if it beats ``default`` by more than both measurements'
    noise, else ``default`` (a decision inside the noise would flip from run to run)."""
    if not times:
        return default
    best = min(times, key=lambda k: times[k][0])
    if default not in times or best == default:
        return best
    (tb, nb), (td, nd) = times[best], times[default]
    return best if tb * (1 + max(nb, nd, 0.02)) < td else default


def tune(gm: fx.GraphModule, train: bool, device: torch.device,
         deadline: float = float("inf")) -> tuple[dict[str, Times], int, int]:
    """Fix the measured kernel in every canonical node of ``gm`` (timed at the example's sizes,
    from the nodes' captured values) until ``deadline`` (``time.perf_counter()``); returns the
    times per site, how many nodes were left at their heuristic kernel for lack of time, and how
    many changed kernel."""
    measured: dict[str, Times] = {}
    skipped = changed = 0
    from .program import draws_random

    # with random ops, a measured kernel must lay its output out as the verified one did
    random = any(draws_random(n) for n in gm.graph.nodes)
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not ops.time_distributed_dense:
            continue
        x = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
        w = n.args[1].meta.get("val") if isinstance(n.args[1], fx.Node) else None
        if x is None or w is None:
            continue
        shape = example_shape(tuple(x.shape))
        fd = n.kwargs.get("feature_dim", -1)
        if len(candidates_for(len(shape), fd)) < 2:
            continue
        key = cache_key(shape, fd, int(w.shape[0]), x.dtype, device, train)
        if key not in _CACHE and time.perf_counter() > deadline:
            skipped += 1
            continue
        times = kernel_times(shape, fd, int(w.shape[0]), x.dtype, device, train)
        old = n.kwargs.get("impl", "linear")
        if random:
            strided = old in ops.STRIDED_OUTPUT
            times = {k: v for k, v in times.items() if (k in ops.STRIDED_OUTPUT) == strided}
        new = decide(times, old)
        changed += new != old
        n.kwargs = {**n.kwargs, "impl": new}
        if "tdd_site" in n.meta:
            measured[n.meta["tdd_site"]] = times
    gm.recompile()
    return measured, skipped, changed


def tune_result(original: nn.Module, result: nn.Module, example: Example, report: Any,
                mode: str | None, keep_canonical: bool, parts: Sequence[Any]) -> nn.Module:
    """Measured kernels for every program of ``result``; whole-model time before/after; a result
    slower than the original (beyond measured noise) goes back to the original's code.

    Bounded: kernel measurement stops at :data:`BUDGET_S`; a result whose kernels changed is
    checked once on the example against the original (outputs and gradients: another kernel
    may lay its output out differently for the ops after it), and the whole-model timing gets
    what is left of :data:`TOTAL_BUDGET_S` (skipped, and said, when one step of each model does
    not fit three times)."""
    from .program import programs_of
    from .verify import verify

    train = original.training if mode is None else mode == "train"
    device = _device_of(original, example.tensors())
    sites = {s.node: s for s in report.rewritten}
    heuristic = {s.node: s.kernel for s in report.rewritten}
    start = time.perf_counter()
    skipped = changed = 0
    saved: list[tuple[fx.GraphModule, dict[fx.Node, Any]]] = []
    for _, module in result.named_modules():
        for program in programs_of(module):
            saved.append((program.gm, {n: n.kwargs for n in program.gm.graph.nodes
                                       if n.target is ops.time_distributed_dense}))
            times, left, moved = tune(program.gm, train, device, start + BUDGET_S)
            skipped, changed = skipped + left, changed + moved
            if program.training != original.training:
                continue
            for site, t in times.items():
                if site in sites:
                    sites[site].kernel_ms = {k: round(v[0] * 1e3, 4) for k, v in t.items()}
                    sites[site].kernel = _impl_of(program.gm, site) or sites[site].kernel
    measured = time.perf_counter() - start
    if changed:  # kernels are equivalent; a failure here is a bug, never a silent result
        v = verify(original, result, [example], None)
        if not v.ok:
            for gm, kwargs in saved:
                for n, kw in kwargs.items():
                    n.kwargs = kw
                gm.recompile()
            for site in report.rewritten:
                site.kernel_ms, site.kernel = None, heuristic[site.node]
            report.notes.append(f"autotune: the measured kernels failed the check ({v.detail}); "
                                "the heuristic kernels are kept")
    report.notes.append(
        f"autotune: kernels measured in {measured:.2f} s, {changed} changed"
        + (f" and checked in {time.perf_counter() - start - measured:.2f} s" if changed else "")
        + (f"; {skipped} canonical node(s) kept the heuristic kernel (budget {BUDGET_S} s "
           "spent)" if skipped else ""))
    budget = max(TOTAL_BUDGET_S - (time.perf_counter() - start), MIN_TIMING_S)
    timing = compare_models(original, result, example, train, budget_s=budget)
    report.timing_mode = "train" if train else "eval"
    if timing is None:
        report.notes.append(f"autotune: whole-model timing skipped (one {report.timing_mode} "
                            f"step of each model does not fit {budget:.2f} s three times); each "
                            "kernel was kept only where measured faster than the heuristic's; "
                            f"{time.perf_counter() - start:.2f} s in all")
        return result
    before, after, noise = timing
    report.time_before_ms, report.time_after_ms = before * 1e3, after * 1e3
    report.notes.append(f"autotune: {time.perf_counter() - start:.2f} s in all")
    if after > before * (1 + max(noise, 0.05)) and not keep_canonical:
        reason = (f"the optimized model measured slower ({after * 1e3:.3g} ms vs "
                  f"{before * 1e3:.3g} ms per {report.timing_mode} step, noise "
                  f"{100 * noise:.0f}%); pass keep_canonical=True to keep it anyway")
        for site in report.rewritten:
            site.status, site.reason = "rolled_back", reason
        report.time_after_ms = before * 1e3
        return copy_module_tree(original)
    return result


def _impl_of(gm: fx.GraphModule, site: str) -> str | None:
    for n in gm.graph.nodes:
        if n.target is ops.time_distributed_dense and n.meta.get("tdd_site") == site:
            return n.kwargs.get("impl")
    return None


def _device_of(gm: nn.Module, inputs: Sequence[Any]) -> torch.device:
    if isinstance(inputs, Example):
        inputs = inputs.tensors()
    for t in (*inputs, *gm.parameters()):
        if isinstance(t, Tensor):
            return t.device
    return torch.device("cpu")


def _step(model: nn.Module, ex: Example, train: bool) -> Callable[[], None]:
    """One forward (eval, under ``no_grad``) or forward + backward (train) of ``model``."""
    leaves = [p for p in model.parameters() if p.requires_grad] + [
        x for x in ex.tensors() if x.requires_grad]

    def run() -> None:
        if train:  # autograd.grad, not backward(): the user's .grad fields stay untouched
            out = ex.call(model)
            flat = [o for o in torch.utils._pytree.tree_flatten(out)[0]
                    if isinstance(o, Tensor) and o.requires_grad]
            if flat and leaves:
                torch.autograd.grad(flat, leaves, [torch.ones_like(o) for o in flat],
                                    allow_unused=True)
        else:
            with torch.no_grad():
                ex.call(model)

    return run


def _timing_example(inputs: Sequence[Any] | Example, train: bool) -> Example:
    ex = inputs if isinstance(inputs, Example) else Example(tuple(inputs))
    return ex.map(lambda x: x.detach().requires_grad_(x.is_floating_point() and train))


def model_time(model: nn.Module, inputs: Sequence[Any] | Example, train: bool, repeats: int = 7
               ) -> tuple[float, float]:
    """(median seconds, relative spread) of one forward (eval) or forward+backward (train)."""
    ex = _timing_example(inputs, train)
    device = _device_of(model, ex.tensors())
    with preserved([model]):
        model.train(train)
        return median_time(_step(model, ex, train), device, repeats=repeats)


def compare_models(original: nn.Module, optimized: nn.Module, inputs: Sequence[Any] | Example,
                   train: bool, rounds: int = 3, repeats: int = 7,
                   budget_s: float | None = None) -> Any:
    """Interleaved medians: (original s, optimized s, noise as a relative spread).  Neither model
    is changed (buffers, modes, ``.grad`` and RNG are restored).

    With ``budget_s``: one interleaved measurement of ``repeats`` rounds (fewer when one step of
    each does not fit the budget that often; ``None`` when it does not fit three times)."""
    if budget_s is None:
        a, b, spread = [], [], 0.0
        for _ in range(rounds):
            ta, sa = model_time(original, inputs, train, repeats)
            tb, sb = model_time(optimized, inputs, train, repeats)
            a.append(ta)
            b.append(tb)
            spread = max(spread, sa, sb)
        return statistics.median(a), statistics.median(b), spread
    ex = _timing_example(inputs, train)
    device = _device_of(original, ex.tensors())
    with preserved([original, optimized]):
        original.train(train)
        optimized.train(train)
        fns = {"a": _step(original, ex, train), "b": _step(optimized, ex, train)}
        t0 = time.perf_counter()
        for fn in fns.values():  # the first call also warms up
            fn()
        _sync(device)
        pair = time.perf_counter() - t0
        fit = int((budget_s - pair) / max(pair, 1e-9)) - 2  # warm-up and calibration: one each
        if fit < 3:
            return None
        t = interleaved(fns, device, rounds=min(repeats, fit), min_time=min(0.01, pair))
    return t["a"][0], t["b"][0], max(t["a"][1], t["b"][1])
