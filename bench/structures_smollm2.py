"""SmolLM2 at −25 % parameters, pruned by structure: MLP only, heads + MLP, hidden + MLP, depth (Block Influence vs
random layers) and the ``--target-params`` allocation; held-out perplexity on stdlib and pydocs.

    minigpt calibrate --data stdlib --max-tokens 8192 --doc-tokens 512 --batch-size 4 --out stats.safetensors
    python -m bench.structures_smollm2 --stats stats.safetensors --eval-tokens 2048 --eval-doc-tokens 256

One calibration (stdlib, every statistic and the Gram statistics of down_proj's and o_proj's inputs in one pass)
serves every plan (``--stats``; calibrated here when absent). Every plan is compensated the same way: the least-squares
refit of every down_proj on the kept neurons and, where heads go, of every o_proj on the kept heads
(``--compensate lstsq``, the CLI default). For each mixed plan the fixed amount of the other structure is set and
the MLP ratio is the smallest on a 1/100 grid whose model keeps ≤ 75 % of the parameters (counted exactly on a
meta-device copy); depth alone removes the fewest layers reaching the budget. Each row is the ``minigpt prune``
command in the JSON. Writes ``bench/results/structures_smollm2_cpu.{json,md,png}`` (rewritten after every row).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

import minigpt
from minigpt.pipeline import importance
from minigpt.pipeline.policy import Policy, params_after, structure_plan
from minigpt.pipeline.stats import CalibrationStats

RESULTS = Path(__file__).with_name("results")


def smallest_mlp(stats, model, policy: Policy, scores, budget: float) -> Policy:
    """``policy`` with the smallest MLP ratio (1/100 grid) keeping ≤ ``budget`` parameters."""
    lo, hi = 0, 95
    structures = structure_plan(stats, model, policy)
    while lo < hi:
        mid = (lo + hi) // 2
        if params_after(stats, model, replace(policy, mlp=mid / 100), scores, structures) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return replace(policy, mlp=lo / 100)


def cli_flags(policy: Policy) -> str:
    """The ``minigpt prune`` flags of ``policy``."""
    if policy.target_params is not None:
        return f"--target-params {policy.target_params}"
    flags = [f"--mlp {policy.mlp:g}"]
    if policy.heads:
        flags.append(f"--heads {policy.heads:.6g}" + (" --heads-mode kv" if policy.kv_groups else "")
                     + (" --heads-scope global" if policy.heads_scope == "global" else ""))
    if policy.hidden:
        flags.append(f"--hidden {policy.hidden:g}")
    if policy.layers:
        flags.append(f"--layers {policy.layers}" + (" --layer-metric random" if policy.layer_metric == "random" else ""))
    return " ".join(flags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stats", help="statistics file (minigpt calibrate, with Gram statistics): reused")
    parser.add_argument("--cal-tokens", type=int, default=8192, help="calibration tokens when --stats is absent")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--eval-doc-tokens", type=int, default=256)
    parser.add_argument("--keep", type=float, default=0.75, help="fraction of parameters kept")
    parser.add_argument("--kv-groups", type=int, nargs="+", default=[10, 5, 3],
                        help="KV groups removed over all layers (--heads-scope global) in the heads rows")
    parser.add_argument("--query-units", type=int, nargs="+", default=[5],
                        help="units of one query head per KV group removed over all layers (--heads-scope global)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the saved JSON")
    args = parser.parse_args()
    if args.plot_only:
        return plot(json.loads((RESULTS / "structures_smollm2_cpu.json").read_text()))
    torch.manual_seed(0)
    model, tokenizer = minigpt.load_model()
    total = sum(p.numel() for p in model.parameters())
    budget = args.keep * total
    start = time.perf_counter()
    if args.stats and Path(args.stats).exists():
        stats = CalibrationStats.load(args.stats)
    else:
        stats = minigpt.calibrate(model, tokenizer, "stdlib", max_tokens=args.cal_tokens, seq_len=512,
                                  batch_size=4, doc_tokens=512, gram=True, progress=False)
        if args.stats:
            stats.save(args.stats)
    cal_seconds = stats.meta.get("seconds", round(time.perf_counter() - start, 1))
    scores = importance.scores("l1", stats=stats)
    layers = next(n for n in range(1, 30) if params_after(stats, model, Policy(mlp=0.0, layers=n), scores) <= budget)
    n_groups = model.config.num_hidden_layers * model.config.num_key_value_heads
    plans = {"unpruned": None, "MLP only": Policy(mlp=0.0), f"--target-params {args.keep}": Policy(
        target_params=args.keep)}
    for g in args.kv_groups:
        plans[f"{g} KV groups (global) + MLP"] = Policy(mlp=0.0, heads=g / n_groups, kv_groups=True,
                                                       heads_scope="global")
    for u in args.query_units:
        per = model.config.num_attention_heads // model.config.num_key_value_heads  # a unit: one head of each group
        plans[f"{u}×{model.config.num_key_value_heads} query heads (global) + MLP"] = Policy(
            mlp=0.0, heads=u / (model.config.num_hidden_layers * per), heads_scope="global")
    plans.update({
        "KV groups 1/3 (every layer) + MLP": Policy(mlp=0.0, heads=1 / 3, kv_groups=True),
        "hidden 5 % + MLP": Policy(mlp=0.0, hidden=0.05),
        f"depth {layers} layers (Block Influence)": Policy(mlp=0.0, layers=layers),
        f"depth {layers} layers (random, seed 0)": Policy(mlp=0.0, layers=layers, layer_metric="random"),
        "depth 1 layer (Block Influence) + MLP": Policy(mlp=0.0, layers=1),
    })
    out = {"model": "SmolLM2-135M-Instruct", "device": "cpu", "threads": torch.get_num_threads(),
           "calibration": {"corpus": "stdlib", "tokens": stats.tokens, "gram_tokens": stats.gram_tokens,
                           "doc_tokens": stats.meta.get("corpus", {}).get("doc_tokens"), "seconds": cal_seconds},
           "compensate": "lstsq", "eval_tokens": args.eval_tokens, "eval_doc_tokens": args.eval_doc_tokens,
           "keep": args.keep, "total_params": total, "rows": [],
           "command": "python -m bench.structures_smollm2 " + " ".join(
               f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
               for k, v in vars(args).items() if k not in ("plot_only", "stats"))}
    for name, policy in plans.items():
        model, tokenizer = minigpt.load_model()
        plan, t0 = None, time.perf_counter()
        if policy is not None:
            if "MLP" in name:  # the MLP fills the rest of the budget
                policy = smallest_mlp(stats, model, policy, scores, budget)
            model, plan = minigpt.prune(model, tokenizer, stats=stats, policy=policy, compensate="lstsq")
        row = {"plan": name, "params": sum(p.numel() for p in model.parameters()),
               "prune_seconds": round(time.perf_counter() - t0, 1), "policy": plan.policy if plan else None,
               "heads_per_layer": [len(h) for h in plan.heads] if plan and plan.heads else None,
               "cli": None if policy is None else f"minigpt prune --stats STATS {cli_flags(policy)}"}
        row["kept_pct"] = round(100 * row["params"] / total, 2)
        for corpus in ("stdlib-heldout", "pydocs-heldout"):
            result = minigpt.evaluate(model, tokenizer, corpus, max_tokens=args.eval_tokens,
                                      doc_tokens=args.eval_doc_tokens)
            row[corpus] = round(result["perplexity"], 3)
        out["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "policy"}), flush=True)
        write(out)
    plot(out)


def write(out: dict) -> None:
    """The JSON and the markdown table of the rows measured so far."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "structures_smollm2_cpu.json").write_text(json.dumps(out, indent=1))
    cal = out["calibration"]
    lines = [(f"SmolLM2-135M-Instruct at ≤ {100 * out['keep']:.0f} % of its {out['total_params']:,} parameters; "
              f"calibration {cal['tokens']} stdlib tokens (≤ {cal['doc_tokens']} per document, Gram statistics "
              f"over {cal['gram_tokens']}); every plan refitted by least squares (down_proj; o_proj where heads "
              f"go); perplexity over {out['eval_tokens']} held-out tokens (≤ {out['eval_doc_tokens']} per "
              "document)."), "",
             "| plan | MLP removed | heads kept | params kept | stdlib-heldout ppl | pydocs-heldout ppl | flags |",
             "|---|---|---|---|---|---|---|"]
    for row in out["rows"]:
        mlp = (row["policy"] or {}).get("ratio") or 0.0
        heads = sum(row["heads_per_layer"]) if row["heads_per_layer"] else "all"
        flags = row["cli"].removeprefix("minigpt prune --stats STATS ") if row["cli"] else ""
        lines.append(f"| {row['plan']} | {100 * mlp:.1f} % | {heads} | {row['kept_pct']} % | "
                     f"{row['stdlib-heldout']} | {row['pydocs-heldout']} | `{flags}` |")
    (RESULTS / "structures_smollm2_cpu.md").write_text("\n".join(lines) + "\n")


def plot(out: dict) -> None:
    from bench.plotting import bar_chart

    rows = out["rows"]
    bar_chart(RESULTS / "structures_smollm2_cpu.png", f"SmolLM2 at ≤ {100 * out['keep']:.0f} % parameters",
              "held-out perplexity (log scale, lower is better)",
              {c: [(r["plan"], r[c], r[c], r[c]) for r in rows] for c in ("stdlib-heldout", "pydocs-heldout")},
              log=True)

if __name__ == "__main__":
    main()
