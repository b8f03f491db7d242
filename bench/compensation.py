"""Quality without fine-tuning on a real model: selection × compensation × sequential at two amounts.

One calibration (with Gram statistics) serves every non-sequential row; each row prunes a copy of the model
and is scored on two held-out corpora. Writes ``<out>.json`` and ``<out>.md``.

    python -m bench.compensation --out bench/results/compensation_smollm2
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from minigpt.io import load_model
from minigpt.pipeline.calibration import calibrate
from minigpt.pipeline.evaluation import evaluate
from minigpt.pipeline.planning import MLPPolicy
from minigpt.pipeline.prune import prune
from minigpt.pipeline.sequential import prune_sequential
from minigpt.pipeline.stats import CalibrationStats

ROWS = {  # label: (select, compensate, sequential)
    "l1": ("metric", "none", False),
    "l1+bias": ("metric", "bias", False),
    "l1+lstsq": ("metric", "lstsq", False),
    "obs+lstsq": ("obs", "lstsq", False),
    "sequential l1+lstsq": ("metric", "lstsq", True),
    "sequential obs+lstsq": ("obs", "lstsq", True),
}


def _scores(model, tokenizer, args) -> dict:
    out = {}
    for corpus in args.eval_data:
        r = evaluate(model, tokenizer, corpus, seq_len=512, max_tokens=args.eval_tokens, doc_tokens=args.doc_tokens)
        out[corpus] = {"perplexity": r["perplexity"], "bits_per_byte": r["bits_per_byte"], "tokens": r["tokens"]}
    out["params"] = r["params"]["total"]
    return out


def _write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))


def run(args) -> dict:
    """Every row, the result files rewritten after each (an interrupted run keeps its finished rows)."""
    model, tokenizer = load_model(args.model)
    calib = {"max_tokens": args.calib_tokens, "seq_len": 512, "batch_size": 8, "doc_tokens": args.doc_tokens,
             "progress": False}
    if args.stats and Path(args.stats).exists():
        stats = CalibrationStats.load(args.stats)
    else:
        stats = calibrate(model, tokenizer, "stdlib", gram=True, **calib)
        if args.stats:
            stats.save(args.stats)
    result = {"model": args.model or "SmolLM2-135M-Instruct", "calibration": {**calib, "data": "stdlib",
              "seconds": stats.meta["seconds"], "gram_bytes": stats.gram_bytes, "tokens": stats.tokens},
              "eval": {"data": args.eval_data, "tokens": args.eval_tokens, "doc_tokens": args.doc_tokens},
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU",
              "torch": torch.__version__, "base": _scores(model, tokenizer, args), "rows": []}
    for ratio in args.ratios:
        for label in args.rows:
            select, method, sequential = ROWS[label]
            pruned = copy.deepcopy(model)
            start = time.perf_counter()
            if sequential:
                pruned, plan = prune_sequential(pruned, tokenizer, "stdlib", policy=MLPPolicy(mlp=ratio), select=select,
                                                compensate=method, damping=args.damping,
                                                **{k: v for k, v in calib.items() if k != "progress"})
            else:
                pruned, plan = prune(pruned, tokenizer, stats=stats, ratio=ratio, select=select, compensate=method,
                                     damping=args.damping)
            seconds = time.perf_counter() - start
            row = {"ratio": ratio, "method": label, "damping": args.damping if method == "lstsq" else None, "seconds": round(seconds, 1), "kept_widths": plan.kept_widths,
                   "seconds_note": "own calibration passes included" if sequential else "calibration shared, excluded",
                   **_scores(pruned, tokenizer, args)}
            for corpus in args.eval_data:
                row[corpus]["x_base"] = row[corpus]["perplexity"] / result["base"][corpus]["perplexity"]
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            _write(result, Path(args.out))
            del pruned
    return result


def markdown(result: dict) -> str:
    corpora = result["eval"]["data"]
    head = " | ".join(f"{c} ppl (× base)" for c in corpora)
    lines = [(f"Model {result['model']}; calibration {result['calibration']['max_tokens']:,} stdlib tokens "
             f"({result['calibration']['seconds']} s with Gram, {result['calibration']['gram_bytes'] / 2**20:.0f} MiB "
             f"of fp64 Gram); held-out: first {result['eval']['tokens']:,} tokens, ≤ {result['eval']['doc_tokens']} "
             f"per document; {result['machine']}."), "",
             f"| MLP removed | method | {head} | parameters | time (s) |",
             "|---:|---|" + "---:|" * len(corpora) + "---:|---:|",
             "| 0 % | base | " + " | ".join(f"{result['base'][c]['perplexity']:.3f}" for c in corpora)
             + f" | {result['base']['params']:,} | |"]
    for r in result["rows"]:
        cells = " | ".join(f"{r[c]['perplexity']:.3f} (×{r[c]['x_base']:.3f})" for c in corpora)
        lines.append(f"| {100 * r['ratio']:.0f} % | {r['method']} | {cells} | {r['params']:,} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model")
    p.add_argument("--out", required=True, help="path without suffix: writes OUT.json and OUT.md")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--stats", help="statistics file: loaded when it exists (its calibration settings must match), "
                   "else written after calibrating")
    p.add_argument("--damping", type=float, default=0.01)
    p.add_argument("--doc-tokens", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--eval-data", nargs="+", default=["stdlib-heldout", "pydocs-heldout"])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    args = p.parse_args()
    print(markdown(run(args)))


if __name__ == "__main__":
    main()
