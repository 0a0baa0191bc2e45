"""The report: a tabulate table with a summary, JSON, ``where`` with module path and source line,
audit statuses and near-miss explanations, and the plain note when nothing could be verified."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re

import pytest
import torch
from torch import nn

import tdd_fx
from tdd_fx import Report, Site
from tdd_fx.ops import time_distributed_dense

HEADERS = ["pattern", "where", "status", "shapes", "kernel", "max err", "reason"]
HERE = os.path.basename(__file__)

BUG_SHARED_SIZE = (
    "engine bug: program.InputChecker.check crashes (AttributeError: 'int' object has no "
    "attribute 'is_Integer') when one symbolic size is bound by two input axes (x and cat share "
    "B and T): every candidate fails verification, nothing is rewritten")


def canonical_nodes(opt: nn.Module) -> list:
    """The canonical nodes of every graph the optimized module runs (all parts, all modes)."""
    return [n for modes in tdd_fx.graphs(opt).values() for gm in modes.values()
            for n in gm.graph.nodes if n.target is time_distributed_dense]


def line_of(func, marker: str) -> int:
    """The absolute line number, in this file, of the line of ``func`` containing ``marker``."""
    lines, start = inspect.getsourcelines(func)
    hits = [start + i for i, text in enumerate(lines) if marker in text]
    assert len(hits) == 1, f"marker {marker!r} found {len(hits)} times"
    return hits[0]


# --------------------------------------------------------------------------------------------
# models


class Flat(nn.Module):
    """A reshape sandwich written inline."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, f = x.shape
        y = self.fc(x.reshape(b * t, f))  # SITE-flat
        return y.view(b, t, -1)


class Wrap(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.module(x.contiguous().view(-1, x.size(-1)))  # SITE-wrap
        return y.view(x.size(0), -1, y.size(-1))


class Nested(nn.Module):
    """A wrapped site two levels deep, a near-miss fold around an Embedding, and a flat site."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.td = Wrap(nn.Linear(8, 6))
        self.embed = nn.Embedding(10, 6)
        self.flat = Flat()
        self.flat.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        b, t = cat.shape
        h = self.encoder.td(x)
        static = self.embed(cat.view(-1)).view(b, t, -1)
        return self.flat(h * static)


class Branchy(nn.Module):
    """Data-dependent control flow at the root: torch.export cannot capture it whole."""

    def __init__(self) -> None:
        super().__init__()
        self.td = Wrap(nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:  # SITE-branch
            return self.td(x)
        return -self.td(x)


class NearMiss(nn.Module):
    """``view(B, -1)`` merges time into features: a dense layer over the whole sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.size(0)
        return self.fc(x.view(b, -1)).view(b, 1, -1)  # SITE-near


def xs(b: int = 2, t: int = 5, f: int = 8) -> torch.Tensor:
    return torch.randn(b, t, f, generator=torch.Generator().manual_seed(0))


def nested_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return xs(), torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------
# the table


@pytest.mark.parametrize("entry", ["optimize", "audit"])
def test_str_is_a_table_with_header_and_summary(entry):
    result = getattr(tdd_fx, entry)(Nested(), nested_inputs())
    report = result if entry == "audit" else result.tdd_report
    text = str(report)
    lines = text.splitlines()
    header = lines[0].split()
    # "max err" is two words
    joined = " ".join(header)
    pos = [joined.find(h) for h in HEADERS]
    assert all(p >= 0 for p in pos), joined
    assert pos == sorted(pos), "columns out of order"
    assert set(lines[1].replace(" ", "")) == {"-"}, "tabulate 'simple' rule line expected"
    assert text.startswith(report.table())
    assert report.summary() in lines
    assert report.summary().startswith(f"{entry} of Nested: {len(report.sites)} candidate site(s)")
    # one row per site (rows may wrap, but each site's pattern starts a line)
    rows = [ln for ln in lines[2:] if ln.startswith("reshape")]
    assert len(rows) == len(report.sites) == 3


def test_table_rows_show_status_shapes_kernel():
    opt = tdd_fx.optimize(Flat(), (xs(),))
    table = opt.tdd_report.table()
    row = table.splitlines()[2]
    assert "rewritten" in row
    assert "2x5x8 -> 2x5x4" in row
    assert "linear" in row
    assert "optimize of Flat: 1 candidate site(s), 1 rewritten, 0 rolled back, 0 rejected" in str(
        opt.tdd_report)
    assert "outputs and gradients verified" in opt.tdd_report.summary()
    # each rewritten row is one canonical node of the graph the result runs (train and eval)
    assert len(canonical_nodes(opt)) == 2
    assert {n.meta["tdd_site"] for n in canonical_nodes(opt)} == {opt.tdd_report.sites[0].node}


def test_rewritten_sites_carry_their_max_error():
    report = tdd_fx.optimize(Flat(), (xs(),)).tdd_report
    site = report.rewritten[0]
    assert site.max_error is not None and site.max_error < 1e-5
    assert f"{site.max_error:.1e}" in report.table().splitlines()[2]


def test_empty_report_says_so():
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(x)

    report = tdd_fx.audit(Plain(), (xs(),))
    assert report.sites == []
    text = str(report)
    assert "(no candidate sites)" in text
    assert "0 candidate site(s)" in text


# --------------------------------------------------------------------------------------------
# JSON


@pytest.mark.parametrize("entry", ["optimize", "audit"])
def test_to_dict_round_trips_through_json(entry):
    result = getattr(tdd_fx, entry)(Nested(), nested_inputs())
    report = result if entry == "audit" else result.tdd_report
    d = report.to_dict()
    text = json.dumps(d, allow_nan=False)
    back = json.loads(text)
    assert back == d
    assert back["mode"] == entry
    assert back["model"] == "Nested"
    assert back["summary"] == report.summary()
    assert len(back["sites"]) == len(report.sites)
    for sd, site in zip(back["sites"], report.sites):
        assert sd["status"] == site.status
        assert sd["where"] == site.where
        assert sd["pattern"] == site.pattern
        assert sd["in_shape"] == (None if site.in_shape is None else list(site.in_shape))


def test_to_dict_without_inputs_round_trips():
    report = tdd_fx.optimize(Nested()).tdd_report
    d = report.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert d["verified"] is not True
    assert any("NOT verified" in n for n in d["notes"])


def test_site_to_dict_lists_shapes():
    s = Site("reshape", "rewritten", "a.b (m.py:3)", in_shape=(2, 3, 4), out_shape=(2, 3, 5),
             feature_dim=-1, kernel="linear", max_error=1e-7, guards=["x.dim() == 3"])
    d = s.to_dict()
    assert d["in_shape"] == [2, 3, 4] and d["out_shape"] == [2, 3, 5]
    assert json.loads(json.dumps(d)) == d


# --------------------------------------------------------------------------------------------
# where


def test_where_has_module_path_and_this_files_line():
    report = tdd_fx.audit(Nested(), nested_inputs())
    sites = {s.module: s for s in report.sites}
    assert set(sites) == {"encoder.td.module", "flat.fc", "embed"}
    wrap_line = line_of(Wrap.forward, "# SITE-wrap")
    flat_line = line_of(Flat.forward, "# SITE-flat")
    td, flat = sites["encoder.td.module"], sites["flat.fc"]
    assert td.where.startswith("encoder.td.module")
    assert td.where.endswith(f"{HERE}:{wrap_line})"), td.where
    assert td.source.endswith(f"{HERE}:{wrap_line}")
    assert flat.where.startswith("flat.fc")
    assert flat.where.endswith(f"{HERE}:{flat_line})"), flat.where
    embed_line = line_of(Nested.forward, "self.embed(")
    assert sites["embed"].where.endswith(f"{HERE}:{embed_line})"), sites["embed"].where


def test_where_for_the_forecaster_example():
    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "forecaster.py")
    spec = importlib.util.spec_from_file_location("tdd_example_forecaster", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    model = mod.Forecaster(hidden=8)
    report = tdd_fx.audit(model, mod.example_inputs(batch=2, steps=4))
    line = line_of(mod.TimeDistributed.forward, "self.module(x_reshape)")
    found = {s.module: s for s in report.found}
    assert {"project.module", "head.module", "grn_in.fc1.module", "grn_out.gate.module.0"} <= set(found)
    for s in found.values():
        assert s.where.endswith(f"forecaster.py:{line})"), s.where
        assert s.where.startswith(s.module)
    assert [s.module for s in report.rejected] == ["embed"]


# --------------------------------------------------------------------------------------------
# audit


def test_audit_sites_are_found_and_nothing_changes():
    model = Nested()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = tdd_fx.audit(model, nested_inputs())
    assert isinstance(report, Report)
    assert report.mode == "audit"
    statuses = {s.module: s.status for s in report.sites}
    assert statuses == {"encoder.td.module": "found", "flat.fc": "found", "embed": "rejected"}
    assert report.rewritten == [] and report.rolled_back == []
    for s in report.found:
        assert s.reason == ""
        assert s.kernel == "linear"
        assert s.max_error is None
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_audit_explains_view_b_minus_one():
    report = tdd_fx.audit(NearMiss(), (xs(),))
    assert len(report.sites) == 1
    site = report.sites[0]
    assert site.status == "rejected"
    # the reshape is shown with the example's sizes (B, T, F) -> (B, T*F), and the feature axis
    # it merges; never the capture's internal size symbols
    assert ("the reshape (2, 5, 8) -> (2, 40) before it merges the feature axis (8) with other "
            "axes") in site.reason, site.reason
    assert not re.search(r"\bs\d+\b", site.reason), site.reason
    assert "one dense layer over all of them, not one per position" in site.reason
    assert site.where.startswith("fc")
    assert site.where.endswith(f"{HERE}:{line_of(NearMiss.forward, '# SITE-near')})")
    assert "merges the feature axis" in " ".join(str(report).split())  # wrapped cells joined


def test_optimize_leaves_the_near_miss_alone():
    model = NearMiss()
    opt = tdd_fx.optimize(model, (xs(),))
    assert opt.tdd_report.rewritten == []
    assert [s.status for s in opt.tdd_report.sites] == ["rejected"]
    torch.testing.assert_close(opt(xs()), model(xs()))


# --------------------------------------------------------------------------------------------
# no example inputs


@pytest.mark.parametrize("entry", ["optimize", "audit"])
def test_without_inputs_report_says_not_verified(entry):
    result = getattr(tdd_fx, entry)(Flat())
    report = result if entry == "audit" else result.tdd_report
    assert any("NOT verified" in n for n in report.notes)
    assert "NOT verified" in str(report)
    assert report.verified is not True
    assert report.rewritten == []
    assert report.inputs == ""


def test_without_inputs_the_note_says_nothing_was_examined():
    report = tdd_fx.audit(Flat())
    assert len(report.notes) == 1
    assert report.notes[0].startswith("no example inputs were given")
    assert "nothing was examined" in report.notes[0]
    assert report.sites == []


def test_without_inputs_result_still_runs_like_the_original():
    model = Flat()
    opt = tdd_fx.optimize(model)
    assert any("returned unchanged" in n for n in opt.tdd_report.notes)
    assert type(opt) is Flat and opt is not model
    assert tdd_fx.graphs(opt) == {}  # nothing captured: the class's own forward runs
    assert "forward" not in opt.__dict__
    assert opt.fc.weight is model.fc.weight
    torch.testing.assert_close(opt(xs()), model(xs()))


# --------------------------------------------------------------------------------------------
# a root torch.export cannot capture


def test_untraceable_root_is_explained_in_the_notes():
    opt = tdd_fx.optimize(Branchy(), (xs(),))
    report = opt.tdd_report
    line = line_of(Branchy.forward, "# SITE-branch")
    root = [n for n in report.notes if n.startswith("Branchy as a whole: ")]
    assert len(root) == 1, report.notes
    assert "torch.export could not capture it" in root[0]
    assert root[0].endswith(f"{HERE}:{line}"), root[0]  # the user's line that stops export
    assert ("captured its submodules instead, with the inputs each received on the example: td"
            in report.notes)
    assert "note: captured its submodules instead" in str(report)
    assert [s.module for s in report.rewritten] == ["td.module"]
    assert report.rewritten[0].where.startswith("td.module")
    assert tdd_fx.graphs(opt).keys() == {"td"}
    for x in (xs(), -xs().abs()):
        torch.testing.assert_close(opt(x), Branchy.forward(opt, x))


def test_with_inputs_no_such_note():
    report = tdd_fx.optimize(Flat(), (xs(),)).tdd_report
    assert not any("NOT verified" in n for n in report.notes)
    assert report.verified is True
    assert report.inputs == "(2, 5, 8):float32"
    assert "example inputs: (2, 5, 8):float32" in str(report)


# --------------------------------------------------------------------------------------------
# filters


def test_status_filters_on_a_hand_built_report():
    sites = [Site("reshape", st, f"m{i}") for i, st in
             enumerate(["rewritten", "rejected", "rewritten", "rolled_back", "found"])]
    r = Report(mode="optimize", model="M", sites=sites)
    assert [s.where for s in r.rewritten] == ["m0", "m2"]
    assert [s.where for s in r.rejected] == ["m1"]
    assert [s.where for s in r.rolled_back] == ["m3"]
    assert [s.where for s in r.found] == ["m4"]
    assert "5 candidate site(s), 2 rewritten, 1 rolled back, 1 rejected" in r.summary()
    assert "rolled_back" in str(r)


def test_rewritten_filters_a_real_report():
    opt = tdd_fx.optimize(Nested(), nested_inputs())
    report = opt.tdd_report
    assert report.verified is True
    assert len(canonical_nodes(opt)) == 2 * len(report.rewritten)  # train and eval graphs
    assert {s.module for s in report.rewritten} == {"encoder.td.module", "flat.fc"}
    assert all(s.status == "rewritten" for s in report.rewritten)
    assert [s.module for s in report.rejected] == ["embed"]
    assert report.found == []
    assert all(s.reason == "" for s in report.rewritten)
    assert all(s.max_error is not None and s.max_error < 1e-5 for s in report.rewritten)
