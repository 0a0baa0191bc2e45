"""A Temporal-Fusion-Transformer-style forecaster built the way Keras ports are: every dense layer
is wrapped in a hand-written ``TimeDistributed`` module (reshape -> Linear -> reshape).

Run it:  python examples/forecaster.py
It prints the audit of the model (what tdd_fx finds, and the near-misses it leaves alone), then
the report of ``optimize``, and checks that the optimized model trains the same tensors.
"""

from __future__ import annotations

import torch
from torch import nn

import tdd_fx
from tdd_fx.tune import compare_models


class TimeDistributed(nn.Module):
    """The Keras-port wrapper found in many PyTorch repositories."""

    def __init__(self, module: nn.Module, batch_first: bool = True) -> None:
        super().__init__()
        self.module = module
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_reshape = x.contiguous().view(-1, x.size(-1))  # (samples * timesteps, input_size)
        y = self.module(x_reshape)
        if self.batch_first:
            y = y.contiguous().view(x.size(0), -1, y.size(-1))  # (samples, timesteps, output_size)
        else:
            y = y.view(-1, x.size(1), y.size(-1))  # (timesteps, samples, output_size)
        return y


class GatedResidualNetwork(nn.Module):
    def __init__(self, size: int, hidden: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.fc1 = TimeDistributed(nn.Linear(size, hidden))
        self.elu = nn.ELU()
        self.fc2 = TimeDistributed(nn.Linear(hidden, size))
        self.dropout = nn.Dropout(dropout)
        self.gate = TimeDistributed(nn.Sequential(nn.Linear(size, size), nn.Sigmoid()))
        self.norm = nn.LayerNorm(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.fc2(self.elu(self.fc1(x))))
        return self.norm(x + self.gate(h) * h)


class Forecaster(nn.Module):
    """Inputs: observed series ``(B, T, n_features)`` and a static category ``(B, T)``."""

    def __init__(self, n_features: int = 12, hidden: int = 64, n_categories: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(n_categories, hidden)
        self.project = TimeDistributed(nn.Linear(n_features, hidden))
        self.grn_in = GatedResidualNetwork(hidden, 2 * hidden)
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)
        self.grn_out = GatedResidualNetwork(hidden, 2 * hidden)
        self.head = TimeDistributed(nn.Linear(hidden, 3))  # three quantiles per step

    def forward(self, series: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        b, t = category.shape
        static = self.embed(category.view(-1)).view(b, t, -1)  # a fold, but not a dense layer
        x = self.grn_in(self.project(series) + static)
        x, _ = self.lstm(x)
        return self.head(self.grn_out(x))


def example_inputs(batch: int = 16, steps: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, steps, 12, generator=g), torch.randint(0, 10, (batch, steps), generator=g)


def main() -> None:
    torch.manual_seed(0)
    model = Forecaster()
    inputs = example_inputs()

    print("== audit (nothing is changed) ==")
    print(tdd_fx.audit(model, inputs))
    print()
    print("== optimize ==")
    optimized = tdd_fx.optimize(model, inputs)
    print(optimized.tdd_report)

    shared = {id(p) for p in model.parameters()} == {id(p) for p in optimized.parameters()}
    same_keys = list(model.state_dict()) == list(optimized.state_dict())
    print(f"\nparameters shared with the original: {shared}; same state_dict keys: {same_keys}")

    before, after, _ = compare_models(model, optimized, inputs, train=True, rounds=1,
                                      repeats=TIMING_REPEATS)
    shape = "x".join(map(str, inputs[0].shape))
    print(f"training step (forward + backward, input {shape}, median of {TIMING_REPEATS}):")
    print(f"  original   {before * 1e3:8.1f} ms")
    print(f"  optimized  {after * 1e3:8.1f} ms")
    print(f"  speed-up   {before / after:8.2f}x")


TIMING_REPEATS = 9  # training steps timed per model (median reported)

if __name__ == "__main__":
    main()
