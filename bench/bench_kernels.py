"""GPU micro-benchmarks of the minigpt Triton and CUDA kernels against PyTorch, all on the same inputs in one run.

    python -m bench.bench_kernels

Every op runs through its registered ``torch.ops`` op for each GPU backend that loaded (``triton``, ``cuda``).

(a) act_stats: fused kernels vs eager PyTorch (``silu(g) * u`` then Σ|h|, Σh², max|h|, nnz) vs plain ``silu(g) * u``,
    the floor for any implementation that must read gate and up and write h.
(b) gather (compaction): our grouped gather vs ``torch.index_select`` per matrix, as GB/s of bytes read + written and
    as % of the device's copy bandwidth (``dst.copy_(src)`` of a 1 GiB buffer; every row reports this %).
(c) token_histogram vs ``torch.bincount`` on 128k and 256k vocabularies (masked: bincount needs ``ids[mask]`` first).

Times are ``triton.testing.do_bench`` quantiles (median, 20%, 80%) in ms. Writes ``bench/results/kernels_cuda.json``
(with device name, torch/triton/CUDA versions) and a markdown table next to it. Without CUDA: prints a note, exits 0.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.plotting import bar_chart
from minigpt import ops
from minigpt.ops import reference

RESULTS = Path(__file__).resolve().parent / "results"
ACT_SHAPES = [(8192, 1536), (8192, 8192), (65536, 14336)]  # (tokens, MLP width): SmolLM2-135M, 2B-ish, 64k x 8B
GATHER_MODELS = {  # name: (layers, hidden, intermediate, kept neurons)
    "smollm2-135m": (30, 576, 1536, 1024),
    "8b-like, 4 layers": (4, 4096, 14336, 9000),
}
HIST_TOKENS, HIST_VOCABS = 64 * 4096, (131_072, 262_144)
COPY_BYTES = 1 << 30
QUANTILES = [0.5, 0.2, 0.8]


def timed(fn: Callable[[], object]) -> dict[str, float]:
    """``fn``'s median, 20% and 80% quantile times in ms."""
    from triton.testing import do_bench

    ms, lo, hi = do_bench(fn, quantiles=QUANTILES)
    return {"ms": ms, "ms_p20": lo, "ms_p80": hi}


def row(bench: str, case: str, impl: str, times: dict[str, float], nbytes: int, **extra) -> dict:
    return {
        "bench": bench,
        "case": case,
        "impl": impl,
        **times,
        "bytes": nbytes,
        "GB/s": nbytes / times["ms"] / 1e6,
        **extra,
    }


def gpu_backends() -> list[str]:
    """The GPU backends that loaded here, e.g. ``["cuda", "triton"]``."""
    return [b for b in ops.available_backends("cuda") if b != "torch"]


def bench_act_stats(device: str, t: int, n: int) -> list[dict]:
    """Fused act_stats vs eager PyTorch vs plain ``silu(g) * u`` on bf16 ``(t, n)`` inputs."""
    gen = torch.Generator(device).manual_seed(0)
    g, u = (torch.randn(t, n, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    acc, nnz = torch.zeros(3, n, device=device), torch.zeros(n, dtype=torch.int64, device=device)

    def eager():
        h = F.silu(g) * u
        hf = h.float()
        a = hf.abs()
        acc[0] += a.sum(0)
        acc[1] += hf.square().sum(0)
        torch.maximum(acc[2], a.amax(0), out=acc[2])
        nnz.add_((g.float() >= lowest).logical_and_(g != 0).logical_and_(u != 0).sum(0))
        return h

    lowest = reference.active_min("silu")
    nbytes = 3 * g.numel() * g.element_size()  # read gate and up, write h (the O(N) stats traffic is left out)
    impls = {f"{b} fused": functools.partial(ops.act_stats, g, u, "silu", acc, nnz, backend=b) for b in gpu_backends()}
    impls.update({"torch eager": eager, "silu(g)*u only (floor)": lambda: F.silu(g) * u})
    return [row("act_stats", f"T={t} N={n} bf16 silu", impl, timed(fn), nbytes) for impl, fn in impls.items()]


def copy_bandwidth(device: str) -> dict:
    """The device's ``dst.copy_(src)`` bandwidth (bytes read + written) on a COPY_BYTES buffer."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return row("copy", f"{COPY_BYTES >> 20} MiB", "dst.copy_(src)", timed(lambda: dst.copy_(src)), 2 * COPY_BYTES)


def bench_gather(device: str, name: str, layers: int, hidden: int, inter: int, kept: int) -> list[dict]:
    """One MLP compaction step (gate/up rows, down columns of every layer): ours vs index_select per matrix."""
    gen = torch.Generator(device).manual_seed(0)
    srcs, indices, dims = [], [], []
    for _ in range(layers):
        keep = torch.randperm(inter, device=device, generator=gen)[:kept].sort().values
        for shape, dim in [((inter, hidden), 0), ((inter, hidden), 0), ((hidden, inter), 1)]:
            srcs.append(torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen))
            indices.append(keep)
            dims.append(dim)
    impls = {f"{b} gather": functools.partial(ops.gather, srcs, indices, dims, backend=b) for b in gpu_backends()}
    for fn in impls.values():
        assert all(torch.equal(o, s.index_select(d, i)) for o, s, i, d in zip(fn(), srcs, indices, dims))
    nbytes = 2 * sum(s.shape[1 - d] * i.numel() * s.element_size() for s, i, d in zip(srcs, indices, dims))
    impls["torch.index_select loop"] = lambda: [s.index_select(d, i) for s, i, d in zip(srcs, indices, dims)]
    case = f"{name}: {len(srcs)} bf16 matrices, keep {kept}/{inter}"
    return [row("gather", case, impl, timed(fn), nbytes) for impl, fn in impls.items()]


def bench_histogram(device: str, dist: str, vocab: int) -> list[dict]:
    """Token counts over a ``vocab`` vocabulary, ``uniform`` or ``zipf`` ids (hot tokens contend on atomics)."""
    gen = torch.Generator(device).manual_seed(0)
    if dist == "zipf":
        weights = 1.0 / torch.arange(1, vocab + 1, device=device, dtype=torch.float32)
        ids = torch.multinomial(weights, HIST_TOKENS, replacement=True, generator=gen)
    else:
        ids = torch.randint(0, vocab, (HIST_TOKENS,), device=device, generator=gen)
    mask = torch.rand(HIST_TOKENS, device=device, generator=gen) < 0.9
    for b in gpu_backends():
        counts = torch.zeros(vocab, dtype=torch.int64, device=device)  # checked, then the timing target
        ops.token_histogram(ids, mask, counts, backend=b)
        assert torch.equal(counts, torch.bincount(ids[mask], minlength=vocab)), b
    id_bytes, mask_bytes = ids.numel() * ids.element_size(), mask.numel() * mask.element_size()
    impls = {}
    for b in gpu_backends():
        impls[f"{b}, masked"] = (functools.partial(ops.token_histogram, ids, mask, counts, backend=b),
                                 id_bytes + mask_bytes)
        impls[f"{b}, no mask"] = (functools.partial(ops.token_histogram, ids, None, counts, backend=b), id_bytes)
    impls["torch.bincount(ids[mask])"] = (lambda: torch.bincount(ids[mask], minlength=vocab), id_bytes + mask_bytes)
    impls["torch.bincount(ids)"] = (lambda: torch.bincount(ids, minlength=vocab), id_bytes)
    rows = []
    for impl, (fn, nbytes) in impls.items():
        r = row("token_histogram", f"{HIST_TOKENS} int64 ids ({dist}), V={vocab}", impl, timed(fn), nbytes)
        rows.append({**r, "Gtok/s": HIST_TOKENS / r["ms"] / 1e6})
    return rows


def run_all(device: str) -> list[dict]:
    """Every benchmark on ``device``; each row also gets its bandwidth as % of the measured copy bandwidth."""
    rows = [copy_bandwidth(device)]
    for t, n in ACT_SHAPES:
        rows += bench_act_stats(device, t, n)
    for name, sizes in GATHER_MODELS.items():
        rows += bench_gather(device, name, *sizes)
    for vocab in HIST_VOCABS:
        for dist in ("uniform", "zipf"):
            rows += bench_histogram(device, dist, vocab)
    for r in rows:
        r["% of copy"] = 100 * r["GB/s"] / rows[0]["GB/s"]
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    cols = ["bench", "case", "impl", "ms", "ms_p20", "ms_p80", "GB/s", "% of copy", "Gtok/s"]
    lines = [
        f"# Kernel benchmarks on {meta['device']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; times: do_bench median, 20%, 80% (ms).",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in rows:
        cells = [f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for kernels_cuda.json / .md / .png")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: needs CUDA, skipped")
        return 0
    import triton

    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "backends": gpu_backends(),
    }
    rows = run_all("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "kernels_cuda"  # the device name is in the files
    stem.with_suffix(".json").write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    table = markdown(meta, rows)
    stem.with_suffix(".md").write_text(table)
    panels: dict[str, list] = {}
    for r in rows:  # GB/s at the median time; whiskers at the 80% and 20% quantile times
        scale = r["GB/s"] * r["ms"]
        panels.setdefault(f"{r['bench']}: {r['case']}", []).append(
            (r["impl"], r["GB/s"], scale / r["ms_p80"], scale / r["ms_p20"]))
    bar_chart(stem.with_suffix(".png"), f"Kernels on {meta['device']}", "GB/s (bytes read + written)", panels)
    print(table)
    print(f"wrote {stem}.json, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
