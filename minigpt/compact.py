"""Apply a ``PruningPlan``: gather kept weights into new dense tensors, update the config, save loadable dirs."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from minigpt import adapters, formats, ops
from minigpt.errors import MiniGPTError
from minigpt.io import atomic_dir, save_model
from minigpt.planning import PruningPlan
from minigpt.stats import check_fingerprint, fingerprint
from minigpt.trust import REMOTE_CODE, remote_code_text


def compact(model, plan: PruningPlan, backend: str = "auto"):
    """Shrink ``model``'s MLPs (in place) to the neurons ``plan`` keeps; returns the model.

    Refuses a plan made for another model. One gather call copies every kept row/column of every layer.
    """
    check_fingerprint(
        {k: v for k, v in plan.fingerprint.items() if k != "tokenizer_hash"}, fingerprint(model), "the plan"
    )
    if plan.widths != adapters.widths(model):
        raise MiniGPTError(f"plan is for MLP widths {plan.widths[:3]}..., model has {adapters.widths(model)[:3]}...")
    device = model.get_input_embeddings().weight.device
    resolved = ops.resolve_backend(backend, device)
    adapters.shrink_mlps(model, plan.kept_tensors(), lambda s, i, d: ops.gather(s, i, d, backend=resolved))
    return model


def save_pruned(model, tokenizer, out: str | os.PathLike, plan: PruningPlan | None = None,
                source: str | os.PathLike | None = None, report: dict | None = None, write_weights=None,
                overwrite: bool = False) -> Path:
    """Write a pruned model atomically to the new directory ``out`` (never over ``source``; over an existing
    ``out`` only with ``overwrite``, replaced as a whole once the new one is complete).

    Uniform widths load with stock ``from_pretrained``. Per-layer widths add ``modeling_minigpt.py`` and an
    ``auto_map`` so ``from_pretrained(out, trust_remote_code=True)`` (and ``minigpt.load_model``) rebuild them; the
    Llama family is saved in the Nemotron-NAS format that vLLM also runs (``minigpt.formats``).
    ``write_weights(dir)`` writes the weights instead of ``save_pretrained`` (out-of-core compaction of a
    meta-device ``model``, see ``minigpt.sharded``); config, generation config and tokenizer are saved as usual.
    """
    out = Path(out).resolve()
    if source is not None and Path(source).resolve() in (out, *out.parents):
        raise MiniGPTError(f"output {out} would overwrite the source model {source}")
    config = model.config
    nonuniform = hasattr(config, "minigpt_mlp_widths")
    decilm = formats.uses_decilm(model) and (nonuniform or config.model_type == "nemotron-nas")
    if nonuniform and not decilm:
        layout = dataclasses.asdict(adapters.get_layout(model))
        config.minigpt_layout = {k: layout[k] for k in ("blocks", "mlp", "rows", "cols", "conv1d")}
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

