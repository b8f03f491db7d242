"""``Policy``: how much of every structure to remove, validated once; the plans of heads, hidden channels and layers.

Scores (from ``CalibrationStats.sums``, ``minigpt.pipeline.taps``), lowest removed first:

* query head h of layer l: mean ‖o_h‖ over tokens. ``heads = r`` removes ``round(r·G)`` heads inside every KV
  group of ``G`` query heads (the config stays stock: H' stays a multiple of K); with ``kv_groups`` it removes
  ``round(r·K)`` whole KV groups (score: the sum of their heads'), with their query heads.
* hidden channel c: mean |x_c| of every block's normalised inputs, summed over layers; the kept count is rounded
  down to a multiple of the query-head count (stock configs require it) and of ``multiple``.
* layer l: Block Influence, mean over tokens of 1 − cos(residual before, after); ``layer_metric="random"``
  removes seeded random layers instead (the baseline).

``heads_scope = "global"`` removes ``round(r·U)`` of all ``U`` units (KV groups with ``kv_groups``, otherwise one
query head of every KV group of a layer) where removing them costs least over all layers, each layer keeping one:
the unit's structured OBS cost on the attention output projection (the increase of E‖o_proj output error‖² when
it goes and the rest is refitted, ``minigpt.pipeline.compensate.head_costs``), from the Gram statistics of o_proj's input,
divided by the mean ‖residual‖² entering the layer (the norms downstream see the error relative to the residual,
which grows by orders of magnitude over SmolLM2's depth: unscaled, its first layers' heads looked cheapest).

``target_params = f`` (the fraction of parameters to keep) allocates by cost per parameter: every MLP neuron and
every KV group gets its structured OBS cost (removed alone, the rest refitted; both in residual-stream units:
``neuron_costs`` on down_proj, ``head_costs`` on o_proj), relative to the layer's mean ‖residual‖², divided by
the parameters it holds; walking up that ranking until the parameters to remove are reached, the KV groups met
(each layer keeping one) set the heads amount, removed with ``kv_groups`` and ``heads_scope="global"``. The MLP
neurons are then removed uniformly by the metric at the smallest ratio on a 1/200 grid whose model keeps at most
``f`` of the parameters (counted exactly on a meta-device copy). ``hidden`` and ``layers``, when given, are removed as well and count towards the budget. Needs
Gram statistics (without attention Gram statistics, or attention heads, only the MLP is cut).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace

import torch

from minigpt.errors import MiniGPTError
from minigpt.models import surgery
from minigpt.models.architecture import describe
from minigpt.pipeline.planning import MLPPolicy, auto_multiple


@dataclass(frozen=True)
class Policy(MLPPolicy):
    """Amounts per structure, validated once. The MLP fields (``mlp``, ``threshold``, ``scope``, ``multiple``,
    ``min_keep``, ``reverse``) are ``MLPPolicy``'s; ``multiple`` also rounds the kept hidden size."""

    heads: float = 0.0
    kv_groups: bool = False
    heads_scope: str = "uniform"
    hidden: float = 0.0
    layers: int = 0
    layer_metric: str = "influence"
    target_params: float | None = None
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        for name in ("heads", "hidden"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise MiniGPTError(f"--{name} must be a fraction in [0, 1), got {value}")
        if self.layers < 0:
            raise MiniGPTError(f"--layers must be a number of layers ≥ 0, got {self.layers}")
        if self.target_params is not None and not 0.0 < self.target_params < 1.0:
            raise MiniGPTError(f"--target-params must be the fraction of parameters to keep, in (0, 1), "
                               f"got {self.target_params}")
        if self.target_params is not None and (self.mlp is not None or self.threshold is not None or self.heads):
            raise MiniGPTError("--target-params chooses the MLP and head amounts itself: drop --mlp/--ratio/--heads")
        if self.heads_scope not in ("uniform", "global"):
            raise MiniGPTError(f"--heads-scope must be uniform or global, got {self.heads_scope!r}")
        if self.layer_metric not in ("influence", "random"):
            raise MiniGPTError(f"layer metric must be influence or random, got {self.layer_metric!r}")

    @classmethod
    def of(cls, policy: MLPPolicy | None, keywords: dict) -> Policy:
        """``MLPPolicy.of`` as a ``Policy`` (an ``MLPPolicy`` given gains no other structure)."""
        policy = MLPPolicy.of(policy, keywords)
        return policy if isinstance(policy, Policy) else cls(**asdict(policy))

    @property
    def structural(self) -> bool:
        return bool(self.heads or self.hidden or self.layers)

    def structures_record(self) -> dict:
        """The plan JSON's ``policy`` entries of heads, hidden channels and layers."""
        return {"heads": self.heads, "kv_groups": self.kv_groups, "heads_scope": self.heads_scope,
                "hidden": self.hidden, "layers": self.layers, "layer_metric": self.layer_metric}

    def check_model(self, model) -> None:
        """Refuse amounts this model cannot take (one line), before any statistics are collected."""
        arch = describe(model)
        if self.hidden and arch.hidden is None:
            raise MiniGPTError(f"--hidden: {model.config.model_type} has no describable hidden channels "
                               f"({arch.hidden_problem})")
        if self.layers >= len(arch.layers):
            raise MiniGPTError(f"--layers {self.layers} would remove every one of the {len(arch.layers)} layers")
        if self.heads or self.kv_groups:
            layer = arch.layers[0]
            if layer.heads is None:
                raise MiniGPTError(f"--heads: {model.config.model_type} has no attention heads in its description")
            n = layer.kv.size if self.kv_groups else layer.queries_per_kv
            if n - round(self.heads * n) < 1:
                raise MiniGPTError(f"--heads {self.heads} would remove every head of a KV group")
        if self.hidden:
            d = arch.layers[0].head_dim or 1
            if arch.hidden.size - round(self.hidden * arch.hidden.size) < d:
                raise MiniGPTError(f"--hidden {self.hidden} leaves fewer channels than head_dim = {d}")


def _mean(stats, key: str) -> torch.Tensor:
    if key not in stats.sums:
        raise MiniGPTError(f"the statistics have no {key} sums (collected before format 2): calibrate again")
    return stats.sums[key].double().cpu() / stats.tokens


def _lowest(score: torch.Tensor, n: int) -> set[int]:
    return set(torch.sort(score, stable=True).indices[:n].tolist())


def head_units(arch, layer: int, kv_groups: bool, score: torch.Tensor) -> list[list[int]]:
    """Layer ``layer``'s removable units, cheapest first by the per-head ``score: (H,)``: whole KV groups (their
    query heads), or one query head of every KV group (the k-th cheapest of each, so H' stays a multiple of K)."""
    groups = arch.layers[layer]
    per = groups.queries_per_kv
    by_group = score.view(groups.kv.size, per)
    if kv_groups:
        order = torch.sort(by_group.sum(1), stable=True).indices.tolist()
        return [list(range(g * per, (g + 1) * per)) for g in order]
    ranks = torch.sort(by_group, dim=1, stable=True).indices  # (K, G)
    return [[g * per + int(ranks[g, k]) for g in range(groups.kv.size)] for k in range(per)]


def residual_scale(stats) -> torch.Tensor:
    """(L,) float64 mean ‖residual entering block l‖² (``layers.residual_sq``): the global rankings divide a
    layer's output-error costs by it, since the norms after it see the error relative to the residual."""
    if "layers.residual_sq" not in stats.sums:
        raise MiniGPTError("the statistics have no layers.residual_sq sums (collected before global head ranking "
                           "existed): calibrate again")
    return _mean(stats, "layers.residual_sq")


def kept_heads_global(model, stats, ratio: float, kv_groups: bool) -> list[list[int]]:
    """Per layer, the query heads kept when ``round(ratio · units)`` units (``head_units``) are removed where
    removing them costs least over all layers: each unit's structured OBS cost on the attention output
    projection (``minigpt.pipeline.compensate.head_costs``: a KV group's joint cost; a unit of query heads, the sum of
    theirs) relative to the layer's residual (``residual_scale``), every layer keeping at least one unit."""
    from minigpt.pipeline.compensate import head_costs

    arch = describe(model)
    scale = residual_scale(stats)
    units, costs = [], []
    for layer, groups in enumerate(arch.layers):
        per, n_kv = groups.queries_per_kv, groups.kv.size
        both = head_costs(model, stats, layer, [[h] for h in range(groups.heads.size)] +
                          ([list(range(g * per, (g + 1) * per)) for g in range(n_kv)] if kv_groups else []))
        single = both[: groups.heads.size]
        units.append(head_units(arch, layer, kv_groups, single))
        if kv_groups:  # a KV group's own joint cost
            costs.append(both[groups.heads.size:][[u[0] // per for u in units[-1]]] / scale[layer])
        else:  # one query head of every KV group: the sum of their costs
            costs.append(torch.stack([single[u].sum() for u in units[-1]]) / scale[layer])
    total = sum(len(u) for u in units)
    n = round(ratio * total)
    if n > total - len(units):
        raise MiniGPTError(f"--heads {ratio} with --heads-scope global would remove every head of some layer")
    removed = [0] * len(units)
    items = sorted((float(c), layer, k) for layer, cs in enumerate(costs) for k, c in enumerate(cs))
    for _, layer, _ in items:  # a layer's costs are not always increasing: it loses its cheapest units first
        if n == 0:
            break
        if removed[layer] < len(units[layer]) - 1:
            removed[layer] += 1
            n -= 1
    costs_order = [torch.sort(c, stable=True).indices.tolist() for c in costs]
    return [sorted(set(range(groups.heads.size)) - {h for k in order[:r] for h in us[k]})
            for groups, us, order, r in zip(arch.layers, units, costs_order, removed)]


def kept_heads(stats, arch, ratio: float, kv_groups: bool) -> list[list[int]]:
    """Per layer, the query heads kept (see module doc)."""
    out = []
    for layer, groups in enumerate(arch.layers):
        score = _mean(stats, f"heads.{layer}.sum")
        per = groups.queries_per_kv
        by_group = score.view(groups.kv.size, per)
        if kv_groups:
            dropped = _lowest(by_group.sum(1), min(round(ratio * groups.kv.size), groups.kv.size - 1))
            out.append([h for h in range(groups.heads.size) if h // per not in dropped])
        else:
            n = min(round(ratio * per), per - 1)
            out.append(sorted(g * per + j for g in range(groups.kv.size)
                              for j in set(range(per)) - _lowest(by_group[g], n)))
    return out


def kept_hidden(stats, arch, ratio: float, heads: list[list[int]] | None, multiple: int | str) -> list[int]:
    """Kept hidden channels: a multiple of the query-head count and of ``multiple``. ``"auto"``: ``auto_multiple``'s
    rule with the head count as the step (GGUF blocks run along the hidden dimension of q/k/v/gate/up; SmolLM2: 9
    heads, lcm 288 > 576 / 8, so 1)."""
    size = arch.hidden.size
    n_heads = math.lcm(*(len(h) for h in heads)) if heads else math.lcm(*(g.heads.size for g in arch.layers))
    if multiple == "auto":
        multiple = auto_multiple([size], step=n_heads)
    step = math.lcm(n_heads, multiple)
    keep = max(step, (size - round(ratio * size)) // step * step)
    return sorted(set(range(size)) - _lowest(_mean(stats, "hidden.sum_abs"), size - keep))


def kept_layers(stats, n_layers: int, remove: int, metric: str, seed: int) -> list[int]:
    if metric == "random":
        score = torch.rand(n_layers, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    else:
        score = _mean(stats, "layers.influence")
    return sorted(set(range(n_layers)) - _lowest(score, remove))


def structure_plan(stats, model, policy: Policy) -> surgery.Kept:
    """What ``policy`` keeps of heads, hidden channels and layers (MLP neurons are ``minigpt.plan``'s)."""
    arch = describe(model)
    if policy.heads and policy.heads_scope == "global":
        heads = kept_heads_global(model, stats, policy.heads, policy.kv_groups)
    else:
        heads = kept_heads(stats, arch, policy.heads, policy.kv_groups) if policy.heads else None
    hidden = kept_hidden(stats, arch, policy.hidden, heads, policy.multiple) if policy.hidden else None
    layers = kept_layers(stats, len(arch.layers), policy.layers, policy.layer_metric, policy.seed) \
        if policy.layers else None
    return surgery.Kept(heads=heads, hidden=hidden, layers=layers)


def count_after(model, kept: surgery.Kept, mlp_bias: bool = False) -> int:
    """Parameters (tied counted once) of ``model`` pruned to ``kept``, computed on a meta-device copy; ``mlp_bias``:
    with the MLP biases a compensation switches on (``minigpt.pipeline.compensate.bias_slot``)."""
    from minigpt.pipeline.compensate import add_mlp_biases

    base = next(c for c in type(model).__mro__ if c.__name__ != "MiniGPTForCausalLM")
    with torch.device("meta"):
        shadow = base(copy.deepcopy(model.config))
    surgery.shrink(shadow, kept, lambda srcs, idx, dims: [s.index_select(d, i.to("meta"))
                                                          for s, i, d in zip(srcs, idx, dims)])
    if mlp_bias:
        add_mlp_biases(shadow)
    return sum(p.numel() for p in shadow.parameters())


def params_after(stats, model, policy: Policy, mlp_scores: list[torch.Tensor],
                 structures: surgery.Kept | None = None, mlp_bias: bool = False) -> int:
    """Parameters ``model`` keeps under ``policy`` (its ``mlp`` a ratio applied to every layer by ``mlp_scores``);
    ``structures``: ``structure_plan(stats, model, policy)`` when already made (searches over the MLP ratio);
    ``mlp_bias``: ``count_after``'s."""
    kept = copy.copy(structures) if structures is not None else structure_plan(stats, model, policy)
    r = policy.mlp or 0.0
    kept.mlp = [sorted(set(range(len(s))) - _lowest(s, min(round(r * len(s)), len(s) - 1))) for s in mlp_scores]
    return count_after(model, kept, mlp_bias)


def item_params(model, group) -> int:
    """Parameters one item of ``group`` (a ``Group`` of the description) holds over all its slices."""
    total = 0
    for sl in group.slices:
        p = model.get_parameter(sl.param)
        total += sl.unit * p.numel() // p.shape[sl.dim]
    return total


def heads_share(stats, model, remove: float) -> float:
    """The fraction of KV groups the ``target_params`` rule removes (module doc): the KV groups among the units
    of lowest cost per parameter, walking up until ``remove`` parameters are reached."""
    from minigpt.pipeline.compensate import head_costs, neuron_costs

    arch = describe(model)
    scale = residual_scale(stats)
    per_layer = [item_params(model, g.kv) + g.queries_per_kv * item_params(model, g.heads) for g in arch.layers]
    items = []  # (cost per parameter, parameters, layer or None for an MLP neuron)
    for layer, groups in enumerate(arch.layers):
        per, n_kv = groups.queries_per_kv, groups.kv.size
        neuron = item_params(model, groups.mlp)
        items += [(float(c / scale[layer]) / neuron, neuron, None) for c in neuron_costs(model, stats, layer)]
        costs = head_costs(model, stats, layer, [list(range(g * per, (g + 1) * per)) for g in range(n_kv)])
        items += [(float(c / scale[layer]) / per_layer[layer], per_layer[layer], layer) for c in costs]
    removed, groups_removed = 0, [0] * len(arch.layers)
    for _, params, layer in sorted(items, key=lambda item: item[0]):
        if removed >= remove:
            break
        if layer is not None:
            if groups_removed[layer] == arch.layers[layer].kv.size - 1:
                continue
            groups_removed[layer] += 1
        removed += params
    return sum(groups_removed) / sum(g.kv.size for g in arch.layers)


def allocate(stats, model, policy: Policy, mlp_scores: list[torch.Tensor], mlp_bias: bool = False) -> Policy:
    """The policy with ``mlp`` and ``heads`` chosen by the ``target_params`` rule (module doc); ``mlp_bias``: the
    compensation will switch MLP biases on, which the budget counts (``count_after``)."""
    budget = policy.target_params * sum(p.numel() for p in model.parameters())
    base = replace(policy, target_params=None, mlp=0.0)
    if describe(model).layers[0].heads is not None and "heads.0.gram" in stats.sums:
        heads = heads_share(stats, model, params_after(stats, model, base, mlp_scores, mlp_bias=mlp_bias) - budget)
        base = replace(base, heads=heads, kv_groups=True, heads_scope="global") if heads else base

    def trial(step: int) -> Policy:
        return replace(base, mlp=step / 200)

    def count(step: int) -> int:
        return params_after(stats, model, trial(step), mlp_scores, structures, mlp_bias)

    structures = structure_plan(stats, model, base)
    lo, hi = 0, 199  # grid steps of 1/200
    if count(hi) > budget:
        raise MiniGPTError(f"--target-params {policy.target_params} cannot be reached by removing MLP neurons "
                           f"and heads (add --hidden or --layers)")
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return trial(lo)
