"""``minigpt eval``: perplexity and size of a model, optionally lm-evaluation-harness tasks.
"""

from __future__ import annotations

import argparse
import importlib.util
import json

from minigpt.cli.common import add_eval_args, add_model_args, load_model_from_args
from minigpt.errors import MiniGPTError


def cmd_eval(args) -> None:
    from minigpt.pipeline.evaluation import evaluate

    if args.lm_eval_tasks:
        from minigpt.tools.harness import INSTALL_HINT

        if importlib.util.find_spec("lm_eval") is None:
            raise MiniGPTError(INSTALL_HINT)  # before loading anything
    model, tokenizer = load_model_from_args(args)
    result = evaluate(model, tokenizer, args.data, seq_len=args.eval_seq_len, stride=args.stride,
                      max_tokens=args.eval_tokens, doc_tokens=args.eval_doc_tokens)
    if args.lm_eval_tasks:
        from minigpt.tools.harness import run_tasks

        result["lm_eval"] = run_tasks(model, tokenizer, args.lm_eval_tasks, include_path=args.lm_eval_include,
                                      limit=args.lm_eval_limit)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    p = result["params"]
    print(f"perplexity {result['perplexity']:.3f} over {result['tokens']} tokens (window {result['seq_len']}, "
          f"stride {result['stride']}), {result['bits_per_byte']:.4f} bits/byte")
    print(f"parameters {p['total']:,} (MLP {p['mlp']:,}, embedding {p['embedding']:,}, attention {p['attention']:,})")
    for task, metrics in result.get("lm_eval", {}).items():
        print(f"lm-eval {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to ``subparsers``."""
    ev = subparsers.add_parser("eval", help="perplexity and size of a model")
    add_model_args(ev)
    add_eval_args(ev, "--data")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--no-progress", action="store_true")
    ev.add_argument("--lm-eval-tasks", nargs="+", help="also run these lm-evaluation-harness tasks on the model")
    ev.add_argument("--lm-eval-include", help="directory of local lm-eval task files (e.g. from minigpt mcq)")
    ev.add_argument("--lm-eval-limit", type=int, help="at most this many documents per lm-eval task")
    return ev
