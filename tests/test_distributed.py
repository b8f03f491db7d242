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
from minigpt.stats import CalibrationStats

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
    from minigpt.calibration import _share

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
