"""Routing statistics and expert plans of mixture-of-experts models on a domain corpus.

Without ``--model`` it builds one tiny random model of each family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: 2 layers,
hidden 64, 8 experts of width 64, top-2; Qwen2-MoE with a 128-wide shared expert) with SmolLM2's tokenizer, so the
numbers show the machinery, not a trained router. With ``--model DIR`` (a real MoE checkpoint) the same code runs
unchanged on it. Per sparse layer: each expert's share of the top-k selections and of the routing weight, the
kept experts, their share of the routing, the removed router probability mass and the parameter counts. Writes
``OUT.json`` and ``OUT.md``.

    python -m bench.moe_routing [--model DIR] [--data stdlib] [--max-tokens 4096] [--experts 0.25]
        [--expert-neurons 0.25] [--out bench/results/moe_tiny_routing]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from minigpt import moe, moe_calibration
from minigpt.io import atomic_file, default_model_path, load_model

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
    stats = moe_calibration.calibrate_moe(model, tokenizer, args.data, max_tokens=args.max_tokens, seq_len=args.seq_len,
                              batch_size=args.batch_size)
    plan = moe.plan_moe(stats, args.experts, args.criterion, args.expert_neurons)
    before = moe.moe_parameter_counts(model)
    moe.prune_moe(model, plan)
    return {"model_type": model.config.model_type, "report": moe.moe_report(stats, plan),
            "params": {"before": before, "after": moe.moe_parameter_counts(model)}}


def markdown(results: list[dict], args) -> str:
    title = (f"# Routing statistics and expert plans ({args.max_tokens:,} tokens of {' '.join(args.data)}; "
             f"--experts {args.experts} by {args.criterion}, --expert-neurons {args.expert_neurons})")
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
        lines += ["", "| parameters | before | after |", "|---|---:|---:|"]
        lines += [f"| {k} | {b[k]:,} | {a[k]:,} |" for k in ("total", "experts", "router", "shared_experts")] + [""]
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
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_tiny_routing"))
    args = p.parse_args()
    if args.model:
        model, tokenizer = load_model(args.model)
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
    print(markdown(results, args))


if __name__ == "__main__":
    main()
