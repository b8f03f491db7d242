"""Sizing by a quality budget (``minigpt.pipeline.budget``) and the held-out text it is sized on."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from minigpt.pipeline.budget import bootstrap_difference, document_nll, ratio_bound, sizing_documents
from minigpt.pipeline.data import document_window, iter_texts, resolve_files
from minigpt.pipeline.evaluation import documents_after, perplexity_of_ids, token_stream

pytestmark = pytest.mark.usefixtures("one_thread")


def test_document_nll_scores_each_document_after_a_start_token(tiny_tokenizer, corpus_dir):
    """Batched, padded per-document scoring equals the stream evaluation of ``[EOS, *doc]`` alone."""
    model = tiny_model("llama")
    texts = [p.read_text() for p in sorted(corpus_dir.iterdir())]
    docs = sizing_documents(tiny_tokenizer, iter(texts), 10_000, doc_tokens=50)
    assert [d.numel() for d in docs] == [50] * len(texts)
    docs[1] = docs[1][:17]  # uneven lengths: padding must not change a score
    nll, tokens = document_nll(model, tiny_tokenizer, docs, batch_size=3)
    for d, n, t in zip(docs, nll, tokens):
        ids = torch.cat([torch.tensor([tiny_tokenizer.eos_token_id]), d])
        ref = perplexity_of_ids(model, tiny_tokenizer, ids, seq_len=64)
        assert t == d.numel() == ref["tokens"]
        assert float(n) == pytest.approx(ref["nll_per_token"] * ref["tokens"], rel=1e-5)


def test_sizing_documents_stop_at_the_token_budget(tiny_tokenizer, corpus_dir):
    texts = [p.read_text() for p in sorted(corpus_dir.iterdir())]
    docs = sizing_documents(tiny_tokenizer, iter(texts), 100, doc_tokens=40)
    assert [d.numel() for d in docs] == [40, 40, 20]
    assert docs[0].tolist() == document_window(tiny_tokenizer(texts[0])["input_ids"], 40)


def test_sizing_text_is_not_the_reports_text(tiny_tokenizer, corpus_dir):
    """``documents_after`` starts at the first document the report's token stream does not reach."""
    files = resolve_files([str(corpus_dir)])
    texts = list(iter_texts(files, seed=None))
    first = len(tiny_tokenizer(texts[0])["input_ids"]) + 1  # + EOS
    assert list(documents_after(tiny_tokenizer, [str(corpus_dir)], first - 1)) == texts[1:]
    assert list(documents_after(tiny_tokenizer, [str(corpus_dir)], first)) == texts[1:]
    assert list(documents_after(tiny_tokenizer, [str(corpus_dir)], first + 1)) == texts[2:]
    assert list(documents_after(tiny_tokenizer, [str(corpus_dir)], 60, skip_doc_tokens=30)) == texts[2:]
    assert token_stream(tiny_tokenizer, [str(corpus_dir)], 60, doc_tokens=30).numel() == 60  # two documents


def test_ratio_bound_covers_the_population_ratio():
    """Documents drawn from a population whose true log ratio is known: the measured ratio is the token-weighted
    mean, and the 95 % upper bound lies above the truth in about 95 % of samples (z = 0 in about half)."""
    gen = torch.Generator().manual_seed(0)
    true_r, trials, covered, covered0 = 0.05, 400, 0, 0
    for _ in range(trials):
        tokens = torch.randint(50, 300, (40,), generator=gen).double()
        per_token = true_r + 0.08 * torch.randn(40, generator=gen, dtype=torch.float64)  # between documents
        base = 2.0 * tokens
        pruned = base + per_token * tokens
        measured, upper = ratio_bound(base, pruned, tokens, 1.6449)
        assert measured == pytest.approx(math.exp(float((pruned - base).sum() / tokens.sum())))
        covered += upper >= math.exp(true_r)
        covered0 += ratio_bound(base, pruned, tokens, 0.0)[1] >= math.exp(true_r)
    assert 0.90 <= covered / trials <= 0.99
    assert 0.40 <= covered0 / trials <= 0.60


def test_bootstrap_difference_covers_the_population_difference():
    """Paired documents from a population whose true per-token difference is known: the 95 % percentile interval
    of the replicates covers it in about 95 % of samples, and their spread matches the ratio estimator's error."""
    gen = torch.Generator().manual_seed(1)
    true_r, trials, covered = 0.02, 200, 0
    for trial in range(trials):
        tokens = torch.randint(20, 300, (30,), generator=gen).double()
        base = 2.0 * tokens + torch.randn(30, generator=gen, dtype=torch.float64)
        other = base + (true_r + 0.05 * torch.randn(30, generator=gen, dtype=torch.float64)) * tokens
        reps = bootstrap_difference(base, other, tokens, resamples=2000, seed=trial)
        assert reps.shape == (2000,)
        r = float((other - base).sum() / tokens.sum())
        assert float(reps.mean()) == pytest.approx(r, abs=0.005)
        se = math.log(ratio_bound(base, other, tokens, 1.0)[1]) - r
        assert float(reps.std()) == pytest.approx(se, rel=0.25)
        lo, hi = torch.quantile(reps, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        covered += lo <= true_r <= hi
    assert 0.88 <= covered / trials <= 0.99
