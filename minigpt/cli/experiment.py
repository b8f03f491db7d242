"""``minigpt experiment``: the command line of ``minigpt.tools.experiment``.
"""

from __future__ import annotations

import argparse

from minigpt.pipeline.importance import METRICS
from minigpt.tools import experiment as tool
from minigpt.tools.experiment import Experiment, Settings, grid


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``experiment`` subcommand (handler: ``run``) to ``subparsers``."""
    p = subparsers.add_parser("experiment", help="methods × ratios/thresholds × domains → results table and plots",
                              description=tool.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="sweep directory (created, or resumed when it exists)")
    p.add_argument("--model", help="HF directory or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--domains", nargs="+", default=["stdlib", "pydocs"], help="built-in corpora or paths")
    p.add_argument("--methods", nargs="+", default=["l1", "selectivity", "random", "maw", "maw-minmax", "wanda"],
                   choices=METRICS, help="metrics applied at every --ratios value")
    p.add_argument("--reverse", nargs="*", default=["l1", "selectivity"], choices=METRICS,
                   help="metrics also run reversed (highest scores removed first)")
    p.add_argument("--ratios", type=_floats, default=[0.2], help="comma-separated fractions removed (0.2)")
    p.add_argument("--thresholds", type=_floats, default=[1e-3, 1e-1], help="comma-separated ε (1e-3,1e-1)")
    p.add_argument("--threshold-methods", nargs="*", default=["l1"], choices=METRICS)
    p.add_argument("--cross", nargs="*", default=["*/l1/r0.2"], help="cells (glob on ids) evaluated on every domain")
    p.add_argument("--mcq", nargs="*", default=["*"], help="cells (glob) scored on the cloze MCQ set")
    p.add_argument("--finetune", nargs="*", default=[], help="cells (glob) recovery-fine-tuned, e.g. stdlib/l1/r0.2")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--calib-doc-tokens", type=int, help="at most this many calibration tokens per document")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--eval-doc-tokens", type=int, help="at most this many held-out tokens per document")
    p.add_argument("--mcq-questions", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ft-max-steps", type=int, default=200)
    p.add_argument("--ft-eval-every", type=int, default=10)
    p.add_argument("--ft-seq-len", type=int, default=256)
    p.add_argument("--ft-batch-size", type=int, default=4)
    p.add_argument("--ft-lr", type=float, default=5e-5)
    p.add_argument("--ft-lr-scheduler", default="constant_with_warmup", help="e.g. cosine")
    p.add_argument("--ft-distill", action="store_true", help="distil from the unpruned model (see minigpt finetune)")
    p.add_argument("--ft-distill-alpha", type=float, default=0.5)
    p.add_argument("--ft-train-tokens", type=int, help="fine-tuning set size, cycled (default: whole corpus)")
    p.add_argument("--ft-patience", type=int, default=2,
                   help="evaluations without improvement (or rising while the training loss falls) before stopping")
    p.add_argument("--report-only", action="store_true", help="rewrite the table and plots from finished cells")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args) -> None:
    settings = Settings(model=args.model, domains=args.domains, calib_tokens=args.calib_tokens,
                        calib_doc_tokens=args.calib_doc_tokens, eval_doc_tokens=args.eval_doc_tokens,
                        eval_tokens=args.eval_tokens, mcq_questions=args.mcq_questions, seed=args.seed,
                        finetune={"max_steps": args.ft_max_steps, "eval_every": args.ft_eval_every,
                                  "seq_len": args.ft_seq_len, "batch_size": args.ft_batch_size,
                                  "learning_rate": args.ft_lr, "train_tokens": args.ft_train_tokens,
                                  "patience": args.ft_patience, "lr_scheduler": args.ft_lr_scheduler,
                                  "distill": args.ft_distill, "distill_alpha": args.ft_distill_alpha})
    exp = Experiment(args.out, settings, progress=not args.no_progress)
    if not args.report_only:
        cells = grid(args.domains, args.methods, args.ratios, args.thresholds, args.reverse, args.threshold_methods)
        exp.run(cells, cross=args.cross, mcq=args.mcq, finetune=args.finetune)
    print(exp.report(plots=True))
