"""Sizing by a quality budget: the largest amount of pruning whose held-out perplexity stays within the budget.

Plans at different amounts come from one calibration; each candidate is pruned (and compensated) on a copy of
the model and scored on held-out documents that the final report does not score: a window of at most
``doc_tokens`` of each of many documents, each scored on its own (after an EOS, or BOS, token).

A candidate passes when an upper confidence bound of its perplexity ratio to the unpruned model's is within the
budget, not just the ratio measured on these documents. With ``Δ_d`` the difference of summed NLL (pruned −
unpruned) on document ``d`` and ``n_d`` its scored tokens, the log ratio is ``r = ΣΔ_d / Σn_d`` and its standard
error over documents (ratio estimator, paired by document) ``se = sqrt(D / (D − 1) · Σ(Δ_d − r n_d)²) / Σn_d``;
the bound is ``exp(r + z · se)`` with ``z`` the normal quantile of ``confidence`` (0.95: 1.645; 0.5: the ratio
measured). It holds for other documents of the same corpus, which a ratio measured on a few cannot promise.
Bisection on the amount assumes the bound grows with it; every measured point is returned.
"""

from __future__ import annotations

import copy
import logging
import math
from statistics import NormalDist

import torch

from minigpt.errors import MiniGPTError
from minigpt.pipeline.data import iter_token_ids

log = logging.getLogger("minigpt")
DOC_TOKENS = 256
"""Tokens scored of each sizing document (a seeded window of a longer one)."""


def sizing_documents(tokenizer, texts, max_tokens: int, doc_tokens: int = DOC_TOKENS) -> list[torch.Tensor]:
    """Token ids ``(n_d,)`` of a ``doc_tokens`` window of each of ``texts``, until ``max_tokens`` in all."""
    docs, total = [], 0
    eos = int(tokenizer.eos_token_id is not None)
    for ids in iter_token_ids(tokenizer, texts, doc_tokens):
        ids = ids[: len(ids) - eos]
        if len(ids) < 2:
            continue
        docs.append(torch.tensor(ids[: max_tokens - total], dtype=torch.long))
        total += docs[-1].numel()
        if total >= max_tokens:
            break
    return docs


@torch.inference_mode()
def document_nll(model, tokenizer, docs: list[torch.Tensor], batch_size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nll, tokens)``, both ``(D,)`` float64: the summed NLL of every token of each document ``docs[d]: (n_d,)``,
    scored after one start token (EOS, else BOS), and how many tokens that is."""
    start = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    device = model.get_input_embeddings().weight.device
    nll, count = [], []
    for i in range(0, len(docs), batch_size):
        group = docs[i: i + batch_size]
        length = max(d.numel() for d in group) + 1
        batch = torch.full((len(group), length), start, dtype=torch.long)
        mask = torch.zeros(len(group), length, dtype=torch.long)
        for row, d in enumerate(group):
            batch[row, 1: d.numel() + 1] = d
            mask[row, : d.numel() + 1] = 1
        logits = model(input_ids=batch.to(device), attention_mask=mask.to(device), use_cache=False).logits
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch[:, 1:].to(device),
                                                   reduction="none").cpu().double() * mask[:, 1:]
        nll.append(losses.sum(1))
        count.append(mask[:, 1:].sum(1).double())
    return torch.cat(nll), torch.cat(count)


def ratio_bound(base: torch.Tensor, pruned: torch.Tensor, tokens: torch.Tensor, z: float) -> tuple[float, float]:
    """``(ratio, upper)``: the perplexity ratio pruned / unpruned over documents with summed NLLs ``base, pruned:
    (D,)`` and ``tokens: (D,)``, and its upper confidence bound ``exp(r + z · se)`` (module doc)."""
    diff = pruned - base
    r = float(diff.sum() / tokens.sum())
    d = diff.numel()
    se = math.sqrt(d / (d - 1) * float(((diff - r * tokens) ** 2).sum())) / float(tokens.sum())
    return math.exp(r), math.exp(r + z * se)


def bootstrap_difference(base: torch.Tensor, other: torch.Tensor, tokens: torch.Tensor, resamples: int = 10_000,
                         seed: int = 0) -> torch.Tensor:
    """``(resamples,)`` bootstrap replicates of the mean per-token NLL difference ``Σ(other_d − base_d) / Σn_d`` over
    documents with summed NLLs ``base, other: (D,)`` and ``tokens: (D,)`` (``document_nll`` of two models on the same
    documents), drawing documents, the independent unit, with replacement; its quantiles are a percentile interval."""
    diff = (other - base).double()
    idx = torch.randint(diff.numel(), (resamples, diff.numel()), generator=torch.Generator().manual_seed(seed))
    return diff[idx].sum(1) / tokens.double()[idx].sum(1)


def size_by_budget(model, tokenizer, docs: list[torch.Tensor], prune_at, *, max_increase: float,
                   confidence: float = 0.95, high: float = 0.9, steps: int = 6) -> dict:
    """The largest ratio in ``[0, high)`` (to ``high / 2**steps``, ``steps`` candidates) whose perplexity ratio to the unpruned model's
    on ``docs`` (``sizing_documents``) is within ``1 + max_increase`` at ``confidence`` (module doc);
    ``prune_at(model_copy, ratio) -> model`` prunes a copy.

    Returns ``{"ratio", "max_increase", "confidence", "base_perplexity", "limit", "tokens", "documents",
    "curve": [{ratio, perplexity, increase, upper_increase}]}`` (``limit``: the perplexity the budget allows
    on these documents). Holds two models at a time (the original and one pruned copy).
    """
    if not max_increase > 0:
        raise MiniGPTError(f"--max-ppl-increase must be > 0 (0.10 = 10 %), got {max_increase}")
    if len(docs) < 2:
        raise MiniGPTError(f"sizing needs at least two held-out documents, got {len(docs)} (more --budget-tokens "
                           "or a larger --eval-data)")
    if not 0.5 <= confidence < 1:
        raise MiniGPTError(f"--budget-confidence must be in [0.5, 1), got {confidence}")
    z = NormalDist().inv_cdf(confidence)
    base, tokens = document_nll(model, tokenizer, docs)
    base_ppl = math.exp(float(base.sum() / tokens.sum()))
    curve = [{"ratio": 0.0, "perplexity": base_ppl, "increase": 0.0, "upper_increase": 0.0}]

    def within(ratio: float) -> bool:
        nll, _ = document_nll(prune_at(copy.deepcopy(model), ratio), tokenizer, docs)
        measured, upper = ratio_bound(base, nll, tokens, z)
        curve.append({"ratio": ratio, "perplexity": base_ppl * measured, "increase": measured - 1,
                      "upper_increase": upper - 1})
        log.info("budget: ratio %.4f → perplexity ×%.4f (bound ×%.4f, budget ×%.4f)", ratio, measured, upper,
                 1 + max_increase)
        return upper <= 1 + max_increase

    good, bad = 0.0, high
    for _ in range(steps):
        mid = round((good + bad) / 2, 6)
        good, bad = (mid, bad) if within(mid) else (good, mid)
    return {"ratio": good, "max_increase": max_increase, "confidence": confidence, "base_perplexity": base_ppl,
            "limit": base_ppl * (1 + max_increase), "tokens": int(tokens.sum()), "documents": len(docs),
            "curve": sorted(curve, key=lambda p: p["ratio"])}
