"""Each architecture as groups of coupled slices: one index of a group selects slices of several tensors at once.

Groups of layer ``l`` (``d`` = head_dim, ``H``/``K`` query/KV heads, ``G = H / K``):

* ``mlp`` neuron j: row j of every colwise MLP projection (rows j and N + j of a packed ``gate_up_proj``) and of
  its bias, column j of the rowwise one.
* ``heads`` query head h: rows h·d … (h+1)·d − 1 of q (or of the q part of a fused qkv) and of its bias, the same
  columns of o, and the same entries of a ``q_norm`` spanning all heads (OLMo-2).
* ``kv`` KV head g: the rows of k and v (or of their parts of a fused qkv), biases, a ``k_norm`` spanning all KV
  heads. KV head g serves query heads g·G … (g+1)·G − 1 (``repeat_kv``'s order): removing it removes them.

Of the model: ``hidden`` channel c: column c of every matrix reading the residual stream (colwise projections,
LM head), row c of every one writing it (rowwise projections and their biases), column c of the embeddings, entry
c of every norm over the hidden size. Layers are whole blocks.

The description comes from ``config.base_model_tp_plan`` (``colwise*`` projections are cut in their output rows,
``rowwise*`` in their input columns, exactly the dimensions head and neuron pruning cut), the attention modules'
``head_dim`` and head counts; ``PLANS`` writes the plan of architectures whose config has none (gpt2, opt).
A projection is attention's when its parent module holds a q/k/v (or fused qkv) projection, the MLP's otherwise.
GPT-2's ``Conv1D`` stores its weight as (in, out): its dimensions swap.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from minigpt.errors import MiniGPTError

# tensor-parallel plans of architectures whose config carries none (keys relative to a decoder block)
PLANS = {
    "gpt2": {"attn.c_attn": "colwise", "attn.c_proj": "rowwise", "mlp.c_fc": "colwise", "mlp.c_proj": "rowwise"},
    "opt": {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
            "self_attn.out_proj": "rowwise", "fc1": "colwise", "fc2": "rowwise"},
}
QKV = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "qkv_proj": "qkv", "c_attn": "qkv"}  # leaf name → role
PACKED = {"gate_up_proj": 2}  # fused MLP projections: gate rows then up rows


@dataclass(frozen=True)
class Slice:
    """Where a group's index ``i`` lands in parameter ``param`` (a ``named_parameters`` name): positions
    ``start + i·unit`` … ``start + (i+1)·unit − 1`` of dimension ``dim``. ``norm``: an RMSNorm weight normalising
    over that dimension (its kept entries are rescaled, see ``minigpt.models.surgery``)."""

    param: str
    dim: int
    start: int = 0
    unit: int = 1
    norm: bool = False


@dataclass(frozen=True)
class Group:
    """A prunable dimension of ``size`` items and every slice one item selects."""

    size: int
    slices: tuple[Slice, ...]


@dataclass
class LayerGroups:
    """One decoder block's groups and the module paths of its attention and MLP."""

    mlp: Group | None
    heads: Group | None
    kv: Group | None
    head_dim: int | None
    attention: str | None
    mlp_module: str | None

    @property
    def queries_per_kv(self) -> int:
        return self.heads.size // self.kv.size


@dataclass
class Architecture:
    """Every prunable group of a model: per layer, plus the hidden channels (None, with the reason, when some
    parameter reading or writing the residual stream is not described)."""

    blocks: str
    layers: list[LayerGroups]
    hidden: Group | None
    hidden_problem: str | None = None
    structures: tuple[str, ...] = field(default=())


def output_projection(model, heads: Group) -> tuple[str, int]:
    """``(weight name, dimension)`` of the attention output projection's input columns in a layer's ``heads``."""
    return next((s.param, s.dim) for s in heads.slices
                if s.param.endswith(".weight") and s.dim == 1 - out_dim(model.get_submodule(s.param.rpartition(".")[0])))


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def projection_plan(config) -> dict[str, str]:
    """Block-relative projection path → ``colwise`` / ``rowwise`` (packed and gather variants folded in)."""
    raw = PLANS.get(config.model_type) or {
        k.removeprefix("layers.*."): v for k, v in (getattr(text_config(config), "base_model_tp_plan", None) or {}).items()
        if k.startswith("layers.*.")
    }
    plan = {}
    for path, style in raw.items():
        if "experts" in path:
            continue
        if style.startswith(("colwise", "packed_colwise")):
            plan[path] = "colwise"
        elif style.startswith("rowwise"):
            plan[path] = "rowwise"
    if not plan:
        raise MiniGPTError(f"model_type {config.model_type!r} has no tensor-parallel plan to describe it by; "
                           f"described without one: {', '.join(sorted(PLANS))}")
    return plan


def find_blocks(model) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` of decoder blocks: the first one with ``num_hidden_layers`` entries."""
    n = text_config(model.config).num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n > 0:
            return name, module
    raise MiniGPTError(f"cannot find the {n} decoder blocks of {type(model).__name__}")


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def out_dim(module: nn.Module) -> int:
    """The weight dimension of output features (1 for ``Conv1D``, 0 for ``nn.Linear``)."""
    return 1 if is_conv1d(module) else 0


def out_features(module: nn.Module) -> int:
    return module.weight.shape[out_dim(module)]


def is_rms_norm(module: nn.Module) -> bool:
    return "RMSNorm" in type(module).__name__


def norm_offset(norm: nn.Module) -> float:
    """1.0 when the norm scales by ``1 + weight`` (Gemma), 0.0 when by ``weight``: probed on a CPU copy."""
    probe = copy.deepcopy(norm).to_empty(device="cpu").float()
    with torch.no_grad():
        for p in probe.parameters():
            p.zero_()
        out = probe(torch.ones(1, probe.weight.shape[0]))
    return 1.0 if bool(out.abs().max() > 0.5) else 0.0


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _leaf(path: str) -> str:
    return path.rpartition(".")[2]


def _proj_slices(prefix: str, module: nn.Module, side: str, start: int = 0, unit: int = 1) -> list[Slice]:
    """Slices of a projection: its output rows (+ bias) for ``rows``, its input columns for ``cols``."""
    if side == "rows":
        out = [Slice(prefix + "weight", out_dim(module), start, unit)]
        if getattr(module, "bias", None) is not None:
            out.append(Slice(prefix + "bias", 0, start, unit))
        return out
    return [Slice(prefix + "weight", 1 - out_dim(module), start, unit)]


def _layer(model, config, block_path: str, block: nn.Module, plan: dict[str, str]) -> LayerGroups:
    attn_parents = {_parent(p) for p in plan if _leaf(p) in QKV}
    mlp_cols = [p for p, s in plan.items() if s == "colwise" and _parent(p) not in attn_parents]
    mlp_rows = [p for p, s in plan.items() if s == "rowwise" and _parent(p) not in attn_parents]
    mlp = None
    if mlp_cols and mlp_rows:
        slices, sizes = [], set()
        for path in mlp_cols:
            module = block.get_submodule(path)
            parts = PACKED.get(_leaf(path), 1)
            n = out_features(module) // parts
            sizes.add(n)
            for part in range(parts):
                slices += _proj_slices(f"{block_path}.{path}.", module, "rows", start=part * n)
        for path in mlp_rows:
            slices += _proj_slices(f"{block_path}.{path}.", block.get_submodule(path), "cols")
        if len(sizes) != 1:
            raise MiniGPTError(f"MLP projections of {block_path} disagree on the width: {sorted(sizes)}")
        mlp = Group(sizes.pop(), tuple(slices))
    if not attn_parents:
        return LayerGroups(mlp, None, None, None, None, _parent(mlp_cols[0]) if mlp_cols else None)
    (attn_path,) = attn_parents
    heads, kv, d = _attention(model, config, f"{block_path}.{attn_path}" if attn_path else block_path,
                              block.get_submodule(attn_path) if attn_path else block,
                              {_leaf(p): s for p, s in plan.items() if _parent(p) == attn_path})
    return LayerGroups(mlp, heads, kv, d, f"{block_path}.{attn_path}".rstrip("."),
                       _parent(mlp_cols[0]) if mlp_cols else None)


def _attention(model, config, path: str, attn: nn.Module, plan: dict[str, str]):
    """``(heads group, kv group, head_dim)`` of one attention module from its projections' roles."""
    cfg = text_config(config)
    d = getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None)
    if not d:
        raise MiniGPTError(f"cannot tell the head size of {path}")
    roles = {QKV[leaf]: leaf for leaf in plan if leaf in QKV}
    (o_leaf,) = [leaf for leaf, s in plan.items() if s == "rowwise"]
    q_slices, kv_slices = [], []
    if "qkv" in roles:
        fused = attn.get_submodule(roles["qkv"])
        n_q = getattr(attn, "num_heads", None) or cfg.num_attention_heads
        n_kv = getattr(attn, "num_key_value_heads", None) or getattr(cfg, "num_key_value_heads", None) or n_q
        if out_features(fused) != (n_q + 2 * n_kv) * d:
            raise MiniGPTError(f"{path}.{roles['qkv']} has {out_features(fused)} outputs, not ({n_q}+2·{n_kv})·{d}")
        prefix = f"{path}.{roles['qkv']}."
        q_slices += _proj_slices(prefix, fused, "rows", 0, d)
        kv_slices += _proj_slices(prefix, fused, "rows", n_q * d, d) + _proj_slices(prefix, fused, "rows",
                                                                                    (n_q + n_kv) * d, d)
    else:
        n_q = out_features(attn.get_submodule(roles["q"])) // d
        n_kv = out_features(attn.get_submodule(roles["k"])) // d
        q_slices += _proj_slices(f"{path}.{roles['q']}.", attn.get_submodule(roles["q"]), "rows", 0, d)
        for role in ("k", "v"):
            kv_slices += _proj_slices(f"{path}.{roles[role]}.", attn.get_submodule(roles[role]), "rows", 0, d)
    q_slices += _proj_slices(f"{path}.{o_leaf}.", attn.get_submodule(o_leaf), "cols", 0, d)
    for name, module in attn.named_children():  # norms spanning every head (OLMo-2's q_norm / k_norm)
        weight = getattr(module, "weight", None)
        if name in plan or weight is None or weight.dim() != 1 or not is_rms_norm(module):
            continue
        if name.startswith("q") and weight.shape[0] == n_q * d:
            q_slices.append(Slice(f"{path}.{name}.weight", 0, 0, d, norm=True))
        elif name.startswith("k") and weight.shape[0] == n_kv * d:
            kv_slices.append(Slice(f"{path}.{name}.weight", 0, 0, d, norm=True))
    if n_kv == 0 or n_q % n_kv:
        raise MiniGPTError(f"{path} has {n_q} query heads for {n_kv} KV heads")
    return Group(n_q, tuple(q_slices)), Group(n_kv, tuple(kv_slices)), d


def _hidden(model, blocks_path: str, blocks: nn.ModuleList, layers: list[LayerGroups], plan: dict[str, str]):
    """``(group, problem)``: the hidden channels' slices, or None and the parameter nothing describes."""
    size = text_config(model.config).hidden_size
    slices, covered = [], set()
    for layer, block in enumerate(blocks):
        prefix = f"{blocks_path}.{layer}."
        attn = layers[layer].attention
        for path, style in plan.items():
            module = block.get_submodule(path)
            for name, _ in module.named_parameters():
                covered.add(f"{prefix}{path}.{name}")
            if style == "colwise":
                slices += _proj_slices(f"{prefix}{path}.", module, "cols")
            else:
                slices.append(Slice(f"{prefix}{path}.weight", out_dim(module)))
                if getattr(module, "bias", None) is not None:
                    slices.append(Slice(f"{prefix}{path}.bias", 0))
        for name, module in block.named_modules():
            full = f"{prefix}{name}".rstrip(".")
            if attn and full.startswith(attn + "."):  # per-head norms (Qwen3, OLMo-2) stay
                covered.update(f"{full}.{n}" for n, _ in module.named_parameters(recurse=False))
    seen = set()
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if full in covered or id(param) in seen:  # a tied LM head is the embedding
                continue
            seen.add(id(param))
            if param.dim() == 1 and param.shape[0] == size:
                slices.append(Slice(full, 0, norm=pname == "weight" and is_rms_norm(module)))
            elif param.dim() == 2 and param.shape[1] == size and not full.startswith(blocks_path + "."):
                slices.append(Slice(full, 1))  # embeddings, position embeddings, LM head
            elif size in param.shape:
                return None, f"{full} of shape {tuple(param.shape)} reads or writes the residual stream undescribed"
    return Group(size, tuple(dict.fromkeys(slices))), None


def describe(model) -> Architecture:
    """The groups of ``model`` (current shapes: a pruned model describes its pruned widths)."""
    plan = projection_plan(model.config)
    blocks_path, blocks = find_blocks(model)
    layers = [_layer(model, model.config, f"{blocks_path}.{i}", b, plan) for i, b in enumerate(blocks)]
    hidden, problem = _hidden(model, blocks_path, blocks, layers, plan)
    structures = tuple(s for s, ok in (("mlp", all(layer.mlp for layer in layers)),
                                       ("heads", all(layer.heads for layer in layers)),
                                       ("hidden", hidden is not None), ("layers", len(layers) > 1)) if ok)
    return Architecture(blocks_path, layers, hidden, problem, structures)
