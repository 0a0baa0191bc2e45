"""Time each hand-written form against its optimized version and a hand-written ``nn.Linear``.

    python benchmarks/bench_forms.py                       # every form, 2 shapes, fp32 + bf16
    python benchmarks/bench_forms.py --forms reshape --mode train --shapes 16x400x80x128
    python benchmarks/bench_forms.py --device cuda --compile

For each (form, shape (B, T, F, O), dtype, mode) the variants run interleaved, round after round,
in one process; the table gives medians of times and, for the ratios that matter, the median of
the per-round ratios (each round's two timings share that round's machine state): optimized /
original (the default must never be slower: <= 1.02) with ``±`` its noise (half the
inter-quartile range of those ratios), optimized / nn.Linear (the canonical node should cost
what the plain layer costs).  The last lines name the worst row, and the rows slower than 1.02
by more than their noise.  ``--compile`` adds ``torch.compile`` of the original and of the optimized
model as columns (ratios to the original) with their compile times.
Modes: ``infer`` a forward under ``torch.no_grad()``; ``train`` forward + backward with input and
parameter gradients; ``train_nograd`` the same without an input gradient (a first layer).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forms import FORMS, REFERENCES  # noqa: E402

import tdd_fx  # noqa: E402

DEFAULT_SHAPES = ["8x100x40x64", "32x200x128x256"]  # a small one, where overheads show


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_fn(model: nn.Module, inputs: tuple[torch.Tensor, ...], mode: str) -> Callable[[], None]:
    if mode == "infer":
        def run() -> None:
            with torch.no_grad():
                model(*inputs)
        return run
    xs = tuple(x.detach().requires_grad_(x.is_floating_point() and mode == "train")
               for x in inputs)
    with torch.no_grad():
        grad = torch.randn_like(model(*xs))

    def run() -> None:
        model(*xs).backward(grad)
    return run


def compiled(model: nn.Module, inputs: tuple[torch.Tensor, ...], mode: str
             ) -> tuple[Callable[[], None], float]:
    """``torch.compile(model)``'s step and the seconds its first call (the compilation) took."""
    import torch._dynamo

    torch._dynamo.reset()
    fn = step_fn(torch.compile(model), inputs, mode)  # compiles while making the gradient
    t0 = time.perf_counter()
    fn()
    return fn, time.perf_counter() - t0


def measure(fns: dict[str, Callable[[], None]], device: torch.device, rounds: int,
            min_time: float = 0.02) -> dict[str, list[float]]:
    """Seconds per call of each function in each round, the functions interleaved round after
    round (so a ratio of two functions in one round shares that round's machine state)."""
    iters = {}
    for name, fn in fns.items():  # warm up, and pick an iteration count per round
        fn()
        _sync(device)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < min_time:
            fn()
            n += 1
        _sync(device)
        iters[name] = max(1, n)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(iters[name]):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / iters[name])
    return samples


def paired(samples: dict[str, list[float]], a: str, b: str) -> tuple[float, float]:
    """Median of the per-round ratios a/b, and their half inter-quartile range (the noise)."""
    r = sorted(x / y for x, y in zip(samples[a], samples[b]))
    q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
    return statistics.median(r), (q[2] - q[0]) / 2


def bench(form: str, shape: tuple[int, int, int, int], mode: str, dtype: torch.dtype,
          device: torch.device, rounds: int, with_compile: bool = False) -> dict[str, object]:
    b, t, f, o = shape
    torch.manual_seed(0)
    builder, _ = FORMS[form]
    model, inputs = builder(b, t, f, o)
    model = model.to(device=device, dtype=dtype).train(mode == "train")
    inputs = tuple(x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
                   for x in inputs)
    optimized = tdd_fx.optimize(model, inputs)
    linear = REFERENCES.get(form, nn.Linear)(f, o).to(device=device, dtype=dtype)
    x_btf = torch.randn(b, t, f, device=device, dtype=dtype)
    fns = {"original": step_fn(model, inputs, mode), "optimized": step_fn(optimized, inputs, mode),
           "nn.Linear": step_fn(linear, (x_btf,), "train" if mode == "train" else mode)}
    compile_s = {}
    if with_compile:
        t0 = time.perf_counter()
        for name, m in (("compiled original", model), ("compiled optimized", optimized)):
            fns[name], _ = compiled(m, inputs, mode)
            compile_s[name] = time.perf_counter() - t0
            t0 = time.perf_counter()
    samples = measure(fns, device, rounds)
    times = {name: statistics.median(v) for name, v in samples.items()}
    ratio, noise = paired(samples, "optimized", "original")
    kernels = {s.kernel for s in optimized.tdd_report.rewritten} or {"(not rewritten)"}
    row: dict[str, object] = {
        "form": form, "B,T,F,O": ",".join(map(str, shape)), "mode": mode,
        "dtype": str(dtype).replace("torch.", ""), "kernel": "/".join(sorted(kernels)),
        "original ms": times["original"] * 1e3, "optimized ms": times["optimized"] * 1e3,
        "nn.Linear ms": times["nn.Linear"] * 1e3,
        "opt/orig": ratio, "±": noise,
        "opt/linear": paired(samples, "optimized", "nn.Linear")[0],
    }
    for name, seconds in compile_s.items():
        short = name.replace("compiled ", "compile(") + ")"
        row[f"{short}/orig"] = paired(samples, name, "original")[0]
        row[f"{short} compile s"] = seconds
    return row


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--forms", nargs="*", default=sorted(FORMS), choices=sorted(FORMS))
    p.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES, help="BxTxFxO")
    p.add_argument("--mode", choices=["train", "train_nograd", "infer", "all"], default="all")
    p.add_argument("--dtype", nargs="*", default=["float32", "bfloat16"])
    p.add_argument("--compile", action="store_true", help="add torch.compile columns")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    modes = ["infer", "train", "train_nograd"] if args.mode == "all" else [args.mode]
    rows = []
    for form in args.forms:
        for s in args.shapes:
            shape = tuple(int(v) for v in s.split("x"))
            for dt in args.dtype:
                for mode in modes:
                    rows.append(bench(form, shape, mode, getattr(torch, dt), device, args.rounds,
                                      args.compile))
                    print(f"  done {form} {s} {dt} {mode}", file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    print(tabulate(rows, headers="keys", floatfmt=".3f", tablefmt="github"))
    worst = max(rows, key=lambda r: r["opt/orig"])
    print(f"worst optimized/original: {worst['opt/orig']:.3f} ± {worst['±']:.3f} ({worst['form']} "
          f"{worst['B,T,F,O']} {worst['dtype']} {worst['mode']})")
    slower = [r for r in rows if r["opt/orig"] - r["±"] > 1.02]
    print(f"slower than 1.02 beyond noise: {len(slower)} of {len(rows)} rows" + "".join(
        f"\n  {r['form']} {r['B,T,F,O']} {r['dtype']} {r['mode']}: {r['opt/orig']:.3f} ± "
        f"{r['±']:.3f}" for r in slower))
    return rows


if __name__ == "__main__":
    main()
