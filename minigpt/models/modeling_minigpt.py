"""Loader for pruned shapes a stock config cannot express (per-layer widths or head counts, GPT-2 / OPT heads).

Self-contained (imports only ``torch`` and ``transformers``): ``save_pruned`` copies this file into the output
directory with ``BASE_CLASS`` set to the original class, and ``config.auto_map`` points ``AutoModelForCausalLM``
at ``MiniGPTForCausalLM``. The class builds the stock model, then gives every parameter named in
``config.minigpt_shapes`` its saved shape and every module in ``config.minigpt_attrs`` its saved attributes
(head counts) before the weights load.

The same file also defines ``DeciLMConfig``/``DeciLMForCausalLM`` (NVIDIA's Nemotron-NAS format, which vLLM runs
natively): Llama-family models whose only per-layer differences are MLP widths, key/value head counts or removed
sublayers are saved that way, with ``config.auto_map`` pointing at those classes.
"""

import torch
import transformers
from torch import nn

BASE_CLASS = "LlamaForCausalLM"


def sync_shapes(model: nn.Module) -> None:
    """Make module attributes describing shapes (``in_features``, ``nf``, ``normalized_shape``...) match weights."""
    for module in model.modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = w.shape
        elif isinstance(module, nn.Embedding):
            module.num_embeddings, module.embedding_dim = w.shape
        elif isinstance(module, nn.LayerNorm):
            module.normalized_shape = tuple(w.shape)
        elif type(module).__name__ == "Conv1D":
            module.nx, module.nf = w.shape


def reshape(model: nn.Module, shapes: dict, attrs: dict) -> None:
    """Give parameters their saved shapes (uninitialised) and modules their saved attributes."""
    for name, shape in shapes.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        old = getattr(owner, attr)
        new = torch.empty(shape, dtype=old.dtype, device=old.device)
        setattr(owner, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    for path, values in attrs.items():
        module = model.get_submodule(path)
        for attr, value in values.items():
            setattr(module, attr, value)
    sync_shapes(model)


class MiniGPTForCausalLM(getattr(transformers, BASE_CLASS)):
    """The original architecture with the saved per-layer shapes."""

    def __init__(self, config):
        super().__init__(config)
        reshape(self, config.minigpt_shapes, config.minigpt_attrs)
        self.post_init()


def resize_mlps(model: nn.Module, layout: dict, widths: list) -> None:
    """Replace each layer's row / column projections with ones of width ``widths[l]`` (uninitialised)."""
    blocks = model.get_submodule(layout["blocks"])
    for block, width in zip(blocks, widths):
        mlp = block.get_submodule(layout["mlp"]) if layout["mlp"] else block
        for side in ("rows", "cols"):
            for name in layout[side]:
                old = getattr(mlp, name)
                w = old.weight
                if layout["conv1d"]:
                    nx, nf = (w.shape[0], width) if side == "rows" else (width, w.shape[1])
                    new = type(old)(nf, nx)
                else:
                    fan_in, fan_out = (w.shape[1], width) if side == "rows" else (width, w.shape[0])
                    new = nn.Linear(fan_in, fan_out, bias=old.bias is not None)
                setattr(mlp, name, new.to(device=w.device, dtype=w.dtype))


class BlockPart(dict):
    """One sublayer's entry of ``block_configs`` (``{"no_op": False, "intermediate_size": 1248}``), readable as
    attributes like NVIDIA's DeciLM config objects (vLLM reads ``block_config.ffn.intermediate_size``) and saved as
    plain JSON. A missing key raises ``AttributeError`` so ``hasattr`` answers as vLLM expects."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def block_parts(block: dict) -> BlockPart:
    return BlockPart({k: BlockPart(v) if isinstance(v, dict) else v for k, v in block.items()})


class DeciLMConfig(transformers.LlamaConfig):
    """A Llama config with per-layer shapes in ``block_configs`` (NVIDIA's Nemotron-NAS format, ``DeciLMForCausalLM``
    in vLLM): ``block_configs[l] = {"attention": {"no_op", "n_heads_in_group"}, "ffn": {"no_op", "intermediate_size"}}``.
    """

    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        super().__init__(**kwargs)
        self.block_configs = [block_parts(b) for b in block_configs or []]


class _NoOp(nn.Module):
    """A removed sublayer: adds nothing to the residual stream (``no_op`` in ``block_configs``)."""

    def __init__(self, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states, *args, **kwargs):
        zero = hidden_states.new_zeros(())
        return (zero, None) if self.returns_tuple else zero


def _resize_kv_heads(attn: nn.Module, kv_heads: int, num_heads: int) -> None:
    """Give one attention layer ``kv_heads`` key/value heads (uninitialised k/v projections)."""
    for name in ("k_proj", "v_proj"):
        old = getattr(attn, name)
        new = nn.Linear(old.in_features, kv_heads * attn.head_dim, bias=old.bias is not None)
        setattr(attn, name, new.to(device=old.weight.device, dtype=old.weight.dtype))
    attn.num_key_value_groups = num_heads // kv_heads


class DeciLMForCausalLM(transformers.LlamaForCausalLM):
    """Llama with the per-layer MLP widths, key/value head counts and removed sublayers of ``block_configs``."""

    config_class = DeciLMConfig

    def __init__(self, config):
        super().__init__(config)
        layout = {"blocks": "model.layers", "mlp": "mlp", "rows": ["gate_proj", "up_proj"], "cols": ["down_proj"],
                  "conv1d": False}
        blocks = self.model.layers
        resize_mlps(self, layout, [b.ffn.get("intermediate_size", config.intermediate_size)
                                   for b in config.block_configs])
        for block, spec in zip(blocks, config.block_configs):
            if spec.attention.no_op:
                block.self_attn, block.input_layernorm = _NoOp(returns_tuple=True), nn.Identity()
            elif spec.attention.n_heads_in_group != config.num_attention_heads // config.num_key_value_heads:
                heads = config.num_attention_heads
                _resize_kv_heads(block.self_attn, heads // spec.attention.n_heads_in_group, heads)
            if spec.ffn.no_op:
                block.mlp, block.post_attention_layernorm = _NoOp(returns_tuple=False), nn.Identity()
        self.post_init()
