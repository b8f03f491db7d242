"""Importance metrics and pruning policies → ``PruningPlan`` (kept neuron indices per layer, readable JSON).

Normalised mean L1 (the paper's threshold). For layer ``l`` and neuron ``j`` with activations ``a`` over the
``T`` calibration tokens, ``m_j = Σ|a_j| / T`` (mean |activation|) and the normalised score is
``s_j = m_j / max_k m_k`` (the layer's most active neuron scores 1). ``--threshold ε`` removes neurons with
``s_j < ε``: ε = 1e-3 (the paper's mild setting) removes neurons under 0.1 % of the layer's strongest mean
activation, ε = 1e-1 (aggressive) those under 10 %. Every metric (``minigpt.pipeline.importance``) is normalised the same way, so a
global ratio ranks neurons of all layers on one scale. ``reverse`` removes the *highest*-scoring fraction instead
(the reverse-pruning experiment).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from minigpt.errors import MiniGPTError
from minigpt.pipeline import importance
from minigpt.pipeline.stats import CalibrationStats
from minigpt.pipeline.stats import fingerprint as model_fingerprint


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
    heads: list[list[int]] | None = None  # per layer, kept query heads (a KV head left with none goes)
    hidden: list[int] | None = None  # kept hidden channels
    layers: list[int] | None = None  # kept decoder blocks

    def structures(self):
        """What ``minigpt.models.surgery`` removes (MLP neurons only where some layer loses one)."""
        from minigpt.models.surgery import Kept

        mlp = self.kept if self.kept_widths != self.widths else None
        return Kept(mlp=mlp, heads=self.heads, hidden=self.hidden, layers=self.layers)

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
            raw = json.loads(Path(path).read_text())
            plan = cls(kept=raw["kept"], widths=raw["widths"], fingerprint=raw.get("fingerprint", {}),
                       policy=raw.get("policy", {}), vocab=raw.get("vocab"), heads=raw.get("heads"),
                       hidden=raw.get("hidden"), layers=raw.get("layers"))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise MiniGPTError(f"cannot read plan {path}: {type(err).__name__}: {err}") from err
        for k, w in zip(plan.kept, plan.widths):
            if any(not 0 <= i < w for i in k) or len(set(k)) != len(k):
                raise MiniGPTError(f"plan {path} has out-of-range or repeated indices")
        return plan


QUANT_MULTIPLE = 32
"""The ``auto`` rounding: Q8_0/Q4_0 (GGUF) and most int8/int4 kernels quantise rows in blocks of 32."""


def auto_multiple(widths: list[int], step: int = 1) -> int:
    """``multiple="auto"``: 32 when every original width is a multiple of 32 (the model is quantisable and pruning
    keeps it so) and the rounding step ``lcm(step, 32)`` is at most 1/8 of it (a 32-wide expert would otherwise keep
    everything), otherwise 1 (rounding could not align the widths, or would swallow the ratio). ``step``: what kept
    counts are multiples of anyway (hidden channels: the query-head count; MLP neurons and experts' widths: 1)."""
    block = math.lcm(step, QUANT_MULTIPLE)
    ok = all(w % QUANT_MULTIPLE == 0 and block <= w // 8 for w in widths)
    return QUANT_MULTIPLE if ok else 1


def _round_up(n: int, multiple: int, cap: int) -> int:
    return min(cap, multiple * math.ceil(n / multiple)) if multiple > 1 else n


def _keep_top(score: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest scores (ties → lower index), sorted ascending."""
    order = torch.sort(-score, stable=True).indices[:k]
    return order.sort().values.tolist()


@dataclass(frozen=True)
class MLPPolicy:
    """How many MLP neurons each layer keeps, validated once (``minigpt.pipeline.policy.Policy`` extends it).

    mlp: the fraction of neurons to remove (``ratio``, ``--mlp``/``--ratio``), or threshold: drop ``s < ε``; a plan
    needs exactly one of them (``Policy`` may leave both unset when it removes other structures).
    scope: ``uniform`` (the ratio applied to every layer) or ``global`` (one ranking across layers).
    multiple: kept widths rounded *up* to a multiple (e.g. 64/128 for tensor cores), never above the width;
    ``"auto"``: 32 (GGUF Q8_0's block) when every width is a multiple of 32, else 1 (``auto_multiple``).
    min_keep: floor as a fraction of each layer's width; at least one neuron (one ``multiple``) always stays.
    reverse: with a ratio, remove the highest-scoring neurons first.
    """

    mlp: float | None = None
    threshold: float | None = None
    scope: str = "uniform"
    multiple: int | str = 1
    min_keep: float = 0.0
    reverse: bool = False

    def __post_init__(self):
        if self.threshold is not None and self.mlp is not None:
            raise MiniGPTError("give exactly one of threshold or ratio")
        if self.reverse and self.threshold is not None:
            raise MiniGPTError("reverse pruning takes a ratio, not a threshold")
        if self.threshold is not None and not (0.0 <= self.threshold <= 1.0):
            raise MiniGPTError(f"threshold must be in [0, 1] (normalised scores), got {self.threshold}")
        if self.mlp is not None and not (0.0 <= self.mlp < 1.0):
            raise MiniGPTError(f"ratio must be in [0, 1), got {self.mlp}")
        if self.scope not in ("uniform", "global"):
            raise MiniGPTError(f"scope must be 'uniform' or 'global', got {self.scope!r}")
        multiple_ok = self.multiple == "auto" or (isinstance(self.multiple, int) and self.multiple >= 1)
        if not multiple_ok or not (0.0 <= self.min_keep <= 1.0):
            raise MiniGPTError(f"multiple must be ≥ 1 and min_keep in [0, 1] (got {self.multiple}, {self.min_keep})")

    @classmethod
    def of(cls, policy: MLPPolicy | None, keywords: dict) -> MLPPolicy:
        """``policy``, or one built from ``minigpt.plan``/``prune``'s keywords (``ratio`` is ``mlp``)."""
        if policy is not None and keywords:
            raise MiniGPTError(f"give a policy or its keywords ({', '.join(keywords)}), not both")
        if policy is not None:
            return policy
        names = {f.name for f in fields(MLPPolicy)} - {"mlp"} | {"ratio"}
        unknown = sorted(set(keywords) - names)
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r} (policy keywords: {', '.join(sorted(names))})")
        return cls(**{"mlp" if k == "ratio" else k: v for k, v in keywords.items()})

    def resolved(self, widths: list[int]) -> MLPPolicy:
        """The policy with ``multiple="auto"`` replaced by ``auto_multiple(widths)``."""
        return replace(self, multiple=auto_multiple(widths)) if self.multiple == "auto" else self

    def record(self) -> dict:
        """The plan JSON's ``policy`` entries of the MLP (``ratio``: ``mlp``)."""
        return {"threshold": self.threshold, "ratio": self.mlp, "scope": self.scope, "multiple": self.multiple,
                "min_keep": self.min_keep, "reverse": self.reverse}


def plan_from_scores(layer_scores: list[torch.Tensor], policy: MLPPolicy, *, fingerprint: dict | None = None,
                     record: dict | None = None) -> PruningPlan:
    """Keep neurons by normalised score as ``policy`` says: its ``threshold`` (drop s < ε) or ``mlp`` ratio (drop
    that fraction). ``record``: the plan JSON's ``policy`` dict."""
    if (policy.threshold is None) == (policy.mlp is None):
        raise MiniGPTError("give exactly one of threshold or ratio")
    widths = [s.numel() for s in layer_scores]
    policy = policy.resolved(widths)
    threshold, ratio, multiple = policy.threshold, policy.mlp, policy.multiple
    norm = [-s if policy.reverse else s for s in normalise(layer_scores)]
    if threshold is not None:
        counts = [int((s >= threshold).sum()) for s in norm]
    elif policy.scope == "uniform":
        counts = [w - round(ratio * w) for w in widths]
    else:
        flat = torch.cat(norm)
        dropped = torch.sort(flat, stable=True).indices[: round(ratio * flat.numel())]
        layer_of = torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(widths))
        counts = [w - int(d) for w, d in zip(widths, torch.bincount(layer_of[dropped], minlength=len(widths)))]
    floors = [max(1, math.ceil(policy.min_keep * w)) for w in widths]
    counts = [_round_up(max(c, f), multiple, w) for c, f, w in zip(counts, floors, widths)]
    kept = [_keep_top(s, c) for s, c in zip(norm, counts)]
    return PruningPlan(kept=kept, widths=widths, fingerprint=dict(fingerprint or {}), policy=dict(record or {}))


def plan(
    stats: CalibrationStats | None,
    metric: str = "l1",
    *,
    policy: MLPPolicy | None = None,
    model=None,
    reference: CalibrationStats | None = None,
    seed: int = 0,
    **keywords,
) -> PruningPlan:
    """Pruning plan by ``metric`` (``minigpt.pipeline.importance``) from ``stats``, the ``model``'s weights or both.

    ``policy``: an ``MLPPolicy`` (or ``minigpt.Policy``), or its keywords: ``ratio`` or ``threshold``, ``scope``,
    ``multiple``, ``min_keep``, ``reverse`` (``MLPPolicy``). ``reference``: statistics of another corpus
    (``selectivity``); ``seed``: the ``random`` baseline's generator.
    """
    policy = MLPPolicy.of(policy, keywords)
    # ratio 0 keeps every neuron whatever the scores: it needs neither statistics nor a reference
    layer_scores = importance.scores("random" if policy.mlp == 0 else metric, stats=stats, model=model,
                                     reference=reference, seed=seed)
    policy = policy.resolved([s.numel() for s in layer_scores])
    record = {"metric": metric, **policy.record(), "tokens": stats.tokens if stats is not None else 0}
    if metric == "random":
        record["seed"] = seed
    if reference is not None and metric == "selectivity":
        record["reference_tokens"] = reference.tokens
    fp = stats.fingerprint if stats is not None else model_fingerprint(model)
    return plan_from_scores(layer_scores, policy, fingerprint=fp, record=record)
