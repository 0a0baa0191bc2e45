"""The invariants of the design, one test (or a few) each.

- the original model is never mutated (parameters, buffers, BatchNorm statistics, ``training``
  flags, global RNG state);
- the result shares the original Parameter objects and has the same state_dict (keys, order,
  shapes), unused submodules and buffers included; checkpoints load both ways; an optimizer on
  ``opt.parameters()`` trains the original's tensors;
- ``train()``/``eval()`` behave as before;
- ``optimize(optimize(m))`` finds nothing new;
- tied modules keep their identity;
- the result is the user's own module tree: ``type(opt) is type(model)``, same attributes, an
  instance-level ``forward`` running the captured program of the current train/eval mode, and the
  original code (warned once) for any call the capture did not cover.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import assert_equivalent, optimize_twice
from torch import nn
from zoo import Wrap

import tdd_fx
from tdd_fx.ops import time_distributed_dense

FALLBACK = "running the original forward instead"

# --------------------------------------------------------------------------------------------
# models


class FoldNet(nn.Module):
    """One fold chain with train-mode BatchNorm1d and dropout inside, plus things never used."""

    def __init__(self, f: int = 6, h: int = 10, o: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(f, h)
        self.bn = nn.BatchNorm1d(h)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(h, o)
        self.unused = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
        self.register_buffer("unused_buf", torch.arange(4.0))
        self.register_buffer("scratch", torch.full((2,), 7.0), persistent=False)
        self.post = nn.Linear(o, o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, f = x.shape
        h = x.reshape(b * t, f)
        h = self.fc2(self.drop(torch.relu(self.bn(self.fc1(h)))))
        return self.post(h.view(b, t, -1))


class Simple(nn.Module):
    """Two wrapped Linears with dropout between them (no BatchNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = Wrap(nn.Linear(6, 12))
        self.drop = nn.Dropout(0.25)
        self.b = Wrap(nn.Sequential(nn.Linear(12, 5), nn.GELU()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.drop(torch.tanh(self.a(x))))


class Tied(nn.Module):
    """The same nn.Linear object inside two wrappers."""

    def __init__(self) -> None:
        super().__init__()
        shared = nn.Linear(6, 6)
        self.first = Wrap(shared)
        self.second = Wrap(shared)
        self.other = Wrap(nn.Linear(6, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(torch.relu(self.second(torch.relu(self.first(x)))))


def x3(b: int = 3, t: int = 5, f: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, t, f, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# helpers


def canonical_nodes(opt: nn.Module) -> list:
    """The canonical nodes of every graph the optimized module runs (all parts, all modes)."""
    return [n for modes in tdd_fx.graphs(opt).values() for gm in modes.values()
            for n in gm.graph.nodes if n.target is time_distributed_dense]


def fallbacks(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record
            if issubclass(w.category, RuntimeWarning) and FALLBACK in str(w.message)]


def snapshot(model: nn.Module) -> dict:
    """Everything about a model that optimize/audit must leave as it was."""
    return {
        "params": {n: (p, p.detach().clone(), p.requires_grad, p.grad)
                   for n, p in model.named_parameters()},
        "buffers": {n: (b, b.detach().clone()) for n, b in model.named_buffers()},
        "flags": {n: m.training for n, m in model.named_modules()},
        "modules": {n: m for n, m in model.named_modules()},
        "keys": list(model.state_dict()),
    }


def assert_unchanged(model: nn.Module, snap: dict) -> None:
    now = snapshot(model)
    assert now["keys"] == snap["keys"]
    assert now["modules"].keys() == snap["modules"].keys()
    for n, m in snap["modules"].items():
        assert now["modules"][n] is m, f"module {n!r} was replaced"
    assert now["flags"] == snap["flags"]
    assert now["params"].keys() == snap["params"].keys()
    for n, (p, value, req, grad) in snap["params"].items():
        q = now["params"][n][0]
        assert q is p, f"parameter {n!r} was replaced"
        assert q.requires_grad == req
        assert q.grad is grad, f"parameter {n!r} got a .grad"
        torch.testing.assert_close(q.detach(), value, rtol=0, atol=0)
    assert now["buffers"].keys() == snap["buffers"].keys()
    for n, (b, value) in snap["buffers"].items():
        assert now["buffers"][n][0] is b, f"buffer {n!r} was replaced"
        torch.testing.assert_close(b, value, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# the original is never mutated


@pytest.mark.parametrize("entry", ["optimize", "audit"])
def test_original_not_mutated_train_mode_batchnorm(entry):
    torch.manual_seed(3)
    model = FoldNet().train()
    model.unused.eval()  # mixed flags must survive as they are
    # non-trivial running stats and counter, so "reset" would be noticed too
    with torch.no_grad():
        model(x3(seed=9))
    assert int(model.bn.num_batches_tracked) == 1
    snap = snapshot(model)
    rng = torch.get_rng_state()

    result = getattr(tdd_fx, entry)(model, (x3(),))

    assert torch.equal(torch.get_rng_state(), rng), "global RNG state changed"
    assert_unchanged(model, snap)
    sites = result.tdd_report.rewritten if entry == "optimize" else result.found
    assert {s.module for s in sites} >= {"fc1", "fc2"}


def test_train_mode_batchnorm_fold_is_rewritten_and_runs_in_train_mode():
    torch.manual_seed(3)
    model = FoldNet().train()
    opt = tdd_fx.optimize(model, (x3(),))
    assert {s.module for s in opt.tdd_report.rewritten} >= {"fc1", "fc2"}
    assert opt.tdd_report.verified is True
    assert tdd_fx.graph_of(opt, mode="train") is not None
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        torch.manual_seed(1)
        out = opt(x3(seed=2))
    assert fallbacks(record) == []
    twin = copy.deepcopy(model)
    torch.manual_seed(1)
    torch.testing.assert_close(out, twin(x3(seed=2)))


def test_original_not_mutated_in_eval_mode_and_without_inputs():
    model = FoldNet().eval()
    snap = snapshot(model)
    rng = torch.get_rng_state()
    tdd_fx.optimize(model)
    tdd_fx.audit(model)
    tdd_fx.optimize(model, x3())
    assert torch.equal(torch.get_rng_state(), rng)
    assert_unchanged(model, snap)


def test_switching_mode_of_result_leaves_original_flags():
    model = FoldNet().train()
    opt = tdd_fx.optimize(model, (x3(),))
    opt.eval()
    assert all(m.training for m in model.modules())
    assert not any(m.training for m in opt.modules())
    model.eval()
    opt.train()
    assert not any(m.training for m in model.modules())


def test_result_keeps_each_submodule_training_flag():
    model = FoldNet().train()
    model.unused.eval()
    model.bn.eval()  # frozen BatchNorm inside a training model
    opt = tdd_fx.optimize(model, (x3(),))
    flags = {n: m.training for n, m in model.named_modules() if n}
    got = {n: m.training for n, m in opt.named_modules() if n}
    assert got == flags
    assert opt.training is True


# --------------------------------------------------------------------------------------------
# parameters and state_dict


def test_result_shares_parameter_objects():
    model = FoldNet()
    opt = tdd_fx.optimize(model, (x3(),))
    assert [n for n, _ in opt.named_parameters()] == [n for n, _ in model.named_parameters()]
    for (n, p), (_, q) in zip(model.named_parameters(), opt.named_parameters()):
        assert q is p, n
    for (n, b), (_, c) in zip(model.named_buffers(), opt.named_buffers()):
        assert c is b, n


def test_state_dict_same_keys_order_and_shapes_including_unused():
    model = FoldNet()
    opt = tdd_fx.optimize(model, (x3(),))
    assert opt.tdd_report.rewritten  # the graph really was changed
    assert canonical_nodes(opt)
    sd, osd = model.state_dict(), opt.state_dict()
    assert list(osd) == list(sd)
    assert {k: v.shape for k, v in osd.items()} == {k: v.shape for k, v in sd.items()}
    for key in ("unused.0.weight", "unused.1.running_mean", "unused.1.num_batches_tracked",
                "unused_buf", "bn.num_batches_tracked"):
        assert key in osd
    # the non-persistent buffer is kept as a buffer, and stays out of the state_dict
    assert "scratch" not in osd
    assert dict(opt.named_buffers())["scratch"] is model.scratch
    assert [n for n, _ in opt.named_buffers()] == [n for n, _ in model.named_buffers()]


def test_checkpoint_of_original_loads_into_result():
    torch.manual_seed(0)
    model = FoldNet().eval()
    opt = tdd_fx.optimize(model, (x3(),))
    torch.manual_seed(123)
    other = FoldNet().eval()
    with torch.no_grad():
        other.bn.running_mean.normal_()
        other.bn.running_var.uniform_(0.5, 2.0)
        other.unused_buf.mul_(3)
    opt.load_state_dict(copy.deepcopy(other.state_dict()), strict=True)
    torch.testing.assert_close(opt(x3()), other(x3()))
    torch.testing.assert_close(opt.unused_buf, other.unused_buf)
    # parameters are shared: the original got the checkpoint too
    torch.testing.assert_close(model.fc1.weight, other.fc1.weight)


def test_checkpoint_of_result_loads_into_original():
    model = FoldNet().eval()
    opt = tdd_fx.optimize(model, (x3(),))
    fresh = FoldNet().eval()
    assert not torch.equal(fresh.fc1.weight, model.fc1.weight)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()), strict=True)
    torch.testing.assert_close(fresh(x3()), opt(x3()))
    torch.testing.assert_close(fresh(x3()), model(x3()))


def test_optimizer_on_result_trains_original_tensors():
    torch.manual_seed(0)
    model = FoldNet().train()
    twin = copy.deepcopy(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = tdd_fx.optimize(model, (x3(),))
    sgd_opt = torch.optim.SGD(opt.parameters(), lr=0.1, momentum=0.9)
    sgd_twin = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    target = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(5))
    for step in range(3):
        x = x3(seed=10 + step)
        for net, sgd in ((opt, sgd_opt), (twin, sgd_twin)):
            sgd.zero_grad()
            torch.manual_seed(step)  # same dropout masks
            loss = ((net(x) - target) ** 2).mean()
            loss.backward()
            sgd.step()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p, q, msg=lambda m, n=n: f"{n}: {m}")
        if n.startswith("unused."):  # no gradient: unchanged
            assert torch.equal(p, start[n]), n
    for n in ("fc1.weight", "fc2.weight", "fc2.bias", "bn.weight", "post.weight"):
        assert not torch.equal(dict(model.named_parameters())[n], start[n]), n
    for (n, b), (_, c) in zip(model.named_buffers(), twin.named_buffers()):
        torch.testing.assert_close(b, c, msg=lambda m, n=n: f"{n}: {m}")
    assert int(model.bn.num_batches_tracked) == 3


def test_optimizer_moves_the_original_parameters():
    model = Simple().train()
    before = model.a.module.weight.detach().clone()
    opt = tdd_fx.optimize(model, (x3(),))
    sgd = torch.optim.SGD(opt.parameters(), lr=0.5)
    opt(x3()).sum().backward()
    sgd.step()
    assert model.a.module.weight.grad is not None
    assert not torch.equal(model.a.module.weight.detach(), before)


# --------------------------------------------------------------------------------------------
# train / eval


@pytest.mark.parametrize("factory", [FoldNet, Simple])
def test_train_eval_switch_like_the_original(factory):
    torch.manual_seed(0)
    model = factory().train()
    opt = tdd_fx.optimize(model, (x3(),))
    assert opt.tdd_report.rewritten
    x = x3(seed=2)

    def both(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        a = model(x)
        torch.manual_seed(seed)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            b = opt(x)
        assert fallbacks(record) == [], "each mode runs its captured program"
        return a, b

    a, b = both(7)
    torch.testing.assert_close(b, a)
    # dropout really is active in train mode: another seed gives another output
    a2, _ = both(8)
    assert not torch.allclose(a, a2)

    opt.eval()
    model.eval()
    a, b = both(7)
    torch.testing.assert_close(b, a)
    a2, b2 = both(8)
    torch.testing.assert_close(a2, a)  # deterministic now
    torch.testing.assert_close(b2, b)
    # eval behaviour differs from train behaviour (dropout off, running stats used)
    model.train()
    torch.manual_seed(7)
    assert not torch.allclose(model(x), a)
    model.eval()

    opt.train()
    model.train()
    a, b = both(11)
    torch.testing.assert_close(b, a)


def test_flags_no_capture_covered_run_the_original_with_one_warning():
    """opt.train() with one submodule frozen in eval: no program was captured for these flags."""
    torch.manual_seed(0)
    model = Simple().train()
    opt = tdd_fx.optimize(model, (x3(),))
    assert len(opt.tdd_report.rewritten) == 2
    opt.train()
    opt.drop.eval()
    ref = copy.deepcopy(model).train()
    ref.drop.eval()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for seed in range(3):
            torch.manual_seed(seed)
            torch.testing.assert_close(opt(x3(seed=seed)), ref(x3(seed=seed)))
    warned = fallbacks(record)
    assert len(warned) == 1, warned
    assert "no graph was captured and verified for this mode (train" in warned[0]
    assert model.drop.training  # the original's flags are its own


def test_result_eval_reaches_the_modules_of_the_rewritten_graph():
    """opt.eval() alone (the original stays in train mode) gives the original's eval output."""
    torch.manual_seed(0)
    model = FoldNet().train()
    opt = tdd_fx.optimize(model, (x3(),)).eval()
    x = x3(seed=2)
    ref = copy.deepcopy(model).eval()
    torch.manual_seed(1)
    torch.testing.assert_close(opt(x), ref(x))


# --------------------------------------------------------------------------------------------
# idempotence


def test_optimize_twice_finds_nothing_new_simple():
    model = Simple().eval()
    inputs = (x3(),)
    once, twice = optimize_twice(model, inputs, rewritten=2)
    assert type(twice) is Simple
    assert twice.tdd_report.sites == []  # the canonical nodes are not candidates again
    # the first pass's work is kept: no fold/unfold comes back around the dense layers
    folds = {torch.ops.aten.view.default, torch.ops.aten.reshape.default,
             torch.ops.aten._unsafe_view.default}
    assert len(canonical_nodes(once)) == len(canonical_nodes(twice)) == 4
    for graph in (tdd_fx.graph_of(once), tdd_fx.graph_of(twice)):
        assert not any(n.target in folds for n in graph.graph.nodes), graph.code
    assert_equivalent(twice, model, inputs)


def test_optimizing_an_optimized_model_does_not_warn():
    model = Simple().eval()
    once = tdd_fx.optimize(model, (x3(),))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tdd_fx.optimize(once, (x3(),))
    assert fallbacks(record) == []


def test_optimize_twice_finds_nothing_new_with_batchnorm_in_fold():
    once, _ = optimize_twice(FoldNet().eval(), (x3(),))
    assert {s.module for s in once.tdd_report.rewritten} >= {"fc1", "fc2"}


def test_optimize_twice_still_equivalent_with_batchnorm_in_fold():
    model = FoldNet().eval()
    inputs = (x3(),)
    twice = tdd_fx.optimize(tdd_fx.optimize(model, inputs), inputs)
    assert_equivalent(twice, model, inputs)
    assert list(twice.state_dict()) == list(model.state_dict())
    for p, q in zip(model.parameters(), twice.parameters()):
        assert p is q


def test_audit_of_optimized_model_finds_nothing():
    model = Simple().eval()
    once = tdd_fx.optimize(model, (x3(),))
    report = tdd_fx.audit(once, (x3(),))
    assert report.found == []


# --------------------------------------------------------------------------------------------
# tied modules


def test_tied_modules_keep_identity():
    torch.manual_seed(0)
    model = Tied().eval()
    inputs = (x3(),)
    opt = tdd_fx.optimize(model, inputs)
    assert len(opt.tdd_report.rewritten) == 3
    assert opt.first.module is opt.second.module
    assert opt.first.module.weight is model.first.module.weight
    assert len(list(opt.parameters())) == len(list(model.parameters())) == 4
    assert list(opt.state_dict()) == list(model.state_dict())
    assert_equivalent(opt, model, inputs)
    # the tied weight gets the gradient of both uses, like in the original
    opt(x3()).sum().backward()
    g_opt = model.first.module.weight.grad.clone()
    model.zero_grad()
    model(x3()).sum().backward()
    torch.testing.assert_close(g_opt, model.first.module.weight.grad)


def test_tied_checkpoint_loads_both_ways():
    model = Tied().eval()
    opt = tdd_fx.optimize(model, (x3(),))
    fresh = Tied().eval()
    opt.load_state_dict(copy.deepcopy(fresh.state_dict()), strict=True)
    assert opt.first.module is opt.second.module
    torch.testing.assert_close(opt(x3()), fresh(x3()))


class TiedWeights(nn.Module):
    """Weight tying between two distinct Linear modules, and a root-level Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = Wrap(nn.Linear(6, 6))
        self.dec = Wrap(nn.Linear(6, 6))
        self.dec.module.weight = self.enc.module.weight
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(x)
        return self.dec(h * torch.sigmoid(h)) * self.scale


def test_tied_parameters_between_distinct_modules_and_root_parameter():
    model = TiedWeights().eval()
    inputs = (x3(),)
    opt = tdd_fx.optimize(model, inputs)
    assert len(opt.tdd_report.rewritten) == 2
    assert opt.dec.module.weight is opt.enc.module.weight is model.enc.module.weight
    assert opt.scale is model.scale
    assert list(opt.state_dict()) == list(model.state_dict())
    assert [n for n, _ in opt.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert_equivalent(opt, model, inputs)


# --------------------------------------------------------------------------------------------
# hooks registered on the model itself


def _hooked_simple() -> Simple:
    model = Simple().eval()
    model.register_forward_hook(lambda mod, args, out: out * 2 + 1)
    return model


def test_root_forward_hook_kept_with_example_inputs():
    model = _hooked_simple()
    inputs = (x3(),)
    opt = tdd_fx.optimize(model, inputs)
    assert_equivalent(opt, model, inputs)


def test_root_forward_hook_kept_without_example_inputs():
    model = _hooked_simple()
    opt = tdd_fx.optimize(model)
    x = x3()
    torch.testing.assert_close(opt(x), model(x))


def test_hook_on_a_traced_through_submodule_is_kept():
    model = Simple().eval()
    model.a.register_forward_hook(lambda mod, args, out: out * 3)
    inputs = (x3(),)
    opt = tdd_fx.optimize(model, inputs)
    assert_equivalent(opt, model, inputs)
    torch.testing.assert_close(tdd_fx.optimize(model)(x3()), model(x3()))


# --------------------------------------------------------------------------------------------
# models tdd_fx cannot handle come back unchanged, with the same invariants


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = Wrap(nn.Linear(6, 4))
        self.register_buffer("unused_buf", torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # control flow on data: not traceable
            return self.a(x)
        return -self.a(x)


@pytest.mark.parametrize("with_inputs", [True, False])
def test_untraceable_model_keeps_its_code_sharing_parameters(with_inputs):
    """The root cannot be traced: without inputs it comes back unchanged; with inputs its
    traceable child is optimized (partial tracing) and grafted into a copy of the tree."""
    model = DataDependent().train()
    snap = snapshot(model)
    opt = tdd_fx.optimize(model, (x3(),) if with_inputs else None)
    assert_unchanged(model, snap)
    assert opt is not model
    assert type(opt) is DataDependent  # the root's own (untraceable) code is kept
    if with_inputs:
        assert [s.module for s in opt.tdd_report.rewritten] == ["a.module"]
        assert opt.tdd_report.verified is True
        assert any(n.startswith("captured its submodules instead") and n.endswith(": a")
                   for n in opt.tdd_report.notes), opt.tdd_report.notes
        assert tdd_fx.graphs(opt).keys() == {"a"}
    else:
        assert opt.tdd_report.rewritten == []
        assert any("returned unchanged and NOT verified" in n for n in opt.tdd_report.notes)
        assert tdd_fx.graphs(opt) == {}
    assert "forward" not in opt.__dict__  # the root runs its own class's code
    assert [id(p) for p in opt.parameters()] == [id(p) for p in model.parameters()]
    assert list(opt.state_dict()) == list(model.state_dict())
    pos, neg = x3(), -x3().abs()
    torch.testing.assert_close(opt(pos), model(pos))
    torch.testing.assert_close(opt(neg), model(neg))
    opt.eval()
    assert model.training and not opt.a.training


class DefaultNone(nn.Module):
    """An optional argument whose default is None (a common signature)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = Wrap(nn.Linear(6, 4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.a(x)
        return y if mask is None else y * mask


def test_default_none_argument_with_example_inputs():
    model = DefaultNone().eval()
    opt = tdd_fx.optimize(model, (x3(),))
    torch.testing.assert_close(opt(x3()), model(x3()))


def test_default_none_argument_without_example_inputs():
    model = DefaultNone().eval()
    opt = tdd_fx.optimize(model)
    torch.testing.assert_close(opt(x3()), model(x3()))


# --------------------------------------------------------------------------------------------
# the result is the user's module tree


class WithExtras(FoldNet):
    """Attributes and methods of the user's class must survive."""

    def __init__(self) -> None:
        super().__init__()
        self.horizon = 5
        self.names = ["a", "b"]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).argmax(-1)


def test_result_is_the_users_class_with_an_instance_forward():
    model = WithExtras().eval()
    opt = tdd_fx.optimize(model, (x3(),))
    assert type(opt) is WithExtras and opt is not model
    assert isinstance(opt, FoldNet)
    assert opt.horizon == 5 and opt.names == ["a", "b"]
    assert type(opt).forward is WithExtras.forward  # the class is not patched
    assert "forward" in opt.__dict__ and "forward" not in model.__dict__
    assert len([n for n in tdd_fx.graph_of(opt).graph.nodes
                if n.target is time_distributed_dense]) == 2
    with pytest.raises(LookupError):
        tdd_fx.graph_of(model)
    assert torch.equal(opt.predict(x3()), model.predict(x3()))
    assert [type(m) for m in opt.modules()] == [type(m) for m in model.modules()]
    for (n, m), (_, k) in zip(model.named_modules(), opt.named_modules()):
        assert k is not m, n  # module objects are copies; parameters are shared (above)


def test_deepcopy_of_result_is_independent_and_still_optimized():
    model = Simple().eval()
    opt = tdd_fx.optimize(model, (x3(),))
    twin = copy.deepcopy(opt)
    assert type(twin) is Simple
    assert twin.a.module.weight is not opt.a.module.weight
    assert len(canonical_nodes(twin)) == len(canonical_nodes(opt))
    with torch.no_grad():
        twin.a.module.weight.mul_(2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out_twin, out_opt = twin(x3()), opt(x3())
    assert fallbacks(record) == []
    torch.testing.assert_close(out_opt, model(x3()))  # untouched by the copy's change
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.a.module.weight.mul_(2)
    torch.testing.assert_close(out_twin, ref(x3()))  # the copy runs on its own parameters


def test_load_state_dict_assign_and_functional_call_reach_the_program():
    model = Simple().eval()
    opt = tdd_fx.optimize(model, (x3(),))
    other = Simple().eval()
    params = {k: v * 0.5 for k, v in model.named_parameters()}
    torch.testing.assert_close(torch.func.functional_call(opt, params, (x3(),)),
                               torch.func.functional_call(model, params, (x3(),)))
    opt.load_state_dict(copy.deepcopy(other.state_dict()), assign=True)
    assert opt.a.module.weight is not model.a.module.weight
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = opt(x3())
    assert fallbacks(record) == []
    torch.testing.assert_close(out, other(x3()))
