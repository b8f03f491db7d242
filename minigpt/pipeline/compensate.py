"""Keep quality without fine-tuning: refit the output projection on the neurons that stay, and OBS selection.

For MLP layer ``l`` with down_proj weight ``W: (D, N)`` and the activations ``h: (N,)`` entering it, the
calibration's Gram statistics give the second moment ``M = G / T`` (``G = Σ h hᵀ`` over ``T`` tokens) and the
mean ``μ = Σh / T``. Removing the neurons ``R`` and keeping ``K``:

* ``bias``:  ``W'_K = W_K`` and ``b = W_R μ_R``, the mean contribution of the removed neurons (FLAP).
* ``lstsq``: ``W'_K = W_K + Δ`` with ``Δ = W_R M_RK (M_KK + λI)⁻¹``, the least-squares fit of the removed
  neurons' contribution from the kept ones (``Δ`` minimises ``E‖W_R h_R − Δ h_K‖² + λ‖Δ‖²``). With a bias,
  ``M`` is the covariance ``G / T − μμᵀ`` and ``b = W_R μ_R − Δ μ_K`` (so the mean is matched exactly); without
  one, ``M`` is the uncentred second moment and the kept neurons carry the mean as well as they can.
  Damping ``λ = damping · mean(diag M_KK)`` (SparseGPT's 1 %); it shrinks ``Δ`` toward the original weights, so
  nothing removed returns ``W`` exactly and ``damping=0`` is the exact least-squares solution.

Where the bias goes: into down_proj's own bias where the architecture has one (OPT, GPT-2, Phi); Llama-family
configs with ``mlp_bias`` get it switched on (stock ``from_pretrained`` then gives gate, up and down a bias, the
first two zero: ``2·N' + D`` parameters a layer); architectures with no place for a bias refit without one.

OBS selection (``obs_keep``): greedy structured Optimal Brain Surgeon on ``H = M + λI``. Removing neuron ``j``
and refitting the rest raises the layer's output error by ``‖W[:, j]‖² / [H⁻¹]_jj``; the cheapest neurons go
``block`` at a time with the exact joint update of ``W`` and ``H⁻¹`` (``block=1`` is the exact greedy order).
"""

from __future__ import annotations

import torch

from minigpt.errors import MiniGPTError
from minigpt.models import adapters
from minigpt.models.architecture import describe, output_projection
from minigpt.pipeline.stats import CalibrationStats

METHODS = ("none", "bias", "lstsq")
DAMPING = 0.01


def moments(stats: CalibrationStats, layer: int, centred: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, μ)`` of layer ``layer`` in float64: ``M: (N, N)`` covariance (``centred``) or second moment."""
    if stats.gram is None or stats.gram_tokens == 0:
        raise MiniGPTError("compensation and OBS selection need Gram statistics (calibrate with Gram on: "
                           "drop --no-gram, or give --gram-tokens > 0)")
    return _moments(stats.gram[layer], stats.gram_sum[layer], stats.gram_tokens, centred)


def head_moments(stats: CalibrationStats, layer: int, centred: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, μ)`` of the input of layer ``layer``'s attention output projection: ``M: (H·d, H·d)`` (float64)."""
    key = f"heads.{layer}.gram"
    if stats.gram_tokens == 0 or key not in stats.sums:
        raise MiniGPTError("attention compensation needs the Gram statistics of o_proj's input (collected with the "
                           "MLP's since Gram statistics of attention exist: calibrate again with Gram on)")
    return _moments(stats.sums[key], stats.sums[f"heads.{layer}.gram_sum"], stats.gram_tokens, centred)


def _moments(gram: torch.Tensor, gram_sum: torch.Tensor, tokens: int, centred: bool):
    mu = gram_sum.double().cpu() / tokens
    m = gram.double().cpu() / tokens
    return (m - torch.outer(mu, mu) if centred else m), mu


def _damped(m: torch.Tensor, damping: float) -> torch.Tensor:
    """``m + λI`` with ``λ = damping · mean(diag m)`` (and at least the float64 tiny, for a zero matrix)."""
    lam = max(damping * float(m.diagonal().mean()) if m.numel() else 0.0, torch.finfo(m.dtype).tiny)
    return m + lam * torch.eye(m.shape[0], dtype=m.dtype)


def refit(w: torch.Tensor, m: torch.Tensor, mu: torch.Tensor | None, kept: torch.Tensor, method: str = "lstsq",
          damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New weights ``(D, |K|)`` for the kept columns of ``w: (D, N)`` and the bias ``(D,)`` to add (or None).

    ``m``: covariance (with ``mu``, a bias is fitted) or second moment (``mu=None``, no bias); see module doc.
    """
    w = w.double()
    removed = torch.ones(w.shape[1], dtype=torch.bool)
    removed[kept] = False
    w_k, w_r = w[:, kept], w[:, removed]
    delta = torch.zeros_like(w_k)
    if method == "lstsq" and w_r.shape[1] and len(kept):
        h = _damped(m[kept][:, kept], damping)
        delta = torch.linalg.solve(h, m[kept][:, removed] @ w_r.T).T  # H symmetric: (H⁻¹ M_KR W_Rᵀ)ᵀ
    elif method not in ("bias", "lstsq"):
        raise MiniGPTError(f"unknown compensation {method!r}; expected one of {', '.join(METHODS)}")
    bias = None if mu is None else w_r @ mu[removed] - delta @ mu[kept]
    return w_k + delta, bias


def obs_keep(w: torch.Tensor, m: torch.Tensor, keep: int, damping: float = DAMPING, block: int = 32) -> torch.Tensor:
    """Sorted indices of the ``keep`` neurons greedy structured OBS keeps (removing ``block`` at a time).

    w: (D, N) down_proj weight; m: (N, N) second moment or covariance. Runs where ``w`` is (a GPU: seconds).
    """
    n = w.shape[1]
    w = w.double().clone()
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(_damped(m.double().to(w.device), damping)))
    alive = torch.ones(n, dtype=torch.bool, device=w.device)
    for _ in range((n - keep + block - 1) // block):
        cost = (w * w).sum(0) / hinv.diagonal()
        cost[~alive] = torch.inf
        drop = torch.topk(cost, min(block, int(alive.sum()) - keep), largest=False).indices
        joint = torch.linalg.inv(hinv[drop][:, drop])
        w -= w[:, drop] @ joint @ hinv[drop]
        hinv -= hinv[:, drop] @ joint @ hinv[drop]
        alive[drop] = False
    return alive.nonzero().squeeze(1).cpu()


def _down(mlp, layout) -> tuple[torch.nn.Module, int]:
    """down_proj (the column projection) and the dimension of its weight indexed by neurons."""
    return getattr(mlp, layout.cols[0]), adapters.neuron_dim(layout, "cols")


def bias_slot(model) -> str:
    """Where a compensation bias goes: ``down`` (the projection has one), ``mlp_bias`` (switched on) or ``none``."""
    layout = adapters.get_layout(model)
    if all(_down(m, layout)[0].bias is not None for m in adapters.mlps(model)):
        return "down"
    return "mlp_bias" if hasattr(model.config, "mlp_bias") else "none"


def add_mlp_biases(model) -> None:
    """Zero biases on every MLP projection that has none (what a config with ``mlp_bias`` makes on loading).

    The config flag is set by ``mark_mlp_bias`` after compaction, which checks the plan against the unchanged one.
    """
    layout = adapters.get_layout(model)
    for mlp in adapters.mlps(model):
        for name in (*layout.rows, *layout.cols):
            proj = getattr(mlp, name)
            if proj.bias is None:
                out = proj.weight.shape[1 if layout.conv1d else 0]
                proj.bias = torch.nn.Parameter(proj.weight.new_zeros(out), requires_grad=proj.weight.requires_grad)


def mark_mlp_bias(model, report: dict) -> None:
    """Record in the config that the MLP projections have biases, when compensation (``report``) added them."""
    if report.get("bias") == "mlp_bias":
        model.config.mlp_bias = True


def compensate_layer(model, stats: CalibrationStats, layer: int, kept: torch.Tensor, method: str,
                     damping: float = DAMPING, stats_layer: int | None = None) -> None:
    """Refit layer ``layer``'s down_proj in place for the kept neurons; removed neurons' columns become zero.

    The layer then computes what the compacted layer will (compaction drops the zero columns).
    ``stats_layer``: the index of this layer in ``stats`` (sequential mode holds one layer's).
    """
    if method == "none":
        return
    layout = adapters.get_layout(model)
    mlp = adapters.mlps(model)[layer]
    proj, dim = _down(mlp, layout)
    slot = bias_slot(model)
    if method == "bias" and slot == "none":
        raise MiniGPTError(f"--compensate bias: {model.config.model_type} has no MLP output bias to hold it "
                           "(use lstsq, which refits without one)")
    m, mu = moments(stats, layer if stats_layer is None else stats_layer, centred=slot != "none")
    if slot == "mlp_bias" and proj.bias is None:
        add_mlp_biases(model)
    _refit_in_place(proj, dim, m, mu if slot != "none" else None, kept, method, damping)


def _refit_in_place(proj, dim: int, m: torch.Tensor, mu: torch.Tensor | None, kept: torch.Tensor, method: str,
                    damping: float) -> None:
    """``refit`` the input columns ``kept`` of ``proj`` (its weight's input dimension ``dim``) in place; the other
    columns become zero and a fitted bias (``mu`` given) is added to ``proj.bias``."""
    w = proj.weight.detach().movedim(dim, 1)  # (D, N)
    new_k, bias = refit(w.cpu(), m, mu, kept, method, damping)
    full = torch.zeros_like(w, dtype=torch.float64, device="cpu")
    full[:, kept] = new_k
    with torch.no_grad():
        proj.weight.copy_(full.to(proj.weight.dtype).movedim(1, dim))
        if bias is not None:
            proj.bias += bias.to(proj.bias.dtype).to(proj.bias.device)


def _o_proj(model, groups) -> tuple[torch.nn.Module, int]:
    """The attention output projection of a layer (``LayerGroups``) and its weight's input (head) dimension."""
    param, dim = output_projection(model, groups.heads)
    return model.get_submodule(param.rpartition(".")[0]), dim


def head_columns(heads: list[int], head_dim: int) -> torch.Tensor:
    """The o_proj input columns of query ``heads``: ``h·d … (h+1)·d − 1`` for each, in order."""
    return (torch.tensor(heads, dtype=torch.long)[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def compensate_heads(model, stats: CalibrationStats, kept_heads: list[list[int]], method: str = "lstsq",
                     damping: float = DAMPING) -> dict:
    """Refit every layer's attention output projection on the kept heads' columns (removed heads' columns become
    zero), from the Gram statistics of its input (``head_moments``), with the same solver as down_proj.

    The bias goes into o_proj's own bias where it has one (OPT, GPT-2, Phi); elsewhere the refit fits the
    uncentred second moment without one (``bias`` then leaves attention as it is). Returns what was done.
    """
    arch = describe(model)
    slot = "o_proj" if all(_o_proj(model, g)[0].bias is not None for g in arch.layers) else "none"
    if method == "none" or (method == "bias" and slot == "none"):
        return {"method": "none", "bias": "none"}
    for layer, (groups, heads) in enumerate(zip(arch.layers, kept_heads)):
        proj, dim = _o_proj(model, groups)
        m, mu = head_moments(stats, layer, centred=slot != "none")
        _refit_in_place(proj, dim, m, mu if slot != "none" else None, head_columns(heads, groups.head_dim),
                        method, damping)
    return {"method": method, "damping": damping if method == "lstsq" else None, "bias": slot}


def head_costs(model, stats: CalibrationStats, layer: int, units: list[list[int]],
               damping: float = DAMPING) -> torch.Tensor:
    """(len(units),) float64: the structured OBS cost of removing each unit (a set of query heads) of layer
    ``layer`` alone and refitting the rest, ``tr(W_S [H⁻¹]_SS⁻¹ W_Sᵀ)`` on o_proj's weight ``W`` and the damped
    second moment ``H`` of its input: the increase of E‖o_proj output error‖² (residual-stream units)."""
    groups = describe(model).layers[layer]
    proj, dim = _o_proj(model, groups)
    w = proj.weight.detach().movedim(dim, 1).double().cpu()
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(_damped(head_moments(stats, layer, False)[0], damping)))
    out = []
    for unit in units:
        cols = head_columns(unit, groups.head_dim)
        w_s = w[:, cols]
        out.append(torch.trace(w_s @ torch.linalg.solve(hinv[cols][:, cols], w_s.T)))
    return torch.stack(out)


def compensate(model, stats: CalibrationStats, kept: list[torch.Tensor], method: str = "lstsq",
               damping: float = DAMPING) -> dict:
    """Refit every layer (``compensate_layer``) for the plan's ``kept`` indices; returns what was done."""
    if method not in METHODS:
        raise MiniGPTError(f"unknown compensation {method!r}; expected one of {', '.join(METHODS)}")
    slot = bias_slot(model) if method != "none" else "none"  # before any bias is added
    for layer, keep in enumerate(kept):
        compensate_layer(model, stats, layer, keep, method, damping)
    return {"method": method, "damping": damping if method == "lstsq" else None, "bias": slot,
            "gram_tokens": stats.gram_tokens if stats is not None else 0}


def neuron_costs(model, stats: CalibrationStats, layer: int, damping: float = DAMPING) -> torch.Tensor:
    """(N,) float64: the structured OBS cost of removing each MLP neuron of layer ``layer`` alone and refitting the
    rest, ``‖W[:, j]‖² / [H⁻¹]_jj`` on down_proj's weight (``obs_keep``'s first step; residual-stream units)."""
    proj, dim = _down(adapters.mlps(model)[layer], adapters.get_layout(model))
    w = proj.weight.detach().movedim(dim, 1).double().cpu()
    m, _ = moments(stats, layer, bias_slot(model) != "none")
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(_damped(m, damping)))
    return (w * w).sum(0) / hinv.diagonal()


def obs_kept(model, stats: CalibrationStats, counts: list[int], damping: float = DAMPING,
             block: int = 32) -> list[list[int]]:
    """OBS's kept indices for every layer, keeping ``counts[l]`` neurons (see ``obs_keep``)."""
    layout = adapters.get_layout(model)
    centred = bias_slot(model) != "none"
    out = []
    for layer, (mlp, keep) in enumerate(zip(adapters.mlps(model), counts)):
        proj, dim = _down(mlp, layout)
        m, _ = moments(stats, layer, centred)
        out.append(obs_keep(proj.weight.detach().movedim(dim, 1), m, keep, damping, block).tolist())
    return out
