"""``"conv"``: a convolution that only mixes features at each position.

Identity proved, for a ``ConvNd`` with weight ``W: (O, C, k_1..k_n)``, ``groups == 1``::

    conv(x) == time_distributed_dense(x, W.flatten(1), b, feature_dim=channels)

when every kernel axis is **neutral** — ``k = 1``, ``stride = 1``, ``padding = 0`` (dilation is
then irrelevant) — which is the pointwise ``Conv1d(C, O, 1)`` / ``Conv2d(C, O, 1)`` /
``Conv3d(C, O, 1)``.  The spectrogram form ``Conv2d(1, O, (F, 1))`` over ``(B, 1, F, T)`` has one
more kind of axis, **contracted**: the kernel spans the whole axis (``k`` equals the input size,
``padding = 0``, ``dilation = 1``, so the output size there is 1).  With ``C == 1`` and one
contracted axis::

    conv(x) == tdd(x.squeeze(1), W.flatten(1), b, feature_dim=axis).movedim(axis, 1).unsqueeze(axis)

whose ``unsqueeze``/``movedim`` the peephole then cancels against the user's ``squeeze``/
``permute``.  Anything else — a kernel of 3 along time, time stride 2, time padding, grouped or
depthwise convs (block-diagonal dense) — is rejected with the reason.  A contracted axis needs the
input size, so it is proved with example inputs (and the size becomes a guard); pointwise convs are
proved from module attributes alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..capture import META_KEYS
from ..report import Site
from ..shapes import Sym
from .base import Candidate, Context
from .roles import _hooks

PATTERN = "conv"

MODULES: dict[type[nn.Module], int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
FUNCTIONS: dict[Any, int] = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
AXIS = {1: ["time"], 2: ["height", "width"], 3: ["depth", "height", "width"]}


@dataclass
class ConvSpec:
    """Everything the proof reads, from a module or a functional call."""

    nd: int
    weight_shape: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    has_bias: bool
    blocked: str = ""


def _tuple(v: Any, nd: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * nd


def _spec(node: fx.Node, ctx: Context) -> ConvSpec | None:
    if node.op == "call_module":
        m = ctx.module(node)
        base = type(m)
        if getattr(base, "__module__", "") == "torch.nn.utils.parametrize":
            base = base.__bases__[0]
        nd = next((d for cls, d in MODULES.items() if isinstance(m, cls)), None)
        if nd is None:
            return None
        blocked = ""
        if base not in MODULES:
            blocked = f"{type(m).__name__} is a subclass of a conv layer whose forward may differ"
        elif _hooks(m):
            blocked = "the layer has forward hooks, which a rewrite would bypass"
        return ConvSpec(nd, tuple(m.weight.shape), _tuple(m.stride, nd),
                        m.padding if isinstance(m.padding, str) else _tuple(m.padding, nd),
                        _tuple(m.dilation, nd), m.groups, m.bias is not None, blocked)
    if node.op == "call_function" and node.target in FUNCTIONS:
        nd = FUNCTIONS[node.target]
        names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
        defaults: dict[str, Any] = {"bias": None, "stride": 1, "padding": 0, "dilation": 1,
                                    "groups": 1}
        a = dict(zip(names, node.args)) | dict(node.kwargs)
        a = defaults | a
        w = ctx.shapes.tensor(a["weight"]) if ctx.shapes else None
        if w is None or not _is_constant(a["weight"]):
            return None
        pad = a["padding"]
        return ConvSpec(nd, tuple(w.shape), _tuple(a["stride"], nd),
                        pad if isinstance(pad, str) else _tuple(pad, nd), _tuple(a["dilation"], nd),
                        int(a["groups"]), a["bias"] is not None)
    return None


def _is_constant(n: Any) -> bool:
    return isinstance(n, fx.Node) and n.op == "get_attr"


def _site(node: fx.Node, ctx: Context, status: str, reason: str, fd: int | None = None,
          kernel: str = "") -> Site:
    return ctx.site(PATTERN, status, node, node.args[0], node, reason, fd, kernel)


def prove(node: fx.Node, spec: ConvSpec, ctx: Context) -> Candidate:
    def reject(reason: str) -> Candidate:
        return Candidate(PATTERN, [_site(node, ctx, "rejected", reason)], reason=reason,
                         nodes=[node.name])

    if spec.blocked:
        return reject(spec.blocked)
    nd = spec.nd
    o, c, *k = spec.weight_shape
    if spec.groups != 1:
        what = "depthwise" if spec.groups == c * spec.groups and c == 1 else "grouped"
        return reject(f"{what} conv (groups={spec.groups}): block-diagonal dense, not rewritten")
    if isinstance(spec.padding, str):  # "valid": none; "same": only where the kernel is > 1
        padding: tuple[int, ...] = tuple(0 if spec.padding == "valid" or v == 1 else -1 for v in k)
    else:
        padding = spec.padding
    x_shape = ctx.shape(node.args[0])
    if x_shape is not None and len(x_shape) not in (nd + 1, nd + 2):
        return reject(f"input of rank {len(x_shape)}")
    guards: list = ctx.assumption_guards([node.args[0]])
    contracted: list[int] = []
    for i in range(nd):
        name = f"dim {i - nd} ({AXIS[nd][i]})" if nd > 1 else "time"
        if k[i] == 1:
            if spec.stride[i] != 1:
                return reject(f"stride {spec.stride[i]} along {name}: subsamples the steps, "
                              "not time-distributed")
            if padding[i] != 0:
                return reject(f"padding along {name}: adds steps that see only zeros, "
                              "not time-distributed")
            continue
        size: Sym | None = x_shape[len(x_shape) - nd + i] if x_shape is not None else None
        spans = (size is not None and padding[i] == 0 and spec.dilation[i] == 1
                 and ctx.same_size(size, Sym.lit(k[i]), guards))
        if not spans:
            if size is None:
                return reject(f"kernel {k[i]} along {name}: needs example inputs to prove it "
                              "spans the whole axis")
            return reject(f"kernel {k[i]} along {name} mixes neighbouring steps: a real "
                          "convolution, not time-distributed")
        contracted.append(i)
    if contracted and c != 1:
        return reject(f"contracts the {c} channels and a spatial axis together: not rewritten "
                      "(only Conv(1, O, full-span kernel) or pointwise convs are)")
    if len(contracted) > 1:
        return reject("the kernel spans several axes: a dense layer over them, not rewritten")
    rank = len(x_shape) if x_shape is not None else nd + 2
    if contracted:
        axis = contracted[0] - nd  # negative index of the contracted axis
        fd = axis
        kernel = ops.choose_kernel(fd, rank - 1, ctx.device, dtype=ctx.dtype(node.args[0]))
    else:  # pointwise: the conv kernel *is* the original computation — never slower
        axis = None
        fd = -(nd + 1)
        kernel = ops.choose_kernel(fd, rank, ctx.device, prefer="conv",
                                   dtype=ctx.dtype(node.args[0]))
    fd_shown = fd % (rank - (1 if contracted else 0))
    site = _site(node, ctx, "found", "", fd_shown, kernel)
    site.guards = [str(g) for g in guards]

    def rewrite(gm: fx.GraphModule) -> fx.Node:
        return _emit(gm, node.name, spec, fd, axis, kernel)

    return Candidate(PATTERN, [site], rewrite=rewrite, guards=guards, nodes=[node.name],
                     output=node.name)


def _emit(gm: fx.GraphModule, name: str, spec: ConvSpec, fd: int, axis: int | None,
          kernel: str) -> fx.Node:
    from ..rewrite import node_named

    g = gm.graph
    node = node_named(gm, name)
    nd = spec.nd
    with g.inserting_before(node):
        if node.op == "call_module":
            w = g.get_attr(f"{node.target}.weight")
            b = g.get_attr(f"{node.target}.bias") if spec.has_bias else None
        else:
            a = dict(zip(["input", "weight", "bias"], node.args)) | dict(node.kwargs)
            w, b = a["weight"], a.get("bias")
        x = node.args[0]
        w2 = g.call_method("flatten", (w, 1))
        if axis is None:
            out = g.call_function(ops.time_distributed_dense, (x, w2, b),
                                  {"feature_dim": fd, "impl": kernel})
            out.meta["tdd_site"] = name
        else:
            x = g.call_method("squeeze", (x, -(nd + 1)))
            y = g.call_function(ops.time_distributed_dense, (x, w2, b),
                                {"feature_dim": fd, "impl": kernel})
            y.meta["tdd_site"] = name
            if axis != -nd:
                y = g.call_method("movedim", (y, axis, -nd))
            out = g.call_method("unsqueeze", (y, axis))
    for n in (w2, out):
        n.meta.update({k: v for k, v in node.meta.items() if k in META_KEYS})
    node.replace_all_uses_with(out)
    g.erase_node(node)
    return out


def _near(node: fx.Node, spec: ConvSpec, ctx: Context) -> bool:
    """Some kernel axis is 1 or spans its whole input axis (a candidate worth reporting)."""
    k = spec.weight_shape[2:]
    x = ctx.shape(node.args[0])
    sizes = [None] * spec.nd if x is None else [s.value for s in x[len(x) - spec.nd:]]
    return any(kv == 1 or kv == sv for kv, sv in zip(k, sizes))


def find(ctx: Context) -> list[Candidate]:
    out = []
    for node in ctx.gm.graph.nodes:
        spec = _spec(node, ctx)
        if spec is None or (spec.nd > 1 and not _near(node, spec, ctx)):
            continue  # a genuine spatial convolution: not a candidate at all
        out.append(prove(node, spec, ctx))
    return out

