"""The real SmolLM2-135M on real code: 20 % of MLP neurons removed by mean L1 keeps held-out perplexity."""

from __future__ import annotations

import pytest
import torch

import minigpt
from minigpt.pipeline.evaluation import parameter_counts, perplexity

pytestmark = pytest.mark.slow


def test_smollm2_l1_20pct_keeps_code_perplexity(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = minigpt.load_model()  # a private copy (pruned in place), loaded as the CLI loads it
    base_params = parameter_counts(model)["total"]
    base = perplexity(model, tokenizer, "stdlib-heldout", max_tokens=4096)
    stats = minigpt.calibrate(model, tokenizer, "stdlib", max_tokens=8192, seq_len=512, batch_size=4,
                              progress=False)
    assert stats.tokens >= 8192
    model, plan = minigpt.prune(model, tokenizer, stats=stats, metric="l1", ratio=0.2)
    assert plan.kept_widths == [1536 - 307] * 30
    out = minigpt.save_pruned(model, tokenizer, tmp_path / "smollm2-pruned", plan=plan)

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    params = parameter_counts(reloaded)["total"]
    assert params <= 0.89 * base_params, f"{params / base_params:.3f} of the original"
    after = perplexity(reloaded, reloaded_tok, "stdlib-heldout", max_tokens=4096)
    assert after["tokens"] == base["tokens"]
    assert after["perplexity"] <= 1.6 * base["perplexity"], (base["perplexity"], after["perplexity"])
