"""Multiple-choice scoring (cached question, length normalisation) and cloze sets from held-out text."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from minigpt import MiniGPTError
from minigpt.cli import main
from minigpt.tools.mcq import accuracy, build_cloze, choice_logprobs, load_questions, save_questions


def _full_logprob(model, tokenizer, question: str, choice: str) -> float:
    """Log-likelihood of ``choice`` after ``question`` from one plain forward of the joined tokens."""
    a = tokenizer(question, add_special_tokens=False)["input_ids"]
    b = tokenizer(choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([a + b])
    with torch.inference_mode():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    return float(logp[len(a) - 1:].gather(1, ids[0, len(a):, None]).sum())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "phi"])
def test_choice_logprobs_equal_one_forward_per_choice(arch, tiny_tokenizer):
    model = tiny_model(arch)
    question, choices = "def f(x):\n    return", [" x + 1", " None  # nothing", "\n\nclass A:\n    pass"]
    scored = choice_logprobs(model, tiny_tokenizer, question, choices)
    for s, c in zip(scored, choices):
        assert s["logprob"] == pytest.approx(_full_logprob(model, tiny_tokenizer, question, c), abs=1e-4)
        assert s["tokens"] == len(tiny_tokenizer(c)["input_ids"]) and s["bytes"] == len(c.encode())


def test_accuracy_uses_the_chosen_normalisation(tiny_tokenizer):
    model = tiny_model("llama")
    q = {"question": "import os\n", "choices": ["import sys", "x", "for i in range(10):\n    print(i)"]}
    scored = choice_logprobs(model, tiny_tokenizer, q["question"], q["choices"])
    for norm, key in (("none", None), ("tokens", "tokens"), ("bytes", "bytes")):
        values = [s["logprob"] / (s[key] if key else 1) for s in scored]
        best = values.index(max(values))
        right = accuracy(model, tiny_tokenizer, [{**q, "answer": best}], normalise=norm)
        wrong = accuracy(model, tiny_tokenizer, [{**q, "answer": (best + 1) % 3}], normalise=norm)
        assert right["accuracy"] == 1.0 and wrong["accuracy"] == 0.0 and right["predictions"] == [best]
    with pytest.raises(MiniGPTError, match="normalise"):
        accuracy(model, tiny_tokenizer, [{**q, "answer": 0}], normalise="chars")


def test_load_questions_accepts_index_or_text_and_names_bad_lines(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "1+1=", "choices": ["2", "3"], "answer": 0}\n\n'
                    '{"question": "2+2=", "choices": ["3", "4"], "answer": "4"}\n')
    assert [q["answer"] for q in load_questions(path)] == [0, 1]
    path.write_text('{"question": "1+1=", "choices": ["2", "3"], "answer": 0}\n{"question": "x", "choices": ["a"]}\n')
    with pytest.raises(MiniGPTError, match=r"q.jsonl:2"):
        load_questions(path)
    path.write_text('{"question": "1+1=", "choices": ["2", "3"], "answer": 5}\n')
    with pytest.raises(MiniGPTError, match="answer"):
        load_questions(path)


def test_cloze_sets_are_real_continuations_with_foreign_distractors(corpus_dir):
    docs = {p.name: p.read_text() for p in sorted(corpus_dir.iterdir())}
    questions = build_cloze([str(corpus_dir)], 12, choices=4, per_document=3, seed=1)
    assert questions == build_cloze([str(corpus_dir)], 12, choices=4, per_document=3, seed=1)  # reproducible
    assert len({q["answer"] for q in questions}) > 1  # the right choice is not always in one place
    for q in questions:
        right = q["choices"][q["answer"]]
        source = [t for t in docs.values() if q["question"] + right in t]
        assert source, "the question and its answer are not a passage of a document"
        assert len(set(q["choices"])) == 4 and len(right) >= 30
        for i, c in enumerate(q["choices"]):
            if i != q["answer"]:
                assert any(c in t for t in docs.values() if t is not source[0]), "distractor not from another doc"
    with pytest.raises(MiniGPTError, match="usable documents"):
        build_cloze([str(corpus_dir / "heapq.py.txt")], 5)


def test_cli_builds_and_scores(tiny_tokenizer, corpus_dir, tmp_path, capsys):
    src = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    questions = tmp_path / "q.jsonl"
    assert main(["mcq", "--model", str(src), "--build-from", str(corpus_dir), "--count", "6",
                 "--questions", str(questions), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"] == 6 and 0 <= report["correct"] <= 6 and len(load_questions(questions)) == 6
    save_questions(load_questions(questions)[:2], questions)
    assert main(["mcq", "--model", str(src), "--questions", str(questions)]) == 0
    assert "of 2 questions" in capsys.readouterr().out
