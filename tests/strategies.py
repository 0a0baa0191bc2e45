"""Hypothesis strategies that write small random models mixing time-distributed dense forms with
near-misses, and the property every one of them must satisfy under ``tdd_fx.optimize``.

A generated model is Python *source* (a module class plus a ``make()`` that seeds, builds and
returns ``(model, example_inputs)``): what is traced is ordinary user code, and a failing example
can be printed and pasted into a regression test as it is.  :func:`build` compiles a source (its
lines registered with ``linecache``, so tracebacks and tdd_fx's ``file:LINE`` work).

The program is a chain of 1-3 *blocks* over one running tensor ``h``; each block draws one spelling
of a family, true or near-miss:

- ``fold``      reshape sandwich: a fold (``view(-1, F)``, ``flatten``, literal ints, ``b * t``,
                 merging the feature axis, regrouping rows with another width), a chain of dense /
                 pointwise / per-feature / row-mixing ops, and a restore (right, scrambled
                 ``view(-1, x.size(0), O)``, literal, swapped literal, ``unflatten``, ``view_as``,
                 merging or splitting the features, or none); sometimes behind a rank guard.
- ``chfirst``   channel-first transposes/permutes/movedims around a dense chain, sometimes undone
                 with the wrong permutation, sometimes with a fold in the middle.
- ``conv``      Conv1d / Conv2d (module or functional) with random kernel, stride, padding (ints,
                 ``"same"``, ``"valid"``), dilation, groups and bias; the spectrogram forms
                 ``Conv2d(1, O, (F, 1))`` over ``x.unsqueeze(1)`` and ``(1, F)`` over ``(B, 1, T, F)``.
- ``loop``      per-step loops (index, select, narrow, slice, unbind, split, chunk; ``stack`` or
                 ``cat``) with one module, a tied or untied ``ModuleList``, step-dependent scaling,
                 reading another step, short / reversed / strided ranges, and recurrences.
- ``matmul``    einsum with random equations over a 2-D parameter or buffer, ``@``/``matmul``/
                 ``bmm``/``baddbmm`` with ``(out, in)`` or ``(in, out)`` weights, right and wrong
                 biases, products of the input with itself.
- ``dropfold``  dropout before and/or after a fold or a channel-first transpose pair.
- ``inplace``   in-place ops on views around a fold (``relu(inplace=True)`` on its result, an
                 in-place ``Dropout`` on the folded view, a write through another view, an
                 in-place op on a ``contiguous()`` copy, a write through a transposed view).
- ``mode``      a Python branch on ``self.training`` around a site.
- ``autocast``  a site inside ``torch.autocast`` in forward.
- ``pointwise`` activations, dropout, LayerNorm, scalar arithmetic between blocks.

Loops sometimes feed Python values derived from their length (``len(outs)``, the middle step)
into the result.  Models are float32, float64 or (rarely) bfloat16, in train or eval mode; every
dim is 1..6; the example input is sometimes non-contiguous or channels-last, and sometimes holds
one NaN, Inf or 1e8 (the property also checks the example in the other memory layout).
"""

from __future__ import annotations

import copy
import hashlib
import linecache
import math
import os
import re
import textwrap
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import assume, event
from hypothesis import strategies as st
from torch import Tensor, nn

import tdd_fx

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
STATUSES = {"rewritten", "rolled_back", "rejected"}


# ---------------------------------------------------------------------------------------------
# building a model from its source


@dataclass
class Example:
    """One generated model: its source and what the generator knows about it."""

    source: str
    dtype: str
    training: bool
    blocks: list[str] = field(default_factory=list)

    def build(self) -> tuple[nn.Module, tuple[Tensor, ...]]:
        return build(self.source)

    def __repr__(self) -> str:  # hypothesis prints this for a falsifying example
        return f"Example(blocks={self.blocks}, source=\n{self.source})"


def build(source: str) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """Compile ``source`` (a module with ``make()``) and return ``make()``'s model and inputs."""
    digest = hashlib.sha1(source.encode()).hexdigest()[:10]
    filename = f"<tdd_fx generated {digest}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, Any] = {"__name__": f"tdd_generated_{digest}"}
    exec(compile(source, filename, "exec"), namespace)
    model, inputs = namespace["make"]()
    return model, tuple(inputs)


HEADER = """\
import torch
import torch.nn.functional as F
from torch import nn


class Generated(nn.Module):
    def __init__(self):
        super().__init__()
"""


def _meta(shape: Sequence[int]) -> Tensor:
    return torch.empty(tuple(shape), device="meta")


def _shape_of(fn: Callable[[], Tensor]) -> list[int] | None:
    """The shape ``fn`` produces on meta tensors, or None when it raises."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # padding="same" with an even kernel
            return list(fn().shape)
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# the program writer


class Writer:
    """Accumulates ``__init__`` and ``forward`` lines while tracking the shape of ``h``."""

    def __init__(self, draw: Callable[[st.SearchStrategy[Any]], Any], shape: list[int]) -> None:
        self.draw = draw
        self.shape = list(shape)
        self.init: list[str] = []
        self.fwd: list[str] = ["h = x"]
        self.counter = 0
        self.aux: list[tuple[str, list[int]]] = []  # intermediates a model may also return
        self.no_bf16 = False  # set by forms that torch itself gets wrong in bfloat16

    # names -------------------------------------------------------------------------------
    def fresh(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}{self.counter}"

    def module(self, decl: str, stem: str = "m") -> str:
        name = self.fresh(stem)
        self.init.append(f"self.{name} = {decl}")
        return f"self.{name}"

    def param(self, shape: Sequence[int], stem: str = "w", buffer: bool = False) -> str:
        name = self.fresh(stem)
        dims = ", ".join(map(str, shape))
        value = f"torch.randn({dims}) * 0.4"
        if buffer:
            self.init.append(f"self.register_buffer({name!r}, {value})")
        else:
            self.init.append(f"self.{name} = nn.Parameter({value})")
        return f"self.{name}"

    def emit(self, line: str) -> None:
        self.fwd.append(line)

    # draws -------------------------------------------------------------------------------
    def pick(self, options: Sequence[Any]) -> Any:
        return self.draw(st.sampled_from(list(options)))

    def chance(self, p: float) -> bool:
        """True with probability about ``p`` (shrinks towards False)."""
        return self.draw(st.integers(0, 99)) >= 100 - int(p * 100)

    def size(self, lo: int = 1, hi: int = 6) -> int:
        """A size in lo..hi that shrinks towards 2 (or lo when lo > 2) rather than 1."""
        start = min(max(lo, 2), hi)
        return self.draw(st.sampled_from(list(range(start, hi + 1)) + list(range(lo, start))))


# ---------------------------------------------------------------------------------------------
# chains applied to a tensor whose last axis is the feature axis


def chain(w: Writer, var: str, shape: list[int], need_dense: bool = True,
          max_len: int = 3, row_mixing: bool = True) -> tuple[str, list[int]]:
    """Emit 1..max_len ops acting on ``var`` (features last); returns (expression var, shape)."""
    n = w.draw(st.integers(1, max_len))
    kinds = []
    for _ in range(n):
        kinds.append(w.pick(["linear", "linear", "flinear", "matmul_t", "addmm", "act", "dropout",
                             "bn", "ln", "softmax", "scalar", "bias", "rowmix", "t_inside"]))
    if need_dense and not any(k in ("linear", "flinear", "matmul_t", "addmm") for k in kinds):
        kinds.insert(w.draw(st.integers(0, len(kinds))), "linear")
    shape = list(shape)
    cur = var
    for k in kinds:
        f = shape[-1]
        r = len(shape)
        if k == "addmm" and r != 2:
            k = "linear"
        if k in ("linear", "flinear", "matmul_t", "addmm"):
            o = w.size()
            if k == "linear":
                m = w.module(f"nn.Linear({f}, {o}, bias={w.chance(0.8)})", "fc")
                expr = f"{m}({cur})"
            elif k == "flinear":
                wt = w.param((o, f))
                b = w.param((o,), "b") if w.chance(0.7) else "None"
                expr = f"F.linear({cur}, {wt}, {b})"
            elif k == "matmul_t":
                wt = w.param((o, f))
                tr = w.pick([".t()", ".T", ".transpose(0, 1)"])
                expr = f"{cur} @ {wt}{tr}"
                if w.chance(0.6):
                    expr += f" + {w.param((o,), 'b')}"
            else:
                wt = w.param((f, o))
                expr = f"torch.addmm({w.param((o,), 'b')}, {cur}, {wt})"
            shape[-1] = o
        elif k == "act":
            expr = w.pick([f"torch.relu({cur})", f"F.gelu({cur})", f"torch.tanh({cur})",
                           f"{w.module('nn.ReLU()', 'act')}({cur})", f"torch.sigmoid({cur})"])
        elif k == "dropout":
            p = w.pick([0.0, 0.25, 0.5])
            if w.chance(0.7):
                expr = f"{w.module(f'nn.Dropout({p})', 'drop')}({cur})"
            else:
                expr = f"F.dropout({cur}, {p}, self.training)"
        elif k == "bn":
            # BatchNorm1d names axis 1: per-feature on 2-D rows; on 3-D it is a near-miss
            if r == 2:
                nf = f
            elif r == 3:
                nf = shape[1]
            else:
                continue
            rows = math.prod(shape) // nf
            if rows < 2:
                continue
            affine = w.chance(0.7)
            track = w.chance(0.8)
            bn = w.module(f"nn.BatchNorm1d({nf}, affine={affine}, track_running_stats={track})",
                          "bn")
            expr = f"{bn}({cur})"
        elif k == "ln":
            expr = f"{w.module(f'nn.LayerNorm({f})', 'ln')}({cur})"
        elif k == "softmax":
            d = w.pick([-1, r - 1, 0, 1])
            if w.chance(0.5):
                expr = f"{w.module(f'nn.Softmax(dim={d})', 'sm')}({cur})"
            else:
                expr = f"F.softmax({cur}, dim={d})"
        elif k == "scalar":
            expr = f"({cur} * 0.5 + 1.0)"
        elif k == "bias":
            expr = f"({cur} + {w.param((f,), 'b')})"
        elif k == "rowmix":
            if not row_mixing:
                continue
            expr = w.pick([f"({cur} - {cur}.mean(0, keepdim=True))", f"{cur}.flip(0)",
                           f"{cur}.cumsum(0)", f"{cur}.roll(1, 0)"])
        else:  # t_inside: moves axes inside a fold
            if r != 2:
                continue
            expr = f"{cur}.t().contiguous().t()"
        nv = w.fresh("z")
        w.emit(f"{nv} = {expr}")
        cur = nv
    return cur, shape


# ---------------------------------------------------------------------------------------------
# blocks


def block_fold(w: Writer) -> str:
    s = w.shape
    r = len(s)
    f = s[-1]
    lead = s[:-1]
    n_rows = math.prod(lead)
    x0 = w.fresh("x")
    w.emit(f"{x0} = h")
    folds: dict[str, tuple[str, list[int] | None]] = {
        "view_m1": (f"{x0}.contiguous().view(-1, {x0}.size(-1))", [n_rows, f]),
        "reshape_lit_f": (f"{x0}.reshape(-1, {f})", [n_rows, f]),
        "flatten_all": (f"{x0}.flatten(0, -2)", [n_rows, f]),
        "literal": (f"{x0}.reshape({n_rows}, {f})", [n_rows, f]),
        "reshape_shape": (f"{x0}.reshape(-1, {x0}.shape[-1])", [n_rows, f]),
    }
    if r >= 3:
        folds["flatten01"] = (f"{x0}.flatten(0, 1)", [s[0] * s[1], *s[2:]])
        folds["merge_feature"] = (f"{x0}.reshape({x0}.size(0), -1)", [s[0], math.prod(s[1:])])
    if r == 3:
        folds["size_product"] = (f"{x0}.reshape({x0}.size(0) * {x0}.size(1), {x0}.size(2))",
                                 [n_rows, f])
        folds["shape_unpack"] = ("", [n_rows, f])
    numel = math.prod(s)
    widths = [k for k in range(1, 9) if numel % k == 0 and k != f]
    if widths:
        k = w.pick(widths)
        folds["regroup"] = (f"{x0}.reshape(-1, {k})", [numel // k, k])
    kind = w.pick(sorted(folds))
    expr, rows = folds[kind]
    assert rows is not None
    guard = r >= 3 and w.chance(0.15)
    if kind == "shape_unpack":
        names = [w.fresh(c) for c in "btf"]
        w.emit(f"{', '.join(names)} = {x0}.shape")
        expr = f"{x0}.reshape({names[0]} * {names[1]}, {names[2]})"
    if guard:
        w.emit(f"if {x0}.dim() <= 2:")
        w.emit(f"    h = {x0}")
        w.emit("else:")
        w.emit(f"    h = {expr}")
        rv = "h"
    else:
        rv = w.fresh("rows")
        w.emit(f"{rv} = {expr}")
    if w.chance(0.1):
        w.aux.append((rv, rows))
    out, oshape = chain(w, rv, rows)
    o = oshape[-1]
    n_out = math.prod(oshape)
    restores: dict[str, str] = {
        "size0_m1": f"{out}.view({x0}.size(0), -1, {o})",
        "scramble": f"{out}.view(-1, {x0}.size(0), {o})",
        "literal": f"{out}.view({', '.join(map(str, lead))}, {o})",
        "star": f"{out}.view(*{x0}.shape[:-1], {o})",
        "unflatten_shape": f"{out}.unflatten(0, {x0}.shape[:-1])",
        "merge_out": f"{out}.reshape({x0}.size(0), -1)",
        "none": out,
        "tuple_concat": f"{out}.reshape({x0}.shape[:-1] + ({o},))",
        "m1_o": f"{out}.reshape(-1, {o})",
    }
    if r >= 3:
        restores["m1_size1"] = f"{out}.view(-1, {x0}.size(1), {o})"
        restores["scramble_sizes"] = f"{out}.view({x0}.size(1), {x0}.size(0), -1)"
        rest = ", ".join(map(str, lead[2:] + [o]))
        restores["literal_swapped"] = f"{out}.view({lead[1]}, {lead[0]}, {rest})"
        restores["unflatten01"] = f"{out}.unflatten(0, ({x0}.shape[0], {x0}.shape[1]))"
    if o == f:
        restores["view_as"] = f"{out}.view_as({x0})"
    if o % 2 == 0:
        restores["split_out"] = f"{out}.view({x0}.size(0), -1, 2, {o // 2})"
    restore = w.pick(sorted(restores))
    code = restores[restore]
    def meta_restore() -> Tensor:  # the shape the restore produces on the example
        env = {x0: _meta(s), out: _meta(oshape)}
        return eval(code, {"torch": torch}, env)  # our own generated code

    new = _shape_of(meta_restore)
    assume(new is not None and math.prod(new) == n_out)
    assert new is not None
    if guard:
        w.emit(f"if {x0}.dim() > 2:")
        w.emit(f"    h = {code}")
        w.emit("else:")
        w.emit(f"    h = {out}")
    else:
        w.emit(f"h = {code}")
    w.shape = new
    return f"fold:{kind}->{restore}" + ("+guard" if guard else "")


def block_chfirst(w: Writer) -> str:
    s = w.shape
    r = len(s)
    assume(r >= 3)
    if r == 3:
        forms = {
            "transpose": ("h.transpose(1, 2)", ".transpose(1, 2)"),
            "permute": ("h.permute(0, 2, 1)", ".permute(0, 2, 1)"),
            "movedim": ("h.movedim(1, -1)", ".movedim(-1, 1)"),
            "swapaxes": ("h.swapaxes(1, 2)", ".swapaxes(2, 1)"),
            "wrong_back": ("h.transpose(1, 2)", ".transpose(0, 1)"),
            "no_back": ("h.transpose(1, 2)", ""),
            "transpose_02": ("h.transpose(0, 2)", ".transpose(0, 2)"),
            "fold": ("", ""),
        }
    else:
        back = ", ".join(["0", str(r - 1)] + [str(i) for i in range(1, r - 1)])
        fwd = ", ".join(["0"] + [str(i) for i in range(2, r)] + ["1"])
        wrong = ", ".join(["0", str(r - 1)] + [str(i) for i in range(r - 2, 0, -1)])
        forms = {
            "permute": (f"h.permute({fwd})", f".permute({back})"),
            "movedim": ("h.movedim(1, -1)", ".movedim(-1, 1)"),
            "wrong_back": (f"h.permute({fwd})", f".permute({wrong})"),
            "transpose_1last": (f"h.transpose(1, {r - 1})", f".transpose(1, {r - 1})"),
        }
    kind = w.pick(sorted(forms))
    if kind == "fold":
        t0 = w.fresh("t")
        w.emit(f"{t0} = h.transpose(1, 2).contiguous()")
        rows = w.fresh("rows")
        w.emit(f"{rows} = {t0}.view(-1, {s[1]})")
        out, oshape = chain(w, rows, [s[0] * s[2], s[1]], row_mixing=w.chance(0.3))
        o = oshape[-1]
        back = w.pick(["size", "scramble"])
        mid = (f"{t0}.size(0), -1" if back == "size" else f"-1, {t0}.size(0)")
        new = _shape_of(lambda: _meta(oshape).view(*( [s[0], -1] if back == "size" else [-1, s[0]]),
                                                     o).transpose(1, 2))
        assume(new is not None)
        w.emit(f"h = {out}.view({mid}, {o}).transpose(1, 2)")
        w.shape = new  # type: ignore[assignment]
        return f"chfirst:fold-{back}"
    pre, post = forms[kind]
    v = w.fresh("v")
    w.emit(f"{v} = {pre}")
    moved = _shape_of(lambda: eval(pre, {}, {"h": _meta(s)}))
    assert moved is not None
    out, oshape = chain(w, v, moved, max_len=2, row_mixing=False)
    new = _shape_of(lambda: eval(f"z{post}", {}, {"z": _meta(oshape)}))
    assume(new is not None)
    w.emit(f"h = {out}{post}")
    w.shape = new  # type: ignore[assignment]
    return f"chfirst:{kind}"


def _conv_args(w: Writer, nd: int, neutral_bias: float) -> dict[str, Any]:
    """Random kernel/stride/padding/dilation for an nd-conv (mostly neutral along each axis)."""
    out: dict[str, Any] = {"k": [], "stride": [], "padding": [], "dilation": []}
    for _ in range(nd):
        neutral = w.chance(neutral_bias)
        out["k"].append(1 if neutral else w.size(1, 3))
        out["stride"].append(1 if neutral else w.size(1, 2))
        out["padding"].append(0 if neutral else w.size(0, 1))
        out["dilation"].append(1 if neutral else w.size(1, 2))
    # torch 2.13 (CPU) segfaults in Conv1d(k=1, stride=2, padding=1, dilation=2) on a transposed
    # input of length 1; dilation does nothing for k=1, so it is not drawn there
    out["dilation"] = [1 if k == 1 else d for k, d in zip(out["k"], out["dilation"])]
    # and its bfloat16 conv backward with stride 2, padding 1 on a length-1 non-contiguous input
    # returns garbage weight gradients (uninitialised memory): no bfloat16 with strided convs
    if any(v > 1 for v in out["stride"]):
        w.no_bf16 = True
    if w.chance(0.1):
        out["padding"] = w.pick(["same", "valid"])
        if out["padding"] == "same":
            out["stride"] = [1] * nd
    return out


def _fmt(v: Any, nd: int) -> str:
    if isinstance(v, str):
        return repr(v)
    if nd == 1:
        return str(v[0])
    return "(" + ", ".join(map(str, v)) + ")"


def block_conv(w: Writer) -> str:
    s = w.shape
    r = len(s)
    kinds = []
    if r == 3:
        kinds += ["conv1d", "conv1d_cl", "fconv1d", "spectro", "spectro_t"]
    if r == 4:
        kinds += ["conv2d"]
    assume(kinds)
    kind = w.pick(kinds)
    bias = w.chance(0.8)
    if kind in ("conv1d", "conv1d_cl", "fconv1d", "conv2d"):
        nd = 2 if kind == "conv2d" else 1
        src = _meta(s) if kind != "conv1d_cl" else _meta(s).transpose(1, 2)
        c = src.shape[1]
        o = w.size()
        a = _conv_args(w, nd, 0.6)
        common = [g for g in range(1, 7) if c % g == 0 and o % g == 0]
        groups = 1 if w.chance(0.75) else w.pick(common)
        pad = a["padding"]
        weight = _meta([o, c // groups, *a["k"]])
        fn = torch.nn.functional.conv2d if nd == 2 else torch.nn.functional.conv1d
        new = _shape_of(lambda: fn(src, weight, None, a["stride"], pad, a["dilation"], groups))
        assume(new is not None and all(v >= 1 for v in new))
        assert new is not None
        k, st_, dil = (_fmt(a[n], nd) for n in ("k", "stride", "dilation"))
        pd = _fmt(pad, nd)
        if kind == "fconv1d":
            cw = w.param((o, c // groups, *a["k"]), "cw")
            cb = w.param((o,), "cb") if bias else "None"
            w.emit(f"h = F.conv1d(h, {cw}, {cb}, {st_}, {pd}, {dil}, {groups})")
        else:
            cls = "nn.Conv2d" if nd == 2 else "nn.Conv1d"
            m = w.module(f"{cls}({c}, {o}, {k}, stride={st_}, padding={pd}, dilation={dil}, "
                         f"groups={groups}, bias={bias})", "conv")
            if kind == "conv1d_cl":
                w.emit(f"h = {m}(h.transpose(1, 2)).transpose(1, 2)")
                new = [new[0], new[2], new[1]]
            else:
                w.emit(f"h = {m}(h)")
        w.shape = new
        return f"conv:{kind}" + ("" if groups == 1 else f"-g{groups}")
    # spectrogram forms: (B, F, T) -> unsqueeze(1) -> Conv2d(1, O, (kF, kT))
    o = w.size()
    if kind == "spectro":
        feat_axis = 0  # kernel axis that should span F
        x4 = _meta(s).unsqueeze(1)
        fsize = s[1]
    else:  # (B, T, F) -> unsqueeze(1) -> Conv2d(1, O, (kT, kF))
        feat_axis = 1
        x4 = _meta(s).unsqueeze(1)
        fsize = s[2]
    a = _conv_args(w, 2, 0.7)
    if w.chance(0.8) and not isinstance(a["padding"], str):
        span = w.pick([fsize, fsize, max(fsize - 1, 1)])
        a["k"][feat_axis] = span
        a["padding"][feat_axis] = 0 if w.chance(0.85) else 1
        a["dilation"][feat_axis] = 1
        a["stride"][feat_axis] = w.pick([1, 1, 2])
        w.no_bf16 = w.no_bf16 or a["stride"][feat_axis] > 1
    weight = _meta([o, 1, *a["k"]])
    y = None
    try:
        y = torch.nn.functional.conv2d(x4, weight, None, a["stride"], a["padding"], a["dilation"])
    except Exception:
        assume(False)
    assert y is not None
    assume(all(v >= 1 for v in y.shape))
    k, st_, dil, pd = (_fmt(a[n], 2) for n in ("k", "stride", "dilation", "padding"))
    m = w.module(f"nn.Conv2d(1, {o}, {k}, stride={st_}, padding={pd}, dilation={dil}, "
                 f"bias={bias})", "conv")
    sq = 2 if kind == "spectro" else 3
    post = w.pick([f".squeeze({sq})", f".squeeze({sq - 4})", ".squeeze()", f".flatten(1, {sq})"
                   if sq == 2 else ".flatten(2, 3)", f".mean({sq})"])
    tail = "" if kind == "spectro" else w.pick([".transpose(1, 2)", ".permute(0, 2, 1)", ""])
    if kind == "spectro" and w.chance(0.3):
        tail = ".transpose(1, 2)"
    code = f"{m}(h.unsqueeze(1)){post}{tail}"
    new = _shape_of(lambda: eval(f"y{post}{tail}", {}, {"y": y}))
    assume(new is not None and len(new) >= 2)
    w.emit(f"h = {code}")
    w.shape = new  # type: ignore[assignment]
    return f"conv:{kind}"


def block_loop(w: Writer) -> str:
    s = w.shape
    r = len(s)
    assume(r >= 3)
    a = w.pick([1, 1, 1, 0])
    steps = s[a]
    f = s[-1]
    src = w.fresh("x")
    w.emit(f"{src} = h")
    idx = ":, " if a == 1 else ""
    recurrent = w.chance(0.12)
    source = w.pick(["index", "select", "narrow", "slice", "unbind", "split", "chunk"])
    keep = source in ("narrow", "slice", "split", "chunk")
    count = w.pick(["size", "size", "shape", "literal", "short", "reversed", "strided"])
    if count == "short" and steps < 2:
        count = "size"
    rng = {"size": f"range({src}.size({a}))", "shape": f"range({src}.shape[{a}])",
           "literal": f"range({steps})", "short": f"range({src}.size({a}) - 1)",
           "reversed": f"reversed(range({src}.size({a})))",
           "strided": f"range(0, {src}.size({a}), 2)"}[count]
    n_steps = {"short": steps - 1, "strided": (steps + 1) // 2}.get(count, steps)
    assume(n_steps >= 1)
    step_shape = list(s)
    if keep:
        step_shape[a] = 1
    else:
        del step_shape[a]
    # the per-step body: one module (tied), a ModuleList (tied / untied / partly), or a chain
    tying = w.pick(["one", "one", "tied_list", "untied_list", "partly_tied"])
    o = f if recurrent else w.size()
    if tying == "one" or recurrent:
        mod = w.module(f"nn.Linear({f}, {o})", "fc")
        pick_mod = lambda t: mod  # noqa: E731
    else:
        lin = w.fresh("lin")
        w.init.append(f"{lin} = nn.Linear({f}, {o})")
        if tying == "tied_list":
            entries = f"[{lin}] * {steps}"
        elif tying == "untied_list":
            entries = f"[nn.Linear({f}, {o}) for _ in range({steps})]"
        else:
            entries = f"[{lin}] * {max(steps - 1, 1)} + [nn.Linear({f}, {o})]"
        ml = w.module(f"nn.ModuleList({entries})", "steps")
        pick_mod = lambda t: f"{ml}[{t}]"  # noqa: E731
    extra = w.pick(["", "", "relu", "dropout", "bn", "ln", "scale_t", "read_first"])
    if extra == "bn" and (len(step_shape) != 2 or step_shape[0] < 2):
        extra = "relu"
    post_mod = {"relu": "torch.relu({})",
                "dropout": w.module(f"nn.Dropout({w.pick([0.0, 0.3])})", "drop") + "({})"
                if extra == "dropout" else "{}",
                "bn": (w.module(f"nn.BatchNorm1d({o})", "bn") + "({})") if extra == "bn" else "{}",
                "ln": (w.module(f"nn.LayerNorm({o})", "ln") + "({})") if extra == "ln" else "{}",
                "scale_t": "({} * (t + 1))",
                "read_first": "({} + " + f"{src}[{idx}0].sum())",
                "": "{}"}[extra]
    if source == "index":
        step = f"{src}[{idx}t]"
    elif source == "select":
        step = f"{src}.select({a}, t)"
    elif source == "narrow":
        step = f"{src}.narrow({a}, t, 1)"
    elif source == "slice":
        step = f"{src}[{idx}t:t + 1]"
    else:
        step = "xt"
    if source in ("unbind", "split", "chunk"):
        it = {"unbind": f"{src}.unbind({a})", "split": f"{src}.split(1, dim={a})",
              "chunk": f"{src}.chunk({src}.size({a}), {a})"}[source]
        loop_head = f"for t, xt in enumerate({it}):"
        if count in ("short", "reversed", "strided"):
            count = "all"
        n_steps = steps
    else:
        loop_head = f"for t in {rng}:"
    if tying != "one" and not recurrent and count in ("reversed", "strided", "short", "all"):
        pass
    outs = w.fresh("outs")
    w.emit(f"{outs} = []")
    if recurrent:
        prev = w.fresh("prev")
        w.emit(f"{prev} = None")
    w.emit(loop_head)
    if recurrent:
        form = w.pick(["add_state", "input_state"])
        w.emit(f"    inp = {step}")
        if form == "add_state":
            w.emit(f"    y = {pick_mod('t')}(inp)")
            w.emit(f"    y = y if {prev} is None else torch.tanh(y + {prev})")
        else:
            w.emit(f"    y = {pick_mod('t')}(inp if {prev} is None else inp + {prev})")
        w.emit(f"    {prev} = y")
    else:
        w.emit(f"    y = {post_mod.format(pick_mod('t') + '(' + step + ')')}")
    combine = w.pick(["stack", "cat", "cat_unsqueeze"])
    if combine == "cat_unsqueeze" and not keep:
        w.emit(f"    {outs}.append(y.unsqueeze({a}))")
        combine = "cat"
    else:
        w.emit(f"    {outs}.append(y)")
    d = w.pick([a, a, 0, 1, -1])
    if combine == "stack":
        w.emit(f"h = torch.stack({outs}, {d})")
    else:
        w.emit(f"h = torch.cat({outs}, {d})")
    out_step = list(step_shape)
    out_step[-1] = o
    parts = [_meta(out_step)] * n_steps
    try:
        if combine == "cat" and "unsqueeze" in w.fwd[-2]:
            parts = [p.unsqueeze(a) for p in parts]
        y = torch.stack(parts, d) if combine == "stack" else torch.cat(parts, d)
    except Exception:
        assume(False)
        raise
    w.shape = list(y.shape)
    # Python values derived from the loop (its length, a middle step) feeding the result
    pyval = w.pick(["", "", "", "mean_len", "scale_len", "mid_step"])
    if pyval == "mean_len":
        w.emit(f"h = h / len({outs})")
    elif pyval == "scale_len":
        w.emit(f"h = h * (len({outs}) + 1)")
    elif pyval == "mid_step":
        w.emit(f"h = h + {outs}[len({outs}) // 2].sum()")
    return f"loop:{source}/{count}/{tying}/{combine}" + (f"+{extra}" if extra else "") + (
        "+recurrent" if recurrent else "") + (f"+{pyval}" if pyval else "")


LETTERS = "abcd"


def block_matmul(w: Writer) -> str:
    s = w.shape
    r = len(s)
    kind = w.pick(["einsum", "einsum", "matmul", "matmul_cf", "bmm", "self"])
    buffer = w.chance(0.25)
    f = s[-1]
    o = w.size()
    if kind == "einsum":
        labels = LETTERS[:r]
        c = labels[-1] if w.chance(0.7) else w.pick(list(labels))
        other = "o" if w.chance(0.85) else w.pick([x for x in labels if x != c] or ["o"])
        wl = [c, other] if w.chance(0.5) else [other, c]
        size = dict(zip(labels, s))
        size["o"] = o
        default = labels.replace(c, other) if other == "o" else labels.replace(c, "")
        if w.chance(0.65):
            out = default
        else:
            pool = sorted(set(labels + other) - {c})
            perm = w.draw(st.permutations(pool))
            keep = w.draw(st.integers(max(len(perm) - 1, 1), len(perm)))
            out = "".join(perm[:keep])
        wshape = [size[x] for x in wl]
        wt = w.param(wshape, "W", buffer=buffer)
        lhs = labels
        if w.chance(0.15) and c == labels[-1] and out == default and other == "o":
            lhs, out = "..." + c, "..." + "o"
        eq = f"{lhs},{''.join(wl)}->{out}"
        if w.chance(0.2):
            eq = f"{''.join(wl)},{lhs}->{out}"
            call = f"torch.einsum({eq!r}, {wt}, h)"
        elif w.chance(0.15):
            call = f"torch.einsum({eq!r}, [h, {wt}])"
        else:
            call = f"torch.einsum({eq!r}, h, {wt})"
        wm = _meta(wshape)
        hm = _meta(s)
        new = _shape_of(lambda: torch.einsum(eq, wm, hm) if eq.startswith("".join(wl) + ",")
                        else torch.einsum(eq, hm, wm))
        assume(new is not None)
        bias = ""
        if new and new[-1] == o and w.chance(0.3):
            bias = f" + {w.param((o,), 'b')}"
        w.emit(f"h = {call}{bias}")
        w.shape = new  # type: ignore[assignment]
        return f"matmul:einsum {eq}"
    if kind == "matmul":
        assume(r >= 2)
        form = w.pick(["t", "in_out", "matmul_fn", "matmul_method"])
        if form == "t":
            wt = w.param((o, f), "W", buffer=buffer)
            prod_ = f"h @ {wt}{w.pick(['.t()', '.T', '.mT'])}"
        else:
            wt = w.param((f, o), "W", buffer=buffer)
            prod_ = {"in_out": f"h @ {wt}", "matmul_fn": f"torch.matmul(h, {wt})",
                     "matmul_method": f"h.matmul({wt})"}[form]
        new = s[:-1] + [o]
        bias_kind = w.pick(["none", "vec", "row", "per_step", "column"])
        bias = ""
        if bias_kind == "vec":
            bias = f" + {w.param((o,), 'b')}"
        elif bias_kind == "row":
            bias = f" + {w.param((1, o), 'b')}"
        elif bias_kind == "per_step" and r >= 2:
            bias = f" + {w.param((s[-2], o), 'b')}"
        elif bias_kind == "column" and r >= 2 and s[-2] in (o, 1):
            bias = f" + {w.param((o, 1), 'b')}"
            new = _shape_of(lambda: _meta(new) + _meta((o, 1)))  # type: ignore[assignment]
        w.emit(f"h = {prod_}{bias}")
        w.shape = new
        return f"matmul:{form}+{bias_kind}"
    if kind == "matmul_cf":
        assume(r >= 3)
        c = s[-2]
        wt = w.param((o, c), "W", buffer=buffer)
        bias_kind = w.pick(["none", "column", "vec"])
        bias = ""
        new = s[:-2] + [o, s[-1]]
        if bias_kind == "column":
            bias = f" + {w.param((o, 1), 'b')}"
        elif bias_kind == "vec" and s[-1] in (o, 1):
            bias = f" + {w.param((o,), 'b')}"
            new = _shape_of(lambda: _meta(new) + _meta((o,)))  # type: ignore[assignment]
        w.emit(f"h = {wt} @ h{bias}")
        w.shape = new
        return f"matmul:W@h+{bias_kind}"
    if kind == "bmm":
        assume(r == 3)
        form = w.pick(["bmm", "bmm_cf", "baddbmm"])
        if form == "bmm":
            wt = w.param((f, o), "W", buffer=buffer)
            w.emit(f"h = torch.bmm(h, {wt}.expand(h.size(0), {f}, {o}))")
            w.shape = [s[0], s[1], o]
        elif form == "bmm_cf":
            c = s[1]
            wt = w.param((o, c), "W", buffer=buffer)
            w.emit(f"h = torch.bmm({wt}.unsqueeze(0).expand(h.size(0), {o}, {c}), h)")
            w.shape = [s[0], o, s[2]]
        else:
            wt = w.param((f, o), "W", buffer=buffer)
            bshape = w.pick([(o,), (1, 1, o), (s[1], o)])
            b = w.param(bshape, "b")
            w.emit(f"h = torch.baddbmm({b}, h, {wt}.expand(h.size(0), {f}, {o}))")
            w.shape = [s[0], s[1], o]
        return f"matmul:{form}"
    # products of the input with itself: not dense layers
    assume(r >= 2)
    if w.chance(0.5):
        w.emit("h = h @ h.transpose(-1, -2)")
        w.shape = s[:-1] + [s[-2]]
    else:
        labels = LETTERS[:r]
        eq = f"{labels},{labels[:-2]}z{labels[-1]}->{labels[:-1]}z"
        w.emit(f"h = torch.einsum({eq!r}, h, h)")
        w.shape = s[:-1] + [s[-2]]
    return "matmul:self"


def block_pointwise(w: Writer) -> str:
    f = w.shape[-1]
    kind = w.pick(["relu", "scale", "ln", "dropout", "contiguous"])
    expr = {
        "relu": "torch.relu(h)",
        "scale": "h * 2.0 - 1.0",
        "ln": f"{w.module(f'nn.LayerNorm({f})', 'ln')}(h)" if kind == "ln" else "",
        "dropout": f"{w.module('nn.Dropout(0.2)', 'drop')}(h)" if kind == "dropout" else "",
        "contiguous": "h.contiguous()",
    }[kind]
    w.emit(f"h = {expr}")
    return f"pointwise:{kind}"


def block_dropfold(w: Writer) -> str:
    """Dropout before and/or after a fold (or a channel-first transpose pair): in train mode the
    rewrite must draw the same mask for the same element."""
    s = w.shape
    f, o = s[-1], w.size()
    fc = w.module(f"nn.Linear({f}, {o})", "fc")
    drop = w.module(f"nn.Dropout({w.pick([0.3, 0.5])})", "drop")
    where = w.pick(["before", "after", "both"])
    x0 = w.fresh("x")
    w.emit(f"{x0} = {drop}(h)" if where != "after" else f"{x0} = h")
    if len(s) >= 3 and w.chance(0.4):  # channel-first data: features on axis 1
        cf = w.module(f"nn.Linear({s[1]}, {o})", "fc")
        w.emit(f"h = {cf}({x0}.transpose(1, -1))")
        if where != "before":
            w.emit(f"h = {drop}(h)")
        w.emit("h = h.transpose(1, -1)")
        w.shape = [s[0], o, *s[2:]]
        return f"dropfold:chfirst/{where}"
    w.emit(f"h = {fc}({x0}.reshape(-1, {f})).view(*{x0}.shape[:-1], {o})")
    if where != "before":
        w.emit(f"h = {drop}(h)")
    w.shape = [*s[:-1], o]
    return f"dropfold:{where}"


def block_inplace(w: Writer) -> str:
    """In-place ops on views around a fold: results that depend on the input's layout (a
    ``reshape`` is a view only of contiguous data) must stay the original's."""
    s = w.shape
    f, o = s[-1], w.size()
    fc = w.module(f"nn.Linear({f}, {o})", "fc")
    x0 = w.fresh("x")
    w.emit(f"{x0} = h * 1.0")  # the model's own tensor, in h's layout
    kind = w.pick(["relu_result", "dropout_view", "other_view", "contiguous_copy", "transposed"])
    lead = f"*{x0}.shape[:-1]"
    if kind == "relu_result":
        w.emit(f"y = {fc}({x0}.reshape(-1, {f}))")
        w.emit("F.relu(y, inplace=True)")
        w.emit(f"h = y.view({lead}, {o})")
    elif kind == "dropout_view":
        drop = w.module(f"nn.Dropout({w.pick([0.0, 0.3])}, inplace=True)", "drop")
        w.emit(f"h = {fc}({drop}({x0}.reshape(-1, {f}))).view({lead}, {o}) + {x0}.sum()")
    elif kind == "other_view":
        w.emit(f"{x0}.reshape(-1, {f}).mul_(2.0)")  # reaches x only when the reshape is a view
        w.emit(f"h = {fc}({x0}.reshape(-1, {f})).view({lead}, {o})")
    elif kind == "contiguous_copy":
        w.emit(f"{x0}.contiguous().mul_(2.0)")  # a copy unless x is contiguous already
        w.emit(f"h = {fc}({x0}.view(-1, {f}) if {x0}.is_contiguous() else "
               f"{x0}.reshape(-1, {f})).view({lead}, {o})")
    else:
        w.emit(f"{x0}.transpose(0, -1).add_(1.0)")
        w.emit(f"h = {fc}({x0}.reshape(-1, {f})).view({lead}, {o}) + {x0}.mean(-1, keepdim=True)")
    w.shape = [*s[:-1], o]
    return f"inplace:{kind}"


def block_mode(w: Writer) -> str:
    """A Python branch on ``self.training`` around a site (each mode its own graph)."""
    s = w.shape
    f, o = s[-1], w.size()
    fc = w.module(f"nn.Linear({f}, {o})", "fc")
    kind = w.pick(["scale", "dropout", "different_fold"])
    w.emit("if self.training:")
    if kind == "dropout":
        drop = w.module("nn.Dropout(0.4)", "drop")
        w.emit(f"    h = {drop}({fc}(h.reshape(-1, {f}))).view(*h.shape[:-1], {o})")
    else:
        w.emit(f"    h = {fc}(h.reshape(-1, {f})).view(*h.shape[:-1], {o}) * 2.0 + 1.0")
    w.emit("else:")
    if kind == "different_fold":
        w.emit(f"    h = torch.tanh({fc}(h))")
    else:
        w.emit(f"    h = torch.tanh({fc}(h.reshape(-1, {f}))).view(*h.shape[:-1], {o})")
    w.shape = [*s[:-1], o]
    return f"mode:{kind}"


def block_autocast(w: Writer) -> str:
    """A site inside ``torch.autocast`` in forward: the original computes it in bfloat16."""
    s = w.shape
    f, o = s[-1], w.size()
    fc = w.module(f"nn.Linear({f}, {o})", "fc")
    w.emit("dt = h.dtype")
    w.emit("with torch.autocast('cpu', dtype=torch.bfloat16):")
    w.emit(f"    h = {fc}(h.reshape(-1, {f})).view(*h.shape[:-1], {o})")
    w.emit("h = h.to(dt)")
    w.shape = [*s[:-1], o]
    return "autocast:inside"


BLOCKS: dict[str, Callable[[Writer], str]] = {
    "fold": block_fold,
    "chfirst": block_chfirst,
    "conv": block_conv,
    "loop": block_loop,
    "matmul": block_matmul,
    "dropfold": block_dropfold,
    "inplace": block_inplace,
    "mode": block_mode,
    "autocast": block_autocast,
    "pointwise": block_pointwise,
}

#: how the example input is laid out in memory (the same values)
LAYOUTS = {
    "contiguous": "",
    "strided": "x = x.permute(*reversed(range(x.dim()))).contiguous()"
               ".permute(*reversed(range(x.dim())))",
    "channels_last": "x = x.contiguous(memory_format=torch.channels_last)",
}
#: one extreme value planted in the example (verification must not be blinded by it)
POISONS = {"": "", "nan": "float('nan')", "inf": "float('inf')", "huge": "1e8"}


def _render(w: Writer, dtype: str, training: bool, shape: list[int], seed: int,
            outputs: str, layout: str = "contiguous", poison: str = "") -> str:
    init = "\n".join("        " + line for line in w.init) or "        pass"
    body = "\n".join("        " + line for line in w.fwd)
    dims = ", ".join(map(str, shape))
    extra = ""
    if poison:
        at = (seed * 7 + 3) % math.prod(shape)
        extra += f"\n    x.view(-1)[{at}] = {POISONS[poison]}"
    if LAYOUTS[layout]:
        extra += f"\n    {LAYOUTS[layout]}"
    return (HEADER + init + "\n\n    def forward(self, x):\n" + body + f"\n        return {outputs}\n"
            + textwrap.dedent(f"""

            def make():
                torch.manual_seed({seed})
                model = Generated().to(torch.{dtype})
                model.train({training})
                x = torch.randn({dims}, dtype=torch.float64).to(torch.{dtype})
            """) + textwrap.indent(extra.strip("\n"), "") + ("\n" if extra else "")
            + "    return model, (x,)\n")


@st.composite
def examples(draw: Callable[[st.SearchStrategy[Any]], Any],
             families: Sequence[str] = tuple(BLOCKS)) -> Example:
    """A random model (source) mixing TDD forms and near-misses, with example inputs it accepts."""
    rank = draw(st.sampled_from([3, 3, 3, 3, 2, 4]))
    # sampled_from shrinks towards the first value: sizes of 1 are drawn, but not favoured
    shape = [draw(st.sampled_from([2, 3, 4, 1, 5])) for _ in range(rank - 1)]
    shape.append(draw(st.sampled_from([3, 2, 4, 5, 6, 1])))
    w = Writer(draw, shape)
    n_blocks = draw(st.integers(1, 3))
    kinds = []
    for _ in range(n_blocks):
        family = draw(st.sampled_from([f for f in families if f != "pointwise"]
                                      + (["pointwise"] if "pointwise" in families else [])))
        kinds.append(BLOCKS[family](w))
    outputs = "h"
    if w.aux and draw(st.booleans()):
        outputs = f"h, {w.aux[0][0]}"
    dtype = draw(st.sampled_from(["float32"] * 6 + ["float64"] * 3 + ["bfloat16"]))
    if dtype == "bfloat16" and w.no_bf16:
        dtype = "float32"
    training = draw(st.booleans())
    seed = draw(st.integers(0, 3))
    layout = draw(st.sampled_from(["contiguous"] * 6 + ["strided", "strided", "channels_last"]))
    if layout == "channels_last" and rank != 4:
        layout = "strided"
    poison = draw(st.sampled_from([""] * 12 + ["nan", "inf", "huge"]))
    source = _render(w, dtype, training, shape, seed, outputs, layout, poison)
    ex = Example(source, dtype, training, kinds)
    # keep only models that accept their own example inputs (and can be differentiated)
    try:
        model, inputs = ex.build()
        with torch.no_grad():
            model(*inputs)
        xs = [x.detach().clone().requires_grad_() for x in inputs]
        out = model(*xs)
        sum(o.float().sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
    except Exception:
        assume(False)
    return ex


# ---------------------------------------------------------------------------------------------
# the property


@dataclass
class Stats:
    """What the checks saw (the long search prints it; under pytest, ``events`` also reports each
    key to hypothesis, shown by ``--hypothesis-show-statistics``)."""

    counts: Counter = field(default_factory=Counter)
    events: bool = False

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n
        if self.events:
            event(key)


class PropertyViolation(AssertionError):
    """The property failed; the message starts with the phase (a short, stable kind)."""


#: the one-time warning of a call the capture did not cover (see tdd_fx/program.py)
FALLBACK = "running the original forward instead"


@dataclass
class Snapshot:
    params: list[tuple[str, int, Tensor, bool]]
    buffers: list[tuple[str, Tensor | None]]
    flags: list[tuple[str, int, bool]]
    rng: Tensor
    grads: list[bool]


def snapshot(model: nn.Module) -> Snapshot:
    return Snapshot(
        params=[(n, id(p), p.detach().clone(), p.requires_grad)
                for n, p in model.named_parameters(remove_duplicate=False)],
        buffers=[(n, None if b is None else b.detach().clone())
                 for n, b in model.named_buffers(remove_duplicate=False)],
        flags=[(n, id(m), m.training) for n, m in model.named_modules(remove_duplicate=False)],
        rng=torch.get_rng_state(),
        grads=[p.grad is None for p in model.parameters()],
    )


def assert_unchanged(model: nn.Module, before: Snapshot) -> None:
    after = snapshot(model)
    assert [(n, i, rg) for n, i, _, rg in after.params] == \
        [(n, i, rg) for n, i, _, rg in before.params], "parameters replaced"
    for (n, _, a, _), (_, _, b, _) in zip(after.params, before.params):
        assert torch.equal(a, b), f"parameter {n} changed"
    assert [n for n, _ in after.buffers] == [n for n, _ in before.buffers], "buffers changed"
    for (n, a), (_, b) in zip(after.buffers, before.buffers):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), \
            f"buffer {n} changed"
    assert after.flags == before.flags, "modules or training flags changed"
    assert torch.equal(after.rng, before.rng), "global RNG state changed"
    assert after.grads == before.grads, ".grad changed"


def _restore_buffers(models: Sequence[nn.Module], saved: list[list[Tensor]]) -> None:
    with torch.no_grad():
        for m, bufs in zip(models, saved):
            for b, v in zip(m.buffers(), bufs):
                b.copy_(v)


def outputs_and_grads(model: nn.Module, inputs: Sequence[Tensor], to64: bool = False,
                      seed: int = 1234) -> list[tuple[str, Tensor | None]]:
    """Outputs, then gradients of a fixed random projection w.r.t. parameters and inputs."""
    xs = [x.detach().clone() for x in inputs]
    xs = [(x.double() if to64 else x).requires_grad_(x.is_floating_point()) for x in xs]
    torch.manual_seed(seed)
    out = model(*xs)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    res: list[tuple[str, Tensor | None]] = [(f"output[{i}]", o.detach())
                                            for i, o in enumerate(outs)]
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    leaves = [p for _, p in params] + [x for x in xs if x.requires_grad]
    diff = [o for o in outs if o.requires_grad]
    if diff and leaves:
        g = torch.Generator().manual_seed(seed)
        cot = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in diff]
        grads = torch.autograd.grad(diff, leaves, cot, allow_unused=True)
        names = [f"grad {n}" for n, _ in params] + [f"grad input[{i}]" for i, x in enumerate(xs)
                                                    if x.requires_grad]
        res += [(n, None if gr is None else gr.detach()) for n, gr in zip(names, grads)]
    return res


#: (rtol, atol relative to the run's largest output/gradient) per dtype
TOL = {torch.float64: (1e-7, 1e-9), torch.float32: (1e-4, 2e-5), torch.bfloat16: (4e-2, 4e-2)}


def assert_same(orig: list, cand: list, ref64: list | None, dtype: torch.dtype, where: str) -> None:
    """``cand`` equals ``orig`` within dtype tolerances (relative to each tensor's scale); when
    not, it must at least be as close to the float64 run as the original, within a small factor
    (ill-conditioned cases: BatchNorm of two rows, bf16 accumulation order)."""
    assert [k for k, _ in cand] == [k for k, _ in orig], f"{where}: outputs/grads differ in kind"
    ref = dict(ref64) if ref64 is not None else {}
    rtol, atol = TOL[dtype]
    # one scale for the run: a gradient that cancels to ~0 is compared at its terms' scale
    scale = max([float(a.detach().double().abs().nan_to_num().max())
                 for _, a in orig if a is not None and a.numel()] + [1.0])
    # ... and the float64 run's, for the fallback: the original can be the wrong one (torch
    # 2.13's CPU bfloat16 conv1d backward on a length-1 strided input returns garbage gradients)
    ref_scale = max([float(r.abs().nan_to_num().max()) for r in ref.values()
                     if r is not None and r.numel()] + [1.0])
    for (k, a), (_, c) in zip(orig, cand):
        if a is None or c is None:
            z = a if c is None else c
            assert z is None or not bool(z.count_nonzero()), f"{where}: {k} present in one only"
            continue
        assert a.shape == c.shape, f"{where}: {k} shape {tuple(c.shape)} != {tuple(a.shape)}"
        assert a.dtype == c.dtype, f"{where}: {k} dtype {c.dtype} != {a.dtype}"
        if a.numel() == 0:
            continue
        try:
            torch.testing.assert_close(c, a, rtol=rtol, atol=atol * scale, equal_nan=True)
            continue
        except AssertionError as exc:
            first = str(exc)
        r = ref.get(k)
        if r is not None and r.shape == a.shape:
            r = r.double()
            e_a = float((a.double() - r).abs().max())
            e_c = float((c.double() - r).abs().max())
            if e_a != e_a:  # NaN: the original itself is broken here
                e_a = float("inf")
            eps = torch.finfo(dtype).eps
            if e_c <= 8 * e_a + 128 * eps * ref_scale:
                continue
        raise AssertionError(f"{where}: {k} differs from the original:\n{first}")


def alternative_shapes(shape: Sequence[int]) -> list[list[int]]:
    """Other batch/time sizes to try (the original decides which it accepts)."""
    shape = list(shape)
    r = len(shape)
    out: list[list[int]] = []

    def add(s: list[int]) -> None:
        if s != shape and s not in out:
            out.append(s)

    def one(d: int, v: int) -> None:
        add(shape[:d] + [v] + shape[d + 1:])

    add([v + 1 for v in shape[:-1]] + shape[-1:])  # every leading axis
    if r >= 2:
        add([shape[1], shape[0], *shape[2:]])  # batch and time swapped (same product)
    one(0, 1)  # a batch of one
    one(r - 1, shape[-1] + 2)  # the last axis: time of channel-first data
    for d in range(1, r - 1):
        one(d, 1)
    one(r - 1, 1)  # size-1 axes broadcast in einsum and arithmetic
    for d in range(r - 1):
        one(d, shape[d] + 2)
    return out


def _strided(x: Tensor) -> Tensor:
    """The same values with the axes reversed in memory (non-contiguous)."""
    rev = list(reversed(range(x.dim())))
    return x.permute(*rev).contiguous().permute(*rev)


def _with_shape(x: Tensor, shape: list[int], seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(x.dtype)


def _accepts(model: nn.Module, inputs: tuple[Tensor, ...]) -> bool:
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        with torch.no_grad():
            out = model(*inputs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return all(isinstance(o, Tensor) for o in outs)
    except Exception:
        return False
    finally:
        _restore_buffers([model], [saved])


MAX_ALTERNATIVES = 5


def check_model(model: nn.Module, inputs: tuple[Tensor, ...], stats: Stats | None = None,
                max_alternatives: int = MAX_ALTERNATIVES) -> nn.Module:
    """The property: see ``tests/test_property.py``.  Returns the optimized model."""
    stats = stats if stats is not None else Stats()
    before = snapshot(model)
    try:
        opt = tdd_fx.optimize(model, inputs)  # must not raise: the model accepts its inputs
    except Exception as exc:
        raise PropertyViolation(f"optimize raised {_describe(exc)}") from exc
    assert_unchanged(model, before)

    report = opt.tdd_report
    for site in report.sites:
        assert site.status in STATUSES, f"site status {site.status!r}"
        assert site.pattern in ("reshape", "conv", "loop", "matmul"), f"pattern {site.pattern!r}"
        if site.status != "rewritten":
            assert site.reason, f"{site.status} site without a reason: {site}"
        stats.add(f"site {site.pattern} {site.status}")

    # same state_dict keys (and order, shapes); parameters shared
    sd_m, sd_o = model.state_dict(keep_vars=True), opt.state_dict(keep_vars=True)
    assert list(sd_o) == list(sd_m), f"state_dict keys differ: {list(sd_o)} vs {list(sd_m)}"
    for k, v in sd_m.items():
        assert sd_o[k].shape == v.shape, f"state_dict {k}: shape differs"
        if isinstance(v, nn.Parameter):
            assert sd_o[k] is v, f"parameter {k} is not shared"
    assert {id(p) for p in opt.parameters()} == {id(p) for p in model.parameters()}, \
        "parameter sets differ"
    assert opt.training == model.training, "training flag differs"

    # outputs and gradients: example inputs, other sizes, and the other mode
    models = [model, opt]
    saved = [[b.detach().clone() for b in m.buffers()] for m in models]
    flags = [(m, m.training) for root in models for m in root.modules()]
    sets: list[tuple[str, tuple[Tensor, ...]]] = [("example", inputs)]
    x = inputs[0]
    other = x.contiguous() if not x.is_contiguous() else _strided(x)
    if other.stride() != x.stride() and _accepts(model, (other,)):
        sets.append(("example, other layout", (other,)))  # same values, other strides
    for i, shape in enumerate(alternative_shapes(list(x.shape))):
        if len(sets) > max_alternatives:
            break
        alt = (_with_shape(x, shape, 100 + i),)
        if _accepts(model, alt):
            sets.append(("x".join(map(str, shape)), alt))
    modes = [model.training, not model.training]
    try:
        for mode in modes:
            model.train(mode)
            opt.train(mode)
            for name, xs in (sets if mode == modes[0] else sets[:1]):
                where = f"{'train' if mode else 'eval'} mode, inputs {name}"
                _restore_buffers(models, saved)
                try:
                    a = outputs_and_grads(model, xs)
                except Exception:
                    if mode == modes[0]:
                        raise
                    continue  # e.g. train-mode BatchNorm of one row: the original fails too
                _restore_buffers(models, saved)
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        c = outputs_and_grads(opt, xs)
                except Exception as exc:
                    raise PropertyViolation(f"the optimized model raised {_describe(exc)} "
                                            f"({where}), the original did not") from exc
                fell_back = [str(m.message) for m in caught if FALLBACK in str(m.message)]
                if fell_back and name == "example" and mode == modes[0] and report.rewritten:
                    raise PropertyViolation(f"{where}: the rewritten graph does not accept the "
                                            f"example inputs: {fell_back[0]}")
                if fell_back:
                    why = "other size" if name != "example" else "other mode"
                    stats.add(f"fall back to the original forward ({why})")
                _restore_buffers(models, saved)
                try:
                    assert_same(a, c, None, x.dtype, where)
                except AssertionError:  # judge against a float64 run
                    ref = copy.deepcopy(model).double()
                    r = outputs_and_grads(ref, xs, to64=True)
                    assert_same(a, c, r, x.dtype, where)
                stats.add("compared")
    finally:
        _restore_buffers(models, saved)
        for m, flag in flags:
            m.training = flag
    stats.add(f"rewritten {min(len(report.rewritten), 3)}{'+' if len(report.rewritten) > 3 else ''}")
    return opt


def _describe(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}"


def failure_kind(exc: BaseException) -> str:
    """A short signature of a failure (numbers and names blurred) to group failures by."""
    first = (str(exc).strip().splitlines() or [""])[0]
    first = re.sub(r" ?\((train|eval) mode, inputs [\dx]+\)", "", first)
    first = re.sub(r"^(train|eval) mode, inputs [\dx]+: ", "", first)
    first = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", first)
    first = re.sub(r"grad \S+", "grad P", first)
    return f"{type(exc).__name__}: {first[:160]}"


def check_example(ex: Example, stats: Stats | None = None) -> nn.Module:
    model, inputs = ex.build()
    return check_model(model, inputs, stats)


# ---------------------------------------------------------------------------------------------
# known tdd_fx bugs (each one an xfail(strict=True) regression test in tests/test_property.py)

#: name -> the regression test(s) reproducing it.  When a fix makes its regression test XPASS,
#: delete the entry here (and the xfail mark there): the property then checks it again.
KNOWN_BUGS: dict[str, str] = {}  # all found so far are fixed (their regression tests pass)


def _tdd_frames(exc: BaseException) -> list[tuple[str, str]]:
    """(file name, function) of the tdd_fx frames an exception (or its cause) came through."""
    inner = exc.__cause__ or exc
    return [(os.path.basename(f.filename), f.name)
            for f in traceback.extract_tb(inner.__traceback__) if "tdd_fx" in f.filename]


def _example_shape(source: str) -> list[int]:
    m = re.search(r"x = torch\.randn\(([\d, ]+), dtype", source)
    return [int(v) for v in m.group(1).split(",")] if m else []


def known_bug(ex: Example, exc: BaseException) -> str | None:
    """The KNOWN_BUGS name a failure of ``ex`` is an instance of, or None (a new failure).
    Empty while no bug is known: every failure fails the property."""
    del ex, exc
    return None


def _passes(ex: Example) -> bool:
    try:
        check_example(ex)
    except Exception:
        return False
    return True
