"""Perplexity (and bits per byte) on held-out text, and parameter counts by part."""

from __future__ import annotations

import math

import torch
from torch import nn

from minigpt.models import adapters
from minigpt.pipeline import moe
from minigpt.pipeline.data import document_window, iter_texts, iter_token_ids, resolve_files


def parameter_counts(model) -> dict[str, int]:
    """Unique parameters (tied weights once): total, mlp, attention, embedding (+ untied LM head), other; for a
    mixture of experts also ``active``, those one token goes through (``moe.moe_parameter_counts``)."""
    owner: dict[int, str] = {}
    if moe.is_moe(model):  # routed experts, routers and shared experts
        mlp_ids = {id(p) for m in moe.moe_layers(model) for part in (m.experts, m.router, m.shared)
                   if part is not None for p in part.parameters()}
    else:
        layout = adapters.get_layout(model)
        mlp_ids = {id(p) for m in adapters.mlps(model) for n in (*layout.rows, *layout.cols)
                   for p in getattr(m, n).parameters()}
    head = model.get_output_embeddings()
    emb_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    emb_ids |= {id(p) for p in (head.parameters() if head is not None else ())}
    attn_ids = {id(p) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in ("self_attn", "attn")
                for p in m.parameters()}
    counts = {"total": 0, "mlp": 0, "attention": 0, "embedding": 0, "other": 0}
    for p in model.parameters():  # parameters() yields each tensor once, so tied weights count once
        if id(p) in owner:
            continue
        part = ("mlp" if id(p) in mlp_ids else "embedding" if id(p) in emb_ids
                else "attention" if id(p) in attn_ids else "other")
        owner[id(p)] = part
        counts[part] += p.numel()
        counts["total"] += p.numel()
    if moe.is_moe(model):
        counts["active"] = moe.moe_parameter_counts(model)["active"]
    return counts


def weight_bytes(model) -> int:
    """Bytes of all unique parameters and buffers."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())


def token_stream(tokenizer, data=None, max_tokens: int = 16384, text_field: str = "text",
                 doc_tokens: int | None = None) -> torch.Tensor:
    """The first ``max_tokens`` token ids of the held-out corpus (documents in file order, EOS between; at most
    ``doc_tokens`` of each document, a seeded window, when given)."""
    files = resolve_files(data, default="stdlib-heldout")
    ids: list[int] = []
    for doc in iter_token_ids(tokenizer, iter_texts(files, text_field, seed=None), doc_tokens):
        ids.extend(doc)
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def documents_after(tokenizer, data=None, skip_tokens: int = 0, skip_doc_tokens: int | None = None,
                    text_field: str = "text"):
    """The held-out documents (texts, file order) after those ``token_stream(tokenizer, data, skip_tokens,
    doc_tokens=skip_doc_tokens)`` takes tokens from: text to size a model on that a report of the first
    ``skip_tokens`` does not score."""
    files = resolve_files(data, default="stdlib-heldout")
    eos = int(tokenizer.eos_token_id is not None)
    seen = 0
    for text in iter_texts(files, text_field, seed=None):
        if seen >= skip_tokens:
            yield text
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        seen += len(document_window(ids, skip_doc_tokens)) + eos


@torch.inference_mode()
def perplexity(model, tokenizer, data=None, *, seq_len: int = 512, stride: int | None = None,
               max_tokens: int = 16384, batch_size: int = 4, text_field: str = "text", doc_tokens: int | None = None,
               progress: bool = False) -> dict:
    """Perplexity over fixed windows of ``seq_len`` moved by ``stride`` (default: non-overlapping).

    Each token after the first is scored once, with up to ``seq_len - 1`` tokens of context.
    Bits per byte = total NLL in bits / UTF-8 bytes of the scored text (comparable across tokenizers).
    ``doc_tokens``: score at most that many tokens of each document, so that ``max_tokens`` spans more documents.
    """
    ids = token_stream(tokenizer, data, max_tokens, text_field, doc_tokens)
    return perplexity_of_ids(model, tokenizer, ids, seq_len=seq_len, stride=stride, batch_size=batch_size,
                             progress=progress)


@torch.inference_mode()
def perplexity_of_ids(model, tokenizer, ids: torch.Tensor, *, seq_len: int = 512, stride: int | None = None,
                      batch_size: int = 4, progress: bool = False) -> dict:
    """``perplexity`` of the token ids ``ids: (T,)`` (the held-out stream ``token_stream`` returns)."""
    stride = stride or seq_len
    if ids.numel() < 2:
        raise ValueError("held-out text has fewer than two tokens")
    device = model.get_input_embeddings().weight.device
    windows, scored_from = [], 1
    for begin in range(0, ids.numel() - 1, stride):
        end = min(begin + seq_len, ids.numel())
        windows.append((begin, end, max(scored_from, begin + 1)))  # a window's first token has no context
        scored_from = end
        if end == ids.numel():
            break
    from tqdm.auto import tqdm

    nll, count = 0.0, 0
    bar = tqdm(total=ids.numel(), unit="tok", unit_scale=True, desc="evaluating", disable=not progress)
    for i in range(0, len(windows), batch_size):
        group = windows[i: i + batch_size]
        length = max(e - b for b, e, _ in group)
        batch = torch.full((len(group), length), tokenizer.pad_token_id or 0, dtype=torch.long)
        weight = torch.zeros(len(group), length - 1)
        for row, (b, e, s) in enumerate(group):
            batch[row, : e - b] = ids[b:e]
            weight[row, s - b - 1: e - b - 1] = 1.0
        mask = (torch.arange(length) < torch.tensor([e - b for b, e, _ in group])[:, None]).long()
        logits = model(input_ids=batch.to(device), attention_mask=mask.to(device), use_cache=False).logits
        losses = nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), batch[:, 1:].to(device), reduction="none"
        ).cpu()
        nll += float((losses * weight).sum())
        count += int(weight.sum())
        bar.update(int(weight.sum()))
    bar.close()
    text_bytes = len(tokenizer.decode(ids[1:].tolist(), skip_special_tokens=True).encode("utf-8"))
    return {
        "perplexity": math.exp(nll / count),
        "nll_per_token": nll / count,
        "tokens": count,
        "bits_per_byte": nll / math.log(2) / max(text_bytes, 1),
        "bytes": text_bytes,
        "tokens_per_byte": (ids.numel() - 1) / max(text_bytes, 1),
        "seq_len": seq_len,
        "stride": stride,
    }


def evaluate(model, tokenizer, data=None, *, reference_params: int | None = None, **ppl_kwargs) -> dict:
    """Perplexity, parameter counts and (given the original's total) relative size in %."""
    params = parameter_counts(model)
    out = {"params": params, "weight_bytes": weight_bytes(model),
           **perplexity(model, tokenizer, data, **ppl_kwargs)}
    if reference_params:
        out["relative_size_pct"] = 100.0 * params["total"] / reference_params
    return out
