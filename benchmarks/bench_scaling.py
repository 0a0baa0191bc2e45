"""How ``optimize()`` scales with the number of sites (no kernel measurement).

    python benchmarks/bench_scaling.py                 # 250, 500, 1000, 2000 sites
    python benchmarks/bench_scaling.py --sites 100 200

The synthetic model is a chain of Keras-port ``TimeDistributed`` wrappers (one reshape site each)
with a per-step loop every tenth block, on a small ``(2, 4, 8)`` input, so the time measured is the
pass itself — torch.export capture (both modes), matching, rewriting, verification (both
modes) — not the model's math; ``export s`` is the part spent inside ``torch.export.export``
(both modes: the floor that the capture path sets).  It first times the 2-layer GPT-2 of
``tests/thirdparty_models.py`` when transformers is installed (first, so that no earlier run's
heap shapes its time).
"""

from __future__ import annotations

import argparse
import time

import torch
from tabulate import tabulate
from torch import nn

import tdd_fx

try:
    from bench_capture import ExportTimer
except ImportError:  # run from elsewhere than benchmarks/
    from benchmarks.bench_capture import ExportTimer


class Wrapper(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.module = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.module(x.contiguous().view(-1, x.size(-1)))
        return y.view(x.size(0), -1, y.size(-1))


class StepLoop(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.fc(x[:, t]) for t in range(x.size(1))], 1)


class Chain(nn.Module):
    def __init__(self, sites: int, width: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            StepLoop(width) if i % 10 == 9 else Wrapper(width) for i in range(sites))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sites", nargs="*", type=int, default=[250, 500, 1000, 2000])
    args = p.parse_args(argv)
    gpt2()
    rows = []
    for n in args.sites:
        torch.manual_seed(0)
        model = Chain(n)
        x = torch.randn(2, 4, 8)
        with ExportTimer().active() as timer:
            t0 = time.perf_counter()
            opt = tdd_fx.optimize(model, (x,))
            seconds = time.perf_counter() - t0
        report = opt.tdd_report
        mode = "train" if opt.training else "eval"
        nodes = sum(len(g[mode].graph.nodes) for g in tdd_fx.graphs(opt).values() if mode in g)
        rows.append({"sites": n, "rewritten": len(report.rewritten), "graph nodes after": nodes,
                     "optimize() s": round(seconds, 2), "ms per site": round(1e3 * seconds / n, 2),
                     "export s": round(timer.seconds, 2),
                     "verified": report.verified})
        print(f"  {n} sites: {seconds:.2f} s", flush=True)
    print(tabulate(rows, headers="keys", tablefmt="github"))
    return rows


def gpt2() -> None:
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    try:
        import thirdparty_models
        model, args, kwargs = thirdparty_models.gpt2_lm()
    except BaseException as exc:  # pytest.skip included: the package is not installed
        print(f"GPT-2: not measured ({type(exc).__name__}: {exc})")
        return
    t0 = time.perf_counter()
    opt = tdd_fx.optimize(model, args, kwargs)
    seconds = time.perf_counter() - t0
    print(f"GPT-2 (2 layers, {len(opt.tdd_report.rewritten)} sites rewritten): optimize() "
          f"{seconds:.2f} s")


if __name__ == "__main__":
    main()
