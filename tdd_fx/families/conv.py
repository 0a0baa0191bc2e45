"""Convolutions standing in for dense layers.

Identity (``x: (B, C, *S)``, ``W: (O, C, *K)``)::

    conv(x, W, b)[b, o, *s] == sum_c W[o, c, 0..] * x[b, c, *s] + b[o]

when every kernel axis has size 1 with stride 1 and no padding (a pointwise conv), i.e.
``time_distributed_dense(x, W.view(O, C), b, feature_dim=1)``.  A kernel axis may instead span its
whole input axis (``Conv2d(1, O, (F, 1))`` over ``(B, 1, F, T)``; ShallowConvNet's
``(1, n_electrodes)`` kernel with ``C > 1`` channels): with no padding and no dilation the output
has size 1 there, and the conv is the dense map over ``C·F`` merged features, applied at every
position of the remaining axes::

    conv(x, W, b) == tdd(x.merge(C, F), W.reshape(O, C·F), b, feature_dim=1).unsqueeze(F's axis)

Equivalent only as stated: groups > 1 is block-diagonal, a stride or padding on a size-1 kernel
axis subsamples or adds positions, a kernel neither 1 nor spanning mixes neighbouring positions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..optables import CONVS
from .base import Context, Match, example_shape, first_failure, rejected, same

aten = torch.ops.aten
PATTERN = "conv"


def _ints(v: Any, n: int, default: int) -> list[int] | str:
    if isinstance(v, str):
        return v
    if v is None:
        return [default] * n
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return [int(x) for x in v] * n if len(v) == 1 else [int(x) for x in v]


class ConvParams:
    """The arguments of an ATen conv node, normalised."""

    def __init__(self, node: fx.Node, ctx: Context) -> None:
        a = list(node.args) + [None] * 9
        self.x, self.w, self.b = a[0], a[1], a[2]
        ws = ctx.shape(self.w) or ()
        n = max(len(ws) - 2, 0)
        self.kernel = [int(k) for k in ws[2:]]
        if node.target == aten.convolution.default:
            stride, padding, dilation, transposed, groups = a[3], a[4], a[5], a[6], a[8]
            self.transposed = bool(transposed)
        else:
            stride, padding, dilation, groups = a[3], a[4], a[5], a[6]
            self.transposed = False
        self.stride = _ints(stride, n, 1)
        self.padding = _ints(padding if padding is not None else 0, n, 0)
        self.dilation = _ints(dilation, n, 1)
        self.groups = int(groups) if groups is not None else 1
        self.in_shape = ctx.shape(self.x)
        self.out_channels = int(ws[0]) if ws else 0
        #: the channel axis: 1, or 0 for an unbatched input (C, *S)
        self.c = 1 if self.in_shape is not None and len(self.in_shape) == n + 2 else 0


def spanned_axes(p: ConvParams) -> list[int] | str:
    """Axes (of the input) the kernel spans whole; a reason when some axis is neither spanned
    nor pointwise."""
    spans = []
    shape = p.in_shape or ()
    pad = p.padding if not isinstance(p.padding, str) else (
        [0] * len(p.kernel) if p.padding == "valid" or all(k == 1 for k in p.kernel) else None)
    if pad is None:
        return f"padding={p.padding!r} with a kernel of {tuple(p.kernel)} adds positions"
    for i, k in enumerate(p.kernel):
        axis = i + p.c + 1
        if k == 1:
            if p.stride[i] != 1:
                return f"stride {p.stride[i]} on axis {axis} skips positions"
            if pad[i] != 0:
                return f"padding {pad[i]} on axis {axis} adds positions"
            continue
        if pad[i] == 0 and p.dilation[i] == 1 and axis < len(shape) and same(shape[axis], k):
            spans.append(axis)
            continue
        size = example_shape((shape[axis],))[0] if axis < len(shape) else "?"
        return (f"kernel size {k} on axis {axis} mixes neighbouring positions (it neither is 1 "
                f"nor spans the whole axis of size {size})")
    return spans


def _check(node: fx.Node, p: ConvParams, ctx: Context) -> str:
    return first_failure(
        lambda: "" if not p.transposed else "a transposed convolution (see the conv_transpose family)",
        lambda: "" if ctx.state_source(p.w) else "the kernel is computed from the input, not a parameter",
        lambda: "" if p.b is None or ctx.state_source(p.b) else "the bias is computed from the input",
        lambda: "" if p.groups == 1 else (f"a grouped convolution (groups={p.groups}) is "
                                          "block-diagonal, not dense"),
        lambda: "" if p.in_shape is not None and len(p.in_shape) - p.c == len(p.kernel) + 1 else
        "the input's rank does not match the kernel's",
        lambda: spanned_axes(p) if isinstance(spanned_axes(p), str) else "",
    )


def _emit(node_name: str, axes: list[int], rank: int, c: int):  # noqa: ANN202
    """Channels (merged with the spanned axes, in the kernel's order) become the feature axis
    of one canonical node; the spanned axes come back as size-1 axes."""

    def emit(rw: Any) -> None:
        node = rw[node_name]
        x, w, b = node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else None
        out_ch = int(w.meta["val"].shape[0])
        if axes:
            rest = [d for d in range(c + 1, rank) if d not in axes]
            order = [*range(c + 1), *axes, *rest]
            if order != list(range(rank)):
                x = rw.call(aten.permute.default, (x, order), before=node)
            w = rw.call(aten.permute.default, (w, [0, 1, *(a - c + 1 for a in axes),
                                                  *(a - c + 1 for a in rest)]), before=node)
            x = rw.call(aten.flatten.using_ints, (x, c, c + len(axes)), before=node)
        wv = rw.call(aten.view.default, (w, [out_ch, -1]), before=node)
        y = rw.tdd(x, wv, b, feature_dim=c, site=node_name, before=node, like=node, impl="conv")
        for axis in axes:
            y = rw.call(aten.unsqueeze.default, (y, axis), before=node, like=node)
        rw.replace(node, y)

    return emit


class ConvFamily:
    """Pointwise and axis-spanning convolutions (see the module docstring)."""

    pattern = PATTERN

    def find(self, ctx: Context) -> list[Match]:
        out: list[Match] = []
        for node in ctx.graph.nodes:
            if node.op != "call_function" or node.target not in CONVS or node.name in ctx.claimed:
                continue
            if ctx.canonical(node):
                continue
            p = ConvParams(node, ctx)
            if not _near(p):
                continue
            reason = _check(node, p, ctx)
            if reason:
                out.append(rejected(ctx, PATTERN, node, p.x, node, reason, [node]))
                continue
            axes = spanned_axes(p)
            assert isinstance(axes, list)
            rank = len(p.in_shape or ())
            if axes and rank - p.c - 1 == len(axes):  # nothing left to distribute over
                out.append(rejected(ctx, PATTERN, node, p.x, node, "the kernel spans every axis: "
                                    "one dense layer over the whole input, not per position",
                                    [node]))
                continue
            site = ctx.site(PATTERN, "found", node, p.x, node, fd=p.c, kernel="conv")
            out.append(Match(PATTERN, [site], [node.name], emit=_emit(node.name, axes, rank, p.c)))
        return out


def _near(p: ConvParams) -> bool:
    """Worth reporting: a pointwise kernel, or one axis of the kernel > 1 with the others 1
    (a candidate for spanning)."""
    if p.transposed or not p.kernel:
        return False
    big = [k for k in p.kernel if k != 1]
    return len(big) <= 1 or p.groups > 1
