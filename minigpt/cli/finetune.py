"""``minigpt finetune``: the command line of ``minigpt.tools.finetune``.
"""

from __future__ import annotations

import torch

from minigpt.errors import MiniGPTError
from minigpt.pipeline.data import resolve_files
from minigpt.pipeline.evaluation import perplexity
from minigpt.tools import finetune as tool
from minigpt.tools.finetune import finetune


def add_parser(subparsers):
    """Add the ``finetune`` subcommand (handler: ``run``) to ``subparsers``."""
    from minigpt.cli.common import add_model_args

    p = subparsers.add_parser("finetune", help="recovery fine-tuning of a pruned model on its domain",
                              description=tool.__doc__)
    add_model_args(p)
    p.add_argument("--data", nargs="+", default=["stdlib"], help="domain corpus to train on (default stdlib)")
    p.add_argument("--eval-data", nargs="+", help="held-out corpus (default: <data>-heldout)")
    p.add_argument("--out", required=True, help="new directory for the fine-tuned model")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target", type=float, help="stop at this held-out perplexity")
    target.add_argument("--target-model", help="stop at this model's held-out perplexity "
                        "(default: the source recorded in the pruned model's minigpt_report.json)")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=10, help="optimiser steps between evaluations")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--lr-scheduler", default="constant_with_warmup",
                   help="transformers schedule name, e.g. cosine (decays to 0 at --max-steps)")
    p.add_argument("--distill", action="store_true",
                   help="knowledge distillation from the unpruned model (--target-model, default the source in "
                        "minigpt_report.json), mixed with the language-model loss")
    p.add_argument("--distill-alpha", type=float, default=0.5, help="weight of the distillation term (default 0.5)")
    p.add_argument("--distill-temperature", type=float, default=1.0)
    p.add_argument("--train-tokens", type=int, help="size of the fine-tuning set, cycled (default: whole corpus)")
    p.add_argument("--train-doc-tokens", type=int, help="at most this many tokens of each training document (a "
                   "seeded window), so that a short run sees many documents (default: all)")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--eval-doc-tokens", type=int, help="at most this many held-out tokens per document, so that "
                   "--eval-tokens spans many documents (the target is measured on the same tokens)")
    p.add_argument("--patience", type=int, default=2,
                   help="evaluations without improvement (or rising while the training loss falls) before stopping")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0,
                   help="order of the training documents and sequences (another seed continues a run on text in "
                        "another order)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def _target_model(args) -> str | None:
    """``--target-model``, else the source of a pruned model's report (None when there is neither, or when a
    numeric ``--target`` makes it unnecessary and no ``--distill`` needs it)."""
    import json
    from pathlib import Path

    if args.target_model or (args.target is not None and not args.distill) or not args.model:
        return args.target_model
    report = Path(args.model) / "minigpt_report.json"
    return json.loads(report.read_text()).get("source") if report.exists() else None


def run(args) -> None:
    """The ``finetune`` subcommand: measure the target, fine-tune, save the model with its report."""
    import json
    from pathlib import Path

    from minigpt.cli.common import check_out, device_dtype
    from minigpt.io import load_model
    from minigpt.pipeline.compact import save_pruned
    from minigpt.pipeline.planning import PruningPlan

    out = Path(args.out)
    check_out(out, args.model)
    data, eval_data = args.data, args.eval_data or [f"{d}-heldout" for d in args.data]
    resolve_files(data)
    resolve_files(eval_data)
    device, _ = device_dtype(args)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else torch.float32  # bf16 = mixed precision
    ppl = {"seq_len": args.eval_seq_len, "max_tokens": args.eval_tokens, "doc_tokens": args.eval_doc_tokens}
    target, source = args.target, _target_model(args)
    if args.distill and source is None:
        raise MiniGPTError("--distill needs the unpruned model: give --target-model (the model has no "
                           "minigpt_report.json naming its source)")
    teacher = None
    if source is not None:
        reference, ref_tok = load_model(source, dtype=dtype, device=device,
                                        trust_remote_code=args.trust_remote_code)
        if target is None:
            target = perplexity(reference, ref_tok, eval_data, **ppl)["perplexity"]
        teacher = reference if args.distill else None
        del reference
    model, tokenizer = load_model(args.model, dtype=dtype, device=device, trust_remote_code=args.trust_remote_code)
    report = finetune(model, tokenizer, data, eval_data, target=target, max_steps=args.max_steps,
                      eval_every=args.eval_every, seq_len=args.seq_len, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, train_tokens=args.train_tokens,
                      train_doc_tokens=args.train_doc_tokens, learning_rate=args.lr,
                      lr_scheduler=args.lr_scheduler, teacher=teacher, distill_alpha=args.distill_alpha,
                      distill_temperature=args.distill_temperature,
                      eval_tokens=args.eval_tokens, eval_seq_len=args.eval_seq_len,
                      eval_doc_tokens=args.eval_doc_tokens, patience=args.patience,
                      gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
                      progress=not args.no_progress)
    report["target_model"] = str(source) if source else None
    src = Path(args.model or "")
    plan = PruningPlan.load(src / "minigpt_plan.json") if (src / "minigpt_plan.json").exists() else None
    pruned = json.loads((src / "minigpt_report.json").read_text()) if (src / "minigpt_report.json").exists() else {}
    if "finetune" in pruned:  # fine-tuning a fine-tuned model continues its recovery: keep every stage
        pruned["earlier_finetunes"] = pruned.get("earlier_finetunes", []) + [pruned.pop("finetune")]
    save_pruned(model, tokenizer, out, plan=plan, source=args.model, report={**pruned, "finetune": report})
    if args.json:
        print(json.dumps(report, indent=1))
        return
    target_text = f"{target:.3f}" if target is not None else "none"
    print(f"perplexity {report['perplexity_before']:.3f} → {report['perplexity_after']:.3f} (target {target_text}); "
          f"stopped on {report['stop']} after {report['steps']} steps, {report['tokens']:,} tokens"
          + (f", {report['epochs']:.2f} epochs" if report["epochs"] is not None else "") + f"; saved to {out}")
