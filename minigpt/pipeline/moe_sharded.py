"""Out-of-core expert pruning: a mixture-of-experts safetensors checkpoint rewritten shard by shard with
``minigpt.pipeline.sharded``'s reader and writer, whole experts and the neurons inside experts dropped one tensor at a time;
the model is never loaded (a meta-device skeleton gives the config and the plan's shapes).

Stored layouts, per sparse block ``layers.L.{mlp,block_sparse_moe}.``: the router ``gate.weight: (E, H)``; experts
either one tensor each, ``experts.e.{w1,w3,gate_proj,up_proj}.weight: (I, H)`` and ``experts.e.{w2,down_proj}.weight:
(H, I)`` (what transformers saves and the hub holds), or fused ``experts.gate_up_proj: (E, 2I, H)`` and
``experts.down_proj: (E, H, I)``; Qwen2-MoE's ``shared_expert.{gate,up,down}_proj.weight``. Kept experts are
renumbered 0…E'-1 in their old order, as ``moe.prune_moe`` does in memory.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from minigpt.errors import MiniGPTError
from minigpt.pipeline import moe
from minigpt.pipeline.sharded import INDEX, shards, skeleton, write_shard

_BLOCK = re.compile(r"^(?P<head>.*\.layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.)(?P<rest>.+)$")
_EXPERT = re.compile(r"^experts\.(?P<expert>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_ROWS = ("w1", "w3", "gate_proj", "up_proj")  # indexed by the expert's neurons along dim 0; w2/down_proj along dim 1

Edit = tuple[str, Callable[[torch.Tensor], torch.Tensor]]  # the new name and what to do to the stored tensor


def _rename(name: str, plan: moe.MoEPlan) -> Edit | None:
    """Where the stored tensor ``name`` goes and how it shrinks under ``plan`` (None: the tensor is dropped)."""
    found = _BLOCK.match(name)
    blocks = plan.fingerprint["moe_layers"]
    if found is None or int(found["layer"]) not in blocks:
        return name, lambda t: t
    b = blocks.index(int(found["layer"]))
    keep = torch.tensor(plan.experts[b])
    cols = torch.tensor(plan.neurons[b]) if plan.neurons else None  # (E', I') kept neurons of each kept expert
    rest, head = found["rest"], found["head"]
    expert = _EXPERT.match(rest)
    if rest == "gate.weight":
        return name, lambda t: t[keep]
    if expert is not None:
        old = int(expert["expert"])
        if old not in plan.experts[b]:
            return None
        new = plan.experts[b].index(old)
        dim = 0 if expert["proj"] in _ROWS else 1
        shrink = (lambda t: t) if cols is None else (lambda t: t.index_select(dim, cols[new]))
        return f"{head}experts.{new}.{expert['proj']}.weight", shrink
    if rest == "experts.gate_up_proj":
        if cols is None:
            return name, lambda t: t[keep]

        def gate_up(t: torch.Tensor) -> torch.Tensor:  # (E, 2I, H): gate rows j and up rows I + j
            rows = torch.cat([cols, cols + t.shape[1] // 2], 1).to(t.device)
            return t[keep].take_along_dim(rows[:, :, None], 1)

        return name, gate_up
    if rest == "experts.down_proj":
        if cols is None:
            return name, lambda t: t[keep]
        return name, lambda t: t[keep].take_along_dim(cols[:, None, :].to(t.device), 2)
    shared = re.fullmatch(r"shared_expert\.(gate_proj|up_proj|down_proj)\.weight", rest)
    if shared is not None and plan.shared:
        index = torch.tensor(plan.shared[b])
        return name, lambda t: t.index_select(1 if shared[1] == "down_proj" else 0, index)
    return name, lambda t: t


def _check_stored(stored: dict, plan: moe.MoEPlan, src: Path) -> None:
    """Every sparse block's router and every expert's weights are in the checkpoint, in one of the two layouts."""
    counts: dict[int, set[int]] = {}
    routers, fused = set(), set()
    for name in stored:
        found = _BLOCK.match(name)
        if found is None:
            continue
        layer, rest = int(found["layer"]), found["rest"]
        expert = _EXPERT.match(rest)
        if expert is not None:
            counts.setdefault(layer, set()).add(int(expert["expert"]))
        routers.update([layer] if rest == "gate.weight" else [])
        fused.update([layer] if rest == "experts.down_proj" else [])
    for layer, total in zip(plan.fingerprint["moe_layers"], plan.fingerprint["num_experts"]):
        if layer not in routers or (layer not in fused and counts.get(layer) != set(range(total))):
            raise MiniGPTError(f"checkpoint {src} lacks the router or experts of sparse layer {layer} (out-of-core "
                               "expert pruning reads per-expert or fused expert tensors)")


def prune_checkpoint(src: str | os.PathLike, out: str | os.PathLike, stats: moe.MoEStats, *, experts=None,
                     criterion: str = "freq", neurons=None, metric: str = "l1", multiple: int = 8,
                     scope: str = "uniform", trust_remote_code: bool = False) -> tuple[Path, moe.MoEPlan, dict]:
    """Prune the MoE checkpoint ``src`` into the new directory ``out`` from expert statistics ``stats``, never
    loading it; the same plan, config and weights as ``moe.plan_moe`` + ``moe.prune_moe`` in memory. Returns
    ``(out, plan, report)``; the report holds the weight bytes before and after."""
    from minigpt.pipeline.compact import save_pruned

    src = Path(src)
    found, index = shards(src)
    model, tokenizer = skeleton(src, trust_remote_code)
    plan = moe.plan_moe(stats, experts, criterion, neurons, metric=metric, multiple=multiple, scope=scope)
    stored = {name: shard for shard in found for name in shard.tensors}
    _check_stored(stored, plan, src)
    params = {"before": moe.moe_parameter_counts(model)}
    moe.prune_moe(model, plan)  # on the meta device: the new config and shapes
    params["after"] = moe.moe_parameter_counts(model)
    sizes = {"before": sum(end - begin for shard in found for _, _, begin, end in shard.tensors.values())}

    def write_weights(tmp: Path) -> None:
        total, weight_map = 0, {}
        for shard in found:
            specs, sources = {}, {}
            for name, (dtype, shape, _, _) in shard.tensors.items():
                edit = _rename(name, plan)
                if edit is not None:
                    sources[edit[0]] = (name, edit[1])
                    specs[edit[0]] = (dtype, list(edit[1](torch.empty(shape, dtype=dtype, device="meta")).shape))
            if not specs:  # a shard of removed experts only
                continue
            with open(shard.path, "rb") as f:

                def read(name: str, shard=shard, f=f, sources=sources) -> torch.Tensor:
                    old, shrink = sources[name]
                    return shrink(shard.read(f, old))

                total += write_shard(tmp / shard.path.name, specs, read, shard.metadata)
            weight_map.update(dict.fromkeys(specs, shard.path.name))
        if index is not None:
            new_index = {**index, "metadata": {**index.get("metadata", {}), "total_size": total},
                         "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX).write_text(json.dumps(new_index, indent=2))
        stats.save(tmp / "minigpt_expert_stats.safetensors")
        sizes["after"] = total

    report = {"source": str(src), "moe": moe.moe_report(stats, plan), "params": params, "weight_bytes": sizes,
              "out_of_core": True}
    save_pruned(model, tokenizer, out, plan=plan, source=src, report=report, write_weights=write_weights)
    return Path(out), plan, report
