"""Example inputs the way users call their models: positional and keyword arguments, nested
tuples/lists/dicts of tensors, and non-tensor leaves (``None``, bools, numbers, strings, dtypes,
devices) held constant.

:class:`Example` is what every stage passes around; it mirrors ``torch.export.export(mod, args,
kwargs)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

SEED = 0x7DD


@dataclass(frozen=True)
class Example:
    """One call of the model: ``model(*args, **kwargs)``."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def leaves(self) -> list[Any]:
        return pytree.tree_leaves((self.args, self.kwargs))

    def tensors(self) -> list[Tensor]:
        return [x for x in self.leaves() if isinstance(x, Tensor)]

    def map(self, fn: Callable[[Tensor], Any]) -> Example:
        """The same call with every tensor leaf replaced by ``fn(leaf)``."""
        args, kwargs = pytree.tree_map_only(Tensor, fn, (self.args, self.kwargs))
        return Example(tuple(args), dict(kwargs))

    def clone(self) -> Example:
        """Fresh tensors (so a forward that writes to its inputs cannot reach the caller's)."""
        return self.map(lambda t: t.detach().clone())

    def call(self, fn: Callable[..., Any]) -> Any:
        return fn(*self.args, **self.kwargs)

    def summary(self) -> str:
        parts = [_leaf_summary(x) for x in self.args]
        parts += [f"{k}={_leaf_summary(v)}" for k, v in self.kwargs.items()]
        return ", ".join(parts)


def _leaf_summary(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"{tuple(x.shape)}:{str(x.dtype).replace('torch.', '')}"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_leaf_summary(v) for v in x) + "]"
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k}: {_leaf_summary(v)}" for k, v in x.items()) + "}"
    if x is None or isinstance(x, (bool, int, float, str)):
        return repr(x)
    return type(x).__name__


_LEAF_TYPES = (Tensor, bool, int, float, str, type(None), torch.dtype, torch.device)


def make_example(example_inputs: Any, example_kwargs: Mapping[str, Any] | None) -> Example | None:
    """Validate and normalise what the user passed (``None`` when no example was given).

    Raises ``TypeError`` naming the offending leaf for anything that is not a pytree of tensors
    and plain constants, and ``ValueError`` for tensors tdd_fx cannot run (sparse, meta,
    quantized).
    """
    if example_inputs is None and not example_kwargs:
        return None
    if example_inputs is None:
        example_inputs = ()
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, (dict, str)) or not isinstance(example_inputs, Sequence):
        raise TypeError("example_inputs must be a tuple of positional arguments (like "
                        f"torch.export), got {type(example_inputs).__name__}; pass keyword "
                        "arguments as example_kwargs")
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise TypeError(f"example_kwargs must be a dict, got {type(example_kwargs).__name__}")
    example = Example(tuple(example_inputs), dict(example_kwargs or {}))
    leaves, _ = pytree.tree_flatten_with_path((example.args, example.kwargs))
    for path, leaf in leaves:
        where = _path_name(path)
        if not isinstance(leaf, _LEAF_TYPES):
            raise TypeError(f"example input {where} is of type {type(leaf).__name__}: example "
                            "inputs must be tensors, or tuples/lists/dicts of them, with None/"
                            "bool/int/float/str/dtype/device constants")
        if isinstance(leaf, Tensor):
            _check_tensor(leaf, where)
    if not example.tensors():
        raise TypeError("example inputs contain no tensor")
    return example


def _check_tensor(t: Tensor, where: str) -> None:
    if t.layout != torch.strided:
        raise ValueError(f"example input {where} is a {t.layout} tensor: tdd_fx needs dense "
                         "(strided) tensors; pass x.to_dense()")
    if t.is_meta:
        raise ValueError(f"example input {where} is on the meta device: tdd_fx runs the model "
                         "to verify it, so it needs real data")
    if t.is_quantized:
        raise ValueError(f"example input {where} is quantized ({t.dtype}): tdd_fx works on "
                         "float models; pass x.dequantize()")


def _path_name(path: tuple[Any, ...]) -> str:
    """``args[0]['mask']`` style name of a leaf from its pytree key path."""
    if not path:
        return "input"
    head, *rest = path
    top = "args" if getattr(head, "idx", None) == 0 else "kwargs"
    name = top + "".join(str(k) for k in rest)
    if top == "kwargs" and rest:
        first = rest[0]
        key = getattr(first, "key", None)
        name = str(key) + "".join(str(k) for k in rest[1:]) if key is not None else name
    return name


def leaf_names(example: Example) -> list[str]:
    leaves, _ = pytree.tree_flatten_with_path((example.args, example.kwargs))
    return [_path_name(p) for p, _ in leaves]


def resized_to(example: Example, sizes: dict[tuple[int, int], int], seed: int = SEED) -> Example:
    """The example with the given (leaf, axis) -> size, random data of the same statistics."""
    g = torch.Generator().manual_seed(seed)
    leaves, spec = pytree.tree_flatten((example.args, example.kwargs))
    out = []
    for i, x in enumerate(leaves):
        if isinstance(x, Tensor) and any(k[0] == i for k in sizes):
            shape = [sizes.get((i, d), s) for d, s in enumerate(x.shape)]
            x = like(x, shape, g)
        out.append(x)
    args, kwargs = pytree.tree_unflatten(out, spec)
    return Example(tuple(args), dict(kwargs))


def like(x: Tensor, shape: Sequence[int], g: torch.Generator) -> Tensor:
    """Random data shaped ``shape`` with ``x``'s dtype, device and (finite) statistics."""
    if x.is_floating_point() or x.is_complex():
        finite = x.detach().double()
        finite = finite[torch.isfinite(finite)] if finite.numel() else finite
        std = float(finite.std()) if finite.numel() > 1 else 1.0
        mean = float(finite.mean()) if finite.numel() else 0.0
        std = std if 0 < std < 1e6 else 1.0
        mean = mean if abs(mean) < 1e6 else 0.0
        y = (torch.randn(list(shape), generator=g, dtype=torch.float64) * std + mean).to(x)
    elif x.dtype == torch.bool:
        y = (torch.rand(list(shape), generator=g) < 0.5).to(x.device)
    else:
        lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 1)
        y = torch.randint(lo, hi + 1, list(shape), generator=g, dtype=x.dtype).to(x.device)
    return laid_out_as(y, x)


def laid_out_as(y: Tensor, x: Tensor) -> Tensor:
    """``y`` (contiguous) laid out in memory as ``x`` is: contiguous, channels-last, or its axes
    in the order of ``x``'s strides.  Verifying on other sizes in the example's layout: a graph
    whose results depend on the layout runs only on the example's (see ``program.py``)."""
    if x.dim() < 2 or x.is_contiguous() or y.dim() != x.dim():
        return y
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return y.contiguous(memory_format=torch.channels_last)
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))
    return y.permute(*order).contiguous().permute(*[order.index(d) for d in range(x.dim())])
