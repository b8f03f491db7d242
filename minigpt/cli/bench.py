"""``minigpt bench``: the command line of ``minigpt.tools.bench``.
"""

from __future__ import annotations

import argparse
import json

from minigpt.errors import MiniGPTError
from minigpt.tools import bench as tool
from minigpt.tools.bench import NAMED_CONFIGS, benchmark, format_table, plot


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand (handler: ``run``) to ``subparsers``."""
    from minigpt.cli.common import DTYPES, add_trust_arg

    p = subparsers.add_parser("bench", help="parameters, memory, latency and throughput of models side by side",
                              description=tool.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True,
                   help="directory, .gguf, 'default' or " + ", ".join(NAMED_CONFIGS) + ", optionally @RATIO[/MULTIPLE];"
                   " repeat for each model (the first is the reference)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--prompt-lengths", type=_ints, default=[128, 512], help="prefill prompt lengths (default 128,512)")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 8], help="decode batch sizes (default 1,8)")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded per measurement (default 32)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--ablation-multiples", type=_ints, help="e.g. 1,64,128: each BASE@RATIO model once per multiple")
    p.add_argument("--engine", nargs="+", default=["transformers"], choices=("transformers", "vllm"),
                   help="vllm: also measure every model in vLLM (offline LLM.generate), beside transformers")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--markdown", help="write the tables as markdown here")
    p.add_argument("--plot", help="write a PNG plot here")
    add_trust_arg(p)
    p.set_defaults(func=run)
    return p


def run(args) -> None:
    """The ``bench`` subcommand: measure, print the tables, write the requested files."""
    from minigpt.cli.common import device_dtype
    from minigpt.io import atomic_file
    from minigpt.tools import vllm_bench

    if "vllm" in args.engine and not vllm_bench.available():
        raise MiniGPTError(vllm_bench.INSTALL_HINT)  # before loading any model
    device, dtype = device_dtype(args)
    report = benchmark(args.model, device=device, dtype=dtype, prompt_lengths=args.prompt_lengths,
                       decode_tokens=args.decode_tokens, batch_sizes=args.batch_sizes, repeats=args.repeats,
                       warmup=args.warmup, ablation_multiples=args.ablation_multiples,
                       trust_remote_code=args.trust_remote_code, engines=tuple(args.engine))
    table = format_table(report)
    print(table)
    for path, write in ((args.json, lambda p: p.write_text(json.dumps(report, indent=1))),
                        (args.markdown, lambda p: p.write_text(table + "\n")), (args.plot, lambda p: plot(report, p))):
        if path:
            with atomic_file(path) as tmp:
                write(tmp)
            print(f"wrote {path}")
