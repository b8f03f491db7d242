"""Vocabulary pruning of SmolLM2-135M-Instruct for the CPython-stdlib-source domain.

Counts tokens over ~1M tokens of stdlib ``.py`` files, prunes the vocabulary (``minigpt.pipeline.vocab``) at a few
``min_count`` thresholds, and measures on a disjoint held-out set of files: vocabulary kept/removed, embedding
parameters saved, tokens per byte, bits per byte (model NLL over fixed 512-token windows) and round-trip
exactness. A plan ``MIN_COUNT:MIN_SIZE`` keeps tokens seen ``MIN_COUNT`` times, filled up to ``MIN_SIZE`` tokens
with the most frequent, then earliest-merged ones. Writes ``bench/results/vocab_smollm2.{json,md}``.

    python bench/vocab_smollm2.py [--calib-tokens 1000000] [--bpb-bytes 30000] [--plans 1:19648 1:0 2:0]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sysconfig
import time
from pathlib import Path

import torch

from minigpt.io import load_model
from minigpt.pipeline.vocab import (
    count_tokens,
    plan_vocab,
    prune_tokenizer,
    shrink_vocab,
    tokens_per_byte,
    vocab_report,
)

RESULTS = Path(__file__).parent / "results"
DOCS = Path("/usr/share/doc/python3.11/html/_sources")


def stdlib_sources() -> list[str]:
    """Every readable UTF-8 ``.py`` file of the stdlib (no site-packages), in a seeded random order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            texts.append(text)
    random.Random(0).shuffle(texts)
    return texts


def take_bytes(texts: list[str], budget: int) -> list[str]:
    """Whole texts of at most ``budget / 4`` UTF-8 bytes, in order, until ``budget`` bytes are reached."""
    out, used = [], 0
    for text in texts:
        size = len(text.encode("utf-8"))
        if size <= budget // 4 and used < budget:
            out.append(text)
            used += size
    return out


@torch.inference_mode()
def bits_per_byte(model, tokenizer, texts: list[str], window: int, prefix: str) -> float:
    """Total NLL (bits) of every token / total UTF-8 bytes; each ``window`` starts with the ``prefix`` token."""
    start = tokenizer.convert_tokens_to_ids(prefix)
    nll = 0.0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids), window - 1):
            chunk = torch.tensor([[start, *ids[i : i + window - 1]]])
            logits = model(chunk).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
    return nll / math.log(2) / sum(len(t.encode("utf-8")) for t in texts)


def exact(tokenizer, texts: list[str]) -> float:
    """Fraction of texts with ``decode(encode(text)) == text``."""
    return sum(tokenizer.decode(tokenizer.encode(t, add_special_tokens=False)) == t for t in texts) / len(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-tokens", type=int, default=1_000_000)
    parser.add_argument("--held-out-files", type=int, default=100, help="disjoint files for tokens/byte, round trip")
    parser.add_argument("--bpb-bytes", type=int, default=30_000, help="held-out bytes scored for bits/byte")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--plans", nargs="+", default=["1:19648", "1:0", "2:0"], help="MIN_COUNT:MIN_SIZE")
    parser.add_argument("--pad-to", type=int, default=64)
    parser.add_argument("--prefix-token", default="<|endoftext|>")
    args = parser.parse_args()

    t0 = time.perf_counter()
    model, tokenizer = load_model()
    texts = stdlib_sources()
    held, pool = texts[: args.held_out_files], texts[args.held_out_files :]
    calib, n_tok = [], 0
    for text in pool:
        calib.append(text)
        n_tok += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n_tok >= args.calib_tokens:
            break
    counts = count_tokens(tokenizer, calib)
    docs = [p.read_text(encoding="utf-8") for p in sorted(DOCS.rglob("*.rst.txt"))[:100]]
    bpb_texts = take_bytes(held, args.bpb_bytes)
    base = {
        "tokens_per_byte": tokens_per_byte(tokenizer, held),
        "tokens_per_byte_docs": tokens_per_byte(tokenizer, docs),
        "bits_per_byte": bits_per_byte(model, tokenizer, bpb_texts, args.window, args.prefix_token),
        "roundtrip_exact": exact(tokenizer, held),
    }
    print(f"original: {base}", flush=True)

    runs = []
    for plan in args.plans:
        min_count, min_size = map(int, plan.split(":"))
        keep = plan_vocab(tokenizer, counts, min_count=min_count, pad_to=args.pad_to, min_size=min_size)
        pruned_tok = prune_tokenizer(tokenizer, keep)
        pruned = copy.deepcopy(model)
        report = vocab_report(pruned, keep)
        shrink_vocab(pruned, keep)
        run = {
            "min_count": min_count,
            "min_size": min_size,
            **report,
            "tokens_per_byte": tokens_per_byte(pruned_tok, held),
            "tokens_per_byte_docs": tokens_per_byte(pruned_tok, docs),
            "bits_per_byte": bits_per_byte(pruned, pruned_tok, bpb_texts, args.window, args.prefix_token),
            "roundtrip_exact": exact(pruned_tok, held),
            "roundtrip_exact_docs": exact(pruned_tok, docs),
        }
        run["bpb_change_pct"] = 100 * (run["bits_per_byte"] / base["bits_per_byte"] - 1)
        run["meets_target"] = run["removed_pct"] >= 60 and run["bpb_change_pct"] <= 2 and run["roundtrip_exact"] == 1
        runs.append(run)
        print(run, flush=True)
        del pruned

    result = {
        "model": "SmolLM2-135M-Instruct (fp32, CPU)",
        "domain": "CPython stdlib .py sources",
        "calibration": {"files": len(calib), "tokens": int(counts.sum()), "distinct_tokens": int((counts > 0).sum())},
        "held_out": {
            "files": len(held),
            "bytes": sum(len(t.encode("utf-8")) for t in held),
            "bpb_bytes": sum(len(t.encode("utf-8")) for t in bpb_texts),
            "docs_files": len(docs),
        },
        "settings": {"window": args.window, "pad_to": args.pad_to, "prefix_token": args.prefix_token},
        "original": base,
        "pruned": runs,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vocab_smollm2.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "vocab_smollm2.md").write_text(markdown(result))
    print(markdown(result))


COLUMNS = [
    "min_count",
    "min_size",
    "vocab kept",
    "removed",
    "embedding params saved",
    "tokens/byte (src)",
    "tokens/byte (docs)",
    "bits/byte",
    "Δ bits/byte",
    "round trip (src, docs)",
    "target",
]


def markdown(r: dict) -> str:
    """The results as a short Markdown report."""
    base, cal, held, cfg = r["original"], r["calibration"], r["held_out"], r["settings"]
    intro = (
        f"Calibration: {cal['tokens']:,} tokens from {cal['files']} files ({cal['distinct_tokens']:,} distinct ids). "
        f"Held out: {held['files']} disjoint files ({held['bytes']:,} bytes) for tokens/byte and round trip; "
        f"bits/byte over {held['bpb_bytes']:,} held-out bytes in {cfg['window']}-token windows. "
        f"Off-domain: {held['docs_files']} Python reST doc sources. Kept counts padded to a multiple of "
        f"{cfg['pad_to']}. Target: >= 60% of the vocabulary removed, bits/byte within 2%."
    )
    rows = [
        [
            "original",
            "",
            f"{r['pruned'][0]['vocab_old']:,}",
            "",
            "",
            f"{base['tokens_per_byte']:.4f}",
            f"{base['tokens_per_byte_docs']:.4f}",
            f"{base['bits_per_byte']:.4f}",
            "",
            f"{base['roundtrip_exact']:.0%}",
            "",
        ]
    ]
    for p in r["pruned"]:
        rows.append(
            [
                str(p["min_count"]),
                str(p["min_size"]),
                f"{p['vocab_kept']:,}",
                f"{p['removed_pct']:.1f}%",
                f"{p['embedding_params_saved']:,}",
                f"{p['tokens_per_byte']:.4f}",
                f"{p['tokens_per_byte_docs']:.4f}",
                f"{p['bits_per_byte']:.4f}",
                f"{p['bpb_change_pct']:+.2f}%",
                f"{p['roundtrip_exact']:.0%}, {p['roundtrip_exact_docs']:.0%}",
                "met" if p["meets_target"] else "missed",
            ]
        )
    table = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(
        [
            "# Vocabulary pruning: SmolLM2-135M-Instruct on CPython stdlib source",
            "",
            intro,
            "",
            *table,
            "",
            f"Total time {r['seconds']} s (CPU).",
            "",
        ]
    )


if __name__ == "__main__":
    main()
