"""When a guard fails at call time, run the original module instead (and warn once).

The optimized graph checks its guards at entry (:func:`tdd_fx.ops.check_input`), before anything
else runs, so nothing has been computed when :class:`~tdd_fx.ops.GuardError` is raised.  The
fallback is a structural copy of the original module tree sharing its parameters and buffers; it
is kept outside the module (so ``state_dict()``/``parameters()`` are unchanged), and its
``training`` flags are synchronised from the optimized module before each fallback call, so
``opt.train()``/``opt.eval()`` apply to it too.

A deep copy or a ``torch.save``/``torch.load`` round trip keeps the guards but not this wrapper:
such a copy raises ``GuardError`` instead of falling back.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from typing import Any

import torch.fx as fx
from torch import nn

from .capture import copy_module_tree
from .ops import GuardError

#: optimized module -> its fallback.  Kept outside the module: it must not be pickled, copied or
#: seen by ``state_dict()``/``named_modules()``.
_FALLBACKS: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def _sync_modes(src: nn.Module, dst: nn.Module) -> None:
    targets = dict(dst.named_modules(remove_duplicate=False))
    for name, m in src.named_modules(remove_duplicate=False):
        other = targets.get(name)
        if other is not None:
            other.training = m.training


def install(gm: fx.GraphModule, original: nn.Module) -> None:
    """Make ``gm`` run a copy of ``original`` whenever one of its guards fails."""
    _FALLBACKS[gm] = copy_module_tree(original)
    _wrap(type(gm))


def _wrap(cls: type[fx.GraphModule]) -> None:
    generated = cls.forward
    if getattr(generated, "_tdd_guarded", False):
        return

    def forward(self: fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
        try:
            return generated(self, *args, **kwargs)
        except GuardError as exc:
            fallback = _FALLBACKS.get(self)
            if fallback is None:
                raise
            failed = str(exc)
        if not self.__dict__.get("_tdd_warned"):
            warnings.warn(f"{failed}; running the original module instead (warned once)",
                          RuntimeWarning, stacklevel=2)
            self.__dict__["_tdd_warned"] = True
        _sync_modes(self, fallback)
        return fallback(*args, **kwargs)

    functools.update_wrapper(forward, generated)  # the signature torch.export/onnx match against
    forward._tdd_guarded = True  # type: ignore[attr-defined]
    cls.forward = forward  # type: ignore[method-assign]
    if "recompile" not in cls.__dict__:  # recompile() (torch.save calls it) regenerates forward
        def recompile(self: fx.GraphModule) -> Any:
            result = fx.GraphModule.recompile(self)
            _wrap(type(self))
            return result

        cls.recompile = recompile  # type: ignore[method-assign]
