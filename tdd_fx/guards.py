"""Guards: the facts about input shapes that a trace or a proof relied on.

Two sources: a shape-aware trace decides Python control flow on the example (``if x.dim() == 3``,
``range(x.size(1))``) — each decision is a :class:`~tdd_fx.capture.Fact`; and a proof may match a
literal size against an input dim (``view(16, 50, F)``).  Both end as :class:`Guard` s checked at the
entry of the optimized graph by :func:`tdd_fx.ops.check_input`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from . import ops
from .shapes import Atom, ShapeAnalysis, Sym


class UnguardableFact(Exception):
    """Control flow depended on tensor *data* (or a size we cannot check at the entry)."""


@dataclass(frozen=True)
class Guard:
    """``prod(placeholder.shape[d] for d in dims) == value``."""

    placeholder: str
    dims: tuple[int, ...]
    value: int
    releasable: bool = field(default=False, compare=False)
    #: the traced node whose value Python decided on (for guards that come from the trace)
    fact: str = field(default="", compare=False)

    def __str__(self) -> str:
        return " * ".join(f"{self.placeholder}.shape[{d}]" for d in self.dims) + f" == {self.value}"


def _is_metadata(n: fx.Node) -> bool:
    return (n.op == "call_method" and n.target in ("size", "dim", "numel")) or (
        n.op == "call_function" and n.target is getattr and n.args[1] in ("shape", "ndim")
    )


def _atoms_behind(n: fx.Node, shapes: ShapeAnalysis, seen: set[fx.Node]) -> list[Atom]:
    """The input dims an int/bool value was computed from; raises on a data dependence."""
    if n in seen:
        return []
    seen.add(n)
    sym = shapes.sym.get(n)
    if isinstance(sym, Sym):
        return list(sym.atoms)
    if _is_metadata(n):
        if n.target in ("dim", "ndim") or n.args[1:2] == ("ndim",):
            return []  # the rank: always guarded
        if isinstance(sym, tuple):
            return [a for s in sym if isinstance(s, Sym) for a in s.atoms]
    if isinstance(shapes.values.get(n), torch.Tensor):
        raise UnguardableFact(f"{n.name} is computed from tensor data")
    if n.op == "placeholder":
        raise UnguardableFact(f"it depends on the argument {n.name!r}, which is not a tensor "
                              "size that can be checked")
    out: list[Atom] = []
    for a in n.all_input_nodes:
        out.extend(_atoms_behind(a, shapes, seen))
    return out


def facts_to_guards(facts: Iterable[Any], shapes: ShapeAnalysis) -> list[Guard]:
    """Each fact pins the input dims it was computed from to their example values.

    Guards from loop counts (``range(x.size(1))``, iterating ``x.unbind(1)``) are marked
    ``releasable``: a rewrite that re-rolls the loop makes them irrelevant.
    """
    guards: list[Guard] = []
    for f in facts:
        n = f.node
        if f.kind == "len":
            sym = shapes.sym.get(n)
            value = shapes.values.get(n)
            if isinstance(value, torch.Tensor) and isinstance(sym, tuple):
                atoms = list(sym[0].atoms) if sym else []  # iterating a tensor: its first dim
            elif isinstance(sym, tuple):
                atoms = []  # a shape tuple: its length is the rank
            else:  # unbind/split/chunk results and other sequences: their inputs' dims
                atoms = _sequence_atoms(n, shapes)
        else:
            try:
                atoms = _atoms_behind(n, shapes, set())
            except UnguardableFact as exc:
                raise UnguardableFact(
                    f"control flow depends on tensor values ({exc}) at {f.where or n.name}"
                ) from None
        for a in atoms:
            if not a.guardable:
                raise UnguardableFact(f"control flow depends on {a} at {f.where or n.name}, "
                                      "which is not an input size")
            g = Guard(a.owner, (a.dim,), a.value, releasable=f.kind in ("int", "len"),
                      fact=n.name)
            if g.releasable or g not in guards:  # each loop count separately: each may go
                guards.append(g)
    return guards


def _sequence_atoms(n: fx.Node, shapes: ShapeAnalysis) -> list[Atom]:
    src = n.args[0] if n.args else None
    sym = shapes.shape(src)
    if sym is None:
        raise UnguardableFact(f"the length of {n.name} depends on something we cannot follow")
    dim = n.kwargs.get("dim", n.args[1] if n.op == "call_method" and n.target == "unbind"
                       and len(n.args) > 1 else n.args[2] if len(n.args) > 2 else 0)
    if isinstance(dim, int) and -len(sym) <= dim < len(sym):
        return list(sym[dim].atoms)
    return [a for s in sym for a in s.atoms]


def insert_guards(gm: fx.GraphModule, ranks: dict[str, int], guards: Iterable[Guard]) -> list[str]:
    """At the graph entry, check each input's rank and the sizes the trace and proofs relied on."""
    by_input: dict[str, list[tuple[tuple[int, ...], int]]] = {}
    for gd in guards:
        entry = (gd.dims, gd.value)
        if entry not in by_input.setdefault(gd.placeholder, []):
            by_input[gd.placeholder].append(entry)
    described = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for ph in placeholders:
        if ph.name not in ranks:
            continue
        sizes = tuple(by_input.get(ph.name, []))
        with gm.graph.inserting_after(placeholders[-1]):
            chk = gm.graph.call_function(ops.check_input, (ph, ranks[ph.name], sizes, ph.name))
        ph.replace_all_uses_with(chk, delete_user_cb=lambda u, c=chk: u is not c)
        described.append(f"{ph.name}.dim() == {ranks[ph.name]}")
        described.extend(
            " * ".join(f"{ph.name}.shape[{d}]" for d in dims) + f" == {v}" for dims, v in sizes
        )
    return described
