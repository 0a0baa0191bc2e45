"""The canonical time-distributed dense operation, its kernels, and the ``TimeDistributed`` layer.

Every site that tdd_fx rewrites becomes one ``call_function`` node to
:func:`time_distributed_dense`.  Its meaning does not depend on the kernel::

    y = time_distributed_dense(x, W, b, feature_dim=d)
    # y.movedim(d, -1) == x.movedim(d, -1) @ W.T + b

i.e. the same dense map ``W: (out, in)`` applied independently at every position of every axis
except ``feature_dim``; the output keeps the input's layout with ``in`` replaced by ``out``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
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


def _conv_span(x: Tensor, w: Tensor, b: Tensor | None, d: int) -> Tensor:
    """The ``Conv2d(1, O, (F, 1))`` stem's own computation: the features (axis 1 of ``(B, F, T)``)
    are the height of a one-channel image, spanned by one ``(F, 1)`` kernel per output."""
    if d != 1 or x.dim() != 3:
        return _conv(x, w, b, d)
    return stem_conv2d(x, w.reshape(w.shape[0], 1, w.shape[1], 1), b)


def stem_conv2d(x: Tensor, w4: Tensor, b: Tensor | None) -> Tensor:
    """``Conv2d(1, O, (F, 1))`` on ``x: (B, F, T)`` with its own ``(O, 1, F, 1)`` weight."""
    return F.conv2d(x.unsqueeze(1), w4, b).squeeze(2)


#: The kernels by name.  Each computes the same function; they differ only in speed.
KERNELS: dict[str, Callable[[Tensor, Tensor, Tensor | None, int], Tensor]] = {
    "linear": _linear_last,
    "linear_t": _linear_between_transposes,
    "linear_tc": _linear_contiguous,
    "matmul": _matmul,
    "baddbmm": _baddbmm,
    "addmm": _addmm,
    "conv": _conv,
    "conv_span": _conv_span,
    "conv1d": _conv,  # the name earlier reports used for 3-D inputs
}


#: kernels whose output is strided (features moved innermost for ``F.linear``, then moved back);
#: every other kernel writes row-major output.  A random op after a site draws one number per
#: element in memory order, so it sees the difference.
STRIDED_OUTPUT = frozenset({"linear_t", "linear_tc"})

#: kernels that *are* the computation of a hand-written form (``Conv1d`` → ``conv``, ``bmm`` with
#: an expanded weight → ``baddbmm``, ``matmul`` → ``matmul``, the channel-first sandwich
#: ``x.transpose(1, 2).reshape(-1, F)`` → ``Linear`` → back → ``linear_tc``, GPT-2's ``Conv1D``
#: → ``addmm``, the ``Conv2d(1, O, (F, 1))`` stem → ``conv_span``): keeping one costs nothing
MIRRORS = frozenset({"conv", "conv_span", "baddbmm", "matmul", "linear_tc", "addmm"})

#: the largest ``F * O`` (input times output features) at which a CPU float32/float64 3-D site
#: with no mirror runs ``baddbmm`` rather than ``conv`` (``benchmarks/results/kernels_cpu.md``)
BADDBMM_MAX_FO = 64 * 64


#: mirrors that a small CPU float32/float64 site trades for ``baddbmm`` (same row-major
#: channel-first output as ``conv``; ``linear_tc`` only where nothing random follows), subject
#: to verification: see :func:`kernel_policy`
SPECULATIVE = frozenset({"conv", "linear_tc"})


@dataclass
class _Policy:
    speculate: bool = False
    training: bool | None = None
    speculated: list[str] = field(default_factory=list)


_POLICY: contextvars.ContextVar[_Policy | None] = contextvars.ContextVar(
    "tdd_fx_kernel_policy", default=None)


@contextlib.contextmanager
def kernel_policy(speculate: bool, training: bool | None = None) -> Iterator[list[str]]:
    """Within it (with ``speculate``), :func:`choose_kernel` may trade a mirror for ``baddbmm``
    (:data:`SPECULATIVE`) and records each such choice in the list it yields; outside it, or
    without ``speculate``, every site keeps the replaced code's own kernel.  Verification builds
    an eval-mode program under it and, when one with speculative kernels fails, rebuilds it
    without.  ``training``: the mode of the graph being built (None: unknown)."""
    policy = _Policy(speculate, training)
    token = _POLICY.set(policy)
    try:
        yield policy.speculated
    finally:
        _POLICY.reset(token)


def choose_kernel(feature_dim: int, ndim: int, device: torch.device | str = "cpu",
                  prefer: str | None = None, dtype: torch.dtype | None = None,
                  size: tuple[Any, Any] | None = None, random_after: bool = False) -> str:
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

    Except, in an eval-mode graph on CPU in float32/float64 for a small weight (``F * O <=``
    :data:`BADDBMM_MAX_FO`) on 3-D channel-first data: a pointwise ``Conv1d`` and (unless
    ``random_after``: its output's layout differs) the sandwich run ``baddbmm``, which both CPUs of
    ``benchmarks/bench_kernels.py`` measured faster than ``conv`` there (2-5x at batch 8-32) and
    at ``nn.Linear``'s speed on the forms benchmark.  Its other summation order is not
    bit-identical to the mirror: in a training graph, batch statistics (a train-mode BatchNorm
    subtracts batch means in its backward pass) amplify the difference — speechbrain's
    ECAPA-TDNN verified on its example but put gradients 4-10x beyond the original's own float32
    error on other inputs — so training graphs keep the mirrors.  In eval mode the choice is
    speculative: made only under :func:`kernel_policy`, and a program that fails verification
    with it is rebuilt with the mirrors.

    On CPU in float32/float64, a 3-D site with features on axis 1 that is a stem
    ``Conv2d(1, O, (F, 1))`` (``prefer="conv_span"``, its own ``conv2d``) or had no kernel at all
    (a channel-first einsum) runs ``baddbmm`` when the weight is small (``size`` = (F, O),
    ``F * O <=`` :data:`BADDBMM_MAX_FO`): on two CPUs ``benchmarks/bench_kernels.py`` had it 2-5x ahead of
    ``conv`` there, and the forms benchmark ahead of the stem's ``conv2d``. With a larger (or
    unknown) weight ``baddbmm`` fell up to 1.7x behind ``conv`` on the second (AVX-512) CPU; the
    einsum runs ``conv``, and the stem ``conv`` in a training graph (the stem's own ``conv2d``
    training step ran 7-9x slower at (F, O) = (128, 256)) and its own ``conv_span`` otherwise
    (``conv`` ran its forward 4% slower on the second CPU). In bfloat16 the two CPUs disagree
    (``conv`` ahead on one, ``baddbmm`` 2x ahead on the other, where ``conv`` ran the stem 1.2x
    slower than its own ``conv2d``), and CUDA is unmeasured here: there the stem keeps
    ``conv_span``. Other sites with no such kernel: on CUDA ``conv`` (cuDNN); on CPU for a 3-D
    input in reduced precision ``conv``; for 4-5-D inputs ``conv`` in float32/float64, else
    ``prefer`` or ``linear_t``.
    ``optimize(..., autotune=True)`` measures instead.
    """
    d = feature_dim % ndim if ndim else feature_dim
    if ndim == 0 or d == ndim - 1:
        return "addmm" if prefer == "addmm" else "linear"
    full = dtype is None or dtype in (torch.float32, torch.float64)
    cuda = torch.device(device).type == "cuda"
    small = (fo := _known_product(size)) is not None and fo <= BADDBMM_MAX_FO
    cpu_rows = full and not cuda and d == 1 and ndim == 3
    policy = _POLICY.get()
    if prefer == "conv_span" and cpu_rows and not small:
        # the stem's conv2d training step ran 7-9x slower than conv1d's on both CPUs; its
        # forward 1.85x slower on one, 4% faster on the other: train graphs take ``conv``
        return "conv" if policy is not None and policy.training else "conv_span"
    if prefer == "conv_span" and cpu_rows:
        prefer = None  # baddbmm beat the stem's own conv2d on both CPUs, forward and backward
    # (a random op after the site draws in memory order: only a trade that keeps the layout)
    same_layout = prefer not in STRIDED_OUTPUT
    if (prefer in SPECULATIVE and cpu_rows and small and (same_layout or not random_after)
            and policy is not None and policy.speculate):
        policy.speculated.append(prefer)
        return "baddbmm"
    if prefer in MIRRORS and prefer != "addmm":
        return prefer
    if d == 1 and ndim == 3 and not cuda:
        return "baddbmm" if full and small else "conv"
    if d == 1 and 3 <= ndim <= 5 and (full or cuda):
        return "conv"
    if prefer is not None and prefer != "addmm":
        return prefer
    return "linear_t"


def _known_product(size: tuple[Any, Any] | None) -> int | None:
    """``F * O`` when both sizes are known integers (never a guard on a symbolic size)."""
    if size is None or any(isinstance(n, torch.SymInt) for n in size):
        return None
    try:
        return int(size[0]) * int(size[1])
    except (TypeError, ValueError):
        return None


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
