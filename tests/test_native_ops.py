"""The C++ ops (and the CUDA ops, where built) of ``minigpt._C`` against ``minigpt.ops.reference``.

Histograms and gathers must match exactly. Float statistics are compared with an fp64 computation: our error must
stay within twice the reference's own fp32 error plus a couple of fp32 roundings (flash-attention's rule).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from edge_values import assert_same_stats

from minigpt import ops as minigpt_ops
from minigpt.ops import reference as R

_C = pytest.importorskip("minigpt._C", reason="the C++ extension minigpt._C is not built")
minigpt_ops.get_op("act_stats", "cpp")  # defines the schemas the extension's kernels implement
ops = torch.ops.minigpt

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and _C.WITH_CUDA else [])
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
# empty, one element, odd sizes (not multiples of 16 or 32), leading dims, many tokens, several 1024-column blocks
SHAPES = [(0, 7), (1, 1), (37, 300), (3, 5, 129), (1000, 33), (40, 2100)]
EXACT_ACTS = ("relu", "identity")  # h = act(gate) * up is one fp32 rounding at most: same bits as the reference
EPS32 = torch.finfo(torch.float32).eps


def empty_stats(n: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-zero starting accumulators acc: (3, n) fp32 and nnz: (n,) int64, to test accumulation."""
    acc = torch.rand(3, n, device=device)
    return acc, torch.randint(0, 5, (n,), device=device)


def act_stats(gate, up, act, acc, nnz):
    """The op with the reference's ``active_min`` of ``act``."""
    return ops.act_stats(gate, up, act, R.active_min(act), acc, nnz)


def inputs(shape, dtype, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """gate, up of ``shape``: normal times 8 (down to every activation's tail), with planted zeros."""
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(shape, generator=g) * 8 for _ in range(2))
    gate.view(-1)[::7] = 0
    up.view(-1)[::11] = 0
    return gate.to(device, dtype), up.to(device, dtype)


def stats64(h: torch.Tensor, active: torch.Tensor, acc: torch.Tensor, nnz: torch.Tensor):
    """The exact statistics (fp64) of h: (..., N) and the count of ``active`` added to copies of acc, nnz."""
    h = h.reshape(-1, h.shape[-1]).double()
    acc = acc.double().clone()
    if h.shape[0]:
        acc[0] += h.abs().sum(0)
        acc[1] += (h * h).sum(0)
        acc[2] = torch.maximum(acc[2], h.abs().amax(0))
    return acc, nnz + active.reshape(h.shape).sum(0)


def max_abs(x: torch.Tensor) -> torch.Tensor:
    return x.abs().amax() if x.numel() else x.new_zeros(())


def rel_err(x: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    return max_abs((x.double() - exact) / exact.abs().clamp_min(torch.finfo(torch.float32).tiny))


def assert_stats(ours, ref, exact, exact_max: bool) -> None:
    """ours, ref: (acc, nnz) from our op and the reference; exact: fp64 (acc, nnz)."""
    for row in (0, 1) if exact_max else (0, 1, 2):
        ours_err, ref_err = rel_err(ours[0][row], exact[0][row]), rel_err(ref[0][row], exact[0][row])
        assert ours_err <= 2 * ref_err + 2 * EPS32, f"acc[{row}]: error {ours_err:.3g} vs reference {ref_err:.3g}"
    if exact_max:
        assert torch.equal(ours[0][2], ref[0][2])
    assert torch.equal(ours[1], ref[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_column_stats(device, dtype, shape):
    x, _ = inputs(shape, dtype, device)
    acc, nnz = empty_stats(shape[-1], device)
    exact = stats64(x, R.is_number_nonzero(x), acc, nnz)
    ref = acc.clone(), nnz.clone()
    R.column_stats_ref(x, *ref)
    ops.column_stats(x, acc, nnz)
    assert_stats((acc, nnz), ref, exact, exact_max=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("act", R.ACTIVATIONS)
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_act_stats(device, dtype, act, gated, shape):
    gate, up = inputs(shape, dtype, device)
    up = up if gated else None
    acc, nnz = empty_stats(shape[-1], device)
    h64 = R.activation_ref(gate.double(), act) * (up.double() if gated else 1.0)
    exact = stats64(h64, R.active_ref(gate.float(), None if up is None else up.float(), act), acc, nnz)
    ref_acc, ref_nnz = acc.clone(), nnz.clone()
    ref_h = R.act_stats_ref(gate, up, act, ref_acc, ref_nnz)
    h = act_stats(gate, up, act, acc, nnz)

    assert h.dtype == dtype and h.shape == gate.shape and h.is_contiguous()
    if act in EXACT_ACTS:
        assert torch.equal(h, ref_h)
    else:
        ours_err, ref_err = max_abs(h.double() - h64), max_abs(ref_h.double() - h64)
        assert ours_err <= 2 * ref_err + torch.finfo(dtype).eps * max_abs(h64)
    assert_stats((acc, nnz), (ref_acc, ref_nnz), exact, exact_max=act in EXACT_ACTS)


@pytest.mark.parametrize("device", DEVICES)
def test_stats_accumulate_across_calls(device):
    acc, nnz = empty_stats(300, device)
    ref = acc.clone(), nnz.clone()
    for seed in (1, 2):
        gate, up = inputs((37, 300), torch.float32, device, seed)
        act_stats(gate, up, "relu", acc, nnz)
        R.act_stats_ref(gate, up, "relu", *ref)
        ops.column_stats(up, acc, nnz)
        R.column_stats_ref(up, *ref)
    torch.testing.assert_close(acc, ref[0], rtol=4 * EPS32, atol=0)
    assert torch.equal(acc[2], ref[0][2]) and torch.equal(nnz, ref[1])


def test_stats_same_bits_on_any_thread_count():
    """Several row slabs and column blocks (1100 x 2100): the per-tile partials fold in a fixed order."""
    gate, up = inputs((1100, 2100), torch.bfloat16, "cpu", seed=4)
    n = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for act, u in (("gelu", up), ("identity", None)):
                acc, nnz = torch.zeros(3, 2100), torch.zeros(2100, dtype=torch.int64)
                h = act_stats(gate, u, act, acc, nnz)
                runs.append((threads, act, h.view(torch.int16), acc.view(torch.int32), nnz))
    finally:
        torch.set_num_threads(n)
    for threads, act, *tensors in runs[2:]:
        first = next(r for r in runs if r[1] == act)
        assert all(torch.equal(x, y) for x, y in zip(tensors, first[2:])), (threads, act)


ISA_RUN = """
import sys, torch
from minigpt.ops import reference as R
from edge_values import edge_grids
import minigpt._C  # noqa: F401
from minigpt import ops as minigpt_ops
minigpt_ops.get_op("act_stats", "cpp")
out = []
g = torch.Generator().manual_seed(5)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    pairs = edge_grids(dtype) + [tuple((torch.randn(300, 133, generator=g) * 8).to(dtype) for _ in range(2))]
    for act in R.ACTIVATIONS:
        for gate, up in pairs:
            for u in (up, None):
                acc, nnz = torch.zeros(3, gate.shape[1]), torch.zeros(gate.shape[1], dtype=torch.int64)
                h = torch.ops.minigpt.act_stats(gate, u, act, R.active_min(act), acc, nnz)
                out.append((dtype, act, u is not None, gate, u, h, acc, nnz))
    acc, nnz = torch.zeros(3, 133), torch.zeros(133, dtype=torch.int64)
    torch.ops.minigpt.column_stats(pairs[-1][0], acc, nnz)
    out.append((dtype, "column_stats", False, pairs[-1][0], None, pairs[-1][0], acc, nnz))
torch.save(out, sys.argv[1])
"""


def run_with_isa(script: str, isa: str, *args: str) -> bool:
    """Run ``script`` with the kernels of ``isa`` (MINIGPT_CPU_ISA; "" = the default); False if this CPU lacks it."""
    tests = Path(__file__).parent
    env = {**os.environ, "MINIGPT_CPU_ISA": isa, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, check=False)
    if proc.returncode and "is not an instruction set of this CPU" in proc.stderr:
        return False
    assert proc.returncode == 0, proc.stderr[-2000:]
    return True


def run_isa(isa: str, path) -> list | None:
    """ISA_RUN's results with the kernels of ``isa``, or None if this CPU lacks it."""
    return torch.load(path) if run_with_isa(ISA_RUN, isa, str(path)) else None


def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal bits, any NaN equal to any NaN (payloads differ between conversions)."""
    nan = x.isnan()
    return torch.equal(nan, y.isnan()) and torch.equal(x[~nan].view(-1).float().view(torch.int32),
                                                       y[~nan].view(-1).float().view(torch.int32))


def test_every_instruction_set_agrees(tmp_path):
    """The kernels of every instruction set this CPU runs on edge values and random inputs, every dtype and
    activation: AVX2, AVX-512 and AVX512_BF16 (FMA polynomials) give the default's bits; the SSE2 baseline (its FMAs
    rounded twice) the reference's counts and NaN/±inf, h and the sums within fp32 rounding."""
    default = run_isa("", tmp_path / "default.pt")
    ran = []
    for isa in ("base", "avx2", "avx512", "avx512bf16"):
        results = run_isa(isa, tmp_path / f"{isa}.pt")
        if results is None:
            continue
        ran.append(isa)
        for (dtype, act, gated, gate, up, *ours), (*_, h, acc, nnz) in zip(results, default):
            if isa != "base":
                assert all(same_bits(x, y) for x, y in zip(ours, (h, acc, nnz))), (isa, dtype, act, gated)
            else:
                exact = act in EXACT_ACTS
                assert_same_stats(ours, (h, acc, nnz), up, exact_values=exact,
                                  nan_exact=exact or up is None or bool(up.isfinite().all()))
    assert "base" in ran


STREAM_RUN = """
import torch
from edge_values import edge_grids
from test_native_ops import act_stats, empty_stats, inputs, same_bits
from minigpt.ops import reference as R
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    gate, up = inputs((1024, 4096), dtype, "cpu", seed=6)
    for (g, u), col in zip(edge_grids(dtype), (0, 2000)):  # 2000: 16 columns into a 32-column pair
        gate[: g.shape[0], col : col + g.shape[1]] = g
        up[: g.shape[0], col : col + g.shape[1]] = u
    for act in R.ACTIVATIONS:
        chunks = [act_stats(gate[r : r + 64], up[r : r + 64], act, *empty_stats(4096, "cpu"))
                  for r in range(0, 1024, 64)]
        runs = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            acc, nnz = torch.zeros(3, 4096), torch.zeros(4096, dtype=torch.int64)
            runs.append((act_stats(gate, up, act, acc, nnz), acc, nnz))
        assert same_bits(runs[0][0], torch.cat(chunks)), (dtype, act, "h")
        assert all(same_bits(x, y) for x, y in zip(runs[0], runs[1])), (dtype, act, "threads")
"""


@pytest.mark.parametrize("isa", ["", "avx2"])
def test_streamed_h_same_bits(isa):
    """An h of 4 MiB or more whose rows are a multiple of 64 bytes is streamed past the caches by the AVX-512 kernels
    in fp32 and bf16 (non-temporal stores; kernels_impl.h streams_out): the same bits, edge values included, as calls
    of 64 rows that are too small to stream, on 1 thread and on 3 (tiles then split by columns), every dtype and
    activation. AVX2's kernels, which never stream, must give the same for the same large inputs."""
    if not run_with_isa(STREAM_RUN, isa):
        pytest.skip(f"this CPU has no {isa} kernels")


@pytest.mark.parametrize("device", DEVICES)
def test_stats_nan_propagates_to_max(device):
    x = torch.ones(40, 3, device=device)
    x[17, 1] = float("nan")
    acc, nnz = empty_stats(3, device)
    ref = acc.clone(), nnz.clone()
    ops.column_stats(x, acc, nnz)
    R.column_stats_ref(x, *ref)
    torch.testing.assert_close(acc, ref[0], equal_nan=True)
    assert torch.equal(nnz, ref[1])


@pytest.mark.parametrize("device", DEVICES)
def test_stats_errors(device):
    gate, up = inputs((4, 6), torch.float32, device)
    acc, nnz = empty_stats(6, device)
    with pytest.raises(RuntimeError, match="unknown activation"):
        ops.act_stats(gate, up, "tanh", 0.0, acc, nnz)
    with pytest.raises(RuntimeError, match="acc must be"):
        ops.column_stats(gate, acc[:, :5], nnz)
    with pytest.raises(RuntimeError, match="up must match gate"):
        act_stats(gate, up.half(), "silu", acc, nnz)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("vocab", [1, 1000, 262_147])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "int", "padding_only"])
@pytest.mark.parametrize("shape", [(0,), (3, 17), (40, 1000)])
def test_token_histogram(device, id_dtype, vocab, mask_kind, shape):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, shape, generator=g).to(device, id_dtype)
    mask = {
        "none": None,
        "bool": torch.rand(shape, generator=g) < 0.7,
        "int": (torch.rand(shape, generator=g) < 0.7).int(),
        "padding_only": torch.zeros(shape, dtype=torch.bool),
    }[mask_kind]
    mask = None if mask is None else mask.to(device)
    counts = torch.randint(0, 3, (vocab,), device=device)
    ref = counts.clone()
    R.token_histogram_ref(ids, mask, ref)
    ops.token_histogram(ids, mask, counts)
    assert torch.equal(counts, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_token_histogram_range(device):
    counts = torch.zeros(10, dtype=torch.long, device=device)
    ids = torch.tensor([[1, 2, -100], [10, 3, 9]], device=device)
    mask = torch.tensor([[True, True, False], [False, True, True]], device=device)
    ref = counts.clone()
    R.token_histogram_ref(ids, mask, ref)  # out-of-range ids under a false mask are ignored
    ops.token_histogram(ids, mask, counts)
    assert torch.equal(counts, ref)
    for bad in (-1, 10):
        before = counts.clone()
        if device == "cpu":  # checked where that costs no synchronisation
            with pytest.raises(RuntimeError, match="vocabulary"):
                ops.token_histogram(torch.tensor([0, bad, 2], device=device), None, counts)
            assert torch.equal(counts, before)
        else:  # not counted
            ops.token_histogram(torch.tensor([0, bad, 2], device=device), None, counts)
            before[[0, 2]] += 1
            assert torch.equal(counts, before)


GATHER_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.bool,
                 torch.complex128]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", GATHER_DTYPES)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_gather(device, dtype, idx_dtype):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(37, 301, generator=g) * 50
    src = (base > 0) if dtype == torch.bool else base.to(dtype)
    src = src.to(device)
    srcs = [src, src, src.t(), src[:, ::3], src, src]  # contiguous, transposed and strided sources
    indices = [torch.randint(0, s.shape[d], (n,), generator=g).to(idx_dtype)
               for s, d, n in zip(srcs, [0, 1, 0, 1, 1, 0], [19, 250, 7, 40, 0, 37])]
    dims = [0, 1, 0, 1, 1, 0]
    outs = ops.gather(srcs, indices, dims)
    for out, ref in zip(outs, R.gather_ref(srcs, indices, dims)):
        assert out.is_contiguous() and out.dtype == ref.dtype and torch.equal(out, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_gather_errors(device):
    src = torch.randn(4, 6, device=device)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.gather([src], [torch.tensor([0, 6])], [1])
    with pytest.raises(RuntimeError, match="out of range"):
        ops.gather([src], [torch.tensor([-1])], [0])
    with pytest.raises(RuntimeError, match="dims must be 0 or 1"):
        ops.gather([src], [torch.tensor([0])], [2])


def opcheck_cases(device: str):
    gate, up = inputs((9, 20), torch.float32, device)
    acc, nnz = empty_stats(20, device)
    ids = torch.randint(0, 50, (3, 7), device=device)
    return [
        (ops.act_stats.default, (gate, up, "silu", R.active_min("silu"), acc, nnz)),
        (ops.act_stats.default, (gate.half(), None, "gelu", R.active_min("gelu"), acc, nnz)),
        (ops.column_stats.default, (gate, acc, nnz)),
        (ops.token_histogram.default, (ids, ids > 10, torch.zeros(50, dtype=torch.long, device=device))),
        (ops.token_histogram.default, (ids, None, torch.zeros(50, dtype=torch.long, device=device))),
        (ops.gather.default, ([gate, up.t()], [torch.tensor([3, 1], device=device), torch.tensor([0, 8], device=device)],
                              [0, 1])),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(6))
def test_opcheck(device, case):
    op, args = opcheck_cases(device)[case]
    torch.library.opcheck(op, args)
