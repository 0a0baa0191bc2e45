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
from .shapes import ShapeAnalysis

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


def tune(gm: fx.GraphModule, inputs: Sequence[Any], train: bool) -> dict[str, dict[str, float]]:
    """Fix the fastest kernel in every canonical node of ``gm``; returns the times per site."""
    shapes = ShapeAnalysis(gm)
    with preserved([gm]):
        gm.train(train)
        shapes.analyse(*inputs)
    measured: dict[str, dict[str, float]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not ops.time_distributed_dense:
            continue
        x, w = shapes.tensor(n.args[0]), shapes.tensor(n.args[1])
        if x is None or w is None:
            continue
        fd = n.kwargs.get("feature_dim", -1)
        times = kernel_times(tuple(x.shape), fd, w.shape[0], x.dtype, _device_of(gm, inputs),
                             train)
        if not times:
            continue
        best = min(times, key=times.__getitem__)
        n.kwargs = {**n.kwargs, "impl": best}
        if "tdd_site" in n.meta:
            measured[n.meta["tdd_site"]] = times
    gm.recompile()
    return measured


def _device_of(gm: nn.Module, inputs: Sequence[Any]) -> torch.device:
    for t in (*inputs, *gm.parameters()):
        if isinstance(t, Tensor):
            return t.device
    return torch.device("cpu")


def model_time(model: nn.Module, inputs: Sequence[Any], train: bool, repeats: int = 7
               ) -> tuple[float, float]:
    """(median seconds, relative spread) of one forward (eval) or forward+backward (train)."""
    device = _device_of(model, inputs)
    xs = [x.detach().requires_grad_(x.is_floating_point()) if isinstance(x, Tensor) and train
          else x for x in inputs]

    leaves = [p for p in model.parameters() if p.requires_grad] + [
        x for x in xs if isinstance(x, Tensor) and x.requires_grad]

    def run() -> None:
        if train:  # autograd.grad, not backward(): the user's .grad fields stay untouched
            out = model(*xs)
            flat = [o for o in torch.utils._pytree.tree_flatten(out)[0]
                    if isinstance(o, Tensor) and o.requires_grad]
            if flat and leaves:
                torch.autograd.grad(flat, leaves, [torch.ones_like(o) for o in flat],
                                    allow_unused=True)
        else:
            with torch.no_grad():
                model(*xs)

    with preserved([model]):
        model.train(train)
        return median_time(run, device, repeats=repeats)


def compare_models(original: nn.Module, optimized: nn.Module, inputs: Sequence[Any], train: bool,
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
