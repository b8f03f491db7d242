"""CPU statistics kernels side by side with what they replace, on the same inputs, interleaved in one run.

    python -m bench.bench_cpu_stats [--reps N] [--threads 2,1] [--isa avx2]

For every activation and dtype (fp32, bf16), on a (4096, 1536) calibration batch (T tokens x N neurons of
SmolLM2-135M):

* ``eager act(gate)*up``: the model's own activation, ``F.silu(gate) * up`` etc. (no statistics): the floor;
* ``cpp act_stats``: the fused C++ op (the same product plus Σ|h|, Σh², max|h| and the active count);
* ``torch reference``: ``minigpt.ops.reference`` (the op's definition, in plain PyTorch; fp32 SiLU only, it is slow).

plus exact GELU in bf16 with gates spread over every finite bf16 value: the C++ op looks a 16-bit gate's activation
up in a 65,536-entry table, and those gates reach all of it instead of the small part that randn's do;

and ``column_stats`` against one eager ``x.abs().sum(0)``, at each thread count of ``--threads`` (default: torch's
default, then 1: on a shared machine a single thread is not left waiting for a descheduled OpenMP worker, so its
ratios are the cleaner measure of the kernels). Repetitions rotate the order of the implementations;
each repetition's ratio to the floor is kept, and the table gives medians with quartiles. The machine may be shared:
its load average is recorded, and the spread says how noisy the run was. At one thread the calling thread's CPU time
(``time.thread_time``) is the whole call's cost whatever the scheduler does, so those rows also give its ratio. glibc returns freed 25 MB buffers to the
OS and the next call pays the page faults; the script re-executes itself with ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` raised so that every implementation allocates alike. Writes
bench/results/cpu_stats.{json,md,png} with the machine, thread count and versions.

``--isa avx2`` measures what a CPU without AVX-512 would run: our kernels with ``MINIGPT_CPU_ISA=avx2`` and eager
with ``ATEN_CPU_CAPABILITY=avx2`` (both read at start-up, so set for the re-executed process), written to
bench/results/cpu_stats_avx2.{json,md,png}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.plotting import bar_chart
from minigpt import ops
from minigpt.ops import reference

T, N = 4096, 1536
RESULTS = Path(__file__).parent / "results"
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 31)}
EAGER = {"silu": F.silu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh"), "gelu": F.gelu,
         "relu": F.relu, "identity": lambda x: x}


def cases() -> dict[str, dict[str, Callable[[], object]]]:
    """{case: {implementation: zero-argument callable}}, the first implementation being the floor."""
    g = torch.Generator().manual_seed(0)
    base_gate, base_up = torch.randn(T, N, generator=g), torch.randn(T, N, generator=g)
    acc, nnz = torch.zeros(3, N), torch.zeros(N, dtype=torch.long)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        gate, up = base_gate.to(dtype), base_up.to(dtype)
        name = str(dtype).removeprefix("torch.")
        for act in reference.ACTIVATIONS:
            impls = {"eager act(gate)*up": functools.partial(lambda f, a, b: f(a) * b, EAGER[act], gate, up),
                     "cpp act_stats": functools.partial(ops.act_stats, gate, up, act, acc, nnz, backend="cpp")}
            if act == "silu" and dtype == torch.float32:
                impls["torch reference"] = functools.partial(ops.act_stats, gate, up, act, acc, nnz, backend="torch")
            out[f"act_stats {act} {name}"] = impls
        if dtype == torch.bfloat16:
            # a 16-bit gate's activation is looked up in a 65,536-entry table; randn touches a small part of it,
            # gates spread over every finite bf16 value the whole 256 KiB (the lookup's worst case)
            bits = torch.randint(-2**15, 2**15, (T, N), generator=g, dtype=torch.int16).view(dtype)
            spread = torch.where(bits.isfinite(), bits, torch.zeros((), dtype=dtype))
            out["act_stats gelu bfloat16, gates over all bf16 values"] = {
                "eager act(gate)*up": functools.partial(lambda a, b: F.gelu(a) * b, spread, up),
                "cpp act_stats": functools.partial(ops.act_stats, spread, up, "gelu", acc, nnz, backend="cpp")}
        out[f"column_stats {name}"] = {
            "eager x.abs().sum(0)": functools.partial(lambda x: x.abs().sum(0), gate),
            "cpp column_stats": functools.partial(ops.column_stats, gate, acc, nnz, backend="cpp"),
        }
    return out


def timed_ms(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, calling thread's CPU) milliseconds of one call."""
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    return (time.perf_counter() - wall) * 1e3, (time.thread_time() - cpu) * 1e3


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of xs."""
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def run(reps: int, threads: int) -> list[dict]:
    """Interleaved repetitions of every case on ``threads`` threads; one row per (case, implementation)."""
    torch.set_num_threads(threads)
    rows = []
    for case, impls in cases().items():
        names = list(impls)
        for fn in impls.values():  # warm-up
            fn()
        times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
        for rep in range(reps):
            for name in names[rep % len(names):] + names[: rep % len(names)]:
                times[name].append(timed_ms(impls[name]))
        floor = times[names[0]]
        for name, ts in times.items():
            q1, med, q3 = quartiles([t for t, _ in ts])
            r1, ratio, r3 = quartiles([t / f for (t, _), (f, _) in zip(ts, floor)])
            c1, cpu_ratio, c3 = quartiles([c / f for (_, c), (_, f) in zip(ts, floor)])
            rows.append({"threads": threads, "case": case, "impl": name, "median_ms": med, "q1_ms": q1, "q3_ms": q3,
                         "vs_floor": ratio, "vs_floor_q1": r1, "vs_floor_q3": r3,
                         "cpu_ms": statistics.median(c for _, c in ts), "cpu_vs_floor": cpu_ratio,
                         "cpu_vs_floor_q1": c1, "cpu_vs_floor_q3": c3})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", default=",".join(map(str, dict.fromkeys([torch.get_num_threads(), 1]))),
                   help="comma-separated thread counts (default: torch's default, then 1)")
    p.add_argument("--isa", choices=("avx2",), help="run both sides with this instruction set only (see above)")
    args = p.parse_args(argv)
    thread_counts = [int(t) for t in args.threads.split(",")]
    env = {**ALLOCATOR, **({"MINIGPT_CPU_ISA": args.isa, "ATEN_CPU_CAPABILITY": args.isa} if args.isa else {})}
    if any(os.environ.get(k) != v for k, v in env.items()):  # glibc and ATen read them at start-up only
        os.execve(sys.executable, [sys.executable, "-m", "bench.bench_cpu_stats", *(argv or sys.argv[1:])],
                  {**os.environ, **env})
    if "cpp" not in ops.available_backends("cpu"):
        sys.exit("bench_cpu_stats: the C++ extension minigpt._C is not built; nothing to compare")
    load = os.getloadavg()[0]
    rows = [row for threads in thread_counts for row in run(args.reps, threads)]
    meta = {"shape": [T, N], "threads": thread_counts, "torch": torch.__version__, "reps": args.reps,
            "cpu": platform.processor() or platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_avg_1min_before": load, "load_avg_1min_after": os.getloadavg()[0], "allocator": ALLOCATOR,
            "minigpt_cpu_isa": args.isa or "default (the widest this CPU runs)"}
    isa_note = f", our kernels {args.isa}" if args.isa else ""
    title = (f"CPU statistics vs what they replace, ({T}, {N}), {args.threads} threads, torch {meta['torch']} "
             f"({meta['cpu_capability']}{isa_note}), {args.reps} interleaved repetitions, load average {load:.1f} before / "
             f"{meta['load_avg_1min_after']:.1f} after (a shared machine: see the quartiles)")
    header = ("| threads | case | implementation | median ms | quartiles ms | × the eager floor (median, quartiles) "
              "| 1 thread: CPU ms, × the floor in CPU time (median, quartiles) |")
    lines = [title, "", header, "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['threads']} | {r['case']} | {r['impl']} | {r['median_ms']:.2f} | "
              f"{r['q1_ms']:.2f}-{r['q3_ms']:.2f} | {r['vs_floor']:.2f}× "
              f"({r['vs_floor_q1']:.2f}-{r['vs_floor_q3']:.2f}) | " + (
                  f"{r['cpu_ms']:.2f}, {r['cpu_vs_floor']:.2f}× ({r['cpu_vs_floor_q1']:.2f}-{r['cpu_vs_floor_q3']:.2f})"
                  if r["threads"] == 1 else "") + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("cpu_stats" + (f"_{args.isa}" if args.isa else ""))
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    ours = [r for r in rows if r["impl"].startswith("cpp")]
    key = {threads: "cpu_vs_floor" if threads == 1 else "vs_floor" for threads in thread_counts}
    bar_chart(out.with_suffix(".png"), title[:90],
              "× eager act(gate)*up or x.abs().sum(0) (median, whiskers: quartiles)",
              {f"C++ kernels, {threads} thread(s), {'CPU' if threads == 1 else 'wall'} time": [
                  ("eager floor", 1.0, 1.0, 1.0)] + [
                  (r["case"], r[key[threads]], r[key[threads] + "_q1"], r[key[threads] + "_q3"])
                  for r in ours if r["threads"] == threads] for threads in thread_counts})


if __name__ == "__main__":
    main()
