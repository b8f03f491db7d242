"""Out-of-core compaction: prune a (sharded) safetensors checkpoint tensor by tensor, for models larger than RAM.

The model is built on the meta device from its config (shapes only), planned and compacted there; then every
shard is rewritten one tensor at a time: a positioned read of that tensor's bytes (so resident memory holds
that tensor, not a whole-file map whose touched pages would all count), the MLP projections' dropped neurons
removed, and the bytes streamed into a new shard of the same name whose header is computed beforehand. Peak
memory is about two tensors (the largest projection and its pruned copy), not the model. The new directory
(shards, index, config, tokenizer, plan) is written atomically like ``save_pruned``'s.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from minigpt import adapters
from minigpt.errors import MiniGPTError
from minigpt.trust import needs_remote_code

INDEX = "model.safetensors.index.json"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class Shard:
    """One safetensors file. ``tensors[name] = (dtype, shape, begin, end)``, byte offsets from ``data_start``."""

    path: Path
    tensors: dict[str, tuple[torch.dtype, list[int], int, int]]
    metadata: dict[str, str]
    data_start: int

    @classmethod
    def open(cls, path: Path) -> Shard:
        """Parse and check the header against the file size; a truncated or corrupted file gets one line."""
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if size < 8 or n > size - 8:
                    raise ValueError(f"a header of {n} bytes in a file of {size}")
                header = json.loads(f.read(n))
            metadata = header.pop("__metadata__", None) or {}
            tensors = {}
            for name, info in header.items():
                if info["dtype"] not in DTYPES:
                    raise ValueError(f"unknown dtype {info['dtype']} of {name}")
                dtype, shape, (begin, end) = DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
                if not 0 <= begin <= end or end - begin != math.prod(shape) * dtype.itemsize:
                    raise ValueError(f"{name} has {end - begin} bytes for shape {shape} of {info['dtype']}")
                tensors[name] = (dtype, shape, begin, end)
            data_end = 8 + n + max((t[3] for t in tensors.values()), default=0)
            if data_end > size:
                raise ValueError(f"truncated: {size} bytes, its tensors need {data_end}")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise MiniGPTError(f"checkpoint shard {path} is corrupted: {err}") from err
        return cls(path, tensors, metadata, 8 + n)

    def read(self, f, name: str) -> torch.Tensor:
        """Tensor ``name`` read from the open file ``f`` into memory of its own."""
        dtype, shape, begin, end = self.tensors[name]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        f.seek(self.data_start + begin)
        if f.readinto(memoryview(buf.numpy())) != end - begin:
            raise MiniGPTError(f"checkpoint shard {self.path} is corrupted: {name} ends early")
        return buf.view(dtype).reshape(shape)


def write_shard(path: Path, specs: dict[str, tuple[torch.dtype, list[int]]], read: Callable, metadata: dict) -> int:
    """Stream a safetensors file: header from ``specs`` (name → dtype, shape), then ``read(name)`` one at a time.

    Returns the bytes of tensor data written.
    """
    header, offset = {}, 0
    for name, (dtype, shape) in specs.items():
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, (dtype, shape) in specs.items():
            t = read(name)
            assert t.dtype == dtype and list(t.shape) == list(shape), name
            f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
            del t
    return offset


def shards(src: Path) -> tuple[list[Shard], dict | None]:
    """The checkpoint's shards (checked) and its index (None for a single ``model.safetensors``)."""
    if (src / INDEX).exists():
        try:
            index = json.loads((src / INDEX).read_text())
            files = list(dict.fromkeys(index["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as err:
            raise MiniGPTError(f"checkpoint index {src / INDEX} is corrupted: {err}") from err
        for file in files:
            if not (src / file).is_file():
                raise MiniGPTError(f"checkpoint shard {src / file} named by the index is missing")
        found = [Shard.open(src / file) for file in files]
        for name, file in index["weight_map"].items():
            if name not in found[files.index(file)].tensors:
                raise MiniGPTError(f"checkpoint shard {src / file} lacks {name}, which the index puts there")
        return found, index
    if (src / "model.safetensors").is_file():
        return [Shard.open(src / "model.safetensors")], None
    raise MiniGPTError(f"{src} holds no safetensors checkpoint (out-of-core pruning reads safetensors only)")


def skeleton(src: Path, trust_remote_code: bool = False):
    """``(model, tokenizer)``: the model of ``src``'s config on the meta device (shapes, no memory), its tokenizer.

    ``src``'s own code runs only under ``minigpt.trust``'s rule (``trust_remote_code``: the user allows any)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (src / "config.json").is_file():
        raise MiniGPTError(f"{src} is not a Hugging Face model directory (no config.json)")
    try:
        remote = needs_remote_code(src, trust_remote_code)
        config = AutoConfig.from_pretrained(src, trust_remote_code=remote)
        tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=remote)
    except (OSError, ValueError, KeyError) as err:
        raise MiniGPTError(f"cannot load the config or tokenizer of {src}: {str(err).splitlines()[0]}") from err
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=remote, dtype=config.dtype)
    return model.eval(), tokenizer


def neuron_params(model) -> dict[str, tuple[int, int, int]]:
    """Parameter name → (layer, dimension indexed by that layer's MLP neurons, parts), for every pruned projection;
    ``parts`` is 2 for a fused gate_up projection (neuron j: rows j and N+j), else 1."""
    layout = adapters.get_layout(model)
    names = {module: name for name, module in model.named_modules()}
    out = {}
    for layer, owner in enumerate(adapters.mlps(model)):
        for side, projections in (("rows", layout.rows), ("cols", layout.cols)):
            for proj in projections:
                prefix = f"{names[getattr(owner, proj)]}."
                parts = 2 if side == "rows" and layout.packed else 1
                out[prefix + "weight"] = (layer, adapters.neuron_dim(layout, side), parts)
                if side == "rows" and getattr(owner, proj).bias is not None:
                    out[prefix + "bias"] = (layer, 0, parts)
    return out


def prune_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, stats=None, pruning_plan=None,
                     metric: str = "l1", report: dict | None = None, trust_remote_code: bool = False, **policy):
    """Prune the safetensors checkpoint ``src`` into the new directory ``out`` without loading it.

    Give a ``pruning_plan``, or ``stats`` with an activation ``metric`` and a policy (``ratio`` / ``threshold``,
    ``scope``, ``multiple``, ``min_keep``). Every shard is checked before anything is written; returns
    ``(out, plan, report)`` where the report holds the weight bytes before and after.
    """
    from minigpt.compact import save_pruned
    from minigpt.importance import STATS_METRICS
    from minigpt.pipeline import prune

    src = Path(src)
    found, index = shards(src)
    model, tokenizer = skeleton(src, trust_remote_code)
    original = {k: list(v.shape) for k, v in model.state_dict().items()}
    pruned = neuron_params(model)
    stored = {name: (shard, info) for shard in found for name, info in shard.tensors.items()}
    for name, (shard, (_, shape, _, _)) in stored.items():
        if name in original and shape != original[name]:
            raise MiniGPTError(f"checkpoint shard {shard.path} holds {name} of shape {shape}, the config {original[name]}")
    missing = sorted(set(pruned) - set(stored))
    if missing:
        raise MiniGPTError(f"checkpoint {src} lacks the MLP weights {', '.join(missing[:3])}...")
    if pruning_plan is None and metric not in STATS_METRICS:
        raise MiniGPTError(f"out-of-core pruning takes a plan or an activation metric ({', '.join(STATS_METRICS)})")
    if pruning_plan is not None and pruning_plan.vocab is not None:
        raise MiniGPTError("vocabulary pruning is not supported out of core")
    model, plan = prune(model, tokenizer, stats=stats, pruning_plan=pruning_plan, metric=metric, **policy)
    kept = plan.kept_tensors()
    sizes = {"before": sum(end - begin for _, _, begin, end in (info for _, info in stored.values()))}

    def new_shape(name: str, shape: list[int]) -> list[int]:
        if name not in pruned:
            return shape
        layer, dim, parts = pruned[name]
        return [len(kept[layer]) * parts if d == dim else n for d, n in enumerate(shape)]

    def write_weights(tmp: Path) -> None:
        total = 0
        for shard in found:
            specs = {name: (dtype, new_shape(name, shape)) for name, (dtype, shape, _, _) in shard.tensors.items()}
            with open(shard.path, "rb") as f:

                def read(name: str, shard=shard, f=f) -> torch.Tensor:
                    t = shard.read(f, name)
                    if name not in pruned:
                        return t
                    layer, dim, parts = pruned[name]
                    width = t.shape[dim] // parts
                    return t.index_select(dim, torch.cat([kept[layer] + p * width for p in range(parts)]))

                total += write_shard(tmp / shard.path.name, specs, read, shard.metadata)
        if index is not None:
            new_index = {**index, "metadata": {**index.get("metadata", {}), "total_size": total}}
            (tmp / INDEX).write_text(json.dumps(new_index, indent=2))
        sizes["after"] = total

    report = {**(report or {}), "source": str(src), "plan": plan.policy, "removed_fraction": plan.removed_fraction,
              "kept_widths": plan.kept_widths, "weight_bytes": sizes}
    save_pruned(model, tokenizer, out, plan=plan, source=src, report=report, write_weights=write_weights)
    return Path(out), plan, report
