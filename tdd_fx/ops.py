"""The canonical time-distributed dense operation, its kernels, and the ``TimeDistributed`` layer.

Every site that tdd_fx rewrites becomes one ``call_function`` node to
:func:`time_distributed_dense`.  Its meaning does not depend on the kernel::

    y = time_distributed_dense(x, W, b, feature_dim=d)
    # y.movedim(d, -1) == x.movedim(d, -1) @ W.T + b

i.e. the same dense map ``W: (out, in)`` applied independently at every position of every axis
except ``feature_dim``; the output keeps the input's layout with ``in`` replaced by ``out``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GuardError",
    "KERNELS",
    "TimeDistributed",
    "check_input",
    "check_none",
    "choose_kernel",
    "time_distributed_dense",
]


def _linear_last(x: Tensor, w: Tensor, b: Tensor | None, d: int) -> Tensor:
    if d != x.dim() - 1:
        return _linear_between_transposes(x, w, b, d)
    return F.linear(x, w, b)


def _linear_between_transposes(x: Tensor, w: Tensor, b: Tensor | None, d: int) -> Tensor:
    return F.linear(x.movedim(d, -1), w, b).movedim(-1, d)


def _linear_contiguous(x: Tensor, w: Tensor, b: Tensor | None, d: int) -> Tensor:
    """Features last *copied* to contiguous rows first, as the hand-written channel-first sandwich
    ``x.transpose(1, 2).reshape(-1, F)`` did (faster than a strided linear for bfloat16 on CPU)."""
    return F.linear(x.movedim(d, -1).contiguous(), w, b).movedim(-1, d)


def _matmul(x: Tensor, w: Tensor, b: Tensor | None, d: int) -> Tensor:
    # (out, in) @ (..., in, rest) -> (..., out, rest); only valid when d == ndim - 2 or the
    # rest is folded: we fold every axis after d into one.
    lead, rest = x.shape[:d], x.shape[d + 1 :]
    n = 1
    for r in rest:  # not -1: an empty batch leaves it ambiguous
        n = n * r
    x3 = x.reshape(*lead, x.shape[d], n)
    y = torch.matmul(w, x3)
    if b is not None:
        y = y + b[:, None]
    return y.reshape(*lead, w.shape[0], *rest)


def _baddbmm(x: Tensor, w: Tensor, b: Tensor | None, d: int) -> Tensor:
    if x.dim() != 3 or d != 1:
        return _matmul(x, w, b, d)
    n = x.shape[0]
    wb = w.expand(n, *w.shape)
    if b is None:
        return torch.bmm(wb, x)
    # (expanded here, not broadcast by baddbmm: its meta function fails on symbolic sizes)
    return torch.baddbmm(b[:, None].expand(n, w.shape[0], x.shape[2]), wb, x)


def _addmm(x: Tensor, w: Tensor, b: Tensor | None, d: int) -> Tensor:
    """GPT-2's ``Conv1D``: ``addmm(b, x.view(-1, F), W)`` with ``W = w.t()`` stored ``(in, out)``
    (the weight's own layout: no transposed copy in the backward pass either)."""
    if d != x.dim() - 1:
        return _linear_between_transposes(x, w, b, d)
    return addmm_in_out(x, w.t(), b)


def addmm_in_out(x: Tensor, w_in_out: Tensor, b: Tensor | None) -> Tensor:
    """``addmm(b, x.view(-1, F), W).view(..., O)`` for a weight stored ``(in, out)``."""
    lead = x.shape[:-1]
    n = 1
    for r in lead:  # not -1: an empty batch leaves it ambiguous
        n = n * r
    x2 = x.reshape(n, x.shape[-1])
    y = torch.mm(x2, w_in_out) if b is None else torch.addmm(b, x2, w_in_out)
    return y.view(*lead, w_in_out.shape[1])


_CONVS = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def _conv(x: Tensor, w: Tensor, b: Tensor | None, d: int) -> Tensor:
    """A convolution with a kernel of size 1 (channels = features on axis 1)."""
    if d != 1 or x.dim() not in _CONVS:
        return _linear_between_transposes(x, w, b, d)
    return _CONVS[x.dim()](x, w.reshape(*w.shape, *([1] * (x.dim() - 2))), b)


#: The kernels by name.  Each computes the same function; they differ only in speed.
KERNELS: dict[str, Callable[[Tensor, Tensor, Tensor | None, int], Tensor]] = {
    "linear": _linear_last,
    "linear_t": _linear_between_transposes,
    "linear_tc": _linear_contiguous,
    "matmul": _matmul,
    "baddbmm": _baddbmm,
    "addmm": _addmm,
    "conv": _conv,
    "conv1d": _conv,  # the name earlier reports used for 3-D inputs
}


#: kernels whose output is strided (features moved innermost for ``F.linear``, then moved back);
#: every other kernel writes row-major output.  A random op after a site draws one number per
#: element in memory order, so it sees the difference.
STRIDED_OUTPUT = frozenset({"linear_t", "linear_tc"})

#: kernels that *are* the computation of a hand-written form (``Conv1d`` → ``conv``, ``bmm`` with
#: an expanded weight → ``baddbmm``, ``matmul`` → ``matmul``, the channel-first sandwich
#: ``x.transpose(1, 2).reshape(-1, F)`` → ``Linear`` → back → ``linear_tc``, GPT-2's ``Conv1D``
#: → ``addmm``): keeping one costs nothing
MIRRORS = frozenset({"conv", "baddbmm", "matmul", "linear_tc", "addmm"})


def choose_kernel(feature_dim: int, ndim: int, device: torch.device | str = "cpu",
                  prefer: str | None = None, dtype: torch.dtype | None = None) -> str:
    """Heuristic kernel choice (used when no measurement is asked for).

    Features on the last axis: ``linear`` (this *is* ``nn.Linear``; nothing is faster), or
    ``addmm`` when that is what the replaced code ran (GPT-2's ``Conv1D``).  Otherwise, when the
    replaced code was itself one of the kernels (``prefer`` in :data:`MIRRORS`: a pointwise
    ``Conv1d``, ``baddbmm``/``matmul`` with a broadcast weight, the transpose-copy-``Linear``
    sandwich), that kernel: the rewrite then runs the original's own computation (what remains is
    the optimized module's per-call work, which shows on ops of tens of microseconds).  (Measured
    on this project's CPU, ``benchmarks/bench_forms.py``: the "faster in general" ``conv`` ran
    1.5-1.9x slower than the sandwich it replaced at (B, T, F, O) = (8, 100, 40, 64) in float32,
    and 1.4-1.7x slower than an expanded ``baddbmm``.)

    A pointwise ``Conv1d`` keeps ``conv`` although ``baddbmm`` measured faster on this CPU in
    float32 (36 of 54 points of ``benchmarks/bench_kernels.py``'s grid, never slower): its other
    summation order, amplified by a train-mode BatchNorm, put speechbrain's ECAPA-TDNN input
    gradient 5x further from float64 than the original's own float32 error — outside the
    verification's rule — where the mirror is bit-identical.  ``autotune=True`` can still pick it.

    With no such kernel (a ``Conv2d(1, O, (F, 1))`` stem, a channel-first einsum), features on
    axis 1: on CUDA, ``conv`` (cuDNN); on CPU for a 3-D input, ``baddbmm`` in float32/float64
    and ``conv`` in reduced precision (where the same grid has ``conv`` ahead); for 4-5-D inputs
    ``conv`` in float32/float64, else ``prefer`` or ``linear_t``.
    ``optimize(..., autotune=True)`` measures instead.
    """
    d = feature_dim % ndim if ndim else feature_dim
    if ndim == 0 or d == ndim - 1:
        return "addmm" if prefer == "addmm" else "linear"
    full = dtype is None or dtype in (torch.float32, torch.float64)
    cuda = torch.device(device).type == "cuda"
    if prefer in MIRRORS and prefer != "addmm":
        return prefer
    if d == 1 and ndim == 3 and not cuda:
        return "baddbmm" if full else "conv"
    if d == 1 and 3 <= ndim <= 5 and (full or cuda):
        return "conv"
    if prefer is not None and prefer != "addmm":
        return prefer
    return "linear_t"


def _fx_leaf(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Under torch.fx tracing, record ``fn`` as one ``call_function`` node instead of its body."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Tensor:
        for a in args:  # (a loop, not a generator: this runs on every call)
            if isinstance(a, fx.Proxy):
                return a.tracer.create_proxy("call_function", wrapper, args, kwargs)
        for a in kwargs.values():
            if isinstance(a, fx.Proxy):
                return a.tracer.create_proxy("call_function", wrapper, args, kwargs)
        return fn(*args, **kwargs)

    return wrapper


@_fx_leaf
def time_distributed_dense(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    feature_dim: int = -1,
    impl: str = "linear",
) -> Tensor:
    """Apply the dense map ``weight: (out, in)`` (+ ``bias``) along axis ``feature_dim`` of ``x``.

    Every other axis is kept, in order and size: the result equals
    ``F.linear(x.movedim(feature_dim, -1), weight, bias).movedim(-1, feature_dim)`` whatever the
    ``impl`` (one of :data:`KERNELS`).  ``weight`` may also be a pointwise convolution's own
    ``(out, in, 1, ..., 1)`` parameter: the size-1 kernel axes mean nothing here (the map is the
    same), and the ``conv`` kernel then uses the parameter as it is, with no reshape either way.
    """
    d = feature_dim if feature_dim >= 0 else feature_dim + x.dim()
    if weight.dim() != 2:
        if weight.shape[2:] != _ONES[weight.dim() - 2]:
            raise ValueError(f"time_distributed_dense: weight of shape {tuple(weight.shape)} is "
                             "neither (out, in) nor a pointwise (out, in, 1, ...) kernel")
        if d == 1 and weight.dim() == x.dim() and impl in ("conv", "conv1d"):
            return _CONVS[x.dim()](x, weight, bias)
        weight = weight.flatten(1)
    if d == x.dim() - 1 and impl != "addmm":
        return F.linear(x, weight, bias)
    return KERNELS[impl](x, weight, bias, d)


_ONES = [(1,) * k for k in range(8)]


class GuardError(RuntimeError):
    """An optimized module was called with inputs outside the facts its rewrite relied on."""


@_fx_leaf
def check_input(
    x: Tensor, ndim: int, sizes: Sequence[tuple[tuple[int, ...], int]], name: str
) -> Tensor:
    """Guard inserted at the entry of an optimized graph: ``x`` must have the traced rank and the
    sizes a proof relied on (each entry: the product of sizes of these dims equals a value)."""
    if x.dim() != ndim:
        raise GuardError(
            f"tdd_fx: input {name!r} was optimized for {ndim}-D tensors, got shape "
            f"{tuple(x.shape)} (optimize() again for such inputs)"
        )
    for dims, value in sizes:
        got = 1
        for dim in dims:
            got *= x.shape[dim]
        if got != value:
            what = "*".join(f"{name}.shape[{dim}]" for dim in dims)
            raise GuardError(
                f"tdd_fx: the rewrite relied on {what} == {value}, got {got} (shape "
                f"{tuple(x.shape)}; optimize() again for such inputs)"
            )
    return x


@_fx_leaf
def check_none(x: Any, name: str, default: Any = None) -> Any:
    """Guard for an argument the trace took at its default (``None``, ``False``, ``1.0``:
    ``if mask is not None:`` went the default's way): any other value was not traced."""
    if not (x is default or (type(x) is type(default) and x == default)):
        raise GuardError(f"tdd_fx: the argument {name!r} was traced at its default {default!r}, "
                         f"got {type(x).__name__} (optimize() again with it among the example "
                         "inputs)")
    return x


class TimeDistributed(nn.Module):
    """Keras' ``TimeDistributed``: apply ``module`` to every time step of a batch-first tensor.

    Input ``(B, T, *rest)``; the same module (same weights) runs on each of the ``T`` steps; output
    ``(B, T, *out_rest)``.  A dense inner layer (``nn.Linear``) goes through
    :func:`time_distributed_dense` directly (no reshapes); any other layer sees time folded into
    batch: ``module(x.flatten(0, 1)).unflatten(0, (B, T))`` — exactly Keras' semantics, provided
    the inner layer treats batch rows independently (true of every layer without batch
    statistics).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"TimeDistributed wraps an nn.Module, got {type(module).__name__}")
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        m = self.module
        if type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks):
            return time_distributed_dense(x, m.weight, m.bias)
        y = self.module(x.flatten(0, 1))
        return y.unflatten(0, (x.shape[0], x.shape[1]))

    def extra_repr(self) -> str:
        return "batch_first=True, time_dim=1"
