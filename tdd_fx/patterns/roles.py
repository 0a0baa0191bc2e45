"""The role each graph op can play inside a time-distributed region, declared as a table.

Roles:

``dense``        a dense map on the last axis (``nn.Linear``, ``F.linear``, the canonical node).
``reshape``      a view/reshape/flatten/unflatten/view_as/contiguous: moves no data between rows
                 *if* it keeps the last axis (the family checks that, with shapes).
``permute``      transpose/permute/movedim.
``pointwise``    acts on each element (or, like ``LayerNorm(F)``, on each last-axis row) the same
                 way whatever the tensor's rank: it commutes with any reshape that keeps the last
                 axis.
``lastaxis``     acts on each last-axis row the same way whatever the rank, but *names* the last
                 axis (``LayerNorm(F)``, ``+ b`` with a 1-D constant ``b``): fine on the last axis,
                 re-laid around a channel-first rewrite.
``featurewise``  acts on each last-axis row, but names its axis by index (``BatchNorm1d`` on a 2-D
                 input, ``Softmax(dim=1)``): it commutes with row reshapes only once its axis is
                 re-expressed, which the rewrite does.

An op with no role ends a region.  A recognised op that must not be rewritten (hooks, subclasses)
gets ``blocked`` — the reason reported to the user.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..shapes import POINTWISE_FUNCTIONS, POINTWISE_MODULES, SCALAR_ARITH
from .base import Context


@dataclass(frozen=True)
class Role:
    kind: str  # dense | reshape | permute | pointwise | featurewise
    data: int = 0  # index in node.args of the tensor that flows through the region
    blocked: str = ""


@dataclass(frozen=True)
class Rule:
    op: str
    targets: Any  # a set of names/functions, or a tuple of module classes
    kind: str
    check: Callable[[fx.Node, Context], str | None] | None = None  # None or "" = ok; "!x" = blocked x


def _rank(node: fx.Node, ctx: Context) -> int | None:
    arg = node.args[0] if node.args else None
    s = ctx.shape(arg)
    return None if s is None else len(s)


def _hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks)


def _linear_module(node: fx.Node, ctx: Context) -> str | None:
    m = ctx.module(node)
    base = type(m)
    if getattr(base, "__module__", "") == "torch.nn.utils.parametrize":
        base = base.__bases__[0]  # a parametrized Linear: the weight property is live
    if base not in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return f"!{type(m).__name__} is a subclass of nn.Linear whose forward may differ"
    if _hooks(m):
        return "!the layer has forward hooks, which a rewrite would bypass"
    return None


def _functional_linear(node: fx.Node, ctx: Context) -> str | None:
    return None


FREE_VIEWS = frozenset({"t", "transpose", "permute", "view", "reshape", "unsqueeze", "squeeze",
                        "expand", "contiguous", "detach", "to", "float"})


def constant_base(n: object) -> fx.Node | None:
    """The ``get_attr`` (parameter, buffer, constant) ``n`` is a free view of, or None."""
    while isinstance(n, fx.Node):
        if n.op == "get_attr":
            return n
        view = n.op == "call_method" and n.target in FREE_VIEWS
        attr = n.op == "call_function" and n.target is getattr and n.args[1] in ("T", "mT")
        if view or attr:
            n = n.args[0]
        else:
            return None
    return None


def _rank_of(n: object, ctx: Context) -> int | None:
    s = ctx.shape(n)
    return None if s is None else len(s)


def _hand_dense(node: fx.Node, ctx: Context) -> str | None:
    """``x @ W`` / ``mm(x, W)`` / ``addmm(b, x, W)``: a dense layer when ``W`` is a 2-D constant
    (parameter/buffer or a free view of one) and, for addmm, ``b`` is a 1-D constant."""
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return "no"
    addmm = node.target is torch.addmm
    w = node.args[2] if addmm else (node.args[1] if len(node.args) > 1 else None)
    if constant_base(w) is None or _rank_of(w, ctx) != 2:
        return "no"
    if addmm:
        if constant_base(node.args[0]) is None or _rank_of(node.args[0], ctx) != 1:
            return "no"
        if _rank_of(node.args[1], ctx) != 2:
            return "no"
    elif _rank_of(node.args[0], ctx) in (None, 1):
        return "no"
    return None


def _canonical_last(node: fx.Node, ctx: Context) -> str | None:
    fd = node.kwargs.get("feature_dim", -1)
    r = _rank(node, ctx)
    return None if fd == -1 or (r is not None and fd == r - 1) else "no"


def _plain_module(node: fx.Node, ctx: Context) -> str | None:
    m = ctx.module(node)
    if _hooks(m):
        return "!a layer inside has forward hooks, which a rewrite would bypass"
    if isinstance(m, nn.PReLU) and m.num_parameters != 1:
        return "no"  # per-channel on axis 1
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) != 1:
        return "no"
    return None


def _featurewise_module(node: fx.Node, ctx: Context) -> str | None:
    m = ctx.module(node)
    if _hooks(m):
        return "!a layer inside has forward hooks, which a rewrite would bypass"
    r = _rank(node, ctx)
    if r is None:
        return "no"
    if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
        return None if m.dim is not None and m.dim % r == r - 1 else "no"
    # BatchNorm1d / GroupNorm normalise axis 1: a last-axis op only on 2-D inputs
    return None if r == 2 else "no"


def _layer_norm_fn(node: fx.Node, ctx: Context) -> str | None:
    shape = node.kwargs.get("normalized_shape", node.args[1] if len(node.args) > 1 else None)
    return None if isinstance(shape, (tuple, list)) and len(shape) == 1 else "no"


def _softmax_fn(node: fx.Node, ctx: Context) -> str | None:
    r = _rank(node, ctx)
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return None if r is not None and isinstance(dim, int) and dim % r == r - 1 else "no"


def _vector_arith(node: fx.Node, ctx: Context) -> str | None:
    """``h + b`` / ``h * g`` with a 1-D constant: a per-feature map on the last axis."""
    if len(node.args) != 2 or node.kwargs:
        return "no"
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return "no"
    if constant_base(a) is not None and node.target in (operator.add, operator.mul):
        a, b = b, a  # b + h, g * h
    if constant_base(b) is None or constant_base(a) is not None or _rank_of(b, ctx) != 1 \
            or _rank_of(a, ctx) in (None, 0):
        return "no"
    sa, sb = ctx.shape(a), ctx.shape(b)
    return None if sa and sb and sa[-1] == sb[0] else "no"


def _scalar_arith(node: fx.Node, ctx: Context) -> str | None:
    others = [a for a in node.args[1:]]
    if len(node.args) != 2 or not isinstance(node.args[0], fx.Node):
        return "no"
    return None if all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in others) else "no"


RESHAPE_METHODS = frozenset({"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as",
                             "contiguous"})
PERMUTE_METHODS = frozenset({"transpose", "swapaxes", "permute", "movedim", "t"})
POINTWISE_METHODS = frozenset({"relu", "tanh", "sigmoid", "clone"})

#: The table.  First matching rule wins.
RULES: tuple[Rule, ...] = (
    Rule("call_method", RESHAPE_METHODS, "reshape"),
    Rule("call_function", {torch.reshape, torch.flatten}, "reshape"),
    Rule("call_method", PERMUTE_METHODS, "permute"),
    Rule("call_function", {torch.transpose, torch.permute, torch.movedim}, "permute"),
    Rule("call_module", (nn.Linear,), "dense", _linear_module),
    Rule("call_function", {F.linear, torch._C._nn.linear}, "dense", _functional_linear),
    Rule("call_function", {ops.time_distributed_dense}, "dense", _canonical_last),
    Rule("call_function", {torch.addmm}, "dense", _hand_dense),
    Rule("call_function", {torch.mm, torch.matmul, operator.matmul}, "dense",
         _hand_dense),
    Rule("call_method", {"mm", "matmul"}, "dense", _hand_dense),
    Rule("call_module", (nn.LayerNorm,), "lastaxis", _plain_module),
    Rule("call_module", POINTWISE_MODULES + (nn.PReLU,), "pointwise", _plain_module),
    Rule("call_module", (nn.BatchNorm1d, nn.GroupNorm, nn.Softmax, nn.LogSoftmax), "featurewise",
         _featurewise_module),
    Rule("call_function", POINTWISE_FUNCTIONS, "pointwise"),
    Rule("call_function", {F.softmax, F.log_softmax}, "featurewise", _softmax_fn),
    Rule("call_function", SCALAR_ARITH, "pointwise", _scalar_arith),
    Rule("call_function", SCALAR_ARITH, "lastaxis", _vector_arith),
    Rule("call_function", {F.layer_norm}, "lastaxis", _layer_norm_fn),
    Rule("call_method", POINTWISE_METHODS, "pointwise"),
)

def classify(node: fx.Node, ctx: Context) -> Role | None:
    """The role of ``node`` (None: ends a region)."""
    if not node.args or not any(isinstance(a, fx.Node) for a in node.args[:2]):
        return None
    for rule in RULES:
        if rule.op != node.op:
            continue
        if node.op == "call_module":
            if not isinstance(ctx.module(node), rule.targets):
                continue
        elif node.target not in rule.targets:
            continue
        verdict = rule.check(node, ctx) if rule.check else None
        if verdict and verdict.startswith("!"):
            return Role(rule.kind, blocked=verdict[1:])
        if verdict:
            continue  # this rule does not apply; a later one may
        if node.op == "call_function" and node.target is torch.addmm:
            return Role(rule.kind, data=1)
        if rule.kind == "lastaxis" and node.target in SCALAR_ARITH and \
                constant_base(node.args[0]) is not None:
            return Role(rule.kind, data=1)
        return Role(rule.kind)
    return None


METADATA_METHODS = frozenset({"size", "dim"})


def is_metadata(node: fx.Node) -> bool:
    """Nodes that read a tensor's shape, not its data."""
    return (node.op == "call_method" and node.target in METADATA_METHODS) or (
        node.op == "call_function" and node.target is getattr and node.args[1:2] == ("shape",)
    )


def data_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not is_metadata(u)]
