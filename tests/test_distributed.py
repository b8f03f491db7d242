"""``torchrun --nproc_per_node=2`` calibration (gloo, CPU) equals one process on the same documents."""

from __future__ import annotations

import pytest
from conftest import tiny_model
from scale_helpers import (
    SEQ_LEN,
    aligned_corpus,
    aligned_tokens,
    assert_stats_equal,
    run,
    save_model,
    torchrun,
)

from minigpt.cli import main
from minigpt.pipeline.stats import CalibrationStats

ARGS = ("--seq-len", SEQ_LEN, "--batch-size", 2, "--max-tokens", 10**9, "--no-progress")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("dist")
    model = save_model(tiny_model("llama"), tiny_tokenizer, root / "model")
    return model, aligned_corpus(tiny_tokenizer, root / "corpus", docs=13)


def test_two_ranks_equal_one_process(setup, tmp_path, capsys):
    """Each rank streams its own documents (whole text files; every other JSON record) and packs them; with
    documents of whole sequences the two shards together are exactly the single process's sequences."""
    model, corpus = setup
    single = tmp_path / "single.safetensors"
    assert main(["calibrate", "--model", str(model), "--data", str(corpus), *map(str, ARGS), "--out", str(single)]) == 0
    dist = tmp_path / "dist.safetensors"
    # a checkpoint round after every batch: ranks with fewer batches keep joining the others' rounds
    done = run(torchrun(2, "calibrate", "--model", model, "--data", corpus, *ARGS, "--checkpoint-every", 1,
                        "--out", dist))
    assert done.returncode == 0, done.stderr
    assert "over 2 ranks" in done.stdout and done.stdout.count("wrote") == 1  # rank 0 alone writes
    a, b = CalibrationStats.load(single), CalibrationStats.load(dist)
    assert a.tokens == aligned_tokens(corpus)
    assert_stats_equal(b, a, exact=False)
    per_rank = b.meta["sequences_per_rank"]
    assert len(per_rank) == 2 and min(per_rank) > 0 and sum(per_rank) * SEQ_LEN == a.tokens
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist.safetensors", "single.safetensors"]  # no checkpoint


def test_max_tokens_is_split_between_ranks():
    from minigpt.pipeline.calibration import _share

    assert [_share(5 * SEQ_LEN, SEQ_LEN, r, 2) for r in range(2)] == [3, 2]  # ⌈max_tokens / seq_len⌉ in all
    assert sum(_share(1000, SEQ_LEN, r, 3) for r in range(3)) == -(-1000 // SEQ_LEN)
    assert _share(None, SEQ_LEN, 1, 2) is None  # no budget: every rank its whole shard


def test_device_map_with_offloaded_layers(setup, tmp_path, tiny_tokenizer):
    """A model dispatched by accelerate (embedding and layer 1 offloaded to disk: meta weights, hooks moving them
    in) calibrates to the same statistics; ``--device-map auto`` loads through the same path."""
    from transformers import AutoModelForCausalLM

    import minigpt

    model_dir, corpus = setup
    kwargs = {"max_tokens": 8 * SEQ_LEN, "seq_len": SEQ_LEN, "batch_size": 2, "progress": False}
    plain = minigpt.calibrate(minigpt.load_model(model_dir)[0], tiny_tokenizer, [str(corpus)], **kwargs)
    device_map = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    spread = AutoModelForCausalLM.from_pretrained(model_dir, device_map=device_map, offload_folder=tmp_path / "off")
    assert spread.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    assert_stats_equal(minigpt.calibrate(spread, tiny_tokenizer, [str(corpus)], **kwargs), plain, exact=True)
    out = tmp_path / "auto.safetensors"
    assert main(["calibrate", "--model", str(model_dir), "--data", str(corpus), "--device-map", "auto",
                 "--seq-len", str(SEQ_LEN), "--batch-size", "2", "--max-tokens", str(8 * SEQ_LEN), "--no-progress",
                 "--out", str(out)]) == 0
    assert_stats_equal(CalibrationStats.load(out), plain, exact=True)


def _stdlib_text(nbytes: int) -> str:
    """At least ``nbytes`` of real text: standard-library sources joined by blank lines, in a fixed order."""
    from conftest import STDLIB

    parts, size = [], 0
    for path in sorted(STDLIB.glob("*.py")):
        text = path.read_text(errors="replace")
        parts.append(text)
        size += len(text.encode())
        if size >= nbytes:
            return "\n\n".join(parts)
    raise AssertionError("the standard library is smaller than asked")


def _one_file(root):
    (root / "big.txt").write_text(_stdlib_text(int(2.5 * (1 << 20))))  # three pieces of about 1 MiB
    return root / "big.txt"


def _three_files(root):
    """Three documents of different lengths: the ranks' round-robin shares are unequal, so ranks rebalance."""
    from conftest import STDLIB

    for name in ("bisect.py", "textwrap.py", "heapq.py"):
        (root / f"{name}.txt").write_text((STDLIB / name).read_text())
    return root


def _many_files(root):
    text = _stdlib_text(600_000)
    for i in range(1000):
        (root / f"f{i:04d}.txt").write_text(text[i * 500 : (i + 1) * 500 + 300])
    return root


def _kept_agreement(a: CalibrationStats, b: CalibrationStats) -> float:
    """Share of the neurons an l1 20 % plan of ``a`` keeps that the plan of ``b`` keeps too."""
    from minigpt.pipeline.planning import plan

    kept_a, kept_b = (plan(s, "l1", ratio=0.2).kept for s in (a, b))
    return sum(len(set(x) & set(y)) for x, y in zip(kept_a, kept_b)) / sum(len(x) for x in kept_a)


@pytest.mark.parametrize("corpus, budget, rebalanced", [(_one_file, 8192, False), (_three_files, 18432, True),
                                                        (_many_files, 8192, False)])
def test_every_rank_works_on_the_exact_budget(corpus, budget, rebalanced, setup, tmp_path):
    """One big file (split into pieces), three files of unequal length, 1,000 small files: two ranks calibrate on
    exactly the budget (rounded up to whole sequences), both take part, and the plans agree with one process's.
    With three files the rank holding only textwrap (~8.4k tokens) runs out before its half of 18,432 tokens:
    the other rank calibrates the rest."""
    model, _ = setup
    (tmp_path / "corpus").mkdir()
    data = corpus(tmp_path / "corpus")
    args = ("--seq-len", SEQ_LEN, "--batch-size", 4, "--max-tokens", budget - 5, "--no-progress")
    single, dist = tmp_path / "single.safetensors", tmp_path / "dist.safetensors"
    assert main(["calibrate", "--model", str(model), "--data", str(data), *map(str, args), "--out", str(single)]) == 0
    done = run(torchrun(2, "calibrate", "--model", model, "--data", data, *args, "--out", dist))
    assert done.returncode == 0, done.stderr
    a, b = CalibrationStats.load(single), CalibrationStats.load(dist)
    assert a.tokens == b.tokens == budget == b.meta["tokens_requested"]  # budget - 5, rounded up
    per_rank = b.meta["sequences_per_rank"]
    assert len(per_rank) == 2 and min(per_rank) > 0
    assert (max(per_rank) - min(per_rank) > 1) == rebalanced
    assert _kept_agreement(a, b) >= 0.95


def test_short_corpus_warns_with_the_numbers(setup, tmp_path):
    model, corpus = setup
    have = aligned_tokens(corpus) // SEQ_LEN * SEQ_LEN
    done = run(torchrun(2, "calibrate", "--model", model, "--data", corpus, "--seq-len", SEQ_LEN, "--max-tokens",
                        10 * have, "--no-progress", "--out", tmp_path / "s.safetensors"))
    assert done.returncode == 0, done.stderr
    assert f"the corpus supplied {have} of the {10 * have} calibration tokens asked" in done.stderr
    assert CalibrationStats.load(tmp_path / "s.safetensors").tokens == have


def test_a_rank_with_nothing_is_an_error_before_any_token(setup, tmp_path):
    model, _ = setup
    (tmp_path / "one.txt").write_text(_stdlib_text(10_000))
    done = run(torchrun(2, "calibrate", "--model", model, "--data", tmp_path / "one.txt", "--seq-len", SEQ_LEN,
                        "--max-tokens", 1024, "--no-progress", "--out", tmp_path / "s.safetensors"))
    assert done.returncode != 0
    assert "minigpt: error: the corpus is 1 document(s) for 2 ranks, so rank 1 would get nothing" in done.stderr
    assert not (tmp_path / "s.safetensors").exists()
