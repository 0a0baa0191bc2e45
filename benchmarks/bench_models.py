"""End-to-end: the training step of each bundled example model, before and after ``optimize``.

    python benchmarks/bench_models.py [--rounds 5]

Isolated layers show what a rewrite saves; this shows what it is worth inside a real model, where
other layers (a GRU, a Transformer layer) take their share of the time.  Original and optimized
run interleaved in one process; medians of a forward + backward step.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
from tabulate import tabulate

import tdd_fx
from tdd_fx.tune import compare_models

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _models() -> dict[str, tuple[torch.nn.Module, tuple[torch.Tensor, ...]]]:
    forecaster, audio, video = _load("forecaster"), _load("audio_tagger"), _load("video_frames")
    torch.manual_seed(0)
    return {
        "forecaster (TFT-style, Keras-port wrappers)": (forecaster.Forecaster(),
                                                        forecaster.example_inputs()),
        "audio tagger (Conv2d(1,C,(64,1)) stem + GRU)": (audio.build(), audio.example_inputs()),
        "video frames (per-frame loop + Transformer)": (video.build(), video.example_inputs()),
    }


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    rows = []
    for name, (model, inputs) in _models().items():
        model.train()
        opt = tdd_fx.optimize(model, inputs)
        a, b, _ = compare_models(model, opt, inputs, train=True, rounds=args.rounds, repeats=3)
        report = opt.tdd_report
        rows.append({"model": name, "sites rewritten": len(report.rewritten),
                     "original ms": round(a * 1e3, 1), "optimized ms": round(b * 1e3, 1),
                     "speed-up": round(a / b, 2)})
        print(f"  done {name}", file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, training step "
          "(forward + backward), median of interleaved rounds")
    print(tabulate(rows, headers="keys", tablefmt="github"))
    return rows


if __name__ == "__main__":
    main()
