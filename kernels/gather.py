"""Batched row / column gather of 2-D weight matrices (reference: ``minigpt.ops.reference.gather_ref``).

Launch plan: matrices are grouped by (device, element size, gathered dim); each group is ONE launch over the output
tiles of all its matrices. The gather is a bit copy, so fp16 and bf16 share a launch (moved as int16), and the dim is a
constexpr so row gathers keep contiguous, vectorisable rows. A host-built int64 table holds, per matrix, the
source and output addresses, the offset of its indices in one concatenated index tensor, its output shape, source
row stride and source extent along the gathered dim, followed by the prefix sum of tiles; each program finds its matrix by binary search in that
prefix sum. A pruning step (q/k/v/gate/up rows, o/down columns of every layer) is thus two launches instead of
hundreds of tiny ones, which matters for small models where launch latency would dominate the copy.
Indices are not range-checked here (that would synchronise with the GPU; ``minigpt.ops.gather`` checks them on the
host): an index outside the source leaves its output element unwritten instead of reading out of bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import gather_config
from .act_stats import on_device

_META = tl.constexpr(7)  # table columns: src address, out address, index offset, out rows, out cols, src row stride,
# src extent along DIM
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_TL_BITS = {1: tl.int8, 2: tl.int16, 4: tl.int32, 8: tl.int64}


@triton.jit
def _gather_kernel(
    table_ptr,  # (n_mats * _META + n_mats + 1,) int64: per-matrix rows, then the tile prefix sum
    idx_ptr,  # (Σ len(indices),) int64
    n_mats,
    n_search_steps,
    DIM: tl.constexpr,
    ELEM: tl.constexpr,
    VEC: tl.constexpr,  # every row stride is a multiple of VEC elements ...
    PTR_ALIGN: tl.constexpr,  # ... and every base address a multiple of VEC * itemsize bytes
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    starts = table_ptr + n_mats * _META
    lo = pid * 0  # invariant: starts[lo] <= pid < starts[hi]
    hi = lo + n_mats
    for _ in range(n_search_steps):
        mid = (lo + hi) // 2
        right = tl.load(starts + mid) <= pid
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    meta = table_ptr + lo * _META
    src = tl.multiple_of(tl.load(meta).to(tl.pointer_type(ELEM)), PTR_ALIGN)
    out = tl.multiple_of(tl.load(meta + 1).to(tl.pointer_type(ELEM)), PTR_ALIGN)
    idx = idx_ptr + tl.load(meta + 2)
    n_rows = tl.load(meta + 3)
    n_cols = tl.multiple_of(tl.load(meta + 4), VEC)
    src_stride = tl.multiple_of(tl.load(meta + 5), VEC)
    src_extent = tl.load(meta + 6)

    tile = pid - tl.load(starts + lo)
    col_tiles = tl.cdiv(n_cols, BLOCK_C)
    rows = (tile // col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (tile % col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    if DIM == 0:
        src_rows = tl.load(idx + rows, mask=row_ok, other=0)
        src_cols = cols
        row_ok &= (src_rows >= 0) & (src_rows < src_extent)
    else:
        src_rows = rows
        src_cols = tl.load(idx + cols, mask=col_ok, other=0)
        col_ok &= (src_cols >= 0) & (src_cols < src_extent)
    mask = row_ok[:, None] & col_ok[None, :]
    vals = tl.load(src + src_rows[:, None] * src_stride + src_cols[None, :], mask=mask)
    tl.store(out + rows[:, None] * n_cols + cols[None, :], vals, mask=mask)


def _vector_width(elem_size: int, values: list[int]) -> int:
    """Largest power-of-two element count <= 16 bytes dividing every value (strides and element addresses)."""
    vec = 16 // elem_size
    while vec > 1 and any(v % vec for v in values):
        vec //= 2
    return vec


def _launch_group(srcs: list[torch.Tensor], outs: list[torch.Tensor], idx: list[torch.Tensor], dim: int) -> None:
    """One launch gathering ``srcs[k]`` (2-D, unit column stride) along ``dim`` into ``outs[k]`` (all same itemsize)."""
    elem = srcs[0].element_size()
    cfg = gather_config(elem)
    device = srcs[0].device
    meta, starts, aligned, offset, tiles = [], [], [], 0, 0
    for s, o, i in zip(srcs, outs, idx):
        meta += [s.data_ptr(), o.data_ptr(), offset, o.shape[0], o.shape[1], s.stride(0), s.shape[dim]]
        aligned += [s.data_ptr() // elem, o.data_ptr() // elem, o.shape[1], s.stride(0)]
        starts.append(tiles)
        offset += i.numel()
        tiles += triton.cdiv(o.shape[0], cfg["BLOCK_R"]) * triton.cdiv(o.shape[1], cfg["BLOCK_C"])
    table = torch.tensor(meta + starts + [tiles], dtype=torch.int64).to(device)
    vec = _vector_width(elem, aligned)
    with on_device(srcs[0]):
        _gather_kernel[(tiles,)](
            table, torch.cat(idx), len(srcs), (len(srcs) - 1).bit_length(),
            DIM=dim, ELEM=_TL_BITS[elem], VEC=vec, PTR_ALIGN=vec * elem, **cfg,
        )  # fmt: skip


def gather(srcs: list[torch.Tensor], indices: list[torch.Tensor], dims: list[int]) -> list[torch.Tensor]:
    """For each i, ``srcs[i].index_select(dims[i], indices[i])`` as a new contiguous tensor.

    srcs: 2-D tensors (any dtype); indices: 1-D integer tensors (any device) in [0, size along dim) (not checked:
    outside, the output element is left unwritten); dims: 0 (rows) or 1 (columns). One launch per (device, element
    size, dim) group.
    """
    if not (len(srcs) == len(indices) == len(dims)):
        raise ValueError("srcs, indices and dims must have the same length")
    outs, groups = [], {}
    for s, i, d in zip(srcs, indices, dims):
        if s.dim() != 2 or d not in (0, 1, -1, -2):
            raise ValueError(f"gather needs 2-D sources and dims in {{0, 1}}, got {tuple(s.shape)} along {d}")
        d %= 2
        i = i.to(device=s.device, dtype=torch.int64).reshape(-1)
        out = torch.empty(
            (i.numel(), s.shape[1]) if d == 0 else (s.shape[0], i.numel()), dtype=s.dtype, device=s.device
        )
        outs.append(out)
        if out.numel():
            bits = _BITS[s.element_size()]
            group = groups.setdefault((s.device, s.element_size(), d), ([], [], []))
            group[0].append((s if s.stride(1) == 1 else s.contiguous()).view(bits))
            group[1].append(out.view(bits))
            group[2].append(i)
    for (_, _, d), (group_srcs, group_outs, group_idx) in groups.items():
        _launch_group(group_srcs, group_outs, group_idx, d)
    return outs
