"""Research tooling on top of the pipeline: benchmarks (``bench``, ``vllm_bench``), recovery fine-tuning,
multiple-choice evaluation (``mcq``, ``harness``), method sweeps (``experiment``), GGUF export.
Their command lines live in ``minigpt.cli``.
"""
