"""Launch heuristics of every minigpt Triton kernel, in one place.

All kernels are memory bound: blocks are sized for 16-byte accesses and enough programs to keep every SM of a
Hopper-class GPU busy, with per-program register accumulators small enough for several programs per SM.
The CPU interpreter runs the same configurations (its cost grows with the grid, so tests use tiny shapes).
"""

from __future__ import annotations

import triton

TARGET_PROGRAMS = 1024  # ~8 resident 4-warp programs on each of 132 SMs


def act_stats_config(n_rows: int, n_cols: int) -> dict[str, int]:
    """Tile (BLOCK_T, BLOCK_N) and rows per program for ``act_stats`` over a ``(n_rows, n_cols)`` input.

    Each program reduces ``ROWS_PER_PROG`` rows (BLOCK_T times a power of two) of one column block in registers, so
    the grid has about TARGET_PROGRAMS programs and each column gets ``n_rows / ROWS_PER_PROG`` atomic updates.
    """
    block_t = 16
    block_n = min(128, max(16, triton.next_power_of_2(n_cols)))
    tiles = triton.cdiv(n_rows, block_t) * triton.cdiv(n_cols, block_n)
    tiles_per_prog = min(64, 1 << (max(1, tiles // TARGET_PROGRAMS).bit_length() - 1))  # few compiled variants
    return {"BLOCK_T": block_t, "BLOCK_N": block_n, "ROWS_PER_PROG": block_t * tiles_per_prog, "num_warps": 4}


def histogram_config() -> dict[str, int]:
    """Tokens per program of ``token_histogram`` (one atomic per kept token)."""
    return {"BLOCK": 1024, "num_warps": 4}


def gather_config(elem_size: int) -> dict[str, int]:
    """Output tile of ``gather``: 16 rows of 512 bytes (8 KiB per program)."""
    return {"BLOCK_R": 16, "BLOCK_C": 512 // elem_size, "num_warps": 4}
