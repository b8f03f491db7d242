"""``minigpt export``: the command line of ``minigpt.tools.gguf_export``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from minigpt.errors import MiniGPTError
from minigpt.tools import gguf_export as tool
from minigpt.tools.gguf_export import PER_LAYER_REFUSAL, TYPES, export_gguf


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand (handler: ``run``)."""
    p = subparsers.add_parser("export", help="write a model as one GGUF file for llama.cpp", description=tool.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--gguf", required=True, help="GGUF file to write")
    p.add_argument("--type", default="f16", choices=TYPES, help="matrix type (default f16); norms stay f32")
    p.add_argument("--pre-tokenizer", help="llama.cpp pre-tokenizer name, when minigpt cannot tell it")
    p.set_defaults(func=run)
    return p


def run(args) -> None:
    from minigpt.io import default_model_path, load_model

    out = Path(args.gguf)
    if out.exists():
        raise MiniGPTError(f"output {out} already exists; choose a new path")
    if out.suffix != ".gguf":
        raise MiniGPTError(f"output {out} must end in .gguf")
    source = Path(args.model) if args.model else default_model_path()
    if not source.is_dir():
        raise MiniGPTError(f"--model {source} is not a model directory")
    config = json.loads((source / "config.json").read_text()) if (source / "config.json").exists() else {}
    if "block_configs" in config or "minigpt_shapes" in config:
        raise MiniGPTError(f"cannot export {source} to GGUF: it has per-layer MLP widths; {PER_LAYER_REFUSAL}")
    model, tokenizer = load_model(source)
    report = export_gguf(model, tokenizer, out, qtype=args.type, pre_tokenizer=args.pre_tokenizer, source_dir=source)
    fallback = f"; {len(report['f16_fallback'])} matrices kept F16 (rows not whole blocks)" \
        if report["f16_fallback"] else ""
    print(f"wrote {out}: {report['bytes'] / 2**20:.1f} MiB, {args.type}, pre-tokenizer {report['pre_tokenizer']}"
          f"{fallback}")
