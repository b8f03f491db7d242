"""torch.distributed for calibration: process-group set-up under ``torchrun`` and all-reduce of statistics.

Each rank streams its own shard of the corpus; ``all_reduce_stats`` sums every rank's ``CalibrationStats``
(maximum for ``max_abs``). Collectives run on the CPU with gloo, on the rank's GPU with NCCL; the statistics
themselves may live on any device (with ``device_map="auto"`` each layer's on its own GPU).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from minigpt.errors import MiniGPTError
from minigpt.pipeline.stats import CalibrationStats


def launched() -> bool:
    """True in a process started by ``torchrun`` (or any launcher setting ``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str) -> str:
    """Join the process group ``torchrun`` describes (NCCL for CUDA, gloo otherwise); returns this rank's device.

    ``cuda`` becomes ``cuda:LOCAL_RANK``. Does nothing outside ``torchrun`` or when a group already exists.
    """
    if not launched() or dist.is_initialized():
        return device
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if device == "cuda" else device
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return device


def teardown(finished: bool) -> None:
    """Leave the process group; after a ``finished`` run, only once every rank has (a barrier first), so that no
    rank tears its connections down while another still uses them (gloo aborted a rank exiting early)."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(values: list[int]) -> list[int]:
    """Element-wise sum of an int list over the ranks (the list itself without a process group)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_stats(stats: CalibrationStats) -> CalibrationStats:
    """Every rank's ``stats`` summed (max for ``max_abs``), returned on every rank as a new CPU copy.

    Three collectives, one per dtype: float64 sums ``Σ_l 2·N_l``, float32 maxima ``Σ_l N_l``, int64 counts
    ``Σ_l N_l + V + 1`` (non-zero counts, token histogram, tokens).
    """
    if not dist.is_initialized():
        return stats.to("cpu")
    dev = _comm_device()
    flat = lambda ts: torch.cat([t.reshape(-1).to(dev) for t in ts])
    sums = flat(stats.sum_abs + stats.sum_sq)
    maxima = flat(stats.max_abs)
    counts = flat([*stats.nonzero, stats.token_counts, torch.tensor([stats.tokens], dtype=torch.int64)])
    for t, op in ((sums, dist.ReduceOp.SUM), (maxima, dist.ReduceOp.MAX), (counts, dist.ReduceOp.SUM)):
        dist.all_reduce(t, op=op)
    widths = [t.numel() for t in stats.sum_abs]
    n = len(widths)
    split = lambda t, sizes: [part.clone() for part in t.cpu().split(sizes)]  # own storage, as save_file wants
    split_sums = split(sums, widths * 2)
    split_counts = split(counts, [*widths, stats.token_counts.numel(), 1])
    names = sorted(stats.sums)  # heads, hidden channels, layers (minigpt.pipeline.taps): one more sum
    extra = split(all_sum_tensor(flat([stats.sums[k] for k in names])), [stats.sums[k].numel() for k in names]) \
        if names else []
    extra = [part.view(stats.sums[k].shape) for part, k in zip(extra, names)]  # the attention Gram is 2-D
    return CalibrationStats(
        sum_abs=split_sums[:n], sum_sq=split_sums[n:], max_abs=split(maxima, widths),
        nonzero=split_counts[:n], token_counts=split_counts[n], tokens=int(split_counts[n + 1]),
        fingerprint=dict(stats.fingerprint), meta=dict(stats.meta), sums=dict(zip(names, extra)),
        **_all_reduce_gram(stats, dev),
    )


def all_sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks, in place."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _all_reduce_gram(stats: CalibrationStats, dev: torch.device) -> dict:
    """The summed Gram fields (one all-reduce per layer's ``(N, N)`` matrix, not one huge buffer), or {}."""
    if stats.gram is None:
        return {}
    summed = []
    for t in (*stats.gram, *stats.gram_sum, torch.tensor([float(stats.gram_tokens)], dtype=torch.float64)):
        t = t.to(dev, copy=True)
        dist.all_reduce(t)
        summed.append(t.cpu())
    n = len(stats.gram)
    return {"gram": summed[:n], "gram_sum": summed[n:2 * n], "gram_tokens": int(summed[-1])}


def check_local_world_for_device_map(device_map) -> None:
    """A model spread over a node's GPUs (``device_map``) needs the node to itself: one process per node."""
    if device_map is not None and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise MiniGPTError("--device-map spreads one model over the node's GPUs: launch one process per node "
                           "(torchrun --nproc_per_node 1 --nnodes N ...)")
