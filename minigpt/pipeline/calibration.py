"""The streaming calibration pass: MLP forwards patched with the fused statistics op, batches run, unpatched."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import types

import torch

from minigpt import ops
from minigpt.errors import MiniGPTError
from minigpt.models import adapters
from minigpt.ops import reference
from minigpt.pipeline import distributed, taps
from minigpt.pipeline.data import LARGE_FILE_BYTES, Batches, resolve_files, text_pieces
from minigpt.pipeline.stats import CalibrationStats, check_fingerprint, content_hash, fingerprint

log = logging.getLogger("minigpt")


class _LayerAccumulator:
    """fp32 scratch ``acc: (3, N)`` / ``nnz: (N,)`` filled by the op during one batch, folded into fp64 totals.

    Allocated on the device where the layer's activations first appear (each layer's own with ``device_map``).
    """

    def __init__(self, n: int):
        self.n, self.acc, self.nnz = n, None, None
        self.gram = self.gram_sum = None  # fp32 (N, N) / (N,) scratch of Σ h hᵀ and Σ h, while collect_gram
        self.collect_gram = False

    def on(self, device: torch.device) -> _LayerAccumulator:
        if self.acc is None:
            self.acc = torch.zeros(3, self.n, dtype=torch.float32, device=device)
            self.nnz = torch.zeros(self.n, dtype=torch.int64, device=device)
        return self

    def add_gram(self, h: torch.Tensor) -> None:
        """Add ``Σ h hᵀ`` and ``Σ h`` of ``h: (..., N)`` (one GEMM, fp32 accumulator) when collecting this batch."""
        if not self.collect_gram:
            return
        if self.gram is None:
            self.gram = torch.zeros(self.n, self.n, dtype=torch.float32, device=h.device)
            self.gram_sum = torch.zeros(self.n, dtype=torch.float32, device=h.device)
        flat = h.reshape(-1, self.n).float()
        self.gram.addmm_(flat.T, flat)
        self.gram_sum += flat.sum(0)

    def fold_into(self, stats: CalibrationStats, layer: int) -> None:
        """Add the batch into ``stats`` (whose layer tensors move, once, to this layer's device) and reset."""
        if self.acc is None:
            return
        for name in ("sum_abs", "sum_sq", "max_abs", "nonzero"):
            totals = getattr(stats, name)
            totals[layer] = totals[layer].to(self.acc.device)
        stats.sum_abs[layer] += self.acc[0]
        stats.sum_sq[layer] += self.acc[1]
        torch.maximum(stats.max_abs[layer], self.acc[2], out=stats.max_abs[layer])
        stats.nonzero[layer] += self.nnz
        self.acc.zero_()
        self.nnz.zero_()
        if self.collect_gram and self.gram is not None:
            stats.gram[layer] = stats.gram[layer].to(self.gram.device)
            stats.gram_sum[layer] = stats.gram_sum[layer].to(self.gram.device)
            stats.gram[layer] += self.gram
            stats.gram_sum[layer] += self.gram_sum
            self.gram.zero_()
            self.gram_sum.zero_()


class _StatsActivation(torch.nn.Module):
    """The MLP activation with statistics: the fused op, or the model's own function + column stats.

    forward(x, up=None) → act(x) * up (or act(x)), statistics of the result added to ``accum``. The ops of the
    resolved ``backend`` are looked up once, so ``torch.compile`` sees only the op calls.
    """

    def __init__(self, original, act: str | None, accum: _LayerAccumulator, backend: str):
        super().__init__()
        self.original, self.act, self.accum = original, act, accum
        self.act_stats, self.column_stats = (ops.get_op(name, backend) for name in ("act_stats", "column_stats"))
        self.active_min = reference.active_min(act) if act is not None else None

    def forward(self, x, up=None):
        accum = self.accum.on(x.device)
        if self.act is not None:
            h = self.act_stats(x, up, self.act, self.active_min, accum.acc, accum.nnz)
        else:
            h = self.original(x) if up is None else self.original(x) * up
            self.column_stats(h, accum.acc, accum.nnz)
        accum.add_gram(h)
        return h


def _gated_forward(mlp, layout, stats_act: _StatsActivation):
    down = getattr(mlp, layout.cols[0])
    if layout.packed:  # one gate_up projection: gate rows, then up rows
        gate_up = getattr(mlp, layout.rows[0])

        def forward(self, x):
            gate, up = gate_up(x).chunk(2, dim=-1)
            return down(stats_act(gate.contiguous(), up.contiguous()))

        return forward
    gate, up = (getattr(mlp, n) for n in layout.rows)

    def forward(self, x):
        return down(stats_act(gate(x), up(x)))

    return forward


@contextlib.contextmanager
def patched(model, accums: list[_LayerAccumulator], backend: str):
    """Route every MLP activation of ``model`` through the statistics op for the duration of the block."""
    layout = adapters.get_layout(model)
    act = adapters.activation_name(model)
    owners = adapters.mlps(model)
    try:
        for mlp, accum in zip(owners, accums):
            stats_act = _StatsActivation(getattr(mlp, layout.act), act, accum, backend)
            if layout.gated:
                mlp.forward = types.MethodType(_gated_forward(mlp, layout, stats_act), mlp)
            else:
                setattr(mlp, layout.act, stats_act)
        yield
    finally:
        for mlp in owners:
            mlp.__dict__.pop("forward", None)
            wrapped = mlp._modules.get(layout.act)
            if isinstance(wrapped, _StatsActivation):
                setattr(mlp, layout.act, wrapped.original)


def check_finite(stats: CalibrationStats) -> None:
    """Refuse statistics holding a NaN or inf, naming the first MLP layer that has one (a non-finite activation
    poisons every later layer too), or token counts short of the tokens (ids outside the vocabulary, which the GPU
    histograms skip rather than stall the GPU to check). Synchronises once per layer: called at each checkpoint
    and at the end, never per batch."""
    for layer, (sum_abs, sum_sq) in enumerate(zip(stats.sum_abs, stats.sum_sq)):
        if not torch.isfinite(sum_abs.sum() + sum_sq.sum()):
            raise MiniGPTError(f"non-finite activations (NaN or inf) in MLP layer {layer}; stopping, nothing saved "
                               "(check the weights and --dtype)")
    counted = int(stats.token_counts.sum())
    if counted != stats.tokens:
        raise MiniGPTError(f"{stats.tokens - counted} of {stats.tokens} token ids lie outside the model's vocabulary "
                           f"of {stats.token_counts.numel()}; stopping, nothing saved (tokenizer and model disagree)")


def _progress(total: int | None, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc="calibrating", disable=not enabled, smoothing=0.1)


def input_device(model) -> torch.device:
    """Where input ids go: the embedding's device (the CPU when ``device_map`` offloaded it; its hook moves them)."""
    device = model.get_input_embeddings().weight.device
    return torch.device("cpu") if device.type == "meta" else device


def calibrate_batch(base, input_ids: torch.Tensor, accums: list[_LayerAccumulator], stats: CalibrationStats,
                    backend: str) -> None:
    """One batch ``input_ids: (B, S)`` (on the input device) through the patched ``base`` model into ``stats``,
    without synchronising with the GPU. Packed sequences have no padding: no attention mask (transformers would
    check an all-ones mask on the host)."""
    base(input_ids=input_ids, use_cache=False)
    ops.token_histogram(input_ids, None, stats.token_counts, backend=backend)
    for layer, accum in enumerate(accums):
        accum.fold_into(stats, layer)
    stats.tokens += input_ids.numel()


@torch.inference_mode()
def run_batches(model, batches, stats: CalibrationStats, backend: str = "auto", progress: bool = True,
                on_batch=None, gram_tokens: int | None = None) -> CalibrationStats:
    """Stream ``batches`` (``(B, S)`` input ids) through ``model`` adding into ``stats`` (in place, returned).

    Each layer's statistics move to that layer's device. Nothing synchronises with the GPU per batch (apart from
    ``on_batch``); a NaN or inf activation stops at the end (``check_finite``) with the first such layer named.
    When ``stats`` holds Gram matrices, whole batches add to them until ``gram_tokens`` (None: every batch).
    """
    device = input_device(model)
    backend = ops.resolve_backend(backend, device)
    accums = [_LayerAccumulator(n) for n in adapters.widths(model)]
    stats.token_counts = stats.token_counts.to(device)
    base = model.base_model
    total = batches.max_sequences * batches.seq_len if getattr(batches, "max_sequences", None) else None
    with patched(model, accums, backend), taps.collect(model, stats, backend) as taps_sums, \
            _progress(total, progress) as bar:
        for input_ids in batches:
            input_ids = input_ids.to(device)
            collect = stats.gram is not None and (gram_tokens is None or stats.gram_tokens < gram_tokens)
            for accum in accums:
                accum.collect_gram = collect
            taps_sums.collect_gram = collect
            calibrate_batch(base, input_ids, accums, stats, backend)
            taps_sums.fold()
            stats.gram_tokens += input_ids.numel() if collect else 0
            bar.update(input_ids.numel())
            if on_batch is not None:
                on_batch(stats)
    check_finite(stats)
    stats.meta["backend"] = backend
    return stats


def _restore(path, resume: bool, fp: dict, run: dict):
    """``(stats, positions, done)`` saved in the checkpoint ``path``, or None when there is none.

    Refuses to overwrite an interrupted run's checkpoint without ``resume``, and a checkpoint of another run.
    """
    if path is None or not os.path.exists(path):
        if resume:
            log.info("no checkpoint at %s: starting from the beginning", path)
        return None
    if not resume:
        raise MiniGPTError(f"checkpoint {path} exists from an interrupted run: pass --resume to continue it, "
                           "or delete it")
    saved = CalibrationStats.load(path)
    state = saved.meta.pop("checkpoint", None)
    if state is None:
        raise MiniGPTError(f"{path} is a statistics file, not a calibration checkpoint")
    check_fingerprint(saved.fingerprint, fp, "the checkpoint's statistics")
    for key, value in run.items():
        if state["run"].get(key) != value:
            raise MiniGPTError(f"checkpoint {path} belongs to another run ({key} was {state['run'].get(key)!r}, "
                               f"now {value!r}); delete it to start over")
    return saved, state["positions"], state["done"]


def gram_bytes_needed(widths: list[int]) -> int:
    """Bytes Gram statistics take while calibrating: fp64 totals + fp32 per-batch scratch, ``12 · Σ_l N_l²``."""
    return 12 * sum(n * n for n in widths)


def _free_bytes(device: torch.device) -> int:
    """Free memory of ``device`` (CUDA: ``mem_get_info``; CPU: available physical pages)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def want_gram(gram: bool | None, widths: list[int], device: torch.device) -> bool:
    """``gram`` as given, or (None) whether the Gram statistics fit in half the device's free memory."""
    if gram is not None:
        return gram
    need, free = gram_bytes_needed(widths), _free_bytes(device)
    if need > free // 2:
        log.warning("not collecting Gram statistics: they need %.1f GiB, %.1f GiB free (use --sequential, which "
                    "holds one layer's)", need / 2**30, free / 2**30)
    return need <= free // 2


def _share(max_tokens: int | None, seq_len: int, rank: int, world: int) -> int | None:
    """Sequences rank ``rank`` calibrates on: its part of ``⌈max_tokens / seq_len⌉`` (None: its whole shard)."""
    if max_tokens is None:
        return None
    return _split(-(-max_tokens // seq_len), world)[rank]


def _split(n: int, parts: int) -> list[int]:
    """``n`` split into ``parts`` near-equal whole numbers, the larger ones first."""
    return [n // parts + (i < n % parts) for i in range(parts)]


class _Rounds:
    """One rank's batches, cut into rounds of whole sequences (``take``); ``exhausted`` once the stream ends.

    The stream (and its prefetch thread) stays open between rounds, so a later round continues where the last
    one stopped; ``max_sequences`` is the round's size (the progress bar's total).
    """

    def __init__(self, batches: Batches):
        self.batches, self.seq_len = batches, batches.seq_len
        self.max_sequences: int | None = None
        self.exhausted = False
        self._stream, self._rest = iter(batches), None

    def take(self, n: int | None) -> _Rounds:
        self.max_sequences = n
        return self

    def __iter__(self):
        left = self.max_sequences
        while left is None or left > 0:
            if self._rest is None:
                try:
                    self._rest = next(self._stream)
                except StopIteration:
                    self.exhausted = True
                    return
            cut = len(self._rest) if left is None else min(left, len(self._rest))
            batch, self._rest = self._rest[:cut], (self._rest[cut:] if cut < len(self._rest) else None)
            left = None if left is None else left - cut
            yield batch

    def close(self) -> None:
        self._stream.close()


def _check_shards(files, world: int) -> None:
    """Refuse, before any token is read, a plain-text corpus with fewer documents than ranks."""
    if world < 2 or any(f.suffix in (".json", ".jsonl", ".parquet") for f in files):
        return
    docs = sum(text_pieces(f) for f in files)
    if docs < world:
        raise MiniGPTError(f"the corpus is {docs} document(s) for {world} ranks, so rank {docs} would get nothing "
                           f"(text files above {LARGE_FILE_BYTES // 2**20} MiB are split into pieces): add data or "
                           "launch fewer ranks")


def calibrate(
    model,
    tokenizer,
    data=None,
    *,
    max_tokens: int | None = 65536,
    seq_len: int = 512,
    batch_size: int = 8,
    backend: str = "auto",
    text_field: str = "text",
    seed: int | None = 0,
    doc_tokens: int | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    gram: bool | None = None,
    gram_tokens: int | None = None,
) -> CalibrationStats:
    """Collect per-neuron statistics of ``model`` over the corpus ``data`` (files, dirs or corpus names).

    Under ``torch.distributed`` each rank streams its own documents (round-robin, ``data.iter_texts``) and
    calibrates on its part of ``⌈max_tokens / seq_len⌉`` sequences; when some ranks' documents run out, the others
    calibrate the missing sequences, so the total is the budget whenever the corpus holds it (a warning with
    the numbers otherwise; an error when a rank gets nothing). The statistics are all-reduced and every rank
    returns the total; ``meta["data_wait_share"]`` is this rank's share of the time spent waiting for batches. ``doc_tokens``: at most that many tokens of each document (``data.document_window``).
    ``checkpoint``: a file rewritten atomically (by rank 0) every ``checkpoint_every`` tokens with the summed
    statistics and every rank's stream position; ``resume=True`` continues from it, ending with the statistics
    of an uninterrupted run. The caller deletes the checkpoint once the result is saved.
    ``gram``: also sum the Gram matrix ``Σ h hᵀ`` and ``Σ h`` of every down_proj input (None: when they fit in
    half the free memory, ``want_gram``) over the first ``gram_tokens`` tokens (None: all; whole batches).
    Returns ``CalibrationStats`` (on the CPU) whose ``meta`` records the corpus, the backend and the speed.
    """
    rank, world = distributed.rank_world()
    files = resolve_files(data)
    corpus = {"data": data if data else "stdlib", "files": len(files), "seq_len": seq_len,
              "max_tokens": max_tokens, "seed": seed, **({"doc_tokens": doc_tokens} if doc_tokens else {})}
    run = {**corpus, "files_hash": content_hash([(str(f), f.stat().st_size) for f in files]),
           "batch_size": batch_size, "text_field": text_field, "world_size": world}
    fp = fingerprint(model, tokenizer)
    gram = want_gram(gram, fp["mlp_widths"], input_device(model))
    run.update(gram=gram, gram_tokens=gram_tokens)
    stats, positions, done = CalibrationStats.empty(fp, gram=gram), [0] * world, [0] * world
    restored = _restore(checkpoint, resume, fp, run) if rank == 0 else None  # rank 0 holds the checkpoint
    if restored is not None:
        stats, positions, done = restored
    positions, done = distributed.all_sum(positions), distributed.all_sum(done)  # rank 0's, to every rank
    resumed_tokens, start_tokens = stats.tokens, sum(positions) * seq_len
    share = _share(max_tokens, seq_len, rank, world)
    every = None if not (checkpoint and checkpoint_every) else -(-checkpoint_every // (world * batch_size * seq_len))
    first_position = positions[rank]
    mine = {"position": first_position, "batches": 0}

    def sync(finished_here: bool):
        """One collective round: the summed stats and every position; rank 0 checkpoints unless all finished."""
        one_hot = [0] * (3 * world)
        one_hot[rank], one_hot[world + rank] = mine["position"], int(finished_here)
        one_hot[2 * world + rank] = int(rounds.exhausted)
        state = distributed.all_sum(one_hot)
        total = distributed.all_reduce_stats(stats)
        finished = all(state[world : 2 * world])
        if checkpoint and not finished and rank == 0:
            check_finite(total)
            total.meta["checkpoint"] = {"run": run, "positions": state[:world], "done": state[world : 2 * world]}
            total.save(checkpoint)
        return total, finished, state[:world], state[2 * world :]

    def on_batch(s: CalibrationStats) -> None:
        mine["position"] = first_position + (s.tokens - resumed_tokens) // seq_len
        mine["batches"] += 1
        if every and mine["batches"] % every == 0:
            sync(False)

    def run_round(want: int | None):
        """This rank calibrates on ``want`` more sequences (None: the rest of its shard) while the others run
        theirs; returns the summed stats, every rank's position and which ranks' streams ended."""
        if want != 0:
            run_batches(model, rounds.take(want), stats, backend=backend, progress=progress and rank == 0,
                        on_batch=on_batch, gram_tokens=None if gram_tokens is None else -(-gram_tokens // world))
        total, finished, at, ended = sync(True)
        while not finished:  # this rank's part ended: keep joining the others' checkpoint rounds
            total, finished, at, ended = sync(True)
        return total, at, ended

    backend = ops.resolve_backend(backend, input_device(model))
    _check_shards(files, world)
    start = time.perf_counter()
    batches = Batches(tokenizer, files, seq_len=seq_len, batch_size=batch_size, text_field=text_field, seed=seed,
                      rank=rank, world_size=world, skip_sequences=positions[rank], allow_empty=world > 1,
                      doc_tokens=doc_tokens)
    rounds = _Rounds(batches)
    budget = None if max_tokens is None else -(-max_tokens // seq_len)
    try:
        first = 0 if done[rank] else None if share is None else max(share - positions[rank], 0)
        total, positions, ended = run_round(first)
        while budget is not None and sum(positions) < budget and not all(ended):
            # ranks whose shard ended early: the others calibrate the missing sequences between them
            open_ranks = [r for r in range(world) if not ended[r]]
            extra = dict(zip(open_ranks, _split(budget - sum(positions), len(open_ranks))))
            total, positions, ended = run_round(extra.get(rank, 0))
    finally:
        rounds.close()
    if total.tokens == 0:
        raise MiniGPTError(f"corpus too small: no rank got a whole sequence of {seq_len} tokens "
                           "(lower --seq-len or add data)")
    if world > 1 and 0 in positions:
        raise MiniGPTError(f"rank {positions.index(0)} of {world} got no sequence of {seq_len} tokens "
                           f"(sequences per rank: {positions}): add data or launch fewer ranks")
    if budget is not None and total.tokens < budget * seq_len and rank == 0:
        log.warning("the corpus supplied %d of the %d calibration tokens asked (--max-tokens %d rounded up to whole "
                    "sequences of %d)", total.tokens, budget * seq_len, max_tokens, seq_len)
    seconds = time.perf_counter() - start
    new_tokens = sum(positions) * seq_len - start_tokens
    total.meta.update(
        corpus=corpus, backend=backend, world_size=world, sequences_per_rank=positions,
        tokens_requested=None if budget is None else budget * seq_len,
        data_wait_share=round(batches.wait_seconds / seconds, 4),
        seconds=round(seconds, 3), tokens_per_second=round(new_tokens / seconds, 1),
        dtype=str(model.get_input_embeddings().weight.dtype).removeprefix("torch."),
        gram_bytes=total.gram_bytes, gram_tokens=total.gram_tokens,
    )
    log.info("calibrated on %d tokens with backend %s (%.0f tok/s)", total.tokens, backend, new_tokens / seconds)
    return total
