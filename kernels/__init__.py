"""Triton kernels of the minigpt ops (shipped as ``minigpt.kernels``), same signatures as ``minigpt.reference``."""

from .act_stats import act_stats, column_stats
from .gather import gather
from .histogram import token_histogram

__all__ = ["act_stats", "column_stats", "gather", "token_histogram"]
