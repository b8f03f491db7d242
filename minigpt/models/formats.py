"""Saved formats for per-layer shapes that stock configs cannot express.

* Llama family → NVIDIA's Nemotron-NAS format (``DeciLMForCausalLM``, ``model_type: nemotron-nas``): vLLM runs it
  natively; ``transformers`` runs it through minigpt's own ``modeling_minigpt.py`` (``DeciLMConfig``,
  ``DeciLMForCausalLM``). ``block_configs[l]`` holds layer ``l``'s MLP width (``ffn.intermediate_size``) and
  key/value head count (``attention.n_heads_in_group`` = query heads per KV head), or ``no_op`` for a removed
  sublayer. The weights keep Llama's names.
* Other shapes → their own config plus ``minigpt_shapes``/``minigpt_attrs`` (every parameter shape and head-count
  attribute the stock class would not build), loaded by ``modeling_minigpt.MiniGPTForCausalLM``.
  Their ``architectures`` names that class, not the stock one: a client that ignores ``auto_map`` (vLLM, llama.cpp's
  converter) then stops with "architecture MiniGPTForCausalLM not supported" instead of misreading the shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

from minigpt.models import adapters

DECILM_FAMILY = ("llama", "nemotron-nas")
DECILM_AUTO_MAP = {"AutoConfig": "modeling_minigpt.DeciLMConfig",
                   "AutoModelForCausalLM": "modeling_minigpt.DeciLMForCausalLM"}
MINIGPT_ARCHITECTURE = "MiniGPTForCausalLM"
_MINIGPT_KEYS = ("minigpt_shapes", "minigpt_attrs", "auto_map", "architectures", "model_type", "block_configs")


def block_configs(mlp_widths: list[int | None], kv_heads: list[int | None], num_heads: int) -> list[dict]:
    """Nemotron-NAS ``block_configs`` from per-layer lists: MLP width and KV head count of each layer (None: the
    sublayer is removed, ``no_op``)."""
    if len(mlp_widths) != len(kv_heads):
        raise ValueError(f"{len(mlp_widths)} MLP widths for {len(kv_heads)} attention layers")
    for kv in kv_heads:
        if kv is not None and (kv < 1 or num_heads % kv):
            raise ValueError(f"{kv} key/value heads do not divide {num_heads} query heads")
    return [{"attention": {"no_op": True} if kv is None else {"no_op": False, "n_heads_in_group": num_heads // kv},
             "ffn": {"no_op": True} if w is None else {"no_op": False, "intermediate_size": w}}
            for w, kv in zip(mlp_widths, kv_heads)]


def kv_heads(model) -> list[int]:
    """Key/value heads of every layer, read from the ``k_proj`` shapes of a Llama-family model."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return [block.self_attn.k_proj.weight.shape[0] // head_dim for block in adapters.blocks(model)]


def uses_decilm(model) -> bool:
    """Whether per-layer shapes of this model are saved in the Nemotron-NAS format."""
    return model.config.model_type in DECILM_FAMILY


def decilm_expresses(shapes: dict, attrs: dict) -> bool:
    """Whether the differences from the stock model (``compact.stock_differences``) are per-layer MLP widths only,
    which ``block_configs`` expresses."""
    return not attrs and all(".mlp." in name for name in shapes)


def decilm_config(model) -> dict:
    """The ``config.json`` of ``model`` (a Llama with per-layer shapes) in the Nemotron-NAS format."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in _MINIGPT_KEYS}
    widths = adapters.widths(model)
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:  # transformers < 5 (e.g. an older vLLM's) reads rope_theta at the top level
        config.setdefault("rope_theta", rope["rope_theta"])
    return {**config, "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas", "auto_map": DECILM_AUTO_MAP,
            "intermediate_size": max(widths),
            "block_configs": block_configs(widths, kv_heads(model), model.config.num_attention_heads)}


def write_decilm_config(model, out: Path) -> None:
    """Replace ``out/config.json`` by the Nemotron-NAS config of ``model``."""
    (out / "config.json").write_text(json.dumps(decilm_config(model), indent=2, sort_keys=True) + "\n")


def name_minigpt_architecture(out: Path) -> None:
    """Make ``out/config.json`` name minigpt's loader, not the stock class whose shapes it no longer has."""
    path = out / "config.json"
    config = json.loads(path.read_text())
    config["architectures"] = [MINIGPT_ARCHITECTURE]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
