"""A video-clip classifier over precomputed per-frame features (say, pooled CNN embeddings stored
on disk), written the way per-frame code often is: a Python loop that projects one frame at a
time, a short leaky memory over the frames, a Transformer encoder layer, and per-frame heads held in
a ``ModuleList`` with the *same* module for every frame slot.

Run it:  python examples/video_frames.py
It prints the audit (what tdd_fx finds, and the near-miss it leaves alone), the report of
``optimize``, the training-step time of the original and the optimized model measured in the same
run, and checks that the optimized model trains the same tensors.

The sites:

* ``frame_proj``: ``torch.stack([self.frame_proj(frames[:, t]) for t in range(frames.size(1))], 1)``
  — the same Linear + LayerNorm + GELU on every frame, no state between frames: rewritten (pattern
  ``"loop"``); the loop count follows the input, so no guard on the clip length is needed for it.
* ``memory``: ``h = torch.tanh(self.cell(x[:, t]) + self.decay * h)`` collected with ``stack``.
  Each step reads the previous one: a recurrence, not time-distributed. Rejected, with the reason.
* ``frame_heads``: ``nn.ModuleList([head] * FRAMES)`` — one module, tied across the frame slots —
  and ``torch.cat([head(x[:, t:t + 1]) for t, head in enumerate(self.frame_heads)], 1)``. A tied
  loop, re-rolled; it runs a fixed ``len(self.frame_heads)`` steps, so the rewrite carries the guard
  ``frames.shape[1] == FRAMES`` (another clip length runs the original, which fails the same way).
"""

from __future__ import annotations

import torch
from torch import nn

import tdd_fx
from tdd_fx.tune import compare_models

FRAMES = 16
BATCH = 8
FEATURES = 512  # e.g. a pooled ResNet-18 embedding per frame
N_CLASSES = 20
TIMING_REPEATS = 9  # training steps timed per model (median reported)


class VideoClassifier(nn.Module):
    """Input: per-frame features ``(B, T, FEATURES)``. Output: clip logits ``(B, n_classes)`` and
    per-frame "action-ness" scores ``(B, T)``."""

    def __init__(self, features: int = FEATURES, d_model: int = 128, frames: int = FRAMES,
                 n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.frame_proj = nn.Sequential(nn.Linear(features, d_model), nn.LayerNorm(d_model), nn.GELU())
        # a leaky memory over frames (near-miss: a recurrence)
        self.cell = nn.Linear(d_model, d_model)
        self.decay = 0.5
        self.temporal = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=2 * d_model,
                                                   dropout=0.1, batch_first=True)
        head = nn.Sequential(nn.Linear(d_model, d_model // 2), nn.ReLU(), nn.Linear(d_model // 2, 1))
        self.frame_heads = nn.ModuleList([head] * frames)  # the same module in every slot: tied
        self.classifier = nn.Linear(d_model, n_classes)

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([self.frame_proj(frames[:, t]) for t in range(frames.size(1))], 1)
        h = torch.zeros_like(x[:, 0])
        memory = []
        for t in range(x.size(1)):
            h = torch.tanh(self.cell(x[:, t]) + self.decay * h)
            memory.append(h)
        x = self.temporal(x + torch.stack(memory, 1))  # (B, T, d_model)
        scores = torch.cat([head(x[:, t:t + 1]) for t, head in enumerate(self.frame_heads)], 1)
        weights = torch.softmax(scores, dim=1)  # (B, T, 1)
        clip_logits = self.classifier((weights * x).sum(dim=1))
        return clip_logits, scores.squeeze(-1)


def build() -> VideoClassifier:
    torch.manual_seed(0)
    return VideoClassifier(features=FEATURES, frames=FRAMES)


def example_inputs(batch: int | None = None, frames: int | None = None) -> tuple[torch.Tensor]:
    """A batch of clips of per-frame features ``(B, T, FEATURES)`` (sizes default to the module
    constants; the tied heads need ``T == FRAMES``)."""
    g = torch.Generator().manual_seed(0)
    batch, frames = batch or BATCH, frames or FRAMES
    return (torch.randn(batch, frames, FEATURES, generator=g),)


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
