"""``minigpt calibrate``: statistics of a corpus (every rank on its shard under ``torchrun``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from minigpt.cli.common import add_calibration_args, add_model_args, calibration_kwargs, device_dtype
from minigpt.pipeline.data import resolve_files


def cmd_calibrate(args) -> None:
    """Calibrate (on every rank under ``torchrun``, each on its shard); rank 0 writes the summed statistics."""
    from minigpt.pipeline import distributed

    resolve_files(args.data)  # fail on bad paths before loading the model
    distributed.check_local_world_for_device_map(args.device_map)
    device, dtype = device_dtype(args)
    device = distributed.setup(device)
    try:
        _calibrate_this_rank(args, device, dtype)
    except BaseException:
        distributed.teardown(finished=False)
        raise
    distributed.teardown(finished=True)


def _calibrate_this_rank(args, device: str, dtype) -> None:
    from minigpt.cli import moe as moe_cli
    from minigpt.io import discard, load_model
    from minigpt.pipeline import distributed, moe
    from minigpt.pipeline.calibration import calibrate

    out = Path(args.out)
    checkpoint = Path(args.checkpoint or f"{out}.ckpt")
    model, tokenizer = load_model(args.model, dtype=dtype, device=device, device_map=args.device_map,
                                  trust_remote_code=args.trust_remote_code)
    if moe.is_moe(model):
        moe_cli.calibrate(model, tokenizer, args, out)
        return
    stats = calibrate(model, tokenizer, args.data, backend=args.backend, checkpoint=checkpoint,
                      checkpoint_every=args.checkpoint_every, resume=args.resume, **calibration_kwargs(args))
    if distributed.rank_world()[0] == 0:
        stats.save(out)
        discard(checkpoint)
        ranks = f" over {stats.meta['world_size']} ranks" if stats.meta["world_size"] > 1 else ""
        print(f"wrote {out}: {stats.tokens} tokens{ranks}, {stats.num_layers} layers, backend "
              f"{stats.meta['backend']}, {stats.meta['tokens_per_second']:.0f} tok/s")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``calibrate`` subcommand to ``subparsers``."""
    cal = subparsers.add_parser("calibrate", help="collect per-neuron statistics over a corpus")
    add_model_args(cal)
    add_calibration_args(cal)
    cal.add_argument("--out", required=True, help="statistics file to write (.safetensors)")
    cal.add_argument("--checkpoint", help="checkpoint file, rewritten atomically while calibrating (default: OUT.ckpt)")
    cal.add_argument("--checkpoint-every", type=int, default=1 << 20, metavar="TOKENS",
                     help="checkpoint interval in tokens, all ranks together (default 1048576; 0: never)")
    cal.add_argument("--resume", action="store_true", help="continue from the checkpoint (if there is one)")
    cal.add_argument("--device-map", choices=("auto",), help="spread a model larger than one GPU over all of them")
    return cal
