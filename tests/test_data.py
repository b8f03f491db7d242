"""Corpus streaming: per-document windows (``doc_tokens``) spread a calibration budget over many documents."""

from __future__ import annotations

import itertools
import random

import pytest
from conftest import tiny_model

from minigpt.errors import MiniGPTError
from minigpt.pipeline.calibration import calibrate
from minigpt.pipeline.data import Batches, document_window, iter_texts
from minigpt.pipeline.evaluation import perplexity, token_stream


def _contains(seq: list[int], part: list[int]) -> bool:
    return any(seq[i : i + len(part)] == part for i in range(len(seq) - len(part) + 1))


def test_document_window_is_a_slice_fixed_by_content_and_seed():
    ids = random.Random(0).choices(range(1000), k=500)
    window = document_window(ids, 64, seed=0)
    assert len(window) == 64 and _contains(ids, window)
    assert document_window(list(ids), 64, seed=0) == window  # the same document, the same window
    assert {tuple(document_window(ids, 64, seed=s)) for s in range(8)} != {tuple(window)}  # seeds move it
    assert document_window(ids[:50], 64) == ids[:50] and document_window(ids, None) == ids
    with pytest.raises(MiniGPTError, match="tokens per document must be positive"):
        document_window(ids, 0)


def test_doc_tokens_caps_each_document(tiny_tokenizer, corpus_dir):
    files = sorted(corpus_dir.glob("*.txt"))
    docs = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in iter_texts(files, seed=0)]
    stream = list(itertools.chain(*Batches(tiny_tokenizer, files, seq_len=16, batch_size=1, doc_tokens=100).sequences()))
    eos = tiny_tokenizer.eos_token_id
    expected = sum(min(len(d), 100) + (eos is not None) for d in docs)
    assert len(stream) == expected - expected % 16
    for doc in docs:
        assert _contains(stream, document_window(doc, 100, seed=0)[:50])


def test_calibration_records_doc_tokens_and_sees_more_documents(tiny_tokenizer, corpus_dir):
    files = sorted(corpus_dir.glob("*.txt"))
    budget = 512
    capped = Batches(tiny_tokenizer, files, seq_len=64, batch_size=1, max_tokens=budget, doc_tokens=200)
    whole = Batches(tiny_tokenizer, files, seq_len=64, batch_size=1, max_tokens=budget)
    docs = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in iter_texts(files, seed=0)]

    def covered(batches):
        stream = list(itertools.chain(*batches.sequences()))
        return sum(any(_contains(stream, doc[i : i + 8]) for i in range(0, len(doc) - 8, 8)) for doc in docs)

    assert covered(capped) > covered(whole)
    stats = calibrate(tiny_model("llama"), tiny_tokenizer, [str(f) for f in files], max_tokens=budget, seq_len=64,
                      doc_tokens=200, progress=False)
    assert stats.meta["corpus"]["doc_tokens"] == 200 and stats.tokens == budget


def test_heldout_stream_and_perplexity_take_the_windows(tiny_tokenizer, corpus_dir):
    files = sorted(corpus_dir.glob("*.txt"))
    docs = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in iter_texts(files, seed=None)]
    ids = token_stream(tiny_tokenizer, [str(f) for f in files], max_tokens=10**6, doc_tokens=100)
    eos = [tiny_tokenizer.eos_token_id] if tiny_tokenizer.eos_token_id is not None else []
    assert ids.tolist() == list(itertools.chain(*(document_window(d, 100) + eos for d in docs)))
    r = perplexity(tiny_model("llama"), tiny_tokenizer, [str(f) for f in files], seq_len=64, max_tokens=10**6,
                   doc_tokens=100)
    assert r["tokens"] == ids.numel() - -(-ids.numel() // 64)  # a window's first token has no context


LARGE_FILE_RUN = """
import json, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from minigpt.pipeline.calibration import calibrate

def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024

def bytes_read():
    return int(next(l for l in open("/proc/self/io") if l.startswith("rchar")).split()[1])

model_dir, data = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
open("/proc/self/clear_refs", "w").write("5")  # the high-water mark restarts from the model's resident set
base, read = status("VmRSS"), bytes_read()
stats = calibrate(model, tokenizer, [data], max_tokens=4096, seq_len=512, batch_size=8, progress=False)
print(json.dumps({"tokens": stats.tokens, "peak_above_model": status("VmHWM") - base,
                  "bytes_read": bytes_read() - read}))
"""


def test_two_gigabyte_file_streams_in_pieces(tiny_tokenizer, tmp_path):
    """4,096 calibration tokens from a 2 GB text file: the file is read a piece at a time (a few MiB of it, not
    2 GB) and resident memory grows by far less than 1 GB above the model's. The file is deleted afterwards."""
    import json
    import subprocess
    import sys

    from conftest import STDLIB, tiny_model
    from scale_helpers import save_model, worker_env

    from minigpt.pipeline.data import LARGE_FILE_BYTES

    model_dir = save_model(tiny_model("llama"), tiny_tokenizer, tmp_path / "model")
    block = "\n\n".join(p.read_text() for p in sorted(STDLIB.glob("*.py"))[:40]).encode()
    big = tmp_path / "big.txt"
    try:
        with big.open("wb") as f:
            while f.tell() < 2 * 2**30:
                f.write(block)
        done = subprocess.run([sys.executable, "-c", LARGE_FILE_RUN, str(model_dir), str(big)], env=worker_env(),
                              capture_output=True, text=True, timeout=600, check=False)
    finally:
        big.unlink(missing_ok=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["tokens"] == 4096
    assert result["bytes_read"] < 16 * LARGE_FILE_BYTES
    assert result["peak_above_model"] < 2**30
