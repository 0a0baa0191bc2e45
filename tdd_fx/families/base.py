"""What every pattern family shares: the matching context, the match record, the protocol.

A family is an object with ``pattern`` (the name the report uses) and ``find(ctx)`` returning
:class:`Match` es.  A family checks its conditions as small named functions that each return a
reason a user understands ("" when the condition holds); :func:`first_failure` runs them in
order.  A proved match carries ``emit(rw)``: given a :class:`~tdd_fx.rewrite.Rewriter` over a
fresh copy of the captured graph, it replaces the match's nodes by canonical ones — families never
edit the graph they match.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import sympy
import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from ..capture import Captured, from_tdd, node_location, node_module_path
from ..report import Site

if TYPE_CHECKING:
    from ..rewrite import Rewriter

Emit = Callable[["Rewriter"], None]


@dataclass
class Context:
    """One captured graph, as the families see it."""

    captured: Captured
    #: node names an earlier match already owns
    claimed: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        nodes = list(self.captured.gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(nodes)}
        self.state = {n: target for n, (_, target) in zip(nodes, self.captured.state)}
        fake = detect_fake_mode([n.meta.get("val") for n in nodes if n.op == "placeholder"])
        env = getattr(fake, "shape_env", None)
        #: each symbolic size's value on the example
        values = getattr(env, "backed_var_to_val", None) if env is not None else None
        self.hints: dict[Any, int] = dict(values) if values is not None else {}

    def equal(self, a: Any, b: Any, guards: dict[Any, int]) -> bool:
        """``a == b`` for every size the capture admits, or — when one side is a literal that
        the other equals on the example — for the sizes that ``guards`` (updated here) fix to
        their example values.  Two different symbolic sizes that merely happen to be equal on
        the example are not equal."""
        ea, eb = expr(a).xreplace(guards), expr(b).xreplace(guards)
        if equal_exprs(ea, eb):
            return True
        if not (ea.is_number or eb.is_number):
            return self._equal_fixing_one_side(ea, eb, guards)
        const, other = (ea, eb) if ea.is_number else (eb, ea)
        if other.xreplace(self.hints) != const:
            return False
        for sym in other.free_symbols:
            guards[sym] = int(self.hints[sym])
        return True

    def _equal_fixing_one_side(self, ea: Any, eb: Any, guards: dict[Any, int]) -> bool:
        """``(B·m) // 5 == B`` once ``m`` is fixed to its example value 5 (a literal the user
        wrote, ``view(-1, 5)``, made the capture divide by it): the sizes only one side uses
        are guarded, and only while a size both sides use stays free.  Two bare sizes (``T``
        against ``B``) are never made equal this way."""
        if isinstance(ea, sympy.Symbol) and isinstance(eb, sympy.Symbol):
            return False
        if not ea.free_symbols & eb.free_symbols:
            return False
        one_sided = ea.free_symbols ^ eb.free_symbols
        if not one_sided or any(s not in self.hints for s in one_sided):
            return False
        fix = {s: int(self.hints[s]) for s in one_sided}
        if not equal_exprs(ea.xreplace(fix), eb.xreplace(fix)):
            return False
        guards.update(fix)
        return True

    def equal_shape(self, a: Any, b: Any, guards: dict[Any, int]) -> bool:
        if a is None or b is None:
            return False
        a, b = list(a), list(b)
        trial = dict(guards)
        # pairs with a literal first: the guards they set decide the symbolic pairs
        # (``view(-1, 5)`` against ``(B, m)``: m is fixed to 5, then B·m/5 is B)
        pairs = sorted(zip(a, b), key=lambda p: not (expr(p[0]).is_number or expr(p[1]).is_number))
        if len(a) != len(b) or not all(self.equal(x, y, trial) for x, y in pairs):
            return False
        guards.update(trial)
        return True

    @property
    def graph(self) -> fx.Graph:
        return self.captured.gm.graph

    def val(self, node: Any) -> Any:
        return node.meta.get("val") if isinstance(node, fx.Node) else None

    def shape(self, node: Any) -> tuple[Any, ...] | None:
        v = self.val(node)
        return tuple(v.shape) if isinstance(v, torch.Tensor) else None

    def rank(self, node: Any) -> int | None:
        s = self.shape(node)
        return None if s is None else len(s)

    def state_source(self, node: Any) -> str | None:
        """The ``state_dict``-style name behind ``node`` when it is a parameter, buffer or
        constant, possibly through free views (``t``, ``view``, ``permute``); else None."""
        seen = 0
        while isinstance(node, fx.Node) and seen < 8:
            if node in self.state:
                return self.state[node]
            if node.op != "call_function" or node.target not in _FREE_VIEWS:
                return None
            node = node.args[0]
            seen += 1
        return None

    def unclaimed(self, ops: Any) -> Iterator[fx.Node]:
        """The graph's calls of ``ops`` that no earlier match owns and that are not canonical
        already (a model optimized before): what a family scans."""
        for node in self.graph.nodes:
            if (node.op == "call_function" and node.target in ops
                    and node.name not in self.claimed and not self.canonical(node)):
                yield node

    def canonical(self, node: fx.Node) -> bool:
        """The node came from tdd_fx's own canonical function (a model optimized before)."""
        return from_tdd(node)

    def site(self, pattern: str, status: str, at: fx.Node, x: Any, out: Any,
             reason: str = "", fd: int | None = None, kernel: str = "") -> Site:
        """A report row for the dense op ``at``: module path and user line, example shapes."""
        module, source = node_module_path(at), node_location(at)
        return Site(pattern, status, (module or at.name) + (f" ({source})" if source else ""),  # type: ignore[arg-type]
                    reason=reason, module=module, source=source, node=at.name,
                    in_shape=example_shape(self.shape(x)), out_shape=example_shape(self.shape(out)),
                    feature_dim=fd, kernel=kernel)


aten = torch.ops.aten
_FRAME_FN = re.compile(r'File "([^"]+)", line \d+, in (\w+)')
_FREE_VIEWS = frozenset({aten.t.default, aten.view.default, aten.reshape.default,
                         aten.permute.default, aten.transpose.int, aten.unsqueeze.default,
                         aten.squeeze.dim, aten.squeeze.dims, aten.expand.default,
                         aten.flatten.using_ints, aten.numpy_T.default, aten.detach.default,
                         aten.alias.default, aten._unsafe_view.default,
                         aten.contiguous.default, aten.to.dtype, aten._to_copy.default})


_FUNCTIONAL = os.path.join("torch", "nn", "functional.py")


def op_label(node: fx.Node) -> str:
    """What the user wrote for ``node``: the layer's class (``BatchNorm1d``), the functional
    (``interpolate``) or the ATen op, with the user's line."""
    text = node.meta.get("stack_trace") or ""
    frames = _FRAME_FN.findall(text)
    name = ""
    if frames and _FUNCTIONAL in frames[-1][0]:
        name = frames[-1][1]
    if not name:
        stack = node.meta.get("nn_module_stack") or {}
        cls = str(list(stack.values())[-1][1]) if stack else ""
        if cls.startswith("torch.nn.modules.") or cls.startswith("<class 'torch.nn.modules."):
            name = cls.rsplit(".", 1)[-1].strip("'>")  # a standard layer: its class
    if not name:
        name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    where = node_location(node)
    return name + (f" ({where})" if where else "")


def example_shape(shape: tuple[Any, ...] | None) -> tuple[int, ...] | None:
    """The sizes on the example (a SymInt's hint)."""
    if shape is None:
        return None
    return tuple(int(s.node.hint) if isinstance(s, torch.SymInt) else int(s) for s in shape)


def expr(size: Any) -> Any:
    if isinstance(size, torch.SymInt):
        return size.node.expr
    return size if isinstance(size, sympy.Basic) else sympy.Integer(int(size))


def same(a: Any, b: Any) -> bool:
    """``a == b`` for every size the capture admits (decided symbolically)."""
    return equal_exprs(expr(a), expr(b))


def equal_exprs(a: Any, b: Any) -> bool:
    """Two size expressions are equal for every value of their symbols: the same expression,
    or a difference that sympy simplifies to zero (remembered: a model of repeated blocks asks
    the same questions block after block, and ``simplify`` costs milliseconds)."""
    return a == b or _simplifies_to_zero(a - b)


@functools.lru_cache(maxsize=8192)
def _simplifies_to_zero(e: Any) -> bool:
    return bool(sympy.simplify(e) == 0)


def same_shape(a: Iterable[Any] | None, b: Iterable[Any] | None) -> bool:
    if a is None or b is None:
        return False
    a, b = list(a), list(b)
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def product(sizes: Iterable[Any]) -> Any:
    out: Any = sympy.Integer(1)
    for s in sizes:
        out = out * expr(s)
    return out


def render(shape: Iterable[Any] | None) -> str:
    """Sizes as the user saw them on the example (never the capture's internal symbols)."""
    if shape is None:
        return "?"
    return "(" + ", ".join(str(_hint(s)) for s in shape) + ")"


def _hint(size: Any) -> Any:
    if isinstance(size, torch.SymInt):
        return size.node.hint if size.node.hint is not None else "?"
    return size if not isinstance(size, sympy.Basic) or size.is_number else "?"


Check = Callable[[], str]


def first_failure(*checks: Check) -> str:
    """The reason of the first condition that fails ("" when all hold)."""
    for check in checks:
        reason = check()
        if reason:
            return reason
    return ""


@dataclass
class Match:
    """One rewrite unit: its report rows (one per dense op) and either an emit or a reason."""

    pattern: str
    sites: list[Site]
    nodes: list[str]
    emit: Emit | None = None
    reason: str = ""
    #: sizes the proof fixed to their example values (symbol -> value): checked at call time
    guards: dict[Any, int] = field(default_factory=dict)

    @property
    def proved(self) -> bool:
        return self.emit is not None


class Family(Protocol):
    """A pattern family: finds its sites in a captured graph.  It may also declare ``layers``,
    a tuple of standard ``nn`` layer classes worth capturing alone when their parent cannot be
    captured (a lone ``Conv1d(C, O, 1)`` is a site; a lone ``Linear`` is not)."""

    pattern: str

    def find(self, ctx: Context) -> list[Match]: ...


def rejected(ctx: Context, pattern: str, at: fx.Node, x: Any, out: Any, reason: str,
             nodes: Iterable[fx.Node] = ()) -> Match:
    return Match(pattern, [ctx.site(pattern, "rejected", at, x, out, reason)],
                 [n.name for n in nodes], reason=reason)
