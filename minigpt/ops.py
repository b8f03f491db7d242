"""Every minigpt op in one namespace, dispatched to a backend.

Backends (``BACKENDS``):

* ``torch``  – ``minigpt.reference`` (plain PyTorch): the oracle, always available.
* ``cpp``    – ``minigpt._C`` C++/OpenMP kernels from ``csrc/`` (CPU tensors), ops ``torch.ops.minigpt.*``.
* ``cuda``   – the same ``torch.ops.minigpt.*`` ops on CUDA tensors (``csrc/*.cu``), built only with CUDA torch.
* ``triton`` – ``minigpt.kernels`` (the repository's ``kernels/`` folder), on CUDA tensors, or on CPU under
  ``TRITON_INTERPRET=1`` (tests only).

``auto`` picks, per device, the fastest backend that loaded: CUDA → triton, cuda, torch; CPU → cpp, torch.
Every op has the signature of its reference in ``minigpt.reference``.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch

from minigpt import reference

log = logging.getLogger("minigpt")

BACKENDS = ("auto", "triton", "cuda", "cpp", "torch")
OPS = ("act_stats", "column_stats", "token_histogram", "gather")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}


@functools.cache
def _impls(backend: str) -> dict[str, Callable] | None:
    """The op table of ``backend``, or None (with one warning) when it cannot load here."""
    if backend == "torch":
        return {op: getattr(reference, f"{op}_ref") for op in OPS}
    if backend in ("cpp", "cuda"):
        try:
            from minigpt import _C
        except ImportError as err:
            log.warning("minigpt: C++ extension not built (%s); using the PyTorch reference", err)
            return None
        if backend == "cuda" and not getattr(_C, "WITH_CUDA", False):
            return None
        return {op: getattr(torch.ops.minigpt, op) for op in OPS}
    if backend == "triton":
        if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
            return None
        try:
            from minigpt import kernels
        except ImportError as err:
            log.warning("minigpt: Triton kernels unavailable (%s)", err)
            return None
        return {op: getattr(kernels, op) for op in OPS}
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device``, fastest first."""
    dev = torch.device(device).type
    order = _AUTO_ORDER.get(dev, ("torch",))
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        order = order[:-1] + ("triton", "torch")
    return [b for b in order if _impls(b) is not None]


def resolve_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """Turn ``auto`` into a concrete backend for ``device``; refuse one that cannot run there."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    usable = available_backends(device)
    if backend == "auto":
        return usable[0]
    if backend not in usable:
        raise ValueError(
            f"backend {backend!r} is not available on {torch.device(device).type} here; available: {', '.join(usable)}"
        )
    return backend


def get_op(name: str, backend: str) -> Callable:
    """The implementation of op ``name`` for a concrete (resolved) ``backend``."""
    table = _impls(backend)
    if table is None:
        raise ValueError(f"backend {backend!r} is not available here")
    return table[name]


def act_stats(gate, up, act, acc, nnz, backend: str = "auto"):
    """h = act(gate) * up with Σ|h|, Σh², max|h| into ``acc: (3, N)`` and non-zero counts into ``nnz: (N,)``."""
    return get_op("act_stats", resolve_backend(backend, gate.device))(gate, up, act, acc, nnz)


def column_stats(x, acc, nnz, backend: str = "auto") -> None:
    """Statistics of every column of ``x: (T, N)`` added into ``acc: (3, N)`` and ``nnz: (N,)``."""
    get_op("column_stats", resolve_backend(backend, x.device))(x, acc, nnz)


def token_histogram(ids, mask, counts, backend: str = "auto") -> None:
    """Add counts of ``ids`` where ``mask`` (or everywhere, if None) into int64 ``counts: (V,)``."""
    get_op("token_histogram", resolve_backend(backend, ids.device))(ids, mask, counts)


def gather(srcs, indices, dims, backend: str = "auto"):
    """New dense tensors ``srcs[i].index_select(dims[i], indices[i])``, all in as few launches as possible."""
    if not srcs:
        return []
    return get_op("gather", resolve_backend(backend, srcs[0].device))(srcs, indices, dims)
