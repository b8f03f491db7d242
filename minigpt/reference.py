"""Plain-PyTorch reference of every minigpt op: the test oracle and the CPU fallback.

Statistics contract shared by every backend (see ``minigpt.ops``):

* ``acc``: ``(3, N)`` float32 accumulator, rows ``[Σ|h|, Σh², max|h|]`` over tokens.
* ``nnz``: ``(N,)`` int64 count of tokens where ``h != 0``.

All arithmetic happens in fp32 whatever the input dtype; the returned activation is rounded once
to the input dtype.
"""

from __future__ import annotations

import math

import torch

ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu", "identity")


def activation_ref(x: torch.Tensor, act: str) -> torch.Tensor:
    """Apply ``act`` to fp32 ``x``."""
    if act == "silu":
        return x * torch.sigmoid(x)
    if act == "gelu_tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
    if act == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    if act == "relu":
        return torch.clamp_min(x, 0.0)
    if act == "identity":
        return x
    raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(ACTIVATIONS)}")


def accumulate_stats_ref(h: torch.Tensor, acc: torch.Tensor, nnz: torch.Tensor) -> None:
    """Add the statistics of fp32 ``h: (T, N)`` into ``acc: (3, N)`` and ``nnz: (N,)`` in place."""
    if h.shape[0] == 0:
        return
    a = h.abs()
    acc[0] += a.sum(0)
    acc[1] += (h * h).sum(0)
    torch.maximum(acc[2], a.amax(0), out=acc[2])
    nnz += (h != 0).sum(0)


def act_stats_ref(
    gate: torch.Tensor, up: torch.Tensor | None, act: str, acc: torch.Tensor, nnz: torch.Tensor
) -> torch.Tensor:
    """Fused MLP activation with statistics.

    gate, up: (T, N) in fp32/fp16/bf16 (``up`` is None for non-gated MLPs).
    Returns h = act(gate) * up (or act(gate)), (T, N) in gate's dtype; updates acc/nnz with h's stats.
    """
    h = activation_ref(gate.float(), act)
    if up is not None:
        h = h * up.float()
    accumulate_stats_ref(h.reshape(-1, h.shape[-1]), acc, nnz)
    return h.to(gate.dtype)


def column_stats_ref(x: torch.Tensor, acc: torch.Tensor, nnz: torch.Tensor) -> None:
    """Statistics of every column of any ``x: (T, N)``, added into ``acc``/``nnz``."""
    accumulate_stats_ref(x.float().reshape(-1, x.shape[-1]), acc, nnz)


def token_histogram_ref(ids: torch.Tensor, mask: torch.Tensor | None, counts: torch.Tensor) -> None:
    """Add the counts of ``ids`` (any shape, integer in [0, V)) where ``mask`` is true into ``counts: (V,)`` int64."""
    flat = ids.reshape(-1)
    if mask is not None:
        flat = flat[mask.reshape(-1).bool()]
    counts += torch.bincount(flat.long(), minlength=counts.numel())  # ids >= V fail on the shape


def gather_ref(srcs: list[torch.Tensor], indices: list[torch.Tensor], dims: list[int]) -> list[torch.Tensor]:
    """For each i, ``srcs[i].index_select(dims[i], indices[i])`` as a new contiguous tensor (dims in {0, 1})."""
    return [s.index_select(d, i.to(s.device).long()).contiguous() for s, i, d in zip(srcs, indices, dims)]
