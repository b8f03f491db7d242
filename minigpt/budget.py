"""Sizing by a quality budget: the largest amount of pruning whose held-out perplexity stays within the budget.

Plans at different amounts come from one calibration; each candidate is pruned (and compensated) on a copy of
the model and scored on held-out token ids that the final report does not use. Bisection on the amount assumes
perplexity grows with it; every measured point is returned, so the curve shows where that holds.
"""

from __future__ import annotations

import copy
import logging

from minigpt.errors import MiniGPTError
from minigpt.evaluation import perplexity_of_ids

log = logging.getLogger("minigpt")


def size_by_budget(model, tokenizer, ids, prune_at, *, max_increase: float, high: float = 0.9, steps: int = 6,
                   seq_len: int = 512) -> dict:
    """The largest ratio in ``[0, high]`` (to ``high / 2**steps``) whose perplexity on ``ids: (T,)`` is at most
    ``(1 + max_increase)`` × the unpruned model's; ``prune_at(model_copy, ratio) -> model`` prunes a copy.

    Returns ``{"ratio", "max_increase", "base_perplexity", "limit", "tokens", "curve": [{ratio, perplexity}]}``.
    Holds two models at a time (the original and one pruned copy).
    """
    if not max_increase > 0:
        raise MiniGPTError(f"--max-ppl-increase must be > 0 (0.10 = 10 %), got {max_increase}")
    score = lambda m: perplexity_of_ids(m, tokenizer, ids, seq_len=seq_len)["perplexity"]
    base = score(model)
    limit = base * (1 + max_increase)
    curve = [{"ratio": 0.0, "perplexity": base}]

    def within(ratio: float) -> bool:
        ppl = score(prune_at(copy.deepcopy(model), ratio))
        curve.append({"ratio": ratio, "perplexity": ppl})
        log.info("budget: ratio %.4f → perplexity %.3f (limit %.3f)", ratio, ppl, limit)
        return ppl <= limit

    good, bad = 0.0, high
    if within(high):
        good = high
    else:
        for _ in range(steps):
            mid = round((good + bad) / 2, 6)
            good, bad = (mid, bad) if within(mid) else (good, mid)
    return {"ratio": good, "max_increase": max_increase, "base_perplexity": base, "limit": limit,
            "tokens": int(ids.numel()), "curve": sorted(curve, key=lambda p: p["ratio"])}
