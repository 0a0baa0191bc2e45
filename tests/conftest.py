"""Shared helpers: compare an optimized model with its original, outputs and gradients."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _kernel_cache_in_tmp(tmp_path_factory, monkeypatch) -> None:
    """autotune's on-disk kernel cache goes to a temporary file, never the user's home."""
    path = tmp_path_factory.getbasetemp() / "tdd_fx_kernels.json"
    monkeypatch.setenv("TDD_FX_CACHE", str(path))


def outputs_and_grads(model: torch.nn.Module, inputs: tuple, seed: int = 0) -> dict:
    xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    torch.manual_seed(seed)
    out = model(*xs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)
    params = [p for p in model.parameters() if p.requires_grad]
    leaves = params + [x for x in xs if x.requires_grad]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return {"out": [o.detach() for o in outs], "grads": grads}


def assert_equivalent(opt: torch.nn.Module, model: torch.nn.Module, inputs: tuple, **tol) -> None:
    """Same outputs and same parameter/input gradients (parameters are shared objects)."""
    a = outputs_and_grads(model, inputs)
    b = outputs_and_grads(opt, inputs)
    for x, y in zip(a["out"], b["out"], strict=True):
        torch.testing.assert_close(y, x, **tol)
    for x, y in zip(a["grads"], b["grads"], strict=True):
        if x is None or y is None:
            assert x is None and y is None
        else:
            torch.testing.assert_close(y, x, **tol)


def optimize_twice(model: torch.nn.Module, inputs: tuple,
                   rewritten: int | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``optimize`` and ``optimize`` of its result: the second pass rewrites nothing more.
    ``rewritten``: how many sites the first pass must rewrite."""
    import tdd_fx

    once = tdd_fx.optimize(model, inputs)
    if rewritten is not None:
        assert len(once.tdd_report.rewritten) == rewritten, str(once.tdd_report)
    twice = tdd_fx.optimize(once, inputs)
    assert [s.where for s in twice.tdd_report.rewritten] == []
    return once, twice


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models: with 2 intra-op threads on a loaded 2-core machine OpenMP's spin-waiting
    costs more than it saves.  Files use it with ``pytestmark = usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
