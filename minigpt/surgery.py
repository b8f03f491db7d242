"""Remove the items of every group a plan drops, for every architecture, from its description alone.

Every cut parameter is copied once by one ``gather`` call (a second call for parameters cut in two dimensions,
e.g. ``down_proj`` losing neurons and hidden channels); the parameters keep their identity (``param.data`` is
replaced), so tied embeddings stay tied. Then blocks are dropped, module attributes and the config updated.

RMSNorm rule: a norm over a cut dimension divides by the RMS over *all* its channels, so removing ``n − n'`` of
``n`` channels that are exactly zero multiplies the RMS by ``√(n'/n)``: the kept weights are multiplied by
``√(n/n')`` (``(1 + w)·√(n/n') − 1`` for Gemma's ``1 + w`` norms) and the outputs are unchanged up to ε.
LayerNorm also subtracts the mean over the channels: no rescaling makes removing channels exact there, so hidden
pruning of LayerNorm models (opt, gpt2, phi) is approximate. Gemma's embedding scale √hidden becomes √hidden':
the embedding is multiplied by √(hidden / hidden'), and a tied LM head's logits are kept by the final norm.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from minigpt.architecture import Architecture, Group, describe, norm_offset, text_config
from minigpt.errors import MiniGPTError

WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner")
HIDDEN_KEYS = ("hidden_size", "word_embed_proj_dim")
HEAD_KEYS = ("num_attention_heads", "num_key_value_heads", "head_dim")


@dataclass
class Kept:
    """What a plan keeps (None: the whole structure). Indices into the unpruned model, sorted.

    mlp: per layer, kept neurons.   heads: per layer, kept query heads (a KV head left with none goes, and every
    KV head kept must keep as many query heads as the others).   hidden: kept channels.   layers: kept blocks.
    """

    mlp: list[list[int]] | None = None
    heads: list[list[int]] | None = None
    hidden: list[int] | None = None
    layers: list[int] | None = None


def kv_heads(heads: list[int], n_heads: int, n_kv: int) -> list[int]:
    """KV heads still serving one of the kept query ``heads``; refuses KV heads with unequal query heads."""
    per = n_heads // n_kv
    groups = sorted({h // per for h in heads})
    counts = {g: sum(1 for h in heads if h // per == g) for g in groups}
    if not heads:
        raise MiniGPTError("a plan cannot remove every attention head of a layer")
    if len(set(counts.values())) != 1:
        raise MiniGPTError(f"every KV head must keep as many query heads (kept per KV head: {counts})")
    return groups


def _check(indices: list[int], size: int, what: str) -> None:
    if not indices:
        raise MiniGPTError(f"a plan cannot remove every {what}")
    if sorted(set(indices)) != list(indices) or indices[0] < 0 or indices[-1] >= size:
        raise MiniGPTError(f"kept {what}s must be sorted distinct indices below {size}")


class _Masks:
    """Per (parameter, dimension): which positions stay; per norm parameter: its length before and after."""

    def __init__(self, model):
        self.model, self.keep, self.norms = model, {}, set()

    def apply(self, group: Group, kept: list[int]) -> None:
        items = torch.zeros(group.size, dtype=torch.bool)
        items[torch.tensor(kept, dtype=torch.long)] = True
        for s in group.slices:
            length = self.model.get_parameter(s.param).shape[s.dim]
            mask = self.keep.setdefault((s.param, s.dim), torch.ones(length, dtype=torch.bool))
            mask[s.start: s.start + group.size * s.unit] &= items.repeat_interleave(s.unit)
            if s.norm:
                self.norms.add(s.param)

    def gather(self, gather) -> None:
        """Copy every cut parameter's kept positions: one ``gather`` call per cut dimension count."""
        per_param: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for (param, dim), mask in self.keep.items():
            if not bool(mask.all()):
                per_param.setdefault(param, []).append((dim, mask.nonzero().squeeze(1)))
        scales = {p: self.model.get_parameter(p).shape[0] for p in self.norms if p in per_param}
        while per_param:
            names = list(per_param)
            params = [self.model.get_parameter(n) for n in names]
            cuts = [per_param[n].pop() for n in names]
            srcs = [p.detach() if p.dim() == 2 else p.detach().unsqueeze(1) for p in params]  # the op takes 2-D
            new = gather(srcs, [i.to(p.device) for p, (_, i) in zip(params, cuts)], [d for d, _ in cuts])
            for p, t in zip(params, new):
                p.data = t if p.dim() == 2 else t.squeeze(1)
            per_param = {n: c for n, c in per_param.items() if c}
        with torch.no_grad():
            for name, before in scales.items():
                param = self.model.get_parameter(name)
                owner = self.model.get_submodule(name.rpartition(".")[0])
                offset = norm_offset(owner)
                param.copy_((param.float() + offset).mul_(math.sqrt(before / param.shape[0])).sub_(offset))


def _set_heads(model, arch: Architecture, kept_heads: list[list[int]]) -> None:
    """Per attention module: the head-count attributes its forward reads; the config when counts are uniform."""
    counts = []
    for layer, heads in zip(arch.layers, kept_heads):
        n_kv = len(kv_heads(heads, layer.heads.size, layer.kv.size))
        attn = model.get_submodule(layer.attention)
        values = {"num_heads": len(heads), "num_attention_heads": len(heads), "num_key_value_heads": n_kv,
                  "num_key_value_groups": len(heads) // n_kv, "split_size": len(heads) * layer.head_dim}
        for attr, value in values.items():
            if hasattr(attn, attr):
                setattr(attn, attr, value)
        counts.append((len(heads), n_kv))
    cfg = text_config(model.config)
    n_q, n_kv = max(counts)
    cfg.num_attention_heads = n_q
    if hasattr(cfg, "num_key_value_heads"):
        cfg.num_key_value_heads = n_kv


def _set_hidden(model, arch: Architecture, size: int) -> None:
    """Module attributes and config keys holding the hidden size; Gemma's embedding scale (see module doc)."""
    cfg = text_config(model.config)
    old = cfg.hidden_size
    embed = model.get_input_embeddings()
    if getattr(embed, "scalar_embed_scale", None) and math.isclose(embed.scalar_embed_scale, math.sqrt(old)):
        factor = math.sqrt(old / size)
        with torch.no_grad():
            embed.weight.mul_(factor)
            head = model.get_output_embeddings()
            if head is not None and head.weight is embed.weight:  # tied: the final norm takes the factor back
                final = next(m for m in reversed(list(model.modules())) if getattr(m, "weight", None) is not None
                             and m.weight.dim() == 1 and m.weight.shape[0] == size)
                offset = norm_offset(final)
                final.weight.copy_((final.weight.float() + offset).div_(factor).sub_(offset))
        embed.scalar_embed_scale = math.sqrt(size)
        embed.embed_scale.fill_(math.sqrt(size))
    for module in model.modules():
        for attr in ("hidden_size", "embed_dim"):
            if getattr(module, attr, None) == old and not (attr == "embed_dim" and hasattr(module, "split_size")):
                setattr(module, attr, size)
    for key in HIDDEN_KEYS:
        if getattr(cfg, key, None) == old:
            setattr(cfg, key, size)


def _set_head_dim(model, cfg, head_dim: int, before: dict) -> None:
    """Write ``head_dim`` into the config; where the architecture derives it from hidden / heads instead (GPT-2,
    OPT), put the head counts back: the saved modeling file then carries the pruned counts (``save_pruned``)."""
    cfg.head_dim = head_dim
    base = next(c for c in type(model).__mro__ if c.__name__ != "MiniGPTForCausalLM")
    try:
        with torch.device("meta"):
            stock = base(copy.deepcopy(model.config))
        expressed = describe(stock).layers[0].head_dim == head_dim
    except (ValueError, MiniGPTError):
        expressed = False
    if not expressed:
        for key in HEAD_KEYS:
            if key in before:
                setattr(cfg, key, before[key])
            elif hasattr(cfg, key):
                delattr(cfg, key)


def _drop_layers(model, arch: Architecture, kept: list[int]) -> None:
    """Keep blocks ``kept``, renumbered; the layer count and per-layer config lists shrink."""
    parent_path, _, name = arch.blocks.rpartition(".")
    parent = model.get_submodule(parent_path)
    blocks = getattr(parent, name)
    n = len(blocks)
    setattr(parent, name, nn.ModuleList([blocks[i] for i in kept]))
    for new, block in enumerate(getattr(parent, name)):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    cfg = text_config(model.config)
    for key, value in list(vars(cfg).items()):
        if isinstance(value, list) and len(value) == n:
            setattr(cfg, key, [value[i] for i in kept])
    cfg.num_hidden_layers = len(kept)


def check(arch: Architecture, kept: Kept) -> None:
    """Refuse, in one line, a ``kept`` that does not fit ``arch`` or removes a whole structure."""
    n = len(arch.layers)
    for name, per_layer in (("mlp", kept.mlp), ("heads", kept.heads)):
        if per_layer is not None and len(per_layer) != n:
            raise MiniGPTError(f"plan has {len(per_layer)} layers of {name}, the model has {n}")
    for layer, (groups, neurons) in enumerate(zip(arch.layers, kept.mlp or [None] * n)):
        if neurons is not None:
            _check(neurons, groups.mlp.size, f"MLP neuron of layer {layer}")
    for layer, (groups, heads) in enumerate(zip(arch.layers, kept.heads or [None] * n)):
        if heads is not None:
            if groups.heads is None:
                raise MiniGPTError("this architecture's description has no attention heads to prune")
            _check(heads, groups.heads.size, f"attention head of layer {layer}")
            kv_heads(heads, groups.heads.size, groups.kv.size)
    if kept.hidden is not None:
        if arch.hidden is None:
            raise MiniGPTError(f"this architecture's hidden channels cannot be pruned: {arch.hidden_problem}")
        _check(kept.hidden, arch.hidden.size, "hidden channel")
        need = max(layer.head_dim or 1 for layer in arch.layers)
        if len(kept.hidden) < need:
            raise MiniGPTError(f"keeping {len(kept.hidden)} hidden channels leaves fewer than head_dim = {need}")
        heads = {len(h) for h in kept.heads} if kept.heads is not None else {g.heads.size for g in arch.layers}
        if any(len(kept.hidden) % n for n in heads):
            raise MiniGPTError(f"keeping {len(kept.hidden)} hidden channels: stock configs need a multiple of the "
                               f"attention heads ({sorted(heads)})")
    if kept.layers is not None:
        _check(kept.layers, n, "layer")


def shrink(model, kept: Kept, gather) -> None:
    """Remove from ``model`` (in place) everything ``kept`` does not keep.

    ``gather(srcs, indices, dims) -> list`` copies the kept slices (``minigpt.ops.gather``).
    """
    arch = describe(model)
    check(arch, kept)
    masks = _Masks(model)
    cfg = text_config(model.config)
    before = {k: getattr(cfg, k) for k in HEAD_KEYS if hasattr(cfg, k)}
    for layer, groups in enumerate(arch.layers):
        if kept.mlp is not None:
            masks.apply(groups.mlp, kept.mlp[layer])
        if kept.heads is not None:
            masks.apply(groups.heads, kept.heads[layer])
            masks.apply(groups.kv, kv_heads(kept.heads[layer], groups.heads.size, groups.kv.size))
    if kept.hidden is not None:
        masks.apply(arch.hidden, kept.hidden)
    masks.gather(gather)
    if kept.mlp is not None:
        key = next(k for k in WIDTH_KEYS if k in cfg.to_dict())
        setattr(cfg, key, max(len(k) for k in kept.mlp))
    if kept.heads is not None:
        _set_heads(model, arch, kept.heads)
    if kept.hidden is not None:
        _set_hidden(model, arch, len(kept.hidden))
    if (kept.heads is not None or kept.hidden is not None) and arch.layers[0].head_dim:
        _set_head_dim(model, cfg, arch.layers[0].head_dim, before)
    if kept.layers is not None:
        _drop_layers(model, arch, kept.layers)
    from minigpt.modeling_minigpt import sync_shapes  # builds transformers classes: imported when used

    sync_shapes(model)
