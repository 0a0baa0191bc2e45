"""``"reshape"``: fold the leading axes into rows, apply dense layers, unfold.

The identity proved, for ``x`` of shape ``(L..., F)``::

    unfold(g(fold(x))) == g(x)        where g = a chain of dense / pointwise / featurewise ops

holds when (1) every reshape in the chain keeps the last (feature) axis whole — then it only
regroups rows, in row-major order, and every op of ``g`` treats rows independently and identically,
so it commutes with the regrouping; and (2) the last reshape restores exactly ``L...``: the same
axes, same order, same sizes — so the composed regrouping is the identity.  Both are checked on
*symbolic* sizes (``x.size(0)``, ``-1``, products), so the proof holds for every batch and time
size; a literal size equal to an input dim on the example becomes a guard.

Channel-first variant: ``x.transpose(1, 2)`` before and the inverse transpose after: the same
identity along axis 1, giving ``time_distributed_dense(x, ..., feature_dim=1)``.

Every dense op of a proved chain becomes one canonical node; the chain's reshapes disappear.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from .. import ops
from ..capture import node_location, node_module_path
from ..report import Site
from ..shapes import Atom, Sym, SymShape, _movedim, _permute, _transpose, prod, render_shape
from .base import Candidate, Context, Guard
from .roles import Role, classify, data_users, is_metadata

PATTERN = "reshape"


@dataclass
class Chain:
    entry: fx.Node
    ops: list[fx.Node]
    roles: list[Role]
    notes: list[str] = field(default_factory=list)


def _data_input(node: fx.Node, role: Role) -> Any:
    return node.args[role.data]


def grow(seed: fx.Node, ctx: Context) -> Chain:
    """The maximal single-path region around a dense op, through ops that have a role."""
    ops_: list[fx.Node] = [seed]
    roles: list[Role] = [classify(seed, ctx)]  # type: ignore[list-item]
    cur, role = seed, roles[0]
    while True:
        p = _data_input(cur, role)
        if not isinstance(p, fx.Node) or p.op in ("placeholder", "get_attr"):
            break
        r = classify(p, ctx)
        if r is None or r.blocked or len(data_users(p)) != 1:
            break
        ops_.insert(0, p)
        roles.insert(0, r)
        cur, role = p, r
    cur = seed
    while True:
        users = data_users(cur)
        if len(users) != 1:
            break
        u = users[0]
        r = classify(u, ctx)
        if r is None or r.blocked or _data_input(u, r) is not cur:
            break
        ops_.append(u)
        roles.append(r)
        cur = u
    # trim pointwise ops before the first / after the last structural op: they stay as they are
    structural = [i for i, r in enumerate(roles) if r.kind in ("reshape", "permute", "dense")]
    lo, hi = structural[0], structural[-1]
    ops_, roles = ops_[lo : hi + 1], roles[lo : hi + 1]
    return Chain(_data_input(ops_[0], roles[0]), ops_, roles)


def _is_real_reshape(n: fx.Node) -> bool:
    return not (n.op == "call_method" and n.target == "contiguous")


def _perm_of(node: fx.Node, labels: tuple[int, ...]) -> tuple[int, ...]:
    """Apply a permute/transpose/movedim node to a tuple of axis labels."""
    a = list(node.args[1:])
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", "")
    if name in ("transpose", "swapaxes"):
        return _transpose(labels, a[0], a[1])  # type: ignore[arg-type]
    if name == "t":
        return labels[::-1]
    if name == "movedim":
        return _movedim(labels, a[0], a[1])  # type: ignore[arg-type]
    return _permute(labels, a)  # type: ignore[arg-type]


def _names(shape: SymShape) -> dict[Atom, str]:
    lead = {1: ["N"], 2: ["B", "T"]}.get(len(shape) - 1)
    if lead is None:
        lead = ["B"] + [f"T{i}" for i in range(1, len(shape) - 1)]
    out: dict[Atom, str] = {}
    for s, name in zip(shape, lead + ["F"]):
        if s.coef == 1 and len(s.atoms) == 1:
            out.setdefault(s.atoms[0], name)
    return out


def render_call(node: fx.Node, ctx: Context, names: dict[Atom, str]) -> str:
    def arg(a: Any) -> str:
        if isinstance(a, fx.Node):
            s = ctx.shapes.sym.get(a) if ctx.shapes else None
            return s.render(names) if isinstance(s, Sym) else a.name
        if isinstance(a, (tuple, list)):
            return "(" + ", ".join(arg(x) for x in a) + ")"
        return repr(a)

    t = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "op")
    args = node.args[1:] if node.op == "call_method" else node.args[1:]
    parts = [arg(a) for a in args] + [f"{k}={arg(v)}" for k, v in node.kwargs.items()]
    return f"{t}({', '.join(parts)})"


def _feature_reason(call: str, before: Sym, after: Sym, names: dict[Atom, str]) -> str:
    f = before.render(names)
    q = after.divide(before)
    if q is not None:
        return (f"{call} merges the feature axis {f} with {q.render(names)}: "
                "not time-distributed")
    if before.divide(after) is not None:
        return f"{call} splits the feature axis {f}: not time-distributed"
    return f"{call} changes the last axis from {f} to {after.render(names)}: not time-distributed"


def _restore_reason(got: SymShape, want: SymShape, names: dict[Atom, str], unfolded: bool) -> str:
    g, w = render_shape(got, names), render_shape(want, names)
    if len(got) < len(want) and not unfolded:
        return (f"the rows stay folded: the region ends with leading axes {g}, its input had {w} "
                "(no unfold, or its result is used elsewhere)")
    if len(got) > len(want):
        return (f"the region unfolds rows into {g} that it did not fold (its input has leading "
                f"axes {w}): the fold is outside, or its result is used elsewhere")
    if len(got) == len(want) and sorted(map(repr, got)) == sorted(map(repr, want)):
        return (f"unfold restores leading axes {g} but the fold merged {w}: a different order, "
                "not time-distributed")
    return (f"unfold restores leading axes {g} but the fold merged {w}: a different split, "
            "not time-distributed")


def dense_pattern(node: fx.Node) -> str:
    """Sites are named by their dense op: a layer (``reshape``) or a hand-written product."""
    if node.op == "call_module" or node.target in (ops.time_distributed_dense,) or getattr(
            node.target, "__name__", "") == "linear":
        return PATTERN
    return "matmul"


def _sites(chain: Chain, ctx: Context, status: str, reason: str, fd: int | None) -> list[Site]:
    sites = []
    for node, role in zip(chain.ops, chain.roles):
        if role.kind != "dense":
            continue
        module = node_module_path(node)
        source = node_location(node)
        where = (module or node.name) + (f" ({source})" if source else "")
        t_in = ctx.shapes.tensor(node.args[role.data]) if ctx.shapes else None
        t_out = ctx.shapes.tensor(node) if ctx.shapes else None
        t_entry = ctx.shapes.tensor(chain.entry) if ctx.shapes else None
        shp_in = None if t_in is None else tuple(t_in.shape)
        shp_out = None if t_out is None else tuple(t_out.shape)
        if fd is not None and t_entry is not None and shp_in and shp_out:
            # the site as the user sees it: the unfolded input layout, features replaced
            base = list(t_entry.shape)
            base[fd] = shp_in[-1]
            shp_in = tuple(base)
            base[fd] = shp_out[-1]
            shp_out = tuple(base)
        sites.append(Site(
            pattern=dense_pattern(node), status=status, where=where,  # type: ignore[arg-type]
            reason=reason or role.blocked, module=module, source=source, node=node.name,
            in_shape=shp_in, out_shape=shp_out, feature_dim=fd,
        ))
    return sites


def prove(chain: Chain, ctx: Context) -> Candidate | None:
    """A proved candidate, a rejected one, or None when the chain is not a candidate at all."""
    ops_, roles = chain.ops, chain.roles

    def edge(i: int) -> bool:
        return roles[i].kind == "permute" or (roles[i].kind == "reshape"
                                             and not _is_real_reshape(ops_[i]))

    pre = 0
    while pre < len(ops_) and edge(pre):
        pre += 1
    post = len(ops_)
    while post > pre and edge(post - 1):
        post -= 1
    S = ctx.shape(chain.entry)
    rank = None if S is None else len(S)
    ident = tuple(range(rank or 0))
    labels = after = ident
    if rank:
        for n, r in zip(ops_[:pre], roles[:pre]):
            labels = _perm_of(n, labels) if r.kind == "permute" else labels
        after = labels
        # the closing transposes act on the region's output: only a pair if it has x's rank
        exit_in = ctx.shape(ops_[post - 1]) if post > 0 else None
        if exit_in is not None and len(exit_in) == rank:
            for n, r in zip(ops_[post:], roles[post:]):
                after = _perm_of(n, after) if r.kind == "permute" else after
        else:
            after = ()
    channel_first = bool(rank) and labels != ident and after == ident
    entry = chain.entry
    if channel_first:
        region, region_roles = ops_, roles
        body = list(zip(ops_[pre:post], roles[pre:post]))
    else:
        # transposes that are not undone stay outside the region, as they are
        lo = max([i + 1 for i in range(pre) if roles[i].kind == "permute"], default=0)
        hi = min([i for i in range(post, len(ops_)) if roles[i].kind == "permute"],
                 default=len(ops_))
        entry = ops_[lo - 1] if lo else chain.entry
        region, region_roles = ops_[lo:hi], roles[lo:hi]
        body = list(zip(region, region_roles))
        labels = ident = tuple(range(len(ctx.shape(entry) or ())))
        S = ctx.shape(entry)
        rank = None if S is None else len(S)
    ops_, roles = region, region_roles
    if not any(r.kind == "dense" for _, r in body):
        return None
    if all(n.target is ops.time_distributed_dense for n, r in body if r.kind == "dense"):
        return None  # already canonical: nothing new (e.g. a rewrite's own local fold)
    has_reshape = any(r.kind == "reshape" and _is_real_reshape(n) for n, r in body)
    if not has_reshape and not channel_first:
        return None  # a plain dense layer, nothing to do
    chain = Chain(entry, ops_, roles)
    blocked = next((r.blocked for r in roles if r.blocked), "")
    if blocked:
        return Candidate(PATTERN, _sites(chain, ctx, "rejected", blocked, None), reason=blocked,
                         nodes=[n.name for n in ops_])
    if S is None:
        reason = "needs example inputs: the fold and unfold sizes can only be proved with shapes"
        return Candidate(PATTERN, _sites(chain, ctx, "rejected", reason, None), reason=reason,
                         nodes=[n.name for n in ops_])
    work: SymShape = tuple(S[i] for i in labels)
    names = _names(work)
    guards: list[Guard] = []

    def reject(reason: str) -> Candidate:
        return Candidate(PATTERN, _sites(chain, ctx, "rejected", reason, None), reason=reason,
                         nodes=[n.name for n in ops_])

    if ctx.shapes is not None:  # facts the symbolic sizes themselves relied on
        for n in [entry] + [n for n, _ in body]:
            for atom, value in ctx.shapes.assumed.get(n, ()):
                guards.append(Guard(atom.owner, (atom.dim,), value))
    cur = work
    restored: list[int] = []  # body positions where the rows are back to the input's axes
    seen_dense = False

    def shorter() -> Candidate | None:
        """The region up to the last point where it was proved whole (the rest, e.g. the next
        wrapper's fold, stays as it is)."""
        if not restored or channel_first or restored[-1] >= len(body) - 1:
            return None
        return prove(Chain(entry, ops_[: restored[-1] + 1], roles[: restored[-1] + 1]), ctx)

    for i, (n, r) in enumerate(body):
        if r.kind == "permute":
            return shorter() or reject(f"{render_call(n, ctx, names)} moves axes inside the fold")
        out = ctx.shape(n)
        if out is None:
            return shorter() or reject(f"the shape of {n.name} is unknown")
        if (r.kind == "reshape" and _is_real_reshape(n)
                and not ctx.same_size(out[-1], cur[-1], guards)):
            return shorter() or reject(
                _feature_reason(render_call(n, ctx, names), cur[-1], out[-1], names))
        cur = out
        seen_dense = seen_dense or r.kind == "dense"
        if seen_dense and r.kind == "reshape" and _is_real_reshape(n) and len(cur) == len(work) and all(
                a == b for a, b in zip(cur[:-1], work[:-1])):
            restored.append(i)
    if len(cur) != len(work) or not all(
        ctx.same_size(a, b, guards) for a, b in zip(cur[:-1], work[:-1])
    ):
        cut = shorter()
        if cut is not None:
            return cut
        last_dense = max(i for i, (_, r) in enumerate(body) if r.kind == "dense")
        unfolded = any(r.kind == "reshape" and _is_real_reshape(n) for n, r in body[last_dense:])
        return reject(_restore_reason(cur[:-1], work[:-1], names, unfolded))
    # the input must not change under the fold: reshape() may be a view (on the example) or a
    # copy (other strides), so an in-place update of the source between fold and use would make
    # the two orders differ only on some inputs
    aliases = [entry] + [n for n, r in zip(ops_, roles) if r.kind in ("reshape", "permute")]
    lo, hi = ctx.position(ops_[0]), ctx.position(ops_[-1])
    for a in aliases:
        for u in a.users:
            if u not in ops_ and _in_place(u, ctx) and lo < ctx.position(u) < hi:
                return reject(f"{render_call(u, ctx, names)} modifies the folded tensor in place")
    # every interior tensor must be private to the region (its sizes may feed the region's reshapes)
    inside = set(ops_)
    allowed = inside | _shape_helpers(ops_)
    for n in ops_[:-1]:
        for u in n.users:
            if u not in allowed and not (is_metadata(u) and not u.users):  # a dead shape read
                return reject(f"the intermediate {n.name} is also used outside the fold")
    fd = labels[-1] if channel_first else -1
    # the channel-first sandwich copied rows contiguous, then ran linear: that is the mirror
    kernel = ops.choose_kernel(fd, rank, ctx.device, prefer="linear_tc", dtype=ctx.dtype(entry))
    sites = _sites(chain, ctx, "found", "", fd)
    for s in sites:
        s.kernel = kernel
        s.guards = [str(g) for g in guards]
    spec = [(n.name, r) for n, r in zip(ops_, roles)]
    return Candidate(
        PATTERN, sites, rewrite=_make_rewrite(entry.name, spec, fd, kernel, ctx, work[-1]),
        guards=guards, nodes=[n.name for n in ops_], output=ops_[-1].name,
    )


def _in_place(n: fx.Node, ctx: Context) -> bool:
    if n.op == "call_method":
        return str(n.target).endswith("_")
    if n.op == "call_function":
        name = getattr(n.target, "__name__", "")
        return name.endswith("_") or name.startswith("i") and name in (
            "iadd", "isub", "imul", "itruediv") or bool(n.kwargs.get("inplace"))
    if n.op == "call_module":
        return bool(getattr(ctx.module(n), "inplace", False))
    return False


def _shape_helpers(region: list[fx.Node]) -> set[fx.Node]:
    """Metadata nodes (sizes, products of sizes) computed for the region's reshape arguments."""
    out: set[fx.Node] = set()
    stack = [a for n in region for a in n.all_input_nodes]
    while stack:
        a = stack.pop()
        if a in out or a in region:
            continue
        if is_metadata(a) or (a.op == "call_function" and getattr(a.target, "__module__", "")
                              in ("_operator", "operator") and a.target is not getattr):
            out.add(a)
            stack.extend(a.all_input_nodes)
    return out


def _make_rewrite(entry: str, spec: list[tuple[str, Role]], fd: int, kernel: str, ctx: Context,
                  feat: Sym):  # noqa: ANN202
    from ..rewrite import emit_region  # late import: rewrite depends on patterns

    def rewrite(gm: fx.GraphModule) -> fx.Node:
        return emit_region(gm, entry, spec, fd, kernel)

    return rewrite


def _fold_near_misses(ctx: Context, claimed: set[str]) -> list[Candidate]:
    """Folds (reshapes that merge leading axes) around something that is not dense."""
    out: list[Candidate] = []
    for n in ctx.gm.graph.nodes:
        if n.name in claimed or n.op != "call_method" or n.target not in ("view", "reshape", "flatten"):
            continue
        src, dst = ctx.shape(n.args[0]), ctx.shape(n)
        if src is None or dst is None or len(src) < 2 or not any(
            dst[0] == prod(src[:k]) for k in range(2, len(src) + 1)
        ):
            continue  # not a fold of the leading axes
        users = data_users(n)
        if len(users) != 1:
            continue
        inner = users[0]
        after = data_users(inner)
        if len(after) != 1 or after[0].op != "call_method" or after[0].target not in (
            "view", "reshape", "unflatten", "view_as"
        ):
            continue
        back = ctx.shape(after[0])
        if back is None or len(back) < len(src) or inner.name in claimed:
            continue
        if after[0].target == "view_as" and after[0].args[1] is n.args[0]:
            continue  # a local fold (rows in, the same rows out): exact, not a near-miss
        r = classify(inner, ctx)
        if r is not None and r.kind == "dense":
            continue
        what = (type(ctx.module(inner)).__name__ if inner.op == "call_module"
                else getattr(inner.target, "__name__", str(inner.target)))
        module = node_module_path(inner)
        source = node_location(inner)
        if inner.op == "call_module" and r is not None:
            reason = f"the fold wraps {what}, not a dense layer: nothing to rewrite"
        else:
            reason = f"the fold wraps {what}, which is not a dense layer: left as it is"
        t_in = ctx.shapes.tensor(n.args[0]) if ctx.shapes else None
        t_out = ctx.shapes.tensor(after[0]) if ctx.shapes else None
        site = Site(PATTERN, "rejected", (module or inner.name) + (f" ({source})" if source else ""),
                    reason=reason, module=module, source=source,
                    in_shape=None if t_in is None else tuple(t_in.shape),
                    out_shape=None if t_out is None else tuple(t_out.shape))
        claimed.update({n.name, inner.name, after[0].name})
        out.append(Candidate(PATTERN, [site], reason=reason, nodes=[n.name, inner.name]))
    return out


def find(ctx: Context) -> list[Candidate]:
    claimed: set[str] = set()
    out: list[Candidate] = []
    for node in ctx.gm.graph.nodes:
        if node.name in claimed:
            continue
        role = classify(node, ctx)
        if role is None or role.kind != "dense":
            continue
        chain = grow(node, ctx)
        claimed.update(n.name for n in chain.ops)
        cand = prove(chain, ctx)
        if cand is not None:
            out.append(cand)
    out.extend(_fold_near_misses(ctx, claimed))
    return out
