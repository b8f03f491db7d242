"""Out-of-core compaction: prune a (sharded) safetensors checkpoint tensor by tensor, for models larger than RAM.

The model is built on the meta device from its config (shapes only), planned and compacted there; then every
shard is rewritten one tensor at a time: a positioned read of that tensor's bytes (so resident memory holds
that tensor, not a whole-file map whose touched pages would all count), the plan's cuts of that parameter applied
(``minigpt.models.surgery.cuts``: MLP neurons, heads, hidden channels, with the RMSNorm and embedding rescales), and the
bytes streamed into a new shard of the same name whose header is computed beforehand. Removed layers' tensors are
left out and the remaining blocks renumbered in the shard keys and the index (a shard left empty is not written).
Peak memory is about two tensors (the largest projection and its pruned copy), not the model. The new directory
(shards, index, config, tokenizer, plan) is written atomically like ``save_pruned``'s.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from minigpt.errors import MiniGPTError
from minigpt.models import adapters, surgery
from minigpt.models.architecture import describe, find_blocks, output_projection
from minigpt.models.trust import needs_remote_code
from minigpt.pipeline.compensate import (
    DAMPING,
    add_mlp_biases,
    bias_slot,
    head_columns,
    head_moments,
    mark_mlp_bias,
    moments,
    refit,
)

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

    ``src``'s own code runs only under ``minigpt.models.trust``'s rule (``trust_remote_code``: the user allows any)."""
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


def layer_renames(model, kept_layers: list[int] | None) -> Callable[[str], str | None]:
    """Stored name → its name once ``kept_layers`` alone stay (blocks renumbered), None for a removed block's."""
    if kept_layers is None:
        return lambda name: name
    prefix = find_blocks(model)[0] + "."
    new = {old: i for i, old in enumerate(kept_layers)}

    def rename(name: str) -> str | None:
        if not name.startswith(prefix):
            return name
        layer, _, rest = name[len(prefix):].partition(".")
        return f"{prefix}{new[int(layer)]}.{rest}" if int(layer) in new else None

    return rename


class Refit:
    """Out-of-core compensation: each layer's output projections refitted on what they keep when first read, as
    in memory before compaction (then the same cuts apply): down_proj on the kept neurons
    (``minigpt.pipeline.compensate.compensate_layer``) and, when ``heads`` are given, o_proj on the kept heads' columns
    (``minigpt.pipeline.compensate.compensate_heads``).

    ``source(name, t)`` gives a stored tensor's value before its cut; ``added`` the bias tensors compensation
    creates (the ``mlp_bias`` slot: zero gate/up biases and the fitted down bias), each placed after its weight.
    """

    def __init__(self, model, stats, kept: list[torch.Tensor], method: str, damping: float, read: Callable,
                 heads: list[list[int]] | None = None):
        self.slot = bias_slot(model)
        if method == "bias" and self.slot == "none":
            raise MiniGPTError(f"--compensate bias: {model.config.model_type} has no MLP output bias to hold it "
                               "(use lstsq, which refits without one)")
        moments(stats, 0, centred=False)  # refuses statistics without Gram matrices, before any read
        layout = adapters.get_layout(model)
        names = {module: name for name, module in model.named_modules()}
        self.stats, self.method, self.damping, self.read = stats, method, damping, read
        # weight name → (moments of its input, input dimension, kept input columns, bias slot)
        self.targets: dict[str, tuple[Callable, int, torch.Tensor, str]] = {}
        self.added = {}  # weight name → (its new bias's name, the down_proj it belongs to, width: None if fitted)
        dim = adapters.neuron_dim(layout, "cols")
        for layer, mlp in enumerate(adapters.mlps(model)):
            down = f"{names[getattr(mlp, layout.cols[0])]}.weight"
            self.targets[down] = partial(moments, stats, layer), dim, kept[layer], self.slot
            for proj in (*layout.rows, *layout.cols) if self.slot == "mlp_bias" else ():
                module = getattr(mlp, proj)
                width = None if proj in layout.cols else module.weight.shape[0]
                self.added[f"{names[module]}.weight"] = (f"{names[module]}.bias", down, width)
        self.attention = {"method": "none", "bias": "none"}
        if heads is not None:
            layers = describe(model).layers
            o_projs = [output_projection(model, groups.heads) for groups in layers]
            slot = "o_proj" if all(model.get_submodule(p.rpartition(".")[0]).bias is not None for p, _ in o_projs) \
                else "none"
            if not (method == "bias" and slot == "none"):
                head_moments(stats, 0, centred=False)  # refuses statistics without attention Gram matrices
                self.attention = {"method": method, "damping": damping if method == "lstsq" else None, "bias": slot}
                for layer, ((param, pdim), groups) in enumerate(zip(o_projs, layers)):
                    columns = head_columns(heads[layer], groups.head_dim)
                    self.targets[param] = partial(head_moments, stats, layer), pdim, columns, slot
        self._cache: tuple[str, tuple] | None = None

    def refitted(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight, bias to add)`` of the output projection ``name`` in its stored layout and dtype."""
        if self._cache is None or self._cache[0] != name:
            fit_moments, dim, keep, slot = self.targets[name]
            t = self.read(name)
            m, mu = fit_moments(centred=slot != "none")
            new_k, bias = refit(t.movedim(dim, 1), m, mu if slot != "none" else None, keep, self.method,
                                self.damping)
            full = torch.zeros(new_k.shape[0], t.shape[dim], dtype=torch.float64)
            full[:, keep] = new_k
            self._cache = name, (full.to(t.dtype).movedim(1, dim), None if bias is None else bias.to(t.dtype))
        return self._cache[1]

    def source(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The value of stored tensor ``name`` (``t``) after compensation, before its cut."""
        if name in self.targets:
            return self.refitted(name)[0]
        weight = name.removesuffix(".bias") + ".weight"
        if name.endswith(".bias") and weight in self.targets and self.targets[weight][3] != "none":
            return t + self.refitted(weight)[1]
        return t

    def new(self, bias: tuple, dtype: torch.dtype) -> torch.Tensor:
        """An added bias ``(name, down_proj, width)``: zeros of ``width`` (gate/up), or the fitted down bias."""
        _, down, width = bias
        return self.refitted(down)[1] if width is None else torch.zeros(width, dtype=dtype)


def prune_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, stats=None, pruning_plan=None,
                     metric: str = "l1", policy=None, report: dict | None = None, trust_remote_code: bool = False,
                     compensate: str = "none", damping: float = DAMPING):
    """Prune the safetensors checkpoint ``src`` into the new directory ``out`` without loading it.

    Give a ``pruning_plan``, or ``stats`` with an activation ``metric`` and a ``minigpt.pipeline.policy.Policy`` (every
    structure: MLP neurons, heads, hidden channels, layers; ``target_params``). The plan is made and applied on
    the meta-device model, its per-parameter ``surgery.cuts`` then applied to each stored tensor, removed blocks'
    tensors left out and the rest renumbered: the tensors of in-memory pruning. ``compensate`` (bias, lstsq) refits
    each down_proj (and o_proj where heads go) from ``stats``' Gram matrices as it is read (``Refit``) when the plan
    removes MLP neurons. Every
    shard is checked before anything is written; returns ``(out, plan, report)``, the report holding the weight
    bytes before and after.
    """
    from minigpt.pipeline.compact import save_pruned
    from minigpt.pipeline.importance import STATS_METRICS
    from minigpt.pipeline.policy import Policy
    from minigpt.pipeline.prune import prune, sized

    src = Path(src)
    found, index = shards(src)
    model, tokenizer = skeleton(src, trust_remote_code)
    original = {k: list(v.shape) for k, v in model.state_dict().items()}
    stored = {name: (shard, info) for shard in found for name, info in shard.tensors.items()}
    for name, (shard, (_, shape, _, _)) in stored.items():
        if name in original and shape != original[name]:
            raise MiniGPTError(f"checkpoint shard {shard.path} holds {name} of shape {shape}, the config {original[name]}")
    if pruning_plan is None and metric not in STATS_METRICS:
        raise MiniGPTError(f"out-of-core pruning takes a plan or an activation metric ({', '.join(STATS_METRICS)})")
    if pruning_plan is not None and pruning_plan.vocab is not None:
        raise MiniGPTError("vocabulary pruning is not supported out of core")
    if compensate != "none" and stats is None:
        raise MiniGPTError(f"--compensate {compensate} out of core needs --stats with Gram statistics")
    unpruned = copy.deepcopy(model)  # meta: shapes only
    target = None
    if pruning_plan is None and policy is not None:  # sized here: the budget counts the biases the refit adds
        target = Policy.of(policy, {}).target_params
        policy = sized(policy, stats, model, metric, 0, compensate)
    model, plan = prune(model, tokenizer, stats=stats, pruning_plan=pruning_plan, metric=metric, policy=policy)
    if target is not None:
        plan.policy["target_params"] = target
    kept = plan.structures()
    cuts = surgery.cuts(unpruned, kept)
    first, canonical = {}, {}  # every name of a parameter (a tied LM head's too) → the name its cut is under
    for name, param in unpruned.named_parameters(remove_duplicate=False):
        canonical[name] = first.setdefault(id(param), name)
    missing = sorted(set(cuts) - {canonical.get(name) for name in stored})
    if missing:
        raise MiniGPTError(f"checkpoint {src} lacks the pruned weights {', '.join(missing[:3])}...")
    refitter = None
    if compensate != "none" and kept.mlp is not None:
        refitter = Refit(unpruned, stats, plan.kept_tensors(), compensate, damping, lambda name: read_stored(name),
                         heads=kept.heads)
        plan.policy["compensate"] = {"method": compensate, "damping": damping if compensate == "lstsq" else None,
                                     "bias": refitter.slot, "gram_tokens": stats.gram_tokens}
        if kept.heads is not None:
            plan.policy["compensate"]["attention"] = refitter.attention
        if refitter.slot == "mlp_bias":
            add_mlp_biases(model)  # the pruned (meta) model's shapes: what the saved config describes
            mark_mlp_bias(model, plan.policy["compensate"])
            for weight, bias in refitter.added.items():  # an added bias is cut like its weight's output rows
                cut = cuts[weight].index if weight in cuts else {}
                cuts[bias[0]] = surgery.Cut({0: cut[0]} if 0 in cut else {}, [])
    rename = layer_renames(unpruned, kept.layers)
    sizes = {"before": sum(end - begin for _, _, begin, end in (info for _, info in stored.values()))}

    def read_stored(name: str) -> torch.Tensor:
        shard = stored[name][0]
        with open(shard.path, "rb") as f:
            return shard.read(f, name)

    def entries(shard: Shard, f) -> dict[str, tuple[torch.dtype, list[int], Callable]]:
        """Name → (dtype, shape before the cut, value before the cut) of what ``shard`` will hold (compensation's
        added biases right after their weights)."""
        out = {}
        for name, (dtype, shape, _, _) in shard.tensors.items():
            out[name] = dtype, shape, lambda name=name: (shard.read(f, name) if refitter is None
                                                        else refitter.source(name, shard.read(f, name)))
            if refitter is not None and name in refitter.added:
                bias = refitter.added[name]
                out[bias[0]] = dtype, [bias[2] or shape[0]], lambda bias=bias, dtype=dtype: refitter.new(bias, dtype)
        return out

    def write_weights(tmp: Path) -> None:
        total, weight_map = 0, {}
        for shard in found:
            with open(shard.path, "rb") as f:
                values = entries(shard, f)
                names = {rename(name): name for name in values if rename(name) is not None}  # new → stored
                if not names and index is not None:  # every tensor of the shard belonged to removed blocks
                    continue
                specs = {}
                for new, name in names.items():
                    dtype, shape, _ = values[name]
                    cut = cuts.get(canonical.get(name, name))
                    specs[new] = dtype, [len(cut.index[d]) if cut and d in cut.index else n
                                         for d, n in enumerate(shape)]

                def read(new: str, values=values, names=names) -> torch.Tensor:
                    t = values[names[new]][2]()
                    cut = cuts.get(canonical.get(names[new], names[new]))
                    return cut.apply(t) if cut else t

                total += write_shard(tmp / shard.path.name, specs, read, shard.metadata)
            weight_map.update(dict.fromkeys(names, shard.path.name))
        if index is not None:
            new_index = {**index, "metadata": {**index.get("metadata", {}), "total_size": total},
                         "weight_map": weight_map}
            (tmp / INDEX).write_text(json.dumps(new_index, indent=2))
        sizes["after"] = total

    report = {**(report or {}), "source": str(src), "plan": plan.policy, "removed_fraction": plan.removed_fraction,
              "kept_widths": plan.kept_widths, "weight_bytes": sizes}
    save_pruned(model, tokenizer, out, plan=plan, source=src, report=report, write_weights=write_weights)
    return Path(out), plan, report
