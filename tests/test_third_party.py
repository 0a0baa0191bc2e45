"""tdd_fx on real models from third-party PyPI packages (not written here), built small with
random weights.  Optional: each group is skipped when its package is absent.

    pip install --no-deps pytorch-tcn==1.2.3 tft-torch==0.0.6 omegaconf==2.4.0

(``pytorch-tcn`` needs torch and numpy; ``tft_torch.tft`` imports only torch and omegaconf, which
needs PyYAML.  ``--no-deps`` skips tft-torch's pandas/scikit-learn/matplotlib, used only by its
plotting module.)

- ``pytorch_tcn.TCN``: a temporal convolutional network.  Its pointwise ``nn.Conv1d(C, O, 1)``
  layers (residual ``downsample``, ``downsample_skip_connection``, ``projection_out``,
  ``embedding_projection_*``) are time-distributed dense layers; its dilated causal
  ``TemporalConv1d`` (kernel 3) are real convolutions and must be left alone.
- ``tft_torch`` (Temporal Fusion Transformer): every dense layer of ``GatedResidualNetwork`` is
  wrapped in ``TimeDistributed``, the Keras-port ``view(-1, F) -> module -> view(B, -1, O)``
  sandwich from the PyTorch forums.  Wrapped ``LayerNorm``, per-variable distinct ``Linear``s
  and ``Embedding``s are near-misses.

Known tdd_fx bugs these models hit are ``xfail(strict=True)`` with the bug described, until fixed.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_equivalent
from torch import nn

import tdd_fx

KERNEL_3 = "kernel size 3 on axis 2 mixes neighbouring positions"


pytestmark = pytest.mark.usefixtures("one_thread")


def sites(report: tdd_fx.Report, status: str) -> set[tuple[str, str]]:
    """``(pattern, module path)`` of the report's sites with ``status``."""
    return {(s.pattern, s.module) for s in report.sites if s.status == status}


def canonical_nodes(opt: nn.Module, mode: str) -> int:
    """Canonical nodes in the rewritten graphs that run in ``mode`` ("train" or "eval")."""
    return sum(n.target is tdd_fx.time_distributed_dense
               for by_mode in tdd_fx.graphs(opt).values() if mode in by_mode
               for n in by_mode[mode].graph.nodes)


def check_optimized(opt: nn.Module, model: nn.Module, inputs: tuple, *others: tuple) -> None:
    """Verified (or, with nothing rewritten, the model's own code), nothing rolled back, one
    canonical node per rewritten site in the graphs of the model's mode, the same tensors, and the
    same outputs and gradients in both modes, on the example and on other sizes, with no call
    outside what the capture covered (no fall back to the original forward)."""
    report = opt.tdd_report
    assert report.verified is (True if report.rewritten else None), str(report)
    assert not report.rolled_back, str(report)
    mode = "train" if model.training else "eval"
    assert canonical_nodes(opt, mode) == len(report.rewritten), str(report)
    if not report.rewritten:
        assert tdd_fx.graphs(opt) == {}, str(report)
    assert {id(p) for p in opt.parameters()} == {id(p) for p in model.parameters()}
    assert list(opt.state_dict()) == list(model.state_dict())
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", "tdd_fx: .*running the original forward",
                                    RuntimeWarning)
            for train in (True, False):
                model.train(train)
                opt.train(train)
                for xs in (inputs, *others):
                    assert_equivalent(opt, model, xs)
    finally:
        model.train()
        opt.train()


class Called(nn.Module):
    """User code that calls the third-party model as its docs do: ``model(x)``, other arguments
    left at their defaults (see the xfail on calling ``TCN`` directly below)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class CalledWith(Called):
    """``model(x, embeddings)``, as pytorch-tcn's docs call a conditioned TCN."""

    def forward(self, x: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return self.model(x, embeddings)


# --------------------------------------------------------------------------------------------
# pytorch-tcn


@pytest.fixture(scope="module")
def pytorch_tcn():
    return pytest.importorskip("pytorch_tcn")


def tcn_convs(levels: int = 3) -> set[tuple[str, str]]:
    """The dilated causal TemporalConv1d of every block."""
    return {("conv", f"model.network.{i}.conv{j}") for i in range(levels) for j in (1, 2)}


TCN_CASES = {
    # (TCN keyword arguments, example input, another size, the pointwise convs)
    "batch_norm-skip-projection": (
        dict(use_norm="batch_norm", use_skip_connections=True, output_projection=5),
        (2, 4, 20), (3, 4, 13),
        {"model.network.0.downsample", "model.network.2.downsample",
         "model.downsample_skip_connection.0", "model.downsample_skip_connection.1",
         "model.projection_out"}),
    "NLC-no_norm": (
        dict(use_norm=None, input_shape="NLC", output_projection=5),
        (2, 20, 4), (3, 13, 4),
        {"model.network.0.downsample", "model.network.2.downsample", "model.projection_out"}),
}


@pytest.mark.parametrize("case", list(TCN_CASES))
def test_tcn_pointwise_convs_rewritten_dilated_convs_left_alone(pytorch_tcn, case):
    kwargs, shape, other, pointwise = TCN_CASES[case]
    tcn = pytorch_tcn.TCN(4, [8, 8, 16], kernel_size=3, dropout=0.1, **kwargs)
    model, x = Called(tcn), (torch.randn(*shape),)

    report = tdd_fx.audit(model, x)
    assert sites(report, "found") == {("conv", m) for m in pointwise}, str(report)
    assert sites(report, "rejected") == tcn_convs(), str(report)
    for s in report.rejected:
        assert s.reason.startswith(KERNEL_3), str(report)
        assert s.source.startswith("pytorch_tcn/conv.py:"), s.source
    assert not report.notes, str(report)  # traced as a whole

    opt = tdd_fx.optimize(model, x)
    assert sites(opt.tdd_report, "rewritten") == {("conv", m) for m in pointwise}, str(opt.tdd_report)
    assert sites(opt.tdd_report, "rejected") == tcn_convs(), str(opt.tdd_report)
    check_optimized(opt, model, x, (torch.randn(*other),))


def test_tcn_kernel_size_1_every_conv_is_pointwise(pytorch_tcn):
    """With ``kernel_size=1`` the causal pad is zero-wide and every TemporalConv1d is pointwise."""
    tcn = pytorch_tcn.TCN(4, [8, 8, 16], kernel_size=1, dropout=0.1, use_norm="batch_norm",
                          use_skip_connections=True, output_projection=5)
    model, x = Called(tcn), (torch.randn(2, 4, 20),)
    opt = tdd_fx.optimize(model, x)
    expected = tcn_convs() | {("conv", m) for m in TCN_CASES["batch_norm-skip-projection"][3]}
    assert sites(opt.tdd_report, "rewritten") == expected, str(opt.tdd_report)
    assert not opt.tdd_report.rejected, str(opt.tdd_report)
    check_optimized(opt, model, x, (torch.randn(3, 4, 9),))


def test_tcn_conditioning_embeddings(pytorch_tcn):
    """Gated blocks, layer norm, and a static embedding projected by pointwise convs per block."""
    tcn = pytorch_tcn.TCN(4, [8, 8, 16], kernel_size=3, dropout=0.1, use_norm="layer_norm",
                          use_gate=True, embedding_shapes=[(3,)], embedding_mode="concat",
                          output_projection=5)
    model, x = CalledWith(tcn), (torch.randn(2, 4, 20), torch.randn(2, 3))
    opt = tdd_fx.optimize(model, x)
    pointwise = {f"model.network.{i}.embedding_projection_{j}" for i in range(3) for j in (1, 2)}
    pointwise |= {"model.network.0.downsample", "model.network.2.downsample", "model.projection_out"}
    report = opt.tdd_report
    assert sites(report, "rewritten") == {("conv", m) for m in pointwise}, str(report)
    assert {s for s in sites(report, "rejected") if s[0] == "conv"} == tcn_convs(), str(report)
    check_optimized(opt, model, x, (torch.randn(3, 4, 13), torch.randn(3, 3)))


def test_tcn_conditioning_embeddings_no_spurious_loop_sites(pytorch_tcn):
    tcn = pytorch_tcn.TCN(4, [8, 8, 16], kernel_size=3, use_norm="layer_norm",
                          embedding_shapes=[(3,)], embedding_mode="concat")
    report = tdd_fx.audit(CalledWith(tcn), (torch.randn(2, 4, 20), torch.randn(2, 3)))
    assert report.found, str(report)  # traced
    assert not [s for s in report.sites if s.pattern == "loop"], str(report)


@pytest.mark.parametrize("conditioned", [False, True])
def test_tcn_called_directly_finds_the_downsample_convs(pytorch_tcn, conditioned):
    kwargs = dict(embedding_shapes=[(3,)], embedding_mode="add") if conditioned else {}
    tcn = pytorch_tcn.TCN(4, [8, 8, 16], kernel_size=3, use_norm=None, output_projection=5,
                          **kwargs)
    x = (torch.randn(2, 4, 20),) + ((torch.randn(2, 3),) if conditioned else ())
    report = tdd_fx.audit(tcn, x)
    assert ("conv", "network.0.downsample") in sites(report, "found"), str(report)


def test_tcn_default_weight_norm(pytorch_tcn):
    """The default ``use_norm='weight_norm'`` parametrizes the dilated convs (left alone, as
    subclasses of a conv layer whose forward may differ); the plain pointwise convs are rewritten."""
    tcn = pytorch_tcn.TCN(4, [8, 8, 16], kernel_size=3, dropout=0.1)
    model, x = Called(tcn), (torch.randn(2, 4, 20),)
    opt = tdd_fx.optimize(model, x)
    report = opt.tdd_report
    assert sites(report, "rewritten") == {("conv", "model.network.0.downsample"),
                                          ("conv", "model.network.2.downsample")}, str(report)
    assert sites(report, "rejected") == tcn_convs(), str(report)
    check_optimized(opt, model, x, (torch.randn(3, 4, 13),))


# --------------------------------------------------------------------------------------------
# tft-torch


@pytest.fixture(scope="module")
def tft():
    return pytest.importorskip("tft_torch.tft")


def test_tft_grn_time_distributed_linears(tft):
    """GRN with a context and a projected residual: each TimeDistributed(Linear) is a site, and
    so are the two parallel Linears of the TimeDistributed(GatedLinearUnit)
    (``sigmoid(fc1(x)) * fc2(x)`` on the folded rows); the TimeDistributed(LayerNorm) is not
    rewritten."""
    model = tft.GatedResidualNetwork(6, 8, 5, dropout=0.1, context_dim=4)
    x = (torch.randn(3, 10, 6), torch.randn(3, 10, 4))
    dense = {"skip_layer.module", "fc1.module", "context_projection.module", "fc2.module",
             "gate.module.fc1", "gate.module.fc2"}
    opt = tdd_fx.optimize(model, x)
    report = opt.tdd_report
    rewritten = {m for p, m in sites(report, "rewritten") if p == "reshape"}
    assert {"skip_layer.module", "fc1.module", "context_projection.module"} <= rewritten <= dense, \
        str(report)
    assert {p for p, _ in sites(report, "rewritten")} == {"reshape"}
    for s in report.rewritten:
        assert s.source.startswith(("tft_torch/base_blocks.py:", "tft_torch/tft.py:")), s.source
        assert s.in_shape[:2] == (3, 10) and s.out_shape[:2] == (3, 10), str(report)
    check_optimized(opt, model, x, (torch.randn(2, 7, 6), torch.randn(2, 7, 4)))


def test_tft_grn_fc2_before_gate(tft):
    model = tft.GatedResidualNetwork(6, 8, 5, dropout=0.1, context_dim=4)
    report = tdd_fx.audit(model, (torch.randn(3, 10, 6), torch.randn(3, 10, 4)))
    assert ("reshape", "fc2.module") in sites(report, "found"), str(report)


def test_tft_gate_add_norm_glu(tft):
    """A TimeDistributed fold around a module with two parallel Linears (the GLU,
    ``sigmoid(fc1(x)) * fc2(x)``): both Linears are sites."""
    model = tft.GateAddNorm(8, dropout=0.1)
    x = (torch.randn(3, 10, 8), torch.randn(3, 10, 8))
    report = tdd_fx.audit(model, x)
    assert {m for p, m in sites(report, "found")} >= {"gate.module.fc1", "gate.module.fc2"}, \
        str(report)
    opt = tdd_fx.optimize(model, x)
    check_optimized(opt, model, x, (torch.randn(2, 7, 8), torch.randn(2, 7, 8)))


def test_tft_grn_time_major(tft):
    """batch_first=False unfolds with view(-1, x.size(1), O); the wrapped LayerNorm is rejected."""
    model = tft.GatedResidualNetwork(6, 8, 6, dropout=0.1, batch_first=False)
    x = (torch.randn(10, 3, 6),)
    opt = tdd_fx.optimize(model, x)
    report = opt.tdd_report
    assert sites(report, "rewritten") == {("reshape", m) for m in (
        "fc1.module", "fc2.module", "gate.module.fc1", "gate.module.fc2")}, str(report)
    assert sites(report, "rejected") == {("reshape", "layernorm.module")}, str(report)
    assert "the fold wraps LayerNorm" in report.rejected[0].reason
    check_optimized(opt, model, x, (torch.randn(7, 2, 6),))


def test_tft_chained_time_distributed(tft):
    td = pytest.importorskip("tft_torch.base_blocks").TimeDistributed
    model = nn.Sequential(td(nn.Linear(6, 8)), nn.ELU(), td(nn.Linear(8, 5)))
    report = tdd_fx.audit(model, (torch.randn(3, 10, 6),))
    assert sites(report, "found") == {("reshape", "0.module"), ("reshape", "2.module")}, str(report)


@pytest.mark.parametrize("name", ["variable_selection", "input_embedding"])
def test_tft_near_misses_not_rewritten(tft, name):
    """Distinct per-variable GRNs on feature slices of folded (B·T, F) rows; per-variable
    Linear(1, S) and Embedding inside TimeDistributed(return_reshaped=False): nothing to rewrite."""
    if name == "variable_selection":
        model = tft.VariableSelectionNetwork(4, 3, 8, dropout=0.1, context_dim=5)
        x = (torch.randn(30, 12), torch.randn(30, 5))
    else:
        model = tft.InputChannelEmbedding(4, 3, 2, [5, 7], time_distribute=True)
        x = (torch.randn(3, 10, 3), torch.randint(0, 5, (3, 10, 2)))
    opt = tdd_fx.optimize(model, x)
    assert not opt.tdd_report.rewritten, str(opt.tdd_report)
    check_optimized(opt, model, x)


def small_tft(tft):
    from omegaconf import OmegaConf

    config = OmegaConf.create({
        "data_props": {
            "num_historical_numeric": 3, "num_historical_categorical": 2,
            "historical_categorical_cardinalities": [5, 7],
            "num_static_numeric": 2, "num_static_categorical": 1,
            "static_categorical_cardinalities": [4],
            "num_future_numeric": 1, "num_future_categorical": 1,
            "future_categorical_cardinalities": [6]},
        "task_type": "regression", "target_window_start": None,
        "model": {"attention_heads": 2, "dropout": 0.1, "lstm_layers": 2,
                  "output_quantiles": [0.1, 0.5, 0.9], "state_size": 8}})
    return tft.TemporalFusionTransformer(config)


class TFTOnTensors(nn.Module):
    """The TFT takes a dict batch; example_inputs are a tuple of tensors.  (Named parameters:
    tdd_fx binds a ``*tensors`` parameter to the first example input only.)"""

    KEYS = ("static_feats_numeric", "static_feats_categorical", "historical_ts_numeric",
            "historical_ts_categorical", "future_ts_numeric", "future_ts_categorical")

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, static_num: torch.Tensor, static_cat: torch.Tensor, past_num: torch.Tensor,
                past_cat: torch.Tensor, future_num: torch.Tensor, future_cat: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = (static_num, static_cat, past_num, past_cat, future_num, future_cat)
        out = self.model(dict(zip(self.KEYS, tensors)))
        return out["predicted_quantiles"], out["attention_scores"]


def tft_inputs(b: int = 3, past: int = 10, future: int = 4) -> tuple[torch.Tensor, ...]:
    return (torch.randn(b, 2), torch.randint(0, 4, (b, 1)),
            torch.randn(b, past, 3), torch.randint(0, 5, (b, past, 2)),
            torch.randn(b, future, 1), torch.randint(0, 6, (b, future, 1)))


def test_tft_whole_model_verified(tft):
    """The whole TFT (``torch.zeros`` on traced sizes, a dict batch, an LSTM) is captured by
    torch.export as one graph (the FX tracer could only trace its components), and verified."""
    model, x = TFTOnTensors(small_tft(tft)), tft_inputs()
    opt = tdd_fx.optimize(model, x)
    assert opt.tdd_report.verified, str(opt.tdd_report)
    assert not any("captured its submodules" in n for n in opt.tdd_report.notes), \
        str(opt.tdd_report)
    assert list(tdd_fx.graphs(opt)) == [""], str(opt.tdd_report)
    gates = {f"model.{g}.gate.module.fc{i}" for g in ("post_lstm_gating", "post_attention_gating",
                                                      "pos_wise_ff_gating") for i in (1, 2)}
    assert gates <= {m for _, m in sites(opt.tdd_report, "rewritten")}, str(opt.tdd_report)
    check_optimized(opt, model, x)


def test_tft_whole_model_finds_time_distributed_sites(tft):
    report = tdd_fx.audit(TFTOnTensors(small_tft(tft)), tft_inputs())
    assert report.found, str(report)
