"""``minigpt mcq``: the command line of ``minigpt.tools.mcq``.
"""

from __future__ import annotations

import json
from pathlib import Path

from minigpt.errors import MiniGPTError
from minigpt.tools import mcq as tool
from minigpt.tools.mcq import NORMALISATIONS, accuracy, build_cloze, load_questions, save_questions


def add_parser(subparsers):
    """Add the ``mcq`` subcommand (handler: ``run``) to ``subparsers``."""
    from minigpt.cli.common import add_model_args

    p = subparsers.add_parser("mcq", help="multiple-choice accuracy; builds cloze sets from held-out text",
                              description=tool.__doc__)
    add_model_args(p)
    p.add_argument("--questions", required=True, help="JSON lines {question, choices, answer}")
    p.add_argument("--build-from", nargs="+", help="build a cloze set from this held-out corpus into --questions")
    p.add_argument("--count", type=int, default=100, help="questions to build")
    p.add_argument("--choices", type=int, default=4, help="choices per built question")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--build-only", action="store_true", help="write the set, do not score")
    p.add_argument("--lm-eval-task-dir", help="also write an lm-eval task file for the questions into this directory "
                   "(run it with minigpt eval --lm-eval-include DIR --lm-eval-tasks minigpt_NAME)")
    p.add_argument("--normalise", default="tokens", choices=NORMALISATIONS, help="length normalisation")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args) -> None:
    """The ``mcq`` subcommand."""
    from minigpt.cli.common import load_model_from_args

    if args.build_from:
        if Path(args.questions).exists():
            raise MiniGPTError(f"{args.questions} already exists; choose a new path for the built set")
        save_questions(build_cloze(args.build_from, args.count, choices=args.choices, seed=args.seed), args.questions)
    if args.lm_eval_task_dir:
        from minigpt.tools.harness import write_cloze_task

        print(f"wrote lm-eval task {write_cloze_task(args.questions, args.lm_eval_task_dir)}")
        if args.build_only:
            print(f"wrote {args.count} questions to {args.questions}")
            return
    questions = load_questions(args.questions)
    model, tokenizer = load_model_from_args(args)
    result = accuracy(model, tokenizer, questions, normalise=args.normalise, progress=not args.no_progress)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"accuracy {result['accuracy']:.1%} ({result['correct']} of {result['total']} questions, "
              f"normalised by {result['normalise']})")
