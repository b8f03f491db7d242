"""Token histogram (reference: ``minigpt.ops.reference.token_histogram_ref``).

One int64 atomic add per kept token straight into ``counts``: exact (integer atomics commute), any vocabulary size
(no shared-memory bins), and the mask is applied in the kernel instead of compacting the ids first. Ids outside
[0, V) are not counted and not checked on the host (no synchronisation; see ``minigpt.ops.token_histogram``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._config import histogram_config
from .act_stats import on_device


@triton.jit
def _token_histogram_kernel(
    ids_ptr,  # (n,) integer token ids
    mask_ptr,  # (n,) any dtype, nonzero = count the token; unused unless HAS_MASK
    counts_ptr,  # (V,) int64
    n,
    V,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    ids = tl.load(ids_ptr + offs, mask=inside, other=0).to(tl.int64)
    keep = inside & (ids >= 0) & (ids < V)
    if HAS_MASK:
        keep &= tl.load(mask_ptr + offs, mask=inside, other=0) != 0
    tl.atomic_add(counts_ptr + ids, tl.full((BLOCK,), 1, tl.int64), mask=keep, sem="relaxed")


def token_histogram(ids: torch.Tensor, mask: torch.Tensor | None, counts: torch.Tensor) -> None:
    """Add the counts of ``ids`` (any shape, values in [0, V)) where ``mask`` (same shape, or None = everywhere) is
    nonzero into ``counts: (V,)`` int64. Ids outside [0, V) are not counted."""
    if counts.dtype != torch.int64 or counts.dim() != 1 or not counts.is_contiguous() or counts.device != ids.device:
        raise ValueError(f"counts must be a contiguous int64 (V,) tensor on {ids.device}")
    if mask is not None and (mask.shape != ids.shape or mask.device != ids.device):
        raise ValueError(f"mask {tuple(mask.shape)} must match ids {tuple(ids.shape)} on {ids.device}")
    flat = ids.reshape(-1)
    if flat.numel() == 0:
        return
    flat_mask = flat if mask is None else mask.reshape(-1)
    if flat_mask.dtype == torch.bool:
        flat_mask = flat_mask.view(torch.uint8)
    cfg = histogram_config()
    grid = (triton.cdiv(flat.numel(), cfg["BLOCK"]),)
    with on_device(flat):
        wrap_triton(_token_histogram_kernel)[grid](
            flat, flat_mask, counts, flat.numel(), counts.numel(), HAS_MASK=mask is not None, **cfg
        )
