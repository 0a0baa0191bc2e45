"""The ``tdd-fx`` command line: audit or optimize a model without writing any Python.

    tdd-fx audit mypkg.models:Forecaster --input 16x48x12 --input 16x48 --dtype float32 --dtype int64
    tdd-fx audit models/zoo.py:make_tagger --input 8x100x64 --format json --fail-on-sites
    tdd-fx optimize mypkg.models:Forecaster --input 16x48x12 --output forecaster_tdd.pt

Exit codes: 0 success; 2 bad arguments; 3 ``audit --fail-on-sites`` found provably time-distributed
sites; 4 the target cannot be imported or loaded; 5 the model fails on the given inputs; 1 any
other failure.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "EXIT_INTERNAL",
    "EXIT_LOAD",
    "EXIT_MODEL",
    "EXIT_OK",
    "EXIT_SITES",
    "EXIT_USAGE",
    "CliError",
    "build_parser",
    "load_target",
    "main",
    "make_inputs",
    "parse_dtype",
    "parse_shape",
]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_SITES = 3
EXIT_LOAD = 4
EXIT_MODEL = 5

SAVED_SUFFIXES = (".pt", ".pth")

#: ``--dtype`` names (``torch.<name>``), with the usual aliases
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32, "float": torch.float32,
    "float64": torch.float64, "double": torch.float64,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16, "short": torch.int16,
    "int32": torch.int32, "int": torch.int32,
    "int64": torch.int64, "long": torch.int64,
    "bool": torch.bool,
}

EPILOG = """\
TARGET is one of:
  pkg.module:attr       a class (built with no arguments), a factory function (called with no
                        arguments) or an nn.Module instance; attr may be dotted (Outer.attr).
                        The current directory is importable, as with `python -m`.
  path/to/file.py:attr  the same, importing the file by its path
  path/to/model.pt      a whole module saved with torch.save(module, path) (*.pt / *.pth)

Each --input SHAPE (like 8x100x64) is one positional input of the model, filled with seeded random
values: floats from a normal distribution, integer dtypes with ints in [0, 10), bool at random.

exit codes:
  0  success (for audit --fail-on-sites: no provably time-distributed site)
  1  internal failure
  2  usage error / bad arguments
  3  audit --fail-on-sites found provably time-distributed dense sites
  4  TARGET cannot be imported or loaded
  5  the model fails on the given inputs
"""


class CliError(Exception):
    """A failure with a one-line message and the exit code it maps to."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _describe(exc: BaseException) -> str:
    return _one_line(f"{type(exc).__name__}: {exc}")


# --- argument types --------------------------------------------------------------------------

_SHAPE = re.compile(r"^\d+(x\d+)*$")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8x100x64"`` -> ``(8, 100, 64)``; sizes are positive ints separated by ``x``."""
    s = text.strip().lower()
    if not _SHAPE.match(s) or any(int(v) <= 0 for v in s.split("x")):
        raise argparse.ArgumentTypeError(
            f"invalid shape {text!r}: expected positive sizes separated by 'x', like 8x100x64")
    return tuple(int(v) for v in s.split("x"))


def parse_input(text: str) -> tuple[str | None, tuple[int, ...], torch.dtype | None]:
    """``[NAME=]SHAPE[:DTYPE]`` -> (keyword name or None, shape, dtype or None)."""
    name, eq, rest = text.partition("=")
    if not eq:
        name, rest = "", text
    elif not name.isidentifier():
        raise argparse.ArgumentTypeError(f"invalid input {text!r}: {name!r} is not an argument "
                                         "name")
    shape_text, colon, dtype_text = rest.partition(":")
    return (name or None, parse_shape(shape_text), parse_dtype(dtype_text) if colon else None)


def parse_dtype(text: str) -> torch.dtype:
    """``"float32"`` (or ``"torch.float32"``, ``"long"``, ...) -> the ``torch.dtype``."""
    name = text.strip().lower().removeprefix("torch.")
    if name not in DTYPES:
        choices = ", ".join(k for k, v in DTYPES.items() if str(v) == f"torch.{k}")
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}: choose from {choices}")
    return DTYPES[name]


def _parse_device(text: str) -> torch.device:
    try:
        return torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"invalid device {text!r}: {_one_line(str(exc))}") from exc


# --- the parser ------------------------------------------------------------------------------

def _common_parser() -> argparse.ArgumentParser:
    """The arguments ``audit`` and ``optimize`` share: target, inputs, mode, report format."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("target", metavar="TARGET",
                        help="pkg.module:attr, path/to/file.py:attr, or a saved module *.pt/*.pth")
    common.add_argument("--input", "-i", dest="inputs", metavar="[NAME=]SHAPE[:DTYPE]",
                        action="append", type=parse_input, default=[],
                        help="one example input, like 8x100x64 (positional, in order) or "
                             "input_ids=2x16:int64 (a keyword argument); repeat for several. "
                             "Optional when TARGET is a factory returning (model, args, kwargs)")
    common.add_argument("--dtype", dest="dtypes", metavar="DTYPE", action="append", type=parse_dtype,
                        help="dtype of the inputs (float32, float64, bfloat16, float16, int64, int32, "
                             "bool, ...): once for all inputs, or once per --input, in order "
                             "(default float32)")
    common.add_argument("--device", type=_parse_device, default=torch.device("cpu"),
                        help="device the model and inputs are moved to: cpu (default), cuda, cuda:N")
    mode = common.add_mutually_exclusive_group()
    mode.add_argument("--eval", dest="train", action="store_false",
                      help="put the model in eval mode (the default)")
    mode.add_argument("--train", dest="train", action="store_true",
                      help="put the model in train mode (dropout, batch statistics)")
    common.set_defaults(train=False)
    common.add_argument("--format", "-f", choices=("table", "json", "markdown"), default="table",
                        help="report format on stdout: table (default), json (only the JSON "
                             "document) or markdown")
    common.add_argument("--seed", type=int, default=0,
                        help="seed for building the model and drawing the inputs (default 0)")
    common.add_argument("--traceback", action="store_true",
                        help="on an error, also print the full Python traceback")
    return common


def build_parser(prog: str = "tdd-fx") -> argparse.ArgumentParser:
    """The ``tdd-fx`` argument parser, with its ``audit`` and ``optimize`` subcommands."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Find hand-written time-distributed dense layers in a PyTorch model\n"
                    "(reshape -> Linear -> reshape, transposes around a Linear, ...) and replace\n"
                    "each with one canonical, verified node.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_commands(sub, _common_parser())
    return parser


def _add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``audit`` and ``optimize`` subcommands, each with the ``common`` arguments."""
    audit = sub.add_parser(
        "audit", parents=[common], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="find and prove sites, explain near-misses; the model is not changed",
        description="Find and prove time-distributed dense sites and explain the near-misses "
                    "left alone; nothing is changed. With --fail-on-sites, exit with status 3 "
                    "when provably time-distributed sites are found, so CI can lint a model zoo.")
    audit.add_argument("--fail-on-sites", action="store_true",
                       help="exit with status 3 when the audit finds provably time-distributed "
                            "sites (status 'found'), 0 otherwise: lint a model zoo in CI")

    optimize = sub.add_parser(
        "optimize", parents=[common], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="rewrite every provable site, verify, and save the optimized module",
        description="Rewrite every provably time-distributed dense site into one canonical node, "
                    "verify outputs and gradients against the original, print the report and "
                    "save the optimized module with torch.save (load it back with "
                    "torch.load(path, weights_only=False)).")
    optimize.add_argument("--output", "-o", required=True, type=Path, metavar="PATH",
                          help="where to torch.save the optimized module, like model_tdd.pt")


# --- loading the target ----------------------------------------------------------------------

def _import_file(path: Path) -> ModuleType:
    """Import a ``.py`` file by path, with its directory importable (as ``python file.py`` does).

    The module is registered under its file stem when that name is free, so that classes defined
    in it pickle by reference (``torch.save``) and load back wherever that directory is importable.
    """
    path = path.resolve()
    if not path.is_file():
        raise CliError(f"cannot load {path}: no such file", EXIT_LOAD)
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = path.stem
    existing = sys.modules.get(name)
    if existing is not None:
        if getattr(existing, "__file__", None) and Path(existing.__file__).resolve() == path:
            return existing
        name = f"_tdd_fx_target_{abs(hash(str(path))):x}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CliError(f"cannot import {path}: not a Python source file", EXIT_LOAD)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise CliError(f"cannot import {path}: {_describe(exc)}", EXIT_LOAD) from exc
    return module


def _cwd_importable() -> None:
    """Make the current directory importable, as ``python -m`` does (a console script does not)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise CliError(f"cannot import module {name!r}: {_describe(exc)}", EXIT_LOAD) from exc


def _modules_in(module: ModuleType) -> list[str]:
    names = []
    for k, v in vars(module).items():
        if k.startswith("_"):
            continue
        if isinstance(v, nn.Module) or (
                inspect.isclass(v) and issubclass(v, nn.Module) and v.__module__ == module.__name__):
            names.append(k)
    return names


def _build(obj: Any, label: str) -> Any:
    """An nn.Module instance as it is; a class or a factory called with no arguments (a factory
    may return ``(model, args)`` or ``(model, args, kwargs)``: the example inputs too)."""
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise CliError(f"{label} is a {type(obj).__name__}, not an nn.Module, a class or a factory",
                       EXIT_LOAD)
    what = "building" if inspect.isclass(obj) else "calling"
    try:
        model = obj()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise CliError(f"cannot build the model: {what} {label}() with no arguments raised "
                       f"{_describe(exc)}", EXIT_LOAD) from exc
    if isinstance(model, tuple) and 2 <= len(model) <= 3 and isinstance(model[0], nn.Module):
        args = model[1] if isinstance(model[1], tuple) else (model[1],)
        kwargs = dict(model[2]) if len(model) == 3 and model[2] is not None else {}
        return model[0], args, kwargs
    if not isinstance(model, nn.Module):
        raise CliError(f"{label}() returned a {type(model).__name__}, not a torch.nn.Module "
                       "(nor a (model, args, kwargs) tuple)", EXIT_LOAD)
    return model


def _load_saved(path: Path, device: torch.device) -> nn.Module:
    if not path.is_file():
        raise CliError(f"cannot load {path}: no such file", EXIT_LOAD)
    try:
        obj = torch.load(path, map_location=device, weights_only=False)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise CliError(f"cannot load {path}: {_describe(exc)}", EXIT_LOAD) from exc
    if not isinstance(obj, nn.Module):
        hint = " (a state_dict? save the whole module with torch.save(module, path))" \
            if isinstance(obj, dict) else ""
        raise CliError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module{hint}", EXIT_LOAD)
    return obj


def load_target(target: str, device: torch.device | str = "cpu") -> nn.Module:
    """The model named by ``target`` (see ``tdd-fx --help``); raises :class:`CliError`."""
    loaded = load_target_with_inputs(target, device)
    return loaded[0] if isinstance(loaded, tuple) else loaded


def load_target_with_inputs(target: str, device: torch.device | str = "cpu") -> Any:
    """The model named by ``target``, or ``(model, args, kwargs)`` when it names a factory that
    returns its example inputs too; raises :class:`CliError`.

    ``pkg.module:attr`` and ``path/to/file.py:attr`` name a class (built with no arguments), a
    factory (called with no arguments) or an ``nn.Module`` instance; any other existing file, or a
    ``*.pt``/``*.pth`` path, is loaded with ``torch.load(..., weights_only=False)``.
    """
    device = torch.device(device)
    _cwd_importable()
    whole = Path(target)
    if whole.suffix.lower() in SAVED_SUFFIXES or (whole.is_file() and whole.suffix.lower() != ".py"):
        return _load_saved(whole, device)
    source, colon, attr = target.rpartition(":")
    if not colon or not source or not attr or any(c in attr for c in "/\\"):
        if target.lower().endswith(".py"):
            raise CliError(f"TARGET {target!r} names a file but no attribute: write {target}:ATTR",
                           EXIT_USAGE)
        raise CliError(f"invalid TARGET {target!r}: expected pkg.module:attr, path/to/file.py:attr "
                       "or a saved module *.pt/*.pth", EXIT_USAGE)
    is_file = source.lower().endswith(".py") or "/" in source or "\\" in source
    module = _import_file(Path(source)) if is_file else _import_module(source)
    where = str(source) if is_file else module.__name__
    obj: Any = module
    for i, part in enumerate(attr.split(".")):
        if not part.isidentifier() or not hasattr(obj, part):
            owner = where if i == 0 else f"{where}:{'.'.join(attr.split('.')[:i])}"
            known = _modules_in(module) if i == 0 else []
            hint = f" (modules there: {', '.join(known)})" if known else ""
            raise CliError(f"{owner} has no attribute {part!r}{hint}", EXIT_LOAD)
        obj = getattr(obj, part)
    return _build(obj, f"{where}:{attr}")


# --- inputs ----------------------------------------------------------------------------------

def make_example(specs: Sequence[tuple[str | None, tuple[int, ...], torch.dtype | None]],
                 dtypes: Sequence[torch.dtype] | None, device: torch.device | str, seed: int
                 ) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    """(args, kwargs) from ``--input`` specs: positional in order, named as keywords; a spec's
    own dtype wins over ``--dtype``."""
    dtypes = list(dtypes or [torch.float32])
    if len(dtypes) == 1:
        dtypes = dtypes * len(specs)
    if len(dtypes) != len(specs):
        raise ValueError(f"{len(dtypes)} dtypes for {len(specs)} inputs: give one, or one per input")
    tensors = make_inputs([s for _, s, _ in specs],
                          [own or d for (_, _, own), d in zip(specs, dtypes)], device, seed)
    args = tuple(t for (name, _, _), t in zip(specs, tensors) if name is None)
    kwargs = {name: t for (name, _, _), t in zip(specs, tensors) if name is not None}
    return args, kwargs


def make_inputs(shapes: Sequence[tuple[int, ...]], dtypes: Sequence[torch.dtype] | None = None,
                device: torch.device | str = "cpu", seed: int = 0) -> tuple[Tensor, ...]:
    """Seeded random example inputs: normal floats, ints in [0, 10), random bools.

    ``dtypes`` is empty (float32 everywhere), one dtype for all inputs, or one per shape.
    """
    dtypes = list(dtypes or [torch.float32])
    if len(dtypes) == 1:
        dtypes = dtypes * len(shapes)
    if len(dtypes) != len(shapes):
        raise ValueError(f"{len(dtypes)} dtypes for {len(shapes)} inputs: give one, or one per input")
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape, dtype in zip(shapes, dtypes):
        if dtype == torch.bool:
            x = torch.randint(0, 2, shape, generator=g).bool()
        elif dtype.is_floating_point or dtype.is_complex:
            x = torch.randn(shape, generator=g).to(dtype)
        else:
            x = torch.randint(0, 10, shape, generator=g).to(dtype)
        out.append(x.to(device))
    return tuple(out)


# --- running ---------------------------------------------------------------------------------

def _render(report: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report.to_dict(), indent=2)
    if fmt == "markdown":
        return report.to_markdown()
    return str(report)


def _run(args: argparse.Namespace) -> int:
    import tdd_fx

    _check_args(args)
    model, inputs, kwargs = _model_and_inputs(args)
    try:
        if args.command == "audit":
            report = tdd_fx.audit(model, inputs, kwargs)
            result = None
        else:
            result = tdd_fx.optimize(model, inputs, kwargs)
            report = result.tdd_report
    except ValueError as exc:
        if exc.__cause__ is not None:  # tdd_fx: "the model itself fails on the example inputs"
            raise CliError(_one_line(str(exc)), EXIT_MODEL) from exc
        raise

    print(_render(report, args.format))
    if result is not None:
        _save(result, args.output)
    if args.command == "audit" and args.fail_on_sites and report.found:
        return EXIT_SITES
    return EXIT_OK


def _check_args(args: argparse.Namespace) -> None:
    """Usage errors argparse cannot see: the device, the --dtype count, --output."""
    device: torch.device = args.device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {device}: CUDA is not available on this machine", EXIT_USAGE)
    dtypes = args.dtypes or []
    if len(dtypes) > 1 and len(dtypes) != len(args.inputs):
        raise CliError(f"{len(dtypes)} --dtype for {len(args.inputs)} --input: give --dtype once "
                       "(for all inputs) or once per --input", EXIT_USAGE)
    if args.command == "optimize" and args.output.is_dir():
        raise CliError(f"--output {args.output} is a directory: give a file path like "
                       f"{args.output / 'model.pt'}", EXIT_USAGE)


def _model_and_inputs(args: argparse.Namespace) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The target on its device and in its mode, with the example inputs (args, kwargs)."""
    device: torch.device = args.device
    torch.manual_seed(args.seed)
    loaded = load_target_with_inputs(args.target, device)
    model, f_args, f_kwargs = loaded if isinstance(loaded, tuple) else (loaded, None, None)
    try:
        model = model.to(device)
    except Exception as exc:
        raise CliError(f"cannot move the model to {device}: {_describe(exc)}", EXIT_INTERNAL) from exc
    model.train(args.train)
    if args.inputs:
        inputs, kwargs = make_example(args.inputs, args.dtypes or [], device, args.seed)
    elif f_args is not None:
        inputs, kwargs = f_args, f_kwargs or {}
    else:
        raise CliError("no example inputs: give --input SHAPE (or NAME=SHAPE:DTYPE), or a TARGET "
                       "factory returning (model, args, kwargs)", EXIT_USAGE)
    return model, inputs, kwargs


def _save(result: nn.Module, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result, path)
    except Exception as exc:
        path.unlink(missing_ok=True)  # no truncated file left behind
        raise CliError(f"cannot save the optimized module to {path}: {_describe(exc)}",
                       EXIT_INTERNAL) from exc
    print(f"saved the optimized module to {path} "
          "(load it with torch.load(path, weights_only=False))", file=sys.stderr)


def main(argv: Sequence[str] | None = None, prog: str = "tdd-fx") -> int:
    """Run ``tdd-fx`` with ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return _run(args)
    except CliError as exc:
        if args.traceback:
            traceback.print_exc()
        print(f"{prog}: error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.traceback:
            traceback.print_exc()
        print(f"{prog}: internal error: {_describe(exc)} (rerun with --traceback for details)",
              file=sys.stderr)
        return EXIT_INTERNAL
