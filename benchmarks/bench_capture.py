"""What ``tdd_fx.optimize`` captures and rewrites in real third-party models, and how long it takes.

    python benchmarks/bench_capture.py [--models gpt2_lm tcn_*] [--json PATH] [--threads 1]

Every model the third-party tests use (``tests/thirdparty_models.py`` and
``tests/test_third_party.py``: transformers, timm, speechbrain, pytorch-forecasting, asteroid,
pytorch-tcn, tft-torch), built by the tests' own builders, tiny with random weights, is optimized
twice: once in eval mode and once in train mode (``model.train(mode)`` before ``optimize``, as the
tests do; the report's sites are those of the mode the model was in).  One row per model:

- ``sites``: candidate sites in the report (every status), eval / train;
- ``rewritten``: sites rewritten, eval / train, and whether the result was verified
  (``ok``: outputs and gradients verified, on the example and on inputs of other sizes, or
  ``ok, example sizes only`` when no other sizes were accepted; ``-``: nothing to verify,
  ``FAIL``: not verified);
- ``left (why)``: the sites not rewritten, grouped by status and shortened reason, with counts
  (prefixed by the mode when the two modes differ);
- ``capture``: ``whole`` when ``torch.export`` took the model as one graph, otherwise the
  report's notes on what was left out and why (a mode that could not be captured is named);
- ``optimize s``: wall time of ``tdd_fx.optimize`` (capture of both modes, matching,
  verification), eval / train;
- ``export s``: the part of it spent inside ``torch.export.export`` (timed here by wrapping that
  function: the report does not carry capture times), with the number of export calls and how
  many of them failed (a model that does not export whole is retried subtree by subtree).

A model whose package cannot be imported is listed as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import json
import platform
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import test_third_party as ttp  # noqa: E402  (the pytorch-tcn and tft-torch cases)
import thirdparty_models as tm  # noqa: E402

import tdd_fx  # noqa: E402

Example = tuple[nn.Module, tuple, dict[str, Any]]


# ---------------------------------------------------------------------------------------------
# the models, as the tests build them


def _gpt2() -> Example:
    model, args, kwargs = tm.gpt2_lm()
    return model, args, {**kwargs, "labels": args[0]}  # as the test's fixture: the loss too


def _tcn_case(case: str) -> Callable[[], Example]:
    def build() -> Example:
        tcn_kwargs, shape, _, _ = ttp.TCN_CASES[case]
        torch.manual_seed(0)
        tcn = tm._import("pytorch_tcn").TCN(4, [8, 8, 16], kernel_size=3, dropout=0.1, **tcn_kwargs)
        return ttp.Called(tcn), (torch.randn(*shape),), {}
    return build


def _tcn_kernel_1() -> Example:
    torch.manual_seed(0)
    tcn = tm._import("pytorch_tcn").TCN(4, [8, 8, 16], kernel_size=1, dropout=0.1,
                                        use_norm="batch_norm", use_skip_connections=True,
                                        output_projection=5)
    return ttp.Called(tcn), (torch.randn(2, 4, 20),), {}


def _tcn_conditioned() -> Example:
    torch.manual_seed(0)
    tcn = tm._import("pytorch_tcn").TCN(4, [8, 8, 16], kernel_size=3, dropout=0.1,
                                        use_norm="layer_norm", use_gate=True,
                                        embedding_shapes=[(3,)], embedding_mode="concat",
                                        output_projection=5)
    return ttp.CalledWith(tcn), (torch.randn(2, 4, 20), torch.randn(2, 3)), {}


def _tcn_weight_norm() -> Example:
    torch.manual_seed(0)
    tcn = tm._import("pytorch_tcn").TCN(4, [8, 8, 16], kernel_size=3, dropout=0.1)
    return ttp.Called(tcn), (torch.randn(2, 4, 20),), {}


def _tft_module(build: Callable[[Any], nn.Module], *inputs: Callable[[], torch.Tensor]
                ) -> Callable[[], Example]:
    def make() -> Example:
        tft = tm._import("tft_torch.tft")
        torch.manual_seed(0)
        return build(tft), tuple(x() for x in inputs), {}
    return make


def _tft_whole() -> Example:
    tft = tm._import("tft_torch.tft")
    torch.manual_seed(0)
    return ttp.TFTOnTensors(ttp.small_tft(tft)), ttp.tft_inputs(), {}


def _tft_td_sequential() -> Example:
    td = tm._import("tft_torch.base_blocks").TimeDistributed
    torch.manual_seed(0)
    return nn.Sequential(td(nn.Linear(6, 8)), nn.ELU(), td(nn.Linear(8, 5))), \
        (torch.randn(3, 10, 6),), {}


MODELS: dict[str, Callable[[], Example]] = {
    "gpt2_lm": _gpt2,
    **{name: tm.FACTORIES[name] for name in tm.TIMM_MODELS},
    "ecapa_tdnn": tm.ecapa_tdnn,
    "speechbrain_linear": tm.speechbrain_linear,
    "pf_time_distributed": tm.pf_time_distributed,
    "pf_time_distributed_time_major": lambda: tm.pf_time_distributed(batch_first=False),
    "pf_grn": tm.pf_grn,
    "pf_variable_selection": tm.pf_variable_selection,
    "pf_tft": tm.pf_tft,
    "conv_tasnet_gLN": tm.conv_tasnet,
    "conv_tasnet_cLN": lambda: tm.conv_tasnet(norm_type="cLN"),
    **{f"tcn_{case}": _tcn_case(case) for case in ttp.TCN_CASES},
    "tcn_kernel_size_1": _tcn_kernel_1,
    "tcn_conditioned": _tcn_conditioned,
    "tcn_weight_norm": _tcn_weight_norm,
    "tft_torch_grn": _tft_module(
        lambda tft: tft.GatedResidualNetwork(6, 8, 5, dropout=0.1, context_dim=4),
        lambda: torch.randn(3, 10, 6), lambda: torch.randn(3, 10, 4)),
    "tft_torch_grn_time_major": _tft_module(
        lambda tft: tft.GatedResidualNetwork(6, 8, 6, dropout=0.1, batch_first=False),
        lambda: torch.randn(10, 3, 6)),
    "tft_torch_gate_add_norm": _tft_module(
        lambda tft: tft.GateAddNorm(8, dropout=0.1),
        lambda: torch.randn(3, 10, 8), lambda: torch.randn(3, 10, 8)),
    "tft_torch_td_sequential": _tft_td_sequential,
    "tft_torch_variable_selection": _tft_module(
        lambda tft: tft.VariableSelectionNetwork(4, 3, 8, dropout=0.1, context_dim=5),
        lambda: torch.randn(30, 12), lambda: torch.randn(30, 5)),
    "tft_torch_input_embedding": _tft_module(
        lambda tft: tft.InputChannelEmbedding(4, 3, 2, [5, 7], time_distribute=True),
        lambda: torch.randn(3, 10, 3), lambda: torch.randint(0, 5, (3, 10, 2))),
    "tft_torch_whole": _tft_whole,
}


# ---------------------------------------------------------------------------------------------
# timing torch.export inside optimize


class ExportTimer:
    """Wraps ``torch.export.export`` (which ``tdd_fx.capture`` calls) to add up its time."""

    def __init__(self) -> None:
        self.seconds, self.calls, self.failed = 0.0, 0, 0

    @contextlib.contextmanager
    def active(self) -> Iterator[ExportTimer]:
        real = torch.export.export

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            self.calls += 1
            try:
                return real(*args, **kwargs)
            except BaseException:
                self.failed += 1
                raise
            finally:
                self.seconds += time.perf_counter() - start

        torch.export.export = timed
        try:
            yield self
        finally:
            torch.export.export = real


# ---------------------------------------------------------------------------------------------
# reading the report


def shorten(reason: str, width: int = 100) -> str:
    """The gist of a reason: without the user's file:line; when long, cut at the last clause
    boundary (``; `` ``. `` ``: `` `` (``) that leaves it within ``width``."""
    text = re.sub(r"\s*\([^()]*\.py:\d+\)", "", reason or "").strip()
    if len(text) > width:
        cuts = [m.start() for m in re.finditer(r"; |\. |: | \(", text) if 20 <= m.start() <= width]
        if cuts:
            text = text[: cuts[-1]]
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def export_failure(why: str) -> str:
    """``torch.export could not capture it (Error: long message) at file.py:N`` -> ``Error at
    file.py:N``; other reasons shortened."""
    m = re.match(r"torch\.export could not capture it \((\w+)\b.*\)(?: at (\S+))?$", why, re.S)
    if m:
        return m.group(1) + (f" at {m.group(2)}" if m.group(2) else "")
    return shorten(why, 90)


def left_groups(report: tdd_fx.Report) -> list[str]:
    """The sites not rewritten, by status and reason; reasons that differ only in their numbers
    (``groups=240``, ``kernel size 3``) are one group, the numbers shown as ``N``."""
    groups: dict[tuple[str, str], list[str]] = {}
    for s in report.sites:
        if s.status != "rewritten":
            why = shorten(s.reason) or "no reason recorded"
            groups.setdefault((s.status, re.sub(r"\d+", "N", why)), []).append(why)
    rows = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    return [f"{len(whys)}x {st}: {whys[0] if len(set(whys)) == 1 else key}"
            for (st, key), whys in rows]


def _left_out(paths: list[str]) -> str:
    """``masker (TDConvNet)``, ... -> ``masker (TDConvNet), 4 Conv1DBlock, 9 GlobLN`` (paths
    shown when there are at most 3)."""
    if len(paths) <= 3:
        return ", ".join(paths)
    classes = Counter(p.rsplit(" (", 1)[-1].rstrip(")") for p in paths)
    return ", ".join(f"{n} {c}" for c, n in classes.items())


def capture_state(report: tdd_fx.Report) -> list[str]:
    """"whole", or what the report's notes say was left out of the capture and why (subtrees
    left out for the same reason grouped)."""
    out: list[str] = []
    left: dict[str, list[str]] = {}
    for note in report.notes:
        if " as a whole: " in note:
            out.append("partial: not whole (" + export_failure(note.split(" as a whole: ", 1)[1])
                       + ")")
        elif " left out: " in note:
            path, why = note.split(" left out: ", 1)
            left.setdefault(export_failure(why), []).append(path)
        elif note.startswith("captured its submodules instead"):
            names = note.split(": ", 1)[1].split(", ")
            out.append(f"{len(names)} subtree(s) captured")
        elif "not captured in" in note:
            out.append(shorten(note, 90))
    out += [f"left out {_left_out(paths)} ({why})" for why, paths in left.items()]
    return out or ["whole"]


def _both(eval_value: Any, train_value: Any) -> str:
    return str(eval_value) if eval_value == train_value else f"{eval_value} / {train_value}"


def _joined(by_mode: dict[str, list[str]]) -> str:
    if by_mode["eval"] == by_mode["train"]:
        return "; ".join(by_mode["eval"]) or "-"
    return " | ".join(f"{m}: {'; '.join(v) or '-'}" for m, v in by_mode.items())


# ---------------------------------------------------------------------------------------------


def run_one(name: str, build: Callable[[], Example]) -> dict[str, Any]:
    """Optimize ``name`` in eval mode, then in train mode; the row and its JSON record."""
    record: dict[str, Any] = {"model": name}
    try:
        model, args, kwargs = build()
    except BaseException as exc:  # pytest.skip (a package that does not import) included
        if isinstance(exc, KeyboardInterrupt):
            raise
        record["skipped"] = f"{type(exc).__name__}: {exc}"
        return record
    record["class"] = type(model).__name__
    for mode in ("eval", "train"):
        model.train(mode == "train")
        timer = ExportTimer()
        start = time.perf_counter()
        try:
            with timer.active(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = tdd_fx.optimize(model, example_inputs=args, example_kwargs=kwargs)
        except Exception as exc:
            record[mode] = {"error": f"{type(exc).__name__}: {exc}",
                            "optimize_s": time.perf_counter() - start}
            continue
        seconds = time.perf_counter() - start
        report = opt.tdd_report
        record[mode] = {"optimize_s": seconds, "export_s": timer.seconds,
                        "export_calls": timer.calls, "export_failed": timer.failed,
                        "left": left_groups(report), "capture": capture_state(report),
                        "report": report.to_dict()}
        del opt
    return record


def row_of(record: dict[str, Any]) -> dict[str, str]:
    name = record["model"]
    if "skipped" in record:
        return {"model": name, "sites": "-", "rewritten": "-",
                "left (why)": "skipped: " + shorten(record["skipped"], 120), "capture": "-",
                "optimize s": "-", "export s (calls, failed)": "-"}
    ev, tr = record["eval"], record["train"]
    if "error" in ev or "error" in tr:
        errors = {m: record[m].get("error", "ok") for m in ("eval", "train")}
        return {"model": name, "sites": "-", "rewritten": "-",
                "left (why)": "optimize raised: " + _joined({m: [shorten(e, 120)]
                                                             for m, e in errors.items()}),
                "capture": "-", "optimize s": _both(f"{ev['optimize_s']:.1f}",
                                                    f"{tr['optimize_s']:.1f}"),
                "export s (calls, failed)": "-"}
    re_, rt = ev["report"], tr["report"]

    def rewritten(r: dict[str, Any]) -> str:
        n = sum(s["status"] == "rewritten" for s in r["sites"])
        only = any(note.startswith("no second input set") for note in r["notes"])
        return f"{n} ({_verified_of(r)}{', example sizes only' if only else ''})"

    def export(m: dict[str, Any]) -> str:
        failed = f", {m['export_failed']} failed" if m["export_failed"] else ""
        return f"{m['export_s']:.1f} ({m['export_calls']}{failed})"

    return {
        "model": f"{name} ({record['class']})",
        "sites": _both(len(re_["sites"]), len(rt["sites"])),
        "rewritten": _both(rewritten(re_), rewritten(rt)),
        "left (why)": _joined({"eval": ev["left"], "train": tr["left"]}),
        "capture": _joined({"eval": ev["capture"], "train": tr["capture"]}),
        "optimize s": f"{ev['optimize_s']:.1f} / {tr['optimize_s']:.1f}",
        "export s (calls, failed)": f"{export(ev)} / {export(tr)}",
    }


def _verified_of(r: dict[str, Any]) -> str:
    return {True: "ok", None: "-", False: "FAIL"}[r["verified"]]


def conditions() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"torch {torch.__version__}, tdd_fx {tdd_fx.__version__}, CPU {cpu}, "
            f"{torch.get_num_threads()} thread(s), python {platform.python_version()}, "
            f"{datetime.date.today().isoformat()}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="*", default=None, metavar="NAME",
                   help="models to run (shell-style patterns allowed); default all of:\n  "
                        + "\n  ".join(MODELS))
    p.add_argument("--json", metavar="PATH", help="also write every record (with the reports) here")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (1, as the tests; 0: leave)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(MODELS)
    if args.models:
        unknown = [pat for pat in args.models if not fnmatch.filter(MODELS, pat)]
        if unknown:
            p.error(f"no model matches {', '.join(unknown)}; models: {', '.join(MODELS)}")
        names = [n for n in MODELS if any(fnmatch.fnmatch(n, pat) for pat in args.models)]
    with warnings.catch_warnings():  # torch.export's one-time set-up, not charged to a model
        warnings.simplefilter("ignore")
        tdd_fx.optimize(nn.Linear(2, 2), (torch.randn(3, 2),))
    records = []
    for name in names:
        start = time.perf_counter()
        records.append(run_one(name, MODELS[name]))
        print(f"  {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    header = conditions()
    print(header)
    print("sites / rewritten / optimize s / export s: eval / train (one value when equal); "
          "rewritten (ok: outputs and gradients verified, -: nothing to verify, FAIL: not "
          "verified); export s: seconds inside torch.export.export (calls, failed calls)")
    print(tabulate([row_of(r) for r in records], headers="keys", tablefmt="github",
                   disable_numparse=True))
    if args.json:
        Path(args.json).write_text(json.dumps({"conditions": header, "records": records},
                                              indent=1, default=str))
    return records


if __name__ == "__main__":
    main()
