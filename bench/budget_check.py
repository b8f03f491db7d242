"""Does a ``prune --max-ppl-increase`` model stay within its budget on held-out text it was not sized on?

Reads the output directory of a budget run (its ``minigpt_report.json``: the measured curve, and the before/after
perplexity on the first ``--eval-tokens`` of ``--eval-data``, which sizing did not use), scores the unpruned and
the pruned model on further corpora (another domain: reported, no target), and writes ``<out>.json``,
``<out>.md`` and ``<out>.png`` (the curve: measured ratio and its upper bound against the amount removed).

    minigpt prune --stats S --max-ppl-increase 0.10 --eval-data stdlib-heldout ... --out budget10 --json
    python -m bench.budget_check --pruned budget10 --extra pydocs-heldout --out bench/results/budget_smollm2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from minigpt.io import load_model
from minigpt.pipeline.evaluation import evaluate


def check(pruned: Path, extra: list[str], eval_tokens: int, doc_tokens: int | None) -> dict:
    report = json.loads((pruned / "minigpt_report.json").read_text())
    budget = report["budget"]
    heldout = {"data": "the report's --eval-data (first tokens; sizing used later documents)",
               "before": report["before"]["perplexity"], "after": report["after"]["perplexity"],
               "tokens": report["after"]["tokens"]}
    heldout["ratio"] = heldout["after"] / heldout["before"]
    others = {}
    for corpus in extra:
        scores = []
        for path in (report["source"], pruned):
            model, tokenizer = load_model(path)
            scores.append(evaluate(model, tokenizer, corpus, max_tokens=eval_tokens, doc_tokens=doc_tokens))
            del model
        others[corpus] = {"before": scores[0]["perplexity"], "after": scores[1]["perplexity"],
                          "ratio": scores[1]["perplexity"] / scores[0]["perplexity"], "tokens": scores[1]["tokens"],
                          "doc_tokens": doc_tokens}
    return {"source": report["source"], "budget": budget, "removed_fraction": report["removed_fraction"],
            "params": {"before": report["before"]["params"]["total"], "after": report["after"]["params"]["total"]},
            "compensate": report["plan"]["compensate"], "select": report["plan"]["select"],
            "held_out": heldout, "other_domains": others,
            "within_budget": heldout["ratio"] <= 1 + budget["max_increase"]}


def markdown(r: dict) -> str:
    b = r["budget"]
    lines = [(f"`--max-ppl-increase {b['max_increase']:g}` at confidence {b['confidence']:g}: sized on "
             f"{b['tokens']:,} held-out tokens ({b['documents']} documents); select {r['select']}, compensate "
             f"{r['compensate']['method']}. Chosen ratio {b['ratio']:g} ({100 * r['removed_fraction']:.2f} % of MLP "
             f"neurons removed; parameters {r['params']['before']:,} → {r['params']['after']:,})."), "",
             "| ratio | perplexity (sizing documents) | × unpruned | upper bound | within budget |",
             "|---:|---:|---:|---:|---|"]
    for p in b["curve"]:
        ok = "chosen" if p["ratio"] == b["ratio"] else ("yes" if p["upper_increase"] <= b["max_increase"] else "no")
        lines.append(f"| {p['ratio']:g} | {p['perplexity']:.3f} | ×{1 + p['increase']:.4f} | "
                     f"×{1 + p['upper_increase']:.4f} | {ok} |")
    h = r["held_out"]
    lines += ["", ("| held-out text not used for sizing | tokens | unpruned | pruned | × | budget ×"
              f"{1 + b['max_increase']:g} |"), "|---|---:|---:|---:|---:|---|",
              (f"| {h['data']} | {h['tokens']:,} | {h['before']:.3f} | {h['after']:.3f} | ×{h['ratio']:.4f} | "
              f"{'within' if r['within_budget'] else 'OVER'} |")]
    for corpus, o in r["other_domains"].items():
        lines.append(f"| {corpus} (other domain, ≤ {o['doc_tokens']} tokens a document; no target) | "
                     f"{o['tokens']:,} | {o['before']:.3f} | {o['after']:.3f} | ×{o['ratio']:.4f} | report only |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = r["budget"]
    curve = b["curve"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = [100 * p["ratio"] for p in curve]
    ax.plot(xs, [1 + p["increase"] for p in curve], marker="o", label="measured on the sizing documents")
    ax.plot(xs, [1 + p["upper_increase"] for p in curve], marker="^", ls="--",
            label=f"{100 * b['confidence']:g} % upper bound")
    ax.axhline(1 + b["max_increase"], color="k", lw=1, label=f"budget ×{1 + b['max_increase']:g}")
    ax.plot([100 * b["ratio"]], [r["held_out"]["ratio"]], "s", color="tab:red",
            label="chosen model on held-out text not used for sizing")
    ax.set(xlabel="ratio asked of every layer (%; kept widths are then rounded up as --multiple says)",
           ylabel="perplexity × unpruned",
           title="quality budget: bisection over plans of one calibration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pruned", type=Path, required=True, help="output directory of a --max-ppl-increase run")
    p.add_argument("--extra", nargs="*", default=["pydocs-heldout"], help="further held-out corpora to report")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--eval-doc-tokens", type=int, default=256)
    p.add_argument("--out", type=Path, required=True, help="path without suffix: OUT.json, OUT.md, OUT.png")
    args = p.parse_args()
    result = check(args.pruned, args.extra, args.eval_tokens, args.eval_doc_tokens)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    plot(result, args.out.with_suffix(".png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
