"""The real-MoE experiment: routing statistics of a mixture-of-experts model on a domain corpus, the expert-pruning
plan, the pruned model's held-out perplexity against the original's, and a plot of the routing.

Without ``--model`` it builds one tiny random model of each family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: 2 layers,
hidden 64, 8 experts of width 64, top-2; Qwen2-MoE with a 128-wide shared expert) with SmolLM2's tokenizer, so the
numbers show the machinery, not a trained router. With ``--model DIR`` (a real MoE checkpoint, e.g.
OLMoE-1B-7B-0924 or Qwen1.5-MoE-A2.7B) the same code runs unchanged on it. Per sparse layer: each expert's share of
the top-k selections and of the routing weight, the kept experts, their share of the routing, the removed router
probability mass; parameters (total, active per token) and perplexity before and after. Writes ``OUT.json``,
``OUT.md`` and ``OUT.png`` (each layer's routing shares, removed experts marked).

    python -m bench.moe_routing [--model DIR] [--data stdlib] [--max-tokens 4096] [--experts 0.25]
        [--expert-neurons 0.25] [--scope uniform|global] [--eval-data stdlib-heldout] [--eval-tokens 4096]
        [--dtype float32|bfloat16] [--out bench/results/moe_tiny_routing]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from minigpt.io import atomic_file, default_model_path, load_model
from minigpt.pipeline import moe, moe_calibration

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def tiny_model(family: str, vocab_size: int, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"vocab_size": vocab_size, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2,
              "intermediate_size": 64, "max_position_embeddings": 512}
    if family.startswith("qwen"):
        kwargs.update(moe_intermediate_size=64, intermediate_size=128)
    if family == "qwen2_moe":
        kwargs["shared_expert_intermediate_size"] = 128
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kwargs)).eval()


def run(model, tokenizer, args) -> dict:
    from minigpt.pipeline.evaluation import perplexity

    def ppl() -> dict:
        return perplexity(model, tokenizer, args.eval_data, seq_len=args.seq_len, max_tokens=args.eval_tokens)

    stats = moe_calibration.calibrate_moe(model, tokenizer, args.data, max_tokens=args.max_tokens,
                                          seq_len=args.seq_len, batch_size=args.batch_size)
    plan = moe.plan_moe(stats, args.experts, args.criterion, args.expert_neurons, scope=args.scope)
    before, params = ppl(), moe.moe_parameter_counts(model)
    moe.prune_moe(model, plan)
    return {"model_type": model.config.model_type, "report": moe.moe_report(stats, plan),
            "params": {"before": params, "after": moe.moe_parameter_counts(model)},
            "perplexity": {"before": before, "after": ppl()}}


def plot(results: list[dict], path: str) -> None:
    """One panel per model: each sparse layer's share of the top-k selections per expert (a row of bars), the
    experts the plan removes hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, squeeze=False, figsize=(8, 0.5 + 2.2 * len(results)))
    for ax, r in zip(axes[:, 0], results):
        layers = r["report"]["layers"]
        width = 0.8 / len(layers)
        for i, layer in enumerate(layers):
            shares = layer["routed_share"]
            xs = [e + i * width for e in range(len(shares))]
            bars = ax.bar(xs, shares, width, label=f"layer {layer['layer']}")
            for e, bar in enumerate(bars):
                if e not in layer["kept"]:
                    bar.set_hatch("//")
                    bar.set_alpha(0.4)
        ppl = r["perplexity"]
        ax.set_title(f"{r['model_type']}: perplexity {ppl['before']['perplexity']:.2f} → "
                     f"{ppl['after']['perplexity']:.2f} (removed experts hatched)", fontsize=9)
        ax.set_ylabel("share of selections")
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("expert")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: list[dict], args) -> str:
    title = (f"# Routing statistics and expert plans ({args.max_tokens:,} tokens of {' '.join(args.data)}; "
             f"--experts {args.experts} by {args.criterion}, scope {args.scope}, --expert-neurons "
             f"{args.expert_neurons})")
    source = ("tiny random models: the routers are untrained, so routing is near uniform." if args.model is None
              else f"model {args.model}.")
    lines = [title, "", f"Written by `python -m bench.moe_routing`; {source}", ""]
    for r in results:
        rep = r["report"]
        lines += [f"## {r['model_type']} (top-{rep['top_k']}, norm_topk_prob {rep['norm_topk_prob']})", "",
                  "| layer | share of top-k selections per expert | kept experts | kept share | removed router mass |",
                  "|---:|---|---|---:|---:|"]
        for layer in rep["layers"]:
            shares = " ".join(f"{s:.3f}" for s in layer["routed_share"])
            lines.append(f"| {layer['layer']} | {shares} | {layer['kept']} | {layer['kept_routed_share']:.3f} | "
                         f"{layer['removed_router_mass']:.4f} |")
        b, a = r["params"]["before"], r["params"]["after"]
        pb, pa = r["perplexity"]["before"], r["perplexity"]["after"]
        lines += ["", "| | before | after |", "|---|---:|---:|"]
        lines += [f"| {k} parameters | {b[k]:,} | {a[k]:,} |" for k in ("total", "active", "experts", "router",
                                                                          "shared_experts")]
        held_out = f"held-out perplexity ({pb['tokens']:,} tokens of {' '.join(args.eval_data)})"
        lines += [f"| {held_out} | {pb['perplexity']:.3f} | {pa['perplexity']:.3f} |", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a real MoE checkpoint directory (default: tiny random models of each family)")
    p.add_argument("--data", nargs="+", default=["stdlib"])
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--experts", type=float, default=0.25)
    p.add_argument("--criterion", default="freq", choices=moe.CRITERIA)
    p.add_argument("--expert-neurons", type=float, default=0.25)
    p.add_argument("--scope", default="uniform", choices=moe.SCOPES)
    p.add_argument("--eval-data", nargs="+", default=["stdlib-heldout"])
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_tiny_routing"))
    args = p.parse_args()
    if args.model:
        model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype))
        results = [run(model, tokenizer, args)]
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(default_model_path())
        results = [run(tiny_model(f, len(tokenizer)), tokenizer, args) for f in FAMILIES]
    with atomic_file(f"{args.out}.json") as tmp:
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        tmp.write_text(json.dumps({"args": settings, "results": results}, indent=1))
    with atomic_file(f"{args.out}.md") as tmp:
        tmp.write_text(markdown(results, args))
    with atomic_file(f"{args.out}.png") as tmp:
        plot(results, tmp)
    print(markdown(results, args))


if __name__ == "__main__":
    main()
