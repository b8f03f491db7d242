"""Mixture-of-experts pruning: routing statistics streamed through the forward, whole experts and the neurons inside
experts removed, a stock config saved.

Families: ``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``olmoe``, whose sparse blocks hold a router ``gate`` (weight
``(E, H)``) and fused experts ``experts.gate_up_proj: (E, 2I, H)`` (neuron j of expert e = rows j and I+j) and
``experts.down_proj: (E, H, I)``; Qwen2-MoE adds a dense ``shared_expert`` (gate/up/down ``nn.Linear``) that every
token goes through. Dense layers of these models (Qwen's ``mlp_only_layers``) are left as they are.

Removing an expert the router never selects leaves every output unchanged when the router renormalises its top-k
weights (Mixtral always; the others with ``norm_topk_prob``). Without renormalisation (``norm_topk_prob`` off,
the Qwen and OLMoE default) a token's weights are its softmax probabilities over *all* experts: once experts are
removed the softmax runs over the kept ones only, so every kept expert's output is scaled up by ``1 / (1 - m)``,
``m`` being the token's probability mass on the removed experts. ``moe_report`` gives the mean ``m``
(``removed_router_mass``) measured on the calibration corpus, so the distortion is known before saving.
"""

from __future__ import annotations

import contextlib
import json
import os
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minigpt import ops
from minigpt.errors import MiniGPTError
from minigpt.pipeline.stats import check_fingerprint, content_hash

MOE_TYPES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
CRITERIA = ("freq", "mass")  # routing frequency (top-k selections) or routing-weight mass
SCOPES = ("uniform", "global")  # the same expert count in every block, or counts from one ranking across blocks
NEURON_METRICS = {"l1": "sum_abs", "l2": "sum_sq", "max": "max_abs", "freq": "nonzero"}
MAXIMA = ("max_abs", "shared_max_abs")  # merged by max, the other fields by sum
FORMAT_VERSION = 1
# Kept expert widths are rounded up to a multiple of this: transformers' default experts kernel (grouped_mm) needs
# rows of a multiple of 16 bytes, i.e. 8 bf16 or 4 fp32 values; a saved model with another width fails to run.
EXPERT_WIDTH_MULTIPLE = 8


@dataclass
class MoELayer:
    """One sparse block: ``index`` of its decoder layer, the router, the fused experts, the shared expert (or None)."""

    index: int
    router: nn.Module
    experts: nn.Module
    shared: nn.Module | None


def is_moe(model_or_config) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None) in MOE_TYPES


def moe_layers(model) -> list[MoELayer]:
    """The sparse blocks of ``model``; a one-line error for a model that is not a supported MoE."""
    if not is_moe(model):
        raise MiniGPTError(f"expert pruning supports model_type {', '.join(MOE_TYPES)}; "
                           f"this model is {getattr(model.config, 'model_type', None)!r}")
    return [MoELayer(i, block.mlp.gate, block.mlp.experts, getattr(block.mlp, "shared_expert", None))
            for i, block in enumerate(model.base_model.layers) if hasattr(block.mlp, "experts")]


def expert_width_key(config) -> str:
    """The config key of the experts' width: ``moe_intermediate_size`` (Qwen) or ``intermediate_size``."""
    return "moe_intermediate_size" if hasattr(config, "moe_intermediate_size") else "intermediate_size"


def fingerprint(model) -> dict:
    """What MoE statistics and plans are tied to: layers, expert counts and widths, top-k and a config hash."""
    layers = moe_layers(model)
    config = {k: v for k, v in model.config.to_dict().items()
              if k not in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures")}
    return {
        "model_type": model.config.model_type,
        "moe_layers": [m.index for m in layers],
        "num_experts": [m.experts.gate_up_proj.shape[0] for m in layers],
        "expert_width": [m.experts.down_proj.shape[2] for m in layers],
        "shared_width": [m.shared.down_proj.in_features if m.shared is not None else 0 for m in layers],
        "top_k": model.config.num_experts_per_tok,
        "norm_topk_prob": bool(getattr(model.config, "norm_topk_prob", True)),  # Mixtral always renormalises
        "config_hash": content_hash(config),
    }


@dataclass
class MoEStats:
    """Sums over the calibration tokens, per sparse block (E experts of width I, a shared expert of width S).

    ``layers[l]`` maps names to tensors: ``routed: (E,)`` int64 top-k selections; ``weight: (E,)`` float64 Σ of
    the routing weights the expert's output is multiplied by; ``prob: (E,)`` float64 Σ of the router's softmax
    probability over every token; ``sum_abs``, ``sum_sq: (E, I)`` float64, ``max_abs: (E, I)`` float32 and
    ``nonzero: (E, I)`` int64 of each expert's activations ``h = act(gate)·up`` over only the tokens routed to
    it; ``shared_sum_abs`` … ``shared_nonzero: (S,)`` likewise over every token (Qwen2-MoE).
    """

    layers: list[dict[str, torch.Tensor]]
    tokens: int
    fingerprint: dict
    meta: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, fp: dict) -> MoEStats:
        layers = []
        for e, n, s in zip(fp["num_experts"], fp["expert_width"], fp["shared_width"]):
            layer = {"routed": torch.zeros(e, dtype=torch.int64), "weight": torch.zeros(e, dtype=torch.float64),
                     "prob": torch.zeros(e, dtype=torch.float64)}
            layer.update(_neuron_sums("", (e, n)))
            if s:
                layer.update(_neuron_sums("shared_", (s,)))
            layers.append(layer)
        return cls(layers, 0, dict(fp))

    def merge(self, other: MoEStats) -> MoEStats:
        """Statistics of both corpora: sums add, maxima take the max. Refuses another model's statistics."""
        check_fingerprint(self.fingerprint, other.fingerprint, "expert statistics")
        layers = [{k: torch.maximum(a[k], b[k]) if k in MAXIMA else a[k] + b[k] for k in a}
                  for a, b in zip(self.layers, other.layers)]
        return MoEStats(layers, self.tokens + other.tokens, dict(self.fingerprint), dict(self.meta))

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically as safetensors; the metadata holds tokens, fingerprint and ``meta`` as JSON."""
        from safetensors.torch import save_file

        from minigpt.io import atomic_file

        tensors = {f"layers.{i}.{k}": t.contiguous() for i, layer in enumerate(self.layers) for k, t in layer.items()}
        header = {"format_version": FORMAT_VERSION, "kind": "moe", "tokens": self.tokens,
                  "fingerprint": self.fingerprint, "meta": self.meta}
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata={"minigpt": json.dumps(header)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> MoEStats:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {})["minigpt"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        except Exception as err:  # missing, truncated or foreign file: safetensors raises several types
            raise MiniGPTError(f"cannot read expert statistics {path}: {str(err).splitlines()[0]}") from err
        if header.get("kind") != "moe" or header.get("format_version") != FORMAT_VERSION:
            raise MiniGPTError(f"{path} is not a minigpt expert-statistics file (format {FORMAT_VERSION})")
        layers = [{} for _ in header["fingerprint"]["moe_layers"]]
        for key, t in tensors.items():
            _, i, name = key.split(".", 2)
            layers[int(i)][name] = t
        return cls(layers, header["tokens"], header["fingerprint"], header["meta"])


def _neuron_sums(prefix: str, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    return {f"{prefix}sum_abs": torch.zeros(shape, dtype=torch.float64),
            f"{prefix}sum_sq": torch.zeros(shape, dtype=torch.float64),
            f"{prefix}max_abs": torch.zeros(shape, dtype=torch.float32),
            f"{prefix}nonzero": torch.zeros(shape, dtype=torch.int64)}


class _Scratch:
    """fp32 per-batch scratch ``acc: (..., 3, N)`` and ``nnz: (..., N)`` for ``ops.column_stats`` on the
    activations' device, folded into the fp64 sums (on the CPU) after every batch."""

    def __init__(self, shape: tuple[int, ...], backend: str):
        self.shape, self.backend, self.acc, self.nnz = shape, backend, None, None

    def add(self, h: torch.Tensor, *index: int) -> None:
        """Statistics of ``h: (tokens, N)`` into the scratch row ``index`` (an expert), or the whole scratch."""
        if self.acc is None:
            self.acc = torch.zeros(*self.shape[:-1], 3, self.shape[-1], dtype=torch.float32, device=h.device)
            self.nnz = torch.zeros(self.shape, dtype=torch.int64, device=h.device)
        ops.column_stats(h.float(), self.acc[index], self.nnz[index], backend=self.backend)

    def fold(self, layer: dict[str, torch.Tensor], prefix: str) -> None:
        if self.acc is None:
            return
        acc = self.acc.cpu()
        layer[f"{prefix}sum_abs"] += acc[..., 0, :].double()
        layer[f"{prefix}sum_sq"] += acc[..., 1, :].double()
        torch.maximum(layer[f"{prefix}max_abs"], acc[..., 2, :], out=layer[f"{prefix}max_abs"])
        layer[f"{prefix}nonzero"] += self.nnz.cpu()
        self.acc.zero_()
        self.nnz.zero_()


def _experts_forward(scratch: _Scratch):
    """The eager fused-experts forward (as ``transformers`` computes it) with each expert's activation statistics."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            if e >= self.gate_up_proj.shape[0]:  # the index transformers uses for "no expert" (skipped there too)
                continue
            pos, tok = torch.where(top_k_index.T == e)
            gate, up = F.linear(hidden_states[tok], self.gate_up_proj[e]).chunk(2, dim=-1)
            h = self.act_fn(gate) * up
            scratch.add(h, e)
            y = F.linear(h, self.down_proj[e]) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    return forward


def _shared_forward(scratch: _Scratch):
    def forward(self, x):
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        scratch.add(h)
        return self.down_proj(h)

    return forward


def _router_hook(layer: dict[str, torch.Tensor]):
    """Adds the router's selections, their weights and its softmax probabilities of a batch into ``layer``."""

    def hook(module, args, output):
        logits, weights, index = output
        layer["prob"] += torch.softmax(logits.float(), dim=-1).sum(0).double().cpu()
        layer["routed"] += torch.bincount(index.flatten().cpu(), minlength=layer["routed"].numel())
        layer["weight"].index_add_(0, index.flatten().cpu(), weights.flatten().double().cpu())

    return hook


@contextlib.contextmanager
def collecting(model, stats: MoEStats, backend: str = "torch"):
    """Within the block every forward of ``model`` adds its routing and expert statistics into ``stats``.

    Call the yielded ``fold()`` after each forward (it moves the batch's fp32 scratch into the fp64 sums).
    """
    layers, scratches, hooks = moe_layers(model), [], []
    try:
        for moe, layer in zip(layers, stats.layers):
            experts = _Scratch(tuple(layer["sum_abs"].shape), backend)
            moe.experts.forward = types.MethodType(_experts_forward(experts), moe.experts)
            scratches.append((experts, layer, ""))
            if moe.shared is not None:
                shared = _Scratch(tuple(layer["shared_sum_abs"].shape), backend)
                moe.shared.forward = types.MethodType(_shared_forward(shared), moe.shared)
                scratches.append((shared, layer, "shared_"))
            hooks.append(moe.router.register_forward_hook(_router_hook(layer)))

        def fold():
            for scratch, layer, prefix in scratches:
                scratch.fold(layer, prefix)

        yield fold
    finally:
        for hook in hooks:
            hook.remove()
        for moe in layers:
            moe.experts.__dict__.pop("forward", None)
            if moe.shared is not None:
                moe.shared.__dict__.pop("forward", None)


@torch.inference_mode()
def collect(model, batches, stats: MoEStats | None = None, backend: str = "auto", on_batch=None) -> MoEStats:
    """Stream ``batches`` (``(B, S)`` input ids) through ``model``, adding into ``stats`` (new when None);
    ``on_batch(stats)`` runs after every batch."""
    stats = stats if stats is not None else MoEStats.empty(fingerprint(model))
    check_fingerprint(stats.fingerprint, fingerprint(model), "expert statistics")
    device = model.get_input_embeddings().weight.device
    with collecting(model, stats, ops.resolve_backend(backend, device)) as fold:
        for input_ids in batches:
            model.base_model(input_ids=input_ids.to(device), use_cache=False)
            fold()
            stats.tokens += input_ids.numel()
            if on_batch is not None:
                on_batch(stats)
    return stats


@dataclass
class MoEPlan:
    """Kept experts per sparse block (ascending old indices; the same count everywhere, for a stock config) and,
    optionally, kept neurons of every kept expert and of the shared expert (the same width everywhere)."""

    experts: list[list[int]]
    neurons: list[list[list[int]]] | None
    shared: list[list[int]] | None
    fingerprint: dict
    policy: dict

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> MoEPlan:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise MiniGPTError(f"cannot read expert plan {path}: {err}") from err


def kept_count(total: int, ratio: float) -> int:
    """How many of ``total`` remain when the fraction ``ratio`` is removed (rounded to the nearest count)."""
    return total - round(total * ratio)


def check_expert_ratio(config, experts: float | None, neurons: float | None = None) -> None:
    """Refuse, from the config alone (before loading weights), ratios outside [0, 1), a plan removing every
    expert of a layer, or one keeping fewer experts than ``num_experts_per_tok``."""
    if not is_moe(config):
        raise MiniGPTError(f"--experts/--expert-neurons need a mixture-of-experts model ({', '.join(MOE_TYPES)}); "
                           f"this one is {getattr(config, 'model_type', None)!r}")
    for flag, ratio in (("--experts", experts), ("--expert-neurons", neurons)):
        if ratio is not None and not 0 <= ratio < 1:
            raise MiniGPTError(f"{flag} must be in [0, 1), got {ratio}")
    if experts is None:
        return
    total, top_k = config.num_experts, config.num_experts_per_tok
    kept = kept_count(total, experts)
    if kept < 1:
        raise MiniGPTError(f"--experts {experts} would remove every one of the {total} experts of each layer")
    if kept < top_k:
        raise MiniGPTError(f"--experts {experts} keeps {kept} of {total} experts per layer, fewer than the "
                           f"{top_k} each token is routed to (num_experts_per_tok)")


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest ``scores`` (ties: lowest index), ascending."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def _global_kept(scores: list[torch.Tensor], ratio: float, top_k: int) -> list[list[int]]:
    """Kept experts per block from one ranking across blocks: each expert's share of its block's ``scores`` (every
    block routes the same tokens), the ``top_k`` best of every block always kept, the fraction ``ratio`` of all
    experts removed."""
    shares = [s.double() / max(float(s.sum()), 1e-30) for s in scores]
    kept = [set(_top(s, top_k)) for s in shares]
    rest = sorted((-float(s[e]), b, e) for b, s in enumerate(shares) for e in range(len(s)) if e not in kept[b])
    total = sum(len(s) for s in scores)
    for _, b, e in rest[: max(kept_count(total, ratio) - sum(map(len, kept)), 0)]:
        kept[b].add(e)
    return [sorted(k) for k in kept]


def plan_moe(stats: MoEStats, experts: float | None = None, criterion: str = "freq", neurons: float | None = None,
             metric: str = "l1", multiple: int = EXPERT_WIDTH_MULTIPLE, scope: str = "uniform") -> MoEPlan:
    """Remove the fraction ``experts`` of every block's experts (``scope`` uniform; ``global``: of all experts,
    ranked across blocks by their share of their block, so counts differ per block and the saved model needs
    ``modeling_minigpt.py``), the least routed to (``freq``: top-k selections; ``mass``: Σ routing weight), and
    the fraction ``neurons`` of every kept (and shared) expert's neurons, the lowest by ``metric`` (l1 Σ|h|, l2
    Σh², max, freq: non-zero count) over the tokens the expert saw; kept widths are rounded up to a ``multiple``
    (``EXPERT_WIDTH_MULTIPLE``)."""
    fp = stats.fingerprint
    if criterion not in CRITERIA or metric not in NEURON_METRICS or scope not in SCOPES:
        raise MiniGPTError(f"criterion must be one of {CRITERIA}, metric one of {tuple(NEURON_METRICS)} and scope "
                           f"one of {SCOPES}")
    check_expert_ratio(types.SimpleNamespace(model_type=fp["model_type"], num_experts=max(fp["num_experts"]),
                                             num_experts_per_tok=fp["top_k"]), experts, neurons)
    score = "routed" if criterion == "freq" else "weight"
    if scope == "global":
        kept = _global_kept([layer[score] for layer in stats.layers], experts or 0.0, fp["top_k"])
    else:
        kept = [_top(layer[score], kept_count(len(layer[score]), experts or 0.0)) for layer in stats.layers]
    kept_neurons = shared = None
    if neurons:
        name = NEURON_METRICS[metric]

        def width(total: int) -> int:
            return min(total, -(-kept_count(total, neurons) // multiple) * multiple)

        kept_neurons = [[_top(layer[name][e], width(layer[name].shape[1])) for e in keep]
                        for layer, keep in zip(stats.layers, kept)]
        if any(fp["shared_width"]):
            shared = [_top(layer[f"shared_{name}"], width(len(layer[f"shared_{name}"]))) for layer in stats.layers]
    policy = {"experts": experts, "criterion": criterion, "expert_neurons": neurons, "metric": metric,
              "multiple": multiple, "scope": scope}
    return MoEPlan(kept, kept_neurons, shared, dict(fp), policy)


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.contiguous(), requires_grad=like.requires_grad)


def _shrink_experts(moe: MoELayer, keep: list[int], neurons: list[list[int]] | None) -> None:
    experts, router = moe.experts, moe.router
    index = torch.tensor(keep, device=router.weight.device)
    gate_up, down = experts.gate_up_proj.detach()[index], experts.down_proj.detach()[index]
    if neurons is not None:
        width = down.shape[2]
        cols = torch.tensor(neurons, device=down.device)  # (E', I')
        rows = torch.cat([cols, cols + width], dim=1)  # gate rows j, up rows I + j
        gate_up = gate_up.take_along_dim(rows[:, :, None], dim=1)
        down = down.take_along_dim(cols[:, None, :], dim=2)
        experts.intermediate_dim = cols.shape[1]
    experts.gate_up_proj = _param(gate_up, experts.gate_up_proj)
    experts.down_proj = _param(down, experts.down_proj)
    router.weight = _param(router.weight.detach()[index], router.weight)
    experts.num_experts = router.num_experts = len(keep)


def _shrink_shared(shared: nn.Module, keep: list[int]) -> None:
    index = torch.tensor(keep, device=shared.down_proj.weight.device)
    for proj in (shared.gate_proj, shared.up_proj):
        proj.weight = _param(proj.weight.detach()[index], proj.weight)
        proj.out_features = len(keep)
    shared.down_proj.weight = _param(shared.down_proj.weight.detach()[:, index], shared.down_proj.weight)
    shared.down_proj.in_features = shared.intermediate_size = len(keep)


def prune_moe(model, plan: MoEPlan):
    """Apply ``plan`` to ``model`` in place (returned): experts, router rows and neurons removed; the config's
    ``num_experts`` (``num_local_experts``) and expert width follow, so stock ``from_pretrained`` reloads it."""
    check_fingerprint(plan.fingerprint, fingerprint(model), "the expert plan")
    counts = {len(k) for k in plan.experts}
    widths = {len(n) for layer in plan.neurons or [] for n in layer}
    if len(widths) > 1 or (plan.shared and len({len(s) for s in plan.shared}) != 1):
        raise MiniGPTError("an expert plan must keep the same number of neurons in every expert")
    if min(counts) < plan.fingerprint["top_k"]:
        raise MiniGPTError(f"the expert plan keeps {min(counts)} experts in a layer, fewer than the "
                           f"{plan.fingerprint['top_k']} each token is routed to (num_experts_per_tok)")
    layers = moe_layers(model)
    for i, moe in enumerate(layers):
        _shrink_experts(moe, plan.experts[i], plan.neurons[i] if plan.neurons else None)
        if plan.shared and moe.shared is not None:
            _shrink_shared(moe.shared, plan.shared[i])
    config = model.config
    # the attribute map points it at num_local_experts where that is the key; with per-layer counts the largest
    # (save_pruned records the other layers' shapes and counts for modeling_minigpt.py)
    config.num_experts = max(counts)
    if hasattr(model, "num_experts"):  # the causal LM's copy (its load-balancing loss)
        model.num_experts = config.num_experts
    if widths:
        setattr(config, expert_width_key(config), widths.pop())
    if plan.shared:
        config.shared_expert_intermediate_size = len(plan.shared[0])
    return model


def moe_parameter_counts(model) -> dict[str, int]:
    """Unique parameters: total, routed experts, routers, shared experts, and ``active`` (those one token uses:
    everything but the routed experts, plus ``num_experts_per_tok`` experts of every sparse layer)."""
    layers = moe_layers(model)
    experts = sum(m.experts.gate_up_proj.numel() + m.experts.down_proj.numel() for m in layers)
    per_token = sum((m.experts.gate_up_proj.numel() + m.experts.down_proj.numel()) // m.experts.gate_up_proj.shape[0]
                    for m in layers) * model.config.num_experts_per_tok
    shared = sum(p.numel() for m in layers if m.shared is not None for p in m.shared.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "experts": experts, "router": sum(m.router.weight.numel() for m in layers),
            "shared_experts": shared, "active": total - experts + per_token}


def moe_report(stats: MoEStats, plan: MoEPlan) -> dict:
    """Per block: each expert's share of the top-k selections and of the routing weight, the kept experts' share,
    and ``removed_router_mass``, the mean softmax probability of the removed experts per token (what scales the
    kept experts' outputs by ``1 / (1 - m)`` when ``norm_topk_prob`` is off; 0-distortion when it is on)."""
    layers = []
    for index, layer, keep in zip(stats.fingerprint["moe_layers"], stats.layers, plan.experts):
        routed, weight, prob = layer["routed"].double(), layer["weight"], layer["prob"]
        removed = [e for e in range(len(routed)) if e not in set(keep)]
        layers.append({
            "layer": index,
            "routed_share": [round(float(x), 4) for x in routed / max(float(routed.sum()), 1.0)],
            "weight_share": [round(float(x), 4) for x in weight / max(float(weight.sum()), 1e-30)],
            "kept": keep,
            "kept_routed_share": round(float(routed[keep].sum() / max(float(routed.sum()), 1.0)), 4),
            "removed_router_mass": round(float(prob[removed].sum()) / max(stats.tokens, 1), 6),
        })
    return {"tokens": stats.tokens, "norm_topk_prob": stats.fingerprint["norm_topk_prob"],
            "top_k": stats.fingerprint["top_k"], "policy": plan.policy, "layers": layers}
