"""Fused MLP activation + per-column statistics (reference: ``minigpt.ops.reference.act_stats_ref``).

One pass over ``gate`` (and ``up``) writes ``h = act(gate) * up`` and adds ``[Σ|h|, Σh², max|h|]`` into
``acc: (3, N)`` fp32 and the count of active tokens (``minigpt.ops.reference.active_ref``) into ``nnz: (N,)`` int64.
Each program reduces a block of rows of one column block in fp32 registers and writes its partials to a scratch
row; the rows are then folded in a fixed order (no float atomics: the same inputs give the same bits on every
run). ``column_stats`` is the same kernel with the activation, ``up`` and the output compiled out. Launches run on
the inputs' device and its current stream.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from minigpt.ops.reference import ACTIVATIONS

from ._config import act_stats_config

_TWO_SQRT_2_OVER_PI = tl.constexpr(2.0 * math.sqrt(2.0 / math.pi))
_MINUS_RSQRT_2 = tl.constexpr(-1.0 / math.sqrt(2.0))


@triton.jit
def _erfc(z):
    """erfc(z) for fp32 ``z`` (Numerical Recipes erfcc, relative error about 1e-7; Triton has no erfc)."""
    a = tl.abs(z)
    t = 1.0 / (1.0 + 0.5 * a)
    p = 0.17087277
    p = p * t - 0.82215223
    p = p * t + 1.48851587
    p = p * t - 1.13520398
    p = p * t + 0.27886807
    p = p * t - 0.18628806
    p = p * t + 0.09678418
    p = p * t + 0.37409196
    p = p * t + 1.00002368
    p = p * t - 1.26551223
    r = t * tl.exp(p - a * a)
    return tl.where(z >= 0.0, r, 2.0 - r)


@triton.jit
def _activation(x, ACT: tl.constexpr):
    """``act(x)`` for fp32 ``x`` in the reference's cancellation-free forms; every activation maps 0 to 0."""
    if ACT == "silu":
        y = x * tl.sigmoid(x)
    elif ACT == "gelu_tanh":
        y = x * tl.sigmoid((x + 0.044715 * x * x * x) * _TWO_SQRT_2_OVER_PI)
    elif ACT == "gelu":
        y = 0.5 * x * _erfc(x * _MINUS_RSQRT_2)
    elif ACT == "relu":
        y = tl.where(x < 0.0, 0.0, x)  # NaN stays NaN (tl.maximum would drop it on a GPU)
    else:
        y = x
    return y


@triton.jit
def _to_bf16_bits(x):
    """Round fp32 ``x`` to bfloat16 (nearest, ties to even) and return the bits as int16.

    Done by hand because the CPU interpreter truncates fp32 -> bf16 casts; on GPU this is a few integer ops. NaN
    becomes torch's quiet NaN 0x7FC0 (the rounding add would carry a NaN's payload into the sign bit).
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _to_f32(raw):
    """The exact fp32 value of a loaded fp32/fp16/bf16 block (bf16 by bit shift: the CPU interpreter's bf16 cast
    flushes subnormals to zero, which would change the active counts)."""
    if raw.dtype == tl.bfloat16:
        return (raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return raw.to(tl.float32)


@triton.jit
def _is_number_nonzero(x):
    """``x`` is neither ±0 nor NaN, decided on its bits (exact even where a GPU flushes subnormals to zero)."""
    magnitude = x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    return (magnitude != 0) & (magnitude <= 0x7F800000)


@triton.jit
def _act_stats_kernel(
    gate_ptr,  # (T, N), column stride 1
    up_ptr,  # (T, N), column stride 1; unused unless HAS_UP
    out_ptr,  # (T, N) contiguous, gate's dtype (int16 bits for bf16); unused unless WRITE_OUT
    part_ptr,  # (programs along T, 3, N) fp32 contiguous: this program's [Σ|h|, Σh², max|h|] (NaN dropped from max)
    part_nnz_ptr,  # (programs along T, N) int64
    T,
    N,
    stride_gate,
    stride_up,
    active_min,  # fp32: the gate's lowest active value
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
        x = _to_f32(tl.load(gate_ptr + rows[:, None] * stride_gate + cols[None, :], mask=mask, other=0.0))
        h = _activation(x, ACT)
        active = (x >= active_min) & ((x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF) != 0)
        if HAS_UP:
            y = _to_f32(tl.load(up_ptr + rows[:, None] * stride_up + cols[None, :], mask=mask, other=0.0))
            h *= y
            active &= _is_number_nonzero(y)
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
        nonzero += active.to(tl.int32)  # masked lanes load gate 0: inactive
    part = part_ptr + tl.program_id(0).to(tl.int64) * 3 * N + cols
    tl.store(part, tl.sum(sum_abs, axis=0), mask=col_ok)
    tl.store(part + N, tl.sum(sum_sq, axis=0), mask=col_ok)
    tl.store(part + 2 * N, tl.max(max_abs, axis=0), mask=col_ok)
    tl.store(part_nnz_ptr + tl.program_id(0).to(tl.int64) * N + cols, tl.sum(nonzero, axis=0).to(tl.int64), mask=col_ok)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x: (..., N)`` as a 2-D ``(T, N)`` view (a copy only if needed) with unit column stride."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(1) == 1 else x.contiguous()


def _check_stats(acc: torch.Tensor, nnz: torch.Tensor, n: int, device: torch.device) -> None:
    if acc.shape != (3, n) or acc.dtype != torch.float32 or not acc.is_contiguous() or acc.device != device:
        raise ValueError(f"acc must be a contiguous float32 (3, {n}) tensor on {device}, got {acc.dtype} {acc.shape}")
    if nnz.shape != (n,) or nnz.dtype != torch.int64 or not nnz.is_contiguous() or nnz.device != device:
        raise ValueError(f"nnz must be a contiguous int64 ({n},) tensor on {device}, got {nnz.dtype} {nnz.shape}")


def on_device(x: torch.Tensor):
    """Context making ``x``'s GPU the current device, so a Triton launch uses its pointers' device and stream."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _fold_partials(acc: torch.Tensor, nnz: torch.Tensor, part: torch.Tensor, part_nnz: torch.Tensor) -> None:
    """acc (3, N) += the programs' partials part (P, 3, N) in a fixed order; NaN max where Σ|h| is NaN."""
    acc[:2] += part[:, :2].sum(0)
    part_max = torch.where(part[:, 0].isnan(), part[:, 0], part[:, 2])
    torch.maximum(acc[2], part_max.amax(0), out=acc[2])
    nnz += part_nnz.sum(0)


def _launch(
    x: torch.Tensor, up: torch.Tensor | None, act: str, active_min: float, acc: torch.Tensor, nnz: torch.Tensor,
    write_out: bool,
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
    part = torch.empty(grid[0], 3, n, dtype=torch.float32, device=x.device)
    part_nnz = torch.empty(grid[0], n, dtype=torch.int64, device=x.device)
    with on_device(x):
        wrap_triton(_act_stats_kernel)[grid](
            x2, up2, out_arg, part, part_nnz, t, n, x2.stride(0), up2.stride(0), active_min,
            ACT=act, HAS_UP=up is not None, WRITE_OUT=write_out, OUT_BF16=out_bf16, **cfg,
        )  # fmt: skip
    _fold_partials(acc, nnz, part, part_nnz)
    return out


def act_stats(
    gate: torch.Tensor, up: torch.Tensor | None, act: str, active_min: float, acc: torch.Tensor, nnz: torch.Tensor
) -> torch.Tensor:
    """h = act(gate) * up (or act(gate)) in gate's dtype, shaped like ``gate: (..., N)``; stats of fp32 h into
    ``acc: (3, N)``, count of tokens with gate >= ``active_min`` (and active) into ``nnz: (N,)``."""
    return _launch(gate, up, act, active_min, acc, nnz, write_out=True)


def column_stats(x: torch.Tensor, acc: torch.Tensor, nnz: torch.Tensor) -> None:
    """Statistics of every column of ``x: (..., N)`` added into ``acc: (3, N)`` and ``nnz: (N,)``."""
    _launch(x, None, "identity", -math.inf, acc, nnz, write_out=False)
