"""Statistics of heads, hidden channels and layers, taken by forward hooks during the MLP calibration pass.

Sums only (so merging, resuming and torchrun add them like the MLP sums), in ``CalibrationStats.sums``:

* ``heads.{l}.sum`` / ``heads.{l}.sum_sq``: (H_l,) Σ‖o_h‖ and Σ‖o_h‖² over tokens of query head h's slice of
  the input to layer l's output projection (a column-statistics call on the per-token head norms ``(T, H_l)``);
* ``hidden.sum_abs`` / ``hidden.sum_sq``: (D,) Σ|x_c| and Σx_c² of the normalised input of every attention and
  MLP (the input of its first colwise projection), summed over layers (Minitron's channel importance);
* ``layers.influence``: (L,) Σ over tokens of 1 − cos(residual before block l, residual after it): divided by
  the tokens seen, ShortGPT's Block Influence;
* ``layers.residual_sq``: (L,) Σ over tokens of ‖residual entering block l‖²: the scale the global head ranking
  and the ``target_params`` rule measure a layer's output error against;
* ``heads.{l}.gram`` / ``heads.{l}.gram_sum``: (H_l·d, H_l·d) Σ o oᵀ and (H_l·d,) Σ o of the whole input ``o``
  of layer l's output projection, over the batches the MLP Gram statistics take (``gram_tokens``), only when
  those are collected: what the attention refit (``minigpt.pipeline.compensate.compensate_heads``) and the head OBS
  costs read.
"""

from __future__ import annotations

import contextlib

import torch

from minigpt import ops
from minigpt.models.architecture import describe, output_projection


class _Sums:
    """fp32 per-batch scratch per statistic (``(3, N)`` for column statistics), folded into fp64 ``stats.sums``."""

    def __init__(self, stats, backend: str):
        self.stats, self.backend, self.scratch = stats, backend, {}
        self.collect_gram = False  # set per batch by the caller (whole batches go into the Gram sums)

    def gram(self, name: str, x: torch.Tensor) -> None:
        """Add ``Σ x xᵀ`` and ``Σ x`` of ``x: (T, N)`` into ``{name}.gram`` / ``{name}.gram_sum`` (fp32 scratch)."""
        if not self.collect_gram:
            return
        x = x.float()
        g = self.scratch.get(f"{name}.gram") or self.scratch.setdefault(f"{name}.gram", (
            torch.zeros(x.shape[1], x.shape[1], device=x.device), None))
        g[0].addmm_(x.T, x)
        self.add(f"{name}.gram_sum", slice(None), x.shape[1], x.sum(0))

    def columns(self, name: str, x: torch.Tensor) -> None:
        """Column statistics of ``x: (T, N)`` into the scratch of ``name``."""
        acc, nnz = self.scratch.get(name) or self.scratch.setdefault(name, (
            torch.zeros(3, x.shape[1], dtype=torch.float32, device=x.device),
            torch.zeros(x.shape[1], dtype=torch.int64, device=x.device)))
        ops.column_stats(x.contiguous(), acc, nnz, backend=self.backend)

    def add(self, name: str, index: int, size: int, value: torch.Tensor) -> None:
        acc = self.scratch.get(name) or self.scratch.setdefault(name, (torch.zeros(size, device=value.device), None))
        acc[0][index] += value

    def fold(self) -> None:
        sums = self.stats.sums
        for name, (acc, nnz) in self.scratch.items():
            if nnz is None:
                sums[name] = sums.get(name, torch.zeros(acc.shape, dtype=torch.float64)).to(acc.device) + acc
            else:
                key = name.rpartition(".")[0]
                suffix = ("sum", "sum_sq") if name.startswith("heads.") else ("sum_abs", "sum_sq")
                for row, what in enumerate(suffix):
                    full = f"{key}.{what}"
                    sums[full] = sums.get(full, torch.zeros(acc.shape[1], dtype=torch.float64)).to(acc.device) + acc[row]
            acc.zero_()


def _hidden_states(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def collect(model, stats, backend: str):
    """Hooks adding head, hidden-channel and layer statistics of every forward into ``stats.sums``; yields the
    ``_Sums`` whose ``fold`` to call after each batch (``collect_gram``: whether this batch adds to the Gram sums;
    never set when ``stats`` holds no Gram statistics)."""
    arch = describe(model)
    sums = _Sums(stats, backend)
    handles = []
    blocks = model.get_submodule(arch.blocks)
    n_layers = len(blocks)
    for layer, (groups, block) in enumerate(zip(arch.layers, blocks)):
        if groups.heads is not None:
            o_param = output_projection(model, groups.heads)[0]
            o_proj = model.get_submodule(o_param.rpartition(".")[0])
            heads, d = groups.heads.size, groups.head_dim

            def head_norms(module, args, name=f"heads.{layer}.x", heads=heads, d=d):
                x = args[0].detach().reshape(-1, heads * d)
                sums.columns(name, x.reshape(-1, heads, d).float().norm(dim=-1))
                sums.gram(name.rpartition(".")[0], x)

            handles.append(o_proj.register_forward_pre_hook(head_norms))
        if arch.hidden is not None:
            for group in (groups.heads, groups.mlp):
                first = next(s.param for s in group.slices if s.dim != _in_dim(model, s.param))  # q / gate rows
                module = model.get_submodule(first.rpartition(".")[0])

                def channels(module, args):
                    x = args[0].detach()
                    sums.columns("hidden.x", x.reshape(-1, x.shape[-1]))

                handles.append(module.register_forward_pre_hook(channels))

        def influence(module, args, kwargs, output, layer=layer):
            before = _hidden_states(args, kwargs).detach().float()
            after = (output[0] if isinstance(output, tuple) else output).detach().float()
            cos = torch.nn.functional.cosine_similarity(before, after, dim=-1)
            sums.add("layers.influence", layer, n_layers, (1 - cos).sum())
            sums.add("layers.residual_sq", layer, n_layers, before.pow(2).sum())

        handles.append(block.register_forward_hook(influence, with_kwargs=True))
    try:
        yield sums
    finally:
        for handle in handles:
            handle.remove()


def _in_dim(model, param: str) -> int:
    """The input-feature dimension of the weight ``param`` (0 for ``Conv1D``, 1 for ``nn.Linear``)."""
    owner = model.get_submodule(param.rpartition(".")[0])
    return 0 if type(owner).__name__ == "Conv1D" else 1
