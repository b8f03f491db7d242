"""Plain-PyTorch reference of every minigpt op: the test oracle, the CPU fallback and the definition.

Statistics contract shared by every backend (see ``minigpt.ops``):

* ``acc``: ``(3, N)`` float32 accumulator, rows ``[Σ|h|, Σh², max|h|]`` over tokens. Any NaN ``h`` makes its
  column's three statistics NaN; ±inf propagates as IEEE arithmetic says.
* ``nnz``: ``(N,)`` int64 count of tokens where the neuron is *active* (``active_ref``): its gate is a number at or
  above the activation's ``active_min`` and not ±0, and (gated MLPs) its up projection is a non-zero number. For
  ReLU and identity this is exactly ``h != 0`` (NaN excluded); for the smooth activations it is
  ``|act(gate)| > FREQ_EPS`` decided on the gate, so every backend counts the same tokens bit for bit whatever
  its exp/erf, instead of counting fp32 underflow.

All arithmetic happens in fp32 whatever the input dtype; the returned activation is rounded once
to the input dtype.
"""

from __future__ import annotations

import functools
import math
import struct

import torch

ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu", "identity")
# |act(x)| at or below this counts as "off" for --metric freq (about 1e-6: far below any activation that matters,
# far above fp32 underflow)
FREQ_EPS = 2.0**-20


def activation_ref(x: torch.Tensor, act: str) -> torch.Tensor:
    """Apply ``act`` to fp32 ``x``, in forms without cancellation so that the negative tail is accurate (not rounded
    to 0 by 1 + tanh or 1 + erf): 0.5x(1 + tanh u) = x·σ(2u), 0.5x(1 + erf(x/√2)) = 0.5x·erfc(-x/√2)."""
    if act == "silu":
        return x * torch.sigmoid(x)
    if act == "gelu_tanh":
        return x * torch.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x))
    if act == "gelu":
        return 0.5 * x * torch.erfc(x * (-1.0 / math.sqrt(2.0)))
    if act == "relu":
        return torch.clamp_min(x, 0.0)
    if act == "identity":
        return x
    raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(ACTIVATIONS)}")


def _tail_abs(x: float, act: str) -> float:
    """|act(x)| in fp64 for x < -1.5, where every smooth activation decreases in magnitude towards -inf."""
    if act == "silu":
        return -x / (1.0 + math.exp(min(-x, 700.0)))
    if act == "gelu_tanh":
        return -x / (1.0 + math.exp(min(-2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3), 700.0)))
    return -0.5 * x * math.erfc(-x / math.sqrt(2.0))


@functools.cache
def active_min(act: str) -> float:
    """The fp32 gate value from which ``act`` counts as active: -inf (identity), 0 (relu), else the lowest fp32
    x < -1.5 with |act(x)| > FREQ_EPS in fp64."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(ACTIVATIONS)}")
    if act == "identity":
        return -math.inf
    if act == "relu":
        return 0.0
    lo, hi = -200.0, -1.5
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _tail_abs(mid, act) <= FREQ_EPS else (lo, mid)
    bits = struct.unpack("<I", struct.pack("<f", hi))[0]  # nearest fp32; one step towards 0 if that is still off
    lowest = struct.unpack("<f", struct.pack("<I", bits))[0]
    if _tail_abs(lowest, act) <= FREQ_EPS:
        lowest = struct.unpack("<f", struct.pack("<I", bits - 1))[0]
    return lowest


def is_number_nonzero(x: torch.Tensor) -> torch.Tensor:
    """``x != 0`` and not NaN (bool, same shape)."""
    return (x < 0) | (x > 0)


def active_ref(gate: torch.Tensor, up: torch.Tensor | None, act: str, lowest: float | None = None) -> torch.Tensor:
    """Where each neuron counts as active (bool, gate's shape); gate, up fp32; ``lowest`` defaults to
    ``active_min(act)``."""
    active = (gate >= (active_min(act) if lowest is None else lowest)) & (gate != 0)
    return active if up is None else active & is_number_nonzero(up)


def accumulate_stats_ref(h: torch.Tensor, active: torch.Tensor, acc: torch.Tensor, nnz: torch.Tensor) -> None:
    """Add the statistics of fp32 ``h: (T, N)`` and the count of ``active: (T, N)`` into ``acc: (3, N)`` and
    ``nnz: (N,)`` in place."""
    if h.shape[0] == 0:
        return
    a = h.abs()
    acc[0] += a.sum(0)
    acc[1] += (h * h).sum(0)
    torch.maximum(acc[2], a.amax(0), out=acc[2])
    nnz += active.sum(0)


def act_stats_ref(
    gate: torch.Tensor, up: torch.Tensor | None, act: str, acc: torch.Tensor, nnz: torch.Tensor,
    lowest: float | None = None,
) -> torch.Tensor:
    """Fused MLP activation with statistics.

    gate, up: (T, N) in fp32/fp16/bf16 (``up`` is None for non-gated MLPs).
    Returns h = act(gate) * up (or act(gate)), (T, N) contiguous in gate's dtype; updates acc with h's statistics and nnz
    with the count of active tokens (``active_ref``; ``lowest``: the op's ``active_min`` argument).
    """
    g = gate.float()
    u = None if up is None else up.float()
    h = activation_ref(g, act)
    if u is not None:
        h = h * u
    n = gate.shape[-1]
    accumulate_stats_ref(h.reshape(-1, n), active_ref(g, u, act, lowest).reshape(-1, n), acc, nnz)
    # a new contiguous tensor, as every backend returns (never gate itself: identity of fp32)
    return h.to(gate.dtype, memory_format=torch.contiguous_format, copy=h is gate)


def column_stats_ref(x: torch.Tensor, acc: torch.Tensor, nnz: torch.Tensor) -> None:
    """Statistics of every column of any ``x: (T, N)``, added into ``acc``/``nnz`` (nnz counts non-zero numbers)."""
    x = x.float().reshape(-1, x.shape[-1])
    accumulate_stats_ref(x, is_number_nonzero(x), acc, nnz)


def token_histogram_ref(ids: torch.Tensor, mask: torch.Tensor | None, counts: torch.Tensor) -> None:
    """Add the counts of ``ids`` (any shape, integer in [0, V)) where ``mask`` is true into ``counts: (V,)`` int64."""
    flat = ids.reshape(-1)
    if mask is not None:
        flat = flat[mask.reshape(-1).bool()]
    counts += torch.bincount(flat.long(), minlength=counts.numel())  # ids >= V fail on the shape


def gather_ref(srcs: list[torch.Tensor], indices: list[torch.Tensor], dims: list[int]) -> list[torch.Tensor]:
    """For each i, ``srcs[i].index_select(dims[i], indices[i])`` as a new contiguous tensor (dims in {0, 1})."""
    return [s.index_select(d, i.to(s.device).long()).contiguous() for s, i, d in zip(srcs, indices, dims)]
