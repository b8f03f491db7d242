"""Loader for pruned shapes a stock config cannot express (per-layer widths or head counts, GPT-2 / OPT heads).

Self-contained (imports only ``torch`` and ``transformers``): ``save_pruned`` copies this file into the output
directory with ``BASE_CLASS`` set to the original class, and ``config.auto_map`` points ``AutoModelForCausalLM``
at ``MiniGPTForCausalLM``. The class builds the stock model, then gives every parameter named in
``config.minigpt_shapes`` its saved shape and every module in ``config.minigpt_attrs`` its saved attributes
(head counts) before the weights load.
"""

import torch
import transformers
from torch import nn

BASE_CLASS = "LlamaForCausalLM"


def sync_shapes(model: nn.Module) -> None:
    """Make module attributes describing shapes (``in_features``, ``nf``, ``normalized_shape``...) match weights."""
    for module in model.modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = w.shape
        elif isinstance(module, nn.Embedding):
            module.num_embeddings, module.embedding_dim = w.shape
        elif isinstance(module, nn.LayerNorm):
            module.normalized_shape = tuple(w.shape)
        elif type(module).__name__ == "Conv1D":
            module.nx, module.nf = w.shape


def reshape(model: nn.Module, shapes: dict, attrs: dict) -> None:
    """Give parameters their saved shapes (uninitialised) and modules their saved attributes."""
    for name, shape in shapes.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        old = getattr(owner, attr)
        new = torch.empty(shape, dtype=old.dtype, device=old.device)
        setattr(owner, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    for path, values in attrs.items():
        module = model.get_submodule(path)
        for attr, value in values.items():
            setattr(module, attr, value)
    sync_shapes(model)


class MiniGPTForCausalLM(getattr(transformers, BASE_CLASS)):
    """The original architecture with the saved per-layer shapes."""

    def __init__(self, config):
        super().__init__(config)
        reshape(self, config.minigpt_shapes, config.minigpt_attrs)
        self.post_init()
