"""Apply a ``PruningPlan``: gather kept weights into new dense tensors, update the config, save loadable dirs."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from minigpt import ops
from minigpt.errors import MiniGPTError
from minigpt.io import atomic_dir, save_model
from minigpt.models import adapters, formats, surgery
from minigpt.models.trust import REMOTE_CODE, remote_code_text
from minigpt.pipeline.planning import PruningPlan
from minigpt.pipeline.stats import check_fingerprint, fingerprint


def compact(model, plan: PruningPlan, backend: str = "auto"):
    """Shrink ``model`` (in place) to what ``plan`` keeps of every structure; returns the model.

    Refuses a plan made for another model. One gather call copies every kept slice of every tensor.
    """
    check_fingerprint(
        {k: v for k, v in plan.fingerprint.items() if k != "tokenizer_hash"}, fingerprint(model), "the plan"
    )
    if plan.widths != adapters.widths(model):
        raise MiniGPTError(f"plan is for MLP widths {plan.widths[:3]}..., model has {adapters.widths(model)[:3]}...")
    device = model.get_input_embeddings().weight.device
    resolved = ops.resolve_backend(backend, device)
    surgery.shrink(model, plan.structures(), lambda s, i, d: ops.gather(s, i, d, backend=resolved))
    return model


TRACKED_ATTRS = ("num_heads", "num_key_value_heads", "num_key_value_groups", "head_dim", "scaling", "split_size",
                 "embed_dim", "num_experts", "intermediate_dim")  # the last two: MoE routers and fused experts


def stock_differences(model) -> tuple[dict, dict]:
    """``(shapes, attrs)``: parameters and head-count attributes of ``model`` that its stock class built from its
    config would not have (built on the meta device); both empty when stock ``from_pretrained`` reloads it."""
    config = copy.deepcopy(model.config)
    for key in ("minigpt_shapes", "minigpt_attrs", "auto_map"):
        config.__dict__.pop(key, None)
    base = next(c for c in type(model).__mro__ if c.__name__ != "MiniGPTForCausalLM")
    with torch.device("meta"):
        stock = base(config)
    stock_params = dict(stock.named_parameters())
    shapes = {n: list(p.shape) for n, p in model.named_parameters()
              if n not in stock_params or stock_params[n].shape != p.shape}
    stock_modules = dict(stock.named_modules())
    attrs = {}
    for name, module in model.named_modules():
        other = stock_modules.get(name)
        changed = {a: getattr(module, a) for a in TRACKED_ATTRS
                   if other is not None and hasattr(module, a) and getattr(module, a) != getattr(other, a, None)}
        if changed:
            attrs[name] = changed
    return shapes, attrs


def save_pruned(model, tokenizer, out: str | os.PathLike, plan: PruningPlan | None = None,
                source: str | os.PathLike | None = None, report: dict | None = None, write_weights=None,
                overwrite: bool = False) -> Path:
    """Write a pruned model atomically to the new directory ``out`` (never over ``source``; over an existing
    ``out`` only with ``overwrite``, replaced as a whole once the new one is complete).

    Shapes the stock config expresses load with stock ``from_pretrained``. Llama-family models whose only per-layer
    differences are MLP widths are saved in the Nemotron-NAS format that vLLM also runs (``minigpt.models.formats``). Other
    shapes (per-layer widths or head counts, GPT-2 / OPT heads) add ``modeling_minigpt.py`` and an ``auto_map`` so
    ``from_pretrained(out, trust_remote_code=True)`` (and ``minigpt.load_model``) rebuild them.
    ``write_weights(dir)`` writes the weights instead of ``save_pretrained`` (out-of-core compaction of a
    meta-device ``model``, see ``minigpt.pipeline.sharded``); config, generation config and tokenizer are saved as usual.
    """
    out = Path(out).resolve()
    if source is not None and Path(source).resolve() in (out, *out.parents):
        raise MiniGPTError(f"output {out} would overwrite the source model {source}")
    config = model.config
    shapes, attrs = stock_differences(model)
    nonuniform = bool(shapes or attrs)
    for key in ("minigpt_shapes", "minigpt_attrs", "auto_map"):
        config.__dict__.pop(key, None)
    decilm = formats.uses_decilm(model) and (config.model_type == "nemotron-nas"
                                             or (nonuniform and formats.decilm_expresses(shapes, attrs)))
    if nonuniform and not decilm:
        config.minigpt_shapes, config.minigpt_attrs = shapes, attrs
        config.auto_map = {"AutoModelForCausalLM": "modeling_minigpt.MiniGPTForCausalLM"}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if write_weights is None:
            save_model(model, tokenizer, tmp)
        else:
            write_weights(tmp)
            model.config.save_pretrained(tmp)
            if model.generation_config is not None:
                model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        if decilm:
            formats.write_decilm_config(model, tmp)
            (tmp / REMOTE_CODE.name).write_bytes(REMOTE_CODE.read_bytes())
        elif nonuniform:
            formats.name_minigpt_architecture(tmp)
            base = next(c.__name__ for c in type(model).__mro__ if c.__name__ != "MiniGPTForCausalLM")  # reloaded
            (tmp / REMOTE_CODE.name).write_text(remote_code_text(base))
        if plan is not None:
            (tmp / "minigpt_plan.json").write_text(plan.to_json())
        if report is not None:
            (tmp / "minigpt_report.json").write_text(json.dumps(report, indent=1))
    return out

