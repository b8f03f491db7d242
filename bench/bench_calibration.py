"""A whole calibration pass, side by side with the bare forward and with hook-based statistics, in one run.

    python -m bench.bench_calibration [--device cpu|cuda] [--model smollm2|llama-3.2-1b|llama-3.1-8b] [--reps N]

Every method runs the same pre-packed batches (stdlib tokens for the real SmolLM2, random ids for the
random-initialised Llama shapes), repetitions interleaved (the method order rotates each repetition):

* ``bare``: ``model.base_model(input_ids, use_cache=False)`` under inference_mode, no statistics
  (the call calibration makes; the limit).
* ``minigpt <backend>``: ``minigpt.pipeline.calibration.run_batches`` (``auto`` first: cpp on CPU, triton on CUDA).
* ``minigpt <auto backend> + Gram``: the same with the Gram statistics of every down_proj input (one ``addmm``
  per layer per batch into an fp32 ``(N, N)`` accumulator).
* ``hooks (peers)``: a forward pre-hook on each down projection adding ``x.float().abs().sum(0)`` into an
  accumulator on the device.
* ``hooks (Mini-GPTs)``: a forward hook on every ``nn.Linear`` adding ``out.abs().sum(0).cpu()`` on each call.

Peak memory: CUDA ``max_memory_allocated`` after ``reset_peak_memory_stats``, minus the allocation before the run.
CPU: Linux's resident high-water mark, reset by writing 5 to ``/proc/self/clear_refs`` before the run and read from
``VmHWM`` in ``/proc/self/status`` after it, minus ``VmRSS`` before it: the kernel tracks it on every page fault,
so no sampling can miss a short peak. glibc's ``malloc_trim`` first hands freed memory back, so a run that reuses
pages an earlier run left resident still counts them. Writes ``bench/results/calibration_<device>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bench.plotting import bar_chart
from minigpt import ops
from minigpt.models import adapters
from minigpt.pipeline.calibration import run_batches
from minigpt.pipeline.stats import CalibrationStats, fingerprint

RESULTS = Path(__file__).resolve().parent / "results"
LLAMA_SHAPES = {  # random-initialised configs: (hidden, layers, MLP width, heads, kv heads, vocab)
    "llama-3.2-1b": (2048, 16, 8192, 32, 8, 128256),
    "llama-3.1-8b": (4096, 32, 14336, 32, 8, 128256),
}
DEFAULTS = {"cpu": {"model": "smollm2", "batches": 4, "batch_size": 1, "seq_len": 512, "reps": 5},
            "cuda": {"model": "llama-3.2-1b", "batches": 4, "batch_size": 4, "seq_len": 2048, "reps": 5}}


def load(name: str, device: str, args) -> tuple[nn.Module, list[torch.Tensor]]:
    """The model (eval, on ``device``) and its ``args.batches`` input-id batches of ``(batch_size, seq_len)``."""
    if name == "smollm2":
        from minigpt.io import load_model
        from minigpt.pipeline.data import Batches, resolve_files

        model, tokenizer = load_model(device=device)
        batches = list(Batches(tokenizer, resolve_files("stdlib"), seq_len=args.seq_len, batch_size=args.batch_size,
                               max_tokens=args.batches * args.batch_size * args.seq_len))
        return model, batches
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden, layers, width, heads, kv, vocab = LLAMA_SHAPES[name]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=width,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=max(args.seq_len, 2048), tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(0)
    return model, [torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen)
                   for _ in range(args.batches)]


@torch.inference_mode()
def bare(model, batches) -> None:
    for ids in batches:
        ids = ids.to(model.device)
        model.base_model(input_ids=ids, use_cache=False)


@contextlib.contextmanager
def hooked(modules: list[nn.Module], hook: Callable, pre: bool):
    """``hook`` registered (forward or forward-pre) on each module for the duration of the block."""
    register = "register_forward_pre_hook" if pre else "register_forward_hook"
    handles = [getattr(m, register)(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def peer_hooks(model, batches) -> None:
    """Σ|x| of each down projection's input, from a forward pre-hook, into fp32 accumulators on the device."""
    downs = [getattr(m, adapters.get_layout(model).cols[0]) for m in adapters.mlps(model)]
    acc = {d: torch.zeros(n, device=model.device) for d, n in zip(downs, adapters.widths(model))}

    def hook(module, args):
        acc[module] += args[0].float().abs().reshape(-1, args[0].shape[-1]).sum(0)

    with hooked(downs, hook, pre=True):
        bare(model, batches)


def minigpts_hooks(model, batches) -> None:
    """``out.abs().sum(0)`` of every ``nn.Linear``, moved to the CPU on each call and added there."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    acc: dict[nn.Module, torch.Tensor] = {}

    def hook(module, args, out):
        s = out.abs().sum(0).cpu()
        acc[module] = acc[module] + s if module in acc else s

    with hooked(linears, hook, pre=False):
        bare(model, batches)


def fused(backend: str, gram: bool = False) -> Callable:
    def run(model, batches) -> None:
        stats = CalibrationStats.empty(fingerprint(model), device=model.device, gram=gram)
        run_batches(model, batches, stats, backend=backend, progress=False)

    return run


_LIBC = ctypes.CDLL(None)  # the process's libc (glibc on Linux, where /proc is read below)


def _proc_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(fn: Callable, model, batches) -> tuple[float, float, int]:
    """Wall seconds, process CPU seconds and peak memory above the start (bytes) of one ``fn(model, batches)``."""
    gc.collect()
    if model.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _LIBC.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        base = _proc_kb("VmRSS") * 1024
    start, cpu = time.perf_counter(), time.process_time()
    fn(model, batches)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _proc_kb("VmHWM") * 1024
    return time.perf_counter() - start, time.process_time() - cpu, peak - base


def methods(device: str) -> dict[str, Callable]:
    backends = ops.available_backends(device)
    return {"bare": bare, **{f"minigpt {b}" + (" (auto)" if i == 0 else ""): fused(b) for i, b in enumerate(backends)},
            f"minigpt {backends[0]} + Gram": fused(backends[0], gram=True),
            "hooks (peers)": peer_hooks, "hooks (Mini-GPTs)": minigpts_hooks}


def _spread(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", choices=("smollm2", *LLAMA_SHAPES))
    for key in ("batches", "batch_size", "seq_len", "reps"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads (on a shared machine 1 avoids OpenMP stalls)")
    p.add_argument("--methods", nargs="+", help="only these methods, named as in the table (bare always runs), "
                   "e.g. 'minigpt cpp (auto)' 'minigpt cpp + Gram'")
    p.add_argument("--out", type=Path, help="result path without suffix (default bench/results/calibration_DEVICE)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_calibration: CUDA is not available here; run with --device cpu (nothing measured)")
        return
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, batches = load(args.model, args.device, args)
    tokens = sum(b.numel() for b in batches)
    fns = methods(args.device)
    unknown = set(args.methods or ()) - set(fns)
    if unknown:
        raise SystemExit(f"bench_calibration: unknown methods {sorted(unknown)}; choose from {list(fns)}")
    fns = {k: f for k, f in fns.items() if k == "bare" or not args.methods or k in args.methods}
    for fn in fns.values():  # warm-up: lazy initialisation, allocator, kernel compilation
        fn(model, batches[:1])
    names = list(fns)
    runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in names}
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            runs[name].append(measure(fns[name], model, batches))
            print(f"rep {rep} {name}: {runs[name][-1][0]:.2f} s", file=sys.stderr)

    bare_wall, bare_cpu, bare_mem = (statistics.median(r[k] for r in runs["bare"]) for k in range(3))
    rows = []
    for name, rs in runs.items():
        wall, cpu, mem = ([r[k] for r in rs] for k in range(3))
        rows.append({"method": name, "seconds": _spread(wall), "cpu_seconds": _spread(cpu),
                     "tokens_per_s": _spread([tokens / s for s in wall]),
                     "time_vs_bare": statistics.median(wall) / bare_wall,
                     "cpu_time_vs_bare": statistics.median(cpu) / bare_cpu,
                     "peak_mem_MiB": _spread([m / 2**20 for m in mem]),
                     "peak_mem_vs_bare": statistics.median(mem) / bare_mem if bare_mem > 0 else None})
    dtype = str(model.dtype).removeprefix("torch.")
    on_cuda = args.device == "cuda"
    meta = {"device": args.device, "torch": torch.__version__, "backends": ops.available_backends(args.device),
            "device_name": torch.cuda.get_device_name() if on_cuda
            else f"{platform.processor() or platform.machine()} ({torch.backends.cpu.get_cpu_capability()})",
            "threads": torch.get_num_threads(), "model": args.model, "dtype": dtype, "batches": len(batches),
            "batch_size": args.batch_size, "seq_len": args.seq_len, "tokens": tokens, "reps": args.reps,
            "memory": "CUDA max_memory_allocated - allocated before" if on_cuda
            else "VmHWM (reset via /proc/self/clear_refs) - VmRSS before, after malloc_trim"}
    title = (f"Calibration pass, {args.model} {dtype} on {meta['device_name']}, {meta['threads']} threads, torch "
             f"{torch.__version__}: {len(batches)} batches x {args.batch_size} x {args.seq_len} = {tokens} tokens, "
             f"median of {args.reps} interleaved repetitions [min-max]. CPU s = process CPU time.")
    header = "| method | tokens/s | wall s | wall vs bare | CPU s | CPU vs bare | peak memory MiB | memory vs bare |"
    lines = [title, "", header, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, w, c, m = r["tokens_per_s"], r["seconds"], r["cpu_seconds"], r["peak_mem_MiB"]
        mem_ratio = "n/a" if r["peak_mem_vs_bare"] is None else f"{r['peak_mem_vs_bare']:.3f}x"
        lines.append(f"| {r['method']} | {t['median']:.0f} [{t['min']:.0f}-{t['max']:.0f}] | {w['median']:.2f} "
                     f"[{w['min']:.2f}-{w['max']:.2f}] | {r['time_vs_bare']:.3f}x | {c['median']:.2f} "
                     f"[{c['min']:.2f}-{c['max']:.2f}] | {r['cpu_time_vs_bare']:.3f}x | {m['median']:.1f} "
                     f"[{m['min']:.1f}-{m['max']:.1f}] | {mem_ratio} |")
    table = "\n".join(lines)
    print(table)
    out = args.out or RESULTS / f"calibration_{args.device}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    bar_chart(out.with_suffix(".png"), f"Calibration, {args.model} {dtype}, {meta['device_name']}",
              "median over interleaved repetitions (whiskers: min-max)", {
                  "tokens/s (wall)": [(r["method"], *(r["tokens_per_s"][k] for k in ("median", "min", "max")))
                                      for r in rows],
                  "process CPU seconds": [(r["method"], *(r["cpu_seconds"][k] for k in ("median", "min", "max")))
                                          for r in rows]})


if __name__ == "__main__":
    main()
