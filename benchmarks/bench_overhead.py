"""The optimized module's per-call work, in microseconds, on models small enough for it to show.

    python benchmarks/bench_overhead.py [--threads 1]

Each call of an optimized module runs one straight-line function compiled for its module tree
and program after the first call (the guarded path: the whole tree's train/eval flags and hook
dicts, autocast, the inputs' ranks/dtypes/devices/sizes, the state's dtypes, read live), then
the graph; anything the guarded path does not recognise takes the full path, which checks
again and says why it falls back.  This prints, per model: the original's forward, the
optimized forward, the graph alone (the executable graph, ``Program.graph_fn()``, on pre-fetched
state: what the rewrite itself costs or saves), and the difference (the dispatch, including
``nn.Module.__call__`` of the root, which the original pays too).  Forward under
``torch.no_grad()``, float32, eval mode; best of interleaved repeats.
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from forms import FORMS  # noqa: E402
from zoo import Wrap  # noqa: E402  (the Keras-port TimeDistributed wrapper)

import tdd_fx  # noqa: E402
from tdd_fx.program import programs_of  # noqa: E402


def _models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 12))
    out = {"TimeDistributed(MLP) (4, 30, 12)": (Wrap(mlp), torch.randn(4, 30, 12))}
    for form in ("conv1d_pointwise", "reshape_channel_first", "reshape"):
        model, (x,) = FORMS[form][0](4, 30, 12, 16)
        out[f"{form} (B, T, F, O) = (4, 30, 12, 16)"] = (model, x)
    return out


def _best_us(fn, number: int, repeats: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeats)) / number * 1e6


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--number", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name, (model, x) in _models().items():
        model.eval()
        opt = tdd_fx.optimize(model, (x,))
        (program,) = [q for q in programs_of(opt) if not q.training]
        state, graph = program.fetch(opt), program.graph_fn()
        fns = {"original": lambda m=model, x=x: m(x), "optimized": lambda m=opt, x=x: m(x),
               "graph alone": lambda g=graph, s=state, x=x: g(*s, x)}
        best = dict.fromkeys(fns, float("inf"))
        with torch.no_grad():
            for _ in range(args.repeats):  # interleaved: a load spike hits all alike
                for k, fn in fns.items():
                    best[k] = min(best[k], _best_us(fn, args.number, 1))
        rows.append({"model": name, "sites": len(opt.tdd_report.rewritten),
                     "original us": round(best["original"], 1),
                     "optimized us": round(best["optimized"], 1),
                     "graph alone us": round(best["graph alone"], 1),
                     "dispatch us": round(best["optimized"] - best["graph alone"], 1),
                     "opt/orig": round(best["optimized"] / best["original"], 3)})
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, eval forward, "
          "no_grad, float32; best of interleaved repeats")
    print(tabulate(rows, headers="keys", tablefmt="github"))
    return rows


if __name__ == "__main__":
    main()
