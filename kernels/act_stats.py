"""Fused MLP activation + per-column statistics (reference: ``minigpt.reference.act_stats_ref``).

One pass over ``gate`` (and ``up``) writes ``h = act(gate) * up`` and adds ``[Σ|h|, Σh², max|h|]`` into
``acc: (3, N)`` fp32 and the count of ``h != 0`` into ``nnz: (N,)`` int64. Each program reduces a block of rows of
one column block in fp32 registers, then issues one atomic add / max per column and statistic. ``column_stats`` is
the same kernel with the activation, ``up`` and the output compiled out.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from minigpt.reference import ACTIVATIONS

from ._config import act_stats_config

_TWO_SQRT_2_OVER_PI = tl.constexpr(2.0 * math.sqrt(2.0 / math.pi))
_RSQRT_2 = tl.constexpr(1.0 / math.sqrt(2.0))


@triton.jit
def _activation(x, ACT: tl.constexpr):
    """``act(x)`` for fp32 ``x``; every activation maps 0 to 0, so masked (zero) lanes add nothing to the stats."""
    if ACT == "silu":
        y = x * tl.sigmoid(x)
    elif ACT == "gelu_tanh":
        # tanh(u) = 2 σ(2u) - 1, kept in the reference's 0.5 x (1 + tanh(u)) form (not x σ(2u)) so that h rounds to
        # exactly 0 for the same very negative x as every other backend: nnz must agree
        tanh = 2.0 * tl.sigmoid((x + 0.044715 * x * x * x) * _TWO_SQRT_2_OVER_PI) - 1.0
        y = 0.5 * x * (1.0 + tanh)
    elif ACT == "gelu":
        y = 0.5 * x * (1.0 + tl.erf(x * _RSQRT_2))
    elif ACT == "relu":
        y = tl.maximum(x, 0.0)
    else:
        y = x
    return y


@triton.jit
def _to_bf16_bits(x):
    """Round fp32 ``x`` to bfloat16 (nearest, ties to even) and return the bits as int16.

    Done by hand because the CPU interpreter truncates fp32 -> bf16 casts; on GPU this is a few integer ops.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return bits.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _act_stats_kernel(
    gate_ptr,  # (T, N), column stride 1
    up_ptr,  # (T, N), column stride 1; unused unless HAS_UP
    out_ptr,  # (T, N) contiguous, gate's dtype (int16 bits for bf16); unused unless WRITE_OUT
    acc_ptr,  # (3, N) fp32 contiguous
    nnz_ptr,  # (N,) int64
    T,
    N,
    stride_gate,
    stride_up,
    ACT: tl.constexpr,
    HAS_UP: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    OUT_BF16: tl.constexpr,
    ROWS_PER_PROG: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row_start = tl.program_id(0).to(tl.int64) * ROWS_PER_PROG
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    sum_abs = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
    sum_sq = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
    max_abs = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
    nonzero = tl.zeros((BLOCK_T, BLOCK_N), tl.int32)
    for r in range(0, ROWS_PER_PROG, BLOCK_T):
        rows = row_start + r + tl.arange(0, BLOCK_T)
        mask = (rows < T)[:, None] & col_ok[None, :]
        x = tl.load(gate_ptr + rows[:, None] * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = _activation(x, ACT)
        if HAS_UP:
            h *= tl.load(up_ptr + rows[:, None] * stride_up + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if WRITE_OUT:
            out = out_ptr + rows[:, None] * N + cols[None, :]
            if OUT_BF16:
                tl.store(out, _to_bf16_bits(h), mask=mask)
            else:
                tl.store(out, h.to(out_ptr.dtype.element_ty), mask=mask)
        a = tl.abs(h)
        sum_abs += a
        sum_sq += h * h
        max_abs = tl.maximum(max_abs, a)
        nonzero += (h != 0.0).to(tl.int32)
    tl.atomic_add(acc_ptr + cols, tl.sum(sum_abs, axis=0), mask=col_ok, sem="relaxed")
    tl.atomic_add(acc_ptr + N + cols, tl.sum(sum_sq, axis=0), mask=col_ok, sem="relaxed")
    tl.atomic_max(acc_ptr + 2 * N + cols, tl.max(max_abs, axis=0), mask=col_ok, sem="relaxed")  # |h| >= 0
    tl.atomic_add(nnz_ptr + cols, tl.sum(nonzero, axis=0).to(tl.int64), mask=col_ok, sem="relaxed")


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x: (..., N)`` as a 2-D ``(T, N)`` view (a copy only if needed) with unit column stride."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(1) == 1 else x.contiguous()


def _check_stats(acc: torch.Tensor, nnz: torch.Tensor, n: int, device: torch.device) -> None:
    if acc.shape != (3, n) or acc.dtype != torch.float32 or not acc.is_contiguous() or acc.device != device:
        raise ValueError(f"acc must be a contiguous float32 (3, {n}) tensor on {device}, got {acc.dtype} {acc.shape}")
    if nnz.shape != (n,) or nnz.dtype != torch.int64 or not nnz.is_contiguous() or nnz.device != device:
        raise ValueError(f"nnz must be a contiguous int64 ({n},) tensor on {device}, got {nnz.dtype} {nnz.shape}")


def _launch(
    x: torch.Tensor, up: torch.Tensor | None, act: str, acc: torch.Tensor, nnz: torch.Tensor, write_out: bool
) -> torch.Tensor | None:
    """Run the kernel over ``x: (..., N)`` (and ``up``, same shape); returns ``h`` (shaped like x) if ``write_out``."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(ACTIVATIONS)}")
    if up is not None and (up.shape != x.shape or up.device != x.device):
        raise ValueError(f"up {tuple(up.shape)} must match gate {tuple(x.shape)} on {x.device}")
    n = x.shape[-1]
    _check_stats(acc, nnz, n, x.device)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if write_out else None
    if x.numel() == 0:
        return out
    x2 = _as_rows(x)
    up2 = _as_rows(up) if up is not None else x2
    t = x2.shape[0]
    cfg = act_stats_config(t, n)
    out_bf16 = out is not None and out.dtype == torch.bfloat16
    out_arg = x2 if out is None else out.view(torch.int16) if out_bf16 else out
    grid = (triton.cdiv(t, cfg["ROWS_PER_PROG"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _act_stats_kernel[grid](
        x2, up2, out_arg, acc, nnz, t, n, x2.stride(0), up2.stride(0),
        ACT=act, HAS_UP=up is not None, WRITE_OUT=write_out, OUT_BF16=out_bf16, **cfg,
    )  # fmt: skip
    return out


def act_stats(
    gate: torch.Tensor, up: torch.Tensor | None, act: str, acc: torch.Tensor, nnz: torch.Tensor
) -> torch.Tensor:
    """h = act(gate) * up (or act(gate)) in gate's dtype, shaped like ``gate: (..., N)``; stats of fp32 h into
    ``acc: (3, N)`` and ``nnz: (N,)``."""
    return _launch(gate, up, act, acc, nnz, write_out=True)


def column_stats(x: torch.Tensor, acc: torch.Tensor, nnz: torch.Tensor) -> None:
    """Statistics of every column of ``x: (..., N)`` added into ``acc: (3, N)`` and ``nnz: (N,)``."""
    _launch(x, None, "identity", acc, nnz, write_out=False)
