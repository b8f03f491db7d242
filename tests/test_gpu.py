"""What only a GPU can show, run by ``bash bench/gpu_check.sh`` (``-m gpu``; skipped without CUDA, failed there
instead of skipped): launches on the tensors' own device when another GPU is current, bit-identical statistics on
two identical runs, a whole calibration with ``torch.cuda.set_sync_debug_mode("error")`` (no host synchronisation
per batch), and the edge values of tests/edge_values.py on every GPU backend."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from edge_values import assert_same_stats, edge_grids

from minigpt import ops
from minigpt.models import adapters
from minigpt.ops import reference as R
from minigpt.pipeline import calibration
from minigpt.pipeline.stats import CalibrationStats, fingerprint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GPU_BACKENDS = ["cuda", "triton"]


def _backend(backend: str) -> str:
    if backend not in ops.available_backends("cuda"):
        pytest.fail(f"GPU backend {backend!r} did not load here (extension built without CUDA? triton missing?)")
    return backend


def _stats_run(backend: str, device: str):
    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(4096, 1536, generator=g).mul(4).to(device, torch.bfloat16) for _ in range(2))
    ids = torch.randint(0, 49152, (8, 512), generator=g).to(device)
    acc, nnz = torch.zeros(3, 1536, device=device), torch.zeros(1536, dtype=torch.int64, device=device)
    counts = torch.zeros(49152, dtype=torch.int64, device=device)
    h = ops.act_stats(gate, up, "silu", acc, nnz, backend=backend)
    ops.column_stats(h, acc, nnz, backend=backend)
    ops.token_histogram(ids, None, counts, backend=backend)
    w = torch.randn(1536, 576, generator=g).to(device, torch.bfloat16)
    (kept,) = ops.gather([w], [torch.arange(0, 1536, 3)], [0], backend=backend)
    return [t.cpu() for t in (h, acc, nnz, counts, kept)]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_two_identical_runs_give_the_same_bits(backend):
    first, second = (_stats_run(_backend(backend), "cuda:0") for _ in range(2))
    for x, y in zip(first, second):
        assert torch.equal(x.view(torch.int16) if x.dtype == torch.bfloat16 else x,
                           y.view(torch.int16) if y.dtype == torch.bfloat16 else y)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_launches_on_the_tensors_device_not_the_current_one(backend):
    if torch.cuda.device_count() < 2:
        pytest.skip("one GPU: the cuda:1 check needs two")  # gpu_check reports the count it ran with
    torch.cuda.set_device(0)
    on_1 = _stats_run(_backend(backend), "cuda:1")
    assert torch.cuda.current_device() == 0
    on_0 = _stats_run(backend, "cuda:0")
    for x, y in zip(on_1, on_0):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("act", R.ACTIVATIONS)
def test_edge_values_agree_with_the_reference(backend, dtype, act):
    for gate, up in edge_grids(dtype, "cuda"):
        up_finite = bool(up.isfinite().all())
        for u in (up, None):
            runs = []
            for b in ("torch", _backend(backend)):
                acc, nnz = torch.zeros(3, gate.shape[1], device="cuda"), torch.zeros(gate.shape[1], dtype=torch.int64,
                                                                                     device="cuda")
                runs.append([t.cpu() for t in (ops.act_stats(gate, u, act, acc, nnz, backend=b), acc, nnz)])
            exact = act in ("relu", "identity")
            assert_same_stats(runs[1], runs[0], None if u is None else u.cpu(), exact_values=exact,
                              nan_exact=exact or u is None or up_finite)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_calibration_never_synchronises_per_batch(backend):
    model = tiny_model("llama").cuda()
    batches = [torch.randint(3, 500, (2, 64), generator=torch.Generator().manual_seed(i)).cuda() for i in range(4)]
    stats = CalibrationStats.empty(fingerprint(model, None), device="cuda")
    calibration.run_batches(model, batches[:1], stats, backend=_backend(backend), progress=False)  # warm-up
    accums = [calibration._LayerAccumulator(n) for n in adapters.widths(model)]
    with calibration.patched(model, accums, backend), torch.inference_mode():
        torch.cuda.set_sync_debug_mode("error")
        try:
            for ids in batches:
                calibration.calibrate_batch(model.base_model, ids, accums, stats, backend)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    calibration.check_finite(stats)  # the checkpoint-time check: synchronises, once
    assert stats.tokens == 5 * 2 * 64
