"""Remove the items of every group a plan drops, for every architecture, from its description alone.

Every cut parameter is copied once by one ``gather`` call (a second call for parameters cut in two dimensions,
e.g. ``down_proj`` losing neurons and hidden channels); the parameters keep their identity (``param.data`` is
replaced), so tied embeddings stay tied. Then blocks are dropped, module attributes and the config updated.
``cuts`` gives what happens to each parameter as data (kept positions per dimension, then rescales): the
out-of-core path (``minigpt.pipeline.sharded``) applies the same cuts to one stored tensor at a time.

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

from minigpt.errors import MiniGPTError
from minigpt.models.architecture import Architecture, Group, describe, norm_offset, text_config

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


@dataclass
class Cut:
    """What pruning does to one parameter: ``index[dim]`` the kept positions (sorted) of every cut dimension, then
    ``scales`` in order, each ``(offset, factor)`` applied as ``(p + offset)·factor − offset`` in fp32 (the
    RMSNorm rule and Gemma's embedding scale, module doc)."""

    index: dict[int, torch.Tensor]
    scales: list[tuple[float, float]]

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """The pruned copy of ``t`` (the parameter's original value), as ``shrink`` computes it in memory."""
        for dim, kept in self.index.items():
            t = t.index_select(dim, kept)
        return rescale(t, self.scales)


def rescale(t: torch.Tensor, scales: list[tuple[float, float]]) -> torch.Tensor:
    """``t`` after every ``(offset, factor)`` of ``scales`` (see ``Cut``), in ``t``'s dtype."""
    for offset, factor in scales:
        t = (t.float() + offset).mul_(factor).sub_(offset).to(t.dtype)
    return t


def _masks(model, groups: list[tuple[Group, list[int]]]) -> tuple[dict, set]:
    """Per (parameter, dimension): which positions stay; the norm parameters among them."""
    keep, norms = {}, set()
    for group, kept in groups:
        items = torch.zeros(group.size, dtype=torch.bool)
        items[torch.tensor(kept, dtype=torch.long)] = True
        for s in group.slices:
            length = model.get_parameter(s.param).shape[s.dim]
            mask = keep.setdefault((s.param, s.dim), torch.ones(length, dtype=torch.bool))
            mask[s.start: s.start + group.size * s.unit] &= items.repeat_interleave(s.unit)
            if s.norm:
                norms.add(s.param)
    return keep, norms


def cuts(model, kept: Kept, arch: Architecture | None = None) -> dict[str, Cut]:
    """Parameter name → its ``Cut``, for every parameter of the (unpruned) ``model`` that ``kept`` changes.

    Layer removal is not a cut: dropped blocks' parameters keep their cuts, renumbering is ``_drop_layers``'.
    """
    arch = arch or describe(model)
    check(arch, kept)
    groups = []
    for layer, lg in enumerate(arch.layers):
        if kept.mlp is not None:
            groups.append((lg.mlp, kept.mlp[layer]))
        if kept.heads is not None:
            groups += [(lg.heads, kept.heads[layer]),
                       (lg.kv, kv_heads(kept.heads[layer], lg.heads.size, lg.kv.size))]
    if kept.hidden is not None:
        groups.append((arch.hidden, kept.hidden))
    keep, norms = _masks(model, groups)
    out: dict[str, Cut] = {}
    for (param, dim), mask in keep.items():
        if not bool(mask.all()):
            out.setdefault(param, Cut({}, [])).index[dim] = mask.nonzero().squeeze(1)
    for name in norms & set(out):
        before, after = model.get_parameter(name).shape[0], len(out[name].index[0])
        out[name].scales.append((norm_offset(model.get_submodule(name.rpartition(".")[0])),
                                 math.sqrt(before / after)))
    if kept.hidden is not None:
        _embedding_scales(model, len(kept.hidden), out)
    return out


def _embedding_scales(model, size: int, out: dict[str, Cut]) -> None:
    """Gemma's embedding scale √hidden becomes √hidden' (module doc): the embedding's and a tied model's final
    norm's ``scales``."""
    old = text_config(model.config).hidden_size
    embed = model.get_input_embeddings()
    if not (getattr(embed, "scalar_embed_scale", None) and math.isclose(embed.scalar_embed_scale, math.sqrt(old))):
        return
    names = {id(p): n for n, p in model.named_parameters()}
    factor = math.sqrt(old / size)
    out[names[id(embed.weight)]].scales.append((0.0, factor))
    head = model.get_output_embeddings()
    if head is not None and head.weight is embed.weight:  # tied: the final norm takes the factor back
        final = next(m for m in reversed(list(model.modules())) if getattr(m, "weight", None) is not None
                     and m.weight.dim() == 1 and m.weight.shape[0] == old)
        out[names[id(final.weight)]].scales.append((norm_offset(final), 1 / factor))


def _gather(model, plan: dict[str, Cut], gather) -> None:
    """Apply ``plan`` to ``model``'s parameters in place: one ``gather`` call per cut dimension count."""
    per_param = {name: list(cut.index.items()) for name, cut in plan.items() if cut.index}
    while per_param:
        names = list(per_param)
        params = [model.get_parameter(n) for n in names]
        cut = [per_param[n].pop() for n in names]
        srcs = [p.detach() if p.dim() == 2 else p.detach().unsqueeze(1) for p in params]  # the op takes 2-D
        new = gather(srcs, [i.to(p.device) for p, (_, i) in zip(params, cut)], [d for d, _ in cut])
        for p, t in zip(params, new):
            p.data = t if p.dim() == 2 else t.squeeze(1)
        per_param = {n: c for n, c in per_param.items() if c}
    with torch.no_grad():
        for name, c in plan.items():
            if c.scales:
                param = model.get_parameter(name)
                param.copy_(rescale(param.detach(), c.scales))


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
    """Module attributes and config keys holding the hidden size; Gemma's embedding scale (the weights' share is
    ``_embedding_scales``')."""
    cfg = text_config(model.config)
    old = cfg.hidden_size
    embed = model.get_input_embeddings()
    if getattr(embed, "scalar_embed_scale", None) and math.isclose(embed.scalar_embed_scale, math.sqrt(old)):
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
    cfg = text_config(model.config)
    before = {k: getattr(cfg, k) for k in HEAD_KEYS if hasattr(cfg, k)}
    _gather(model, cuts(model, kept, arch), gather)
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
    from minigpt.models.modeling_minigpt import sync_shapes  # builds transformers classes: imported when used

    sync_shapes(model)
