"""Expert statistics over a corpus: streamed (``moe.collect``), summed over ``torchrun`` ranks, checkpointed and
resumed like the dense calibration (``minigpt.pipeline.calibration``)."""

from __future__ import annotations

import os

import torch

from minigpt.errors import MiniGPTError
from minigpt.pipeline.moe import MAXIMA, MoEStats, collect, fingerprint
from minigpt.pipeline.stats import check_fingerprint, content_hash


def all_reduce(stats: MoEStats) -> MoEStats:
    """Every rank's statistics summed (maxima: the max), in place on every rank; unchanged without a process group."""
    import torch.distributed as dist

    from minigpt.pipeline import distributed

    if not dist.is_initialized():
        return stats
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    for layer in stats.layers:
        for key in sorted(layer):  # the same order on every rank (a restored checkpoint's keys come sorted)
            t = layer[key].to(device or layer[key].device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX if key in MAXIMA else dist.ReduceOp.SUM)
            layer[key] = t.cpu()
    stats.tokens = distributed.all_sum([stats.tokens])[0]
    return stats


def _restore(checkpoint, resume: bool, fp: dict, run: dict) -> tuple[MoEStats, list[int]] | None:
    """The summed statistics and every rank's stream position (sequences) saved in ``checkpoint`` by an interrupted
    run of ``run`` (None when there is none)."""
    if checkpoint is None or not os.path.exists(checkpoint):
        return None
    if not resume:
        raise MiniGPTError(f"checkpoint {checkpoint} exists from an interrupted run: pass --resume to continue it, "
                           "or delete it")
    saved = MoEStats.load(checkpoint)
    check_fingerprint(saved.fingerprint, fp, "the checkpoint's expert statistics")
    state = saved.meta.pop("checkpoint", None) or {}
    if state.get("run") != run:
        raise MiniGPTError(f"checkpoint {checkpoint} belongs to another run; delete it to start over")
    return saved, state["positions"]


def _summed(stats: MoEStats) -> MoEStats:
    """A copy of ``stats`` summed over the ranks (``stats`` itself unchanged)."""
    copy = MoEStats([{k: t.clone() for k, t in layer.items()} for layer in stats.layers], stats.tokens,
                    dict(stats.fingerprint), dict(stats.meta))
    return all_reduce(copy)


def calibrate_moe(model, tokenizer, data=None, *, max_tokens: int | None = 16384, seq_len: int = 512,
                  batch_size: int = 8, text_field: str = "text", seed: int | None = 0, doc_tokens: int | None = None,
                  backend: str = "auto", checkpoint: str | os.PathLike | None = None,
                  checkpoint_every: int | None = None, resume: bool = False) -> MoEStats:
    """Routing and expert statistics of ``model`` over the corpus ``data`` (files, dirs or corpus names).

    Under ``torchrun`` each rank streams its own shard of the documents and its part of ``max_tokens``; every rank
    returns the summed statistics. ``checkpoint`` is rewritten atomically (by rank 0) every ``checkpoint_every``
    tokens (all ranks together) with the summed statistics and every rank's stream position; ``resume=True``
    continues from it (rank 0 holds the restored sums, every rank skips what it had read) and ends with an
    uninterrupted run's statistics (bit for bit in one process; up to the order of the float sums across ranks).
    The caller deletes the checkpoint once the result is saved.
    """
    import itertools

    from minigpt.pipeline import distributed
    from minigpt.pipeline.data import Batches, resolve_files

    rank, world = distributed.rank_world()
    files = resolve_files(data)
    run = {"data": data or "stdlib", "files_hash": content_hash([(str(f), f.stat().st_size) for f in files]),
           "max_tokens": max_tokens, "seq_len": seq_len, "batch_size": batch_size, "text_field": text_field,
           "seed": seed, "doc_tokens": doc_tokens, "world_size": world}
    fp = fingerprint(model)
    restored = _restore(checkpoint, resume, fp, run) if rank == 0 else None  # rank 0 holds the checkpoint
    stats, positions = restored or (MoEStats.empty(fp), [0] * world)
    positions = distributed.all_sum(positions if rank == 0 else [0] * world)  # rank 0's, to every rank
    mine = None
    if max_tokens is not None:
        sequences = -(-max_tokens // seq_len)
        mine = (sequences // world + (rank < sequences % world)) * seq_len
    every = -(-checkpoint_every // (world * batch_size * seq_len)) if checkpoint and checkpoint_every else None
    stream = iter(())
    if mine != 0:
        stream = iter(Batches(tokenizer, files, seq_len=seq_len, batch_size=batch_size, max_tokens=mine,
                              text_field=text_field, seed=seed, doc_tokens=doc_tokens, rank=rank, world_size=world,
                              allow_empty=world > 1, skip_sequences=positions[rank]))
    first, start_tokens, done = positions[rank], stats.tokens, [0]

    def count(_stats) -> None:
        done[0] += 1

    try:
        while True:  # rounds of ``every`` batches per rank, each ending in a checkpoint of every rank's sums
            done[0] = 0
            collect(model, itertools.islice(stream, every), stats, backend=backend, on_batch=count)
            state = [0] * (2 * world)
            state[rank] = first + (stats.tokens - start_tokens) // seq_len
            state[world + rank] = int(every is None or done[0] < every)  # this rank's stream ended
            state = distributed.all_sum(state)
            if all(state[world:]):
                break
            total = _summed(stats)
            if rank == 0:
                MoEStats(total.layers, total.tokens, total.fingerprint,
                         {**total.meta, "checkpoint": {"run": run, "positions": state[:world]}}).save(checkpoint)
    finally:
        getattr(stream, "close", lambda: None)()
    stats = all_reduce(stats)
    if stats.tokens == 0:
        raise MiniGPTError(f"corpus too small: no whole sequence of {seq_len} tokens (lower --seq-len or add data)")
    stats.meta.update(corpus={"data": data or "stdlib", "max_tokens": max_tokens, "seq_len": seq_len},
                      world_size=world)
    return stats
