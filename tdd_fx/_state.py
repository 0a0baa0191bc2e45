"""Running a user's model without leaving a trace: buffers, ``training`` flags, RNG state, and the
plain Python attributes of every module (a list or dict that forward appends to, a counter)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def preserved(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Restore, on exit (normal, exception or KeyboardInterrupt), every buffer value, every
    ``training`` flag and plain attribute of the given module trees, and the global CPU/CUDA
    RNG states."""
    flags: list[tuple[nn.Module, bool]] = []
    slots: list[tuple[nn.Module, dict[str, torch.Tensor | None]]] = []
    attrs: list[tuple[nn.Module, dict[str, object], list[tuple[object, object]]]] = []
    buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen: set[int] = set()
    for root in modules:
        for m in root.modules():
            flags.append((m, m.training))
            slots.append((m, dict(m._buffers)))
            attrs.append(_attributes(m))
        for b in root.buffers():
            if id(b) not in seen:
                seen.add(id(b))
                buffers.append((b, b.detach().clone()))
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape != saved.shape:  # observers resize their buffers on first use
                    b.resize_(saved.shape)
                b.copy_(saved)
        for m, saved_slots in slots:
            m._buffers.update(saved_slots)
        for m, flag in flags:
            m.training = flag
        for m, saved_attrs, contents in reversed(attrs):
            _restore_attributes(m, saved_attrs, contents)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


#: ``nn.Module``'s own bookkeeping (restored above, or tdd_fx's own ``forward``): not user state
_MODULE_SLOTS = frozenset(nn.Module().__dict__) | {"forward", "tdd_report"}
_CONTAINERS = (list, dict, set)


def _attributes(m: nn.Module) -> tuple[nn.Module, dict[str, object], list[tuple[object, object]]]:
    """The module's plain attributes, and a shallow copy of each list/dict/set among them (a
    forward may append to a list the model owns, or count its calls)."""
    saved = {k: v for k, v in m.__dict__.items() if k not in _MODULE_SLOTS}
    contents = [(v, copy.copy(v)) for v in saved.values() if type(v) in _CONTAINERS]
    return m, saved, contents


def _restore_attributes(m: nn.Module, saved: dict[str, object],
                        contents: list[tuple[object, object]]) -> None:
    for k in [k for k in m.__dict__ if k not in _MODULE_SLOTS and k not in saved]:
        del m.__dict__[k]  # set during the run (a cache, possibly of fake tensors)
    for k, v in saved.items():
        if m.__dict__.get(k, _MISSING) is not v:
            m.__dict__[k] = v
    for obj, before in contents:
        if isinstance(obj, list):
            obj[:] = before  # type: ignore[index]
        else:
            obj.clear()  # type: ignore[attr-defined]
            obj.update(before)  # type: ignore[attr-defined]


_MISSING = object()
