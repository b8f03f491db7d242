"""minigpt: contextual pruning of Hugging Face causal LMs, with fused statistics kernels.

    stats = minigpt.calibrate(model, tokenizer, ["corpus.txt"])      # per-neuron sums, streaming
    p = minigpt.plan(stats, "l1", ratio=0.2)                          # kept neurons per layer
    model, p = minigpt.prune(model, tokenizer, pruning_plan=p)        # a genuinely smaller model
    minigpt.evaluate(model, tokenizer, "stdlib-heldout")              # perplexity, parameter counts
"""

from minigpt._checkout import use_checkout_kernels

use_checkout_kernels()  # before anything imports minigpt.kernels

from minigpt.errors import MiniGPTError
from minigpt.io import load_model
from minigpt.pipeline.calibration import calibrate
from minigpt.pipeline.compact import compact, save_pruned
from minigpt.pipeline.evaluation import evaluate
from minigpt.pipeline.planning import PruningPlan, plan
from minigpt.pipeline.policy import Policy
from minigpt.pipeline.prune import prune
from minigpt.pipeline.stats import CalibrationStats

__version__ = "0.1.0"
__all__ = [
    "CalibrationStats",
    "MiniGPTError",
    "Policy",
    "PruningPlan",
    "calibrate",
    "compact",
    "evaluate",
    "load_model",
    "plan",
    "prune",
    "save_pruned",
]
