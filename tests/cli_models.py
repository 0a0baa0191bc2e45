"""Tiny models for the command-line tests (``tests/test_cli.py``), addressed as ``cli_models:NAME``."""

from __future__ import annotations

import torch
from torch import nn
from zoo import Wrap as TimeDistributed  # the Keras-port wrapper

FEAT, HIDDEN, OUT = 6, 5, 3


class Wrapped(nn.Module):
    """Two time-distributed dense sites, with an activation and dropout between them."""

    def __init__(self) -> None:
        super().__init__()
        self.td1 = TimeDistributed(nn.Linear(FEAT, HIDDEN))
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.td2 = TimeDistributed(nn.Linear(HIDDEN, OUT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.td2(self.drop(self.act(self.td1(x))))


class NoSites(nn.Module):
    """Pools over time before its only dense layer: nothing time-distributed."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(FEAT, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=1))


class Tagged(nn.Module):
    """A series ``(B, T, FEAT)`` plus integer tags ``(B, T)`` in [0, 10): two positional inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, FEAT)
        self.td = TimeDistributed(nn.Linear(FEAT, OUT))

    def forward(self, x: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
        return self.td(x + self.embed(tags))


class NeedsArgs(nn.Module):
    """Cannot be built with no arguments."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def make_wrapped() -> nn.Module:
    """A factory: called with no arguments."""
    return Wrapped()


#: an instance, used as it is
INSTANCE = Wrapped()


def not_a_model() -> int:
    """A factory that returns something other than a module."""
    return 42


class Keyworded(nn.Module):
    """Called with keywords, like a transformers model: ``m(features=..., mask=...)``."""

    def __init__(self) -> None:
        super().__init__()
        self.td = TimeDistributed(nn.Linear(6, 4))

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.td(features)
        return y if mask is None else y * mask[..., None]


def make_keyworded() -> tuple[nn.Module, tuple, dict]:
    """A factory returning the model and its example call: (model, args, kwargs)."""
    return Keyworded().eval(), (), {"features": torch.randn(4, 7, 6), "mask": torch.ones(4, 7)}
