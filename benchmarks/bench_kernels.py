"""The kernels of ``tdd_fx.time_distributed_dense`` on channel-first 3-D data, over a grid of shapes.

    python benchmarks/bench_kernels.py                       # float32 and bfloat16, infer and train
    python benchmarks/bench_kernels.py --dtype float32 --modes infer

This is the evidence behind ``tdd_fx.ops.choose_kernel``'s CPU rule for features on axis 1 of a
``(B, F, T)`` input: each kernel is timed interleaved with the others, round after round, on the
same data; the table gives each kernel's time relative to ``conv`` (a pointwise ``Conv1d``, what
such models usually run) and the summary counts the shapes where each kernel is at least 2%
faster or slower than ``conv`` beyond the measured noise.  ``infer`` is a forward under
``no_grad``; ``train`` a forward and backward with input and parameter gradients.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from tabulate import tabulate

from tdd_fx import ops
from tdd_fx.tune import interleaved

KERNELS = ["conv", "baddbmm", "matmul", "linear_t", "linear_tc"]
#: (B, F, T, O): batch, features, time, outputs
SHAPES = [(b, f, t, o) for b, t, (f, o) in itertools.product(
    (1, 8, 32), (16, 100, 400), ((16, 16), (40, 64), (128, 256)))]


def measure(shape: tuple[int, int, int, int], dtype: torch.dtype, train: bool,
            rounds: int) -> dict[str, tuple[float, float]]:
    b, f, t, o = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, f, t, generator=g).to(dtype).requires_grad_(train)
    w = torch.randn(o, f, generator=g).to(dtype).requires_grad_(train)
    bias = torch.randn(o, generator=g).to(dtype).requires_grad_(train)

    def step(name: str):  # noqa: ANN202
        def run() -> None:
            if train:
                y = ops.time_distributed_dense(x, w, bias, feature_dim=1, impl=name)
                y.backward(torch.ones_like(y))
            else:
                with torch.no_grad():
                    ops.time_distributed_dense(x, w, bias, feature_dim=1, impl=name)
        return run

    return interleaved({k: step(k) for k in KERNELS}, torch.device("cpu"), rounds=rounds,
                       min_time=0.005)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dtype", nargs="*", default=["float32", "bfloat16"])
    p.add_argument("--modes", nargs="*", default=["infer", "train"])
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    rows, wins = [], {}
    for dt, mode, shape in itertools.product(args.dtype, args.modes, SHAPES):
        times = measure(shape, getattr(torch, dt), mode == "train", args.rounds)
        base, noise = times["conv"]
        row = {"dtype": dt, "mode": mode, "B,F,T,O": ",".join(map(str, shape)),
               "conv ms": round(base * 1e3, 4)}
        for k in KERNELS[1:]:
            t, n = times[k]
            row[f"{k}/conv"] = round(t / base, 3)
            margin = max(0.02, noise, n)
            w = wins.setdefault((dt, mode, k), [0, 0, 0])
            w[0 if t < base * (1 - margin) else 2 if t > base * (1 + margin) else 1] += 1
        rows.append(row)
        print(f"  {dt} {mode} {shape}", flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of "
          f"{args.rounds} interleaved rounds; ratios < 1: faster than conv")
    print(tabulate(rows, headers="keys", tablefmt="github"))
    summary = [{"dtype": dt, "mode": mode, "kernel": k, "faster than conv": v[0],
                "within noise": v[1], "slower": v[2]} for (dt, mode, k), v in wins.items()]
    print()
    print(tabulate(summary, headers="keys", tablefmt="github"))


if __name__ == "__main__":
    main()
