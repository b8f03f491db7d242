"""Vocabulary size chosen by a measured bound on held-out bits per byte (``minigpt.vocab_size``)."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import tiny_model
from scale_helpers import save_model

from minigpt.cli import main
from minigpt.io import load_model
from minigpt.vocab import count_tokens, plan_vocab, prune_tokenizer, shrink_vocab
from minigpt.vocab_size import bits_per_byte, heldout_texts

pytestmark = pytest.mark.usefixtures("one_thread")


def test_scoring_a_candidate_equals_the_shrunk_model(tiny_tokenizer):
    """Restricting the original model's logits to the kept rows scores exactly like the pruned model."""
    model = tiny_model("llama")
    texts, _ = heldout_texts(max_bytes=4096)
    counts = count_tokens(tiny_tokenizer, texts, model.get_input_embeddings().num_embeddings)
    keep = plan_vocab(tiny_tokenizer, counts, min_count=3)
    assert len(keep) < len(tiny_tokenizer)
    shrunk = copy.deepcopy(model)
    shrink_vocab(shrunk, keep)
    expected = bits_per_byte(shrunk, prune_tokenizer(tiny_tokenizer, keep), texts, seq_len=64)
    assert bits_per_byte(model, tiny_tokenizer, texts, keep, seq_len=64) == pytest.approx(expected, rel=1e-5)


def test_default_flags_on_stdlib_stay_within_the_bound(tiny_tokenizer, tmp_path, capsys):
    """``prune --vocab`` with every default (stdlib, 1M counted tokens, ≤ 1 %): the saved model and tokenizer
    score the held-out text it names within 1 % of the original's bits per byte, and the report says so."""
    source = save_model(tiny_model("llama"), tiny_tokenizer, tmp_path / "model")
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["prune", "--model", str(source), "--vocab", "--ratio", "0", "--no-progress", "--json",
                 "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)["vocab"]
    assert report["heldout"]["data"] == "stdlib-heldout" and report["counted_tokens"] >= 10**6
    assert report["max_increase_pct"] == 1.0 and report["increase_pct"] <= 1.0
    assert report["vocab_kept"] == report["vocab_chosen"] < report["vocab_old"]
    texts, held = heldout_texts()
    assert held == report["heldout"]
    before = bits_per_byte(*load_model(source), texts)
    after = bits_per_byte(*load_model(out), texts)
    assert after <= before * 1.01
    assert after == pytest.approx(report["bits_per_byte_kept"], rel=1e-5)
