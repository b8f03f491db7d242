"""CPU statistics: the eager PyTorch reference vs the C++ kernels of ``minigpt._C``, on the same inputs.

* ``pytest bench/bench_cpu_stats.py``: pytest-benchmark, grouped per op (torch vs cpp side by side).
* ``python -m bench.bench_cpu_stats``: medians, spread and speedups as a markdown table, written to
  bench/results/cpu_stats.{json,md,png} with the machine, thread count and versions.

Shape (4096, 1536) fp32: T tokens x N neurons of one calibration batch.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bench.plotting import bar_chart
from minigpt import reference

T, N = 4096, 1536
RESULTS = Path(__file__).parent / "results"


def _cases() -> dict[str, dict[str, Callable[[], object]]]:
    """{op: {backend: zero-argument callable}} on shared (T, N) fp32 inputs."""
    torch.manual_seed(0)
    x, up = torch.randn(T, N), torch.randn(T, N)
    acc, nnz = torch.zeros(3, N), torch.zeros(N, dtype=torch.long)
    cases = {
        "column_stats": {"torch": lambda: reference.column_stats_ref(x, acc, nnz)},
        "act_stats (silu, gated)": {"torch": lambda: reference.act_stats_ref(x, up, "silu", acc, nnz)},
    }
    try:
        import minigpt._C  # noqa: F401  (registers torch.ops.minigpt)
    except ImportError:
        return cases
    cases["column_stats"]["cpp"] = lambda: torch.ops.minigpt.column_stats(x, acc, nnz)
    cases["act_stats (silu, gated)"]["cpp"] = lambda: torch.ops.minigpt.act_stats(x, up, "silu", acc, nnz)
    return cases


CASES = _cases()


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("op", list(CASES))
def test_stats(benchmark, op, backend):
    if backend not in CASES[op]:
        pytest.skip("minigpt._C is not built")
    benchmark.group = f"{op} ({T}x{N} fp32)"
    benchmark(CASES[op][backend])


def _times_ms(fn, warmup: int = 3, repeat: int = 21) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    rows = []
    for op, fns in CASES.items():
        times = {backend: _times_ms(fn) for backend, fn in fns.items()}
        med = {b: statistics.median(t) for b, t in times.items()}
        for backend, t in times.items():
            q1, _, q3 = statistics.quantiles(t, n=4)
            gb_s = T * N * 4 * (2 if "act" in op else 1) / (med[backend] * 1e-3) / 1e9  # input bytes read
            rows.append({"op": op, "backend": backend, "median_ms": med[backend], "q1_ms": q1, "q3_ms": q3,
                         "input_GB_s": gb_s, "speedup_vs_torch": med["torch"] / med[backend]})
    meta = {"shape": [T, N], "dtype": "float32", "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_avg_1min": os.getloadavg()[0]}  # other processes on the machine skew both columns
    title = (f"CPU stats, ({T}, {N}) fp32, {meta['threads']} threads, torch {meta['torch']} ({meta['cpu_capability']}), "
             f"load average {meta['load_avg_1min']:.1f}")
    lines = [title, "", "| op | backend | median ms | IQR ms | input GB/s | speedup vs torch |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['backend']} | {r['median_ms']:.2f} | {r['q1_ms']:.2f}-{r['q3_ms']:.2f} | "
              f"{r['input_GB_s']:.2f} | {r['speedup_vs_torch']:.1f}x |" for r in rows]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_stats.md").write_text(table + "\n")
    (RESULTS / "cpu_stats.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    bar_chart(RESULTS / "cpu_stats.png", title, "ms per call (median, whiskers: quartiles)",
              {op: [(r["backend"], r["median_ms"], r["q1_ms"], r["q3_ms"]) for r in rows if r["op"] == op]
               for op in CASES})


if __name__ == "__main__":
    main()
