"""Optimized modules compose with PyTorch's tooling: torch.export, ONNX, torch.compile, copies and
checkpoints, DistributedDataParallel.

Three small models, one per family a user is likely to ship: a Keras-port ``TimeDistributed``
wrapper around a Linear-ReLU-Linear chain, a spectrogram conv stem (``Conv2d(1, C, (F, 1))``), and a
per-step loop over time.  Every test compares against the ORIGINAL model, at sizes other than the
example's wherever shapes can vary.
"""

from __future__ import annotations

import copy
import inspect
import io
import os
import socket
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_equivalent
from torch import nn
from torch.export import Dim, ShapesCollection

import tdd_fx
from tdd_fx.ops import time_distributed_dense

FEAT, HID, OUT, CH = 12, 16, 6, 8


class KerasTimeDistributed(nn.Module):
    """The usual Keras port: rank guard, fold every leading axis, unfold with ``x.size(0)``."""

    def __init__(self, module: nn.Module, out_features: int) -> None:
        super().__init__()
        self.module = module
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x.size()) <= 2:
            return self.module(x)
        y = self.module(x.contiguous().view(-1, x.size(-1)))
        return y.view(x.size(0), -1, self.out_features)


class WrapperChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = KerasTimeDistributed(
            nn.Sequential(nn.Linear(FEAT, HID), nn.ReLU(), nn.Linear(HID, OUT)), OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, F) -> (B, T, OUT)
        return self.head(x)


class ConvStem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, CH, (FEAT, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F, T) -> (B, CH, T)
        return torch.relu(self.conv(x.unsqueeze(1)).squeeze(2))


class StepLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(FEAT, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, F) -> (B, T, OUT)
        return torch.stack([self.fc(x[:, t]) for t in range(x.size(1))], 1)


#: name -> (class, axis of time in the input); batch is axis 0, features fill the remaining axis
MODELS = {"wrapper_chain": (WrapperChain, 1), "conv_stem": (ConvStem, 2), "step_loop": (StepLoop, 1)}
EXAMPLE_BT = (4, 7)
OTHER_BTS = [(3, 5), (6, 11)]  # neither equals the example's batch or time


def make_input(name: str, b: int, t: int) -> torch.Tensor:
    shape = [b, t, FEAT] if MODELS[name][1] == 1 else [b, FEAT, t]
    return torch.randn(shape)


def build(name: str, seed: int = 0) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(original in eval mode, its optimized version, the example input)."""
    torch.manual_seed(seed)
    model = MODELS[name][0]().eval()
    x = make_input(name, *EXAMPLE_BT)
    opt = tdd_fx.optimize(model, (x,))
    # the tests below are only meaningful if something was rewritten and guarded
    assert opt.tdd_report.rewritten, str(opt.tdd_report)
    assert time_distributed_dense in _targets(opt)
    return model, opt, x


def _targets(opt: torch.nn.Module) -> list:
    return [n.target for n in tdd_fx.graph_of(opt).graph.nodes if n.op == "call_function"]


def dynamic_spec(name: str) -> dict[int, Dim]:
    return {0: Dim("batch", min=2, max=64), MODELS[name][1]: Dim("time", min=2, max=64)}


def signature_agnostic_shapes(module: nn.Module, x: torch.Tensor, spec: dict) -> object:
    """``dynamic_shapes`` matched to ``module.forward``'s signature, whatever it is."""
    sc = ShapesCollection()
    sc[x] = spec
    return sc.dynamic_shapes(module, (x,))


# ----------------------------------------------------------------------------------------------
# 1. torch.export with dynamic batch and time


@pytest.mark.parametrize("name", list(MODELS))
def test_export_dynamic_batch_and_time(name):
    model, opt, x = build(name)
    ep = torch.export.export(opt, (x,), dynamic_shapes=signature_agnostic_shapes(opt, x, dynamic_spec(name)))
    exported = ep.module()
    for b, t in OTHER_BTS:
        xx = make_input(name, b, t)
        with torch.no_grad():
            torch.testing.assert_close(exported(xx), model(xx))


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_export_accepts_the_spec_that_exports_the_original(form):
    model, opt, x = build("wrapper_chain")
    spec = dynamic_spec("wrapper_chain")
    shapes = (spec,) if form == "tuple" else {"x": spec}
    torch.export.export(model, (x,), dynamic_shapes=shapes)  # the original exports with it
    exported = torch.export.export(opt, (x,), dynamic_shapes=shapes).module()
    xx = make_input("wrapper_chain", *OTHER_BTS[0])
    with torch.no_grad():
        torch.testing.assert_close(exported(xx), model(xx))


# ----------------------------------------------------------------------------------------------
# 2. ONNX (dynamo exporter, dynamic batch and time), run in onnxruntime


def _onnx_export(module: nn.Module, x: torch.Tensor, dynamic_shapes: object) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (x,), dynamo=True, dynamic_shapes=dynamic_shapes,
                                    verbose=False)
    return program.model_proto.SerializeToString()


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_runs_in_onnxruntime_at_other_sizes(name):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, opt, x = build(name)
    blob = _onnx_export(opt, x, signature_agnostic_shapes(opt, x, dynamic_spec(name)))
    onnx.checker.check_model(onnx.load_from_string(blob))
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert [d if isinstance(d, int) else None for d in inp.shape].count(None) == 2, inp.shape
    for b, t in OTHER_BTS:
        xx = make_input(name, b, t)
        (got,) = sess.run(None, {inp.name: xx.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(xx), atol=1e-5, rtol=1e-5)


def test_onnx_input_names_match_the_original():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    model, opt, x = build("wrapper_chain")
    spec = dynamic_spec("wrapper_chain")
    original = onnx.load_from_string(_onnx_export(model, x, (spec,)))
    optimized = onnx.load_from_string(_onnx_export(opt, x, signature_agnostic_shapes(opt, x, spec)))
    names = [[i.name for i in m.graph.input] for m in (original, optimized)]
    assert names[1] == names[0] == ["x"]


# ----------------------------------------------------------------------------------------------
# 3. torch.compile


# inductor compiles C++ (about 10 s cold on 2 cores): one model, one size
@pytest.mark.parametrize(("name", "backend"), [
    *((n, b) for n in MODELS for b in ("eager", "aot_eager")), ("wrapper_chain", "inductor")])
def test_compile_matches_outputs_and_gradients(name, backend):
    model, opt, x = build(name)
    torch._dynamo.reset()
    compiled = torch.compile(opt, backend=backend, fullgraph=True)
    sizes = [EXAMPLE_BT, OTHER_BTS[0]] if backend != "inductor" else [EXAMPLE_BT]
    for b, t in sizes:
        xx = x if (b, t) == EXAMPLE_BT else make_input(name, b, t)
        assert_equivalent(compiled, model, (xx,))
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# 4. deepcopy, torch.save/torch.load, state_dict both ways


@pytest.mark.parametrize("name", list(MODELS))
def test_deepcopy_is_an_independent_equivalent_module(name):
    model, opt, x = build(name)
    dup = copy.deepcopy(opt)
    assert type(dup) is type(model) and time_distributed_dense in _targets(dup)
    assert list(dup.state_dict()) == list(model.state_dict())
    assert not {id(p) for p in dup.parameters()} & {id(p) for p in model.parameters()}
    xx = make_input(name, *OTHER_BTS[1])
    assert_equivalent(dup, model, (xx,))
    with torch.no_grad():  # independent: changing the copy leaves the original alone
        before = model(xx)
        for p in dup.parameters():
            p.add_(1.0)
        torch.testing.assert_close(model(xx), before)
        assert not torch.allclose(dup(xx), before)


def test_deepcopy_keeps_the_report():
    _, opt, _ = build("wrapper_chain")
    assert copy.deepcopy(opt).tdd_report.rewritten


@pytest.mark.parametrize("name", list(MODELS))
def test_save_load_round_trip(name):
    model, opt, x = build(name)
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is type(model)
    assert time_distributed_dense in _targets(loaded)
    assert list(loaded.state_dict()) == list(model.state_dict())
    assert loaded.tdd_report.rewritten
    for b, t in [EXAMPLE_BT, OTHER_BTS[1]]:
        assert_equivalent(loaded, model, (x if (b, t) == EXAMPLE_BT else make_input(name, b, t),))


def _outcome(module: nn.Module, x: torch.Tensor) -> tuple:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ("returned", module(x).detach())
        except Exception as exc:
            return ("raised", type(exc).__name__)


def test_saving_does_not_change_the_saved_module():
    _, opt, x = build("wrapper_chain")
    off_rank = x[0]  # 2-D: outside the rank guard; the original handles it
    before = _outcome(opt, off_rank)
    torch.save(opt, io.BytesIO())
    after = _outcome(opt, off_rank)
    assert before[0] == after[0], (before, after)
    if before[0] == "returned":
        torch.testing.assert_close(after[1], before[1])


@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_loads_both_ways(name):
    model, opt, x = build(name)
    donor = build_original(name, seed=1)
    xx = make_input(name, *OTHER_BTS[0])
    with torch.no_grad():
        assert not torch.allclose(donor(xx), model(xx))
        opt.load_state_dict(donor.state_dict(), strict=True)
        torch.testing.assert_close(opt(xx), donor(xx))
        torch.testing.assert_close(model(xx), donor(xx))  # parameters are shared with the original
        receiver = build_original(name, seed=2)
        for p in opt.parameters():
            p.mul_(0.5)
        receiver.load_state_dict(opt.state_dict(), strict=True)
        torch.testing.assert_close(receiver(xx), opt(xx))
        assert not torch.allclose(receiver(xx), donor(xx))


def build_original(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name][0]().eval()


# ----------------------------------------------------------------------------------------------
# 5. DistributedDataParallel, gloo, 2 CPU processes

WORLD = 2


def _ddp_worker(rank: int, port: int, state: dict, x: torch.Tensor, target: torch.Tensor,
                out_dir: str) -> None:
    """One rank: optimize, wrap in DDP, one SGD step on its half of the batch, save grads."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = WrapperChain()
        model.load_state_dict(state)
        half = x.shape[0] // WORLD
        xs, ts = x[rank * half:(rank + 1) * half], target[rank * half:(rank + 1) * half]
        opt = tdd_fx.optimize(model, (xs,))
        assert time_distributed_dense in _targets(opt)
        ddp = DistributedDataParallel(opt)
        sgd = torch.optim.SGD(ddp.parameters(), lr=0.1)
        sgd.zero_grad()
        F.mse_loss(ddp(xs), ts).backward()
        grads = {n: p.grad.detach().clone() for n, p in opt.named_parameters()}
        sgd.step()
        torch.save({"grads": grads, "params": {k: v.detach().clone() for k, v in opt.state_dict().items()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gloo_two_processes_matches_single_process_original(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    torch.manual_seed(0)
    model = WrapperChain().train()
    x = torch.randn(8, 5, FEAT)  # each rank: (4, 5, F)
    target = torch.randn(8, 5, OUT)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, port, state, x, target, str(tmp_path)))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=60)
        assert all(not p.is_alive() for p in procs), "DDP workers timed out"
        assert [p.exitcode for p in procs] == [0] * WORLD
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()

    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    sgd.zero_grad()
    F.mse_loss(model(x), target).backward()
    ref_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    sgd.step()
    for r in range(WORLD):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["grads"].keys() == ref_grads.keys()
        for n, g in ref_grads.items():
            torch.testing.assert_close(got["grads"][n], g, atol=1e-5, rtol=1e-5)
        assert list(got["params"]) == list(model.state_dict())
        for k, v in model.state_dict().items():
            torch.testing.assert_close(got["params"][k], v, atol=1e-5, rtol=1e-5)


def test_models_here_are_what_the_file_claims():
    """Guard against the fixtures silently testing nothing: the forms are found, and only they."""
    sigs = {name: inspect.signature(MODELS[name][0]().forward) for name in MODELS}
    assert all(list(s.parameters) == ["x"] for s in sigs.values())
    for name in MODELS:
        _, opt, _ = build(name)
        patterns = sorted(s.pattern for s in opt.tdd_report.rewritten)
        assert patterns == {"wrapper_chain": ["reshape", "reshape"], "conv_stem": ["conv"],
                            "step_loop": ["loop"]}[name], str(opt.tdd_report)
