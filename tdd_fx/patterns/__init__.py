"""Pattern families, one module each.  A family exposes ``PATTERN`` and ``find(ctx)``."""

from __future__ import annotations

from types import ModuleType

from . import conv, loop, matmul, reshape

#: The families ``optimize``/``audit`` run, in order.
FAMILIES: tuple[ModuleType, ...] = (reshape, conv, matmul, loop)

__all__ = ["FAMILIES"]
