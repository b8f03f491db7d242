"""The ``minigpt`` command on a tiny saved model: the happy path, and every bad input of the end-to-end issue."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model

from minigpt.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


CAL = ("--seq-len", "32", "--max-tokens", "128", "--no-progress")
EVAL = ("--eval-tokens", "256", "--eval-seq-len", "64")


def test_calibrate_prune_eval(model_dir, corpus_dir, tmp_path, capsys):
    stats = tmp_path / "stats.safetensors"
    code, out, _ = _run(capsys, "calibrate", "--model", model_dir, "--data", corpus_dir, *CAL, "--out", stats)
    assert code == 0 and "128 tokens" in out and "backend" in out
    pruned = tmp_path / "pruned"
    code, out, _ = _run(capsys, "prune", "--model", model_dir, "--stats", stats, "--ratio", "0.25", "--out", pruned,
                        "--eval-data", corpus_dir, *EVAL)
    assert code == 0 and "| perplexity |" in out and "removed 25.0% of MLP neurons" in out
    plan = json.loads((pruned / "minigpt_plan.json").read_text())
    assert plan["kept_widths"] == [36, 36]
    code, out, _ = _run(capsys, "eval", "--model", pruned, "--data", corpus_dir, *EVAL, "--json")
    report = json.loads(out)
    assert code == 0 and report["tokens"] == 255 - 3 and report["perplexity"] > 1  # 4 windows, first tokens unscored


def _assert_clean_failure(code, err, tmp_path, match):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minigpt: error:") and match in lines[0], err
    assert not [p for p in tmp_path.rglob("*partial*")], "a half-written output was left behind"


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing-model", "does not exist"),
        ("missing-data", "does not exist"),
        ("empty-corpus", "corpus too small: 0 tokens"),
        ("short-corpus", "fewer than one sequence"),
        ("empty-dir", "holds no files"),
        ("bad-ratio", "ratio must be in [0, 1)"),
        ("bad-threshold", "threshold must be in [0, 1]"),
        ("out-exists", "already exists"),
        ("out-is-source", "already exists"),
        ("out-inside-source", "inside the source model"),
    ],
)
def test_bad_input_fails_in_one_line(case, match, model_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "out"
    data, model, extra = corpus_dir, model_dir, ["--ratio", "0.2"]
    if case == "missing-model":
        model = tmp_path / "nope"
    elif case == "missing-data":
        data = tmp_path / "nope.txt"
    elif case == "empty-corpus":
        data = tmp_path / "empty.txt"
        data.write_text("")
    elif case == "short-corpus":
        data = tmp_path / "short.txt"
        data.write_text("x = 1\n")
    elif case == "empty-dir":
        data = tmp_path / "empty"
        data.mkdir()
    elif case == "bad-ratio":
        extra = ["--ratio", "1.5"]
    elif case == "bad-threshold":
        extra = ["--threshold", "-1"]
    elif case == "out-exists":
        out.mkdir()
    elif case == "out-is-source":
        out = model_dir
    elif case == "out-inside-source":
        out = model_dir / "pruned"
    code, _, err = _run(capsys, "prune", "--model", model, "--data", data, *CAL, *extra, "--out", out, "--no-eval")
    _assert_clean_failure(code, err, tmp_path, match)
    if case not in ("out-exists", "out-is-source"):
        assert not out.exists()


def test_stats_from_another_model_refused(model_dir, corpus_dir, tmp_path, tiny_tokenizer, capsys):
    other = tmp_path / "other"
    tiny_model("llama", tied=True).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    stats = tmp_path / "other.safetensors"
    assert _run(capsys, "calibrate", "--model", other, "--data", corpus_dir, *CAL, "--out", stats)[0] == 0
    code, _, err = _run(capsys, "prune", "--model", model_dir, "--stats", stats, "--out", tmp_path / "out", "--no-eval")
    _assert_clean_failure(code, err, tmp_path, "collected on another model")


def test_unsupported_architecture_and_corrupt_stats(corpus_dir, tmp_path, tiny_tokenizer, capsys):
    from transformers import BertConfig, BertLMHeadModel

    bert = tmp_path / "bert"
    BertLMHeadModel(BertConfig(vocab_size=512, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, is_decoder=True)).save_pretrained(bert)
    tiny_tokenizer.save_pretrained(bert)
    code, _, err = _run(capsys, "calibrate", "--model", bert, "--data", corpus_dir, *CAL, "--out", tmp_path / "s")
    _assert_clean_failure(code, err, tmp_path, "unsupported model_type 'bert'")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    code, _, err = _run(capsys, "prune", "--model", bert, "--stats", bad, "--out", tmp_path / "o", "--no-eval")
    _assert_clean_failure(code, err, tmp_path, "corrupted")


def test_prune_with_vocab_saves_a_stock_loadable_smaller_vocabulary(model_dir, corpus_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "pruned-vocab"
    code, text, _ = _run(capsys, "prune", "--model", model_dir, "--data", corpus_dir, *CAL, "--ratio", "0.25",
                         "--max-bpb-increase", "0.05", "--out", out, "--eval-data", corpus_dir, *EVAL)
    assert code == 0 and "vocabulary: kept" in text and "| bits per byte |" in text and "| tokens per byte |" in text
    report = json.loads((out / "minigpt_report.json").read_text())
    kept = report["vocab"]["vocab_kept"]
    assert 256 < kept < 512
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == kept == len(tokenizer)
    text = "def g(y):\n    return [y, 'ünïcode ✓']\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_vocab_counted_by_tokenizer_alone_with_min_size(model_dir, corpus_dir, tmp_path, tiny_tokenizer, capsys):
    import torch

    import minigpt
    from minigpt.pipeline.vocab import corpus_token_counts

    counts = corpus_token_counts(tiny_tokenizer, str(corpus_dir), 2048, 512, progress=False)
    stats = minigpt.calibrate(tiny_model("llama"), tiny_tokenizer, str(corpus_dir), max_tokens=2048, seq_len=1024,
                              batch_size=2, progress=False)
    assert torch.equal(counts, stats.token_counts)  # the tokens a calibration sees, without the forward pass

    out = tmp_path / "pruned-vocab-min"
    code, _, _ = _run(capsys, "prune", "--model", model_dir, "--data", corpus_dir, *CAL, "--ratio", "0.25",
                      "--vocab", "--vocab-min-count", "1", "--vocab-tokens", "2048", "--vocab-min-size", "480",
                      "--vocab-pad-to", "8",
                      "--out", out, "--no-eval")
    assert code == 0
    report = json.loads((out / "minigpt_report.json").read_text())
    assert 480 <= report["vocab"]["vocab_kept"] < 512 and report["vocab"]["vocab_kept"] % 8 == 0


def test_vocabulary_only_prune_needs_no_calibration(model_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "vocab-only"
    code, text, _ = _run(capsys, "prune", "--model", model_dir, "--data", corpus_dir, "--ratio", "0", "--vocab",
                         "--vocab-tokens", "2048", "--out", out, "--no-eval")
    assert code == 0 and "removed 0.0% of MLP neurons" in text
    report = json.loads((out / "minigpt_report.json").read_text())
    assert report["plan"]["tokens"] == 0 and report["kept_widths"] == [48, 48]  # no calibration pass ran
    assert report["plan"]["metric"] == "l1" and report["plan"]["ratio"] == 0  # the policy asked for
