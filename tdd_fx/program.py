"""The optimized module at call time.

The result of ``optimize`` is the user's own module tree (same classes, attributes and methods;
the original ``Parameter`` and buffer objects) whose rewritten modules get an instance-level
``forward``: an :class:`OptimizedForward` holding one :class:`Program` per captured mode.  A call

1. picks the program of the current mode (``self.training`` and every submodule's flag as they
   were at capture),
2. checks the call against what the capture covered — the same argument structure and keyword
   names, the same non-tensor values, the same ranks/dtypes/devices, every size that the capture
   fixed, every symbolic size within its range and consistent with the others,
3. fetches parameters, buffers and tensor attributes from the live module (so
   ``load_state_dict(assign=True)``, ``functional_call`` and parametrizations are honoured) and
   runs the graph.

Whenever 1 or 2 fails — or a submodule was replaced since optimize (the graph inlines its old
code) — it runs the user's original ``forward`` on the same live module tree, with a one-time
warning saying what differed.  Nothing is ever silently skipped.

After the first call that runs a program, the same checks run as one straight-line function
compiled for this module tree and program (:func:`_guarded`: the tree's module objects, flags and
hook dicts, the inputs' sizes, the state's dtypes), a few microseconds a call; anything it does
not recognise takes the full path above, which gives the result or the reason.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .capture import Captured, layout
from .lower import lowered

_ASSERT = "Runtime assertion failed"


class CallMismatch(Exception):
    """A call outside what a program was captured for (the message says what differed)."""


def _bound(v: Any) -> int | None:
    try:
        return int(v) if bool(getattr(v, "is_finite", True)) else None
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


class InputChecker:
    """Decides, cheaply, whether flat call inputs are within what the capture covered."""

    def __init__(self, captured: Captured, names: list[str],
                 fixed: dict[Any, int] | None = None) -> None:
        self.names = names
        #: sizes a rewrite relied on at their example values (symbol -> value)
        self.fixed = dict(fixed or {})
        self.leaves: list[tuple[str, Any]] = []
        ranges = captured.range_constraints
        self.ranges = {s: (1 if s in captured.size_one else _bound(r.lower), _bound(r.upper))
                       for s, r in ranges.items() if isinstance(s, sympy.Symbol)}
        self.plan: list[tuple[int, int, Any]] = []  # (leaf, dim, expr) in binding order
        later: list[tuple[int, int, Any]] = []
        for i, (kind, info, sizes) in enumerate(captured.leaves):
            self.leaves.append((kind, info))
            for d, e in enumerate(sizes or ()):
                (self.plan if isinstance(e, (int, sympy.Symbol)) else later).append((i, d, e))
        self.plan.sort(key=lambda p: isinstance(p[2], int))  # symbols bind before constants
        self.plan += later
        self.where = {}
        for i, d, e in self.plan:
            if isinstance(e, sympy.Symbol) and e not in self.where:
                self.where[e] = f"{names[i] if i < len(names) else i}.shape[{d}]"

    def compiled(self) -> Any:
        """A straight-line ``flat -> bool`` of the same checks, compiled once: True means
        :meth:`check` would pass (it is run for the message when this says False), so the common
        call costs a few attribute reads instead of a walk over sympy expressions.  ``None``
        when a size expression has no exact integer Python spelling."""
        try:
            return _compile_checks(self)
        except _NoSpelling:
            return None

    def guards(self) -> list[str]:
        """The sizes rewrites relied on, as the user reads them (``x.shape[0] == 4``)."""
        return [f"{self.where.get(s, s)} == {v}" for s, v in self.fixed.items()]

    def check(self, flat: list[Any]) -> None:
        if len(flat) != len(self.leaves):
            raise CallMismatch(f"{len(flat)} input leaves instead of {len(self.leaves)}")
        for i, ((kind, info), x) in enumerate(zip(self.leaves, flat)):
            if kind == "tensor":
                if not isinstance(x, Tensor) or (x.dim(), x.dtype, x.device.type) != info:
                    raise self._tensor_mismatch(i, x, info)
            elif type(x) is not type(info) or x != info:
                got = f"a {type(x).__name__}" if isinstance(x, Tensor) else repr(x)
                raise CallMismatch(f"{self.names[i]} is {got}, captured at {info!r}")
        bound = self._bind_sizes(flat)
        for s, v in self.fixed.items():
            if bound.get(s, v) != v:
                raise CallMismatch(f"{self.where.get(s, s)} is {bound[s]}; a rewrite relied on "
                                   f"it being {v}")

    def _tensor_mismatch(self, i: int, x: Any, info: Any) -> CallMismatch:
        if not isinstance(x, Tensor):
            return CallMismatch(f"{self.names[i]} is a {type(x).__name__}, captured as a tensor")
        return CallMismatch(f"{self.names[i]} is {x.dim()}-D {x.dtype} on {x.device.type}, "
                            f"captured as {info[0]}-D {info[1]} on {info[2]}")

    def _bind_sizes(self, flat: list[Any]) -> dict[Any, int]:
        """Each symbol's size in this call, after checking every size the plan covers."""
        bound: dict[Any, int] = {}
        for i, d, e in self.plan:
            size = flat[i].shape[d]
            if isinstance(e, int):
                if size != e:
                    raise CallMismatch(f"{self.names[i]}.shape[{d}] is {size}; the capture fixed "
                                       f"it at {e}")
            elif isinstance(e, sympy.Symbol) and e not in bound:
                lo, hi = self.ranges.get(e, (0, None))
                if size < (lo or 0) or (hi is not None and size > hi):
                    raise self._out_of_range(i, d, size, lo or 0, hi)
                bound[e] = size
            else:
                want = sympy.sympify(e.xreplace(bound) if isinstance(e, sympy.Basic) else e)
                if not want.is_Integer or int(want) != size:
                    raise CallMismatch(f"{self.names[i]}.shape[{d}] is {size}; the capture "
                                       f"needs {e} = {want}")
        return bound

    def _out_of_range(self, i: int, d: int, size: int, lo: int, hi: int | None) -> CallMismatch:
        return CallMismatch(f"{self.names[i]}.shape[{d}] is {size}, outside the captured range "
                            f"[{lo}, {hi if hi is not None else 'inf'}]")


class _NoSpelling(Exception):
    pass


_INT_OPS = {"FloorDiv": "//", "CleanDiv": "//", "Mod": "%", "PythonMod": "%"}


def _py(e: Any, names: dict[Any, str]) -> str:
    """Python source computing the integer sympy expression ``e`` from bound symbol names."""
    if isinstance(e, int) or (isinstance(e, sympy.Basic) and e.is_Integer):
        return str(int(e))
    if isinstance(e, sympy.Symbol):
        if e not in names:
            raise _NoSpelling(str(e))
        return names[e]
    args = [_py(a, names) for a in getattr(e, "args", ())]
    kind = type(e).__name__
    if isinstance(e, sympy.Add):
        return "(" + " + ".join(args) + ")"
    if isinstance(e, sympy.Mul):
        return "(" + " * ".join(args) + ")"
    if isinstance(e, sympy.Pow) and e.exp.is_Integer and int(e.exp) >= 0:
        return f"({args[0]} ** {int(e.exp)})"
    if kind in _INT_OPS and len(args) == 2:
        return f"({args[0]} {_INT_OPS[kind]} {args[1]})"
    if kind in ("Max", "Min"):
        return f"{kind.lower()}({', '.join(args)})"
    raise _NoSpelling(kind)


def _check_lines(c: InputChecker, consts: dict[str, Any], miss: str = "None") -> list[str]:
    """Straight-line Python of :meth:`InputChecker.check` on ``flat`` (``return <miss>`` on a
    miss); raises :class:`_NoSpelling` when a size expression has no exact integer spelling."""
    ret = f"return {miss}"
    lines = [f"if len(flat) != {len(c.leaves)}: {ret}"]
    consts["Tensor"] = Tensor
    for i, (kind, info) in enumerate(c.leaves):
        lines.append(f"x{i} = flat[{i}]")
        if kind == "tensor":
            consts[f"dt{i}"] = info[1]
            device = {"cpu": f"not x{i}.is_cpu", "cuda": f"not x{i}.is_cuda"}.get(
                info[2], f"x{i}.device.type != {info[2]!r}")
            lines.append(f"if not isinstance(x{i}, Tensor) or x{i}.dtype is not dt{i} or "
                         f"{device}: {ret}")
            lines.append(f"sh{i} = x{i}.shape")
            lines.append(f"if len(sh{i}) != {info[0]}: {ret}")
        else:
            consts[f"c{i}"], consts[f"t{i}"] = info, type(info)
            lines.append(f"if type(x{i}) is not t{i} or x{i} != c{i}: {ret}")
    names: dict[Any, str] = {}
    for i, d, e in c.plan:
        size = f"sh{i}[{d}]"
        if isinstance(e, sympy.Symbol) and e not in names:
            names[e] = f"s{len(names)}"
            lo, hi = c.ranges.get(e, (0, None))
            lines.append(f"{names[e]} = {size}")
            lines.append(f"if {names[e]} < {lo or 0}: {ret}")
            if hi is not None:
                lines.append(f"if {names[e]} > {hi}: {ret}")
        else:
            lines.append(f"if {size} != {_py(e, names)}: {ret}")
    for sym, v in c.fixed.items():
        if sym in names:
            lines.append(f"if {names[sym]} != {int(v)}: {ret}")
    return lines


def _compile(name: str, params: str, lines: list[str], scope: dict[str, Any]) -> Any:
    src = f"def {name}({params}):\n" + "".join(f"    {ln}\n" for ln in lines)
    exec(compile(src, f"<tdd_fx {name}>", "exec"), scope)
    return scope[name]


def _compile_checks(c: InputChecker) -> Any:
    consts: dict[str, Any] = {}
    lines = _check_lines(c, consts) + ["return True"]
    fast = _compile("fast", "flat", lines, consts)
    return lambda flat: fast(flat) is True


class Program:
    """One captured (and rewritten) graph, for one mode, callable on a live module tree."""

    def __init__(self, captured: Captured, gm: fx.GraphModule, names: list[str],
                 flags: tuple[bool, ...], fixed: dict[Any, int] | None = None,
                 sites: list[str] | None = None) -> None:
        #: names (in the captured graph) of the dense ops this program rewrote
        self.sites = list(sites or [])
        self.training = captured.training
        self.gm = gm
        self.state = captured.state
        self.constants = captured.constants
        self.in_spec = captured.in_spec
        self.out_spec = captured.out_spec
        self.mutated = captured.mutated_buffers
        self.flags = flags
        self.checker = InputChecker(captured, names, fixed)
        self.kw_order = _kw_order(captured.in_spec)
        #: the capture took N positional tensors and nothing else: flatten is ``list(args)``
        self.positional = _positional_leaves(captured.in_spec, self.checker.leaves)
        self.single_output = self.out_spec.is_leaf() and not self.mutated
        #: the example's memory layouts, checked when the graph's results may depend on them
        #: (see :func:`_layout_dependence`); None when they cannot
        self.layouts = captured.layouts if _layout_dependence(gm, len(self.state)) else None
        #: the dtype of each state value at capture (the graph bakes dtypes in: casts, kernels)
        self.state_dtypes = [getattr(n.meta.get("val"), "dtype", None)
                             for n in captured.placeholders()[:len(self.state)]]
        self._compile()

    #: compiled per process (generated code does not pickle): rebuilt on load
    _COMPILED = ("fast_check", "fetch", "_runner", "_runner_of")

    def _compile(self) -> None:
        self.fast_check = self.checker.compiled()
        self.fetch = _fetcher(self.state, self.constants)
        self._runner: Any = None
        self._runner_of: Any = None

    def graph_fn(self) -> Any:
        """The graph's executable ``forward``: :func:`tdd_fx.lower.lowered` of :attr:`gm`, built
        on first use and again whenever ``gm`` was recompiled (autotune sets kernels)."""
        fwd = type(self.gm).forward
        if self._runner_of is not fwd:
            self._runner, self._runner_of = lowered(self.gm).forward, fwd
        return self._runner

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._COMPILED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._compile()

    def flatten(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        if (not kwargs and len(args) == self.positional
                and all(isinstance(a, Tensor) for a in args)):
            return list(args)
        if set(kwargs) != set(self.kw_order):
            extra = sorted(set(kwargs) - set(self.kw_order))
            missing = sorted(set(self.kw_order) - set(kwargs))
            raise CallMismatch("keyword arguments differ from the captured call (" + "; ".join(
                p for p in (f"new: {', '.join(extra)}" if extra else "",
                            f"omitted: {', '.join(missing)}" if missing else "") if p) + ")")
        kwargs = {k: kwargs[k] for k in self.kw_order}
        flat, spec = pytree.tree_flatten(((args, kwargs), {}))
        if spec != self.in_spec:
            raise CallMismatch("the arguments' structure differs from the captured call (another "
                               "number of arguments, None instead of a tensor, another nesting)")
        return flat

    def run(self, module: nn.Module, flat: list[Any]) -> Any:
        state = self.fetch(module)
        if [getattr(t, "dtype", None) for t in state] != self.state_dtypes:
            raise CallMismatch(self._converted(state))
        return self.execute(module, state, flat)

    def execute(self, module: nn.Module, state: list[Any], flat: list[Any]) -> Any:
        """Run the graph on fetched state and checked inputs; write mutated buffers back."""
        try:
            # .forward skips nn.Module.__call__; our own graph has no hooks.  (The lowered
            # graph is for eager calls; compile and export trace the canonical one.)
            tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
            out = (self.gm.forward if tracing else self.graph_fn())(*state, *flat)
        except RuntimeError as exc:
            if _ASSERT in str(exc):
                raise CallMismatch(f"a size condition of the capture fails ({exc})") from exc
            raise
        if self.single_output:
            return out[0] if isinstance(out, (tuple, list)) else out
        return self.finish(module, out)

    def finish(self, module: nn.Module, out: Any) -> Any:
        """The graph's flat outputs as the model returns them; mutated buffers written back."""
        out = list(out) if isinstance(out, (tuple, list)) else [out]
        if self.mutated:
            with torch.no_grad():
                for target, value in zip(self.mutated, out):
                    _fetch(module, "buffer", target, {}).copy_(value)
            out = out[len(self.mutated):]
        return pytree.tree_unflatten(out, self.out_spec)

    def _converted(self, state: list[Any]) -> str:
        for (_, target), t, dtype in zip(self.state, state, self.state_dtypes):
            if getattr(t, "dtype", None) != dtype:
                return (f"{target} is {getattr(t, 'dtype', type(t).__name__)}, captured as "
                        f"{dtype} (the module was converted after optimize)")
        return "the module's state changed since capture"


def _kw_order(in_spec: pytree.TreeSpec) -> list[str]:
    """Keyword names of the captured call, from the spec of ``((args, kwargs), {})``."""
    kw = in_spec.child(0).child(1)
    return list(kw.context)


def _positional_leaves(in_spec: pytree.TreeSpec, leaves: list[tuple[str, Any]]) -> int:
    """N when the captured call was ``forward(t1, ..., tN)`` with N tensors, else -1."""
    n = len(leaves)
    if any(kind != "tensor" for kind, _ in leaves):
        return -1
    plain = pytree.tree_flatten(((tuple(range(n)), {}), {}))[1]
    return n if in_spec == plain else -1


def _fetcher(state: list[tuple[str, str]], constants: dict[str, Any]) -> Any:
    """``module -> [state values]``, read live on every call (so ``load_state_dict(assign=True)``,
    ``functional_call`` and parametrizations are honoured).  Compiled once into straight-line
    dictionary reads (``_modules``/``_parameters``/``_buffers``, where ``nn.Module`` keeps them);
    anything else — a parametrized weight, a tensor attribute, a replaced child — takes the
    generic ``getattr`` path for that call."""
    owners: dict[str, str] = {"": "m"}
    lines = []
    values = []
    slots = {"parameter": "_parameters", "buffer": "_buffers"}
    for kind, target in state:
        path, _, leaf = target.rpartition(".")
        if kind not in slots:
            values.append(f"_fetch(m, {kind!r}, {target!r}, constants)")
            continue
        parts = path.split(".") if path else []
        for i in range(len(parts)):
            key = ".".join(parts[: i + 1])
            if key not in owners:
                owners[key] = f"o{len(owners)}"
                lines.append(f"{owners[key]} = {owners['.'.join(parts[:i])]}._modules"
                             f"[{parts[i]!r}]")
        values.append(f"{owners[path]}.{slots[kind]}[{leaf!r}]")
    body = "".join(f"        {line}\n" for line in lines)
    src = (f"def fetch(m):\n    try:\n{body}        out = [{', '.join(values)}]\n"
           "    except (KeyError, AttributeError):\n        return slow(m)\n    return out\n")
    scope: dict[str, Any] = {"_fetch": _fetch, "constants": constants,
                             "slow": lambda m: [_fetch(m, k, t, constants) for k, t in state]}
    exec(compile(src, "<tdd_fx state fetch>", "exec"), scope)
    return scope["fetch"]


def _fetch(module: nn.Module, kind: str, target: str, constants: dict[str, Any]) -> Any:
    obj: Any = module
    try:
        for part in target.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        if kind == "constant" and target in constants:
            return constants[target]
        raise
    return obj


def tree_flags(module: nn.Module) -> tuple[bool, ...]:
    """Every module's ``training`` flag, in ``module.modules()`` order."""
    return _scan(module)[0]


def _scan(module: nn.Module) -> tuple[tuple[bool, ...], nn.Module | None]:
    """One walk of the tree (:func:`_tree`; this runs on every call of the full path): the
    flags of :func:`tree_flags`, and a submodule that has hooks registered on it, if any."""
    tree = _tree(module)
    hooked = next((m for m, _ in tree[1:] if any(getattr(m, h) for h in _HOOKS)), None)
    return tuple(m.training for m, _ in tree), hooked


def _tree(module: nn.Module) -> list[tuple[nn.Module, list[tuple[str, Any]]]]:
    """Each module of the tree once, in :func:`_scan` order, with its ``_modules`` entries."""
    out, seen, stack = [], set(), [module]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append((m, list(m._modules.items())))
        stack.extend(c for c in reversed(m._modules.values()) if c is not None)
    return out


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _tree_lines(tree: list[tuple[nn.Module, list[tuple[str, Any]]]], flags: tuple[bool, ...],
                scope: dict[str, Any], miss: str) -> tuple[list[str], dict[int, str]]:
    """Lines checking that the live tree is still ``tree`` (the same module objects in the same
    places, nothing added), with ``flags``, and no hooks below the root (the root's own hooks
    are run by ``nn.Module.__call__``); each failing check returns ``miss``."""
    ret = f"return {miss}"
    var = {id(m): f"M{i}" for i, (m, _) in enumerate(tree)}
    lines = []
    for (m, children), flag in zip(tree, flags):
        v = var[id(m)]
        scope[v] = m
        lines.append(f"if {v}.training is not {flag}: {ret}")
        if m is not tree[0][0]:
            lines.append("if " + " or ".join(f"{v}.{h}" for h in _HOOKS) + f": {ret}")
        lines.append(f"c = {v}._modules")
        lines.append(f"if len(c) != {len(children)}: {ret}")
        for name, child in children:
            want = "None" if child is None else var[id(child)]
            lines.append(f"if c.get({name!r}) is not {want}: {ret}")
    return lines, var


def _state_lines(program: Program, root: nn.Module, var: dict[int, str],
                 scope: dict[str, Any], miss: str) -> list[str]:
    """Lines reading each state value live (as :func:`_fetcher`) into ``v0, v1, ...``, each
    checked to have its captured dtype (else ``return <miss>``)."""
    lines = []
    slots = {"parameter": "_parameters", "buffer": "_buffers"}
    scope.update(_fetch=_fetch, _getattr=getattr, constants=program.constants, root=root)
    for k, ((kind, target), dtype) in enumerate(zip(program.state, program.state_dtypes)):
        path, _, leaf = target.rpartition(".")
        owner = root.get_submodule(path) if path else root
        if kind in slots and id(owner) in var:
            lines.append(f"v{k} = {var[id(owner)]}.{slots[kind]}.get({leaf!r})")
            lines.append(f"if v{k} is None: v{k} = _getattr({var[id(owner)]}, {leaf!r})")
        else:
            lines.append(f"v{k} = _fetch(root, {kind!r}, {target!r}, constants)")
        scope[f"sd{k}"] = dtype
        lines.append(f"if v{k}.dtype is not sd{k}: return {miss}")
    return lines


#: what a guarded path returns for "take the full path"
MISS = object()
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def _guarded(root: nn.Module, program: Program) -> Any:
    """``(args, kwargs) -> output | MISS``: every check of the full path (mode flags of the
    whole tree, hooks, autocast, argument structure, input ranks/dtypes/devices/sizes, layouts
    where they matter, state dtypes) compiled into straight-line code for this module tree and
    this program, then the graph on the live state; :data:`MISS` means "take the full path"
    (which then either runs the program or says why not).  ``None`` instead of a function when
    the program's size checks have no Python spelling."""
    scope: dict[str, Any] = {
        "is_autocast_enabled": torch.is_autocast_enabled, "any_autocast": _any_autocast,
        "compiler": torch.compiler, "layout": layout, "flatten": program.flatten,
        "CallMismatch": CallMismatch, "MISS": MISS, "graph_fn": program.graph_fn,
        "finish": program.finish,
        "root": root, **{f"g{i}": getattr(nn.modules.module, f"_global{h}")
                         for i, h in enumerate(_HOOKS)}}
    lines = ["if compiler.is_compiling() or compiler.is_exporting(): return MISS",
             "if any_autocast(): return MISS" if _any_autocast is not None else
             "if is_autocast_enabled('cpu') or is_autocast_enabled('cuda'): return MISS",
             "if g0 or g1 or g2 or g3: return MISS"]
    if program.positional >= 0:
        lines += [f"if kwargs or len(args) != {program.positional}: return MISS", "flat = args"]
    else:
        lines += ["try: flat = flatten(args, kwargs)", "except CallMismatch: return MISS"]
    try:
        lines += _check_lines(program.checker, scope, miss="MISS")
    except _NoSpelling:
        return None
    for i, want in enumerate(program.layouts or ()):
        if want is not None:
            scope[f"lay{i}"] = want
            lines.append(f"if layout(x{i}) != lay{i}: return MISS")
    tree_lines, var = _tree_lines(_tree(root), program.flags, scope, miss="MISS")
    lines += tree_lines + _state_lines(program, root, var, scope, miss="MISS")
    body = ["try:", *(f"    {ln}" for ln in lines),
            "except (AttributeError, KeyError): return MISS",
            # (looked up per call: autotune recompiles; our own graph has no hooks)
            f"out = graph_fn()({', '.join(f'v{k}' for k in range(len(program.state)))}"
            f"{', ' if program.state else ''}*flat)"]
    if program.single_output:
        body.append("return out[0] if out.__class__ is tuple or out.__class__ is list else out")
    else:
        body.append("return finish(root, out)")
    return _compile("guarded", "args, kwargs", body, scope)


class Dispatch:
    """Chooses, per call, the program to run or the original forward (see the module
    docstring)."""

    def __init__(self, module: nn.Module, programs: list[Program],
                 plain: list[tuple[bool, ...]] | None = None) -> None:
        self.module = module
        self.programs = programs
        #: modes (submodule flags) in which nothing was rewritten: the original runs, silently
        self.plain = list(plain or [])
        self.warned: set[str] = set()
        #: the program of the last call that ran one, and its compiled guarded path
        self.last: Program | None = None
        self.guarded: Any = None
        self._guarded: dict[int, Any] = {}
        self._rebuilt = 0
        #: the tree the programs were captured from: every submodule by path (the graphs inline
        #: their code, so a submodule replaced after optimize means the original must run)
        self.members = [(path, m, type(m)) for path, m in module.named_modules()]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        guarded = self.guarded
        if guarded is not None:
            try:
                out = guarded(args, kwargs)
            except RuntimeError as exc:  # a size assertion of the graph: the full path says so
                if _ASSERT not in str(exc):
                    raise
                out = MISS
            if out is not MISS:
                return out
        return self._full(args, kwargs)

    def _full(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The full path: pick the program of the current flags, check the call, run it (and
        compile its guarded path for the calls after), or say why not and run the original."""
        m = self.module
        flags, hooked = _scan(m)
        program = next((p for p in self.programs if p.flags == flags), None)
        if program is None and flags in self.plain:
            return type(m).forward(m, *args, **kwargs)
        why = self._replaced()
        if program is None and not why:
            mode = "train" if m.training else "eval"
            why = (f"no graph was captured and verified for this mode ({mode}, with these "
                   "submodule train/eval flags)")
        if program is not None and not why:
            try:
                _check_context(m, hooked)
                flat = program.flatten(args, kwargs)
                if program.layouts:
                    _check_layouts(program, flat)
                if not (torch.compiler.is_compiling() or torch.compiler.is_exporting()
                        or (program.fast_check is not None and program.fast_check(flat))):
                    program.checker.check(flat)
                out = program.run(m, flat)
            except CallMismatch as exc:
                why = str(exc)
            else:
                self._remember(program)
                return out
        self._warn(why)
        return type(m).forward(m, *args, **kwargs)

    def _remember(self, program: Program) -> None:
        """Use ``program``'s guarded path from the next call on (compiled once per program for
        this module tree; not while compiling or exporting, which take the full path)."""
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return
        key = id(program)
        if program is self.last:  # its guarded path missed a call the full path took
            if self._rebuilt >= 8:  # (the tree changed shape for good: stop compiling)
                return
            self._rebuilt += 1
            self._guarded.pop(key, None)
        if key not in self._guarded:
            self._guarded[key] = _guarded(self.module, program)
        self.last, self.guarded = program, self._guarded[key]

    def _replaced(self) -> str:
        """What was replaced, removed, added or re-classed in the module tree since optimize
        ("" when nothing)."""
        for path, want, cls in self.members:
            try:
                got = self.module.get_submodule(path)
            except AttributeError:
                return f"submodule {path} was removed after optimize"
            if got is not want:
                return (f"submodule {path} was replaced after optimize (by a "
                        f"{type(got).__name__}); the captured graph inlines the old one's code")
            if type(got) is not cls:  # torch.nn.utils.parametrize swaps the class in place
                return (f"submodule {path or type(got).__name__} changed class after optimize "
                        f"(now {type(got).__name__}, e.g. a parametrization was registered); "
                        "the captured graph inlines the old class's code")
        known = {path for path, _, _ in self.members}
        added = next((path for path, _ in self.module.named_modules() if path not in known), None)
        if added is not None:
            return (f"submodule {added} was added after optimize; the captured graph does not "
                    "know it")
        return ""

    def __getstate__(self) -> dict[str, Any]:
        # compiled guarded paths hold this tree's module objects: rebuilt after a copy or a load
        return {**self.__dict__, "last": None, "guarded": None, "_guarded": {}}

    def _warn(self, why: str) -> None:
        if why in self.warned:
            return
        self.warned.add(why)
        warnings.warn(f"tdd_fx: {type(self.module).__name__}: {why}; running the original "
                      "forward instead (warned once)", RuntimeWarning, stacklevel=4)


def _writes_in_place(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
               and n.target._schema.is_mutable for n in gm.graph.nodes)


_aten = torch.ops.aten
#: ops whose result is laid out row-major by its shape alone, whatever its inputs' layouts
_FRESH_LAYOUT = frozenset({_aten.linear.default, _aten.mm.default, _aten.addmm.default,
                           _aten.bmm.default, _aten.matmul.default})
_COPIES = frozenset({_aten.clone.default, _aten._to_copy.default})
#: ops that accept (or mean the same for) only some strides of their input
_STRIDE_BOUND = frozenset({_aten.view.default, _aten._unsafe_view.default, _aten.view.dtype,
                           _aten.as_strided.default, _aten.sym_stride.int})
_NUMBERS = (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)
_DROPOUTS = frozenset({"dropout", "native_dropout", "feature_dropout", "alpha_dropout",
                       "feature_alpha_dropout"})


def _layout_dependence(gm: fx.GraphModule, n_state: int) -> str:
    """Why the graph's results may depend on its inputs' memory layouts and not only on their
    values ("" when they cannot); the example's layouts are then checked on every call.  Export
    decides on the example's layouts, and records nothing for ``contiguous()`` of data that is
    contiguous already, so the graph may work on the input itself where the original copies:

    - it writes in place: whether a ``reshape``/``contiguous()`` copied or aliased;
    - it draws random numbers (a dropout in train mode) over a tensor laid out as an input is:
      one per element in memory order, the input's order where the original drew over its
      copy;
    - it views a tensor laid out as an input is with axes merged (``x.contiguous().view(-1, F)``
      of contiguous data is recorded as a bare ``view``): it cannot view other strides, where
      the original copies.

    The first ``n_state`` placeholders are parameters, buffers and constants; the rest are the
    call's inputs."""
    if _writes_in_place(gm):
        return "the model writes in place"
    follows: set[fx.Node] = set()  # laid out as (some) input is
    seen = 0
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if seen >= n_state:
                follows.add(n)
            seen += 1
            continue
        if n.op != "call_function":
            continue
        if not any(a in follows for a in n.all_input_nodes) or _fresh_layout(n):
            continue
        if draws_random(n):
            return (f"the graph draws random numbers over a tensor laid out as the input is "
                    f"({n.name}: one per element, in memory order)")
        if n.target in _STRIDE_BOUND and _merges_axes(n):
            return (f"the graph views a tensor laid out as the input is with axes merged "
                    f"({n.name}: only strides like the example's allow it)")
        if not isinstance(n.meta.get("val"), _NUMBERS):  # a size read has no layout
            follows.add(n)
    return ""


def _fresh_layout(n: fx.Node) -> bool:
    """``n``'s result is laid out by its shape alone (a product, a copy to a memory format)."""
    if n.target in _FRESH_LAYOUT or n.target is _aten.contiguous.default:
        return True
    fmt = n.kwargs.get("memory_format", torch.preserve_format)
    return n.target in _COPIES and fmt is not None and fmt != torch.preserve_format


def draws_random(n: fx.Node) -> bool:
    """``n`` draws random numbers (not a dropout with ``train`` False or ``p`` 0)."""
    t = n.target
    if not (isinstance(t, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in t.tags):
        return False
    if t._opname in _DROPOUTS and len(n.args) >= 3:
        return not (n.args[2] is False or n.args[1] == 0)
    return True


def _merges_axes(n: fx.Node) -> bool:
    """The view merges axes of its input (which only some strides allow); False when it only
    splits axes and adds or removes axes of size 1 (which any strides allow).  True when
    unsure."""
    if n.target not in (_aten.view.default, _aten._unsafe_view.default):
        return True
    src = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
    out = n.meta.get("val")
    if not (isinstance(src, Tensor) and isinstance(out, Tensor)):
        return True
    if any(isinstance(s, int) and s == 0 for s in src.shape):
        return False  # no elements: any strides
    a, b = _sizes(src.shape), _sizes(out.shape)
    if a is None or b is None:
        return True
    i = j = 0
    while i < len(a) and j < len(b):  # group axes of equal products: one input axis each
        (pa, ha), (pb, hb) = a[i], b[j]
        i, j, merged = i + 1, j + 1, 1
        while sympy.expand(pa - pb) != 0:
            if ha <= hb and i < len(a):
                pa, ha, i, merged = pa * a[i][0], ha * a[i][1], i + 1, merged + 1
            elif hb < ha and j < len(b):
                pb, hb, j = pb * b[j][0], hb * b[j][1], j + 1
            else:
                return True
        if merged > 1:
            return True
    return i < len(a) or j < len(b)


def _sizes(shape: Any) -> list[tuple[Any, int]] | None:
    """(sympy expression, example value) of each axis not fixed at size 1; None when a size has
    no example value."""
    out = []
    for s in shape:
        if isinstance(s, int):
            if s != 1:
                out.append((sympy.Integer(s), s))
            continue
        hint = s.node.hint
        if hint is None:
            return None
        out.append((s.node.expr, int(hint)))
    return out


def _check_layouts(program: Program, flat: list[Any]) -> None:
    """The graph's results may depend on the inputs' memory layouts (see
    :func:`_layout_dependence`): they must be the example's."""
    for i, (x, want) in enumerate(zip(flat, program.layouts)):
        if want is not None and isinstance(x, Tensor) and layout(x) != want:
            name = program.checker.names[i] if i < len(program.checker.names) else f"input {i}"
            why = _layout_dependence(program.gm, len(program.state))
            raise CallMismatch(f"{name} is laid out in memory otherwise than the example "
                               f"({layout(x)} vs {want}), and {why}")


def _check_context(module: nn.Module, hooked: nn.Module | None) -> None:
    """What a captured graph cannot honour around the call: autocast (the graph's ops would be
    autocast one by one, a rewritten one differently from the code it replaced) and hooks
    registered on a submodule after optimize (``hooked``: the graph never calls the
    submodule)."""
    if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
        raise CallMismatch("called under torch.autocast, which the capture did not cover")
    hooks = nn.modules.module
    if (hooks._global_forward_hooks or hooks._global_forward_pre_hooks
            or hooks._global_backward_hooks or hooks._global_backward_pre_hooks):
        raise CallMismatch("global module hooks are registered: the graph would not run them")
    if hooked is not None:
        name = next((n for n, c in module.named_modules() if c is hooked),
                    type(hooked).__name__)
        raise CallMismatch(f"{name} has hooks registered after optimize (the graph would not "
                           "run them)")


def _dispatch(dispatch: Dispatch, *args: Any, **kwargs: Any) -> Any:
    """(what modules optimized and pickled by earlier versions refer to)"""
    return dispatch(*args, **kwargs)


class OptimizedForward(functools.partial):
    """The instance-level ``forward`` of an optimized module: a ``functools.partial`` (which
    torch.export, torch.compile and pickle all understand) carrying the user's signature (so
    ``dynamic_shapes`` by argument name and ONNX input names work as on the original)."""

    @property
    def dispatch(self) -> Dispatch:
        return self.args[0]

    @property
    def __signature__(self) -> inspect.Signature:  # type: ignore[override]
        sig = inspect.signature(type(self.dispatch.module).forward)
        return sig.replace(parameters=list(sig.parameters.values())[1:])

    def rebind(self, module: nn.Module) -> OptimizedForward:
        """The same programs on another copy of the module (see ``copy_module_tree``)."""
        d = self.dispatch
        return OptimizedForward(Dispatch.__call__, Dispatch(module, d.programs, d.plain))


def install(module: nn.Module, programs: list[Program],
            plain: list[tuple[bool, ...]] | None = None) -> None:
    """Make ``module`` (a copy owned by tdd_fx) run ``programs``, falling back to its class's
    own ``forward`` (silently in the ``plain`` modes, where there was nothing to rewrite)."""
    module.forward = OptimizedForward(Dispatch.__call__, Dispatch(module, programs, plain))  # type: ignore[method-assign]


def programs_of(module: nn.Module) -> list[Program]:
    fwd = module.__dict__.get("forward")
    return list(fwd.dispatch.programs) if isinstance(fwd, OptimizedForward) else []


def graphs(module: nn.Module) -> dict[str, Any]:
    """The rewritten graphs of an optimized module, by module path and mode:
    ``{"": {"train": gm, "eval": gm}, "encoder.block": {...}}`` (for inspection)."""
    out: dict[str, Any] = {}
    for path, m in module.named_modules():
        progs = programs_of(m)
        if progs:
            out[path] = {("train" if p.training else "eval"): p.gm for p in progs}
    return out


def graph_of(module: nn.Module, path: str = "", mode: str | None = None) -> fx.GraphModule:
    """The rewritten graph that runs for ``module`` (or its submodule ``path``) in ``mode``
    (default: the module's current mode)."""
    target = module.get_submodule(path) if path else module
    want = target.training if mode is None else mode == "train"
    for p in programs_of(target):
        if p.training == want:
            return p.gm
    raise LookupError(f"no optimized graph for {path or type(module).__name__} in "
                      f"{'train' if want else 'eval'} mode")
