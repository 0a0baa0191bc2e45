"""The bundled examples: each one's sites are rewritten or rejected as its docstring says, the
optimized model computes the same outputs and gradients, and ``main()`` prints a report.

The examples are loaded from their files (``examples/`` is not a package); sizes and timing
repeats are module-level constants, shrunk here to keep the tests fast.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import assert_equivalent
from torch import nn

import tdd_fx

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_tdd_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def optimized(module: ModuleType, **sizes: int) -> tuple[nn.Module, nn.Module, tuple]:
    """An example's model (``module.build()``), its optimized copy, and the example inputs."""
    model = module.build()
    inputs = module.example_inputs(**sizes)
    return model, tdd_fx.optimize(model, inputs), inputs


def main_output(module: ModuleType, capsys: pytest.CaptureFixture[str],
                monkeypatch: pytest.MonkeyPatch | None = None, **settings: int) -> str:
    """What the example's ``main()`` prints (with ``settings`` patched into the module), after
    checking the lines every example prints."""
    for name, value in settings.items():
        assert monkeypatch is not None
        monkeypatch.setattr(module, name, value)
    module.main()
    out = capsys.readouterr().out
    assert "== audit" in out and "== optimize" in out
    assert "rewritten" in out and "verified" in out
    assert "parameters shared with the original: True; same state_dict keys: True" in out
    return out


def line_of(module: ModuleType, text: str) -> str:
    """``file.py:LINE`` of the one line of the example's code that starts with ``text``."""
    path = Path(module.__file__)
    hits = [i for i, line in enumerate(path.read_text().splitlines(), 1)
            if line.lstrip().startswith(text)]
    assert len(hits) == 1, (text, hits)
    return f"{path.name}:{hits[0]}"


def site(report: tdd_fx.Report, pattern: str, *, module: str = "", at: str = "") -> tdd_fx.Site:
    """The one site of ``pattern`` at a module path and/or a source line."""
    found = [s for s in report.sites if s.pattern == pattern
             and (not module or s.module == module) and (not at or s.source.endswith(at))]
    assert len(found) == 1, f"{pattern} {module} {at}: {found}\n{report}"
    return found[0]


def rewritten_only_by(opt: nn.Module, report: tdd_fx.Report) -> None:
    """Verified, and exactly the rewritten sites became canonical nodes."""
    assert report.verified, str(report)
    assert not report.rolled_back, str(report)
    mode = "train" if opt.training else "eval"
    nodes = [n for graphs in tdd_fx.graphs(opt).values() for n in graphs[mode].graph.nodes
             if n.target is tdd_fx.time_distributed_dense]
    assert len(nodes) == len(report.rewritten)


def same_tensors(model: nn.Module, opt: nn.Module) -> None:
    assert {id(p) for p in opt.parameters()} == {id(p) for p in model.parameters()}
    assert list(opt.state_dict()) == list(model.state_dict())


def both_modes(opt: nn.Module, model: nn.Module, inputs: tuple, **tol) -> None:
    for train in (True, False):
        model.train(train)
        opt.train(train)
        assert_equivalent(opt, model, inputs, **tol)
    model.train()
    opt.train()


# --------------------------------------------------------------------------------------------
# forecaster.py: a Keras-port TimeDistributed wrapper around every dense layer


@pytest.fixture(scope="module")
def forecaster() -> ModuleType:
    return load("forecaster")


@pytest.fixture(scope="module")
def forecaster_opt(forecaster: ModuleType) -> tuple[nn.Module, nn.Module, tuple]:
    torch.manual_seed(0)
    model = forecaster.Forecaster()
    inputs = forecaster.example_inputs(batch=4, steps=12)
    return model, tdd_fx.optimize(model, inputs), inputs


def test_forecaster_sites(forecaster_opt: tuple) -> None:
    model, opt, _ = forecaster_opt
    report = opt.tdd_report
    rewritten_only_by(opt, report)
    expected = ["project.module", "head.module"] + [
        f"{grn}.{fc}" for grn in ("grn_in", "grn_out") for fc in ("fc1.module", "fc2.module",
                                                                   "gate.module.0")]
    assert sorted(s.module for s in report.rewritten) == sorted(expected)
    assert all(s.pattern == "reshape" for s in report.rewritten)
    embed = site(report, "reshape", module="embed")
    assert embed.status == "rejected" and "Embedding" in embed.reason
    same_tensors(model, opt)


def test_forecaster_equivalent(forecaster: ModuleType, forecaster_opt: tuple) -> None:
    model, opt, inputs = forecaster_opt
    both_modes(opt, model, inputs)
    assert_equivalent(opt, model, forecaster.example_inputs(batch=3, steps=7))


def test_forecaster_main(forecaster: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    main_output(forecaster, capsys)


def test_forecaster_runs_as_the_readme_says() -> None:
    proc = subprocess.run([sys.executable, "examples/forecaster.py"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "rewritten" in proc.stdout and "verified" in proc.stdout
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------
# audio_tagger.py: spectrogram conv stem, temporal conv (near-miss), GRU, TimeDistributed heads


@pytest.fixture(scope="module")
def audio() -> ModuleType:
    return load("audio_tagger")


@pytest.fixture(scope="module")
def audio_opt(audio: ModuleType) -> tuple[nn.Module, nn.Module, tuple]:
    return optimized(audio, batch=4, frames=50)


def test_audio_sites(audio: ModuleType, audio_opt: tuple) -> None:
    model, opt, _ = audio_opt
    report = opt.tdd_report
    rewritten_only_by(opt, report)
    stem = site(report, "conv", module="stem")
    assert stem.status == "rewritten", str(report)
    assert stem.source.endswith(line_of(audio, "x = self.stem(spec"))
    assert stem.in_shape == (4, 1, audio.N_MELS, 50)
    smooth = site(report, "conv", module="smooth")
    assert smooth.status == "rejected"
    assert "kernel size 3" in smooth.reason and "neighbouring positions" in smooth.reason
    for path in ("frame_head.module.0", "frame_head.module.3", "attention.module"):
        assert site(report, "reshape", module=path).status == "rewritten", str(report)
    assert len(report.rewritten) == 4
    assert len(report.sites) == 5
    same_tensors(model, opt)


def test_audio_audit_agrees(audio: ModuleType, audio_opt: tuple) -> None:
    model, opt, inputs = audio_opt
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = tdd_fx.audit(model, inputs)
    assert {s.module for s in report.found} == {s.module for s in opt.tdd_report.rewritten}
    assert [s.module for s in report.rejected] == ["smooth"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_audio_equivalent(audio: ModuleType, audio_opt: tuple) -> None:
    model, opt, inputs = audio_opt
    both_modes(opt, model, inputs)
    # another batch: the graph runs (the proofs hold for every size; n_mels is guarded) ...
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert_equivalent(opt, model, audio.example_inputs(batch=3, frames=50))
    # ... but another clip length runs the original: export unrolls the GRU over the example's
    # frames and fixes their number (a README limitation), and the call says so
    with pytest.warns(RuntimeWarning, match=r"shape\[2\] is 37; the capture fixed it at 50"):
        assert_equivalent(opt, model, audio.example_inputs(batch=3, frames=37))
    # another n_mels fails the guard: the original runs instead (and raises its own error)
    with pytest.warns(RuntimeWarning, match="running the original forward"), \
            pytest.raises(Exception) as info:
        opt(torch.randn(2, audio.N_MELS + 1, 20))
    assert "tdd_fx" not in str(info.value)


def test_audio_main(audio: ModuleType, capsys: pytest.CaptureFixture[str],
                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = main_output(audio, capsys, monkeypatch, FRAMES=40, BATCH=2, TIMING_REPEATS=1)
    assert "mixes neighbouring positions" in out
    assert "input 2x64x40" in out
    for label in ("original", "optimized", "speed-up"):
        assert f"  {label}" in out


# --------------------------------------------------------------------------------------------
# video_frames.py: per-frame loop, a recurrence (near-miss), Transformer layer, tied ModuleList


@pytest.fixture(scope="module")
def video() -> ModuleType:
    return load("video_frames")


@pytest.fixture(scope="module")
def video_opt(video: ModuleType) -> tuple[nn.Module, nn.Module, tuple]:
    return optimized(video, batch=4)


def test_video_sites(video: ModuleType, video_opt: tuple) -> None:
    model, opt, _ = video_opt
    report = opt.tdd_report
    rewritten_only_by(opt, report)
    proj = site(report, "loop", module="frame_proj.0")
    assert proj.status == "rewritten", str(report)
    assert proj.source.endswith(line_of(video, "x = torch.stack([self.frame_proj("))
    assert proj.in_shape == (4, video.FRAMES, video.FEATURES)
    assert proj.out_shape == (4, video.FRAMES, 128)
    memory = site(report, "loop", at=line_of(video, "h = torch.tanh("))
    assert memory.status == "rejected" and "recurrence" in memory.reason
    # the loops' Python length pins the clip length in the capture: no rewrite adds a guard
    assert not [g for g in report.guards if "shape[1]" in g], report.guards
    same_tensors(model, opt)


def test_video_tied_heads_rewritten_with_a_guard(video: ModuleType, video_opt: tuple) -> None:
    """The tied heads run a fixed number of steps: re-rolled, with the clip length guarded; another
    length falls back to the original (which fails on it the same way)."""
    model, opt, _ = video_opt
    heads = site(opt.tdd_report, "loop", module="frame_heads.0.0")
    assert heads.status == "rewritten", heads.reason
    other = torch.randn(2, video.FRAMES + 2, *video_opt[2][0].shape[2:])
    with pytest.warns(RuntimeWarning, match=rf"shape\[1\] is {video.FRAMES + 2}; the capture "
                                            rf"fixed it at {video.FRAMES}"), \
            pytest.raises(Exception) as info:
        opt(other)
    assert "tdd_fx" not in str(info.value)


def test_video_equivalent(video: ModuleType, video_opt: tuple) -> None:
    model, opt, inputs = video_opt
    both_modes(opt, model, inputs)
    assert_equivalent(opt, model, video.example_inputs(batch=3))


def test_video_main(video: ModuleType, capsys: pytest.CaptureFixture[str],
                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = main_output(video, capsys, monkeypatch, FRAMES=6, BATCH=2, TIMING_REPEATS=1)
    assert "recurrence" in out
    assert f"input 2x6x{video.FEATURES}" in out
    for label in ("original", "optimized", "speed-up"):
        assert f"  {label}" in out
