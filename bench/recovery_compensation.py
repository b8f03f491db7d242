"""Recovery fine-tuning from the compensated model vs the uncompensated one: both held-out perplexity curves.

Collects the ``minigpt finetune`` outputs of the same plan pruned with and without the refit (their
``minigpt_report.json``), and writes ``<out>.json``, ``<out>.md`` and ``<out>.png`` (perplexity against
fine-tuning tokens, with the unpruned model's). For each curve and each threshold (the unpruned perplexity ×
1, 1.05, 1.1, 1.25, 1.5, 1.75, 2, 2.25) it gives the first evaluated step at or below it (None: not reached within
the run).

    python -m bench.recovery_compensation --runs "l1 40 %=ft_none" "l1+lstsq 40 %=ft_lstsq" \
        --out bench/results/recovery_compensation_smollm2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from minigpt.tools.experiment import plot_recovery

FACTORS = (1.0, 1.05, 1.1, 1.25, 1.5, 1.75, 2.0, 2.25)


def first_step(history: list[dict], limit: float) -> int | None:
    """The first evaluated step whose held-out perplexity is at or below ``limit``."""
    return next((h["step"] for h in history if h["perplexity"] <= limit), None)


def _chained(stages: list[dict]) -> dict:
    """One fine-tuning report from runs that continued each other (``minigpt finetune`` on its own output):
    histories joined with steps and tokens counted from the first run's start, seconds summed."""
    history, steps, tokens = [], 0, 0
    for stage in stages:
        for h in stage["history"][1 if history else 0:]:  # a continuation's step 0 is the last step before it
            history.append({**h, "step": h["step"] + steps, "tokens": h["tokens"] + tokens})
        steps, tokens = history[-1]["step"], history[-1]["tokens"]
    return {**stages[0], "history": history, "steps": steps, "tokens": tokens, "stages": len(stages),
            "seconds": round(sum(s["seconds"] for s in stages), 1), "target": stages[-1]["target"]}


def collect(runs: dict[str, Path]) -> dict:
    curves = {}
    for label, path in runs.items():
        report = json.loads((Path(path) / "minigpt_report.json").read_text())
        ft = _chained(report.get("earlier_finetunes", []) + [report["finetune"]])
        curves[label] = {"pruning": {k: report["plan"].get(k) for k in ("metric", "ratio", "select", "compensate")},
                         "finetune": ft}
    base = {c["finetune"]["target"] for c in curves.values()}
    if len(base) != 1:
        raise SystemExit(f"the runs measured different unpruned perplexities {base}: not the same held-out text")
    base = base.pop()
    for c in curves.values():
        c["steps_to"] = {f"x{f:g}": first_step(c["finetune"]["history"], base * f) for f in FACTORS}
    return {"base_perplexity": base, "factors": FACTORS, "curves": curves}


def markdown(result: dict) -> str:
    first = next(iter(result["curves"].values()))["finetune"]
    s = first["settings"]
    per_doc = f" (≤ {s['eval_doc_tokens']} from each document)" if s.get("eval_doc_tokens") else ""
    rates = " / ".join(dict.fromkeys(str(c["finetune"]["settings"]["learning_rate"])
                                     for c in result["curves"].values()))
    lines = [(f"Recovery fine-tuning on stdlib (plain language-model loss, lr {rates}, "
             f"{s['lr_scheduler']}, batch {s['batch_size']} × {s['seq_len']} tokens = "
             f"{s['batch_size'] * s['seq_len'] * s['grad_accum']} tokens a step"
             + (f", ≤ {s['train_doc_tokens']} tokens of each training document" if s.get("train_doc_tokens") else
                ", whole training documents") + "), held-out perplexity on "
             f"{s['eval_tokens']:,} stdlib-heldout tokens{per_doc} every {s['eval_every']} steps; unpruned model "
             f"{result['base_perplexity']:.3f}."), "",
             "| step | tokens | " + " | ".join(result["curves"]) + " |", "|---:|---:|" + "---:|" * len(result["curves"])]
    steps = sorted({h["step"] for c in result["curves"].values() for h in c["finetune"]["history"]})
    by_step = {label: {h["step"]: h for h in c["finetune"]["history"]} for label, c in result["curves"].items()}
    for step in steps:
        cells = [by_step[label].get(step) for label in result["curves"]]
        tokens = next(h["tokens"] for h in cells if h)
        lines.append(f"| {step} | {tokens:,} | " + " | ".join(
            f"{h['perplexity']:.3f} (×{h['perplexity'] / result['base_perplexity']:.3f})" if h else "" for h in cells)
            + " |")
    lines += ["", "First evaluated step at or below the unpruned perplexity × factor (— : not within the run):", "",
              "| run | " + " | ".join(f"×{f:g}" for f in result["factors"]) + " | run time (s) |",
              "|---|" + "---:|" * (len(result["factors"]) + 1)]
    for label, c in result["curves"].items():
        cells = ["—" if v is None else str(v) for v in c["steps_to"].values()]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {c['finetune']['seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="LABEL=DIR of each finetune output")
    p.add_argument("--out", required=True, help="path without suffix: writes OUT.json, OUT.md and OUT.png")
    args = p.parse_args()
    result = collect(dict(r.split("=", 1) for r in args.runs))
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    plot_recovery({"cells": [{"id": label, "cell": {"domain": "stdlib"}, "finetune": c["finetune"]}
                             for label, c in result["curves"].items()]}, out.with_suffix(".png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
