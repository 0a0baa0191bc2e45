"""Hand-written time-distributed dense forms, as found in real code, for the benchmarks.

Each builder takes ``(B, T, F, O)`` and returns ``(model, inputs)``; every model computes a dense
``F -> O`` map at each of ``T`` steps, in its own layout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class ReshapeSandwich(nn.Module):
    """Keras-port wrapper: ``view(-1, F)`` -> Linear -> ``view(B, -1, O)`` on ``(B, T, F)``."""

    def __init__(self, f: int, o: int) -> None:
        super().__init__()
        self.fc = nn.Linear(f, o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x.contiguous().view(-1, x.size(-1)))
        return y.view(x.size(0), -1, y.size(-1))


class ChannelFirstSandwich(nn.Module):
    """``(B, F, T)`` data: transpose, fold, Linear, unfold, transpose back."""

    def __init__(self, f: int, o: int) -> None:
        super().__init__()
        self.fc = nn.Linear(f, o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f, t = x.shape
        y = self.fc(x.transpose(1, 2).reshape(b * t, f))
        return y.view(b, t, -1).transpose(1, 2)


Builder = Callable[[int, int, int, int], tuple[nn.Module, tuple[torch.Tensor, ...]]]

#: form name -> (builder, layout of the output: "BTO" or "BOT")
FORMS: dict[str, tuple[Builder, str]] = {
    "reshape": (lambda b, t, f, o: (ReshapeSandwich(f, o), (torch.randn(b, t, f),)), "BTO"),
    "reshape_channel_first": (
        lambda b, t, f, o: (ChannelFirstSandwich(f, o), (torch.randn(b, f, t),)), "BOT"),
}
