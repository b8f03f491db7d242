"""End to end: calibrating with each backend gives the same statistics as the reference (the ``torch`` backend).

The slow test calibrates the real SmolLM2 on 4096 stdlib tokens with every CPU backend; the fast ones do the same on
tiny random Llama and OPT models. Triton joins on the CPU only under its interpreter, and only on the tiny models:
one SmolLM2-sized ``act_stats`` call (4096 x 1536) takes about 100 s interpreted, and a pass makes 30 per batch.

What must agree, and how closely:

* token histograms: exactly (same ids, integer counts);
* sums (Σ|a|, Σa²) and maxima: each backend's h differs from the reference's by an ulp or so (own ``exp``), and the
  difference propagates through later layers, so no bit-exact match is owed. The bound is the reference's own fp32
  error, measured against a float64 copy of the model calibrated with the reference backend: per layer, a backend
  may be off the fp32 reference by twice that error plus a few fp32 ulps of the layer's largest value;
* active counts: exactly on the tiny models. On SmolLM2 not necessarily: a count is decided on the gate (at or
  above the activation's ``active_min``), and a later layer's gate differs between backends by the ulps that
  earlier layers' activations differ by, so a gate within an ulp or two of ``active_min`` may count on one backend
  only. So SmolLM2 allows per layer a total count difference of 0.1 % of the tokens.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from conftest import tiny_model

import minigpt
from minigpt import ops

EPS32 = torch.finfo(torch.float32).eps


def _triton_interpreted() -> bool:
    """Import the Triton kernels under ``TRITON_INTERPRET=1``; True if they did load interpreted (CPU-runnable)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        try:
            module = importlib.import_module("minigpt.kernels.act_stats")
        except ImportError:
            return False
    return type(module._act_stats_kernel).__name__ == "InterpretedFunction"


TRITON_ON_CPU = not torch.cuda.is_available() and _triton_interpreted()


def _calibrate(model, tokenizer, data, backend, **kw) -> minigpt.CalibrationStats:
    return minigpt.calibrate(model, tokenizer, data, backend=backend, progress=False, **kw)


def _reference(model, tokenizer, data, **kw):
    """Statistics of the fp32 reference run and of the same run on a float64 copy of ``model``."""
    return (_calibrate(model, tokenizer, data, "torch", **kw),
            _calibrate(copy.deepcopy(model).double(), tokenizer, data, "torch", **kw))


def _assert_matches(stats, ref, ref64, backend: str, nnz_slack: float = 0.0) -> None:
    assert stats.tokens == ref.tokens
    assert torch.equal(stats.token_counts, ref.token_counts), backend
    for layer in range(ref.num_layers):
        off = (stats.nonzero[layer] - ref.nonzero[layer]).abs().sum().item()
        assert off <= nnz_slack * ref.tokens, f"{backend} layer {layer}: non-zero counts off by {off}"
        for name in ("sum_abs", "sum_sq", "max_abs"):
            got, want, exact = (getattr(s, name)[layer].double() for s in (stats, ref, ref64))
            tol = 2 * (want - exact).abs().max() + 4 * EPS32 * want.abs().max()
            err = (got - want).abs().max()
            assert err <= tol, f"{backend} layer {layer} {name}: off by {err:.3g}, allowed {tol:.3g}"


@pytest.fixture
def backends(monkeypatch) -> list[str]:
    """Every backend that runs on the CPU here, the interpreted Triton included when it loaded."""
    if TRITON_ON_CPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return ops.available_backends("cpu")


@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_tiny_models_every_backend_matches_reference(model_type, backends, tiny_tokenizer, corpus_dir):
    model = tiny_model(model_type)
    kw = {"max_tokens": 1024, "seq_len": 64, "batch_size": 4}
    ref, ref64 = _reference(model, tiny_tokenizer, str(corpus_dir), **kw)
    assert ref.tokens == 1024 and ref.meta["backend"] == "torch"
    for backend in backends:
        stats = _calibrate(model, tiny_tokenizer, str(corpus_dir), backend, **kw)
        assert stats.meta["backend"] == backend
        _assert_matches(stats, ref, ref64, backend)


@pytest.mark.slow
def test_smollm2_4k_tokens_every_backend_matches_reference(smollm2):
    model, tokenizer = smollm2
    kw = {"max_tokens": 4096, "seq_len": 512, "batch_size": 4}
    ref, ref64 = _reference(model, tokenizer, "stdlib", **kw)
    assert ref.tokens == 4096
    for backend in ops.available_backends("cpu"):
        if backend != "torch":
            stats = _calibrate(model, tokenizer, "stdlib", backend, **kw)
            _assert_matches(stats, ref, ref64, backend, nnz_slack=1e-3)
