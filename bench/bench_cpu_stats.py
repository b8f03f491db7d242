"""CPU statistics kernels side by side with what they replace, on the same inputs, interleaved in one run.

    python -m bench.bench_cpu_stats [--reps N]

For every activation and dtype (fp32, bf16), on a (4096, 1536) calibration batch (T tokens x N neurons of
SmolLM2-135M):

* ``eager act(gate)*up``: the model's own activation, ``F.silu(gate) * up`` etc. (no statistics): the floor;
* ``cpp act_stats``: the fused C++ op (the same product plus Σ|h|, Σh², max|h| and the active count);
* ``torch reference``: ``minigpt.reference`` (the op's definition, in plain PyTorch; fp32 SiLU only, it is slow).

and ``column_stats`` against one eager ``x.abs().sum(0)``. Repetitions rotate the order of the implementations;
each repetition's ratio to the floor is kept, and the table gives medians with quartiles. The machine may be shared:
its load average is recorded, and the spread says how noisy the run was. glibc returns freed 25 MB buffers to the
OS and the next call pays the page faults; the script re-executes itself with ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` raised so that every implementation allocates alike. Writes
bench/results/cpu_stats.{json,md,png} with the machine, thread count and versions.
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
from minigpt import ops, reference

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
        out[f"column_stats {name}"] = {
            "eager x.abs().sum(0)": functools.partial(lambda x: x.abs().sum(0), gate),
            "cpp column_stats": functools.partial(ops.column_stats, gate, acc, nnz, backend="cpp"),
        }
    return out


def timed_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def run(reps: int) -> list[dict]:
    """Interleaved repetitions of every case; one row per (case, implementation)."""
    rows = []
    for case, impls in cases().items():
        names = list(impls)
        for fn in impls.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {n: [] for n in names}
        for rep in range(reps):
            for name in names[rep % len(names):] + names[: rep % len(names)]:
                times[name].append(timed_ms(impls[name]))
        floor = times[names[0]]
        for name, ts in times.items():
            ratios = [t / f for t, f in zip(ts, floor)]
            q = statistics.quantiles(ts, n=4)
            rq = statistics.quantiles(ratios, n=4)
            rows.append({"case": case, "impl": name, "median_ms": statistics.median(ts), "q1_ms": q[0], "q3_ms": q[2],
                         "vs_floor": statistics.median(ratios), "vs_floor_q1": rq[0], "vs_floor_q3": rq[2]})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args(argv)
    if any(os.environ.get(k) != v for k, v in ALLOCATOR.items()):  # glibc reads them at start-up only
        os.execve(sys.executable, [sys.executable, "-m", "bench.bench_cpu_stats", *(argv or sys.argv[1:])],
                  {**os.environ, **ALLOCATOR})
    if "cpp" not in ops.available_backends("cpu"):
        sys.exit("bench_cpu_stats: the C++ extension minigpt._C is not built; nothing to compare")
    load = os.getloadavg()[0]
    rows = run(args.reps)
    meta = {"shape": [T, N], "threads": torch.get_num_threads(), "torch": torch.__version__, "reps": args.reps,
            "cpu": platform.processor() or platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_avg_1min_before": load, "load_avg_1min_after": os.getloadavg()[0], "allocator": ALLOCATOR}
    title = (f"CPU statistics vs what they replace, ({T}, {N}), {meta['threads']} threads, torch {meta['torch']} "
             f"({meta['cpu_capability']}), {args.reps} interleaved repetitions, load average {load:.1f} before / "
             f"{meta['load_avg_1min_after']:.1f} after (a shared machine: see the quartiles)")
    lines = [title, "", "| case | implementation | median ms | quartiles ms | × the eager floor (median, quartiles) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['impl']} | {r['median_ms']:.2f} | {r['q1_ms']:.2f}-{r['q3_ms']:.2f} | "
              f"{r['vs_floor']:.2f}× ({r['vs_floor_q1']:.2f}-{r['vs_floor_q3']:.2f}) |" for r in rows]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_stats.md").write_text(table + "\n")
    (RESULTS / "cpu_stats.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    bar_chart(RESULTS / "cpu_stats.png", title[:90], "ms per call (median, whiskers: quartiles)",
              {case: [(r["impl"], r["median_ms"], r["q1_ms"], r["q3_ms"]) for r in rows if r["case"] == case]
               for case in dict.fromkeys(r["case"] for r in rows)})


if __name__ == "__main__":
    main()
