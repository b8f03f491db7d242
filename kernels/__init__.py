"""Triton kernels of the minigpt ops (shipped as ``minigpt.kernels``), same signatures as ``minigpt.ops.reference``.

From the repository root this folder is also importable as a top-level ``kernels``, the name of the Hugging Face
hub package that ``transformers`` probes for (``import kernels``) when it is imported. Under that name nothing is
loaded: importing Triton there, before a test sets ``TRITON_INTERPRET=1``, would leave Triton's own library
functions compiled for a GPU and break the CPU interpreter.
"""

if __name__ == "minigpt.kernels":
    from .act_stats import act_stats, column_stats
    from .gather import gather
    from .histogram import token_histogram

    __all__ = ["act_stats", "column_stats", "gather", "token_histogram"]
