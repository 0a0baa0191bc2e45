"""Capture: ``torch.export`` (non-strict) of the model, one graph per train/eval mode.

Non-strict export runs the user's real Python on fake tensors with symbolic sizes, so every
Python idiom works (decorated ``**kwargs`` forwards, ``len()`` of varargs, device checks, tensors
built from sizes, branches on ``self.training``).  Every dimension of every tensor input is
``Dim.AUTO``: export keeps it symbolic where the code allows and specializes it where the code
needs a fixed value (a feature axis matched against a weight, a Python loop's length).  What
comes back is the lifted ATen graph (parameters, buffers and tensor constants are its first
placeholders, named by their ``state_dict``-style targets), every node with ``meta["val"]`` (a
FakeTensor with SymInt sizes), ``nn_module_stack`` (module path) and ``stack_trace`` (the user's
line).
"""

from __future__ import annotations

import copy
import functools
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch import nn
from torch.export import Dim
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from ._state import preserved
from .inputs import Example

_TORCH_DIR = os.path.dirname(torch.__file__)
_PKG_DIR = os.path.dirname(__file__)
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
_WRAPPER = "m"  # the attribute the capture wrapper holds the model under

_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)

#: node meta a rewrite carries from the replaced node to its replacement (where it came from)
META_KEYS = ("stack_trace", "nn_module_stack")


class CaptureError(RuntimeError):
    """The model could not be captured; the message names the user's source line."""


@dataclass
class Captured:
    """The lifted graph of one mode and what is needed to call it."""

    training: bool
    gm: fx.GraphModule
    #: for each leading (state) placeholder: (kind, dotted target in the model); kind is
    #: "parameter", "buffer" or "constant"
    state: list[tuple[str, str]]
    #: tensor constants that are not attributes of the model (export made them)
    constants: dict[str, Any]
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    #: number of leading outputs that are new buffer values (mutations), with their targets
    mutated_buffers: list[str]
    range_constraints: dict[Any, Any]
    seconds: float
    #: names of the placeholders of user inputs, in flattened order
    user_inputs: list[str] = field(default_factory=list)
    #: symbolic sizes admitted down to 1 (export assumes >= 2; a batch-1 example was grown)
    size_one: set[Any] = field(default_factory=set)
    #: per user input, frozen at capture (later shape inference may refine the shape
    #: environment): ("tensor", (rank, dtype, device type), [size expression per axis]) or
    #: ("value", the constant, None)
    leaves: list[tuple[str, Any, Any]] = field(default_factory=list)
    #: per user input, its memory layout on the example (see :func:`layout`): export decides
    #: aliasing on it (``contiguous()`` is a no-op on contiguous data and is not recorded)
    layouts: list[Any] = field(default_factory=list)

    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "placeholder"]


class _Call(nn.Module):
    """``model(*args, **kwargs)`` as a module of two pytree arguments: export then never binds
    the user's signature (varargs, ``**kwargs`` and decorated forwards all work alike)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.m(*args, **kwargs)


def _dynamic(example: Example) -> tuple[Any, Any]:
    def spec(x: Any) -> Any:
        return {d: Dim.AUTO for d in range(x.dim())} if isinstance(x, torch.Tensor) else None

    return (pytree.tree_map(spec, example.args), pytree.tree_map(spec, example.kwargs))


def _strip(target: str) -> str:
    return target[len(_WRAPPER) + 1:] if target.startswith(_WRAPPER + ".") else target


def _batch_of_one(example: Example) -> tuple[Example, list[tuple[int, int]]]:
    """The example with a leading axis of size 1 grown to 2 (export would fix a size-1 axis at
    1, so a batch-1 example would capture a batch-1-only graph), and which (leaf, axis) grew."""
    grown: list[tuple[int, int]] = []
    leaves = example.leaves()
    for i, x in enumerate(leaves):
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == 1:
            grown.append((i, 0))
    if not grown:
        return example, []
    which = {i for i, _ in grown}
    flat, spec = pytree.tree_flatten((example.args, example.kwargs))
    flat = [torch.cat([x, x]) if i in which else x for i, x in enumerate(flat)]
    args, kwargs = pytree.tree_unflatten(flat, spec)
    return Example(tuple(args), dict(kwargs)), grown


def capture(model: nn.Module, example: Example, training: bool | None) -> Captured:
    """Export ``model`` in train (``training=True``) or eval mode, or with its flags as they are
    (``None``); the model is left as it was (buffers, flags, RNG).  Raises
    :class:`CaptureError` naming the cause and the user's line.

    A leading axis of size 1 in the example is captured at size 2 (so it stays symbolic) and
    admitted down to 1 at call time: verification runs the example itself, at size 1."""
    bumped, grown = _batch_of_one(example)
    if grown:
        try:
            cap = _capture(model, bumped, training)
        except CaptureError:
            cap = None
        if cap is not None:
            syms = [cap.leaves[i][2][d] for i, d in grown]
            if all(isinstance(s, sympy.Symbol) for s in syms):
                cap.size_one = set(syms)
                cap.layouts = [layout(x) for x in example.leaves()]
                return cap
    cap = _capture(model, example, training)
    cap.layouts = [layout(x) for x in example.leaves()]
    return cap


def layout(x: Any) -> Any:
    """A tensor's memory layout class: "contiguous", "channels_last", the order of its axes
    by decreasing stride when it is dense in that order, else ``("gaps", order)`` (a slice with
    a step, an expanded axis: what views and copies do differs from dense data in that order);
    None for a non-tensor."""
    if not isinstance(x, torch.Tensor):
        return None
    if x.is_contiguous():
        return "contiguous"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    order = tuple(sorted(range(x.dim()), key=lambda d: (-x.stride(d), d)))
    step = 1
    for d in reversed(order):
        if x.shape[d] != 1 and x.stride(d) != step:
            return ("gaps", order)
        step *= x.shape[d]
    return order


def hooked(model: nn.Module) -> str:
    """The path of a module whose Python hooks tdd_fx cannot keep ("" when none): a captured
    graph would compute what a hook returns but never run the hook itself (its side effects,
    its later removal), so such a module is left to run its own code."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return "(global module hooks)"
    if nn.modules.module._global_backward_hooks:
        return "(global module hooks)"
    for path, m in model.named_modules():
        if (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None)):
            return path or type(model).__name__
    return ""


def _capture(model: nn.Module, example: Example, training: bool | None) -> Captured:
    start = time.perf_counter()
    where = hooked(model)
    if where:
        raise CaptureError(f"{where} has Python hooks (forward/backward, pre or post): a graph "
                           "would not run them, so it keeps its own code")
    wrapper = _Call(model)
    ex = example.clone()
    try:
        with preserved([model]):
            if training is not None:
                model.train(training)
            training = model.training
            ep = torch.export.export(wrapper, (ex.args, ex.kwargs), dynamic_shapes=_dynamic(ex),
                                     strict=False)
    except Exception as exc:
        raise CaptureError(describe_failure(exc)) from exc
    sig = ep.graph_signature
    state: list[tuple[str, str]] = []
    user: list[str] = []
    kinds = {InputKind.PARAMETER: "parameter", InputKind.BUFFER: "buffer",
             InputKind.CONSTANT_TENSOR: "constant"}
    for spec in sig.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            user.append(spec.arg.name)
        elif spec.kind in kinds:
            state.append((kinds[spec.kind], _strip(spec.target)))
        else:
            raise CaptureError(f"the exported graph has an input of kind {spec.kind.name}, "
                               "which tdd_fx does not handle")
    mutated = []
    for spec in sig.output_specs:
        if spec.kind == OutputKind.BUFFER_MUTATION:
            mutated.append(_strip(spec.target))
        elif spec.kind != OutputKind.USER_OUTPUT:
            raise CaptureError(f"the exported graph has an output of kind {spec.kind.name} (the "
                               "model writes to one of its inputs or to a tensor it does not own); "
                               "tdd_fx leaves such models alone")
    gm = ep.graph_module
    _strip_module_stacks(gm)
    constants = {_strip(k): v for k, v in ep.constants.items()}
    cap = Captured(training, gm, state, constants, ep.call_spec.in_spec,
                   ep.call_spec.out_spec, mutated, dict(ep.range_constraints),
                   time.perf_counter() - start, user)
    cap.leaves = [_leaf_spec(n.meta.get("val")) for n in cap.placeholders()[len(state):]]
    return cap


def _size_expr(size: Any) -> Any:
    e = size.node.expr if isinstance(size, torch.SymInt) else int(size)
    return int(e) if isinstance(e, (int, sympy.Integer)) else e


def _leaf_spec(v: Any) -> tuple[str, Any, Any]:
    if isinstance(v, torch.Tensor):
        return ("tensor", (v.dim(), v.dtype, v.device.type), [_size_expr(s) for s in v.shape])
    return ("value", v, None)


def _strip_module_stacks(gm: fx.GraphModule) -> None:
    """Module paths as the user sees them (without the capture wrapper's ``m.`` prefix)."""
    for n in gm.graph.nodes:
        stack = n.meta.get("nn_module_stack")
        if not stack:
            continue
        fixed = {}
        for key, (path, cls) in stack.items():
            if path == "" or path == "L['self']":
                continue
            path = str(path)
            path = path[len(_WRAPPER) + 1:] if path.startswith(_WRAPPER + ".") else (
                "" if path == _WRAPPER else path)
            fixed[key] = (path, cls)
        n.meta["nn_module_stack"] = fixed


def describe_failure(exc: BaseException) -> str:
    """One readable line: what export could not do, and where in the user's code."""
    text = str(exc).strip()
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    if len(first) > 300:
        first = first[:297] + "..."
    where = ""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if not _is_library(frame.filename):
            where = f"{short_path(frame.filename)}:{frame.lineno}"
            break
    if not where:  # export errors quote the user's frame in their text
        where = user_location(text)
    kind = type(exc).__name__
    return f"torch.export could not capture it ({kind}: {first})" + (f" at {where}" if where else "")


def _is_library(path: str) -> bool:
    return path.startswith(_TORCH_DIR) or path.startswith(_PKG_DIR) or path.startswith("<")


def user_location(text: str | None) -> str:
    """``file.py:LINE`` of the innermost frame of user code in a stack trace text."""
    if not text:
        return ""
    found = ""
    for path, line in _FRAME.findall(text):
        if not _is_library(path):
            found = f"{short_path(path)}:{line}"
    return found


def from_tdd(node: fx.Node) -> bool:
    """The node was recorded inside tdd_fx's own code (an already-canonical node re-captured)."""
    text = (node.meta.get("stack_trace") or "").rstrip()
    last = text.rsplit("\n", 1)[-1]
    return "time_distributed_dense(" in last or os.path.join(_PKG_DIR, "ops.py") in text


@functools.lru_cache(maxsize=1024)
def short_path(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        rel = path
    if rel.startswith(".."):
        parts = path.replace("\\", "/").split("/")
        rel = "/".join(parts[-2:])
    return rel


def node_location(node: fx.Node) -> str:
    return user_location(node.meta.get("stack_trace"))


def node_module_path(node: fx.Node) -> str:
    """The innermost module the node was recorded in ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, _ = list(stack.values())[-1]
        return str(path)
    return ""


def copy_module_tree(model: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """New module objects with the same structure and attributes, sharing Parameters and buffers
    (the buffer table itself: a conversion of either tree reaches both).

    A module that appears twice in the tree (tied layers) is copied once, so identity is kept.
    """
    memo = {} if memo is None else memo
    if id(model) in memo:
        return memo[id(model)]
    new = object.__new__(type(model))  # not copy.copy: parametrized modules refuse __getstate__
    new.__dict__ = dict(model.__dict__)
    memo[id(model)] = new
    if hasattr(new.__dict__.get("forward"), "rebind"):  # an optimized module copied again
        new.__dict__["forward"] = new.__dict__["forward"].rebind(new)
    new._parameters = type(model._parameters)(model._parameters)
    # one buffer table for both: ``.double()``/``.to()`` convert parameters in place (shared
    # objects) and replace buffers in the table, so either tree converted converts both alike
    new._buffers = model._buffers
    new._non_persistent_buffers_set = model._non_persistent_buffers_set
    for name in _HOOK_DICTS:
        if hasattr(model, name):
            setattr(new, name, copy.copy(getattr(model, name)))
    new._modules = type(model._modules)(
        (k, None if v is None else copy_module_tree(v, memo)) for k, v in model._modules.items()
    )
    return new
