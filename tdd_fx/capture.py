"""Capture: a torch.fx graph of the model that keeps *everything* the model had.

Standard layers (everything under ``torch.nn``) stay ``call_module`` nodes; user modules are traced
through.  Each node records the user's source line.  Unlike ``symbolic_trace``, the resulting
``GraphModule`` holds the full module tree of the original — unused submodules, parameters and
buffers included, in the original order — so ``state_dict()`` keys are unchanged.  The tree is a
structural copy: new module objects (own ``training`` flags, own hook dicts) sharing the original
``Parameter`` and buffer tensors, so the original is never mutated and optimizers see the same
tensors.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import re
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from . import ops
from ._state import preserved

_TORCH_DIR = os.path.dirname(torch.__file__)
_PKG_DIR = os.path.dirname(__file__)
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')

_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


#: node meta a rewrite carries from the replaced node to its replacement (where it came from)
META_KEYS = ("stack_trace", "nn_module_stack", "tdd_source")


class CaptureError(RuntimeError):
    """The model could not be traced; the message names the user's source line."""


def copy_module_tree(model: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """New module objects with the same structure, sharing Parameters and buffers.

    A module that appears twice in the tree (tied layers) is copied once, so identity is kept.
    """
    memo = {} if memo is None else memo
    if id(model) in memo:
        return memo[id(model)]
    new = object.__new__(type(model))  # not copy.copy: parametrized modules refuse __getstate__
    new.__dict__ = dict(model.__dict__)
    memo[id(model)] = new
    new._parameters = type(model._parameters)(model._parameters)
    new._buffers = type(model._buffers)(model._buffers)
    new._non_persistent_buffers_set = set(model._non_persistent_buffers_set)
    for name in _HOOK_DICTS:
        if hasattr(model, name):
            setattr(new, name, copy.copy(getattr(model, name)))
    new._modules = type(model._modules)(
        (k, None if v is None else copy_module_tree(v, memo)) for k, v in model._modules.items()
    )
    return new


class TddTracer(fx.Tracer):
    """``fx.Tracer`` that records stack traces; ``torch.nn`` layers are leaves, user code is not."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = False  # a full traceback per node is slow; we keep one line

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["tdd_source"] = caller_location()
        return node

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if any(getattr(m, name, None) for name in _HOOK_DICTS[:7]) and module_qualified_name:
            return True  # tracing through would drop its hooks: keep it a call
        if isinstance(m, ops.TimeDistributed):
            return False
        return super().is_leaf_module(m, module_qualified_name)


try:  # lets the tracer run real modules while tracing (torch >= 2.1)
    from torch.fx._symbolic_trace import _maybe_revert_all_patches as _unpatched
except ImportError:  # pragma: no cover
    _unpatched = contextlib.nullcontext  # type: ignore[assignment]


class _MetaProxy(fx.Proxy):
    """A proxy that knows its value on the example inputs, so Python can look at shapes.

    ``len()``, ``int()``/``range()``, iteration and ``bool()`` resolve concretely; each time that
    happens the tracer records a *fact* (node, kind, value) that later becomes a guard.
    """

    def __len__(self) -> int:
        return self.tracer.concrete_len(self)  # type: ignore[attr-defined]

    def __index__(self) -> int:
        return self.tracer.concrete_int(self)  # type: ignore[attr-defined]

    __int__ = __index__

    def __getattr__(self, k: str) -> _MetaAttribute:
        return _MetaAttribute(self, k)

    @classmethod
    def __torch_function__(cls, orig_method: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        # torch's argument parser probes int-list arguments with __index__ before dispatching
        # here with the proxies themselves: those probes decided nothing, so they are not facts.
        kwargs = kwargs or {}
        flat, _ = torch.utils._pytree.tree_flatten((args, kwargs))
        proxies = [a for a in flat if isinstance(a, fx.Proxy)]
        if proxies:
            facts = getattr(proxies[0].tracer, "facts", None)
            nodes = {p.node for p in proxies}
            while facts and facts[-1].kind == "int" and facts[-1].node in nodes:
                facts.pop()
        return super().__torch_function__(orig_method, types, args, kwargs)


class _MetaAttribute(_MetaProxy, fx.proxy.Attribute):
    pass


@dataclass
class Fact:
    """Something Python decided from a traced value: the trace is only valid while it holds."""

    node: fx.Node
    kind: str  # "len" | "bool" | "int"
    value: Any
    where: str


class ShapeAwareTracer(TddTracer):
    """Traces while running the model on example inputs; see :class:`_MetaProxy`."""

    def __init__(self, inputs: tuple[Any, ...]) -> None:
        super().__init__()
        self.inputs = list(inputs)
        self.values: dict[fx.Node, Any] = {}
        self.facts: list[Fact] = []
        self._placeholders = 0

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _MetaProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, name: str | None = None,
                     type_expr: Any = None, proxy_factory_fn: Any = None) -> fx.Proxy:
        p = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if kind == "placeholder":
            i = self._placeholders
            self._placeholders += 1
            if str(target).startswith("*") and not str(target).startswith("**"):
                value = tuple(self.inputs[i:])  # forward(self, *xs): all the rest
                self._placeholders = len(self.inputs)
            else:
                value = self.inputs[i] if i < len(self.inputs) else (args[0] if args else None)
        else:
            value = self._evaluate(kind, target, args, kwargs)
        self.values[p.node] = value
        return p

    def value(self, a: Any) -> Any:
        return torch.utils._pytree.tree_map(
            lambda v: self.values[v.node] if isinstance(v, fx.Proxy) else v, a)

    def _evaluate(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        a, k = self.value(tuple(args)), self.value(dict(kwargs))
        if kind == "call_method" or (
                kind == "call_function" and (target is getattr
                                             or getattr(target, "__module__", "") == "_operator")):
            return self._run(kind, target, a, k)  # no patched code on these paths: skip the
            # (costly) unpatch/repatch of the tracer's class attributes
        with _unpatched():  # a layer's forward: real code, not the tracer's Module.__call__
            return self._run(kind, target, a, k)

    def _run(self, kind: str, target: Any, a: Any, k: Any) -> Any:
        if kind == "call_function":
            return target(*a, **k)
        if kind == "call_method":
            return getattr(a[0], target)(*a[1:], **k)
        if kind == "call_module":
            return self.root.get_submodule(target)(*a, **k)
        if kind == "get_attr":
            obj: Any = self.root
            for part in str(target).split("."):
                obj = getattr(obj, part)
            return obj
        return None

    def _fact(self, p: fx.Proxy, kind: str, value: Any) -> None:
        self.facts.append(Fact(p.node, kind, value, caller_location() or node_location(p.node)))

    def concrete_len(self, p: fx.Proxy) -> int:
        v = self.values[p.node]
        n = v.shape[0] if isinstance(v, torch.Tensor) else len(v)
        self._fact(p, "len", n)
        return n

    def concrete_int(self, p: fx.Proxy) -> int:
        v = self.values[p.node]
        self._fact(p, "int", int(v))
        return int(v)

    def to_bool(self, obj: fx.Proxy) -> bool:
        v = bool(self.values[obj.node])
        self._fact(obj, "bool", v)
        return v

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        n = self.concrete_len(obj)
        return iter([obj[i] for i in range(n)])


def caller_location() -> str:
    """``file.py:LINE`` of the innermost frame of user code on the current stack."""
    f = sys._getframe(1)
    while f is not None:
        name = f.f_code.co_filename
        if not (name.startswith(_TORCH_DIR) or name.startswith(_PKG_DIR) or name.startswith("<")):
            return f"{_short_path(name)}:{f.f_lineno}"
        f = f.f_back  # type: ignore[assignment]
    return ""


def user_location(text: str | None) -> str:
    """``file.py:LINE`` of the innermost frame of user code in a stack trace text."""
    if not text:
        return ""
    found = ""
    for path, line in _FRAME.findall(text):
        if path.startswith(_TORCH_DIR) or path.startswith(_PKG_DIR) or path.startswith("<"):
            continue
        found = f"{_short_path(path)}:{line}"
    return found


@functools.lru_cache(maxsize=1024)
def _short_path(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        rel = path
    if rel.startswith(".."):
        parts = path.replace("\\", "/").split("/")
        rel = "/".join(parts[-2:])
    return rel


def node_location(node: fx.Node) -> str:
    return node.meta.get("tdd_source") or user_location(node.meta.get("stack_trace"))


def node_module_path(node: fx.Node) -> str:
    """The module the node was recorded in (the call_module target itself for layers)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, _ = list(stack.values())[-1]
        return str(path)
    return ""


def _none_defaults_beyond(root: nn.Module, n: int) -> dict[str, Any]:
    """Parameters after the example inputs with a ``None``/bool/number/str default: the trace
    binds them to it (as the example run did), so ``if mask is not None:`` or ``if inference:``
    take the branch the example took; a guard checks the value on each call."""
    import inspect

    try:
        params = list(inspect.signature(root.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return {}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    rest = positional[n:] + [p for p in params if p.kind == p.KEYWORD_ONLY]
    return {p.name: p.default for p in rest
            if p.default is None or type(p.default) in (bool, int, float, str)}


def _guard_nones(graph: fx.Graph, bound: dict[str, Any]) -> None:
    """fx names such placeholders ``mask_1`` and checks them with an assert; keep the user's
    argument name (keyword calls) and make the check one of our guards (so the optimized module
    falls back to the original when a mask is passed)."""
    checked = set()
    for node in list(graph.nodes):
        if node.op == "call_function" and getattr(node.target, "__name__", "") == \
                "_assert_is_none":
            arg = node.args[0]
            name = str(arg.target)[:-2] if isinstance(arg, fx.Node) else str(arg)
            node.target, node.args = ops.check_none, (arg, name, None)
            checked.add(name)
    for node in list(graph.nodes):
        if node.op == "placeholder" and str(node.target).endswith("_1") and \
                str(node.target)[:-2] in bound:
            original = str(node.target)[:-2]
            node.target = original
            node._rename(original)
            if original not in checked:  # fx checks only None: the other values, we do
                with graph.inserting_after(node):
                    graph.call_function(ops.check_none, (node, original, bound[original]))


@dataclass
class Captured:
    gm: fx.GraphModule
    facts: list[Fact] = field(default_factory=list)


def capture(model: nn.Module, example_inputs: tuple[Any, ...] | None = None) -> Captured:
    """Trace ``model`` into a GraphModule that keeps its whole module tree (see module doc).

    With example inputs the trace is shape-aware: Python control flow on shapes resolves on the
    example, and each decision is returned as a :class:`Fact`.
    """
    root = copy_module_tree(model)
    tracer = TddTracer() if example_inputs is None else ShapeAwareTracer(example_inputs)
    nones = _none_defaults_beyond(root, len(example_inputs)) if example_inputs is not None else {}
    try:
        with preserved([root]), torch.no_grad():
            graph = tracer.trace(root, concrete_args=nones or None)
    except Exception as exc:  # fx raises many types; all mean "cannot trace this code"
        where = user_location("".join(traceback.format_tb(exc.__traceback__)))
        raise CaptureError(
            f"cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}"
            + (f" (at {where})" if where else "")
        ) from exc
    if nones:
        _guard_nones(graph, nones)
    for node in graph.nodes:  # `from __future__ import annotations` leaves str types, which
        if isinstance(node.type, str):  # the generated code cannot pickle (pytorch#167117)
            node.type = None
    graph._tracer_cls = TddTracer  # what torch.load re-traces with: needs a no-argument tracer
    gm = fx.GraphModule(root, graph, class_name=type(model).__name__)
    graft_tree(gm, root)
    return Captured(gm, getattr(tracer, "facts", []))


def graft_tree(gm: fx.GraphModule, root: nn.Module) -> None:
    """Make ``gm`` hold exactly ``root``'s children, parameters and buffers, in order."""
    gm._modules = type(root._modules)(root._modules)
    gm._parameters = type(root._parameters)(root._parameters)
    gm._buffers = type(root._buffers)(root._buffers)
    gm._non_persistent_buffers_set = set(root._non_persistent_buffers_set)
    gm.training = root.training
    for name in _HOOK_DICTS:  # the root's own hooks run around the graph, as around forward
        if hasattr(root, name):
            setattr(gm, name, copy.copy(getattr(root, name)))


def example_summary(inputs: tuple[Any, ...]) -> str:
    return ", ".join(
        f"{tuple(x.shape)}:{str(x.dtype).replace('torch.', '')}" if isinstance(x, torch.Tensor)
        else type(x).__name__
        for x in inputs
    )
