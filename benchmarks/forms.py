"""Hand-written time-distributed dense forms, as found in real code, for the benchmarks.

Each builder takes ``(B, T, F, O)`` and returns ``(model, inputs)``; every model computes a dense
``F -> O`` map at each of ``T`` steps, in its own layout (``pointwise_stack``: two such maps,
``F -> O -> F``, with the row-wise ops of a TCN block between them; its reference is in
:data:`REFERENCES`).
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


class SpectrogramConv(nn.Module):
    """``Conv2d(1, O, (F, 1))`` over a ``(B, 1, F, T)`` spectrogram, squeezed to ``(B, O, T)``."""

    def __init__(self, f: int, o: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, o, kernel_size=(f, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.unsqueeze(1)).squeeze(2)


class PointwiseConv(nn.Module):
    """``Conv1d(F, O, 1)`` over ``(B, F, T)``."""

    def __init__(self, f: int, o: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(f, o, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class EinsumDense(nn.Module):
    """``einsum('btf,of->bto', x, W) + b``."""

    def __init__(self, f: int, o: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, f) / f**0.5)
        self.bias = nn.Parameter(torch.zeros(o))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("btf,of->bto", x, self.weight) + self.bias


class GPTConv1D(nn.Module):
    """GPT-2's ``Conv1D``: ``addmm`` on a folded view, weight stored ``(in, out)``."""

    def __init__(self, f: int, o: int) -> None:
        super().__init__()
        self.nf = o
        self.weight = nn.Parameter(torch.randn(f, o) * 0.02)
        self.bias = nn.Parameter(torch.zeros(o))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class ExpandedBaddbmm(nn.Module):
    """``baddbmm(b, W.expand(B, O, F), x)`` over ``(B, F, T)``."""

    def __init__(self, f: int, o: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, f) / f**0.5)
        self.bias = nn.Parameter(torch.zeros(o, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, self.weight.expand(x.size(0), -1, -1), x)


class PerStepLoop(nn.Module):
    """``stack([fc(x[:, t]) for t in range(T)], 1)``."""

    def __init__(self, f: int, o: int) -> None:
        super().__init__()
        self.fc = nn.Linear(f, o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.fc(x[:, t]) for t in range(x.size(1))], 1)


class PointwiseStack(nn.Module):
    """A TCN/ConvTasNet block: ``Conv1d(F, O, 1)`` -> ReLU -> ``Conv1d(O, F, 1)`` + residual over
    ``(B, F, T)`` (two sites and the row-wise ops between them)."""

    def __init__(self, f: int, o: int) -> None:
        super().__init__()
        self.inner = nn.Conv1d(f, o, 1)
        self.outer = nn.Conv1d(o, f, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.outer(torch.relu(self.inner(x)))


class LinearStack(nn.Module):
    """:class:`PointwiseStack` written with ``nn.Linear`` on features-last ``(B, T, F)`` data."""

    def __init__(self, f: int, o: int) -> None:
        super().__init__()
        self.inner = nn.Linear(f, o)
        self.outer = nn.Linear(o, f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.outer(torch.relu(self.inner(x)))


Builder = Callable[[int, int, int, int], tuple[nn.Module, tuple[torch.Tensor, ...]]]

#: form name -> (builder, layout of the output: "BTO", "BOT" or "BFT")
FORMS: dict[str, tuple[Builder, str]] = {
    "reshape": (lambda b, t, f, o: (ReshapeSandwich(f, o), (torch.randn(b, t, f),)), "BTO"),
    "reshape_channel_first": (
        lambda b, t, f, o: (ChannelFirstSandwich(f, o), (torch.randn(b, f, t),)), "BOT"),
    "conv2d_spectrogram": (
        lambda b, t, f, o: (SpectrogramConv(f, o), (torch.randn(b, f, t),)), "BOT"),
    "conv1d_pointwise": (
        lambda b, t, f, o: (PointwiseConv(f, o), (torch.randn(b, f, t),)), "BOT"),
    "einsum": (lambda b, t, f, o: (EinsumDense(f, o), (torch.randn(b, t, f),)), "BTO"),
    "gpt_conv1d_addmm": (lambda b, t, f, o: (GPTConv1D(f, o), (torch.randn(b, t, f),)), "BTO"),
    "baddbmm_expanded": (
        lambda b, t, f, o: (ExpandedBaddbmm(f, o), (torch.randn(b, f, t),)), "BOT"),
    "loop": (lambda b, t, f, o: (PerStepLoop(f, o), (torch.randn(b, t, f),)), "BTO"),
    "pointwise_stack": (
        lambda b, t, f, o: (PointwiseStack(f, o), (torch.randn(b, f, t),)), "BFT"),
}

#: forms whose hand-written features-last reference is more than one ``nn.Linear(F, O)``:
#: form name -> builder of that reference, taking ``(F, O)``; it runs on ``(B, T, F)`` data
REFERENCES: dict[str, Callable[[int, int], nn.Module]] = {
    "pointwise_stack": LinearStack,
}
