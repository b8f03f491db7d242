"""Up-front checks of command-line values: a bad one is refused before any model is loaded or any token read.

``check(args)`` looks at every option a subcommand has (by its ``argparse`` name) and raises one
``MiniGPTError`` naming the flag, the allowed range and the value given.
"""

from __future__ import annotations

import argparse
import math

from minigpt.errors import MiniGPTError

_POSITIVE = (lambda v: v >= 1, "a positive integer")
_NON_NEGATIVE = (lambda v: v >= 0, "≥ 0")
_SEQUENCE = (lambda v: v >= 2, "≥ 2 (a sequence needs an input and a next token)")
_FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")
_STRICT_POSITIVE = (lambda v: v > 0, "> 0")

RULES: dict[str, tuple] = {
    # corpora and calibration
    "max_tokens": _POSITIVE, "doc_tokens": _POSITIVE, "seq_len": _SEQUENCE, "batch_size": _POSITIVE,
    "checkpoint_every": (lambda v: v >= 0, "≥ 0 tokens (0: never)"),
    "eval_tokens": _POSITIVE, "eval_seq_len": _SEQUENCE, "stride": _POSITIVE, "eval_doc_tokens": _POSITIVE,
    # pruning policy
    "ratio": (lambda v: 0 <= v < 1, "in [0, 1) (the fraction of MLP neurons removed)"),
    "threshold": (lambda v: 0 <= v <= 1, "in [0, 1] (normalised scores)"),
    "multiple": _POSITIVE, "min_keep": _FRACTION,
    # vocabulary
    "vocab_min_count": _NON_NEGATIVE, "vocab_tokens": _POSITIVE, "vocab_min_size": _NON_NEGATIVE,
    "vocab_pad_to": _POSITIVE,
    # quality budgets
    "max_ppl_increase": (lambda v: v > 0, "> 0 (0.10 = 10 %)"), "max_bpb_increase": (lambda v: v > 0, "> 0 (0.01 = 1 %)"),
    "budget_tokens": _POSITIVE, "budget_doc_tokens": _POSITIVE,
    "budget_confidence": (lambda v: 0.5 <= v < 1, "in [0.5, 1) (0.5: the measured ratio)"),
    # fine-tuning
    "max_steps": _POSITIVE, "eval_every": _POSITIVE, "grad_accum": _POSITIVE, "lr": _STRICT_POSITIVE,
    "distill_alpha": _FRACTION, "distill_temperature": _STRICT_POSITIVE, "train_tokens": _POSITIVE,
    "train_doc_tokens": _POSITIVE,
    "patience": _NON_NEGATIVE, "target": _STRICT_POSITIVE,
    # mcq, bench
    "count": _POSITIVE, "choices": (lambda v: v >= 2, "≥ 2"),
    "decode_tokens": _POSITIVE, "repeats": _POSITIVE, "warmup": _NON_NEGATIVE,
    "prompt_lengths": _POSITIVE, "batch_sizes": _POSITIVE, "ablation_multiples": _POSITIVE,
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check(args: argparse.Namespace) -> None:
    """Refuse the first option of ``args`` outside its range (NaN and infinities too); lists element-wise."""
    for name, (ok, allowed) in RULES.items():
        value = getattr(args, name, None)
        if value is None or isinstance(value, (bool, str)):
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if (isinstance(v, float) and not math.isfinite(v)) or not ok(v):
                raise MiniGPTError(f"{_flag(name)} must be {allowed} (got {v})")
