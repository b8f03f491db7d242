"""One config-driven entry point: calibrate (or take stats) → plan → compact."""

from __future__ import annotations

from minigpt.errors import MiniGPTError
from minigpt.pipeline import importance
from minigpt.pipeline.calibration import calibrate
from minigpt.pipeline.compact import compact
from minigpt.pipeline.compensate import DAMPING, bias_slot, compensate_heads, mark_mlp_bias, obs_kept
from minigpt.pipeline.compensate import compensate as compensate_model
from minigpt.pipeline.importance import NEEDS_STATS
from minigpt.pipeline.planning import MLPPolicy, PruningPlan, plan
from minigpt.pipeline.policy import Policy, allocate, structure_plan
from minigpt.pipeline.stats import CalibrationStats, check_fingerprint, fingerprint


def sized(policy: MLPPolicy, stats, model, metric: str, seed: int, compensate: str) -> Policy:
    """``policy`` as a ``Policy``, a ``target_params`` budget turned into amounts (``allocate``) counting the MLP
    biases the ``compensate`` refit will switch on."""
    policy = Policy.of(policy, {})
    if policy.target_params is None:
        return policy
    mlp_bias = compensate != "none" and bias_slot(model) == "mlp_bias"
    return allocate(stats, model, policy, importance.scores(metric, stats=stats, model=model, seed=seed), mlp_bias)


def prune(
    model,
    tokenizer=None,
    *,
    stats: CalibrationStats | None = None,
    pruning_plan: PruningPlan | None = None,
    data=None,
    metric: str = "l1",
    policy: MLPPolicy | None = None,
    reference: CalibrationStats | None = None,
    reference_data=None,
    seed: int = 0,
    backend: str = "auto",
    calibration: dict | None = None,
    compensate: str = "none",
    select: str = "metric",
    damping: float = DAMPING,
    **keywords,
) -> tuple[object, PruningPlan]:
    """Prune ``model``'s MLP neurons in place; returns ``(model, plan)``.

    Give a ready ``pruning_plan``, or ``stats`` (checked against the model), or ``data`` to calibrate on
    (``calibration`` holds ``calibrate`` keyword arguments); weight-only metrics and ``random`` need neither.
    ``selectivity`` also needs ``reference`` statistics or ``reference_data`` to calibrate them on.
    ``policy``: a ``minigpt.pipeline.policy.Policy`` (MLP neurons, heads, hidden channels, layers, the
    ``target_params`` budget) or an ``MLPPolicy``; or, instead, ``minigpt.plan``'s MLP keywords (``ratio``,
    ``threshold``, ``scope``, ``multiple``, ``min_keep``, ``reverse``). ``ratio=0.2`` removes 20 % of every layer's
    neurons (``ratio=0`` none, without calibrating); ``reverse=True`` the highest-scoring ones.
    ``select="obs"``: the metric sets how many neurons each layer keeps, greedy OBS which (``minigpt.pipeline.compensate``);
    ``compensate`` (none, bias, lstsq) refits each down_proj on the kept neurons. Both need Gram statistics
    (calibrated here with them when ``stats`` is not given).
    """
    if compensate != "none" or select == "obs":
        calibration = {**(calibration or {}), "gram": True}
    policy = Policy.of(policy, keywords)
    policy.check_model(model)
    if policy.structural or policy.target_params is not None:
        stats = _stats(model, tokenizer, stats, data, backend, calibration)
    target, policy = policy.target_params, sized(policy, stats, model, metric, seed, compensate)
    keeps_all = policy.mlp == 0  # no score removes a neuron: nothing to calibrate (vocabulary-only runs)
    needs_gram = (compensate != "none" or select == "obs") and not keeps_all
    if needs_gram:
        stats = _stats(model, tokenizer, stats, data, backend, calibration)
    if pruning_plan is None:
        if metric == "selectivity" and reference is None and not keeps_all:
            if reference_data is None:
                raise MiniGPTError("metric selectivity needs reference statistics or reference data")
            reference = _stats(model, tokenizer, None, reference_data, backend, calibration)
        if metric in NEEDS_STATS and not (keeps_all and stats is None):
            stats = _stats(model, tokenizer, stats, data, backend, calibration)
        pruning_plan = plan(stats, metric, policy=policy, model=model, reference=reference, seed=seed)
        if select == "obs" and not keeps_all:
            pruning_plan.kept = obs_kept(model, stats, pruning_plan.kept_widths, damping)
        pruning_plan.policy["select"] = select
        if target is not None:
            pruning_plan.policy["target_params"] = target
        if policy.structural:
            kept = structure_plan(stats, model, policy)
            pruning_plan.heads, pruning_plan.hidden, pruning_plan.layers = kept.heads, kept.hidden, kept.layers
            pruning_plan.policy.update(policy.structures_record())
    elif select != "metric":
        raise MiniGPTError("a given plan already selects the neurons: --select applies only when planning")
    report = compensate_model(model, stats, pruning_plan.kept_tensors(), "none" if keeps_all else compensate,
                              damping)
    if pruning_plan.heads is not None:
        report["attention"] = compensate_heads(model, stats, pruning_plan.heads, compensate, damping)
    pruning_plan.policy["compensate"] = report
    model = compact(model, pruning_plan, backend=backend)
    mark_mlp_bias(model, report)
    return model, pruning_plan


def _stats(model, tokenizer, stats, data, backend, calibration) -> CalibrationStats:
    """``stats`` checked against the model, or a fresh calibration on ``data``."""
    if stats is not None:
        check_fingerprint(stats.fingerprint, fingerprint(model, tokenizer))
        return stats
    if tokenizer is None:
        raise MiniGPTError("calibrating needs the tokenizer")
    return calibrate(model, tokenizer, data, backend=backend, **(calibration or {}))


def prune_vocabulary(model, tokenizer, token_counts, *, min_count: int | None = 1, always_keep=(), pad_to: int = 1,
                     min_size: int = 0, keep_ids=None):
    """Drop tokens seen fewer than ``min_count`` times (keeping specials, bytes and merge-closure), in place.

    ``min_size`` keeps at least that many tokens (the most frequent of the rest are added back). ``keep_ids``: a
    kept set already chosen (``minigpt.pipeline.vocab_size.choose_vocab``) instead of the count rule.

    Returns ``(new_tokenizer, kept_ids, report)``; ``kept_ids`` are the old ids in their new order.
    """
    from minigpt.pipeline import vocab

    keep = keep_ids if keep_ids is not None else vocab.plan_vocab(
        tokenizer, token_counts, min_count=1 if min_count is None else min_count, always_keep=always_keep,
        pad_to=pad_to, min_size=min_size)
    report = vocab.vocab_report(model, keep)
    new_tokenizer = vocab.prune_tokenizer(tokenizer, keep)
    vocab.shrink_vocab(model, keep)
    return new_tokenizer, keep, report
