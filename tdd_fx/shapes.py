"""Symbolic sizes: what each size in the graph *is*, not only what it was on the example.

Running the captured graph once on the example inputs gives every node's concrete value; alongside,
each tensor's shape and each Python int computed from shapes gets a symbolic form — a monomial
``coef * a1 * a2 * ...`` over *atoms*, the dims of the graph inputs (``x.shape[0]``, ...).  Proofs
compare symbolic forms, so ``view(x.size(0), -1, out)`` is known to restore ``x.shape[0]`` for any
batch size, while a literal ``view(16, 50, out)`` only matches the example (and becomes a guard).

Every symbolic form is checked against the concrete value it claims to describe; a form that
disagrees (an op whose shape rule we do not know) is replaced by fresh *opaque* atoms, which prove
nothing.  So a missing or wrong rule can cost a rewrite, never correctness.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import ops
from ._state import preserved


@dataclass(frozen=True, order=True)
class Atom:
    """One dim of a graph input (``guardable``) or of an op output we cannot follow (opaque)."""

    owner: str
    dim: int
    value: int = field(compare=False)
    guardable: bool = field(compare=False, default=True)

    def __str__(self) -> str:
        return f"{self.owner}.shape[{self.dim}]"


@dataclass(frozen=True)
class Sym:
    """``coef * prod(atoms)``; atoms sorted, so equal forms compare equal."""

    coef: int
    atoms: tuple[Atom, ...] = ()

    @staticmethod
    def lit(n: int) -> Sym:
        return Sym(int(n))

    @staticmethod
    def of(a: Atom) -> Sym:
        return Sym(1, (a,))

    @property
    def value(self) -> int:
        return self.coef * math.prod(a.value for a in self.atoms)

    @property
    def is_literal(self) -> bool:
        return not self.atoms

    def __mul__(self, other: Sym) -> Sym:
        return Sym(self.coef * other.coef, tuple(sorted(self.atoms + other.atoms)))

    def divide(self, other: Sym) -> Sym | None:
        """Exact division, or None when ``other`` does not divide ``self`` symbolically."""
        if other.coef == 0 or self.coef % other.coef:
            return None
        rest = list(self.atoms)
        for a in other.atoms:
            if a not in rest:
                return None
            rest.remove(a)
        return Sym(self.coef // other.coef, tuple(rest))

    def render(self, names: dict[Atom, str] | None = None) -> str:
        names = names or {}
        parts = [names.get(a, str(a)) for a in self.atoms]
        if self.coef != 1 or not parts:
            parts.insert(0, str(self.coef))
        return "·".join(parts)


SymShape = tuple[Sym, ...]


class Multi(tuple):  # type: ignore[type-arg]
    """The shapes of a module's tuple output, e.g. an RNN's ``(output, h_n)`` (None: unknown)."""


def prod(syms: tuple[Sym, ...] | list[Sym]) -> Sym:
    out = Sym.lit(1)
    for s in syms:
        out = out * s
    return out


def render_shape(shape: SymShape, names: dict[Atom, str] | None = None) -> str:
    return "(" + ", ".join(s.render(names) for s in shape) + ")"


# --- shape rules -----------------------------------------------------------------------------

#: Ops whose output has the shape of their (first) tensor input.
SHAPE_PRESERVING_METHODS = frozenset(
    {"contiguous", "clone", "relu", "tanh", "sigmoid", "float", "double", "half", "bfloat16",
     "to", "type_as", "detach", "neg", "abs", "exp", "sqrt", "softmax", "log_softmax"}
)
RESHAPE_METHODS = frozenset({"view", "reshape"})


def _lit(a: Any) -> int:
    """A dim argument must be a literal int; a dim computed at run time proves nothing."""
    if isinstance(a, Sym) and a.is_literal:
        return a.coef
    raise ValueError(f"not a literal int: {a!r}")


def _norm_dim(d: int, n: int) -> int:
    return d + n if d < 0 else d


def divide_assuming(total: Sym, known: Sym, assume: list[tuple[Atom, int]]) -> Sym | None:
    """``total / known``; when a literal in ``known`` only divides ``total`` on the example, cancel
    input dims of equal value (the feature axis first) and record each as an assumption."""
    q = total.divide(known)
    if q is not None:
        return q
    rest = list(total.atoms)
    for a in known.atoms:
        if a not in rest:
            return None
        rest.remove(a)
    coef, need = total.coef, known.coef
    g = math.gcd(coef, need)
    coef, need = coef // g, need // g
    made: list[tuple[Atom, int]] = []
    while need > 1:
        pick = next((a for a in reversed(rest)
                     if a.guardable and a.value > 1 and need % a.value == 0), None)
        if pick is None:
            return None
        rest.remove(pick)
        need //= pick.value
        made.append((pick, pick.value))
    assume.extend(made)
    return Sym(coef, tuple(rest))


def _reshape(src: SymShape, sizes: Any, assume: list[tuple[Atom, int]] | None = None
             ) -> SymShape | None:
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    if not all(isinstance(s, Sym) for s in sizes):
        return None
    total = prod(src)
    minus = [i for i, s in enumerate(sizes) if s.is_literal and s.coef == -1]
    if len(minus) > 1:
        return None
    if minus:
        known = prod([s for i, s in enumerate(sizes) if i != minus[0]])
        missing = divide_assuming(total, known, [] if assume is None else assume)
        if missing is None:
            return None
        sizes = list(sizes)
        sizes[minus[0]] = missing
    return tuple(sizes)


def _flatten(src: SymShape, start: int = 0, end: int = -1) -> SymShape:
    if not src:
        return (Sym.lit(1),)
    s, e = _norm_dim(start, len(src)), _norm_dim(end, len(src))
    return src[:s] + (prod(src[s : e + 1]),) + src[e + 1 :]


def _unflatten(src: SymShape, dim: int, sizes: Any) -> SymShape | None:
    d = _norm_dim(dim, len(src))
    inner = _reshape((src[d],), tuple(sizes))
    return None if inner is None else src[:d] + inner + src[d + 1 :]


def _permute(src: SymShape, perm: Any) -> SymShape:
    if len(perm) == 1 and isinstance(perm[0], (tuple, list)):
        perm = perm[0]
    return tuple(src[_norm_dim(p, len(src))] for p in perm)


def _transpose(src: SymShape, a: int, b: int) -> SymShape:
    a, b = _norm_dim(a, len(src)), _norm_dim(b, len(src))
    out = list(src)
    out[a], out[b] = out[b], out[a]
    return tuple(out)


def _movedim(src: SymShape, a: int, b: int) -> SymShape:
    a, b = _norm_dim(a, len(src)), _norm_dim(b, len(src))
    out = list(src)
    out.insert(b, out.pop(a))
    return tuple(out)


def _known(s: Sym) -> bool:
    return all(a.guardable for a in s.atoms)


def _broadcast(shapes: list[Any]) -> SymShape | None:
    """The broadcast shape of elementwise operands.  Where two operands name the same size
    differently (equal on the example), the one we can follow wins over an opaque one: they must
    be equal (or the op fails loudly) for any input."""
    shapes = [sh for sh in shapes if all(isinstance(v, Sym) for v in sh)]
    if not shapes:
        return None
    rank = max(len(sh) for sh in shapes)
    out: list[Sym] = []
    for i in range(rank):
        dims = [sh[len(sh) - rank + i] for sh in shapes if len(sh) - rank + i >= 0]
        big = [d for d in dims if not (d.is_literal and d.coef == 1)] or dims[:1]
        if len({d.value for d in big}) != 1:
            return None
        out.append(next((d for d in big if _known(d)), big[0]))
    return tuple(out)


def _conv_shape(x: SymShape, out_channels: int, k: Any, stride: Any, padding: Any,
                dilation: Any) -> SymShape | None:
    """Shape of a convolution's output: a spatial size is followed symbolically where the kernel
    is neutral (1, stride 1, no padding), computed where the input size is a literal."""
    nd = len(k)
    if len(x) not in (nd + 1, nd + 2):
        return None
    lead = x[:-nd - 1]
    out = []
    for i in range(nd):
        size = x[len(x) - nd + i]
        pad = padding if isinstance(padding, str) else padding[i]
        if pad == "valid":
            pad = 0
        if pad == "same" or k[i] == 1 and stride[i] == 1 and pad == 0:
            out.append(size)
        elif size.is_literal:
            out.append(Sym.lit((size.coef + 2 * pad - dilation[i] * (k[i] - 1) - 1) // stride[i] + 1))
        else:
            return None
    return tuple(lead) + (Sym.lit(out_channels),) + tuple(out)


def _matmul(a: SymShape, b: SymShape) -> SymShape | None:
    """Shape of ``a @ b`` (both at least 2-D; batch dims must already agree or be absent)."""
    if len(a) < 2 or len(b) < 2:
        return None
    if len(b) == 2:
        return a[:-1] + (b[-1],)
    if len(a) == 2:
        return b[:-2] + (a[0], b[-1])
    if a[:-2] == b[:-2]:
        return a[:-1] + (b[-1],)
    return None


def _einsum(eq: Any, operands: Any) -> SymShape | None:
    if len(operands) == 1 and isinstance(operands[0], tuple) and operands[0] and isinstance(
            operands[0][0], tuple):
        operands = operands[0]
    if not isinstance(eq, str) or "->" not in eq or "." in eq:
        return None
    ins, out = eq.replace(" ", "").split("->")
    sizes: dict[str, Sym] = {}
    for spec, shape in zip(ins.split(","), operands):
        if not isinstance(shape, tuple) or len(spec) != len(shape):
            return None
        for ch, sz in zip(spec, shape):
            sizes.setdefault(ch, sz)
    return tuple(sizes[ch] for ch in out)


def _index(src: SymShape, idx: Any) -> SymShape | None:
    """Shape of ``x[idx]`` for ints, full slices, one-step slices and None (no tensors)."""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if sum(1 for i in items if i is Ellipsis) > 1:
        return None
    if Ellipsis in items:
        k = items.index(Ellipsis)
        fill = len(src) - (len(items) - 1 - items.count(None))
        items = items[:k] + [slice(None)] * fill + items[k + 1:]
    out: list[Sym] = []
    d = 0
    for i in items:
        if i is None:
            out.append(Sym.lit(1))
            continue
        if d >= len(src):
            return None
        if isinstance(i, bool) or not isinstance(i, (int, slice)):
            return None
        if isinstance(i, int):
            d += 1
            continue
        if i == slice(None):
            out.append(src[d])
        elif isinstance(i.start, int) and i.stop == i.start + 1 and i.step in (None, 1) \
                and i.start >= 0:
            out.append(Sym.lit(1))
        elif src[d].is_literal:
            out.append(Sym.lit(len(range(src[d].coef)[i])))
        else:
            return None
        d += 1
    return tuple(out) + tuple(src[d:])


def _unsqueeze(src: SymShape, d: int) -> SymShape:
    d = _norm_dim(d, len(src) + 1)
    return src[:d] + (Sym.lit(1),) + src[d:]


def _squeeze(src: SymShape, *dims: Any) -> SymShape | None:
    if not dims:
        return None  # depends on which sizes are 1 at run time
    ds = dims[0] if isinstance(dims[0], (tuple, list)) else dims
    ds = {_norm_dim(d, len(src)) for d in ds}
    out = []
    for i, s in enumerate(src):
        if i in ds and s.is_literal and s.coef == 1:
            continue
        if i in ds and not s.is_literal:
            return None
        out.append(s)
    return tuple(out)


POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.ELU, nn.CELU, nn.SELU,
    nn.LeakyReLU, nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.AlphaDropout, nn.Tanhshrink, nn.Softsign, nn.LogSigmoid,
)
POINTWISE_FUNCTIONS: frozenset[Any] = frozenset(
    {torch.relu, F.relu, torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.gelu, F.silu, F.elu,
     F.leaky_relu, F.softplus, F.mish, F.hardswish, F.relu6, F.dropout, F.celu, F.selu,
     torch.abs, torch.exp, torch.neg}
)
SCALAR_ARITH = frozenset({operator.add, operator.sub, operator.mul, operator.truediv})


class ShapeAnalysis(fx.Interpreter):
    """Run a graph on example inputs; record concrete values and symbolic shapes of every node."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.values: dict[fx.Node, Any] = {}
        self.sym: dict[fx.Node, Any] = {}
        #: facts "input dim == literal" each node's symbolic form relies on (transitively)
        self.assumed: dict[fx.Node, frozenset[tuple[Atom, int]]] = {}
        self._assume: list[tuple[Atom, int]] = []

    # results ----------------------------------------------------------------------------
    def shape(self, node: Any) -> SymShape | None:
        s = self.sym.get(node) if isinstance(node, fx.Node) else None
        return s if isinstance(s, tuple) and all(isinstance(x, Sym) for x in s) else None

    def tensor(self, node: Any) -> torch.Tensor | None:
        v = self.values.get(node) if isinstance(node, fx.Node) else None
        return v if isinstance(v, torch.Tensor) else None

    # running ----------------------------------------------------------------------------
    def analyse(self, *inputs: Any) -> None:
        with preserved([self.module]), torch.no_grad():
            self.run(*inputs)

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.values[n] = _summary(result)
        self._assume = []
        try:
            sym = self._rule(n, result)
        except Exception:  # a rule that does not apply to these arguments proves nothing
            sym = None
        self.sym[n] = checked = _checked(n, sym, result)
        inherited = frozenset().union(*(self.assumed.get(a, frozenset())
                                        for a in n.all_input_nodes))
        self.assumed[n] = inherited | (frozenset(self._assume) if checked is sym else frozenset())
        return result

    def _stacked(self, n: fx.Node, new_axis: bool) -> SymShape | None:
        """``stack``/``cat`` of equal pieces.  When the pieces are the steps of a loop over
        ``x``'s axis ``a`` (``x[:, t]``, ``x.unbind(a)``, ...), the new size is ``x.shape[a]``
        itself, not the literal count, so later code keeps following the input's size."""
        items = n.args[0]
        if not isinstance(items, (list, tuple)) or not items:
            return None
        shapes = [self.sym.get(i) if isinstance(i, fx.Node) else None for i in items]
        if any(not isinstance(sh, tuple) for sh in shapes) or len({len(sh) for sh in shapes}) != 1:
            return None
        rank = len(shapes[0]) + (1 if new_axis else 0)
        d = _norm_dim(n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0), rank)
        count = self._loop_count(items) or Sym.lit(len(items))
        if new_axis:
            if any(sh != shapes[0] for sh in shapes):
                return None
            return shapes[0][:d] + (count,) + shapes[0][d:]
        rest = [sh[:d] + sh[d + 1:] for sh in shapes]
        if any(r != rest[0] for r in rest):
            return None
        along = [sh[d] for sh in shapes]
        if all(x == Sym.lit(1) for x in along):
            total = count
        elif all(x.is_literal for x in along):
            total = Sym.lit(sum(x.coef for x in along))
        else:
            return None
        return shapes[0][:d] + (total,) + shapes[0][d + 1:]

    def _loop_count(self, items: Any) -> Sym | None:
        """``x.shape[a]`` when the items are computed from steps 0..n-1 of ``x`` along ``a``."""
        found = []
        for k, item in enumerate(items):
            cur, hit = item, None
            for _ in range(32):
                if not isinstance(cur, fx.Node) or not cur.args:
                    break
                if cur.op == "call_function" and cur.target is operator.getitem and \
                        isinstance(cur.args[0], fx.Node):
                    src, idx = cur.args
                    if isinstance(idx, int) and getattr(src.target, "__name__", src.target) in (
                            "unbind", "split", "chunk"):
                        a = src.kwargs.get("dim", src.args[-1] if len(src.args) > 1 else 0)
                        if getattr(src.target, "__name__", src.target) != "unbind":
                            a = src.kwargs.get("dim", src.args[2] if len(src.args) > 2 else 0)
                        hit = (src.args[0], a, idx)
                        break
                    items_ = idx if isinstance(idx, tuple) else (idx,)
                    picked = [(j, i) for j, i in enumerate(items_) if i != slice(None)]
                    if len(picked) == 1:
                        j, i = picked[0]
                        if isinstance(i, int):
                            hit = (src, j, i)
                        elif isinstance(i, slice) and isinstance(i.start, int) and \
                                i.stop == i.start + 1:
                            hit = (src, j, i.start)
                    break
                cur = cur.args[0] if isinstance(cur.args[0], fx.Node) else (
                    cur.args[1] if len(cur.args) > 1 else None)
            if hit is None or hit[2] != k:
                return None
            found.append(hit[:2])
        if len(set(found)) != 1:
            return None
        src, a = found[0]
        shape = self.sym.get(src)
        if not isinstance(shape, tuple) or not isinstance(a, int) or not -len(shape) <= a < len(shape):
            return None
        count = shape[a]
        return count if count.value == len(items) else None

    def _arg(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return self.sym.get(a)
        if isinstance(a, bool):
            return a
        if isinstance(a, int):
            return Sym.lit(a)
        if isinstance(a, (tuple, list)):
            return tuple(self._arg(x) for x in a)
        return a

    def _rule(self, n: fx.Node, result: Any) -> Any:  # noqa: C901 - a table of cases
        args = [self._arg(a) for a in n.args]
        kw = {k: self._arg(v) for k, v in n.kwargs.items()}
        first = args[0] if args else None
        if n.op == "placeholder":
            if isinstance(result, torch.Tensor):
                return tuple(Sym.of(Atom(n.name, i, int(s))) for i, s in enumerate(result.shape))
            return None
        if n.op == "get_attr":  # parameters and buffers have fixed shapes
            return tuple(Sym.lit(v) for v in result.shape) if isinstance(result, torch.Tensor) \
                else None
        if n.op == "call_method":
            m = n.target
            if m == "size":
                d = args[1] if len(args) > 1 else kw.get("dim")
                return first if d is None else first[_norm_dim(_lit(d), len(first))]
            if m == "dim":
                return Sym.lit(len(first))
            if m in SHAPE_PRESERVING_METHODS:
                return first
            if m in RESHAPE_METHODS:
                return _reshape(first, args[1:] or (kw.get("shape") or kw.get("size"),),
                                self._assume)
            if m in ("view_as", "reshape_as", "expand_as"):
                return args[1]
            if m == "flatten":
                return _flatten(first, *[_lit(a) for a in args[1:]],
                                **{k: _lit(v) for k, v in kw.items()})
            if m == "unflatten":
                return _unflatten(first, _lit(args[1]), args[2])
            if m == "permute":
                dims = args[1] if isinstance(args[1], tuple) else args[1:]
                return _permute(first, [_lit(a) for a in dims])
            if m in ("transpose", "swapaxes"):
                return _transpose(first, _lit(args[1]), _lit(args[2]))
            if m == "t":
                return first[::-1]
            if m == "movedim":
                return _movedim(first, _lit(args[1]), _lit(args[2]))
            if m == "unsqueeze":
                return _unsqueeze(first, _lit(args[1] if len(args) > 1 else kw["dim"]))
            if m == "squeeze":
                return _squeeze(first, *[_lit(a) for a in args[1:]])
            if m in ("matmul", "mm", "bmm"):
                return _matmul(first, args[1])
            if m == "expand":
                sizes = args[1] if len(args) == 2 and isinstance(args[1], tuple) else args[1:]
                lead = len(sizes) - len(first)
                return tuple(first[i - lead] if (s.is_literal and s.coef == -1) else s
                             for i, s in enumerate(sizes))
            return None
        if n.op == "call_function":
            f = n.target
            if f is getattr and args[1] == "shape":
                return first
            if f is getattr and args[1] == "ndim":
                return Sym.lit(len(first))
            if f is operator.getitem and isinstance(self.values.get(n.args[0]), torch.Tensor):
                return _index(first, n.args[1])
            if f is operator.getitem and isinstance(first, Multi) and isinstance(n.args[1], int):
                return first[n.args[1]]
            if f is operator.getitem and isinstance(first, tuple) and isinstance(n.args[0], fx.Node):
                idx = n.args[1]
                if isinstance(idx, int) and all(isinstance(s, Sym) for s in first):
                    return first[idx]
                if isinstance(idx, slice):
                    return first[idx]
                return None
            if f is operator.add and isinstance(first, tuple) and isinstance(args[1], tuple) \
                    and not isinstance(result, torch.Tensor):
                return first + args[1]  # torch.Size concatenation
            if f is torch.addmm:
                return (args[1][0], args[2][1])
            if f in (torch.mm, torch.matmul, operator.matmul, torch.bmm):
                return _matmul(first, args[1])
            if f is torch.baddbmm:
                return _matmul(args[1], args[2])
            if f is torch.einsum:
                return _einsum(n.args[0], args[1:])
            if f in (torch.stack, torch.cat, torch.concat):
                return self._stacked(n, f is torch.stack)
            if f is operator.mul and isinstance(first, Sym) and isinstance(args[1], Sym):
                return first * args[1]
            if f is operator.floordiv and isinstance(first, Sym) and isinstance(args[1], Sym):
                return divide_assuming(first, args[1], self._assume)
            if f in (torch.reshape,):
                return _reshape(first, args[1:], self._assume)
            if f is torch.flatten:
                return _flatten(first, *[_lit(a) for a in args[1:]],
                                **{k: _lit(v) for k, v in kw.items()})
            if f is torch.transpose:
                return _transpose(first, _lit(args[1]), _lit(args[2]))
            if f is torch.permute:
                return _permute(first, [_lit(a) for a in args[1]])
            if f is torch.movedim:
                return _movedim(first, _lit(args[1]), _lit(args[2]))
            if f is torch.unsqueeze:
                return _unsqueeze(first, _lit(args[1]))
            if f is torch.squeeze:
                return _squeeze(first, *[_lit(a) for a in args[1:]])
            if f in (F.conv1d, F.conv2d, F.conv3d) and isinstance(first, tuple):
                w = self.tensor(n.args[1] if len(n.args) > 1 else n.kwargs.get("weight"))
                a = dict(zip(["stride", "padding", "dilation"], n.args[3:6])) | dict(n.kwargs)
                nd = len(first) - 2 if len(first) > 2 else 1
                tup = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd  # noqa: E731
                return None if w is None else _conv_shape(
                    first, w.shape[0], tuple(w.shape[2:]), tup(a.get("stride", 1)),
                    a.get("padding", 0) if isinstance(a.get("padding", 0), str)
                    else tup(a.get("padding", 0)), tup(a.get("dilation", 1)))
            if f in (F.linear, torch._C._nn.linear):
                w = self.tensor(n.args[1] if len(n.args) > 1 else n.kwargs.get("weight"))
                return None if w is None else first[:-1] + (Sym.lit(w.shape[0]),)
            if f is ops.check_input:
                return first
            if f is ops.time_distributed_dense:
                w = self.tensor(n.args[1])
                d = _norm_dim(n.kwargs.get("feature_dim", -1), len(first))
                return None if w is None else first[:d] + (Sym.lit(w.shape[0]),) + first[d + 1 :]
            if f in POINTWISE_FUNCTIONS or f in (F.softmax, F.log_softmax, F.layer_norm):
                return first
            if f in SCALAR_ARITH or f in (torch.add, torch.mul, torch.sub, torch.div,
                                          torch.maximum, torch.minimum, torch.where):
                return _broadcast([a for a in args if isinstance(a, tuple)])
            if f in (torch.zeros_like, torch.ones_like, torch.empty_like, torch.rand_like,
                     torch.randn_like, torch.full_like):
                return first
            return None
        if n.op == "call_module":
            mod = self.module.get_submodule(n.target)
            if isinstance(mod, nn.Linear):
                return first[:-1] + (Sym.lit(mod.out_features),)
            if isinstance(mod, nn.RNNBase) and isinstance(first, tuple) and len(first) == 3:
                width = Sym.lit(mod.hidden_size * (2 if mod.bidirectional else 1)
                                if not getattr(mod, "proj_size", 0) else
                                mod.proj_size * (2 if mod.bidirectional else 1))
                return Multi((first[:2] + (width,), None))
            if isinstance(mod, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                                nn.TransformerEncoder, nn.TransformerDecoder)):
                return first
            if isinstance(mod, nn.Embedding):
                return first + (Sym.lit(mod.embedding_dim),)
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and isinstance(first, tuple):
                return _conv_shape(first, mod.out_channels, mod.kernel_size, mod.stride,
                                   mod.padding, mod.dilation)
            if isinstance(mod, (*POINTWISE_MODULES, nn.LayerNorm, nn.Softmax, nn.LogSoftmax,
                                nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.PReLU)):
                return first
            return None
        return None


def _summary(result: Any) -> Any:
    """What we keep of a node's value: tensors as meta tensors (shape/dtype/device), not data."""
    if isinstance(result, torch.Tensor):
        return torch.empty_like(result, device="meta")
    if isinstance(result, (int, float, bool, str, torch.Size)) or result is None:
        return result
    if isinstance(result, (tuple, list)):
        return type(result)(_summary(r) for r in result) if not hasattr(result, "_fields") else None
    return None


def _checked(n: fx.Node, sym: Any, result: Any) -> Any:
    """Keep a symbolic form only if it describes the concrete value; else go opaque."""
    if isinstance(result, torch.Tensor):
        if (isinstance(sym, tuple) and len(sym) == result.dim()
                and all(isinstance(s, Sym) and s.value == v for s, v in zip(sym, result.shape))):
            return sym
        return tuple(Sym.of(Atom(n.name, i, int(v), guardable=False))
                     for i, v in enumerate(result.shape))
    if isinstance(result, bool):
        return None
    if isinstance(result, int):
        if isinstance(sym, Sym) and sym.value == result:
            return sym
        return Sym.of(Atom(n.name, -1, result, guardable=False))
    if isinstance(sym, Multi) and isinstance(result, (tuple, list)) and len(sym) == len(result):
        return Multi(_checked(n, s, r) if s is not None else None for s, r in zip(sym, result))
    if isinstance(result, (tuple, list)) and all(isinstance(r, int) for r in result):
        if (isinstance(sym, tuple) and len(sym) == len(result)
                and all(isinstance(s, Sym) and s.value == r for s, r in zip(sym, result))):
            return sym
        return tuple(Sym.of(Atom(n.name, i, int(r), guardable=False)) for i, r in enumerate(result))
    return None
