"""End-to-end: each bundled example model and the third-party models of the tests, before and
after ``optimize`` (default flags), a forward in eval mode and a training step.

    python benchmarks/bench_models.py [--rounds 5] [--no-thirdparty]

Isolated layers show what a rewrite saves; this shows what it is worth inside a real model, where
other layers (a GRU, a Transformer layer) take their share of the time — and whether the
optimized module's per-call work costs anything.  Original and optimized run interleaved in one
process; medians.
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
from tdd_fx.inputs import Example
from tdd_fx.tune import compare_models

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _models() -> dict[str, tuple[torch.nn.Module, tuple, dict]]:
    forecaster, audio, video = _load("forecaster"), _load("audio_tagger"), _load("video_frames")
    torch.manual_seed(0)
    return {
        "forecaster (TFT-style, Keras-port wrappers)": (forecaster.Forecaster(),
                                                        forecaster.example_inputs(), {}),
        "audio tagger (Conv2d(1,C,(64,1)) stem + GRU)": (audio.build(), audio.example_inputs(),
                                                         {}),
        "video frames (per-frame loop + Transformer)": (video.build(), video.example_inputs(), {}),
    }


def _thirdparty() -> dict[str, tuple[torch.nn.Module, tuple, dict]]:
    sys.path.insert(0, str(EXAMPLES.parent / "tests"))
    import thirdparty_models as tp

    out = {}
    for name, make in (("GPT-2 (2 layers, transformers)", tp.gpt2_lm),
                       ("timm convnext_atto", tp.convnext_atto),
                       ("timm mobilenetv3_small_100", tp.mobilenetv3_small_100),
                       ("speechbrain ECAPA-TDNN", tp.ecapa_tdnn)):
        try:
            out[name] = make()
        except BaseException as exc:  # pytest.skip: the package is not installed
            print(f"  {name}: not measured ({type(exc).__name__}: {exc})", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-thirdparty", action="store_true")
    args = p.parse_args(argv)
    models = _models()
    if not args.no_thirdparty:
        models.update(_thirdparty())
    rows = []
    for name, (model, inputs, kwargs) in models.items():
        example = Example(tuple(inputs), dict(kwargs))
        opt = tdd_fx.optimize(model, inputs, kwargs or None)
        report = opt.tdd_report
        for train in (False, True):
            a, b, noise = compare_models(model, opt, example, train=train, rounds=args.rounds,
                                         repeats=3)
            rows.append({"model": name, "mode": "train step" if train else "eval forward",
                         "sites rewritten": len(report.rewritten),
                         "original ms": round(a * 1e3, 2), "optimized ms": round(b * 1e3, 2),
                         "opt/orig": round(b / a, 3), "noise": f"{100 * noise:.0f}%"})
        print(f"  done {name}", file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; medians of interleaved "
          "rounds; train step = forward + backward (parameter and input gradients)")
    print(tabulate(rows, headers="keys", tablefmt="github"))
    return rows


if __name__ == "__main__":
    main()
