"""SmolLM2 at −25 % parameters, pruned by structure: MLP only, heads + MLP, hidden + MLP, depth (Block Influence vs
random layers) and the ``--target-params`` allocation; held-out perplexity on stdlib and pydocs.

    python -m bench.structures_smollm2 --cal-tokens 16384 --eval-tokens 8192 --eval-doc-tokens 256

One calibration (stdlib, every statistic in one pass) serves every plan. For each mixed plan the fixed amount of
the other structure is set and the MLP ratio is the smallest on a 1/100 grid whose model keeps ≤ 75 % of the
parameters (counted exactly on a meta-device copy); depth removes the fewest layers reaching the budget.
Writes ``bench/results/structures_smollm2_cpu.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

import minigpt
from minigpt import importance
from minigpt.policy import Policy, params_after

RESULTS = Path(__file__).with_name("results")


def smallest_mlp(stats, model, policy: Policy, scores, budget: float) -> Policy:
    """``policy`` with the smallest MLP ratio (1/100 grid) keeping ≤ ``budget`` parameters."""
    lo, hi = 0, 95
    while lo < hi:
        mid = (lo + hi) // 2
        if params_after(stats, model, replace(policy, mlp=mid / 100), scores) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return replace(policy, mlp=lo / 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cal-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--eval-doc-tokens", type=int, default=256)
    parser.add_argument("--keep", type=float, default=0.75, help="fraction of parameters kept")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the saved JSON")
    args = parser.parse_args()
    if args.plot_only:
        return plot(json.loads((RESULTS / "structures_smollm2_cpu.json").read_text()))
    torch.manual_seed(0)
    model, tokenizer = minigpt.load_model()
    total = sum(p.numel() for p in model.parameters())
    budget = args.keep * total
    start = time.perf_counter()
    stats = minigpt.calibrate(model, tokenizer, "stdlib", max_tokens=args.cal_tokens, seq_len=512, batch_size=4,
                              progress=False)
    cal_seconds = time.perf_counter() - start
    scores = importance.scores("l1", stats=stats)
    layers = next(n for n in range(1, 30) if params_after(stats, model, Policy(mlp=0.0, layers=n), scores) <= budget)
    plans = {
        "unpruned": None,
        "MLP only": smallest_mlp(stats, model, Policy(mlp=0.0), scores, budget),
        "heads 1/3 + MLP": smallest_mlp(stats, model, Policy(mlp=0.0, heads=1 / 3), scores, budget),
        "KV groups 1/3 + MLP": smallest_mlp(stats, model, Policy(mlp=0.0, heads=1 / 3, kv_groups=True), scores,
                                            budget),
        "hidden 5 % + MLP": smallest_mlp(stats, model, Policy(mlp=0.0, hidden=0.05), scores, budget),
        "hidden 10 % + MLP": smallest_mlp(stats, model, Policy(mlp=0.0, hidden=0.1), scores, budget),
        f"depth {layers} layers (Block Influence)": Policy(mlp=0.0, layers=layers),
        f"depth {layers} layers (random, seed 0)": Policy(mlp=0.0, layers=layers, layer_metric="random"),
        f"--target-params {args.keep}": Policy(target_params=args.keep),
    }
    rows = []
    for name, policy in plans.items():
        model, tokenizer = minigpt.load_model()
        plan = None
        if policy is not None:
            model, plan = minigpt.prune(model, tokenizer, stats=stats, policy=policy)
        row = {"plan": name, "params": sum(p.numel() for p in model.parameters()),
               "policy": plan.policy if plan else None}
        row["kept_pct"] = round(100 * row["params"] / total, 2)
        for corpus in ("stdlib-heldout", "pydocs-heldout"):
            result = minigpt.evaluate(model, tokenizer, corpus, max_tokens=args.eval_tokens,
                                      doc_tokens=args.eval_doc_tokens)
            row[corpus] = round(result["perplexity"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"model": "SmolLM2-135M-Instruct", "device": "cpu", "calibration": {"corpus": "stdlib",
           "tokens": stats.tokens, "seconds": round(cal_seconds, 1)}, "eval_tokens": args.eval_tokens,
           "eval_doc_tokens": args.eval_doc_tokens, "keep": args.keep, "total_params": total, "rows": rows,
           "command": "python -m bench.structures_smollm2 " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "structures_smollm2_cpu.json").write_text(json.dumps(out, indent=1))
    lines = [(f"SmolLM2-135M-Instruct at ≤ {100 * args.keep:.0f} % of its {total:,} parameters; calibration "
             f"{stats.tokens} stdlib tokens; perplexity over {args.eval_tokens} held-out tokens "
             f"(≤ {args.eval_doc_tokens} per document)."), "",
             "| plan | MLP removed | params kept | stdlib-heldout ppl | pydocs-heldout ppl |", "|---|---|---|---|---|"]
    for row in rows:
        mlp = row["policy"]["ratio"] if row["policy"] else 0.0
        lines.append(f"| {row['plan']} | {100 * (mlp or 0):.1f} % | {row['kept_pct']} % | {row['stdlib-heldout']} "
                     f"| {row['pydocs-heldout']} |")
    (RESULTS / "structures_smollm2_cpu.md").write_text("\n".join(lines) + "\n")
    plot(out)


def plot(out: dict) -> None:
    from bench.plotting import bar_chart

    rows = out["rows"]
    bar_chart(RESULTS / "structures_smollm2_cpu.png", f"SmolLM2 at ≤ {100 * out['keep']:.0f} % parameters",
              "held-out perplexity (log scale, lower is better)",
              {c: [(r["plan"], r[c], r[c], r[c]) for r in rows] for c in ("stdlib-heldout", "pydocs-heldout")},
              log=True)

if __name__ == "__main__":
    main()
