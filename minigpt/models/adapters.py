"""Where each architecture keeps its MLP neurons: the calibration taps' and the MLP metrics' view of a model.

Neurons of layer ``l`` are the output features of the *row* projections (gate/up, ``fc1``, ``c_fc``) and the
input features of the *column* projections (down, ``fc2``, ``c_proj``). Architectures without an entry get their
layout from their tensor-parallel plan; every structure's slices (heads, hidden, layers too) are described in
``minigpt.models.architecture`` and cut by ``minigpt.models.surgery``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from minigpt.errors import MiniGPTError
from minigpt.models import architecture

# HF activation names → the fused kernels' names (anything else falls back to the model's own function).
ACTIVATION_NAMES = {
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}


@dataclass(frozen=True)
class MLPLayout:
    """Module paths (dotted, relative) of one architecture's MLP.

    blocks: model → the ``ModuleList`` of decoder blocks.   mlp: block → the module owning the projections.
    rows / cols: projections whose outputs / inputs are the neurons.   act: attribute of ``mlp`` holding the activation.
    """

    blocks: str
    mlp: str
    rows: tuple[str, ...]
    cols: tuple[str, ...]
    act: str
    width_key: str
    act_keys: tuple[str, ...] = ("hidden_act",)
    conv1d: bool = False  # GPT-2 Conv1D stores weight as (in, out)
    packed: bool = False  # one fused gate_up projection: gate rows then up rows (phi3, glm)

    @property
    def gated(self) -> bool:
        return len(self.rows) == 2 or self.packed


GATED = MLPLayout("model.layers", "mlp", ("gate_proj", "up_proj"), ("down_proj",), "act_fn", "intermediate_size")
ADAPTERS: dict[str, MLPLayout] = {
    "llama": GATED,
    "nemotron-nas": GATED,  # Llama with per-layer shapes, as saved by minigpt.models.formats
    "mistral": GATED,
    "qwen2": GATED,
    "qwen3": GATED,
    "gemma": MLPLayout(
        "model.layers", "mlp", ("gate_proj", "up_proj"), ("down_proj",), "act_fn", "intermediate_size",
        act_keys=("hidden_activation", "hidden_act"),
    ),
    "opt": MLPLayout("model.decoder.layers", "", ("fc1",), ("fc2",), "activation_fn", "ffn_dim", ("activation_function",)),
    "gpt2": MLPLayout(
        "transformer.h", "mlp", ("c_fc",), ("c_proj",), "act", "n_inner", ("activation_function",), conv1d=True
    ),
    "phi": MLPLayout("model.layers", "mlp", ("fc1",), ("fc2",), "activation_fn", "intermediate_size"),
}


ACT_ATTRS = ("act_fn", "activation_fn", "act")


def derived_layout(model_or_config) -> MLPLayout:
    """The MLP layout of an architecture without an entry, from its tensor-parallel plan (``minigpt.models.architecture``)."""
    config = getattr(model_or_config, "config", model_or_config)
    plan = architecture.projection_plan(config)
    attention = {p.rpartition(".")[0] for p in plan if p.rpartition(".")[2] in architecture.QKV}
    mlp_plan = {p: s for p, s in plan.items() if p.rpartition(".")[0] not in attention}
    rows = tuple(p.rpartition(".")[2] for p, s in mlp_plan.items() if s == "colwise")
    cols = tuple(p.rpartition(".")[2] for p, s in mlp_plan.items() if s == "rowwise")
    parents = {p.rpartition(".")[0] for p in mlp_plan}
    if len(parents) != 1 or not rows or len(cols) != 1 or len(rows) > 2:
        raise MiniGPTError(f"cannot read the MLP of model_type {config.model_type!r} from its plan {plan}")
    blocks = "model.layers"
    act = "act_fn"
    if isinstance(model_or_config, nn.Module):
        blocks = architecture.find_blocks(model_or_config)[0]
        mlp = _sub(_sub(model_or_config, blocks)[0], next(iter(parents)))
        act = next((a for a in ACT_ATTRS if hasattr(mlp, a)), act)
    packed = rows == tuple(architecture.PACKED)
    return MLPLayout(blocks, next(iter(parents)), rows, cols, act, "intermediate_size",
                     ("hidden_act", "hidden_activation", "activation_function"), packed=packed)


def get_layout(model_or_config) -> MLPLayout:
    """The layout of a model (or config): its entry, or read from its tensor-parallel plan; one line otherwise."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    try:
        return derived_layout(model_or_config)
    except MiniGPTError as err:
        raise MiniGPTError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))} and "
                           f"configs with a tensor-parallel plan ({err})") from err


def _sub(module: nn.Module, path: str) -> nn.Module:
    return module.get_submodule(path) if path else module


def blocks(model) -> list[nn.Module]:
    return list(_sub(model, get_layout(model).blocks))


def mlps(model) -> list[nn.Module]:
    """The module owning each layer's MLP projections and activation."""
    layout = get_layout(model)
    return [_sub(b, layout.mlp) for b in blocks(model)]


def activation_name(model) -> str | None:
    """The fused-kernel name of the MLP activation, or None when only the model's own function can compute it."""
    layout = get_layout(model)
    for key in layout.act_keys:
        name = getattr(model.config, key, None)
        if name is not None:
            return ACTIVATION_NAMES.get(name)
    return None


def _features(proj: nn.Module, layout: MLPLayout, neuron_side: str) -> int:
    """Neuron count seen by ``proj``: its out-features for a row projection, in-features for a column one."""
    w = proj.weight
    out_dim = 1 if layout.conv1d else 0
    n = w.shape[out_dim if neuron_side == "rows" else 1 - out_dim]
    return n // 2 if layout.packed and neuron_side == "rows" else n


def widths(model) -> list[int]:
    """MLP width (neuron count) of every layer."""
    layout = get_layout(model)
    return [_features(getattr(m, layout.rows[0]), layout, "rows") for m in mlps(model)]


def neuron_dim(layout: MLPLayout, side: str) -> int:
    """The weight dimension indexed by neurons for a row or column projection."""
    out_dim = 1 if layout.conv1d else 0
    return out_dim if side == "rows" else 1 - out_dim
