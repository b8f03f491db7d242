"""Helpers of the scale-and-reliability tests: saved tiny models, aligned corpora, subprocesses, stats equality."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import torch

from minigpt.pipeline.stats import CalibrationStats

SEQ_LEN = 32


def save_model(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def aligned_corpus(tokenizer, root: Path, docs: int, seed: int = 0, text_files: int = 4) -> Path:
    """Documents of exactly ``k·SEQ_LEN`` tokens with their EOS, so packing never crosses a document boundary.

    Then any split of the documents between ranks packs into the same set of sequences as one process does.
    Words are single-token (``" word"`` encodes to one id); the first ``text_files`` documents are plain-text
    files (the ranks split files), the rest JSON lines in one file (the ranks split its records).
    """
    words = [w[1:] for w, i in tokenizer.get_vocab().items()
             if w.startswith("Ġ") and w[1:].isalpha() and tokenizer(" " + w[1:], add_special_tokens=False)["input_ids"] == [i]]
    assert len(words) > 20, "the tiny tokenizer has too few single-token words"
    rng = random.Random(seed)
    root.mkdir(parents=True)
    texts = []
    for _ in range(docs):
        text = "".join(" " + rng.choice(words) for _ in range(rng.randint(1, 3) * SEQ_LEN - 1))
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == len(text.split())
        texts.append(text)
    for i, text in enumerate(texts[:text_files]):
        (root / f"doc{i}.txt").write_text(text)
    (root / "rest.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[text_files:]))
    return root


def aligned_tokens(root: Path) -> int:
    """Tokens of the aligned corpus (words + one EOS per document)."""
    texts = [p.read_text() for p in root.glob("*.txt")]
    texts += [json.loads(line)["text"] for line in (root / "rest.jsonl").read_text().splitlines()]
    return sum(len(t.split()) + 1 for t in texts)


def worker_env() -> dict:
    """Environment of minigpt subprocesses: one thread each, this checkout importable."""
    root = Path(__file__).resolve().parents[1]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "TRANSFORMERS_VERBOSITY": "error"}


def torchrun(nproc: int, *argv) -> list[str]:
    """README's command: ``torchrun --nproc_per_node N -m minigpt.cli ...`` (standalone: a free port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "minigpt.cli", *map(str, argv)]


def minigpt(*argv) -> list[str]:
    return [sys.executable, "-m", "minigpt.cli", *map(str, argv)]


def popen_with_default_sigint(cmd: list[str]) -> subprocess.Popen:
    """Start ``cmd`` (text pipes) with Ctrl-C as in a terminal. A shell running the tests in the background makes
    them ignore SIGINT, and an ignored signal stays ignored across exec; a handled one is reset to the default."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(cmd, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=300, check=False, **kwargs)


def kill_after_checkpoint(cmd: list[str], checkpoint: Path, out: Path, settle: float = 0.2) -> None:
    """Start ``cmd``, SIGKILL it (and its workers) ``settle`` s after its first checkpoint appears; it must not have
    finished (``out`` absent)."""
    import time

    proc = subprocess.Popen(cmd, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not checkpoint.exists():
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    time.sleep(settle)
    kill_tree(proc)
    assert proc.returncode == -9 and not out.exists(), "the run ended before it was killed"


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process it started (torchrun's workers), each by its id."""
    import psutil

    parent = psutil.Process(proc.pid)
    for p in [*parent.children(recursive=True), parent]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)


def assert_stats_equal(a: CalibrationStats, b: CalibrationStats, exact: bool) -> None:
    """Counts always exactly; sums and maxima bit for bit (``exact``) or to fp32 tolerance."""
    assert a.tokens == b.tokens
    assert torch.equal(a.token_counts, b.token_counts)
    for x, y in zip(a.nonzero, b.nonzero):
        assert torch.equal(x, y)
    for name in ("sum_abs", "sum_sq", "max_abs"):
        for x, y in zip(getattr(a, name), getattr(b, name)):
            if exact:
                assert torch.equal(x, y), name
            else:
                torch.testing.assert_close(x, y, rtol=2e-6, atol=1e-6), name
    assert a.gram_tokens == b.gram_tokens and (a.gram is None) == (b.gram is None)
    for x, y in zip([*(a.gram or ()), *(a.gram_sum or ())], [*(b.gram or ()), *(b.gram_sum or ())]):
        if exact:
            assert torch.equal(x, y), "gram"
        else:
            torch.testing.assert_close(x, y, rtol=2e-6, atol=1e-5 * float(x.abs().max())), "gram"
