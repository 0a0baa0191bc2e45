"""Peephole: remove runs of free view ops that compose to the identity.

Rewrites leave size-1 axes and transposes that the original form needed (a conv's channel and
kernel axes, the transposes around a channel-first site) next to the user's own inverse ops.  Two
rules, each exact:

* a run of **reshapes** (view/reshape/flatten/unflatten/squeeze/unsqueeze) is a row-major
  regrouping; if it ends with the symbolic shape it started from, it is the identity;
* a run of **permutes** (permute/transpose/movedim/t) whose composed permutation is the identity
  is the identity.

``contiguous()`` inside a run is dropped with it.  With example inputs, shapes come from
:class:`~tdd_fx.shapes.ShapeAnalysis` of the rewritten graph; without, only syntactic inverse
pairs are recognised.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from . import ops
from .shapes import ShapeAnalysis, _movedim, _permute, _transpose

RESHAPE_METHODS = frozenset({"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze",
                             "view_as", "reshape_as"})
PERMUTE_METHODS = frozenset({"permute", "transpose", "swapaxes", "movedim", "t"})
RESHAPE_FUNCTIONS = frozenset({torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze})
PERMUTE_FUNCTIONS = frozenset({torch.permute, torch.transpose, torch.movedim, torch.t})


def _category(n: Any) -> str | None:
    if not isinstance(n, fx.Node) or not n.args or not isinstance(n.args[0], fx.Node):
        return None
    if n.op == "call_method":
        if n.target == "contiguous":
            return "neutral"
        if n.target in RESHAPE_METHODS:
            return "reshape"
        if n.target in PERMUTE_METHODS:
            return "permute"
    if n.op == "call_function":
        if n.target in RESHAPE_FUNCTIONS:
            return "reshape"
        if n.target in PERMUTE_FUNCTIONS:
            return "permute"
    return None


def _apply_perm(n: fx.Node, labels: tuple[int, ...]) -> tuple[int, ...] | None:
    name = n.target if isinstance(n.target, str) else n.target.__name__
    a = list(n.args[1:])
    if any(not isinstance(v, (int, tuple, list)) for v in a):
        return None
    if name in ("transpose", "swapaxes"):
        return _transpose(labels, a[0], a[1])  # type: ignore[arg-type]
    if name == "movedim":
        return _movedim(labels, a[0], a[1])  # type: ignore[arg-type]
    if name == "t":
        return labels[::-1]
    return _permute(labels, a)  # type: ignore[arg-type]


def _is_identity(src: fx.Node, run: list[fx.Node], kind: str, shapes: ShapeAnalysis | None) -> bool:
    if kind == "reshape":
        if shapes is not None:
            a, b = shapes.shape(src), shapes.shape(run[-1])
            # equal forms, computed without any "literal == input dim" assumption (an assumed
            # size is only true on the example: the reshape would be an identity only there)
            return a is not None and a == b and not shapes.assumed.get(run[-1]) \
                and not shapes.assumed.get(src)
        return _syntactic_pair(run)
    rank = None
    if shapes is not None and shapes.shape(src) is not None:
        rank = len(shapes.shape(src))  # type: ignore[arg-type]
    if rank is None:
        return _syntactic_pair(run)
    labels = tuple(range(rank))
    for n in run:
        if _category(n) == "neutral":
            continue
        try:
            got = _apply_perm(n, labels)
        except (IndexError, TypeError):
            return False
        if got is None:
            return False
        labels = got
    return labels == tuple(range(rank))


def _syntactic_pair(run: list[fx.Node]) -> bool:
    ops = [n for n in run if _category(n) != "neutral"]
    if len(ops) != 2:
        return False
    p, n = ops
    if n.target in ("transpose", "swapaxes") and p.target in ("transpose", "swapaxes"):
        return {n.args[1], n.args[2]} == {p.args[1], p.args[2]} and all(
            isinstance(a, int) and a >= 0 for a in (*n.args[1:3], *p.args[1:3]))
    if n.target == "movedim" and p.target == "movedim":
        return (n.args[1], n.args[2]) == (p.args[2], p.args[1])
    if n.target == "squeeze" and p.target == "unsqueeze":
        return len(n.args) > 1 and n.args[1] == p.args[1] and isinstance(n.args[1], int) \
            and n.args[1] >= 0
    return False


def _sink_permute(gm: fx.GraphModule, z: fx.Node, shapes: ShapeAnalysis) -> bool:
    """``permute(tdd(x, fd=k))`` moving axis k last, others in order  ->  ``tdd(x.movedim(k, -1))``:
    the same values, computed directly in the layout the user wants (contiguous output)."""
    if _category(z) != "permute":
        return False
    p = z.args[0]
    if not (p.op == "call_function" and p.target is ops.time_distributed_dense
            and len(p.users) == 1 and shapes.shape(p) is not None):
        return False
    rank = len(shapes.shape(p))  # type: ignore[arg-type]
    k = p.kwargs.get("feature_dim", -1) % rank
    try:
        perm = _apply_perm(z, tuple(range(rank)))
    except (IndexError, TypeError):
        return False
    if k == rank - 1 or perm != tuple(i for i in range(rank) if i != k) + (k,):
        return False
    g = gm.graph
    with g.inserting_before(z):
        moved = g.call_method("movedim", (p.args[0], k, -1))
        new = g.call_function(ops.time_distributed_dense, (moved, *p.args[1:]),
                              {**p.kwargs, "feature_dim": -1, "impl": "linear"})
    new.meta.update(p.meta)
    z.replace_all_uses_with(new)
    g.erase_node(z)
    g.erase_node(p)
    shapes.sym[new] = shapes.sym.get(z)
    shapes.sym[moved] = None
    return True


def simplify(gm: fx.GraphModule, inputs: tuple[Any, ...] | None = None,
             erase: Any = None) -> int:
    """Remove identity runs of view ops; returns how many runs were removed."""
    if not any(_category(n) in ("reshape", "permute") for n in gm.graph.nodes):
        return 0  # nothing to simplify: skip the shape analysis (a run of the whole graph)
    shapes = None
    if inputs is not None:
        shapes = ShapeAnalysis(gm)
        try:
            shapes.analyse(*inputs)
        except Exception:
            shapes = None
    removed = 0
    changed = True
    while changed:
        changed = False
        gone: set[fx.Node] = set()
        for z in list(gm.graph.nodes):
            if z in gone or z.graph is not gm.graph or not z.users and z.op != "output":
                continue
            if shapes is not None and _sink_permute(gm, z, shapes):
                removed += 1
                changed = True
                gone.add(z)
                continue
            kind = _category(z)
            if kind not in ("reshape", "permute"):
                continue
            run = [z]
            src = z.args[0]
            while True:
                if _is_identity(src, run, kind, shapes):
                    z.replace_all_uses_with(src)
                    if erase is not None:
                        erase(run[::-1], gm.graph)
                    gone.update(run)
                    removed += 1
                    changed = True
                    break
                c = _category(src)
                if c not in (kind, "neutral") or len(run) >= 8:
                    break
                run.insert(0, src)
                src = src.args[0]
    return removed

