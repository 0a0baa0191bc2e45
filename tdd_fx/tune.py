"""Measured kernel choice and whole-model timing (``optimize(..., autotune=True)``).

Every kernel of :data:`tdd_fx.ops.KERNELS` computes the same function; which is fastest depends on
device, dtype, shape and whether a backward pass follows (``shared/anchors`` and
``benchmarks/results`` disagree between an H100 and this CPU, and between shapes).  So each
canonical node whose features are not on the last axis is timed with each applicable kernel on
random data of its actual input shape, forward-only in eval mode and forward+backward in training
mode, and the fastest is fixed in the node.  Choices are cached per (device, dtype, shape,
feature_dim, out_features, mode) for the process.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from . import ops
from ._state import preserved
from .capture import copy_module_tree
from .families.base import example_shape
from .inputs import Example

Key = tuple[str, str, tuple[int, ...], int, int, bool]
_CACHE: dict[Key, dict[str, float]] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], device: torch.device, repeats: int = 5,
                min_time: float = 0.01) -> tuple[float, float]:
    """(median seconds per call, relative spread between the quartiles) over ``repeats`` rounds."""
    fn()
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_time:
        fn()
        n += 1
    _sync(device)
    n = max(1, n)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) / n)
    med = statistics.median(samples)
    q = statistics.quantiles(samples, n=4) if len(samples) >= 4 else [min(samples), max(samples)]
    return med, (q[-1] - q[0]) / med if med else 0.0


def candidates_for(ndim: int, feature_dim: int) -> list[str]:
    d = feature_dim % ndim
    if d == ndim - 1:
        return ["linear"]
    names = ["linear_t", "linear_tc", "matmul"]
    if ndim == 3 and d == 1:
        names.append("baddbmm")
    if d == 1 and 3 <= ndim <= 5:
        names.append("conv")
    return names


def kernel_times(shape: Sequence[int], feature_dim: int, out_features: int, dtype: torch.dtype,
                 device: torch.device, train: bool) -> dict[str, float]:
    """Seconds per call of each applicable kernel (cached)."""
    key: Key = (str(device), str(dtype), tuple(shape), feature_dim % len(shape), out_features,
                train)
    if key in _CACHE:
        return _CACHE[key]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tuple(shape), generator=g).to(device=device, dtype=dtype)
    w = torch.randn(out_features, shape[feature_dim], generator=g).to(device=device, dtype=dtype)
    b = torch.randn(out_features, generator=g).to(device=device, dtype=dtype)
    if train:
        x.requires_grad_(True)
        w.requires_grad_(True)
        b.requires_grad_(True)
    out: dict[str, float] = {}
    for name in candidates_for(len(shape), feature_dim):
        def run(name: str = name) -> None:
            if train:
                y = ops.time_distributed_dense(x, w, b, feature_dim=feature_dim, impl=name)
                y.backward(torch.ones_like(y))
            else:
                with torch.no_grad():
                    ops.time_distributed_dense(x, w, b, feature_dim=feature_dim, impl=name)
        try:
            out[name] = median_time(run, device)[0]
        except Exception:  # a kernel that cannot run here is simply not a choice
            continue
    _CACHE[key] = out
    return out


def tune(gm: fx.GraphModule, train: bool, device: torch.device) -> dict[str, dict[str, float]]:
    """Fix the fastest kernel in every canonical node of ``gm`` (timed at the example's sizes,
    from the nodes' captured values); returns the times per site."""
    measured: dict[str, dict[str, float]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not ops.time_distributed_dense:
            continue
        x = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
        w = n.args[1].meta.get("val") if isinstance(n.args[1], fx.Node) else None
        if x is None or w is None:
            continue
        shape = example_shape(tuple(x.shape))
        fd = n.kwargs.get("feature_dim", -1)
        times = kernel_times(shape, fd, int(w.shape[0]), x.dtype, device, train)
        if not times:
            continue
        best = min(times, key=times.__getitem__)
        n.kwargs = {**n.kwargs, "impl": best}
        if "tdd_site" in n.meta:
            measured[n.meta["tdd_site"]] = times
    gm.recompile()
    return measured


def tune_result(original: nn.Module, result: nn.Module, example: Example, report: Any,
                mode: str | None, keep_canonical: bool, parts: Sequence[Any]) -> nn.Module:
    """Measured kernels for every program of ``result``; whole-model time before/after; a result
    slower than the original (beyond measured noise) goes back to the original's code."""
    from .program import programs_of
    from .verify import fp64_reference, verify

    train = original.training if mode is None else mode == "train"
    device = _device_of(original, example.tensors())
    sites = {s.node: s for s in report.rewritten}
    for _, module in result.named_modules():
        for program in programs_of(module):
            times = tune(program.gm, train, device)
            if program.training == original.training:
                for site, t in times.items():
                    if site in sites:
                        sites[site].kernel_ms = {k: round(v * 1e3, 4) for k, v in t.items()}
                        sites[site].kernel = min(t, key=t.__getitem__)
    v = verify(original, result, [example], fp64_reference(original))
    if not v.ok:  # kernels are equivalent; a failure here is a bug, never a silent result
        report.notes.append(f"measured kernels failed verification ({v.detail}); the original "
                            "is returned")
        return copy_module_tree(original)
    before, after, noise = compare_models(original, result, example, train)
    report.time_before_ms, report.time_after_ms = before * 1e3, after * 1e3
    report.timing_mode = "train" if train else "eval"
    if after > before * (1 + max(noise, 0.05)) and not keep_canonical:
        reason = (f"the optimized model measured slower ({after * 1e3:.3g} ms vs "
                  f"{before * 1e3:.3g} ms per {report.timing_mode} step, noise "
                  f"{100 * noise:.0f}%); pass keep_canonical=True to keep it anyway")
        for site in report.rewritten:
            site.status, site.reason = "rolled_back", reason
        report.time_after_ms = before * 1e3
        return copy_module_tree(original)
    return result


def _device_of(gm: nn.Module, inputs: Sequence[Any]) -> torch.device:
    if isinstance(inputs, Example):
        inputs = inputs.tensors()
    for t in (*inputs, *gm.parameters()):
        if isinstance(t, Tensor):
            return t.device
    return torch.device("cpu")


def model_time(model: nn.Module, inputs: Sequence[Any] | Example, train: bool, repeats: int = 7
               ) -> tuple[float, float]:
    """(median seconds, relative spread) of one forward (eval) or forward+backward (train)."""
    ex = inputs if isinstance(inputs, Example) else Example(tuple(inputs))
    device = _device_of(model, ex.tensors())
    ex = ex.map(lambda x: x.detach().requires_grad_(x.is_floating_point() and train))
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

    with preserved([model]):
        model.train(train)
        return median_time(run, device, repeats=repeats)


def compare_models(original: nn.Module, optimized: nn.Module, inputs: Sequence[Any] | Example,
                   train: bool,
                   rounds: int = 3, repeats: int = 7) -> tuple[float, float, float]:
    """Interleaved medians: (original s, optimized s, noise as a relative spread).  Neither model
    is changed (buffers, modes, ``.grad`` and RNG are restored)."""
    a, b, spread = [], [], 0.0
    for _ in range(rounds):
        ta, sa = model_time(original, inputs, train, repeats)
        tb, sb = model_time(optimized, inputs, train, repeats)
        a.append(ta)
        b.append(tb)
        spread = max(spread, sa, sb)
    return statistics.median(a), statistics.median(b), spread
