"""Loader for MLP widths that differ per layer, saved beside pruned weights for ``trust_remote_code``.

Self-contained (imports only ``torch`` and ``transformers``): ``save_pruned`` copies this file into the output
directory with ``BASE_CLASS`` set to the original class, and ``config.auto_map`` points ``AutoModelForCausalLM``
at ``MiniGPTForCausalLM``. The class builds the stock model, then resizes each layer's MLP projections to the
widths in ``config.minigpt_mlp_widths`` before the weights load.
"""

import transformers
from torch import nn

BASE_CLASS = "LlamaForCausalLM"


def resize_mlps(model: nn.Module, layout: dict, widths: list) -> None:
    """Replace each layer's row / column projections with ones of width ``widths[l]`` (uninitialised)."""
    blocks = model.get_submodule(layout["blocks"])
    for block, width in zip(blocks, widths):
        mlp = block.get_submodule(layout["mlp"]) if layout["mlp"] else block
        for side in ("rows", "cols"):
            for name in layout[side]:
                old = getattr(mlp, name)
                w = old.weight
                if layout["conv1d"]:
                    nx, nf = (w.shape[0], width) if side == "rows" else (width, w.shape[1])
                    new = type(old)(nf, nx)
                else:
                    fan_in, fan_out = (w.shape[1], width) if side == "rows" else (width, w.shape[0])
                    new = nn.Linear(fan_in, fan_out, bias=old.bias is not None)
                setattr(mlp, name, new.to(device=w.device, dtype=w.dtype))


class MiniGPTForCausalLM(getattr(transformers, BASE_CLASS)):
    """The original architecture with per-layer MLP widths."""

    def __init__(self, config):
        super().__init__(config)
        resize_mlps(self, config.minigpt_layout, config.minigpt_mlp_widths)
        self.post_init()

