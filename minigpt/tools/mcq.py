"""Multiple-choice accuracy by log-likelihood, and cloze question sets built from held-out domain text.

A question is ``{"question": str, "choices": [str, ...], "answer": int}`` (``answer`` may also be the text of
the right choice). Each choice is scored by the log-likelihood of its tokens after the question's tokens,
``Σ log p(choice_t | question, choice_<t)``, optionally length-normalised: ``tokens`` divides by the choice's
token count (default), ``bytes`` by its UTF-8 bytes, ``none`` keeps the sum. The highest score is the answer.

Cloze sets (no dataset hub needed): the question is a real passage of a held-out document (up to
``context_chars`` of whole lines), the right choice its true continuation (the following lines, at least
``min_chars`` with ``min_alnum`` letters or digits), and the distractors continuations drawn at the same kind
of position from *other* documents of the same corpus, picked closest in length to the true one.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from minigpt.errors import MiniGPTError
from minigpt.pipeline.data import iter_texts, resolve_files

NORMALISATIONS = ("tokens", "bytes", "none")


def load_questions(path: str | os.PathLike) -> list[dict]:
    """Read JSON lines of questions; ``answer`` as an index or the right choice's text; one-line errors."""
    questions = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise MiniGPTError(f"cannot read questions {path}: {err.strerror}") from err
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
            choices, answer = [str(c) for c in q["choices"]], q["answer"]
            answer = choices.index(answer) if isinstance(answer, str) else int(answer)
            if len(choices) < 2 or not 0 <= answer < len(choices):
                raise ValueError("needs two or more choices and an answer among them")
            questions.append({**q, "question": str(q["question"]), "choices": choices, "answer": answer})
        except (ValueError, KeyError, TypeError) as err:
            raise MiniGPTError(f"{path}:{n}: not a question ({type(err).__name__}: {err})") from err
    if not questions:
        raise MiniGPTError(f"{path} holds no questions")
    return questions


def save_questions(questions: list[dict], path: str | os.PathLike) -> None:
    from minigpt.io import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions))


@torch.inference_mode()
def choice_logprobs(model, tokenizer, question: str, choices: list[str], max_len: int = 512) -> list[dict]:
    """Per choice: ``logprob`` (sum over its tokens given the question), ``tokens`` and ``bytes``.

    The question runs once; its KV cache is repeated for the right-padded batch of choices ``(C, L)``. The
    question is cut from the left so that question + choice fits ``max_len`` tokens.
    """
    ctx = tokenizer(question, add_special_tokens=False)["input_ids"]
    conts = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    if not all(conts):
        raise MiniGPTError(f"a choice of {question[:40]!r}... has no tokens")
    longest = max(len(c) for c in conts)
    ctx = ctx[max(0, len(ctx) - max(1, max_len - longest)):] or [tokenizer.eos_token_id or 0]
    device = model.get_input_embeddings().weight.device
    first = model(input_ids=torch.tensor([ctx], device=device), use_cache=True)
    cache = first.past_key_values
    cache.batch_repeat_interleave(len(conts))
    ids = torch.full((len(conts), longest), tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros(len(conts), len(ctx) + longest, dtype=torch.long)
    mask[:, : len(ctx)] = 1
    for i, c in enumerate(conts):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, len(ctx): len(ctx) + len(c)] = 1
    rest = model(input_ids=ids.to(device), attention_mask=mask.to(device), past_key_values=cache, use_cache=True)
    # logits predicting choice token t: the question's last position for t = 0, choice position t - 1 after
    logits = torch.cat([first.logits[:, -1:].expand(len(conts), -1, -1), rest.logits[:, :-1]], dim=1).float()
    logp = torch.log_softmax(logits, dim=-1).gather(2, ids[:, :, None].to(device))[..., 0].cpu()
    return [{"logprob": float(logp[i, : len(c)].sum()), "tokens": len(c), "bytes": len(text.encode("utf-8"))}
            for i, (c, text) in enumerate(zip(conts, choices))]


def accuracy(model, tokenizer, questions: list[dict], *, normalise: str = "tokens", max_len: int = 512,
             progress: bool = False) -> dict:
    """Share of questions whose right choice scores highest; ``predictions`` holds each chosen index."""
    from tqdm.auto import tqdm

    if normalise not in NORMALISATIONS:
        raise MiniGPTError(f"normalise must be one of {', '.join(NORMALISATIONS)}, got {normalise!r}")
    predictions = []
    for q in tqdm(questions, desc="multiple choice", unit="q", disable=not progress):
        scored = choice_logprobs(model, tokenizer, q["question"], q["choices"], max_len)
        values = [s["logprob"] / (1 if normalise == "none" else s[normalise]) for s in scored]
        predictions.append(max(range(len(values)), key=values.__getitem__))
    correct = sum(p == q["answer"] for p, q in zip(predictions, questions))
    return {"accuracy": correct / len(questions), "correct": correct, "total": len(questions),
            "normalise": normalise, "predictions": predictions}


def _passages(text: str, context_chars: int, min_chars: int, min_alnum: int, max_lines: int):
    """Every (prefix, continuation) split of ``text`` at a line start, as (start line, prefix, continuation)."""
    lines = text.split("\n")
    for i in range(1, len(lines)):
        cont = []
        for line in lines[i: i + max_lines]:
            cont.append(line)
            if len("\n".join(cont)) >= min_chars:
                break
        continuation = "\n".join(cont)
        if len(continuation) < min_chars or sum(ch.isalnum() for ch in continuation) < min_alnum:
            continue
        prefix_lines = []
        for line in reversed(lines[:i]):
            if len(line) + 1 + sum(len(p) + 1 for p in prefix_lines) > context_chars:
                break
            prefix_lines.insert(0, line)
        prefix = "\n".join(prefix_lines) + "\n"
        if sum(ch.isalnum() for ch in prefix) >= min_alnum:
            yield i, prefix, continuation


def build_cloze(data, n: int = 100, *, choices: int = 4, context_chars: int = 400, min_chars: int = 30,
                min_alnum: int = 15, max_lines: int = 3, per_document: int = 2, seed: int = 0) -> list[dict]:
    """``n`` cloze questions from the documents of ``data`` (see the module doc); seeded, reproducible.

    Each record also has ``document`` (the source's index in file order) and ``line`` (where the answer starts).
    """
    if choices < 2 or n < 1:
        raise MiniGPTError(f"a cloze set needs n ≥ 1 and choices ≥ 2 (got {n}, {choices})")
    rng = random.Random(seed)
    candidates: list[tuple[int, int, str, str]] = []  # (document, line, prefix, continuation)
    for doc, text in enumerate(iter_texts(resolve_files(data, default="stdlib-heldout"), seed=None)):
        found = list(_passages(text, context_chars, min_chars, min_alnum, max_lines))
        for line, prefix, cont in rng.sample(found, min(per_document, len(found))):
            candidates.append((doc, line, prefix, cont))
    documents = {c[0] for c in candidates}
    if len(documents) < choices:
        raise MiniGPTError(f"corpus {data} has {len(documents)} usable documents; a cloze set with {choices} "
                           "choices needs distractors from at least that many")
    questions = []
    for doc, line, prefix, cont in rng.sample(candidates, len(candidates)):
        others = [c[3] for c in candidates if c[0] != doc and c[3].strip() != cont.strip()]
        pool = rng.sample(others, min(len(others), 8 * choices))
        distractors = sorted(set(pool), key=lambda d: (abs(len(d) - len(cont)), d))[: choices - 1]
        if len(distractors) < choices - 1:
            continue
        options = [cont, *distractors]
        rng.shuffle(options)
        questions.append({"question": prefix, "choices": options, "answer": options.index(cont),
                          "document": doc, "line": line})
        if len(questions) == n:
            break
    if len(questions) < n:
        raise MiniGPTError(f"corpus {data} yields only {len(questions)} cloze questions, {n} asked")
    return questions
