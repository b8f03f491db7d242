"""``minigpt prune --experts R / --expert-neurons R``: the mixture-of-experts path of the prune command.

Calibrates routing and expert statistics on the domain corpus (or reads ``--expert-stats``), removes the least
routed-to experts and the least used neurons inside experts, evaluates, and saves a directory with
``minigpt_plan.json``, ``minigpt_report.json`` and the statistics (``minigpt_expert_stats.safetensors``): stock
``from_pretrained`` reloads it, or, with ``--scope global`` (expert counts differing per layer), the saved
``modeling_minigpt.py``. ``--out-of-core`` rewrites the checkpoint shard by shard (``minigpt.pipeline.moe_sharded``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from minigpt.errors import MiniGPTError
from minigpt.pipeline import moe, moe_calibration

# prune options that mean nothing on the expert path, with the value that says they were not given
_DENSE_ONLY = {"stats": None, "plan": None, "threshold": None, "ratio": None, "reference_stats": None,
               "reference_data": None, "vocab": False, "reverse": False, "min_keep": 0.0}


def add_prune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experts", type=float, metavar="R", help="mixture-of-experts models: remove this fraction of "
                   "every sparse layer's experts, the least routed to on the corpus (README: Mixture of experts)")
    p.add_argument("--expert-criterion", default="freq", choices=moe.CRITERIA,
                   help="rank experts by top-k selections (freq) or by routing-weight mass (mass)")
    p.add_argument("--expert-neurons", type=float, metavar="R", help="remove this fraction of the neurons of every "
                   "kept (and shared) expert, by --metric over the tokens routed to it")
    p.add_argument("--expert-stats", help="expert statistics saved by an earlier --experts run (instead of calibrating)")


def wanted(args) -> bool:
    return args.experts is not None or args.expert_neurons is not None


def _check(args, source):
    """Every refusal that needs no weights: options of the dense path, metric, ratios against the config.
    Returns the config."""
    from transformers import AutoConfig

    from minigpt.pipeline.data import resolve_files

    given = [f"--{k.replace('_', '-')}" for k, unset in _DENSE_ONLY.items() if getattr(args, k, unset) != unset]
    if given:
        raise MiniGPTError(f"{', '.join(given)} cannot be combined with --experts/--expert-neurons")
    if args.metric not in moe.NEURON_METRICS:
        raise MiniGPTError(f"--metric {args.metric} is not available inside experts; use one of "
                           f"{', '.join(moe.NEURON_METRICS)}")
    if str(source).endswith(".gguf"):
        raise MiniGPTError("expert pruning needs a Hugging Face model directory, not a .gguf file")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise MiniGPTError(f"cannot read the config of {source}: {str(err).splitlines()[0]}") from err
    moe.check_expert_ratio(config, args.experts, args.expert_neurons)
    if args.out_of_core and args.expert_stats is None:
        raise MiniGPTError("--out-of-core needs --expert-stats (minigpt calibrate writes them, e.g. under torchrun)")
    if args.expert_stats is None:
        resolve_files(args.data)
    if not args.no_eval and not args.out_of_core:
        resolve_files(args.eval_data, default="stdlib-heldout")
    return config


def calibrate(model, tokenizer, args, out: Path) -> None:
    """``minigpt calibrate`` on a MoE model: expert statistics (every rank its shard; rank 0 writes them)."""
    from minigpt.io import discard
    from minigpt.pipeline import distributed

    checkpoint = Path(args.checkpoint or f"{out}.ckpt") if args.checkpoint_every else None
    stats = moe_calibration.calibrate_moe(model, tokenizer, args.data, max_tokens=args.max_tokens, seq_len=args.seq_len,
                              batch_size=args.batch_size, text_field=args.text_field, doc_tokens=args.doc_tokens,
                              backend=args.backend, checkpoint=checkpoint, checkpoint_every=args.checkpoint_every,
                              resume=args.resume)
    if distributed.rank_world()[0] == 0:
        stats.save(out)
        if checkpoint is not None:
            discard(checkpoint)
        ranks = f" over {stats.meta['world_size']} ranks" if stats.meta["world_size"] > 1 else ""
        print(f"wrote {out}: expert statistics of {len(stats.layers)} sparse layers, {stats.tokens} tokens{ranks}")


def _perplexity(model, tokenizer, args) -> dict:
    from minigpt.pipeline.evaluation import perplexity

    return perplexity(model, tokenizer, args.eval_data, seq_len=args.eval_seq_len, stride=args.stride,
                      max_tokens=args.eval_tokens, doc_tokens=args.eval_doc_tokens, progress=not args.no_progress)


def run_prune(args, source, out: Path, load) -> None:
    """The prune command on a MoE model; ``load(args) -> (model, tokenizer)`` is the CLI's loader."""
    from minigpt.pipeline.compact import save_pruned
    from minigpt.pipeline.planning import auto_multiple

    config = _check(args, source)
    stats = moe.MoEStats.load(args.expert_stats) if args.expert_stats else None
    multiple = args.multiple
    if multiple == "auto":  # 32 (GGUF blocks) where the expert width allows it, as for dense MLPs
        multiple = auto_multiple([getattr(config, moe.expert_width_key(config))])
    policy = {"experts": args.experts, "criterion": args.expert_criterion, "neurons": args.expert_neurons,
              "metric": args.metric, "multiple": math.lcm(multiple, moe.EXPERT_WIDTH_MULTIPLE), "scope": args.scope}
    if args.out_of_core:
        from minigpt.pipeline import moe_sharded

        _, _, report = moe_sharded.prune_checkpoint(source, out, stats, trust_remote_code=args.trust_remote_code,
                                                    **policy)
        report.update(before=None, after=None)
        print(json.dumps(report, indent=1) if args.json else summary(report, out))
        return
    model, tokenizer = load(args)
    if stats is None:
        stats = moe_calibration.calibrate_moe(model, tokenizer, args.data, max_tokens=args.max_tokens, seq_len=args.seq_len,
                                  batch_size=args.batch_size, text_field=args.text_field, doc_tokens=args.doc_tokens,
                                  backend=args.backend)
    plan = moe.plan_moe(stats, **policy)
    before = None if args.no_eval else _perplexity(model, tokenizer, args)
    params_before = moe.moe_parameter_counts(model)
    moe.prune_moe(model, plan)
    report = {"source": str(source), "moe": moe.moe_report(stats, plan),
              "params": {"before": params_before, "after": moe.moe_parameter_counts(model)},
              "before": before, "after": None if args.no_eval else _perplexity(model, tokenizer, args)}

    def write_weights(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        stats.save(tmp / "minigpt_expert_stats.safetensors")

    save_pruned(model, tokenizer, out, plan=plan, source=source, report=report, write_weights=write_weights)
    print(json.dumps(report, indent=1) if args.json else summary(report, out))


def summary(report: dict, out) -> str:
    """Kept experts and routing shares per layer, parameters and perplexity before/after, as text."""
    info = report["moe"]
    head = (f"saved to {out}{' (out of core)' if report.get('out_of_core') else ''}; {info['tokens']:,} calibration "
            f"tokens, top-{info['top_k']} routing, norm_topk_prob {info['norm_topk_prob']}")
    lines = [head, "", "| layer | kept experts | kept routed share | removed router mass |", "|---:|---|---:|---:|"]
    for layer in info["layers"]:
        lines.append(f"| {layer['layer']} | {layer['kept']} | {layer['kept_routed_share']:.3f} | "
                     f"{layer['removed_router_mass']:.4f} |")
    b, a = report["params"]["before"], report["params"]["after"]
    lines += ["", "| | before | after |", "|---|---:|---:|"]
    lines += [f"| {k} parameters | {b[k]:,} | {a[k]:,} |" for k in ("total", "active", "experts", "router",
                                                                        "shared_experts")]
    if report["before"] is not None:
        lines.append(f"| perplexity | {report['before']['perplexity']:.3f} | {report['after']['perplexity']:.3f} |")
    return "\n".join(lines)
