"""The streaming calibration pass: MLP forwards patched with the fused statistics op, batches run, unpatched."""

from __future__ import annotations

import contextlib
import logging
import time
import types

import torch

from minigpt import adapters, ops
from minigpt.data import Batches, resolve_files
from minigpt.errors import MiniGPTError
from minigpt.stats import CalibrationStats, fingerprint

log = logging.getLogger("minigpt")


class _LayerAccumulator:
    """fp32 scratch ``acc: (3, N)`` / ``nnz: (N,)`` filled by the op during one batch, folded into fp64 totals."""

    def __init__(self, n: int, device: torch.device):
        self.acc = torch.zeros(3, n, dtype=torch.float32, device=device)
        self.nnz = torch.zeros(n, dtype=torch.int64, device=device)

    def fold_into(self, stats: CalibrationStats, layer: int) -> None:
        stats.sum_abs[layer] += self.acc[0]
        stats.sum_sq[layer] += self.acc[1]
        torch.maximum(stats.max_abs[layer], self.acc[2], out=stats.max_abs[layer])
        stats.nonzero[layer] += self.nnz
        self.acc.zero_()
        self.nnz.zero_()


class _StatsActivation(torch.nn.Module):
    """The MLP activation with statistics: the fused op, or the model's own function + column stats.

    forward(x, up=None) → act(x) * up (or act(x)), statistics of the result added to ``accum``.
    """

    def __init__(self, original, act: str | None, accum: _LayerAccumulator, backend: str):
        super().__init__()
        self.original, self.act, self.accum, self.backend = original, act, accum, backend

    def forward(self, x, up=None):
        if self.act is not None:
            return ops.act_stats(x, up, self.act, self.accum.acc, self.accum.nnz, backend=self.backend)
        h = self.original(x) if up is None else self.original(x) * up
        ops.column_stats(h, self.accum.acc, self.accum.nnz, backend=self.backend)
        return h


def _gated_forward(mlp, layout, stats_act: _StatsActivation):
    gate, up, down = (getattr(mlp, n) for n in (*layout.rows, *layout.cols))

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


def _progress(total: int | None, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc="calibrating", disable=not enabled, smoothing=0.1)


@torch.inference_mode()
def run_batches(model, batches, stats: CalibrationStats, backend: str = "auto", progress: bool = True,
                on_batch=None) -> CalibrationStats:
    """Stream ``batches`` (``(B, S)`` input ids) through ``model`` adding into ``stats`` (in place, returned)."""
    device = model.get_input_embeddings().weight.device
    backend = ops.resolve_backend(backend, device)
    widths = adapters.widths(model)
    accums = [_LayerAccumulator(n, device) for n in widths]
    base = model.base_model
    total = batches.max_sequences * batches.seq_len if getattr(batches, "max_sequences", None) else None
    with patched(model, accums, backend), _progress(total, progress) as bar:
        for input_ids in batches:
            input_ids = input_ids.to(device)
            mask = torch.ones_like(input_ids)
            base(input_ids=input_ids, attention_mask=mask, use_cache=False)
            ops.token_histogram(input_ids, mask, stats.token_counts, backend=backend)
            for layer, accum in enumerate(accums):
                if not torch.isfinite(accum.acc[:2].sum()):
                    raise MiniGPTError(f"non-finite activations in MLP layer {layer}; stopping (check dtype/model)")
                accum.fold_into(stats, layer)
            stats.tokens += input_ids.numel()
            bar.update(input_ids.numel())
            if on_batch is not None:
                on_batch(stats)
    stats.meta["backend"] = backend
    return stats


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
    progress: bool = True,
) -> CalibrationStats:
    """Collect per-neuron statistics of ``model`` over the corpus ``data`` (files, dirs or corpus names).

    Returns ``CalibrationStats`` (on the CPU) whose ``meta`` records the corpus, the backend and the speed.
    """
    files = resolve_files(data)
    batches = Batches(tokenizer, files, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens,
                      text_field=text_field, seed=seed)
    device = model.get_input_embeddings().weight.device
    stats = CalibrationStats.empty(fingerprint(model, tokenizer), device=device)
    start = time.perf_counter()
    run_batches(model, batches, stats, backend=backend, progress=progress)
    seconds = time.perf_counter() - start
    stats.meta.update(
        corpus={"data": data if data else "stdlib", "files": len(files), "seq_len": seq_len,
                "max_tokens": max_tokens, "seed": seed},
        seconds=round(seconds, 3),
        tokens_per_second=round(stats.tokens / seconds, 1),
        dtype=str(model.get_input_embeddings().weight.dtype).removeprefix("torch."),
    )
    log.info("calibrated on %d tokens with backend %s (%.0f tok/s)", stats.tokens, stats.meta["backend"],
             stats.tokens / seconds)
    return stats.to("cpu")
