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

import copy
import os
import re
import traceback
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from . import ops

_TORCH_DIR = os.path.dirname(torch.__file__)
_PKG_DIR = os.path.dirname(__file__)
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')

_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


class CaptureError(RuntimeError):
    """The model could not be traced; the message names the user's source line."""


def copy_module_tree(model: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """New module objects with the same structure, sharing Parameters and buffers.

    A module that appears twice in the tree (tied layers) is copied once, so identity is kept.
    """
    memo = {} if memo is None else memo
    if id(model) in memo:
        return memo[id(model)]
    new = copy.copy(model)
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
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, ops.TimeDistributed):
            return False
        return super().is_leaf_module(m, module_qualified_name)


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
    return user_location(node.meta.get("stack_trace"))


def node_module_path(node: fx.Node) -> str:
    """The module the node was recorded in (the call_module target itself for layers)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, _ = list(stack.values())[-1]
        return str(path)
    return ""


def capture(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule that keeps its whole module tree (see module doc)."""
    root = copy_module_tree(model)
    tracer = TddTracer()
    try:
        graph = tracer.trace(root)
    except Exception as exc:  # fx raises many types; all mean "cannot trace this code"
        where = user_location("".join(traceback.format_tb(exc.__traceback__)))
        raise CaptureError(
            f"cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}"
            + (f" (at {where})" if where else "")
        ) from exc
    gm = fx.GraphModule(root, graph, class_name=type(model).__name__)
    graft_tree(gm, root)
    return gm


def graft_tree(gm: fx.GraphModule, root: nn.Module) -> None:
    """Make ``gm`` hold exactly ``root``'s children, parameters and buffers, in order."""
    gm._modules = type(root._modules)(root._modules)
    gm._parameters = type(root._parameters)(root._parameters)
    gm._buffers = type(root._buffers)(root._buffers)
    gm._non_persistent_buffers_set = set(root._non_persistent_buffers_set)
    gm.training = root.training


def example_summary(inputs: tuple[Any, ...]) -> str:
    return ", ".join(
        f"{tuple(x.shape)}:{str(x.dtype).replace('torch.', '')}" if isinstance(x, torch.Tensor)
        else type(x).__name__
        for x in inputs
    )
