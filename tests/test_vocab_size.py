"""Vocabulary size chosen by a measured bound on held-out bits per byte (``minigpt.pipeline.vocab_size``)."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import tiny_model
from scale_helpers import save_model

from minigpt.cli import main
from minigpt.io import load_model
from minigpt.pipeline.vocab import count_tokens, plan_vocab, prune_tokenizer, shrink_vocab
from minigpt.pipeline.vocab_size import bits_per_byte, heldout_texts, text_window

pytestmark = pytest.mark.usefixtures("one_thread")


def test_scoring_a_candidate_equals_the_shrunk_model(tiny_tokenizer):
    """Restricting the original model's logits to the kept rows scores exactly like the pruned model."""
    model = tiny_model("llama")
    texts, _ = heldout_texts(tiny_tokenizer, max_bytes=4096)
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
    texts, held = heldout_texts(tiny_tokenizer, skip_tokens=8192)  # after the report's --eval-tokens
    assert held == report["heldout"] and held["documents"] >= 20
    assert json.loads((out / "minigpt_plan.json").read_text())["policy"]["vocab_budget"]["heldout"] == held
    before = bits_per_byte(*load_model(source), texts)
    after = bits_per_byte(*load_model(out), texts)
    assert after <= before * 1.01
    assert after == pytest.approx(report["bits_per_byte_kept"], rel=1e-5)


def test_max_bpb_increase_sizes_the_vocabulary(tiny_tokenizer, tmp_path, capsys):
    """``--max-bpb-increase 0.05`` alone asks for vocabulary pruning sized by that budget; plan and report record
    it; with ``--vocab-min-count`` (the other way of choosing) it is refused before any work."""
    source = save_model(tiny_model("llama"), tiny_tokenizer, tmp_path / "model")
    common = ["prune", "--model", str(source), "--ratio", "0", "--vocab-tokens", "50000", "--eval-tokens", "512",
              "--no-progress", "--json"]
    assert main([*common, "--max-bpb-increase", "0.05", "--out", str(tmp_path / "out")]) == 0
    report = json.loads(capsys.readouterr().out)["vocab"]
    assert report["max_increase_pct"] == 5.0 and report["increase_pct"] <= 5.0
    assert report["vocab_kept"] < report["vocab_old"] and report["heldout"]["skip_tokens"] == 512
    plan = json.loads((tmp_path / "out" / "minigpt_plan.json").read_text())
    assert plan["policy"]["vocab_budget"]["max_increase_pct"] == 5.0 and len(plan["vocab"]) == report["vocab_kept"]
    assert main([*common, "--max-bpb-increase", "0.05", "--vocab-min-count", "2", "--out", str(tmp_path / "o")]) == 2
    assert "give one of them" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_text_window_takes_whole_lines_of_a_long_document():
    text = "".join(f"line {i} {'x' * (i % 7)}\n" for i in range(2000))
    piece = text_window(text, 1024)
    assert len(piece.encode()) <= 1024 and piece.endswith("\n") and f"\n{piece}" in f"\n{text}"
    assert text_window(text, 1024) == piece and text_window("short\n", 1024) == "short\n"
