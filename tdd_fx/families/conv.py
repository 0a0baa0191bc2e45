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

With one input channel (``C == 1``, the ``x.unsqueeze(1)`` idiom) the channel axis is squeezed
instead of merged, so the user's ``unsqueeze`` cancels, and a single spanned axis is the feature
axis where it is (no transposes); the views the user wrote after the conv to drop the size-1 axes
(``squeeze``, ``flatten``, ``view``) and a transpose undoing the conv's channel-first layout are
read from the canonical node directly.

Equivalent only as stated: groups > 1 is block-diagonal, a stride or padding on a size-1 kernel
axis subsamples or adds positions, a kernel neither 1 nor spanning mixes neighbouring positions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .. import ops
from ..optables import CONVS, in_place
from .base import Context, Match, example_shape, first_failure, op_label, rejected, same_shape

aten = torch.ops.aten
PATTERN = "conv"

#: views that keep the row-major order of their input (a size-1 axis dropped, axes merged)
_ORDER_VIEWS = frozenset({aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims,
                          aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                          aten.flatten.using_ints})
_PERMUTES = frozenset({aten.permute.default, aten.transpose.int})


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
        #: sizes a spanned axis relied on (symbol -> its example value)
        self.guards: dict[Any, int] = {}


def spanned_axes(p: ConvParams, ctx: Context) -> list[int] | str:
    """Axes (of the input) the kernel spans whole; a reason when some axis is neither spanned
    nor pointwise.  A symbolic axis equal to its kernel size on the example is fixed there by a
    guard (``p.guards``)."""
    spans = []
    shape = p.in_shape or ()
    if isinstance(p.padding, str) and p.padding != "valid" and any(k != 1 for k in p.kernel):
        i, k = next((i, k) for i, k in enumerate(p.kernel) if k != 1)
        return (f"kernel size {k} on axis {i + p.c + 1} mixes neighbouring positions "
                f"(padding={p.padding!r} pads around each one)")
    pad = [0] * len(p.kernel) if isinstance(p.padding, str) else p.padding
    guards: dict[Any, int] = {}
    for i, k in enumerate(p.kernel):
        axis = i + p.c + 1
        if k == 1:
            if p.stride[i] != 1:
                return f"stride {p.stride[i]} on axis {axis} skips positions"
            if pad[i] != 0:
                return f"padding {pad[i]} on axis {axis} adds positions"
            continue
        if (pad[i] == 0 and p.dilation[i] == 1 and axis < len(shape)
                and ctx.equal(shape[axis], k, guards)):
            spans.append(axis)
            continue
        size = example_shape((shape[axis],))[0] if axis < len(shape) else "?"
        extra = f", dilation {p.dilation[i]}" if p.dilation[i] != 1 else ""
        return (f"kernel size {k} on axis {axis} mixes neighbouring positions (it neither is 1 "
                f"nor spans the whole axis of size {size}{extra})")
    p.guards = guards
    return spans


def _from_input(ctx: Context, node: Any) -> bool:
    """``node`` is computed from a user input (not only from parameters and constants)."""
    users = set(ctx.captured.user_inputs)
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" and n.name in users:
            return True
        stack.extend(n.all_input_nodes)
    return False


def computed(ctx: Context, node: Any, what: str) -> str:
    """The reason a kernel or bias that is not a parameter (or a view of one) is left alone."""
    if node is None or ctx.state_source(node):
        return ""
    if _from_input(ctx, node):
        return f"the {what} is computed from the input, not a parameter"
    op = op_label(node).split(" (")[0]
    return (f"the {what} is computed in forward ({op}), not a parameter or buffer or a view of "
            "one: not rewritten")


def _check(node: fx.Node, p: ConvParams, ctx: Context) -> str:
    return first_failure(
        lambda: "" if not p.transposed else "a transposed convolution (see the conv_transpose family)",
        lambda: computed(ctx, p.w, "kernel"),
        lambda: computed(ctx, p.b, "bias"),
        lambda: "" if p.groups == 1 else (f"a grouped convolution (groups={p.groups}) is "
                                          "block-diagonal, not dense"),
        lambda: "" if p.in_shape is not None and len(p.in_shape) - p.c == len(p.kernel) + 1 else
        "the input's rank does not match the kernel's",
        lambda: _reason(spanned_axes(p, ctx)),
    )


def _reason(axes: list[int] | str) -> str:
    return axes if isinstance(axes, str) else ""


def _val_shape(n: Any) -> Any:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return None if v is None else v.shape


def absorb_views(rw: Any, out: fx.Node, z: fx.Node) -> None:
    """``out`` only adds size-1 axes to ``z``: a view of ``out`` (squeeze, flatten, view) that
    has ``z``'s shape holds ``z``'s values in ``z``'s order, so it reads ``z`` instead."""
    for u in list(out.users):
        if (u.op == "call_function" and u.target in _ORDER_VIEWS and u.args[0] is out
                and not any(in_place(v) for v in u.users)
                and same_shape(_val_shape(u), _val_shape(z))):
            rw.replace(u, z)


def _permutation(n: fx.Node, rank: int) -> list[int] | None:
    if n.target == aten.transpose.int:
        a, b = (int(d) % rank for d in n.args[1:3])
        p = list(range(rank))
        p[a], p[b] = p[b], p[a]
        return p
    if n.target == aten.permute.default:
        return [int(d) % rank for d in n.args[1]]
    return None


def absorb_inverse(rw: Any, z: fx.Node, y: fx.Node, perm: list[int]) -> None:
    """``z = y.permute(perm)``: a permute of ``z`` that undoes ``perm`` reads ``y``."""
    for u in list(z.users):
        q = _permutation(u, len(perm)) if u.args and u.args[0] is z else None
        if q is not None and all(perm[q[j]] == j for j in range(len(perm))):
            rw.replace(u, y)


def _mirror(rank: int, c: int, axes: list[int], drop_channel: bool) -> str | None:
    """The kernel that is the conv's own computation: ``conv`` for a pointwise conv,
    ``conv_span`` for a one-channel ``conv2d`` spanning the height axis (the spectrogram stem,
    ``Conv2d(1, O, (F, 1))`` on ``(B, 1, F, T)``); None for other spanning convs."""
    if not axes and not drop_channel:
        return "conv"
    if drop_channel and rank == 4 and c == 1 and axes == [2]:
        return "conv_span"
    return None


def _emit(node_name: str, axes: list[int], rank: int, c: int, drop_channel: bool):  # noqa: ANN202
    """The features are the channel axis and the spanned axes (just the spanned axes when a
    single input channel is squeezed away): one of them stays where it is, several are merged
    (in the kernel's order) at the channel axis.  The output channels go back to the channel
    axis; the spanned axes come back as size-1 axes."""

    def emit(rw: Any) -> None:
        node = rw[node_name]
        x, w, b = node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else None
        out_ch = int(w.meta["val"].shape[0])
        feats, n = [c, *axes], rank
        if drop_channel:
            x = rw.call(aten.squeeze.dim, (x, c), before=node)
            feats, n = [a - 1 for a in axes], rank - 1
        if len(feats) == 1:
            fd = feats[0]
        else:
            others = [d for d in range(n) if d not in feats]
            order = others[:c] + feats + others[c:]
            if order != list(range(n)):
                x = rw.call(aten.permute.default, (x, order), before=node)
            x = rw.call(aten.flatten.using_ints, (x, c, c + len(feats) - 1), before=node)
            fd, n = c, n - len(feats) + 1
        v = x.meta.get("val")
        # a pointwise conv keeps its own kernel (a mirror); a spanning one gets the heuristic's
        size = (w.meta["val"].numel() // out_ch, out_ch)  # (F, O) of the dense map
        impl = ops.choose_kernel(fd, n, getattr(v, "device", "cpu"), prefer=_mirror(rank, c, axes,
                                 drop_channel), dtype=getattr(v, "dtype", None), size=size)
        if impl == "conv" and fd == 1 and n == rank:  # the conv's own weight, as it is
            wv = w
        else:  # the kernel's size-1 axes never change its row-major order: (O, C, *K) -> (O, C·F)
            wv = rw.call(aten.reshape.default, (w, [out_ch, -1]), before=node)
        y = rw.tdd(x, wv, b, feature_dim=fd, site=node_name, before=node, like=node, impl=impl)
        z = y
        perm: list[int] = []
        if fd != c:  # the output channels go back to the conv's channel axis
            perm = [*range(c), fd, *(d for d in range(c, n) if d != fd)]
            z = rw.call(aten.permute.default, (y, perm), before=node, like=node)
        out = z
        for axis in axes:
            out = rw.call(aten.unsqueeze.default, (out, axis), before=node, like=node)
        rw.replace(node, out)
        if out is not z:
            absorb_views(rw, out, z)
        if perm:
            absorb_inverse(rw, z, y, perm)

    return emit


class ConvFamily:
    """Pointwise and axis-spanning convolutions (see the module docstring)."""

    pattern = PATTERN
    #: standard layers worth capturing alone when their parent cannot be captured
    layers = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def find(self, ctx: Context) -> list[Match]:
        out: list[Match] = []
        for node in ctx.unclaimed(CONVS):
            p = ConvParams(node, ctx)
            if not _near(p, ctx):
                continue
            reason = _check(node, p, ctx)
            if reason:
                out.append(rejected(ctx, PATTERN, node, p.x, node, reason, [node]))
                continue
            axes = spanned_axes(p, ctx)
            assert isinstance(axes, list)
            rank = len(p.in_shape or ())
            if axes and rank - p.c - 1 == len(axes):  # nothing left to distribute over
                out.append(rejected(ctx, PATTERN, node, p.x, node, "the kernel spans every axis: "
                                    "one dense layer over the whole input, not per position",
                                    [node]))
                continue
            drop = bool(axes) and same_shape((p.in_shape or ())[p.c:p.c + 1], (1,))
            site = ctx.site(PATTERN, "found", node, p.x, node, fd=p.c, kernel="conv")
            out.append(Match(PATTERN, [site], [node.name], guards=dict(p.guards),
                             emit=_emit(node.name, axes, rank, p.c, drop)))
        return out


def _near(p: ConvParams, ctx: Context) -> bool:
    """Worth reporting: a pointwise kernel, one axis of the kernel > 1 with the others 1 (a
    candidate for spanning), a grouped conv, or a kernel whose every axis > 1 spans its input
    axis whole."""
    if p.transposed or not p.kernel:
        return False
    big = [k for k in p.kernel if k != 1]
    return len(big) <= 1 or p.groups > 1 or isinstance(spanned_axes(p, ctx), list)
