"""Benchmark models side by side: parameters, weight bytes, peak memory, prefill latency, decode tokens/s, generate.

Every model runs in the same process on the same token ids (seeded, ids < 256 so every vocabulary has them),
one model loaded at a time, with warm-up calls and repetitions; timings are medians with quartiles.

Model specs: a saved directory or ``.gguf`` file, ``default`` (SmolLM2-135M), or a named shape
(``tiny-llama``, ``llama-3.2-1b``, ``llama-3.1-8b``: random-initialised in code, no download), each optionally
suffixed ``@RATIO[/MULTIPLE]``: remove that fraction of every layer's MLP neurons (uniform), kept widths rounded
up to MULTIPLE. The neurons removed are those with the smallest weight magnitude (L2 norm of all weights
touching the neuron); speed and memory depend only on the widths, not on which neurons go. ``@params=KEEP``
instead keeps that fraction of the parameters by ``prune --target-params``'s rule (``minigpt.pipeline.policy``: MLP
neurons and query heads), ranked by statistics of two seeded random-token sequences of 256 (``budget_prune``).

Memory: on CUDA ``torch.cuda.max_memory_allocated`` over the call (``peak_bytes``, weights included) and its
increase over the allocation before the call (``increase_bytes``). On CPU the process's resident set size,
sampled every millisecond by a thread (psutil) during the call after ``malloc_trim``: ``increase_bytes`` is the
peak minus the RSS before, ``peak_bytes`` the whole process's peak RSS; a spike shorter than a millisecond can
be missed, and memory the allocator already held is not counted as an increase.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import platform
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minigpt.errors import MiniGPTError
from minigpt.models import adapters
from minigpt.pipeline import moe
from minigpt.pipeline.evaluation import parameter_counts, weight_bytes
from minigpt.pipeline.importance import magnitude_scores

_LLAMA3 = {"num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 131072, "rope_theta": 500000.0, "bos_token_id": 128000, "eos_token_id": 128001}
NAMED_CONFIGS = {
    "tiny-llama": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "max_position_embeddings": 2048},
    "llama-3.2-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64,
                         tie_word_embeddings=True),
    "llama-3.1-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         tie_word_embeddings=False),
}
_SUFFIX = re.compile(r"^(?P<budget>params=)?(?P<ratio>\d*\.?\d+)(?:/(?P<multiple>\d+))?$")
TOKEN_RANGE = 256


@dataclass(frozen=True)
class ModelSpec:
    """A model to benchmark: ``base`` (path, ``default`` or a named shape), pruned by ``ratio`` (MLP) or to
    ``target_params`` (the parameter budget) if given."""

    text: str
    base: str
    ratio: float | None = None
    multiple: int | None = None  # None: not given (1, or each ablation multiple)
    target_params: float | None = None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``BASE[@RATIO[/MULTIPLE]]`` or ``BASE@params=KEEP[/MULTIPLE]``; one-line error for an unknown base or a
        bad suffix."""
        base, at, suffix = text.rpartition("@")
        if not at or Path(text).exists():
            base, suffix = text, None
        if base not in NAMED_CONFIGS and base != "default" and not Path(base).exists():
            raise MiniGPTError(f"model {text!r}: not a path, 'default' or one of {', '.join(NAMED_CONFIGS)}")
        if suffix is None:
            return cls(text, base)
        match = _SUFFIX.match(suffix)
        ratio = float(match["ratio"]) if match else -1.0
        multiple = int(match["multiple"]) if match and match["multiple"] else None
        budget = bool(match and match["budget"])
        if not ((0.0 < ratio if budget else 0.0 <= ratio) and ratio < 1.0 and (multiple is None or multiple >= 1)):
            raise MiniGPTError(f"model {text!r}: pruning suffix must be @RATIO[/MULTIPLE] (0 <= RATIO < 1) or "
                               f"@params=KEEP[/MULTIPLE] (0 < KEEP < 1), MULTIPLE >= 1")
        if budget:
            return cls(text, base, multiple=multiple, target_params=ratio)
        return cls(text, base, ratio, multiple)


def expand_ablation(specs: list[ModelSpec], multiples: list[int]) -> list[ModelSpec]:
    """Replace each pruned spec without an explicit multiple by one spec per multiple (same ratio)."""
    out = []
    for s in specs:
        if s.ratio is None or s.multiple is not None:
            out.append(s)
        else:
            out += [ModelSpec(f"{s.base}@{s.ratio:g}/{m}", s.base, s.ratio, m) for m in multiples]
    return out


def load(spec: ModelSpec, device: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """The model of ``spec`` on ``device`` in ``dtype``, pruned when the spec says so."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from minigpt.io import load_model
    from minigpt.pipeline.planning import MLPPolicy, plan_from_scores
    from minigpt.pipeline.prune import prune

    if spec.base in NAMED_CONFIGS:
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**NAMED_CONFIGS[spec.base]), dtype=dtype)
    else:
        model, _ = load_model(None if spec.base == "default" else spec.base, dtype=dtype, device=device,
                              trust_remote_code=trust_remote_code)
    if spec.ratio and moe.is_moe(model):
        raise MiniGPTError(f"model {spec.text!r}: @RATIO prunes dense MLPs; prune experts with minigpt prune "
                           "--experts/--expert-neurons and bench the saved directory")
    if spec.ratio:
        multiple = spec.multiple or 1
        record = {"scores": "weight_l2", "ratio": spec.ratio, "scope": "uniform", "multiple": multiple}
        plan = plan_from_scores(magnitude_scores(model), MLPPolicy(mlp=spec.ratio, multiple=multiple), record=record)
        model, _ = prune(model, pruning_plan=plan)
    if spec.target_params:
        model = budget_prune(model, spec.target_params, spec.multiple or 1)
    return model.eval()


def budget_prune(model, keep: float, multiple: int = 1):
    """``model`` pruned to ``keep`` of its parameters by the ``target_params`` rule, ranked by the statistics of two
    seeded random-token sequences of 256 (which neurons and heads go does not change speed or memory)."""
    from minigpt.pipeline.calibration import run_batches
    from minigpt.pipeline.policy import Policy
    from minigpt.pipeline.prune import prune
    from minigpt.pipeline.stats import CalibrationStats, fingerprint

    ids = torch.randint(TOKEN_RANGE, (2, 256), generator=torch.Generator().manual_seed(0))
    stats = run_batches(model, [ids], CalibrationStats.empty(fingerprint(model)), progress=False)
    return prune(model, stats=stats, policy=Policy(target_params=keep, multiple=multiple))[0]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _timings(fn, setup, *, device: str, warmup: int, repeats: int) -> list[float]:
    """Seconds of ``fn(setup())`` per repetition, after ``warmup`` untimed calls; ``setup`` is not timed."""
    for _ in range(warmup):
        fn(setup())
    samples = []
    for _ in range(repeats):
        state = setup()
        _sync(device)
        start = time.perf_counter()
        fn(state)
        _sync(device)
        samples.append(time.perf_counter() - start)
    return samples


def summary(seconds: list[float]) -> dict:
    """Median, quartiles, min and max in milliseconds, plus the raw samples."""
    ms = torch.tensor(seconds, dtype=torch.float64) * 1e3
    q1, med, q3 = ms.quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return {"median_ms": med, "q1_ms": q1, "q3_ms": q3, "min_ms": ms.min().item(), "max_ms": ms.max().item(),
            "samples_ms": ms.tolist()}


@contextlib.contextmanager
def _rss_sampler(interval: float = 1e-3):
    """Yield a dict whose ``peak`` is the highest RSS seen (sampled by a thread) while the block runs."""
    import psutil

    proc, stop = psutil.Process(), threading.Event()
    seen = {"before": proc.memory_info().rss}
    seen["peak"] = seen["before"]

    def sample():
        while not stop.is_set():
            seen["peak"] = max(seen["peak"], proc.memory_info().rss)
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()
        seen["peak"] = max(seen["peak"], proc.memory_info().rss)


def peak_memory(fn, device: str) -> dict:
    """Peak and increase of memory during ``fn()`` (see the module docstring for what each device measures)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_bytes": peak, "increase_bytes": peak - before, "method": "cuda max_memory_allocated"}
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back so reused pages count as an increase
    with _rss_sampler() as seen:
        fn()
    return {"peak_bytes": seen["peak"], "increase_bytes": seen["peak"] - seen["before"],
            "method": "process RSS sampled every 1 ms (psutil)"}


@torch.inference_mode()
def measure(model, ids: torch.Tensor, *, device: str, prompt_lengths: list[int], decode_tokens: int,
            batch_sizes: list[int], repeats: int, warmup: int) -> dict:
    """Every measurement of one model; ``ids`` (max batch, max prompt length) are the shared inputs."""
    from transformers import GenerationConfig

    ids = ids.to(device)
    timing = {"device": device, "warmup": warmup, "repeats": repeats}
    context = prompt_lengths[0]

    def prefill(x):
        out = model(input_ids=x, use_cache=True, logits_to_keep=1)
        return out.past_key_values, out.logits[:, -1:].argmax(-1)

    def decode(state):
        cache, token = state
        for _ in range(decode_tokens):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)

    greedy = GenerationConfig(do_sample=False, min_new_tokens=decode_tokens, max_new_tokens=decode_tokens,
                              pad_token_id=0, eos_token_id=None)

    def generate(x):
        return model.generate(x, attention_mask=torch.ones_like(x), generation_config=greedy)

    result = {"params": parameter_counts(model), "weight_bytes": weight_bytes(model), **_mlp_shape(model),
              "prefill": {}, "decode": {}}
    for length in prompt_lengths:
        result["prefill"][str(length)] = summary(_timings(prefill, lambda n=length: ids[:1, :n], **timing))
    for batch in batch_sizes:
        stats = summary(_timings(decode, lambda b=batch: prefill(ids[:b, :context]), **timing))
        tokens = batch * decode_tokens
        stats.update(tokens_per_s=tokens / stats["median_ms"] * 1e3, tokens_per_s_q1=tokens / stats["q3_ms"] * 1e3,
                     tokens_per_s_q3=tokens / stats["q1_ms"] * 1e3, ms_per_step=stats["median_ms"] / decode_tokens)
        result["decode"][str(batch)] = stats
    result["generate"] = summary(_timings(generate, lambda: ids[:1, :context], **timing))
    big, longest = max(batch_sizes), max(prompt_lengths)
    result["memory"] = {
        "prefill": {"batch": big, "prompt": longest, **peak_memory(lambda: prefill(ids[:big, :longest]), device)},
        "generate": {"batch": big, "prompt": context, "new_tokens": decode_tokens,
                     **peak_memory(lambda: generate(ids[:big, :context]), device)},
    }
    return result


def _mlp_shape(model) -> dict:
    """``mlp_widths`` per layer; for a mixture of experts the experts' width and ``experts`` (count) per sparse
    layer, and ``params["active"]``, the parameters one token goes through (``moe.moe_parameter_counts``)."""
    if not moe.is_moe(model):
        return {"mlp_widths": adapters.widths(model)}
    layers = moe.moe_layers(model)
    return {"mlp_widths": [m.experts.down_proj.shape[2] for m in layers],
            "experts": [m.experts.down_proj.shape[0] for m in layers]}


def relative(base: dict, other: dict) -> dict:
    """Savings (%) and speedups (×) of ``other`` against ``base``."""
    def saving(a, b):
        return 100.0 * (1.0 - b / a) if a else 0.0

    return {
        "params_saving_pct": saving(base["params"]["total"], other["params"]["total"]),
        "weight_bytes_saving_pct": saving(base["weight_bytes"], other["weight_bytes"]),
        "prefill_speedup": {k: v["median_ms"] / other["prefill"][k]["median_ms"] for k, v in base["prefill"].items()},
        "decode_speedup": {k: other["decode"][k]["tokens_per_s"] / v["tokens_per_s"]
                           for k, v in base["decode"].items()},
        "generate_speedup": base["generate"]["median_ms"] / other["generate"]["median_ms"],
        "memory_saving_pct": {phase: {key: saving(v[key], other["memory"][phase][key])
                                      for key in ("peak_bytes", "increase_bytes")}
                              for phase, v in base["memory"].items()},
    }


def benchmark(models: list[str | ModelSpec], *, device: str = "cpu", dtype: torch.dtype | None = None,
              prompt_lengths: list[int] = (128, 512), decode_tokens: int = 32, batch_sizes: list[int] = (1, 8),
              repeats: int = 5, warmup: int = 1, ablation_multiples: list[int] | None = None,
              trust_remote_code: bool = False, engines: tuple[str, ...] = ("transformers",)) -> dict:
    """Measure every model (specs or ``ModelSpec``) on the same inputs; the first is the reference.

    Returns ``{"meta": ..., "models": [{"spec", ...measure..., "relative"}]}``. ``ablation_multiples`` expands
    each ``BASE@RATIO`` spec into one ``BASE@RATIO/M`` per multiple M. Every model directory passes
    ``minigpt.models.trust``'s rule before the first is measured. ``engines`` with ``vllm`` adds each model's
    vLLM figures under ``"vllm"`` (``minigpt.tools.vllm_bench``; a model pruned here is saved to a temporary directory).
    """
    from minigpt.models.trust import needs_remote_code

    specs = [m if isinstance(m, ModelSpec) else ModelSpec.parse(m) for m in models]
    if ablation_multiples:
        specs = expand_ablation(specs, list(ablation_multiples))
    if not specs:
        raise MiniGPTError("no model to benchmark")
    for spec in specs:
        if Path(spec.base).is_dir():
            needs_remote_code(spec.base, trust_remote_code)
    if min(*prompt_lengths, *batch_sizes, decode_tokens, repeats) < 1 or warmup < 0:
        raise MiniGPTError("prompt lengths, batch sizes, decode tokens and repeats must be ≥ 1, warm-up ≥ 0")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    prompt_lengths, batch_sizes = list(prompt_lengths), list(batch_sizes)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TOKEN_RANGE, (max(batch_sizes), max(prompt_lengths)), generator=gen)
    settings = {"prompt_lengths": prompt_lengths, "decode_tokens": decode_tokens, "batch_sizes": batch_sizes,
                "repeats": repeats, "warmup": warmup}
    results = []
    for spec in specs:
        model = load(spec, device, dtype, trust_remote_code)
        results.append({"spec": spec.text, **measure(model, ids, device=device, **settings)})
        if "vllm" in engines:
            results[-1]["vllm"] = _vllm(spec, model, ids, dtype, settings)
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    for r in results:
        r["relative"] = relative(results[0], r)
    return {"meta": _meta(device, dtype, settings), "models": results}


def _vllm(spec: ModelSpec, model, ids: torch.Tensor, dtype: torch.dtype, settings: dict) -> dict:
    """vLLM figures of one model: its directory as given, or a temporary save of what was built or pruned here."""
    import tempfile

    from minigpt.io import default_model_path
    from minigpt.pipeline.compact import save_pruned
    from minigpt.tools import vllm_bench

    if spec.ratio is None and spec.target_params is None and spec.base not in NAMED_CONFIGS:
        path = default_model_path() if spec.base == "default" else Path(spec.base)
        return vllm_bench.measure(path, ids, dtype=dtype, summary=summary, **settings)
    with tempfile.TemporaryDirectory() as tmp:
        saved = save_pruned(model, None, Path(tmp) / "model")
        return vllm_bench.measure(saved, ids, dtype=dtype, summary=summary, **settings)


def _meta(device: str, dtype: torch.dtype, settings: dict) -> dict:
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else None
    return {"device": device, "gpu": gpu, "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu_threads": torch.get_num_threads(),
            "machine": platform.platform(), "processor": platform.processor() or platform.machine(),
            "inputs": f"random token ids in [0, {TOKEN_RANGE}), seed 0", **settings}


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def _ms(s: dict) -> str:
    return f"{s['median_ms']:.1f} ({s['q1_ms']:.1f}–{s['q3_ms']:.1f})"


def format_table(report: dict) -> str:
    """Markdown: absolute figures (median (q1–q3)), then each model against the first."""
    meta, models = report["meta"], report["models"]
    lengths, batches = meta["prompt_lengths"], meta["batch_sizes"]
    mem = "peak" if meta["device"].startswith("cuda") else "increase"
    active = any("active" in m["params"] for m in models)  # a mixture of experts: parameters per token
    head = (["model", "params", *(["active params"] if active else []), "MLP params", "weights MiB"]
            + [f"prefill {n} ms" for n in lengths]
            + [f"decode b{b} tok/s" for b in batches]
            + [f"generate {meta['decode_tokens']} ms", f"prefill {mem} MiB", f"generate {mem} MiB"])
    rows = []
    for m in models:
        decode = [f"{d['tokens_per_s']:.1f} ({d['tokens_per_s_q1']:.1f}–{d['tokens_per_s_q3']:.1f})"
                  for d in (m["decode"][str(b)] for b in batches)]
        shown = [f"{m['params'].get('active', m['params']['total']):,}"] if active else []
        rows.append([_label(m), f"{m['params']['total']:,}", *shown, f"{m['params']['mlp']:,}", _mib(m["weight_bytes"])]
                    + [_ms(m["prefill"][str(n)]) for n in lengths] + decode + [_ms(m["generate"])]
                    + [_mib(m["memory"][p][f"{mem}_bytes"]) for p in ("prefill", "generate")])
    rel_head = (["model", "params", "weights"] + [f"prefill {n}" for n in lengths] + [f"decode b{b}" for b in batches]
                + ["generate", f"prefill {mem} mem", f"generate {mem} mem"])
    rel_rows = []
    for m in models:
        r = m["relative"]
        rel_rows.append([_label(m), f"{0.0 - r['params_saving_pct']:+.1f}%", f"{0.0 - r['weight_bytes_saving_pct']:+.1f}%"]
                        + [f"×{r['prefill_speedup'][str(n)]:.2f}" for n in lengths]
                        + [f"×{r['decode_speedup'][str(b)]:.2f}" for b in batches] + [f"×{r['generate_speedup']:.2f}"]
                        + [f"{0.0 - r['memory_saving_pct'][p][f'{mem}_bytes']:+.1f}%" for p in ("prefill", "generate")])
    title = (f"{meta['device']} {meta['gpu'] or meta['processor']}, {meta['dtype']}, {meta['cpu_threads']} threads, "
             f"torch {meta['torch']}, {meta['repeats']} repeats after {meta['warmup']} warm-up; "
             f"decode and generate: {meta['decode_tokens']} tokens after a {lengths[0]}-token prompt")
    from minigpt.tools.vllm_bench import table as vllm_table

    parts = [title, _markdown(head, rows), f"Against {models[0]['spec']} (speedup ×, change %):",
             _markdown(rel_head, rel_rows), vllm_table(models, meta)]
    return "\n\n".join(p for p in parts if p)


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def _label(model: dict) -> str:
    """A model's name in tables and plots: its spec, with a saved directory's path shortened to its name."""
    base, at, pruning = model["spec"].partition("@")
    return Path(base).name + at + pruning


def plot(report: dict, path: str | Path) -> None:
    """A PNG: weight memory, prefill latency by prompt length, decode tokens/s by batch, peak memory by phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, models = report["meta"], report["models"]
    names = [_label(m) for m in models]
    mem = "peak" if meta["device"].startswith("cuda") else "increase"
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    ax[0, 0].bar(names, [m["weight_bytes"] / 2**20 for m in models], color=[f"C{i}" for i in range(len(models))])
    ax[0, 0].set(title="weight memory", ylabel="MiB")
    for i, m in enumerate(models):
        lengths = meta["prompt_lengths"]
        p = [m["prefill"][str(n)] for n in lengths]
        err = [[s["median_ms"] - s["q1_ms"] for s in p], [s["q3_ms"] - s["median_ms"] for s in p]]
        ax[0, 1].errorbar(lengths, [s["median_ms"] for s in p], yerr=err, marker="o", capsize=3, label=_label(m))
    ax[0, 1].set(title="prefill latency, batch 1 (median, IQR)", xlabel="prompt tokens", ylabel="ms")
    ax[0, 1].legend(fontsize=8)
    _grouped(ax[1, 0], models, [f"b{b}" for b in meta["batch_sizes"]],
             lambda m: [m["decode"][str(b)]["tokens_per_s"] for b in meta["batch_sizes"]])
    ax[1, 0].set(title=f"decode throughput ({meta['decode_tokens']} tokens, KV cache)", ylabel="tokens/s")
    _grouped(ax[1, 1], models, ["prefill", "generate"],
             lambda m: [m["memory"][p][f"{mem}_bytes"] / 2**20 for p in ("prefill", "generate")])
    ax[1, 1].set(title=f"{mem} memory ({report['models'][0]['memory']['prefill']['method']})", ylabel="MiB")
    for a in ax.flat:
        a.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{meta['device']} {meta['gpu'] or meta['processor']}, {meta['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _grouped(ax, models: list[dict], groups: list[str], values) -> None:
    """Bars of ``values(model)`` (one per group), models side by side within each group."""
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        ax.bar([g + i * width for g in range(len(groups))], values(m), width, label=_label(m))
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
    ax.legend(fontsize=8)
