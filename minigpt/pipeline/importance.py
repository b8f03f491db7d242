"""Per-neuron importance metrics: one ``(N_l,)`` float64 score per MLP layer ``l``, higher = more important.

Activation metrics (from one calibration pass, ``a`` = the MLP activation over the ``T`` calibration tokens):

* ``l1``   mean |a_j| = Σ|a_j| / T (the paper's contextual-pruning score); ``l2`` RMS; ``max`` max |a_j|;
  ``freq`` share of tokens where a_j ≠ 0.
* ``selectivity`` (needs a reference calibration): with ``d_j`` / ``r_j`` the mean |a_j| on the domain / on the
  reference corpus, ``sel_j = d_j · d_j / (d_j + r_j + ε)`` (ε = 1e-12): domain usage weighted by the domain's
  share of the neuron's usage, so a neuron is kept when it is both used on the domain and used there more
  than elsewhere; a neuron equally active on both scores d_j / 2, one silent on the reference scores d_j.
* ``wanda`` (activations and weights): ``‖a_j‖₂ · Σ_i |W_out[i, j]|``, the Wanda score |W|·‖x‖ of the output
  projection's weights summed over the column that reads neuron j (‖a_j‖₂ as RMS over the tokens).

Weight-only metrics (no data): for each row projection (gate and up of a gated MLP, ``fc1`` otherwise) and
its row ``w`` feeding neuron j, ``maw`` sums max |w| over the projections; ``maw-minmax`` sums max(w) + |min(w)|.

``random``: i.i.d. uniform scores from a seeded generator (the baseline selective pruning must beat).
"""

from __future__ import annotations

import torch

from minigpt.errors import MiniGPTError
from minigpt.models import adapters
from minigpt.pipeline.stats import CalibrationStats, check_fingerprint

STATS_METRICS = ("l1", "l2", "max", "freq")
WEIGHT_METRICS = ("maw", "maw-minmax")
METRICS = (*STATS_METRICS, "selectivity", "wanda", *WEIGHT_METRICS, "random")
NEEDS_STATS = (*STATS_METRICS, "selectivity", "wanda")
EPS = 1e-12


def stats_scores(stats: CalibrationStats, metric: str) -> list[torch.Tensor]:
    """Mean |a|, RMS, max |a| or firing rate of every neuron."""
    if metric == "l1":
        return stats.mean("sum_abs")
    if metric == "l2":
        return [t.sqrt() for t in stats.mean("sum_sq")]
    if metric == "max":
        return [t.double() for t in stats.max_abs]
    if metric == "freq":
        return stats.mean("nonzero")
    raise MiniGPTError(f"unknown statistics metric {metric!r}")


def selectivity(stats: CalibrationStats, reference: CalibrationStats) -> list[torch.Tensor]:
    """``d · d / (d + r + ε)`` per neuron, ``d`` / ``r`` = mean |a| on the domain / reference (see module doc)."""
    check_fingerprint(stats.fingerprint, reference.fingerprint, "reference statistics")
    return [d * d / (d + r + EPS) for d, r in zip(stats.mean("sum_abs"), reference.mean("sum_abs"))]


def _neuron_weights(model, side: str) -> list[list[torch.Tensor]]:
    """Per layer, the weights of its ``side`` projections as ``(N_l, fan)`` float64 (neuron-major)."""
    layout = adapters.get_layout(model)
    dim = adapters.neuron_dim(layout, side)
    names = layout.rows if side == "rows" else layout.cols
    return [[getattr(mlp, n).weight.detach().double().movedim(dim, 0).cpu() for n in names]
            for mlp in adapters.mlps(model)]


def weight_scores(model, metric: str) -> list[torch.Tensor]:
    """``maw``: Σ over row projections of max |w_j|; ``maw-minmax``: Σ of max(w_j) + |min(w_j)|."""
    if metric == "maw":
        row_score = lambda w: w.abs().amax(dim=1)
    elif metric == "maw-minmax":
        row_score = lambda w: w.amax(dim=1) + w.amin(dim=1).abs()
    else:
        raise MiniGPTError(f"unknown weight metric {metric!r}")
    return [sum(row_score(w) for w in layer) for layer in _neuron_weights(model, "rows")]


def wanda(stats: CalibrationStats, model) -> list[torch.Tensor]:
    """RMS activation × Σ |W_out[:, j]| over the column projections (see module doc)."""
    rms = [t.sqrt() for t in stats.mean("sum_sq")]
    cols = _neuron_weights(model, "cols")
    if [r.numel() for r in rms] != [c[0].shape[0] for c in cols]:
        raise MiniGPTError("wanda: statistics and model have different MLP widths")
    return [r * sum(w.abs().sum(dim=1) for w in layer) for r, layer in zip(rms, cols)]


def random_scores(widths: list[int], seed: int = 0) -> list[torch.Tensor]:
    """Uniform [0, 1) scores from ``torch.Generator().manual_seed(seed)``, layer after layer."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=gen, dtype=torch.float64) for n in widths]


def scores(metric: str, stats: CalibrationStats | None = None, model=None,
           reference: CalibrationStats | None = None, seed: int = 0) -> list[torch.Tensor]:
    """Importance of every neuron by ``metric``; says in one line which input a metric is missing."""
    if metric not in METRICS:
        raise MiniGPTError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    if metric in NEEDS_STATS and stats is None:
        raise MiniGPTError(f"metric {metric} needs calibration statistics")
    if metric in (*WEIGHT_METRICS, "wanda") and model is None:
        raise MiniGPTError(f"metric {metric} needs the model's weights")
    if metric == "selectivity":
        if reference is None:
            raise MiniGPTError("metric selectivity needs reference statistics (another corpus's calibration)")
        return selectivity(stats, reference)
    if metric == "wanda":
        return wanda(stats, model)
    if metric in WEIGHT_METRICS:
        return weight_scores(model, metric)
    if metric == "random":
        return random_scores(stats.fingerprint["mlp_widths"] if stats is not None else adapters.widths(model), seed)
    return stats_scores(stats, metric)


def magnitude_scores(model) -> list[torch.Tensor]:
    """Per-layer neuron scores: L2 norm of every weight touching the neuron (rows of gate/up, columns of down).

    Returns one ``(N,)`` tensor per layer."""
    layout = adapters.get_layout(model)
    out = []
    for mlp in adapters.mlps(model):
        sq = 0.0
        for side, names in (("rows", layout.rows), ("cols", layout.cols)):
            for name in names:
                w = getattr(mlp, name).weight.detach().float()
                part = w.pow(2).sum(dim=1 - adapters.neuron_dim(layout, side))
                if side == "rows" and layout.packed:  # a fused gate_up: neuron j is rows j and N+j
                    part = part.view(2, -1).sum(0)
                sq = sq + part
        out.append(sq.sqrt().double().cpu())
    return out
