"""The data pipeline (read, tokenize, pack) side by side with the raw fast tokenizer, in one run, on one core.

    python -m bench.bench_data [--megabytes 8] [--reps 3] [--calibration-tokens 16384]

Two corpora of the same text (standard-library sources, the first files in sorted order up to ``--megabytes``):
many small files, and the same files joined into one large file (read in ~1 MiB pieces). For each, repetitions
interleaved:

* ``raw encode_batch``: SmolLM2's ``tokenizers.Tokenizer.encode_batch`` on the documents already in memory (the
  same documents the pipeline reads: whole files, or the large file's pieces); the limit.
* ``pipeline``: ``minigpt.pipeline.data.Batches`` (seq_len 2048, batch 8) from the files on disk: reading, batched
  tokenization, packing and tensors on its prefetch thread; tokens of delivered batches.

Throughput is tokens per CPU second of the process (all its threads; one core, so CPU seconds are the core's
time), which a machine shared with other jobs does not inflate; tokens per wall-clock second are reported beside.

Then a real calibration of SmolLM2 (``minigpt.calibrate``, CPU) on each corpus reports the share of its time spent
waiting for batches (``meta["data_wait_share"]``). Everything runs pinned to one CPU core with one torch thread
and one tokenizer thread (``RAYON_NUM_THREADS=1``). Writes ``bench/results/data_cpu.{json,md}``.
"""

from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers starts its thread pool
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse
import json
import platform
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.8


def corpus_files(megabytes: float) -> list[Path]:
    """Standard-library sources in sorted order, up to ``megabytes`` in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, size = [], 0
    for path in sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file()):
        files.append(path)
        size += path.stat().st_size
        if size >= megabytes * 2**20:
            return files
    return files


def documents(files: list[Path]) -> list[str]:
    """The documents ``Batches`` reads from ``files``: whole small files, pieces of large ones."""
    from minigpt.pipeline.data import read_pieces, text_pieces

    return [t for f in files for t in read_pieces(f, range(text_pieces(f))) if t]


def timed(fn) -> tuple[int, float, float]:
    """``(fn(), wall seconds, CPU seconds of this process)``: CPU time is what a busy shared machine cannot
    inflate; both count every thread (the pipeline's prefetch thread too) on the one core."""
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = fn()
    return tokens, time.perf_counter() - wall, time.process_time() - cpu


def raw(tokenizer, texts: list[str]) -> int:
    return sum(len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False))


def pipeline(tokenizer, files: list[Path]) -> int:
    from minigpt.pipeline.data import Batches

    return sum(b.numel() for b in Batches(tokenizer, files, seq_len=2048, batch_size=8))


def measure(tokenizer, files: list[Path], reps: int) -> dict:
    texts = documents(files)
    fns = {"raw encode_batch": lambda: raw(tokenizer, texts), "pipeline": lambda: pipeline(tokenizer, files)}
    runs = {name: {"cpu": [], "wall": []} for name in fns}
    for rep in range(reps):
        for name in list(fns) if rep % 2 == 0 else list(reversed(fns)):
            tokens, wall, cpu = timed(fns[name])
            runs[name]["cpu"].append(tokens / cpu)
            runs[name]["wall"].append(tokens / wall)
    out = {name: {"tokens_per_cpu_second": statistics.median(r["cpu"]),
                  "tokens_per_second": statistics.median(r["wall"]),
                  "runs_cpu": [round(x) for x in r["cpu"]], "runs_wall": [round(x) for x in r["wall"]]}
           for name, r in runs.items()}
    out["ratio"] = out["pipeline"]["tokens_per_cpu_second"] / out["raw encode_batch"]["tokens_per_cpu_second"]
    out["ratio_wall"] = out["pipeline"]["tokens_per_second"] / out["raw encode_batch"]["tokens_per_second"]
    out["documents"] = len(texts)
    out["bytes"] = sum(f.stat().st_size for f in files)
    return out


def wait_share(model, tokenizer, files: list[Path], tokens: int) -> dict:
    from minigpt.pipeline.calibration import calibrate

    stats = calibrate(model, tokenizer, [str(f) for f in files], max_tokens=tokens, seq_len=512, batch_size=4,
                      progress=False)
    return {"tokens": stats.tokens, "seconds": stats.meta["seconds"], "data_wait_share": stats.meta["data_wait_share"],
            "backend": stats.meta["backend"]}


def markdown(report: dict) -> str:
    head = "| corpus | documents | MiB | raw encode_batch tok/CPU-s | pipeline tok/CPU-s | pipeline / raw | (wall) |"
    lines = [head + " target |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in report["corpora"].items():
        ok = "✓" if r["ratio"] >= TARGET else "✗"
        lines.append(f"| {name} | {r['documents']:,} | {r['bytes'] / 2**20:.1f} | "
                     f"{r['raw encode_batch']['tokens_per_cpu_second']:,.0f} | "
                     f"{r['pipeline']['tokens_per_cpu_second']:,.0f} | {100 * r['ratio']:.0f}% | "
                     f"{100 * r['ratio_wall']:.0f}% | ≥ {100 * TARGET:.0f}% {ok} |")
    lines += ["", "| calibration (SmolLM2, CPU, one core) | tokens | seconds | share waiting for data |",
              "|---|---:|---:|---:|"]
    for name, c in report["calibration"].items():
        lines.append(f"| {name} | {c['tokens']:,} | {c['seconds']:.1f} | {100 * c['data_wait_share']:.2f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=8.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)

    from minigpt.io import load_model

    model, tokenizer = load_model()
    files = corpus_files(args.megabytes)
    with tempfile.TemporaryDirectory() as tmp:
        large = Path(tmp) / "joined.txt"
        with large.open("w") as out:
            for f in files:
                out.write(f.read_text(errors="replace") + "\n\n")
        corpora = {"many small files": files, "one large file": [large]}
        report = {
            "meta": {"cpu": platform.processor() or platform.machine(), "cores_used": 1, "torch": torch.__version__,
                     "tokenizer": "SmolLM2-135M-Instruct", "megabytes": args.megabytes, "reps": args.reps},
            "corpora": {name: measure(tokenizer, fs, args.reps) for name, fs in corpora.items()},
            "calibration": {name: wait_share(model, tokenizer, fs, args.calibration_tokens)
                            for name, fs in corpora.items()},
        }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_cpu.json").write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    (RESULTS / "data_cpu.md").write_text(f"`python -m bench.bench_data` ({args.megabytes:g} MB, one core)\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
