"""Small models, each one hand-written spelling (or near-miss) of a time-distributed dense layer."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

B, T, FEAT, OUT = 4, 10, 16, 8


class Body(nn.Module):
    """A module whose forward is ``fn(self, x)``; holds every layer the spellings need."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn
        self.fc = nn.Linear(FEAT, OUT)
        self.fc2 = nn.Linear(OUT, OUT)
        self.square = nn.Linear(FEAT, FEAT)
        self.wide = nn.Linear(T * FEAT, OUT)
        self.bn = nn.BatchNorm1d(OUT)
        self.ln = nn.LayerNorm(OUT)
        self.drop = nn.Dropout(0.25)
        self.softmax = nn.Softmax(dim=1)
        self.emb = nn.Embedding(20, FEAT)
        self.weight = nn.Parameter(torch.randn(OUT, FEAT) / 4)
        self.bias = nn.Parameter(torch.randn(OUT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


def _size_ints(s: Body, x: torch.Tensor) -> torch.Tensor:
    b, t, f = x.size()
    return s.fc(x.view(b * t, f)).view(b, t, -1)


#: spelling -> (forward, input shape, number of dense sites)
POSITIVE: dict[str, tuple[Callable[..., torch.Tensor], tuple[int, ...], int]] = {
    "view_minus1_size": (
        lambda s, x: s.fc(x.contiguous().view(-1, x.size(-1))).view(x.size(0), -1, OUT),
        (B, T, FEAT), 1),
    "reshape_shape": (
        lambda s, x: s.fc(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], x.shape[1], -1),
        (B, T, FEAT), 1),
    "ints_from_size_unpacked": (_size_ints, (B, T, FEAT), 1),
    "ints_from_size_product": (
        lambda s, x: s.fc(x.view(x.size(0) * x.size(1), x.size(2))).view(x.size(0), x.size(1), OUT),
        (B, T, FEAT), 1),
    "literal_ints": (lambda s, x: s.fc(x.view(B * T, FEAT)).view(B, T, OUT), (B, T, FEAT), 1),
    "flatten_unflatten": (
        lambda s, x: s.fc(x.flatten(0, 1)).unflatten(0, (x.shape[0], x.shape[1])),
        (B, T, FEAT), 1),
    "torch_flatten_reshape": (
        lambda s, x: torch.reshape(s.fc(torch.flatten(x, 0, 1)), (x.shape[0], x.shape[1], OUT)),
        (B, T, FEAT), 1),
    "view_as": (
        lambda s, x: s.square(x.reshape(-1, FEAT)).view_as(x), (B, T, FEAT), 1),
    "batch_first_false_restore": (
        lambda s, x: s.fc(x.contiguous().view(-1, x.size(-1))).view(-1, x.size(1), OUT),
        (B, T, FEAT), 1),
    "channel_first_transpose": (
        lambda s, x: s.fc(x.transpose(1, 2).contiguous().view(-1, FEAT))
        .view(x.size(0), -1, OUT).transpose(1, 2),
        (B, FEAT, T), 1),
    "channel_first_permute_linear": (
        lambda s, x: s.fc(x.permute(0, 2, 1)).permute(0, 2, 1), (B, FEAT, T), 1),
    "three_leading_axes": (
        lambda s, x: s.fc(x.reshape(-1, FEAT)).view(x.size(0), x.size(1), x.size(2), OUT),
        (2, 3, 5, FEAT), 1),
    "four_leading_axes_flatten": (
        lambda s, x: s.fc(x.flatten(0, -2)).unflatten(0, x.shape[:-1]),
        (2, 3, 2, 5, FEAT), 1),
    "chain_relu_dropout": (
        lambda s, x: s.fc2(s.drop(F.relu(s.fc(x.contiguous().view(-1, x.size(-1))))))
        .view(x.size(0), -1, OUT),
        (B, T, FEAT), 2),
    "chain_gelu_layernorm": (
        lambda s, x: s.ln(s.fc2(F.gelu(s.fc(x.reshape(-1, FEAT))))).view(x.shape[0], -1, OUT),
        (B, T, FEAT), 2),
    "chain_batchnorm": (
        lambda s, x: s.fc2(s.bn(s.fc(x.reshape(-1, FEAT)))).view(x.shape[0], x.shape[1], OUT),
        (B, T, FEAT), 2),
    "chain_softmax_module_dim1": (
        lambda s, x: s.softmax(s.fc(x.reshape(-1, FEAT))).view(x.shape[0], x.shape[1], OUT),
        (B, T, FEAT), 1),
    "chain_softmax_functional_dim1": (
        lambda s, x: F.softmax(s.fc(x.reshape(-1, FEAT)), dim=1).view(x.shape[0], x.shape[1], OUT),
        (B, T, FEAT), 1),
    "scalar_arith": (
        lambda s, x: (s.fc(x.reshape(-1, FEAT)) * 0.5 + 1.0).view(x.shape[0], x.shape[1], OUT),
        (B, T, FEAT), 1),
    "functional_linear_parameter": (
        lambda s, x: F.linear(x.reshape(-1, FEAT), s.weight, s.bias).view(x.size(0), -1, OUT),
        (B, T, FEAT), 1),
}

#: spelling -> (forward, input shape, words the rejection reason must contain)
NEGATIVE: dict[str, tuple[Callable[..., torch.Tensor], tuple[int, ...], str]] = {
    "merges_feature_axis": (lambda s, x: s.wide(x.view(x.size(0), -1)), (B, T, FEAT),
                            "merges the feature axis"),
    "scrambled_restore": (
        lambda s, x: s.fc(x.contiguous().view(-1, x.size(-1))).view(-1, x.size(0), OUT),
        (B, T, FEAT), "different order"),
    "scrambled_restore_square": (
        lambda s, x: s.fc(x.contiguous().view(-1, x.size(-1))).view(-1, x.size(0), OUT),
        (T, T, FEAT), "different order"),
    "restore_merges_axes_4d": (
        lambda s, x: s.fc(x.contiguous().view(-1, x.size(-1))).view(x.size(0), -1, OUT),
        (2, 3, 5, FEAT), "different split"),
    "fold_around_embedding": (
        lambda s, x: s.emb(x.view(-1)).view(x.size(0), x.size(1), -1), (B, T), "Embedding"),
    "fold_around_interpolate": (
        lambda s, x: F.interpolate(x.reshape(-1, 1, x.size(-1)), scale_factor=2.0)
        .view(x.size(0), x.size(1), -1),
        (B, T, FEAT), "upsample"),
    "fold_around_batchnorm_only": (
        lambda s, x: s.bn(x.reshape(-1, OUT)).view(x.shape[0], x.shape[1], OUT), (B, T, OUT),
        "BatchNorm1d"),
    "folded_rows_used_elsewhere": (
        lambda s, x: (lambda h: s.fc2(h).view(x.size(0), -1, OUT) + h.mean())(
            s.fc(x.reshape(-1, FEAT))),
        (B, T, FEAT), "fold"),
    "transpose_inside_fold": (
        lambda s, x: s.fc(x.reshape(-1, FEAT).t().contiguous().t()).view(x.size(0), -1, OUT),
        (B, T, FEAT), "moves axes"),
}


#: not a time-distributed dense site at all (nothing is folded): never reported, never changed
UNRELATED: dict[str, tuple[Callable[..., torch.Tensor], tuple[int, ...]]] = {
    "splits_features_after_dense": (
        lambda s, x: s.fc(x[:, 0]).view(x.size(0), 2, OUT // 2), (B, T, FEAT)),
}


def make_input(shape: tuple[int, ...], name: str = "") -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if "embedding" in name:
        return torch.randint(0, 20, shape, generator=g)
    return torch.randn(shape, generator=g)


class Wrap(nn.Module):
    """The Keras-port wrapper: fold every leading axis, apply the module, unfold."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.module(x.contiguous().view(-1, x.size(-1)))
        return y.view(x.size(0), -1, y.size(-1))


class Literal(nn.Module):
    """The proof relies on literal sizes: 40 == B*T, (4, 10) == (B, T)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.view(40, 16)).view(4, 10, 8)
