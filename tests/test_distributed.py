"""``torchrun --nproc_per_node=2`` calibration (gloo, CPU) equals one process on the same documents."""

from __future__ import annotations

import pytest
from conftest import tiny_model
from scale_helpers import (
    SEQ_LEN,
    aligned_corpus,
    aligned_tokens,
    assert_stats_equal,
    one_thread,
    run,
    save_model,
    torchrun,
)

from minigpt.cli import main
from minigpt.stats import CalibrationStats

ARGS = ("--seq-len", SEQ_LEN, "--batch-size", 2, "--max-tokens", 10**9, "--no-progress")


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


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
    from minigpt.calibration import _share

    assert [_share(5 * SEQ_LEN, SEQ_LEN, r, 2) for r in range(2)] == [3, 2]  # ⌈max_tokens / seq_len⌉ in all
    assert sum(_share(1000, SEQ_LEN, r, 3) for r in range(3)) == -(-1000 // SEQ_LEN)
    assert _share(None, SEQ_LEN, 1, 2) is None  # no budget: every rank its whole shard
