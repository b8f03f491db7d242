"""Resumable calibration: a run SIGKILLed after a checkpoint and resumed ends with an uninterrupted run's stats."""

from __future__ import annotations

import signal
import time

import pytest
from conftest import tiny_model
from scale_helpers import (
    SEQ_LEN,
    aligned_corpus,
    assert_stats_equal,
    kill_after_checkpoint,
    minigpt,
    popen_with_default_sigint,
    run,
    save_model,
    torchrun,
)

from minigpt.cli import main
from minigpt.pipeline.stats import CalibrationStats

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    return save_model(tiny_model("llama"), tiny_tokenizer, tmp_path_factory.mktemp("resume") / "model")


def _kill_after_checkpoints(cmd: list[str], checkpoint, out, settle: float = 0.2) -> CalibrationStats:
    """``kill_after_checkpoint``; the checkpoint it left."""
    kill_after_checkpoint(cmd, checkpoint, out, settle)
    return CalibrationStats.load(checkpoint)


def _calibrate(*argv) -> int:
    return main(["calibrate", *map(str, argv)])


def test_sigkill_then_resume_equals_uninterrupted(model_dir, corpus_dir, tmp_path):
    args = ("--model", model_dir, "--data", corpus_dir, "--seq-len", SEQ_LEN, "--batch-size", 1,
            "--max-tokens", 400 * SEQ_LEN, "--no-progress")
    whole = tmp_path / "whole.safetensors"
    assert _calibrate(*args, "--checkpoint-every", 0, "--out", whole) == 0

    out, checkpoint = tmp_path / "out.safetensors", tmp_path / "out.safetensors.ckpt"
    saved = _kill_after_checkpoints(minigpt("calibrate", *args, "--checkpoint-every", SEQ_LEN, "--out", out),
                                    checkpoint, out)
    assert 0 < saved.tokens < 400 * SEQ_LEN
    assert _calibrate(*args, "--checkpoint-every", SEQ_LEN, "--out", out) == 2  # refuses to overwrite progress
    assert CalibrationStats.load(checkpoint).tokens == saved.tokens
    assert _calibrate(*args, "--checkpoint-every", SEQ_LEN, "--out", out, "--resume") == 0
    # the same fp32 batch sums folded into the same fp64 totals in the same order: bit for bit
    assert_stats_equal(CalibrationStats.load(out), CalibrationStats.load(whole), exact=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "whole.safetensors"]


def test_ctrl_c_keeps_the_checkpoint_and_says_so(model_dir, corpus_dir, tmp_path):
    """Ctrl-C after a checkpoint: exit 130, one line naming the checkpoint it kept, and --resume finishes the run."""
    args = ("--model", model_dir, "--data", corpus_dir, "--seq-len", SEQ_LEN, "--batch-size", 1,
            "--max-tokens", 400 * SEQ_LEN, "--checkpoint-every", SEQ_LEN, "--no-progress")
    out, checkpoint = tmp_path / "out.safetensors", tmp_path / "out.safetensors.ckpt"
    proc = popen_with_default_sigint(minigpt("calibrate", *args, "--out", out))
    deadline = time.monotonic() + 240
    while not checkpoint.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1].strip().splitlines()
    assert proc.returncode == 130 and not out.exists(), err
    assert err == [f"minigpt: interrupted; kept 1 finished output (last: {checkpoint}), nothing partial"], err
    assert _calibrate(*args, "--out", out, "--resume") == 0 and CalibrationStats.load(out).tokens == 400 * SEQ_LEN


def test_checkpoint_of_another_run_is_refused(model_dir, corpus_dir, tmp_path, capsys):
    args = ("--model", model_dir, "--data", corpus_dir, "--batch-size", 1, "--no-progress")
    out, checkpoint = tmp_path / "out.safetensors", tmp_path / "out.safetensors.ckpt"
    saved = _kill_after_checkpoints(minigpt("calibrate", *args, "--seq-len", SEQ_LEN, "--max-tokens", 400 * SEQ_LEN,
                                            "--checkpoint-every", SEQ_LEN, "--out", out), checkpoint, out, settle=0)
    capsys.readouterr()
    assert _calibrate(*args, "--seq-len", 2 * SEQ_LEN, "--max-tokens", 400 * SEQ_LEN, "--out", out, "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "belongs to another run (seq_len was 32, now 64)" in err[0]
    assert CalibrationStats.load(checkpoint).tokens == saved.tokens and not out.exists()  # nothing lost


def test_two_ranks_sigkill_then_resume(model_dir, tiny_tokenizer, tmp_path):
    """Both workers and torchrun SIGKILLed after a checkpoint (summed stats + each rank's position), then resumed
    under torchrun: the statistics of one uninterrupted process on the same documents (see test_distributed)."""
    corpus = aligned_corpus(tiny_tokenizer, tmp_path / "corpus", docs=300, seed=1)
    args = ("--model", model_dir, "--data", corpus, "--seq-len", SEQ_LEN, "--batch-size", 1, "--max-tokens", 10**9,
            "--no-progress")
    whole = tmp_path / "whole.safetensors"
    assert _calibrate(*args, "--out", whole) == 0
    out, checkpoint = tmp_path / "out.safetensors", tmp_path / "out.safetensors.ckpt"
    saved = _kill_after_checkpoints(torchrun(2, "calibrate", *args, "--checkpoint-every", 1, "--out", out),
                                    checkpoint, out)
    positions = saved.meta["checkpoint"]["positions"]
    assert min(positions) > 0 and sum(positions) * SEQ_LEN == saved.tokens < CalibrationStats.load(whole).tokens
    done = run(torchrun(2, "calibrate", *args, "--checkpoint-every", 1, "--out", out, "--resume"))
    assert done.returncode == 0, done.stderr
    assert_stats_equal(CalibrationStats.load(out), CalibrationStats.load(whole), exact=False)
    assert not checkpoint.exists() and not list(tmp_path.glob("*partial*"))
