"""Transposed convolutions with a kernel of size 1: a dense map at every position.

Identity (``x: (B, C, *S)``, ``W: (C, O, 1, ...)`` stored input-channels first)::

    conv_transpose(x, W, b, stride=1, padding=0, output_padding=0, groups=1, dilation=d)
        == time_distributed_dense(x, W.view(C, O).t(), b, feature_dim=1)

since a size-1 transposed kernel scatters each input position to the same output position
(dilation is moot for a size-1 kernel).  A stride spreads positions apart (zeros between), padding
crops, ``output_padding`` adds positions, and groups > 1 is block-diagonal: none of them is dense
per position.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..optables import CONV_TRANSPOSES
from .base import Context, Match, first_failure, rejected

aten = torch.ops.aten
PATTERN = "conv"


def _all(v: Any, value: int) -> bool:
    v = v if isinstance(v, (list, tuple)) else [v]
    return all(int(x) == value for x in v)


def _check(node: fx.Node, ctx: Context) -> str:
    a = list(node.args) + [None] * 8
    x, w, b, stride, padding, output_padding, groups = a[:7]
    ws = ctx.shape(w) or ()
    return first_failure(
        lambda: "" if ctx.state_source(w) else "the kernel is computed from the input",
        lambda: "" if b is None or ctx.state_source(b) else "the bias is computed from the input",
        lambda: "" if all(int(k) == 1 for k in ws[2:]) else
        f"kernel {tuple(int(k) for k in ws[2:])} spreads each position over its neighbours",
        lambda: "" if stride is None or _all(stride, 1) else f"stride {stride} spreads positions apart",
        lambda: "" if padding is None or _all(padding, 0) else f"padding {padding} crops positions",
        lambda: "" if output_padding is None or _all(output_padding, 0) else
        f"output_padding {output_padding} adds positions",
        lambda: "" if groups is None or int(groups) == 1 else
        f"groups={groups} is block-diagonal, not dense",
        lambda: "" if ctx.rank(x) == len(ws) else "an unbatched input",
    )


def _emit(name: str):  # noqa: ANN202
    def emit(rw: Any) -> None:
        node = rw[name]
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else None
        c_in, c_out = w.meta["val"].shape[:2]
        wv = rw.call(aten.view.default, (w, [int(c_in), int(c_out)]), before=node)
        wt = rw.call(aten.t.default, (wv,), before=node)
        rw.replace(node, rw.tdd(x, wt, b, feature_dim=1, site=name, before=node, like=node,
                                impl="conv"))

    return emit


class ConvTransposeFamily:
    """``ConvTranspose1d/2d/3d`` with kernel 1, stride 1, no padding."""

    pattern = PATTERN

    def find(self, ctx: Context) -> list[Match]:
        out: list[Match] = []
        for node in ctx.graph.nodes:
            if node.op != "call_function" or node.target not in CONV_TRANSPOSES:
                continue
            if node.name in ctx.claimed or ctx.canonical(node):
                continue
            x = node.args[0]
            reason = _check(node, ctx)
            if reason:
                out.append(rejected(ctx, PATTERN, node, x, node, reason, [node]))
                continue
            site = ctx.site(PATTERN, "found", node, x, node, fd=1, kernel="conv")
            out.append(Match(PATTERN, [site], [node.name], emit=_emit(node.name)))
        return out
