"""Transposed convolutions with a kernel of size 1: a dense map at every position.

Identity (``x: (B, C, *S)``, ``W: (C, O, 1, ...)`` stored input-channels first)::

    conv_transpose(x, W, b, stride=1, padding=0, output_padding=0, groups=1, dilation=d)
        == time_distributed_dense(x, W.view(C, O).t(), b, feature_dim=1)

since a size-1 transposed kernel scatters each input position to the same output position
(dilation is moot for a size-1 kernel).  An unbatched input ``(C, *S)`` has its features on axis
0.  A stride spreads positions apart (zeros between), padding crops, ``output_padding`` adds
positions, and groups > 1 is block-diagonal: none of them is dense per position.

Spellings: ``nn.ConvTranspose1d/2d/3d`` and ``F.conv_transpose1d/2d/3d`` (``aten.conv_transposeNd``)
and ``torch.convolution(..., transposed=True, ...)`` (``aten.convolution``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..optables import CONV_TRANSPOSES
from .base import Context, Match, first_failure, rejected
from .conv import computed

aten = torch.ops.aten
PATTERN = "conv"


def _all(v: Any, value: int) -> bool:
    v = v if isinstance(v, (list, tuple)) else [v]
    return all(int(x) == value for x in v)


def _args(node: fx.Node) -> tuple[Any, ...] | None:
    """``(x, w, b, stride, padding, output_padding, groups)`` of a transposed convolution node;
    None for any other node."""
    if node.op != "call_function":
        return None
    if node.target in CONV_TRANSPOSES:
        a = list(node.args) + [None] * 8
        return tuple(a[:7])
    if node.target == aten.convolution.default:
        a = list(node.args) + [None] * 9
        if not a[6]:  # not transposed: the conv family's
            return None
        return (a[0], a[1], a[2], a[3], a[4], a[7], a[8])
    return None


def _check(args: tuple[Any, ...], ctx: Context) -> str:
    x, w, b, stride, padding, output_padding, groups = args
    ws = ctx.shape(w) or ()
    rank = ctx.rank(x)
    return first_failure(
        lambda: computed(ctx, w, "kernel"),
        lambda: computed(ctx, b, "bias"),
        lambda: "" if all(int(k) == 1 for k in ws[2:]) else
        f"kernel {tuple(int(k) for k in ws[2:])} spreads each position over its neighbours",
        lambda: "" if stride is None or _all(stride, 1) else f"stride {stride} spreads positions apart",
        lambda: "" if padding is None or _all(padding, 0) else f"padding {padding} crops positions",
        lambda: "" if output_padding is None or _all(output_padding, 0) else
        f"output_padding {output_padding} adds positions",
        lambda: "" if groups is None or int(groups) == 1 else
        f"groups={groups} is block-diagonal, not dense",
        lambda: "" if rank in (len(ws), len(ws) - 1) else "the input's rank does not match the kernel's",
    )


def _emit(name: str, fd: int):  # noqa: ANN202
    def emit(rw: Any) -> None:
        node = rw[name]
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else None
        c_in, c_out = w.meta["val"].shape[:2]
        # reshape, not view: the live weight may be channels-last or a transposed view
        wv = rw.call(aten.reshape.default, (w, [int(c_in), int(c_out)]), before=node)
        wt = rw.call(aten.t.default, (wv,), before=node)
        rw.replace(node, rw.tdd(x, wt, b, feature_dim=fd, site=name, before=node, like=node,
                                impl="conv"))

    return emit


class ConvTransposeFamily:
    """``ConvTranspose1d/2d/3d`` with kernel 1, stride 1, no padding."""

    pattern = PATTERN
    #: standard layers worth capturing alone when their parent cannot be captured
    layers = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

    def find(self, ctx: Context) -> list[Match]:
        out: list[Match] = []
        for node in ctx.unclaimed(CONV_TRANSPOSES | {aten.convolution.default}):
            args = _args(node)
            if args is None:
                continue
            x = args[0]
            reason = _check(args, ctx)
            if reason:
                out.append(rejected(ctx, PATTERN, node, x, node, reason, [node]))
                continue
            fd = 1 if ctx.rank(x) == len(ctx.shape(args[1]) or ()) else 0
            site = ctx.site(PATTERN, "found", node, x, node, fd=fd, kernel="conv")
            out.append(Match(PATTERN, [site], [node.name], emit=_emit(node.name, fd)))
        return out
