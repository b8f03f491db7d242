"""Consumers check, minigpt's side: the four kinds of output, transformers' references, the table of results.

``python -m bench.consumers prepare WORK`` makes (or reuses) in WORK the original SmolLM2, a uniform 20 % MLP
pruning, a vocabulary pruning and a per-layer-widths (threshold) pruning; exports GGUF files of those llama.cpp
can hold; builds a cloze lm-eval task from held-out stdlib text; and writes ``WORK/references.json``: each
model's prompt token ids, transformers' greedy tokens (fp32, argmax of every step, EOS not special) and
transformers' log-likelihood of every cloze choice, split into context and continuation tokens as lm-eval does.
``bench/consumer_checks.py`` then runs each client in its own virtual environment (``bench/consumers.sh``), and
``python -m bench.consumers report WORK OUT`` writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

PROMPTS = ["def fibonacci(n):\n    ", "The capital of France is", "x = [1, 22, 333, 4444]\nprint(sum(x) * 12"]
NEW_TOKENS = 16
CLOZE_QUESTIONS = 20
TASK = "minigpt_consumers_cloze"
PRUNINGS = {
    "uniform": ["--ratio", "0.2", "--max-tokens", "4096"],
    "vocabulary": ["--vocab", "--vocab-tokens", "200000", "--vocab-min-size", "19648", "--vocab-pad-to", "64",
                   "--ratio", "0"],
    "per-layer": ["--threshold", "0.1", "--max-tokens", "4096"],
}
CLIENTS = ("vllm", "llamacpp", "lmeval")


def _prune(work: Path, name: str) -> Path:
    from minigpt.cli import main

    out = work / name
    if not out.exists():
        code = main(["prune", *PRUNINGS[name], "--no-eval", "--no-progress", "--out", str(out)])
        if code:
            raise SystemExit(f"minigpt prune for {name} failed ({code})")
    return out


@torch.inference_mode()
def greedy(model, ids: list[int], steps: int) -> list[int]:
    """``steps`` argmax tokens after ``ids`` (EOS is a token like any other, as with vLLM's ``ignore_eos``)."""
    out = model(torch.tensor([ids]), use_cache=True)
    tokens = []
    for _ in range(steps):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def lm_eval_split(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's context/continuation tokens: trailing whitespace moves to the continuation, the whole text is
    encoded once and split at the context's token count."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def loglikelihood(model, ctx: list[int], cont: list[int]) -> float:
    logits = model(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1: -1].float()
    return float(torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum())


def _cloze(work: Path) -> tuple[Path, list[dict]]:
    from minigpt.tools.harness import write_cloze_task
    from minigpt.tools.mcq import build_cloze, load_questions, save_questions

    questions = work / "cloze.jsonl"
    if not questions.exists():
        save_questions(build_cloze("stdlib-heldout", CLOZE_QUESTIONS, seed=0), questions)
    write_cloze_task(questions, work / "tasks", TASK)
    return work / "tasks", load_questions(questions)


def _gguf(model, tokenizer, directory: Path, work: Path, name: str) -> dict:
    from minigpt.errors import MiniGPTError
    from minigpt.tools.gguf_export import export_gguf

    files, sizes = {}, {}
    try:
        for qtype in ("f32", "q8_0"):
            path = work / f"{name}-{qtype}.gguf"
            if not path.exists():
                export_gguf(model, tokenizer, path, qtype=qtype, source_dir=directory)
            files[qtype], sizes[qtype] = str(path), path.stat().st_size
    except MiniGPTError as err:
        return {"gguf_refusal": str(err)}
    return {"gguf": files, "gguf_bytes": sizes}


def prepare(work: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minigpt.io import default_model_path

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    dirs = {"original": default_model_path(), **{name: _prune(work, name) for name in PRUNINGS}}
    task_dir, questions = _cloze(work)
    models = {}
    for name, directory in dirs.items():
        start = time.time()
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
        logliks = [[loglikelihood(model, *lm_eval_split(tokenizer, q["question"], c)) for c in q["choices"]]
                   for q in questions]
        correct = [max(range(len(ll)), key=ll.__getitem__) == q["answer"] for ll, q in zip(logliks, questions)]
        models[name] = {
            "dir": str(directory), "config_architectures": model.config.architectures, "prompts": PROMPTS,
            "prompt_ids": prompt_ids, "new_tokens": NEW_TOKENS,
            "greedy": [greedy(model, ids, NEW_TOKENS) for ids in prompt_ids],
            "lm_eval": {"task_dir": str(task_dir), "task": TASK, "logliks": logliks,
                        "acc": sum(correct) / len(correct), "acc_tolerance": 1 / len(correct),
                        "loglik_tolerance": 0.01},
            **_gguf(model, tokenizer, Path(directory), work, name),
        }
        print(f"{name}: references in {time.time() - start:.0f} s", flush=True)
    (work / "references.json").write_text(json.dumps({"models": models}, indent=1))


def _cell(client: str, result: dict | None) -> tuple[str, bool]:
    """Markdown text and pass/fail of one client on one model."""
    if result is None:
        return "not run", False
    if not result["loaded"]:
        return f"fails: {result['error'][:80]}", False
    if client == "llamacpp" and not result["exported"]:
        return f"export refused ({result['refusal'].split(':', 1)[-1].strip()[:60]}…)", True
    if client == "lmeval":
        ok = result["metric_within_tolerance"]
        text = (f"acc {result['acc']:.3f} vs {result['acc_transformers']:.3f} ({result['questions']} questions), "
                f"max Δ log-lik {result['max_abs_loglik_diff']:.1e}")
        return text, ok
    ok = result["greedy_equal"] and result["prompt_ids_equal"]
    text = "greedy tokens equal" if result["greedy_equal"] else "greedy tokens differ"
    text += "" if result["prompt_ids_equal"] else ", tokenizer differs"
    if client == "llamacpp":
        text += f"; Q8_0 {result['gguf_bytes']['q8_0'] / 1e6:.1f} MB"
    return text, ok


def report(work: str, out: str) -> None:
    work = Path(work)
    refs = json.loads((work / "references.json").read_text())["models"]
    results = {c: json.loads(p.read_text()) for c in CLIENTS if (p := work / f"results-{c}.json").exists()}
    names = {"vllm": "vLLM", "llamacpp": "llama.cpp (minigpt export)", "lmeval": "lm-eval (HF)"}
    rows, passed = [], {}
    for model in refs:
        cells = [_cell(c, results.get(c, {}).get("models", {}).get(model)) for c in CLIENTS]
        passed[model] = {c: ok for c, (_, ok) in zip(CLIENTS, cells)}
        rows.append(f"| {model} | " + " | ".join(("✓ " if ok else "✗ ") + text for text, ok in cells) + " |")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    versions = {c: r["versions"] for c, r in results.items()}
    all_pass = all(all(v.values()) for v in passed.values())
    lines = [f"# Consumers check ({when}): {'all pass' if all_pass else 'NOT all pass'}", "",
             "`bash bench/consumers.sh` (clients in their own virtual environments, installed from the package index).",
             f"Versions: {json.dumps(versions)}.", "",
             "| model | " + " | ".join(names[c] for c in CLIENTS) + " |", "|---|---|---|---|", *rows, "",
             "`minigpt export` (written in minigpt's environment): " + "; ".join(
                 f"{m}: Q8_0 {r['gguf_bytes']['q8_0'] / 1e6:.1f} MB" if "gguf_bytes" in r else f"{m}: {r['gguf_refusal']}"
                 for m, r in refs.items()) + ".", ""]
    Path(f"{out}.md").write_text("\n".join(lines))
    Path(f"{out}.json").write_text(json.dumps({"when": when, "all_pass": all_pass, "passed": passed,
                                               "results": results, "references": refs}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    {"prepare": lambda a: prepare(*a), "report": lambda a: report(*a)}[sys.argv[1]](sys.argv[2:])
