"""Every minigpt op, defined once with ``torch.library``, and the backends registered for it.

Each op has one schema (``SCHEMAS``) and one fake (shape-only) implementation, so ``torch.compile`` treats every
call as one opaque node (no graph break) and ``torch.library.opcheck`` can test every backend. A backend is a
namespace of registrations of those same schemas (``NAMESPACES``):

* ``torch``  – ``torch.ops.minigpt_torch.*``: ``minigpt.ops.reference`` (plain PyTorch, every device): the definition.
* ``cpp``    – ``torch.ops.minigpt.*`` on CPU tensors: the C++ kernels of ``minigpt._C`` (``csrc/cpu``), registered
  per device with ``TORCH_LIBRARY_IMPL``.
* ``cuda``   – the same ``torch.ops.minigpt.*`` on CUDA tensors (``csrc/cuda``), built only with CUDA torch.
* ``triton`` – ``torch.ops.minigpt_triton.*``: ``triton_op`` wrappers of ``minigpt.kernels`` (the repository's
  ``kernels/`` folder) on CUDA tensors, or on CPU under ``TRITON_INTERPRET=1`` (tests only).

``--backend`` forces one namespace; ``auto`` takes, per device, the first that loaded of ``AUTO_ORDER``: the
compiled extension first (no JIT, fewest moving parts), then Triton, then the reference. That order is a
preference, not a speed claim: ``bash bench/gpu_check.sh`` measures Triton against CUDA on a GPU.
"""

from __future__ import annotations

import functools
import logging
import os
import re

import torch

from minigpt.ops import reference

log = logging.getLogger("minigpt")

BACKENDS = ("auto", "triton", "cuda", "cpp", "torch")
SCHEMAS = {
    "act_stats": "(Tensor gate, Tensor? up, str act, float active_min, Tensor(a!) acc, Tensor(b!) nnz) -> Tensor",
    "column_stats": "(Tensor x, Tensor(a!) acc, Tensor(b!) nnz) -> ()",
    "token_histogram": "(Tensor ids, Tensor? mask, Tensor(a!) counts) -> ()",
    "gather": "(Tensor[] srcs, Tensor[] indices, int[] dims) -> Tensor[]",
}
OPS = tuple(SCHEMAS)
NAMESPACES = {"torch": "minigpt_torch", "cpp": "minigpt", "cuda": "minigpt", "triton": "minigpt_triton"}
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


def _act_stats_fake(gate, up, act, active_min, acc, nnz):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def _no_output_fake(*args):
    return None


def _gather_fake(srcs, indices, dims):
    return [s.new_empty((i.numel(), s.shape[1]) if d == 0 else (s.shape[0], i.numel()))
            for s, i, d in zip(srcs, indices, dims)]


FAKES = {"act_stats": _act_stats_fake, "column_stats": _no_output_fake, "token_histogram": _no_output_fake,
         "gather": _gather_fake}
_REFERENCE = {
    "act_stats": lambda gate, up, act, active_min, acc, nnz: reference.act_stats_ref(gate, up, act, acc, nnz,
                                                                                     active_min),
    "column_stats": reference.column_stats_ref,
    "token_histogram": reference.token_histogram_ref,
    "gather": reference.gather_ref,
}
_LIBRARIES: dict[str, torch.library.Library] = {}  # kept alive: a collected Library drops its registrations


def _define(namespace: str) -> torch.library.Library:
    """Define every op of ``SCHEMAS`` with its fake implementation in ``namespace`` (once)."""
    if namespace not in _LIBRARIES:
        lib = torch.library.Library(namespace, "FRAGMENT")
        for name, schema in SCHEMAS.items():
            lib.define(name + schema)
            torch.library.register_fake(f"{namespace}::{name}", FAKES[name], lib=lib)
        _LIBRARIES[namespace] = lib
    return _LIBRARIES[namespace]


def _mutated(schema: str) -> set[str]:
    """Names of the arguments ``schema`` marks as written, ``Tensor(a!) acc`` → ``acc``."""
    return set(re.findall(r"Tensor\(\w+!\) (\w+)", schema))


def _register_triton(kernels) -> None:
    """``minigpt_triton::*``: ``triton_op`` (traceable by ``torch.compile``, schema inferred from the launcher's
    annotations, checked against ``SCHEMAS`` by the tests) for the statistics and the histogram; ``custom_op`` with
    the shared fake for the gather, whose launch table holds raw addresses that fake tensors do not have."""
    namespace = NAMESPACES["triton"]
    for name in ("act_stats", "column_stats", "token_histogram"):
        torch.library.triton_op(f"{namespace}::{name}", getattr(kernels, name), mutates_args=_mutated(SCHEMAS[name]))
    gather_op = torch.library.custom_op(f"{namespace}::gather", kernels.gather, mutates_args=(),
                                        schema=SCHEMAS["gather"])
    gather_op.register_fake(FAKES["gather"])


@functools.cache
def _load(backend: str) -> bool:
    """Register ``backend``'s implementations; False (with one warning where unexpected) when it cannot load here."""
    if backend == "torch":
        lib = _define(NAMESPACES["torch"])
        for name, fn in _REFERENCE.items():
            lib.impl(name, fn, "CompositeExplicitAutograd")
        return True
    if backend in ("cpp", "cuda"):
        _define(NAMESPACES[backend])
        try:
            from minigpt import _C
        except ImportError as err:
            log.warning("minigpt: C++ extension not built (%s); using the PyTorch reference", err)
            return False
        return backend == "cpp" or bool(getattr(_C, "WITH_CUDA", False))
    if backend == "triton":
        if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
            return False
        try:
            from minigpt import kernels
        except ImportError as err:
            log.warning("minigpt: Triton kernels unavailable (%s)", err)
            return False
        _register_triton(kernels)
        return True
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device``, in ``auto``'s order of preference."""
    dev = torch.device(device).type
    order = AUTO_ORDER.get(dev, ("torch",))
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        order = order[:-1] + ("triton", "torch")
    return [b for b in order if _load(b)]


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


def get_op(name: str, backend: str) -> torch._ops.OpOverloadPacket:
    """The registered op ``name`` of a concrete (resolved) ``backend``, e.g. ``torch.ops.minigpt_triton.act_stats``."""
    if name not in SCHEMAS:
        raise ValueError(f"unknown op {name!r}; expected one of {', '.join(OPS)}")
    if not _load(backend):
        raise ValueError(f"backend {backend!r} is not available here")
    return getattr(getattr(torch.ops, NAMESPACES[backend]), name)


def act_stats(gate, up, act, acc, nnz, backend: str = "auto"):
    """h = act(gate) * up with Σ|h|, Σh², max|h| into ``acc: (3, N)`` and active-token counts into ``nnz: (N,)``
    (``minigpt.ops.reference`` defines both)."""
    op = get_op("act_stats", resolve_backend(backend, gate.device))
    return op(gate, up, act, reference.active_min(act), acc, nnz)


def column_stats(x, acc, nnz, backend: str = "auto") -> None:
    """Statistics of every column of ``x: (T, N)`` added into ``acc: (3, N)`` and ``nnz: (N,)``."""
    get_op("column_stats", resolve_backend(backend, x.device))(x, acc, nnz)


def token_histogram(ids, mask, counts, backend: str = "auto") -> None:
    """Add counts of ``ids`` where ``mask`` (or everywhere, if None) into int64 ``counts: (V,)``.

    On a GPU no backend synchronises to check the ids: one outside [0, V) is not counted (the counts then sum short
    of the tokens, which ``minigpt.pipeline.calibration`` checks at its checkpoints); on the CPU it raises.
    """
    get_op("token_histogram", resolve_backend(backend, ids.device))(ids, mask, counts)


def gather(srcs, indices, dims, backend: str = "auto"):
    """New dense tensors ``srcs[i].index_select(dims[i], indices[i])``, all in as few launches as possible.

    Indices on the CPU are range-checked there (IndexError) and each distinct one is copied to the device once.
    """
    if not srcs:
        return []
    moved: dict[tuple[int, torch.device], torch.Tensor] = {}
    on_device = []
    for s, i, d in zip(srcs, indices, dims):
        if i.device.type == "cpu" and i.numel() and s.dim() == 2 and (i.min() < 0 or i.max() >= s.shape[d]):
            raise IndexError(f"gather index out of range [0, {s.shape[d]}) along dim {d}")
        key = (id(i), s.device)
        if key not in moved:
            moved[key] = i.to(s.device, non_blocking=True)
        on_device.append(moved[key])
    return get_op("gather", resolve_backend(backend, srcs[0].device))(srcs, on_device, dims)
