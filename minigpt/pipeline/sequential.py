"""Sequential (layer-by-layer) pruning: each MLP is calibrated on the outputs of the already-pruned layers before it.

The hidden states entering the first block are recorded for every calibration batch (on the CPU), with the
arguments each block receives (masks, rotary embeddings). Then, block by block: the block runs on every batch
with a hook summing its down_proj input's statistics and Gram matrix (one layer's, ``CalibrationStats`` of one
layer), the layer is planned, selected (OBS) and refitted in place (removed neurons' down columns zeroed, so the
block computes what the compacted one will), and the batches go through the refitted block to become the next
block's inputs. At the end one compaction removes the zeroed neurons of every layer.
"""

from __future__ import annotations

import torch

from minigpt import ops
from minigpt.errors import MiniGPTError
from minigpt.models import adapters
from minigpt.pipeline.calibration import _LayerAccumulator, input_device
from minigpt.pipeline.compact import compact
from minigpt.pipeline.compensate import DAMPING, bias_slot, compensate_layer, mark_mlp_bias, moments, obs_keep
from minigpt.pipeline.data import Batches, resolve_files
from minigpt.pipeline.importance import STATS_METRICS, stats_scores
from minigpt.pipeline.planning import MLPPolicy, PruningPlan, plan_from_scores
from minigpt.pipeline.stats import CalibrationStats, fingerprint


@torch.inference_mode()
def block_inputs(model, batches) -> tuple[list[torch.Tensor], list[list[tuple]]]:
    """``hidden[b]: (B, S, D)`` entering block 0 for batch ``b`` (CPU), and ``calls[b][l] = (args, kwargs)``:
    what block ``l`` receives besides the hidden states (the same objects the model passes)."""
    blocks = adapters.blocks(model)
    hidden, calls = [], []

    def record(index):
        def hook(module, args, kwargs):
            states = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                hidden.append(states.detach().cpu())
                calls.append([])
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            calls[-1].append((args[1:], rest))
        return hook

    handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
    device = input_device(model)
    try:
        for input_ids in batches:
            ids = input_ids.to(device)
            model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return hidden, calls


def _run_block(block, hidden: torch.Tensor, call: tuple) -> torch.Tensor:
    device = next(block.parameters()).device
    out = block(hidden.to(device), *call[0], **call[1])
    return out[0] if isinstance(out, tuple) else out


@torch.inference_mode()
def layer_stats(model, layer: int, hidden: list[torch.Tensor], calls: list[list[tuple]], backend: str = "torch",
                gram_tokens: int | None = None) -> CalibrationStats:
    """Statistics (with the Gram matrix) of layer ``layer``'s down_proj input over every batch: one layer's."""
    layout = adapters.get_layout(model)
    n = adapters.widths(model)[layer]
    stats = CalibrationStats.empty({"mlp_widths": [n], "vocab_size": 1}, gram=True)
    accum = _LayerAccumulator(n)

    def hook(module, args):
        h = args[0].reshape(-1, n)
        acc = accum.on(h.device)
        ops.column_stats(h, acc.acc, acc.nnz, backend=backend)
        acc.add_gram(h)

    down = getattr(adapters.mlps(model)[layer], layout.cols[0])
    handle = down.register_forward_pre_hook(hook)
    block = adapters.blocks(model)[layer]
    try:
        for states, call in zip(hidden, calls):
            accum.collect_gram = gram_tokens is None or stats.gram_tokens < gram_tokens
            _run_block(block, states, call[layer])
            accum.fold_into(stats, 0)
            tokens = states.shape[0] * states.shape[1]
            stats.tokens += tokens
            stats.gram_tokens += tokens if accum.collect_gram else 0
    finally:
        handle.remove()
    if not torch.isfinite(stats.sum_abs[0].sum() + stats.sum_sq[0].sum()):
        raise MiniGPTError(f"non-finite activations (NaN or inf) in MLP layer {layer}; stopping, nothing saved "
                           "(check the weights and --dtype)")
    return stats


def prune_layer(model, layer: int, stats: CalibrationStats, policy: MLPPolicy, *, metric: str = "l1", select: str,
                compensate: str, damping: float = DAMPING) -> list[int]:
    """Choose layer ``layer``'s kept neurons from its one-layer ``stats`` by ``policy`` and refit it in place; the
    kept indices."""
    scores = stats_scores(stats, metric)
    kept = plan_from_scores(scores, policy).kept[0]
    if select == "obs":
        layout = adapters.get_layout(model)
        down = getattr(adapters.mlps(model)[layer], layout.cols[0])
        w = down.weight.detach().movedim(adapters.neuron_dim(layout, "cols"), 1)
        kept = obs_keep(w, moments(stats, 0, bias_slot(model) != "none")[0], len(kept), damping).tolist()
    compensate_layer(model, stats, layer, torch.tensor(kept), compensate, damping, stats_layer=0)
    return kept


def check_policy(policy: MLPPolicy, metric: str) -> None:
    """Refuse (one line) what layer-by-layer pruning cannot do: a threshold, reverse or global ranking, a metric
    that needs more than one layer's statistics."""
    if policy.mlp is None or policy.reverse or policy.scope != "uniform":
        raise MiniGPTError("--sequential removes a uniform --ratio of every layer: not with --threshold, --reverse "
                           "or --scope global")
    if metric not in STATS_METRICS:
        raise MiniGPTError(f"--sequential ranks by a statistics metric ({', '.join(STATS_METRICS)}), not {metric}")


@torch.inference_mode()
def prune_sequential(model, tokenizer, data=None, *, policy: MLPPolicy, metric: str = "l1", select: str = "metric",
                     compensate: str = "lstsq", damping: float = DAMPING, max_tokens: int = 16384,
                     seq_len: int = 512, batch_size: int = 8, text_field: str = "text",
                     seed: int | None = 0, doc_tokens: int | None = None, gram_tokens: int | None = None,
                     backend: str = "auto") -> tuple[object, PruningPlan]:
    """Prune ``model``'s MLPs layer by layer (module doc) removing ``policy.mlp`` of every layer; ``(model, plan)``."""
    check_policy(policy, metric)
    fp = fingerprint(model, tokenizer)
    slot = bias_slot(model) if compensate != "none" else "none"
    batches = Batches(tokenizer, resolve_files(data), seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens,
                      text_field=text_field, seed=seed, doc_tokens=doc_tokens)
    hidden, calls = block_inputs(model, batches)
    if not hidden:
        raise MiniGPTError(f"corpus too small: no whole sequence of {seq_len} tokens (lower --seq-len or add data)")
    backend = ops.resolve_backend(backend, input_device(model))
    kept = []
    for layer, block in enumerate(adapters.blocks(model)):
        stats = layer_stats(model, layer, hidden, calls, backend, gram_tokens)
        kept.append(prune_layer(model, layer, stats, policy, metric=metric, select=select, compensate=compensate,
                                damping=damping))
        hidden = [_run_block(block, states, call[layer]).cpu() for states, call in zip(hidden, calls)]
    report = {"method": compensate, "damping": damping if compensate == "lstsq" else None, "bias": slot,
              "gram_tokens": stats.gram_tokens}
    record = {"metric": metric, **policy.record(), "select": select, "sequential": True, "tokens": stats.tokens,
              "compensate": report}
    plan = PruningPlan(kept=kept, widths=fp["mlp_widths"], fingerprint=fp, policy=record)
    model = compact(model, plan, backend=backend)
    mark_mlp_bias(model, report)
    return model, plan
