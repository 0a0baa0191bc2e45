"""Real models from third-party PyPI packages (not written here), built tiny with random weights.

Each factory returns ``(model, args, kwargs)``: a freshly built, seeded, CPU, float32 model in
train mode and example inputs for ``model(*args, **kwargs)``, small enough that a forward and
backward take well under a second.  Each imports its package lazily and calls ``pytest.skip``
(with the import error) only when the package cannot be imported.

Installed by the README's set-up line (``--no-deps``; see the ``thirdparty`` extra in
pyproject.toml for their small pure-python dependencies).  Two binary dependencies need a note:

- ``torchvision`` (imported by timm at package import, and whenever it is installed by
  ``transformers.modeling_utils`` and by torchmetrics, hence lightning and pytorch-forecasting):
  every torchvision wheel on PyPI for Linux x86-64 is a CUDA build whose ``_C.so`` links
  ``libc10_cuda.so``, which the CPU torch does not ship, so the extension never loads.  Since
  0.17, ``torchvision/_meta_registrations.py`` registers a fake kernel for
  ``torchvision::nms`` (0.28+: also ``qnms``) without checking that the op exists, and on torch
  2.13 that raises ``RuntimeError: operator torchvision::nms does not exist``: ``import
  torchvision`` fails (and with it timm, GPT-2 and pytorch-forecasting).  torchvision 0.16.2
  guards every registration with ``extension._has_ops()``: its pure-python parts (transforms,
  ``ops.misc``) import, with a UserWarning that the image extension did not load; timm needs
  nothing else.
- ``torchaudio`` (imported by speechbrain at package import and by ``speechbrain.nnet.CNN``, and
  whenever it is installed by ``transformers.audio_utils``, hence GPT-2):
  no release matches torch 2.13, and the PyPI wheels are CUDA builds, so
  ``torchaudio/lib/_torchaudio.so`` fails to load (``libc10_cuda.so``) and torchaudio's own
  loader re-raises.  The set-up line removes those CUDA-only libraries after installing
  torchaudio 2.11.1; torchaudio then imports as a build without its extension
  (``_IS_TORCHAUDIO_EXT_AVAILABLE = False``), and speechbrain uses only its pure-python
  ``functional``.
"""

from __future__ import annotations

import importlib
import traceback
import warnings
from typing import Any

import pytest
import torch
from torch import nn

Example = tuple[nn.Module, tuple, dict[str, Any]]


#: context added to a skip reason when the failed import's traceback names the package
_HINTS = {
    "torchvision": ("torchvision is imported by timm at package import, and by "
                    "transformers.modeling_utils and torchmetrics whenever it is installed; the "
                    "PyPI torchvision wheels are CUDA builds that fail at import on the CPU torch "
                    "since 0.17: torchvision==0.16.2 is the one that imports"),
    "torchaudio": ("torchaudio is imported by speechbrain at package import and in "
                   "speechbrain.nnet.CNN, and by transformers.audio_utils whenever it is "
                   "installed; the PyPI torchaudio wheels are CUDA builds whose lib/*.so cannot "
                   "load on the CPU torch: the README's set-up line removes them"),
}


def _import(name: str):
    """Import ``name`` or skip, saying exactly which import failed and how."""
    try:
        with warnings.catch_warnings():
            # torchvision 0.16.2 warns that its (CUDA-built) image extension does not load
            warnings.filterwarnings("ignore", message="Failed to load image Python extension")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            return importlib.import_module(name)
    except Exception as e:  # ImportError, but also OSError/RuntimeError from native extensions
        trace = traceback.format_exc()
        hints = [h for pkg, h in _HINTS.items() if f"{pkg}/" in trace or f"'{pkg}'" in trace]
        why = f" ({'; '.join(hints)})" if hints else ""
        pytest.skip(f"cannot import {name}: {type(e).__name__}: {e}{why}")


def _seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# transformers


GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def gpt2_config(**overrides):
    config = _import("transformers.models.gpt2.configuration_gpt2")
    kw = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
              bos_token_id=0, eos_token_id=0, pad_token_id=0)
    kw.update(overrides)
    return config.GPT2Config(**kw)


def gpt2_lm(batch: int = 2, seq: int = 16, **config) -> Example:
    """``GPT2LMHeadModel`` (2 layers, width 32, the default dropouts and SDPA attention) on
    ``input_ids (batch, seq)`` with an ``attention_mask`` (row 1 left-padded) and
    ``use_cache=False`` in the example kwargs: with the default ``use_cache=True`` the output
    holds a ``DynamicCache``, which torch.export rejects as an output type unless
    ``transformers.integrations.executorch.register_dynamic_cache_export_support()`` made it a
    pytree node.  8 ``Conv1D`` layers: ``transformer.h.{0,1}.attn.c_attn``, ``.attn.c_proj``,
    ``.mlp.c_fc``, ``.mlp.c_proj`` (``addmm`` on a ``view(-1, F)`` of the hidden states)."""
    modeling = _import("transformers.models.gpt2.modeling_gpt2")
    _seeded()
    model = modeling.GPT2LMHeadModel(gpt2_config(**config))
    model.train()
    input_ids = torch.randint(1, 100, (batch, seq))
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[1, :3] = 0  # a left-padded row
    return model, (input_ids,), {"attention_mask": attention_mask, "use_cache": False}


def gpt2_conv1d_paths(n_layer: int = 2) -> set[str]:
    return {f"transformer.h.{i}.{m}" for i in range(n_layer) for m in GPT2_CONV1D}


# ---------------------------------------------------------------------------------------------
# timm

TIMM_MODELS = ("resnet50", "mobilenetv3_small_100", "efficientnet_b0", "convnext_atto")


def timm_model(name: str, batch: int = 2, size: int = 64) -> Example:
    """A timm model with random weights (``pretrained=False``), 10 classes, on ``size`` x ``size``
    images (64: every network here still has a 2x2 map before its global pool)."""
    timm = _import("timm")
    _seeded()
    model = timm.create_model(name, pretrained=False, num_classes=10)
    model.train()
    return model, (torch.randn(batch, 3, size, size),), {}


def resnet50() -> Example:
    return timm_model("resnet50")


def mobilenetv3_small_100() -> Example:
    return timm_model("mobilenetv3_small_100")


def efficientnet_b0() -> Example:
    return timm_model("efficientnet_b0")


def convnext_atto() -> Example:
    return timm_model("convnext_atto")


# ---------------------------------------------------------------------------------------------
# speechbrain

def ecapa_tdnn(batch: int = 2, time: int = 50, feats: int = 40) -> Example:
    """``ECAPA_TDNN`` with small channels on ``(batch, time, feats)`` filterbank features; the
    ``lengths`` argument is left at its default (``None``: every row full length).  Under
    torch.export the batch size specializes (``speechbrain.dataio.dataio.length_to_mask`` calls
    ``len(length)``); time stays symbolic."""
    ecapa = _import("speechbrain.lobes.models.ECAPA_TDNN")
    _seeded()
    model = ecapa.ECAPA_TDNN(feats, lin_neurons=12, channels=[16, 16, 16, 16, 48],
                             attention_channels=8, res2net_scale=2, se_channels=8)
    model.train()
    return model, (torch.randn(batch, time, feats),), {}


def speechbrain_linear(batch: int = 2, time: int = 10) -> Example:
    """``speechbrain.nnet.linear.Linear(combine_dims=True)`` on ``(batch, time, 3, 4)``: it
    reshapes to ``(batch, time, 12)`` and applies ``nn.Linear(12, 8)`` (attribute ``w``)."""
    linear = _import("speechbrain.nnet.linear")
    _seeded()
    model = linear.Linear(8, input_shape=(batch, time, 3, 4), combine_dims=True)
    model.train()
    return model, (torch.randn(batch, time, 3, 4),), {}


# ---------------------------------------------------------------------------------------------
# pytorch-forecasting

_PF = "pytorch_forecasting.models.temporal_fusion_transformer.sub_modules"


def pf_time_distributed(batch_first: bool = True, batch: int = 3, time: int = 10) -> Example:
    """``TimeDistributed(nn.Linear(6, 8))``: ``view(-1, F)`` -> Linear -> ``view(B, -1, O)``
    (``batch_first=True``) or ``view(-1, x.size(1), O)`` (time-major, input ``(T, B, F)``)."""
    sub = _import(_PF)
    _seeded()
    model = sub.TimeDistributed(nn.Linear(6, 8), batch_first=batch_first)
    model.train()
    shape = (batch, time, 6) if batch_first else (time, batch, 6)
    return model, (torch.randn(*shape),), {}


def pf_grn(context: bool = True, batch: int = 3, time: int = 10) -> Example:
    """``GatedResidualNetwork(6, 8, 5, context_size=4)`` on ``(batch, time, 6)`` with a
    ``(batch, time, 4)`` context: ``fc1``, ``context`` (no bias), ``fc2``, the GLU's ``fc`` are
    ``nn.Linear`` on 3-D input; input 6 != output 5, so the residual is resampled by
    ``TimeDistributedInterpolation`` (``F.interpolate`` on the folded rows) and ``LayerNorm``."""
    sub = _import(_PF)
    _seeded()
    model = sub.GatedResidualNetwork(6, 8, 5, dropout=0.1, context_size=4 if context else None)
    model.train()
    args = (torch.randn(batch, time, 6),)
    return model, args, ({"context": torch.randn(batch, time, 4)} if context else {})


def pf_variable_selection(batch: int = 3, time: int = 10) -> Example:
    """``VariableSelectionNetwork`` over three real variables (prescaled by ``Linear(1, 4)``)
    and one embedded one, with a context; takes a dict of ``(batch, time, ·)`` tensors."""
    sub = _import(_PF)
    _seeded()
    model = sub.VariableSelectionNetwork(
        input_sizes={"a": 4, "b": 4, "c": 4, "emb": 3}, hidden_size=8,
        input_embedding_flags={"emb": True}, dropout=0.1, context_size=8)
    model.train()
    x = {"a": torch.randn(batch, time, 1), "b": torch.randn(batch, time, 1),
         "c": torch.randn(batch, time, 1), "emb": torch.randn(batch, time, 3)}
    return model, (x,), {"context": torch.randn(batch, time, 8)}


def pf_tft_inputs(batch: int = 2, encoder: int = 6, decoder: int = 3) -> dict[str, torch.Tensor]:
    """The dict batch a ``TimeSeriesDataSet`` dataloader yields for the TFT below (categoricals
    ``group`` (static, 3 levels) and ``weekday`` (7), reals ``scale`` (static), ``target``,
    ``price``), every series full length."""
    group = torch.randint(0, 3, (batch, 1))
    scale = torch.randn(batch, 1, 1)

    def part(t: int) -> tuple[torch.Tensor, torch.Tensor]:
        cat = torch.stack([group.expand(batch, t), torch.randint(0, 7, (batch, t))], -1)
        cont = torch.cat([scale.expand(batch, t, 1), torch.randn(batch, t, 2)], -1)
        return cat, cont

    encoder_cat, encoder_cont = part(encoder)
    decoder_cat, decoder_cont = part(decoder)
    return dict(encoder_cat=encoder_cat, encoder_cont=encoder_cont,
                decoder_cat=decoder_cat, decoder_cont=decoder_cont,
                encoder_lengths=torch.full((batch,), encoder), decoder_lengths=torch.full((batch,), decoder),
                target_scale=torch.tensor([[0.0, 1.0]]).repeat(batch, 1))


def pf_tft(batch: int = 2, encoder: int = 6, decoder: int = 3) -> Example:
    """``TemporalFusionTransformer`` built directly (no ``TimeSeriesDataSet``: the variable
    names, embedding sizes and an identity ``TorchNormalizer`` are what ``from_dataset`` would
    pass), hidden size 8, 2 heads, 3 quantiles.  ``forward(x: dict)`` returns a namedtuple
    (``prediction``, ``encoder_attention``, ...).

    Not exportable whole: ``forward`` does ``max_encoder_length = int(encoder_lengths.max())``
    (data-dependent: ``GuardOnDataDependentSymNode`` at ``_tft.py:543``), and its LSTMs pack
    the sequences by ``lengths``."""
    pf = _import("pytorch_forecasting")
    encoders = _import("pytorch_forecasting.data.encoders")
    metrics = _import("pytorch_forecasting.metrics")
    _seeded()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lightning's save_hyperparameters on module arguments
        model = pf.TemporalFusionTransformer(
            hidden_size=8, lstm_layers=1, dropout=0.1, output_size=3,
            loss=metrics.QuantileLoss([0.1, 0.5, 0.9]), attention_head_size=2,
            max_encoder_length=encoder,
            static_categoricals=["group"], static_reals=["scale"],
            time_varying_categoricals_encoder=["weekday"], time_varying_categoricals_decoder=["weekday"],
            time_varying_reals_encoder=["target", "price"], time_varying_reals_decoder=["price"],
            x_reals=["scale", "target", "price"], x_categoricals=["group", "weekday"],
            hidden_continuous_size=4, embedding_sizes={"group": (3, 4), "weekday": (7, 3)},
            output_transformer=encoders.TorchNormalizer(method="identity"),
            logging_metrics=nn.ModuleList([]))
    model.train()
    return model, (pf_tft_inputs(batch, encoder, decoder),), {}


# ---------------------------------------------------------------------------------------------
# asteroid


def conv_tasnet(batch: int = 2, samples: int = 800, norm_type: str = "gLN") -> Example:
    """``ConvTasNet`` (2 sources, free filterbank of 16 filters, 2 repeats of 2 blocks, bottleneck
    8, hidden 16) on ``(batch, samples)`` audio.  Pointwise ``nn.Conv1d``: the bottleneck, each
    block's ``in_conv``, ``res_conv`` and ``skip_conv``, and the mask conv; the depthwise
    ``groups=hid`` kernel-3 convs are real convolutions.

    The default global layer norm (``norm_type="gLN"``) computes its reduction axes as
    ``torch.arange(1, len(x.shape)).tolist()`` (written for TorchScript): under non-strict
    torch.export that ``tolist()`` of a fake tensor is data-dependent and export fails
    (``GuardOnDataDependentSymNode`` in ``asteroid/masknn/norms.py``, ``z_norm``).  The channel
    layer norm ``"cLN"`` exports whole."""
    asteroid = _import("asteroid.models")
    _seeded()
    model = asteroid.ConvTasNet(n_src=2, n_blocks=2, n_repeats=2, bn_chan=8, hid_chan=16,
                                skip_chan=8, n_filters=16, kernel_size=16, stride=8,
                                norm_type=norm_type)
    model.train()
    return model, (torch.randn(batch, samples),), {}


FACTORIES = {
    "gpt2_lm": gpt2_lm,
    "resnet50": resnet50,
    "mobilenetv3_small_100": mobilenetv3_small_100,
    "efficientnet_b0": efficientnet_b0,
    "convnext_atto": convnext_atto,
    "ecapa_tdnn": ecapa_tdnn,
    "speechbrain_linear": speechbrain_linear,
    "pf_time_distributed": pf_time_distributed,
    "pf_grn": pf_grn,
    "pf_variable_selection": pf_variable_selection,
    "pf_tft": pf_tft,
    "conv_tasnet": conv_tasnet,
}


# ---------------------------------------------------------------------------------------------
# what each model holds, counted from its modules (independently of tdd_fx)


def _is_pointwise(conv: nn.Module) -> bool:
    padding = conv.padding
    if isinstance(padding, str):  # 'valid', or 'same' (zero padding for kernel 1)
        padding = (0,) * len(conv.kernel_size)
    return (all(k == 1 for k in conv.kernel_size) and all(s == 1 for s in conv.stride)
            and all(p == 0 for p in padding) and conv.groups == 1)


def pointwise_convs(model: nn.Module) -> set[str]:
    """Paths of the ``nn.Conv1d/2d/3d`` (exact classes) with kernel all 1s, stride 1, no
    padding and ``groups=1``."""
    return {name for name, m in model.named_modules()
            if type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and _is_pointwise(m)}


def convs(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))}


def linears(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
