"""The ``minigpt`` command: ``calibrate``, ``prune`` and ``eval``; each stage's output is the next one's input."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from minigpt.cli import calibrate, evaluate, options, prune
from minigpt.cli.calibrate import cmd_calibrate
from minigpt.cli.evaluate import cmd_eval
from minigpt.cli.prune import cmd_prune
from minigpt.errors import MiniGPTError
from minigpt.io import FINISHED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minigpt", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    calibrate.add_parser(sub)

    prune.add_parser(sub)

    evaluate.add_parser(sub)

    from minigpt.cli import bench

    bench.add_parser(sub)
    from minigpt.cli import finetune

    finetune.add_parser(sub)
    from minigpt.cli import experiment, mcq

    experiment.add_parser(sub)
    mcq.add_parser(sub)
    from minigpt.cli import export as gguf_export

    gguf_export.add_parser(sub)
    return parser


COMMANDS = {"calibrate": cmd_calibrate, "prune": cmd_prune, "eval": cmd_eval}


def _kept_outputs() -> str:
    """What an interrupted command leaves: the outputs it finished (a partial one is always removed)."""
    kept = list(dict.fromkeys(FINISHED))  # a checkpoint rewritten many times is one output
    if not kept:
        return "nothing was written"
    return f"kept {len(kept)} finished output{'s' if len(kept) > 1 else ''} (last: {kept[-1]}), nothing partial"


def main(argv: list[str] | None = None) -> int:
    FINISHED.clear()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        options.check(args)  # every value, before any model is loaded or any token read
        COMMANDS.get(args.command, getattr(args, "func", None))(args)
    except MiniGPTError as err:
        print(f"minigpt: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"minigpt: interrupted; {_kept_outputs()}", file=sys.stderr)
        return 130
    return 0
