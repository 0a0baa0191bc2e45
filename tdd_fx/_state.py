"""Running a user's model without leaving a trace: buffers, ``training`` flags and RNG state."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def preserved(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Restore, on exit (normal, exception or KeyboardInterrupt), every buffer value, every
    ``training`` flag of the given module trees, and the global CPU/CUDA RNG states."""
    flags: list[tuple[nn.Module, bool]] = []
    slots: list[tuple[nn.Module, dict[str, torch.Tensor | None]]] = []
    buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen: set[int] = set()
    for root in modules:
        for m in root.modules():
            flags.append((m, m.training))
            slots.append((m, dict(m._buffers)))
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
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
