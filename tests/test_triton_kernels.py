"""Triton kernels (``minigpt.kernels``) against the PyTorch reference.

Without CUDA every kernel runs in Triton's CPU interpreter. ``TRITON_INTERPRET=1`` must be set when triton is first
imported (its own and our ``@triton.jit`` decorators read it once) and while kernels launch, so this module sets it
around its import of triton and inside each test only: other test modules never see it. If another module imported
triton first (compiled mode), the in-process CPU tests skip and ``test_interpreter_lane_in_subprocess`` reruns this
file in a fresh process instead. With CUDA the same tiny-shape checks run compiled, plus realistic sizes.

Float statistics are compared with an fp64 computation: the kernel may be off by at most twice the reference's own
fp32 error plus one fp32 ulp of the largest value. Histograms, gathers, nnz (and max and h where the arithmetic is
the same as the reference's) are compared exactly, and so are the NaN/±inf/±0/subnormal edge values
(tests/edge_values.py) against the reference backend.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from edge_values import assert_same_stats, edge_grids

from minigpt import ops
from minigpt.ops import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
with pytest.MonkeyPatch.context() as _mp:
    if DEVICE == "cpu":
        _mp.setenv("TRITON_INTERPRET", "1")
    triton = pytest.importorskip("triton")
    _kernel = importlib.import_module("minigpt.kernels.act_stats")._act_stats_kernel
IN_PROCESS = DEVICE == "cuda" or all(
    type(f).__name__ == "InterpretedFunction" for f in (triton.language.zeros, _kernel)
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EXACT_ACTS = ("relu", "identity")  # same fp32 arithmetic as the reference: h and max bit-exact
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def kernels(monkeypatch):
    """``minigpt.kernels``, launching under the CPU interpreter when there is no GPU."""
    if not IN_PROCESS:
        pytest.skip("triton was first imported in compiled mode; see test_interpreter_lane_in_subprocess")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return importlib.import_module("minigpt.kernels")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, gen, device=DEVICE, zeros: float = 0.1) -> torch.Tensor:
    """Normal values times 8 (deep into every activation's tail) with a fraction ``zeros`` of exact zeros (to
    exercise nnz), made on the CPU."""
    x = torch.randn(shape, generator=gen) * 8
    x[torch.rand(shape, generator=gen) < zeros] = 0.0
    return x.to(dtype=dtype, device=device)


def _stats64(h: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact statistics of ``h: (..., N)`` in fp64: ``(3, N)`` [Σ|h|, Σh², max|h|] and ``(N,)`` count of ``active``."""
    h = h.double().reshape(-1, h.shape[-1])
    a = h.abs()
    return torch.stack([a.sum(0), (h * h).sum(0), a.amax(0)]), active.reshape(h.shape).sum(0)


def _act64(gate: torch.Tensor, up: torch.Tensor | None, act: str) -> torch.Tensor:
    h = reference.activation_ref(gate.double(), act)
    return h if up is None else h * up.double()


def assert_close_to_exact(ours: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, n_terms: int = 1) -> None:
    """Worst error of ``ours`` vs fp64 ``exact`` <= 2x the reference's worst error + sqrt(n_terms) fp32 ulps of
    max |exact| (the typical rounding error of an n-term fp32 sum, a floor for when the reference got lucky)."""
    exact = exact.double()
    ref_err = (ref.double() - exact).abs().max()
    tol = 2 * ref_err + n_terms**0.5 * torch.finfo(torch.float32).eps * exact.abs().max()
    err = (ours.double() - exact).abs().max()
    assert err <= tol, f"error {err:.3g} > tolerance {tol:.3g} (reference error {ref_err:.3g})"


def _new_stats(n: int, device=DEVICE) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(3, n, device=device), torch.zeros(n, dtype=torch.int64, device=device)


def check_act_stats(kernels, calls: list[tuple[torch.Tensor, torch.Tensor | None]], act: str) -> None:
    """Run ``act_stats`` over ``calls`` (accumulating into one acc/nnz) with the kernel and the reference."""
    n = calls[0][0].shape[-1]
    acc, nnz = _new_stats(n, calls[0][0].device)
    acc_ref, nnz_ref = acc.clone(), nnz.clone()
    exact, active = [], []
    for gate, up in calls:
        h = kernels.act_stats(gate, up, act, reference.active_min(act), acc, nnz)
        h_ref = reference.act_stats_ref(gate, up, act, acc_ref, nnz_ref)
        assert h.shape == gate.shape and h.dtype == gate.dtype and h.is_contiguous()
        h64 = _act64(gate, up, act)
        exact.append(h64.reshape(-1, n))
        active.append(reference.active_ref(gate.float(), None if up is None else up.float(), act).reshape(-1, n))
        if act in EXACT_ACTS:
            assert torch.equal(h, h_ref)
        else:
            assert_close_to_exact(h, h_ref, h64)
    h64 = torch.cat(exact)
    acc64, nnz64 = _stats64(h64, torch.cat(active))
    assert torch.equal(nnz, nnz_ref) and torch.equal(nnz, nnz64)
    assert_close_to_exact(acc[:2], acc_ref[:2], acc64[:2], n_terms=h64.shape[0])
    if act in EXACT_ACTS:
        assert torch.equal(acc[2], acc_ref[2])
    else:
        assert_close_to_exact(acc[2], acc_ref[2], acc64[2])


# ---------------------------------------------------------------------------------------------- act_stats


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("act", reference.ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_act_stats_odd_shape(kernels, dtype, act, gated):
    gen = _gen()
    gate = _randn((37, 19), dtype, gen)
    up = _randn((37, 19), dtype, gen) if gated else None
    check_act_stats(kernels, [(gate, up)], act)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_act_stats_accumulates_across_calls(kernels, dtype):
    gen = _gen(1)
    calls = [(_randn((2, 9, 150), dtype, gen), _randn((2, 9, 150), dtype, gen)) for _ in range(2)]  # 2 column blocks
    check_act_stats(kernels, calls, "silu")


def test_act_stats_strided_gate_up(kernels):
    """gate and up as the two halves of one fused projection output: row stride 2N, no copy."""
    gate_up = _randn((21, 2 * 19), torch.bfloat16, _gen(2))
    check_act_stats(kernels, [gate_up.chunk(2, dim=-1)], "gelu_tanh")


def test_act_stats_many_tiles_per_program(kernels, monkeypatch):
    """Force several BLOCK_T tiles per program, as for long inputs on the GPU."""
    monkeypatch.setattr("minigpt.kernels._config.TARGET_PROGRAMS", 1)
    from minigpt.kernels._config import act_stats_config

    assert act_stats_config(100, 19)["ROWS_PER_PROG"] > act_stats_config(100, 19)["BLOCK_T"]
    gen = _gen(3)
    check_act_stats(kernels, [(_randn((100, 19), torch.float16, gen), _randn((100, 19), torch.float16, gen))], "silu")


@pytest.mark.parametrize("shape", [(0, 19), (2, 0, 19), (5, 0)])
def test_act_stats_empty(kernels, shape):
    gate = torch.randn(shape, device=DEVICE)
    acc, nnz = _new_stats(shape[-1])
    h = kernels.act_stats(gate, gate, "silu", -16.0, acc, nnz)
    assert h.shape == gate.shape and not acc.any() and not nnz.any()


def test_act_stats_rejects_bad_arguments(kernels):
    gate = torch.randn(4, 8, device=DEVICE)
    acc, nnz = _new_stats(8)
    with pytest.raises(ValueError, match="unknown activation"):
        kernels.act_stats(gate, None, "swish", 0.0, acc, nnz)
    with pytest.raises(ValueError, match="acc"):
        kernels.act_stats(gate, None, "silu", -16.0, acc[:, :4], nnz)
    with pytest.raises(ValueError, match="up"):
        kernels.act_stats(gate, gate[:2], "silu", -16.0, acc, nnz)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_column_stats(kernels, dtype):
    gen = _gen(4)
    xs = [_randn((3, 7, 19), dtype, gen), _randn((19, 11), dtype, gen).t()]  # the second has column stride 11
    acc, nnz = _new_stats(19)
    acc_ref, nnz_ref = acc.clone(), nnz.clone()
    for x in xs:
        kernels.column_stats(x, acc, nnz)
        reference.column_stats_ref(x, acc_ref, nnz_ref)
    x64 = torch.cat([x.reshape(-1, 19) for x in xs])
    acc64, nnz64 = _stats64(x64, reference.is_number_nonzero(x64.float()))
    assert torch.equal(nnz, nnz_ref) and torch.equal(nnz, nnz64)
    assert torch.equal(acc[2], acc_ref[2])
    assert_close_to_exact(acc[:2], acc_ref[:2], acc64[:2], n_terms=x64.shape[0])


# ---------------------------------------------------------------------------------------------- histogram


def _check_histogram(kernels, ids, masks, vocab):
    counts = torch.arange(vocab, device=ids.device)  # non-zero start: the op accumulates
    counts_ref = counts.clone()
    for mask in masks:
        kernels.token_histogram(ids, mask, counts)
        reference.token_histogram_ref(ids, mask, counts_ref)
    assert torch.equal(counts, counts_ref)


@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32], ids=str)
def test_token_histogram(kernels, id_dtype):
    gen = _gen(5)
    ids = torch.randint(0, 300, (3, 850), generator=gen)  # 2550 tokens: 3 programs, the last one partial
    ids[0, :100] = 7  # a hot token: many atomics on one address
    masks = [None, torch.rand(ids.shape, generator=gen) < 0.6, torch.randint(0, 2, ids.shape, generator=gen)]
    _check_histogram(
        kernels, ids.to(device=DEVICE, dtype=id_dtype), [m if m is None else m.to(DEVICE) for m in masks], 300
    )


def test_token_histogram_padding_only_and_empty(kernels):
    ids = torch.randint(0, 50, (4, 9), device=DEVICE)
    _check_histogram(kernels, ids, [torch.zeros(4, 9, dtype=torch.bool, device=DEVICE)], 50)
    _check_histogram(kernels, ids[:0], [None], 50)


def test_out_of_range_ids_and_indices_never_touch_memory_outside(kernels):
    """No host synchronisation to check: ids outside [0, V) are not counted, indices outside the source leave their
    output unwritten (``minigpt.ops.gather`` refuses them on the host)."""
    counts = torch.zeros(10, dtype=torch.int64, device=DEVICE)
    for bad in (-1, 10):
        kernels.token_histogram(torch.tensor([0, bad, 2], device=DEVICE), None, counts)
    assert counts.tolist() == [2, 0, 2] + [0] * 7
    src = torch.arange(20.0, device=DEVICE).reshape(4, 5)
    out = kernels.gather([src], [torch.tensor([0, 4, -1, 2])], [0])[0]
    assert torch.equal(out[[0, 3]], src[[0, 2]])
    for idx, dim in ((torch.tensor([0, 4]), 0), (torch.tensor([-1]), 1), (torch.tensor([5]), 1)):
        with pytest.raises(IndexError, match="out of range"):
            ops.gather([src], [idx], [dim], backend="triton")


def test_token_histogram_large_vocab(kernels):
    vocab = 262_144
    ids = torch.randint(0, vocab, (1500,), generator=_gen(6))
    ids[:3] = torch.tensor([0, vocab - 1, vocab - 1])
    _check_histogram(kernels, ids.to(DEVICE), [None], vocab)


# ---------------------------------------------------------------------------------------------- gather


def _gather_cases(gen: torch.Generator, device=DEVICE):
    """Sources of several dtypes, strides and offsets, with row and column gathers of odd sizes."""
    big = torch.randn(40, 301, generator=gen)
    srcs = [
        big,  # fp32, 3x3 tiles of output
        torch.randn(19, 37, generator=gen).to(torch.bfloat16),
        torch.randn(5, 7, generator=gen).half(),
        big[:, 3:20],  # row stride 301, unaligned start
        torch.randn(9, 13, generator=gen).t(),  # column stride != 1: copied first
        torch.randn(6, 6, generator=gen),
        torch.randn(33, 17, generator=gen).to(torch.bfloat16),
        torch.randint(-100, 100, (8, 12), generator=gen),  # int64
    ]
    indices = [
        torch.randperm(40, generator=gen)[:33],
        torch.randint(0, 37, (23,), generator=gen),  # duplicates
        torch.tensor([6, 0, 2]),
        torch.tensor([1, 3, 5, 16, 0]),
        torch.tensor([], dtype=torch.long),  # empty output
        torch.tensor([2, 2, 5], dtype=torch.int32),
        torch.arange(0, 33, 2),
        torch.tensor([11, 0]),
    ]
    dims = [0, 1, 1, -1, 0, 0, 0, 1]
    return [s.to(device) for s in srcs], [i.to(device) for i in indices], dims


def _check_gather(kernels, srcs, indices, dims):
    outs = kernels.gather(srcs, indices, dims)
    refs = reference.gather_ref(srcs, indices, dims)
    assert len(outs) == len(refs)
    for out, ref, src in zip(outs, refs, srcs):
        assert torch.equal(out, ref) and out.dtype == ref.dtype and out.is_contiguous()
        assert out.numel() == 0 or out.data_ptr() != src.data_ptr()


def test_gather_mixed(kernels):
    _check_gather(kernels, *_gather_cases(_gen(7)))


def test_gather_many_matrices_one_group(kernels):
    """Seven fp16 row gathers in one launch: the binary search over the tile prefix sum picks each matrix."""
    gen = _gen(8)
    srcs = [torch.randn(r, c, generator=gen).half().to(DEVICE) for r, c in [(3, 5), (40, 300), (1, 1), (17, 9)] * 2]
    indices = [
        torch.randint(0, s.shape[0], (k,), generator=gen).to(DEVICE) for s, k in zip(srcs, [2, 33, 1, 0, 3, 17, 1, 9])
    ]
    _check_gather(kernels, srcs, indices, [0] * len(srcs))


def test_gather_cpu_indices_and_empty_list(kernels):
    srcs = [torch.randn(6, 4, device=DEVICE)]
    _check_gather(kernels, srcs, [torch.tensor([5, 1])], [0])
    assert kernels.gather([], [], []) == []


# ---------------------------------------------------------------------------------------------- registered ops


@pytest.mark.parametrize("act", reference.ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_edge_values_agree_with_the_reference(kernels, dtype, act):
    """NaN/±inf/±0/subnormal/±3e38 and [-30, 30]: counts and NaN pattern exactly as the reference backend."""
    for gate, up in edge_grids(dtype, DEVICE):
        up_finite = bool(up.isfinite().all())
        for u in (up, None):
            runs = []
            for backend in ("torch", "triton"):
                acc, nnz = _new_stats(gate.shape[1])
                runs.append((ops.act_stats(gate, u, act, acc, nnz, backend=backend), acc, nnz))
            exact = act in EXACT_ACTS
            u_cpu = None if u is None else u.cpu()
            assert_same_stats([x.cpu() for x in runs[1]], [x.cpu() for x in runs[0]], u_cpu, exact_values=exact,
                              nan_exact=exact or u is None or up_finite)


def test_same_inputs_same_bits(kernels):
    gen = _gen(9)
    gate, up = _randn((300, 150), torch.bfloat16, gen), _randn((300, 150), torch.bfloat16, gen)
    runs = []
    for _ in range(2):
        acc, nnz = _new_stats(150)
        runs.append((ops.act_stats(gate, up, "gelu", acc, nnz, backend="triton"), acc, nnz))
    assert all(torch.equal(x, y) for x, y in zip(*runs))


def opcheck_cases() -> dict[str, tuple]:
    """One call of every op on DEVICE."""
    gen = _gen(10)
    gate, up = _randn((2, 5, 19), torch.float32, gen), _randn((2, 5, 19), torch.float32, gen)
    ids = torch.randint(0, 50, (3, 7), generator=gen).to(DEVICE)
    w = _randn((9, 6), torch.float32, gen)
    return {
        "act_stats": (gate, up, "silu", reference.active_min("silu"), *_new_stats(19)),
        "column_stats": (up, *_new_stats(19)),
        "token_histogram": (ids, ids > 20, torch.zeros(50, dtype=torch.int64, device=DEVICE)),
        "gather": ([w, w.half()], [torch.tensor([8, 0, 3], device=DEVICE), torch.tensor([5, 1], device=DEVICE)],
                   [0, 1]),
    }


def test_opcheck(kernels):
    """The schemas of ``SCHEMAS``, and opcheck: in full on a GPU; under the CPU interpreter without the fake-tensor
    tests (fake tracing of a ``triton_op`` skips the launch on a GPU but runs the interpreter on fake tensors)."""
    utils = None if DEVICE == "cuda" else ("test_schema", "test_autograd_registration")
    for name, args in opcheck_cases().items():
        op = ops.get_op(name, "triton")
        schema = str(op.default._schema)
        assert re.sub(r"\(\w+!\)", "(!)", schema[schema.index("("):]) == re.sub(r"\(\w+!\)", "(!)", ops.SCHEMAS[name])
        torch.library.opcheck(op.default, args, **({} if utils is None else {"test_utils": utils}))


# ---------------------------------------------------------------------------------------------- dispatch


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU interpreter lane of minigpt.ops")
def test_ops_dispatch_to_triton_interpreter():
    """``minigpt.ops`` lists and runs the triton backend on CPU under TRITON_INTERPRET=1 (fresh process)."""
    script = textwrap.dedent(
        """
        import torch
        from minigpt import ops
        from minigpt.ops import reference
        assert "triton" in ops.available_backends("cpu"), ops.available_backends("cpu")
        g, u = torch.randn(2, 5, 19), torch.randn(2, 5, 19)
        acc, nnz = torch.zeros(3, 19), torch.zeros(19, dtype=torch.int64)
        acc_ref, nnz_ref = acc.clone(), nnz.clone()
        h = ops.act_stats(g, u, "relu", acc, nnz, backend="triton")
        h_ref = reference.act_stats_ref(g, u, "relu", acc_ref, nnz_ref)
        assert torch.equal(h, h_ref) and torch.equal(nnz, nnz_ref) and torch.equal(acc[2], acc_ref[2])
        torch.testing.assert_close(acc, acc_ref)
        counts = torch.zeros(10, dtype=torch.int64)
        ops.token_histogram(torch.tensor([1, 1, 9]), None, counts, backend="triton")
        assert counts.tolist() == [0, 2] + [0] * 7 + [1]
        out = ops.gather([g[0]], [torch.tensor([4, 0])], [0], backend="triton")
        assert torch.equal(out[0], g[0, [4, 0]])
        """
    )
    _run_interpreted([sys.executable, "-c", script])


def _run_interpreted(cmd: list[str]) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]


@pytest.mark.skipif(IN_PROCESS, reason="the interpreter lane runs in this process")
def test_interpreter_lane_in_subprocess():
    """Fallback when triton was imported before this module without the interpreter: run this file afresh."""
    _run_interpreted([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__])


# ---------------------------------------------------------------------------------------------- CUDA, real sizes


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("act", reference.ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_act_stats_cuda_large(kernels, dtype, act):
    gen = _gen(10)
    calls = [(_randn((2, 2048, 8192), dtype, gen), _randn((2, 2048, 8192), dtype, gen)) for _ in range(2)]
    check_act_stats(kernels, calls, act)


@gpu
@pytest.mark.gpu
def test_column_stats_cuda_large(kernels):
    x = _randn((8192, 4096), torch.bfloat16, _gen(11))
    acc, nnz = _new_stats(4096)
    acc_ref, nnz_ref = acc.clone(), nnz.clone()
    kernels.column_stats(x, acc, nnz)
    reference.column_stats_ref(x, acc_ref, nnz_ref)
    acc64, nnz64 = _stats64(x)
    assert torch.equal(nnz, nnz_ref) and torch.equal(nnz, nnz64) and torch.equal(acc[2], acc_ref[2])
    assert_close_to_exact(acc[:2], acc_ref[:2], acc64[:2], n_terms=x.shape[0])


@gpu
@pytest.mark.gpu
def test_token_histogram_cuda_large(kernels):
    gen = _gen(12)
    ids = torch.randint(0, 262_144, (64, 4096), generator=gen).cuda()
    mask = (torch.rand(ids.shape, generator=gen) < 0.9).cuda()
    _check_histogram(kernels, ids, [None, mask], 262_144)


@gpu
@pytest.mark.gpu
def test_gather_cuda_model_sized(kernels):
    """One pruning step of a 2k-hidden / 8k-intermediate model: gate/up rows, down columns, embedding rows."""
    gen = _gen(13)
    srcs, indices, dims = [], [], []
    for _ in range(4):
        gate, up, down = (
            torch.randn(s, generator=gen).to(torch.bfloat16).cuda() for s in [(8192, 2048)] * 2 + [(2048, 8192)]
        )
        keep = torch.randperm(8192, generator=gen)[:5000].sort().values.cuda()
        srcs += [gate, up, down]
        indices += [keep, keep, keep]
        dims += [0, 0, 1]
    srcs.append(torch.randn(49152, 2048, generator=gen).to(torch.bfloat16).cuda())
    indices.append(torch.randperm(49152, generator=gen)[:30001].cuda())
    dims.append(0)
    _check_gather(kernels, srcs, indices, dims)
    _check_gather(kernels, *_gather_cases(gen, device="cuda"))
