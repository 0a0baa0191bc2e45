"""The registry: every pattern family, in the order they claim nodes."""

from __future__ import annotations

from .base import Context, Family, Match
from .conv import ConvFamily
from .conv_transpose import ConvTransposeFamily
from .loop import LoopFamily
from .matmul import MatmulFamily
from .reshape import ReshapeFamily

FAMILIES: list[Family] = [
    ReshapeFamily(),
    LoopFamily(),
    MatmulFamily(),
    ConvFamily(),
    ConvTransposeFamily(),
]

__all__ = ["FAMILIES", "Context", "Family", "Match"]
