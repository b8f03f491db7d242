"""Importance metrics and pruning policies → ``PruningPlan`` (kept neuron indices per layer, readable JSON).

Normalised mean L1 (the paper's threshold). For layer ``l`` and neuron ``j`` with activations ``a`` over the
``T`` calibration tokens, ``m_j = Σ|a_j| / T`` (mean |activation|) and the normalised score is
``s_j = m_j / max_k m_k`` (the layer's most active neuron scores 1). ``--threshold ε`` removes neurons with
``s_j < ε``: ε = 1e-3 (the paper's mild setting) removes neurons under 0.1 % of the layer's strongest mean
activation, ε = 1e-1 (aggressive) those under 10 %. Every metric is normalised the same way, so a global
ratio ranks neurons of all layers on one scale.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch

from minigpt.errors import MiniGPTError
from minigpt.stats import CalibrationStats

METRICS = ("l1", "l2", "max", "freq")


def scores(stats: CalibrationStats, metric: str = "l1") -> list[torch.Tensor]:
    """Raw per-neuron importance of every layer (float64): mean |a|, RMS, max |a| or firing rate."""
    if metric == "l1":
        return stats.mean("sum_abs")
    if metric == "l2":
        return [t.sqrt() for t in stats.mean("sum_sq")]
    if metric == "max":
        return [t.double() for t in stats.max_abs]
    if metric == "freq":
        return stats.mean("nonzero")
    raise MiniGPTError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")


def normalise(layer_scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Divide each layer's scores by its maximum (an all-zero layer stays zero)."""
    return [s / s.max().clamp_min(torch.finfo(s.dtype).tiny) for s in layer_scores]


@dataclass
class PruningPlan:
    """Which MLP neurons each layer keeps. ``kept[l]``: sorted indices into the original width ``widths[l]``."""

    kept: list[list[int]]
    widths: list[int]
    fingerprint: dict = field(default_factory=dict)
    policy: dict = field(default_factory=dict)
    vocab: list[int] | None = None  # kept token ids (vocabulary pruning), sorted

    @property
    def kept_widths(self) -> list[int]:
        return [len(k) for k in self.kept]

    @property
    def removed_fraction(self) -> float:
        return 1.0 - sum(self.kept_widths) / sum(self.widths)

    def kept_tensors(self) -> list[torch.Tensor]:
        return [torch.tensor(k, dtype=torch.long) for k in self.kept]

    def to_json(self) -> str:
        summary = {"kept_widths": self.kept_widths, "removed_fraction": round(self.removed_fraction, 6)}
        return json.dumps({**summary, **asdict(self)}, indent=1)

    def save(self, path: str | os.PathLike) -> None:
        from minigpt.io import atomic_file

        with atomic_file(path) as tmp:
            tmp.write_text(self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> PruningPlan:
        try:
            raw = json.loads(open(path).read())
            plan = cls(kept=raw["kept"], widths=raw["widths"], fingerprint=raw.get("fingerprint", {}),
                       policy=raw.get("policy", {}), vocab=raw.get("vocab"))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise MiniGPTError(f"cannot read plan {path}: {type(err).__name__}: {err}") from err
        for k, w in zip(plan.kept, plan.widths):
            if any(not 0 <= i < w for i in k) or len(set(k)) != len(k):
                raise MiniGPTError(f"plan {path} has out-of-range or repeated indices")
        return plan


def _round_up(n: int, multiple: int, cap: int) -> int:
    return min(cap, multiple * math.ceil(n / multiple)) if multiple > 1 else n


def _keep_top(score: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest scores (ties → lower index), sorted ascending."""
    order = torch.sort(-score, stable=True).indices[:k]
    return order.sort().values.tolist()


def plan_from_scores(
    layer_scores: list[torch.Tensor],
    *,
    threshold: float | None = None,
    ratio: float | None = None,
    scope: str = "uniform",
    multiple: int = 1,
    min_keep: float = 0.0,
    fingerprint: dict | None = None,
    policy: dict | None = None,
) -> PruningPlan:
    """Keep neurons by normalised score: ``threshold`` (drop s < ε) or ``ratio`` (drop that fraction).

    scope: ``uniform`` (ratio applied to every layer) or ``global`` (one ranking across layers).
    multiple: kept widths rounded *up* to a multiple (e.g. 64/128 for tensor cores), never above the width.
    min_keep: floor as a fraction of each layer's width; at least one neuron (one ``multiple``) always stays.
    """
    if (threshold is None) == (ratio is None):
        raise MiniGPTError("give exactly one of threshold or ratio")
    if threshold is not None and not (0.0 <= threshold <= 1.0):
        raise MiniGPTError(f"threshold must be in [0, 1] (normalised scores), got {threshold}")
    if ratio is not None and not (0.0 <= ratio < 1.0):
        raise MiniGPTError(f"ratio must be in [0, 1), got {ratio}")
    if scope not in ("uniform", "global"):
        raise MiniGPTError(f"scope must be 'uniform' or 'global', got {scope!r}")
    if multiple < 1 or not (0.0 <= min_keep <= 1.0):
        raise MiniGPTError(f"multiple must be ≥ 1 and min_keep in [0, 1] (got {multiple}, {min_keep})")
    norm = normalise(layer_scores)
    widths = [s.numel() for s in norm]
    if threshold is not None:
        counts = [int((s >= threshold).sum()) for s in norm]
    elif scope == "uniform":
        counts = [w - int(round(ratio * w)) for w in widths]
    else:
        flat = torch.cat(norm)
        dropped = torch.sort(flat, stable=True).indices[: int(round(ratio * flat.numel()))]
        layer_of = torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(widths))
        counts = [w - int(d) for w, d in zip(widths, torch.bincount(layer_of[dropped], minlength=len(widths)))]
    floors = [max(1, math.ceil(min_keep * w)) for w in widths]
    counts = [_round_up(max(c, f), multiple, w) for c, f, w in zip(counts, floors, widths)]
    kept = [_keep_top(s, c) for s, c in zip(norm, counts)]
    return PruningPlan(kept=kept, widths=widths, fingerprint=dict(fingerprint or {}), policy=dict(policy or {}))


def plan(
    stats: CalibrationStats,
    metric: str = "l1",
    *,
    threshold: float | None = None,
    ratio: float | None = None,
    scope: str = "uniform",
    multiple: int = 1,
    min_keep: float = 0.0,
) -> PruningPlan:
    """Pruning plan from calibration statistics (see the module docstring for the normalisation)."""
    policy = {"metric": metric, "threshold": threshold, "ratio": ratio, "scope": scope, "multiple": multiple,
              "min_keep": min_keep, "tokens": stats.tokens}
    return plan_from_scores(scores(stats, metric), threshold=threshold, ratio=ratio, scope=scope,
                            multiple=multiple, min_keep=min_keep, fingerprint=stats.fingerprint, policy=policy)
