"""``minigpt prune``: score, plan, compact (and refit) a model, save it with its report.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from minigpt.cli.common import (
    add_calibration_args,
    add_eval_args,
    add_model_args,
    calibration_kwargs,
    check_out,
    load_model_from_args,
)
from minigpt.errors import MiniGPTError
from minigpt.pipeline.data import resolve_files
from minigpt.pipeline.importance import METRICS


def _add_compensation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compensate", default="auto", choices=("auto", "none", "bias", "lstsq"),
                   help="refit down_proj on the kept neurons (README: Compensation); auto: lstsq when the "
                   "statistics hold Gram matrices, none otherwise")
    p.add_argument("--select", default="auto", choices=("auto", "metric", "obs"),
                   help="which neurons go: the metric's lowest, or greedy structured OBS (counts from the metric); "
                   "auto: obs when the refit is lstsq and the metric the default l1 (not --reverse, --plan, --out-of-core)")
    p.add_argument("--damping", type=float, default=0.01, help="least-squares / OBS damping (fraction of the "
                   "mean diagonal of the second moment)")
    p.add_argument("--sequential", action="store_true", help="calibrate, prune and refit layer by layer on the "
                   "pruned layers' outputs (one layer's statistics in memory at a time)")
    p.add_argument("--budget-tokens", type=int, default=16384, help="held-out tokens that size the model under "
                   "--max-ppl-increase: windows of the documents after those the report's --eval-tokens score")
    p.add_argument("--budget-doc-tokens", type=int, default=256, help="at most this many sizing tokens of each "
                   "document (a seeded window), so that --budget-tokens spans many documents")
    p.add_argument("--budget-confidence", type=float, default=0.95, help="a plan passes when this upper confidence "
                   "bound of its perplexity ratio (over the sizing documents) is within the budget; 0.5: the ratio "
                   "measured (README: quality budget)")


def _multiple(text: str) -> int | str:
    """``auto`` or an integer (its range is checked with the other options, ``minigpt.cli.options``)."""
    try:
        return text if text == "auto" else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a positive integer, got {text!r}") from None


def _eval(model, tokenizer, args, reference_params=None) -> dict:
    from minigpt.pipeline.evaluation import evaluate

    data = getattr(args, "eval_data", None) if args.command == "prune" else args.data
    return evaluate(model, tokenizer, data, reference_params=reference_params, seq_len=args.eval_seq_len,
                    stride=args.stride, max_tokens=args.eval_tokens, doc_tokens=args.eval_doc_tokens,
                    progress=not args.no_progress)


def _table(before: dict | None, after: dict) -> str:
    rows = [("parameters", "total"), ("MLP", "mlp"), ("embedding", "embedding"), ("attention", "attention")]
    lines = ["| | before | after | change |", "|---|---:|---:|---:|"]
    for label, key in rows:
        b, a = (before or after)["params"][key], after["params"][key]
        lines.append(f"| {label} | {b:,} | {a:,} | {100 * (a - b) / max(b, 1):+.1f}% |")
    if before is not None and "perplexity" in before:
        for label, key, fmt in (("perplexity", "perplexity", ".3f"), ("bits per byte", "bits_per_byte", ".4f"),
                                ("tokens per byte", "tokens_per_byte", ".4f")):
            b, a = before[key], after[key]
            lines.append(f"| {label} | {b:{fmt}} | {a:{fmt}} | ×{a / b:.3f} |")
        lines.append(f"| relative size | 100% | {after['relative_size_pct']:.1f}% | |")
    return "\n".join(lines)


def _removed(plan) -> str:
    """The fraction removed, exactly: rounding up to a multiple keeps more neurons than the ratio alone would."""
    kept, total = sum(plan.kept_widths), sum(plan.widths)
    return (f"{100 * plan.removed_fraction:.1f}% of MLP neurons (exactly {total - kept:,} of {total:,} = "
            f"{100 * plan.removed_fraction:.3f}%; kept widths rounded up to multiples of {plan.policy.get('multiple', 1)})")


def _prune_out_of_core(args, source: Path, out: Path, stats, given_plan, policy, compensate: str) -> None:
    """``prune --out-of-core``: the safetensors checkpoint is rewritten shard by shard, never loaded (no eval)."""
    from minigpt.pipeline.sharded import prune_checkpoint

    if stats is None and given_plan is None:
        raise MiniGPTError("--out-of-core needs --stats or --plan (calibrate first, e.g. under torchrun)")
    if args.vocab:
        raise MiniGPTError("--out-of-core does not prune the vocabulary")
    _, plan, report = prune_checkpoint(source, out, stats=stats, pruning_plan=given_plan, metric=args.metric,
                                       policy=policy, trust_remote_code=args.trust_remote_code,
                                       compensate=compensate, damping=args.damping)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    sizes = report["weight_bytes"]
    print(f"removed {_removed(plan)}{_structures_line(plan)} out of core; saved to {out} "
          f"(weights {sizes['before'] / 2**20:,.1f} MiB -> {sizes['after'] / 2**20:,.1f} MiB)")


def _compensation(args, stats, given_plan, policy) -> str:
    """The --compensate method to apply; refuses, before any heavy work, what cannot be combined."""
    refits = args.compensate not in ("auto", "none") or args.select == "obs"
    what = f"--compensate {args.compensate}" if args.select != "obs" else "--select obs"
    if refits and args.no_gram:
        raise MiniGPTError(f"{what} needs the Gram statistics that --no-gram turns off")
    if args.select == "obs" and args.out_of_core:
        raise MiniGPTError("--select obs is not available with --out-of-core (OBS picks neurons from every layer's "
                           "weights while planning, before any shard is read)")
    if refits and args.out_of_core and stats is None:
        raise MiniGPTError(f"{what} with --out-of-core needs --stats holding Gram statistics")
    if refits and stats is not None and stats.gram is None:
        raise MiniGPTError(f"{what} needs Gram statistics; {args.stats} has none (calibrate without --no-gram)")
    if args.max_ppl_increase is not None and (given_plan is not None or args.out_of_core or args.sequential):
        raise MiniGPTError("--max-ppl-increase sizes a plan from one calibration: not with --plan, --out-of-core "
                           "or --sequential")
    if args.sequential and (stats is not None or given_plan is not None or args.out_of_core or args.vocab):
        raise MiniGPTError("--sequential calibrates layer by layer: not with --stats, --plan, --out-of-core or "
                           "--vocab")
    if args.sequential:
        from minigpt.pipeline.sequential import check_policy

        check_policy(policy, args.metric)
    if args.compensate != "auto":
        return args.compensate
    no_gram = args.no_gram or (stats.gram is None if stats is not None else given_plan is not None)
    return "none" if no_gram else "lstsq"


def _size_by_budget(args, model, tokenizer, stats, policy, prune_kwargs: dict) -> dict:
    """``budget.size_by_budget`` of ``policy``'s MLP ratio on windows of the held-out documents after those the
    report scores."""
    from minigpt.pipeline.budget import size_by_budget, sizing_documents
    from minigpt.pipeline.evaluation import documents_after
    from minigpt.pipeline.prune import prune

    texts = documents_after(tokenizer, args.eval_data, args.eval_tokens, args.eval_doc_tokens, args.text_field)
    docs = sizing_documents(tokenizer, texts, args.budget_tokens, min(args.budget_doc_tokens, args.eval_seq_len))
    return size_by_budget(model, tokenizer, docs, lambda m, r: prune(
        m, tokenizer, stats=stats, policy=replace(policy, mlp=r, threshold=None), **prune_kwargs)[0],
                          max_increase=args.max_ppl_increase, confidence=args.budget_confidence)


def cmd_prune(args) -> None:
    from minigpt.io import default_model_path
    from minigpt.pipeline.compact import save_pruned
    from minigpt.pipeline.evaluation import parameter_counts
    from minigpt.pipeline.planning import PruningPlan
    from minigpt.pipeline.policy import Policy
    from minigpt.pipeline.prune import prune, prune_vocabulary
    from minigpt.pipeline.stats import CalibrationStats
    from minigpt.pipeline.vocab import corpus_token_counts

    source = args.model or default_model_path()
    out = Path(args.out)
    check_out(out, source)
    from minigpt.cli import moe as moe_cli

    if moe_cli.wanted(args):
        return moe_cli.run_prune(args, source, out, load_model_from_args)
    stats = CalibrationStats.load(args.stats) if args.stats else None
    given_plan = PruningPlan.load(args.plan) if args.plan else None
    if stats is None and given_plan is None:
        resolve_files(args.data)  # fail on bad paths before loading the model
    if args.max_bpb_increase is not None and args.vocab_min_count is not None:
        raise MiniGPTError("--max-bpb-increase sizes the vocabulary by held-out text; --vocab-min-count by counts: "
                           "give one of them")
    args.vocab = args.vocab or args.max_bpb_increase is not None
    if args.vocab:
        resolve_files(args.data)  # the corpus the vocabulary is counted over
    if not args.no_eval or args.vocab:
        resolve_files(args.eval_data, default="stdlib-heldout")
    structural = args.heads or args.hidden or args.layers or args.target_params is not None
    ratio = 0.2 if args.threshold is None and args.ratio is None and not structural else args.ratio
    policy = Policy(mlp=ratio, threshold=args.threshold, scope=args.scope, multiple=args.multiple,
                    min_keep=args.min_keep, reverse=args.reverse, heads=args.heads, kv_groups=args.heads_mode == "kv",
                    heads_scope=args.heads_scope, hidden=args.hidden, layers=args.layers, layer_metric=args.layer_metric,
                    target_params=args.target_params, seed=args.seed)
    if structural and args.threshold is None and ratio is None and args.target_params is None:
        policy = replace(policy, mlp=0.0)
    if structural and args.reverse:
        raise MiniGPTError("--heads/--hidden/--layers/--target-params do not combine with --reverse")
    if structural and (args.max_ppl_increase is not None or args.sequential):
        raise MiniGPTError("--heads/--hidden/--layers/--target-params do not combine with --max-ppl-increase or "
                           "--sequential (MLP neurons only)")
    compensate = _compensation(args, stats, given_plan, policy)
    if args.select == "auto":
        obs = (compensate == "lstsq" and given_plan is None and args.metric == "l1" and not args.reverse
               and not args.out_of_core)
        args.select = "obs" if obs else "metric"
    if args.out_of_core:
        return _prune_out_of_core(args, Path(source), out, stats, given_plan, policy, compensate)
    model, tokenizer = load_model_from_args(args)
    before = None if args.no_eval else _eval(model, tokenizer, args)
    reference = parameter_counts(model)["total"]
    refits = compensate != "none" or args.select == "obs"
    if stats is None and args.max_ppl_increase is not None:
        from minigpt.pipeline.calibration import calibrate

        kwargs = calibration_kwargs(args)
        stats = calibrate(model, tokenizer, args.data, backend=args.backend,
                          **{**kwargs, "gram": True if refits else kwargs["gram"]})
    prune_kwargs = {
        "metric": args.metric, "seed": args.seed, "reference_data": args.reference_data,
        "reference": CalibrationStats.load(args.reference_stats) if args.reference_stats else None,
        "backend": args.backend, "calibration": calibration_kwargs(args), "compensate": compensate,
        "select": args.select, "damping": args.damping}
    budget = None
    if args.max_ppl_increase is not None:
        budget = _size_by_budget(args, model, tokenizer, stats, policy, prune_kwargs)
        policy = replace(policy, mlp=budget["ratio"], threshold=None)
    if args.sequential:
        from minigpt.pipeline.sequential import prune_sequential

        kwargs = {k: v for k, v in calibration_kwargs(args).items() if k not in ("progress", "gram")}
        model, plan = prune_sequential(model, tokenizer, args.data, policy=policy, metric=args.metric,
                                       select=args.select, compensate=compensate, damping=args.damping,
                                       backend=args.backend, **kwargs)
    else:
        model, plan = prune(model, tokenizer, stats=stats, pruning_plan=given_plan, data=args.data, policy=policy,
                            **prune_kwargs)
    if budget is not None:
        plan.policy["budget"] = budget
    vocab_report = None
    if args.vocab:
        counts = corpus_token_counts(tokenizer, args.data, args.vocab_tokens,
                                     model.get_input_embeddings().num_embeddings, args.text_field,
                                     progress=not args.no_progress)
        keep, choice = _vocab_choice(model, tokenizer, counts, args)
        tokenizer, kept_ids, vocab_report = prune_vocabulary(
            model, tokenizer, counts, min_count=args.vocab_min_count, always_keep=args.vocab_keep,
            pad_to=args.vocab_pad_to, min_size=args.vocab_min_size, keep_ids=keep)
        vocab_report.update(choice)
        plan.vocab = kept_ids.tolist()
        if keep is not None:
            plan.policy["vocab_budget"] = {k: choice[k] for k in ("max_increase_pct", "bits_per_byte_full",
                                                                  "bits_per_byte_kept", "increase_pct", "tried",
                                                                  "heldout")}
    if args.no_eval:
        after = {"params": parameter_counts(model)}
    else:
        after = _eval(model, tokenizer, args, reference_params=reference)
    report = {"source": str(source), "plan": plan.policy, "removed_fraction": plan.removed_fraction,
              "kept_widths": plan.kept_widths, "vocab": vocab_report, "before": before, "after": after,
              **({"budget": budget} if budget is not None else {})}
    save_pruned(model, tokenizer, out, plan=plan, source=source, report=report)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"\nremoved {_removed(plan)}{_structures_line(plan)}; saved to {out}")
        if vocab_report:
            print(f"vocabulary: kept {vocab_report['vocab_kept']:,} of {vocab_report['vocab_old']:,} tokens "
                  f"({vocab_report['embedding_params_saved']:,} embedding parameters saved)")
            if "increase_pct" in vocab_report:
                held = vocab_report["heldout"]
                print(f"vocabulary size chosen for held-out bits per byte {vocab_report['increase_pct']:+.2f}% "
                      f"(bound {vocab_report['max_increase_pct']:g}%) on {held['bytes']:,} bytes of {held['data']} "
                      f"({held['documents']} documents), counted over {vocab_report['counted_tokens']:,} tokens")
        print()
        print(_table(before, after))


def _vocab_choice(model, tokenizer, counts, args) -> tuple:
    """``(keep ids, report)`` chosen by the held-out bound, or ``(None, {})`` with ``--vocab-min-count``."""
    from minigpt.pipeline.vocab_size import MAX_INCREASE, choose_vocab, heldout_texts

    if args.vocab_min_count is not None:
        return None, {"counted_tokens": int(counts.sum())}
    texts, held = heldout_texts(tokenizer, args.eval_data, skip_tokens=args.eval_tokens,
                                skip_doc_tokens=args.eval_doc_tokens, text_field=args.text_field)
    bound = MAX_INCREASE if args.max_bpb_increase is None else args.max_bpb_increase
    keep, report = choose_vocab(model, tokenizer, counts, texts, max_increase=bound,
                                always_keep=args.vocab_keep, pad_to=args.vocab_pad_to, min_size=args.vocab_min_size)
    return keep, {**report, "heldout": held, "counted_tokens": int(counts.sum())}


def _structures_line(plan) -> str:
    """``, 6 of 9 heads, 432 hidden channels, 28 layers`` for what a plan removes besides MLP neurons."""
    parts = []
    if plan.heads is not None:
        counts = sorted({len(h) for h in plan.heads})
        parts.append(f"{counts[0]} heads per layer" if len(counts) == 1 else
                     f"{sum(len(h) for h in plan.heads)} heads kept ({counts[0]}–{counts[-1]} per layer)")
    if plan.hidden is not None:
        parts.append(f"{len(plan.hidden)} hidden channels kept")
    if plan.layers is not None:
        parts.append(f"{len(plan.layers)} layers kept")
    return "".join(", " + p for p in parts)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``prune`` subcommand to ``subparsers``."""
    pr = subparsers.add_parser("prune", help="remove MLP neurons and save a smaller model")
    add_model_args(pr)
    add_calibration_args(pr)
    pr.add_argument("--stats", help="statistics from `minigpt calibrate` (instead of calibrating now)")
    pr.add_argument("--plan", help="a saved plan JSON to apply as is")
    pr.add_argument("--metric", default="l1", choices=METRICS, help="importance metric (README: Metrics and policies)")
    pr.add_argument("--reverse", action="store_true", help="remove the highest-scoring neurons (reverse pruning)")
    pr.add_argument("--seed", type=int, default=0, help="generator seed of --metric random")
    pr.add_argument("--reference-stats", help="statistics of a reference corpus (--metric selectivity)")
    pr.add_argument("--reference-data", nargs="+", help="reference corpus to calibrate on (--metric selectivity)")
    policy = pr.add_mutually_exclusive_group()
    policy.add_argument("--threshold", type=float, help="drop neurons whose normalised score is below this")
    policy.add_argument("--ratio", "--mlp", type=float, dest="ratio",
                        help="fraction of MLP neurons to remove (default 0.2 when no other structure is pruned)")
    pr.add_argument("--heads", type=float, default=0.0, help="fraction of query heads to remove inside every KV "
                    "group (README: Structures)")
    pr.add_argument("--heads-mode", choices=("query", "kv"), default="query",
                    help="kv: remove that fraction of whole KV groups with their query heads")
    pr.add_argument("--heads-scope", choices=("uniform", "global"), default="uniform",
                    help="global: remove the heads (or KV groups) whose removal costs least over all layers by the "
                    "structured OBS cost on o_proj (per-layer head counts; needs Gram statistics)")
    pr.add_argument("--hidden", type=float, default=0.0, help="fraction of hidden channels to remove")
    pr.add_argument("--layers", type=int, default=0, help="number of decoder layers to remove")
    pr.add_argument("--layer-metric", choices=("influence", "random"), default="influence",
                    help="which layers --layers removes: lowest Block Influence, or seeded random ones")
    pr.add_argument("--target-params", type=float, help="fraction of parameters to keep: the MLP and head amounts "
                    "are chosen by the documented allocation rule (README: Structures)")
    policy.add_argument("--max-ppl-increase", type=float, help="remove as much as keeps the held-out perplexity "
                        "within this relative increase (0.10: 10 %%), by bisection over plans of one calibration")
    _add_compensation_args(pr)
    pr.add_argument("--scope", default="uniform", choices=("uniform", "global"),
                    help="how --ratio (or --experts: per-layer expert counts) is spread")
    pr.add_argument("--multiple", type=_multiple, default="auto",
                    help="round kept widths up to a multiple: 'auto' (default) = 32, the block of GGUF Q8_0/Q4_0, "
                         "when the model's widths are multiples of 32 and ≥ 256; 64/128 for tensor cores; 1 = exact")
    pr.add_argument("--min-keep", type=float, default=0.0, help="keep at least this fraction of every layer")
    pr.add_argument("--vocab", action="store_true", help="also drop the tokens the domain uses least: the fewest "
                    "kept whose held-out bits per byte rise by at most --max-bpb-increase (README: Vocabulary)")
    pr.add_argument("--max-bpb-increase", type=float, help="size the kept vocabulary by this budget: the largest "
                    "relative rise of held-out bits per byte (0.01 = 1 %%, the default with --vocab; implies --vocab)")
    pr.add_argument("--vocab-min-count", type=int, help="instead of the bound: keep tokens seen at least this often")
    pr.add_argument("--vocab-keep", nargs="+", default=(), help="tokens always kept")
    pr.add_argument("--vocab-tokens", type=int, default=1_000_000, help="count the vocabulary over this many "
                    "--data tokens with the tokenizer alone (no forward pass; default 1000000)")
    pr.add_argument("--vocab-min-size", type=int, default=0, help="keep at least this many tokens (most frequent)")
    pr.add_argument("--vocab-pad-to", type=int, default=1, help="round the kept vocabulary up to a multiple (64)")
    pr.add_argument("--out", required=True, help="new directory for the pruned model")
    pr.add_argument("--no-eval", action="store_true", help="skip the before/after perplexity")
    pr.add_argument("--out-of-core", action="store_true",
                    help="rewrite the safetensors checkpoint shard by shard, one tensor at a time (models larger "
                         "than RAM; needs --stats or --plan; no evaluation)")
    pr.add_argument("--json", action="store_true", help="print the report as JSON")
    add_eval_args(pr, "--eval-data")
    from minigpt.cli import moe as moe_cli
    moe_cli.add_prune_arguments(pr)
    return pr
