"""How many tokens ``prune --vocab`` keeps: the fewest whose held-out bits per byte stay within a bound.

Candidates keep the most frequent tokens first (``vocab.plan_vocab`` with ``min_size``), so they are nested; a
bisection over the size finds the smallest one whose bits per byte on held-out text rise by at most
``max_increase`` (``--max-bpb-increase``, default 1 %) over the full vocabulary's, on windows of many held-out
documents that the report's before/after evaluation does not score. A candidate is scored without building the smaller
model: the held-out text is tokenized by the pruned tokenizer, its ids mapped back to the original ones, and the
original model's logits restricted to the kept rows, which is exactly what the shrunk model computes.
"""

from __future__ import annotations

import hashlib
import math
import random

import torch

from minigpt.pipeline import vocab
from minigpt.pipeline.evaluation import documents_after

MAX_INCREASE = 0.01
"""Default bound on the held-out bits-per-byte increase (``--max-bpb-increase``)."""
HELDOUT_BYTES = 1 << 15
"""Held-out text scored for each candidate size, in windows of at most ``DOC_BYTES`` of many documents."""
DOC_BYTES = 1 << 10


def text_window(text: str, max_bytes: int) -> str:
    """Whole lines of ``text``, at most ``max_bytes`` of them, from a line at an offset fixed by the content."""
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    key = hashlib.blake2b(data[:256] + len(data).to_bytes(8, "little"), digest_size=8).digest()
    start = data.rfind(b"\n", 0, random.Random(key).randrange(len(data) - max_bytes + 1)) + 1
    piece = data[start: start + max_bytes]
    end = piece.rfind(b"\n") + 1
    return piece[: end or len(piece)].decode(errors="ignore")


def heldout_texts(tokenizer, data=None, *, skip_tokens: int = 0, skip_doc_tokens: int | None = None,
                  max_bytes: int = HELDOUT_BYTES, doc_bytes: int = DOC_BYTES,
                  text_field: str = "text") -> tuple[list[str], dict]:
    """A ``doc_bytes`` window (whole lines) of each held-out document of ``data`` (default ``stdlib-heldout``)
    after those a report of its first ``skip_tokens`` scores (``evaluation.documents_after``), until
    ``max_bytes``; and a description."""
    texts, size = [], 0
    for text in documents_after(tokenizer, data, skip_tokens, skip_doc_tokens, text_field):
        text = text_window(text, min(doc_bytes, max_bytes - size))
        if text.strip():
            texts.append(text)
            size += len(text.encode())
        if size >= max_bytes - 64:
            break
    return texts, {"data": data or "stdlib-heldout", "skip_tokens": skip_tokens, "documents": len(texts),
                   "bytes": size}


@torch.inference_mode()
def bits_per_byte(model, tokenizer, texts: list[str], keep: torch.Tensor | None = None, seq_len: int = 512) -> float:
    """Bits per UTF-8 byte of ``texts`` under ``model``; with ``keep`` (old ids, ascending), as the model and
    ``tokenizer`` pruned to ``keep`` score them. Each document starts after an EOS (or BOS) and every one of its
    tokens is scored once, with up to ``seq_len - 1`` tokens of context."""
    device = model.get_input_embeddings().weight.device
    pruned = tokenizer if keep is None else vocab.prune_tokenizer(tokenizer, keep)
    old_ids = None if keep is None else torch.as_tensor(keep, dtype=torch.long)
    start = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    nll, total_bytes = 0.0, 0
    for text in texts:
        ids = torch.tensor(pruned(text, add_special_tokens=False)["input_ids"], dtype=torch.long)  # pruned's ids
        inputs = torch.cat([torch.tensor([start]), ids if old_ids is None else old_ids[ids]])  # the model's ids
        for begin in range(0, ids.numel(), seq_len):
            targets = ids[begin : begin + seq_len].to(device)
            window = inputs[None, begin : begin + targets.numel()].to(device)
            logits = model(input_ids=window, use_cache=False).logits[0]
            if old_ids is not None:
                logits = logits[:, old_ids.to(device)]  # the shrunk LM head's rows, in the pruned tokenizer's order
            nll += float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
        total_bytes += len(text.encode())
    return nll / math.log(2) / max(total_bytes, 1)


def choose_vocab(model, tokenizer, counts: torch.Tensor, texts: list[str], *, max_increase: float = MAX_INCREASE,
                 always_keep=(), pad_to: int = 1, min_size: int = 0, resolution: int | None = None):
    """``(keep, report)``: the smallest frequency-ordered kept set whose bits per byte on ``texts`` are at most
    ``(1 + max_increase)`` times the full vocabulary's (bisection down to ``resolution`` tokens, default 1/128
    of the vocabulary). The report holds the chosen size, the measured bits per byte and every size tried."""
    size = len(tokenizer)
    resolution = resolution or max(pad_to, size // 128)
    none_seen = int(torch.as_tensor(counts).max()) + 1  # no token is kept for its count alone: only by rank

    def plan(k: int) -> torch.Tensor:
        return vocab.plan_vocab(tokenizer, counts, min_count=none_seen, always_keep=always_keep, pad_to=pad_to,
                                min_size=k)

    base = bits_per_byte(model, tokenizer, texts)
    tried: dict[int, float] = {}

    def ok(k: int) -> bool:
        keep = plan(k)
        tried[len(keep)] = bits_per_byte(model, tokenizer, texts, keep)
        return tried[len(keep)] <= base * (1 + max_increase)

    lo, hi = max(min_size, len(plan(0))), size  # hi always passes (the whole vocabulary)
    if ok(lo):
        hi = lo
    while hi - lo > resolution:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    keep = plan(hi)
    after = tried.get(len(keep)) or bits_per_byte(model, tokenizer, texts, keep)
    report = {"vocab_chosen": len(keep), "max_increase_pct": 100 * max_increase, "bits_per_byte_full": base,
              "bits_per_byte_kept": after, "increase_pct": 100 * (after / base - 1),
              "tried": {str(k): v for k, v in sorted(tried.items())}}
    return keep, report
