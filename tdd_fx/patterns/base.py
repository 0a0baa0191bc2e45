"""What every pattern family shares: the matching context, guards, and candidates.

A family is a module with ``PATTERN`` (its name) and ``find(ctx) -> list[Candidate]``.  A
candidate is either *proved* — it carries a ``rewrite`` that replaces its nodes, in a copy of the
graph, by canonical nodes — or *rejected* with a reason a user understands.  Families never touch
the graph they match; :mod:`tdd_fx.rewrite` applies the proved candidates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..guards import Guard
from ..report import Site
from ..shapes import ShapeAnalysis, Sym, SymShape


@dataclass
class Context:
    """What families match against: the captured graph and (with example inputs) its shapes."""

    gm: fx.GraphModule
    shapes: ShapeAnalysis | None
    device: torch.device
    #: nodes an earlier family already made a candidate of
    claimed: set[str] = field(default_factory=set)
    #: traced nodes whose value fixed a loop count (``range(x.size(1))``, ``x.unbind(1)``)
    loop_counts: set[str] = field(default_factory=set)

    def shape(self, node: Any) -> SymShape | None:
        return None if self.shapes is None else self.shapes.shape(node)

    def dtype(self, node: Any) -> torch.dtype | None:
        t = self.shapes.tensor(node) if self.shapes is not None else None
        return None if t is None else t.dtype

    def position(self, node: fx.Node) -> int:
        """The node's index in graph order (computed once per context)."""
        order = self.__dict__.get("_order")
        if order is None:
            order = self.__dict__["_order"] = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        return order[node]

    def assumption_guards(self, nodes: Any) -> list[Guard]:
        """Guards for the "literal == input dim" facts the shapes of ``nodes`` were computed with."""
        out: list[Guard] = []
        if self.shapes is None:
            return out
        for n in nodes:
            if isinstance(n, fx.Node):
                for atom, value in self.shapes.assumed.get(n, ()):
                    g = Guard(atom.owner, (atom.dim,), value)
                    if g not in out:
                        out.append(g)
        return out

    def site(self, pattern: str, status: str, at: fx.Node, x: Any, out: fx.Node,
             reason: str = "", fd: int | None = None, kernel: str = "") -> Site:
        """A report row: ``where`` from the node ``at`` (module path and the user's line), the
        shapes of the input ``x`` and of the result ``out``."""
        from ..capture import node_location, node_module_path

        module, source = node_module_path(at), node_location(at)
        t_in = self.shapes.tensor(x) if self.shapes else None
        t_out = self.shapes.tensor(out) if self.shapes else None
        return Site(pattern, status, (module or at.name) + (f" ({source})" if source else ""),  # type: ignore[arg-type]
                    reason=reason, module=module, source=source, node=out.name,
                    in_shape=None if t_in is None else tuple(t_in.shape),
                    out_shape=None if t_out is None else tuple(t_out.shape), feature_dim=fd,
                    kernel=kernel)

    def module(self, node: fx.Node) -> torch.nn.Module:
        return self.gm.get_submodule(str(node.target))

    def same_size(self, a: Sym, b: Sym, guards: list[Guard]) -> bool:
        """``a == b`` for every input the guards admit.

        Equal symbolic forms are equal everywhere.  A literal equal (on the example) to a product
        of dims of one graph input becomes a guard on that input.  Anything else — two different
        dims that merely happen to be equal on the example — is not equal.
        """
        if a == b:
            return True
        if a.value != b.value:
            return False
        lit, other = (a, b) if a.is_literal else (b, a) if b.is_literal else (None, None)
        if lit is None or other is None or other.coef != 1:
            return False
        owners = {x.owner for x in other.atoms}
        if len(owners) != 1 or not all(x.guardable for x in other.atoms):
            return False
        guards.append(Guard(owners.pop(), tuple(x.dim for x in other.atoms), lit.value))
        return True


Rewrite = Callable[[fx.GraphModule], fx.Node]


@dataclass
class Candidate:
    """One rewrite unit: its sites (one per dense op), and either a rewrite or a reason."""

    pattern: str
    sites: list[Site]
    rewrite: Rewrite | None = None
    reason: str = ""
    guards: list[Guard] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    #: name of the node (in the captured graph) whose value the rewrite's result replaces
    output: str = ""
    #: trace facts (node names) this rewrite makes irrelevant: a loop over ``range(x.size(1))``
    #: that became one node no longer pins ``x.shape[1]``
    releases: set[str] = field(default_factory=set)

    @property
    def proved(self) -> bool:
        return self.rewrite is not None
