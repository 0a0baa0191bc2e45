"""A sound-event tagger in the style of DCASE baselines: a spectrogram "conv" stem that is really
a dense layer over the mel axis, a temporal smoothing conv, a bidirectional GRU, and a per-frame
classifier head in a Keras-port ``TimeDistributed`` wrapper, pooled into clip-level tags.

Run it:  python examples/audio_tagger.py
It prints the audit (what tdd_fx finds, and the near-miss it leaves alone), the report of
``optimize``, the training-step time of the original and the optimized model measured in the same
run, and checks that the optimized model trains the same tensors.

The sites:

* ``stem``: ``nn.Conv2d(1, C, kernel_size=(n_mels, 1))`` over ``(B, 1, n_mels, T)``, then
  ``.squeeze(2)`` / ``.permute(0, 2, 1)``. The kernel spans the whole mel axis and is 1 along time,
  so it is a dense layer ``n_mels -> C`` applied to every frame: rewritten (pattern ``"conv"``).
* ``smooth``: ``nn.Conv1d(C, C, 3, padding=1)`` mixes neighbouring frames. A real convolution, not
  time-distributed: rejected, and the report says why.
* ``frame_head`` and ``attention``: ``TimeDistributed(...)`` reshape sandwiches: rewritten
  (pattern ``"reshape"``).

On a 2-core CPU the bidirectional GRU's 400 sequential steps take most of a training step, so the
end-to-end gain is small here even though the stem itself trains several times faster as a dense
layer; the gain grows with the stem's share of the work (more channels, more mel bands, a GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import tdd_fx
from tdd_fx.tune import compare_models

N_MELS = 64
FRAMES = 400
BATCH = 8
N_CLASSES = 10
TIMING_REPEATS = 7  # training steps timed per model (median reported)


class TimeDistributed(nn.Module):
    """The Keras-port wrapper found in many PyTorch repositories."""

    def __init__(self, module: nn.Module, batch_first: bool = True) -> None:
        super().__init__()
        self.module = module
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x.size()) <= 2:
            return self.module(x)
        x_reshape = x.contiguous().view(-1, x.size(-1))  # (samples * timesteps, input_size)
        y = self.module(x_reshape)
        if self.batch_first:
            y = y.contiguous().view(x.size(0), -1, y.size(-1))  # (samples, timesteps, output_size)
        else:
            y = y.view(-1, x.size(1), y.size(-1))  # (timesteps, samples, output_size)
        return y


class AudioTagger(nn.Module):
    """Input: log-mel spectrogram ``(B, n_mels, T)``. Output: clip logits ``(B, n_classes)`` and
    frame logits ``(B, T, n_classes)`` (for sound-event detection)."""

    def __init__(self, n_mels: int = N_MELS, channels: int = 128, hidden: int = 64,
                 n_classes: int = N_CLASSES, dropout: float = 0.2) -> None:
        super().__init__()
        # "the first layer sees the whole spectrum of each frame"
        self.stem = nn.Conv2d(1, channels, kernel_size=(n_mels, 1))
        self.stem_norm = nn.BatchNorm1d(channels)
        # near-miss: a kernel of 3 along time smooths over neighbouring frames
        self.smooth = nn.Conv1d(channels, channels, kernel_size=3, padding=1)
        self.gru = nn.GRU(channels, hidden, batch_first=True, bidirectional=True)
        self.frame_head = TimeDistributed(nn.Sequential(
            nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(2 * hidden, n_classes),
        ))
        self.attention = TimeDistributed(nn.Linear(2 * hidden, n_classes))  # per-class pooling weights

    def forward(self, spec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(spec.unsqueeze(1))  # (B, 1, n_mels, T) -> (B, C, 1, T)
        x = F.relu(self.stem_norm(x.squeeze(2)))  # (B, C, T)
        x = F.relu(self.smooth(x))
        x, _ = self.gru(x.permute(0, 2, 1))  # (B, T, 2 * hidden)
        frame_logits = self.frame_head(x)  # (B, T, n_classes)
        weights = torch.softmax(self.attention(x), dim=1)  # over time
        clip_logits = (weights * frame_logits).sum(dim=1)
        return clip_logits, frame_logits


def build() -> AudioTagger:
    torch.manual_seed(0)
    return AudioTagger(n_mels=N_MELS)


def example_inputs(batch: int | None = None, frames: int | None = None) -> tuple[torch.Tensor]:
    """A batch of log-mel spectrograms ``(B, N_MELS, T)`` (sizes default to the module constants)."""
    g = torch.Generator().manual_seed(0)
    batch, frames = batch or BATCH, frames or FRAMES
    return (torch.randn(batch, N_MELS, frames, generator=g),)


def main() -> None:
    model = build()
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
    print(f"\ntraining step (forward + backward, input {shape}, median of {TIMING_REPEATS}):")
    print(f"  original   {before * 1e3:8.1f} ms")
    print(f"  optimized  {after * 1e3:8.1f} ms")
    print(f"  speed-up   {before / after:8.2f}x")

if __name__ == "__main__":
    main()
