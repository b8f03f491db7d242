"""Where each architecture keeps its MLP neurons, and how to shrink them: one registry entry per ``model_type``.

Neurons of layer ``l`` are the output features of the *row* projections (gate/up, ``fc1``, ``c_fc``) and the
input features of the *column* projections (down, ``fc2``, ``c_proj``). Adding an architecture = one entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minigpt.errors import MiniGPTError

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

    @property
    def gated(self) -> bool:
        return len(self.rows) == 2


GATED = MLPLayout("model.layers", "mlp", ("gate_proj", "up_proj"), ("down_proj",), "act_fn", "intermediate_size")
ADAPTERS: dict[str, MLPLayout] = {
    "llama": GATED,
    "nemotron-nas": GATED,  # Llama with per-layer shapes, as saved by minigpt.formats
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


def get_layout(model_or_config) -> MLPLayout:
    """The layout of a model (or config); one-line error listing what is supported otherwise."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise MiniGPTError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type]


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
    return w.shape[out_dim if neuron_side == "rows" else 1 - out_dim]


def widths(model) -> list[int]:
    """MLP width (neuron count) of every layer."""
    layout = get_layout(model)
    return [_features(getattr(m, layout.rows[0]), layout, "rows") for m in mlps(model)]


def neuron_dim(layout: MLPLayout, side: str) -> int:
    """The weight dimension indexed by neurons for a row or column projection."""
    out_dim = 1 if layout.conv1d else 0
    return out_dim if side == "rows" else 1 - out_dim


def shrink_mlps(model, kept: list[torch.Tensor], gather) -> None:
    """Keep only neurons ``kept[l]`` (sorted int64 indices) of each layer's MLP, in place.

    ``gather(srcs, indices, dims) -> list`` copies every weight and bias of the model in one call.
    """
    layout = get_layout(model)
    owners = mlps(model)
    if len(kept) != len(owners):
        raise MiniGPTError(f"plan has {len(kept)} layers, model has {len(owners)}")
    params, srcs, idx, dims = [], [], [], []
    for owner, keep in zip(owners, kept):
        for side, names in (("rows", layout.rows), ("cols", layout.cols)):
            for name in names:
                proj = getattr(owner, name)
                params.append((proj, "weight"))
                srcs.append(proj.weight.detach())
                idx.append(keep)
                dims.append(neuron_dim(layout, side))
                if side == "rows" and proj.bias is not None:  # a column projection's bias is per output: unchanged
                    params.append((proj, "bias"))
                    srcs.append(proj.bias.detach().unsqueeze(1))
                    idx.append(keep)
                    dims.append(0)
    new = gather(srcs, idx, dims)  # minigpt.ops.gather checks each layer's indices once and moves them once
    for (proj, attr), tensor in zip(params, new):
        if attr == "bias":
            tensor = tensor.squeeze(1)
        setattr(proj, attr, nn.Parameter(tensor, requires_grad=getattr(proj, attr).requires_grad))
    for owner, keep in zip(owners, kept):
        for side, names in (("rows", layout.rows), ("cols", layout.cols)):
            for name in names:
                _set_features(getattr(owner, name), layout, side, len(keep))
    set_widths(model.config, layout, [len(k) for k in kept])


def _set_features(proj: nn.Module, layout: MLPLayout, side: str, n: int) -> None:
    if layout.conv1d:
        if side == "rows":
            proj.nf = n
        return
    if side == "rows":
        proj.out_features = n
    else:
        proj.in_features = n


def set_widths(config, layout: MLPLayout, new_widths: list[int]) -> None:
    """Record MLP widths in the config: the stock key when uniform, plus ``minigpt_mlp_widths`` when not."""
    uniform = len(set(new_widths)) == 1
    setattr(config, layout.width_key, max(new_widths))
    if uniform:
        if hasattr(config, "minigpt_mlp_widths"):
            delattr(config, "minigpt_mlp_widths")
    else:
        config.minigpt_mlp_widths = list(new_widths)
