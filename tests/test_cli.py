"""The ``tdd-fx`` command line: formats, --fail-on-sites, every exit code, optimize --output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import cli_models
import pytest
import torch

import tdd_fx
from tdd_fx import cli

TESTS = Path(__file__).resolve().parent
SHAPE = "4x7x6"  # (B, T, cli_models.FEAT)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *needles: str) -> None:
    """Our own errors: exactly one ``tdd-fx: error: ...`` line, no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tdd-fx: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# --- formats ---------------------------------------------------------------------------------

def test_table_format_is_the_report_str(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "audit", "cli_models:Wrapped", "--input", SHAPE)
    assert code == 0
    expected = tdd_fx.audit(cli_models.Wrapped().eval(), (torch.randn(4, 7, 6),))
    assert out.splitlines()[:4] == str(expected).splitlines()[:4]  # header, rule, two sites
    assert "audit of Wrapped: 2 candidate site(s), 2 provably time-distributed dense" in out
    assert out.count(" found ") == 2


def test_json_format_is_only_the_document(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "audit", "cli_models:Wrapped", "--input", SHAPE, "--format", "json")
    assert code == 0
    doc = json.loads(out)
    assert doc["mode"] == "audit" and doc["model"] == "Wrapped"
    assert [s["status"] for s in doc["sites"]] == ["found", "found"]
    assert [s["in_shape"] for s in doc["sites"]] == [[4, 7, 6], [4, 7, 5]]
    assert doc["inputs"] == "(4, 7, 6):float32"


def test_markdown_format(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "audit", "cli_models:Wrapped", "-i", SHAPE, "-f", "markdown")
    assert code == 0
    assert out.startswith("**audit of Wrapped: 2 candidate site(s)")
    assert "| pattern " in out and "|-----" in out
    assert "Example inputs: `(4, 7, 6):float32`" in out


# --- targets, inputs, modes ------------------------------------------------------------------

@pytest.mark.parametrize("target", ["cli_models:Wrapped", "cli_models:make_wrapped",
                                    "cli_models:INSTANCE"])
def test_class_factory_and_instance_targets(capsys: pytest.CaptureFixture[str], target: str) -> None:
    code, out, _ = run(capsys, "audit", target, "-i", SHAPE, "-f", "json")
    assert code == 0
    assert len(json.loads(out)["sites"]) == 2


def test_several_inputs_with_a_dtype_each(capsys: pytest.CaptureFixture[str]) -> None:
    # Tagged embeds its int input with Embedding(10): ints outside [0, 10) would make it fail (exit 5)
    code, out, _ = run(capsys, "audit", "cli_models:Tagged", "-i", SHAPE, "-i", "4x7",
                       "--dtype", "float32", "--dtype", "int64", "-f", "json")
    assert code == 0
    doc = json.loads(out)
    assert doc["inputs"] == "(4, 7, 6):float32, (4, 7):int64"
    assert [s["status"] for s in doc["sites"]] == ["found"]


def test_one_dtype_applies_to_every_input(capsys: pytest.CaptureFixture[str]) -> None:
    # Tagged promotes an int series when it adds the float embedding, so it accepts int64 twice
    code, out, _ = run(capsys, "audit", "cli_models:Tagged", "-i", SHAPE, "-i", "4x7",
                       "--dtype", "int64", "-f", "json")
    assert code == 0
    assert json.loads(out)["inputs"] == "(4, 7, 6):int64, (4, 7):int64"


def test_make_inputs_shapes_dtypes_and_int_range() -> None:
    xs = cli.make_inputs([(50, 40), (3, 2), (2,)], [torch.int64, torch.bfloat16, torch.bool], seed=1)
    assert [tuple(x.shape) for x in xs] == [(50, 40), (3, 2), (2,)]
    assert [x.dtype for x in xs] == [torch.int64, torch.bfloat16, torch.bool]
    assert xs[0].min() == 0 and xs[0].max() == 9  # 2000 draws cover [0, 10)
    again = cli.make_inputs([(50, 40), (3, 2), (2,)], [torch.int64, torch.bfloat16, torch.bool], seed=1)
    assert all(torch.equal(a, b) for a, b in zip(xs, again))
    both = cli.make_inputs([(2, 3), (4,)], [torch.int32])
    assert [x.dtype for x in both] == [torch.int32, torch.int32]


def test_parse_shape_and_dtype() -> None:
    assert cli.parse_shape("8x100x64") == (8, 100, 64)
    assert cli.parse_shape("5") == (5,)
    assert cli.parse_dtype("torch.float64") is torch.float64
    assert cli.parse_dtype("long") is torch.int64


def test_eval_by_default_train_on_request(capsys: pytest.CaptureFixture[str]) -> None:
    instance = cli_models.INSTANCE
    try:
        instance.eval()
        assert run(capsys, "audit", "cli_models:INSTANCE", "-i", SHAPE, "--train")[0] == 0
        assert instance.training and instance.drop.training
        assert run(capsys, "audit", "cli_models:INSTANCE", "-i", SHAPE)[0] == 0
        assert not instance.training and not instance.drop.training
        instance.train()
        assert run(capsys, "audit", "cli_models:INSTANCE", "-i", SHAPE, "--eval")[0] == 0
        assert not instance.training
    finally:
        instance.eval()


def test_py_path_target(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    source = tmp_path / "cli_py_target_model.py"
    source.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(6, 2)

            def forward(self, x):
                return self.fc(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], x.shape[1], -1)
    """))
    code, out, _ = run(capsys, "audit", f"{source}:Net", "-i", SHAPE, "-f", "json")
    assert code == 0
    doc = json.loads(out)
    assert doc["model"] == "Net"
    assert [s["status"] for s in doc["sites"]] == ["found"]
    assert "cli_py_target_model.py" in doc["sites"][0]["where"]


# --- --fail-on-sites -------------------------------------------------------------------------

def test_fail_on_sites_exits_3_when_sites_are_found(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "audit", "cli_models:Wrapped", "-i", SHAPE, "--fail-on-sites")
    assert code == cli.EXIT_SITES == 3
    assert "2 provably time-distributed dense" in out  # the report is still printed


def test_fail_on_sites_exits_0_without_sites(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "audit", "cli_models:NoSites", "-i", SHAPE, "--fail-on-sites")
    assert code == 0
    assert "(no candidate sites)" in out


def test_without_fail_on_sites_found_sites_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "audit", "cli_models:Wrapped", "-i", SHAPE)[0] == 0


def test_help_documents_fail_on_sites_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "audit", "--help")
    assert code == 0
    assert "--fail-on-sites" in out and "status 3" in out and "CI" in out
    assert "5  the model fails on the given inputs" in out


# --- optimize --------------------------------------------------------------------------------

def test_optimize_output_round_trip(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    original = cli_models.Wrapped().eval()
    saved = tmp_path / "orig.pt"
    torch.save(original, saved)
    out_path = tmp_path / "sub" / "opt.pt"
    code, out, err = run(capsys, "optimize", str(saved), "-i", SHAPE, "-f", "json", "-o", str(out_path))
    assert code == 0, err
    doc = json.loads(out)
    assert doc["mode"] == "optimize" and doc["verified"] is True
    assert [s["status"] for s in doc["sites"]] == ["rewritten", "rewritten"]
    assert f"saved the optimized module to {out_path}" in err

    loaded = torch.load(out_path, weights_only=False)
    assert isinstance(loaded, torch.nn.Module) and not loaded.training
    assert len(loaded.tdd_report.rewritten) == 2
    assert loaded.state_dict().keys() == original.state_dict().keys()
    calls = [n.target for n in tdd_fx.graph_of(loaded).graph.nodes if n.op == "call_function"]
    assert calls.count(tdd_fx.time_distributed_dense) == 2
    for shape in [(4, 7, 6), (2, 11, 6)]:  # the example's sizes and others
        x = torch.randn(shape)
        torch.testing.assert_close(loaded(x), original(x), rtol=0, atol=1e-6)
    x2 = torch.randn(3, 6)  # outside the capture: the saved module runs the original code
    with pytest.warns(RuntimeWarning, match="running the original forward"):
        got = loaded(x2)
    torch.testing.assert_close(got, original(x2))


def test_keyword_inputs_and_dtypes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "audit", "cli_models:Keyworded", "-i", "features=4x7x6",
                         "-i", "mask=4x7:float32", "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["inputs"] == "features=(4, 7, 6):float32, mask=(4, 7):float32"
    assert [s["status"] for s in doc["sites"]] == ["found"]


def test_factory_returning_its_example_call(capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    out_path = tmp_path / "kw.pt"
    code, out, err = run(capsys, "optimize", "cli_models:make_keyworded", "-o", str(out_path))
    assert code == 0, err
    assert "features=(4, 7, 6):float32, mask=(4, 7):float32" in out
    loaded = torch.load(out_path, weights_only=False)
    model, _, kwargs = cli_models.make_keyworded()
    model.load_state_dict(loaded.state_dict())
    torch.testing.assert_close(loaded(**kwargs), model(**kwargs))
    torch.testing.assert_close(loaded(features=kwargs["features"]), model(kwargs["features"]))


def test_optimize_table_and_seeded_factory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_path = tmp_path / "opt.pt"
    code, out, _ = run(capsys, "optimize", "cli_models:make_wrapped", "-i", SHAPE, "-o", str(out_path),
                       "--seed", "3")
    assert code == 0
    assert "optimize of Wrapped: 2 candidate site(s), 2 rewritten" in out
    torch.manual_seed(3)
    original = cli_models.make_wrapped().eval()  # what the CLI built with --seed 3
    x = torch.randn(5, 2, 6)
    torch.testing.assert_close(torch.load(out_path, weights_only=False)(x), original(x))


def test_optimize_requires_output(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "optimize", "cli_models:Wrapped", "-i", SHAPE)
    assert code == 2
    assert "--output" in err


# --- errors: exit codes and messages ---------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["audit", "cli_models:Wrapped", "--input", "8xabc"], "invalid shape '8xabc'"),
    (["audit", "cli_models:Wrapped", "--input", "8x0x6"], "invalid shape '8x0x6'"),
    (["audit", "cli_models:Wrapped", "--input", "1x=4x7"], "'1x' is not an argument name"),
    (["audit", "cli_models:Wrapped", "-i", SHAPE, "--dtype", "complex7"], "unknown dtype 'complex7'"),
    (["audit", "cli_models:Wrapped", "-i", SHAPE, "--eval", "--train"], "not allowed with"),
    (["audit", "cli_models:Wrapped", "-i", SHAPE, "--format", "yaml"], "invalid choice"),
    (["lint", "cli_models:Wrapped"], "invalid choice"),
    ([], "required"),
])
def test_argparse_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str],
                                      needle: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == cli.EXIT_USAGE == 2
    assert out == ""
    assert needle in err and "usage:" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, needles", [
    (["audit", "cli_models:Tagged", "-i", SHAPE, "-i", "4x7", "-i", "4x7", "--dtype", "float32",
      "--dtype", "int64"], ["2 --dtype for 3 --input"]),
    (["audit", "cli_models", "-i", SHAPE], ["invalid TARGET 'cli_models'"]),
    (["audit", "cli_models:Wrapped"], ["no example inputs", "--input"]),
    (["audit", "cli_models.py", "-i", SHAPE], ["no attribute: write cli_models.py:ATTR"]),
])
def test_our_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str],
                                 needles: list[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert_one_line_error(err, *needles)


def test_cuda_without_cuda_exits_2(capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run(capsys, "audit", "cli_models:Wrapped", "-i", SHAPE, "--device", "cuda")
    assert code == 2
    assert_one_line_error(err, "CUDA is not available")


@pytest.mark.parametrize("target, needles", [
    ("no_such_pkg.models:Net", ["cannot import module 'no_such_pkg.models'", "No module named"]),
    ("cli_models:Missing", ["cli_models has no attribute 'Missing'", "Wrapped"]),
    ("cli_models:Wrapped.missing", ["no attribute 'missing'"]),
    ("cli_models:NeedsArgs", ["cli_models:NeedsArgs()", "TypeError", "size"]),
    ("cli_models:not_a_model", ["cli_models:not_a_model() returned a int, not a torch.nn.Module"]),
    ("cli_models:FEAT", ["cli_models:FEAT is a int"]),
    ("does/not/exist.pt", ["cannot load does/not/exist.pt: no such file"]),
    ("does/not/exist.py:Net", ["no such file"]),
])
def test_unloadable_targets_exit_4(capsys: pytest.CaptureFixture[str], target: str,
                                   needles: list[str]) -> None:
    code, out, err = run(capsys, "audit", target, "-i", SHAPE)
    assert code == cli.EXIT_LOAD == 4 and out == ""
    assert_one_line_error(err, *needles)


def test_saved_files_that_are_not_modules_exit_4(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    state = tmp_path / "weights.pt"
    torch.save(cli_models.Wrapped().state_dict(), state)
    code, _, err = run(capsys, "audit", str(state), "-i", SHAPE)
    assert code == 4
    assert_one_line_error(err, "holds a", "not a torch.nn.Module", "state_dict")

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    code, _, err = run(capsys, "audit", str(junk), "-i", SHAPE)
    assert code == 4
    assert_one_line_error(err, f"cannot load {junk}")


def test_py_file_failing_at_import_exits_4(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    source = tmp_path / "cli_broken_model.py"
    source.write_text("import torch\nraise RuntimeError('no GPU driver\\nsecond line')\n")
    code, _, err = run(capsys, "audit", f"{source}:Net", "-i", SHAPE)
    assert code == 4
    assert_one_line_error(err, "cannot import", "RuntimeError: no GPU driver second line")


def test_model_failing_on_inputs_exits_5(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "audit", "cli_models:Wrapped", "-i", "4x7x5")
    assert code == cli.EXIT_MODEL == 5 and out == ""
    assert_one_line_error(err, "the model itself fails on the example inputs", "(4, 7, 5):float32",
                          "mat1 and mat2 shapes cannot be multiplied")


def test_model_failing_on_inputs_exits_5_in_optimize(capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    out_path = tmp_path / "never.pt"
    code, _, err = run(capsys, "optimize", "cli_models:Tagged", "-i", SHAPE, "-o", str(out_path))
    assert code == 5  # Tagged needs two inputs
    assert_one_line_error(err, "missing 1 required positional argument")
    assert not out_path.exists()


def test_internal_failure_exits_1(capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("boom\nand more")

    monkeypatch.setattr(tdd_fx, "audit", broken)
    code, out, err = run(capsys, "audit", "cli_models:Wrapped", "-i", SHAPE)
    assert code == cli.EXIT_INTERNAL == 1 and out == ""
    lines = err.strip().splitlines()
    assert lines == ["tdd-fx: internal error: RuntimeError: boom and more "
                     "(rerun with --traceback for details)"]

    code, _, err = run(capsys, "audit", "cli_models:Wrapped", "-i", SHAPE, "--traceback")
    assert code == 1
    assert "Traceback (most recent call last)" in err and "in broken" in err


def test_value_error_not_from_the_model_is_internal(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise ValueError("not a literal int")

    monkeypatch.setattr(tdd_fx, "audit", broken)
    code, _, err = run(capsys, "audit", "cli_models:Wrapped", "-i", SHAPE)
    assert code == 1
    assert "internal error: ValueError: not a literal int" in err


def test_save_failure_exits_1_and_leaves_no_file(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out_path = tmp_path / "opt.pt"

    def half_save(obj: object, path: object) -> None:
        Path(str(path)).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_save)
    code, _, err = run(capsys, "optimize", "cli_models:Wrapped", "-i", SHAPE, "-o", str(out_path))
    assert code == 1
    assert_one_line_error(err, f"cannot save the optimized module to {out_path}", "OSError: disk full")
    assert not out_path.exists()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"tdd-fx {tdd_fx.__version__}"


# --- the installed entry points --------------------------------------------------------------

def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    return env


def test_console_script_help() -> None:
    bindir = str(Path(sys.executable).parent)
    exe = shutil.which("tdd-fx", path=os.pathsep.join([bindir, os.environ.get("PATH", "")]))
    assert exe is not None, "the tdd-fx console script is not installed: pip install -e ."
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: tdd-fx")
    assert "audit" in done.stdout and "optimize" in done.stdout
    assert "3  audit --fail-on-sites found provably time-distributed dense sites" in done.stdout


def test_python_dash_m_audit(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tdd_fx", "audit", "cli_models:Wrapped", "--input", SHAPE,
         "--format", "json", "--fail-on-sites"],
        capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    assert done.returncode == 3, done.stderr
    doc = json.loads(done.stdout)
    assert [s["status"] for s in doc["sites"]] == ["found", "found"]
