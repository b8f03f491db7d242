"""Quantisation-friendly default widths, lm-eval task files and the optional clients' up-front refusals."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from minigpt.cli import main
from minigpt.pipeline.planning import MLPPolicy, auto_multiple, plan_from_scores
from minigpt.tools.harness import cloze_task_yaml, write_cloze_task


def test_auto_multiple_keeps_widths_whole_quantisation_blocks():
    scores = [torch.rand(1536, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(3)]
    plan = plan_from_scores(scores, MLPPolicy(mlp=0.2, multiple="auto"))
    assert plan.kept_widths == [1248] * 3  # 1229 rounded up to 39 blocks of 32
    assert plan.removed_fraction == pytest.approx(288 / 1536)
    per_layer = plan_from_scores(scores, MLPPolicy(threshold=0.5, multiple="auto"))
    assert all(w % 32 == 0 for w in per_layer.kept_widths)
    assert auto_multiple([1536, 1024]) == 32 and auto_multiple([48, 48]) == 1  # unaligned models keep exact widths
    # hidden channels (kept counts already multiples of the head count): the same rule on lcm(heads, 32)
    assert auto_multiple([4096], step=32) == 32 and auto_multiple([4096], step=48) == 32
    assert auto_multiple([576], step=9) == 1 and auto_multiple([2048], step=9) == 1  # 288 > 576/8, 2048/8
    assert plan_from_scores([s[:48] for s in scores], MLPPolicy(mlp=0.25, multiple="auto")).kept_widths == [36] * 3


def test_cli_multiple_option_is_checked(capsys):
    """A word other than auto is refused by the parser; a number's range by the options check (test_bad_input)."""
    with pytest.raises(SystemExit):
        main(["prune", "--multiple", "half", "--out", "x"])
    assert "must be 'auto' or a positive integer" in capsys.readouterr().err


def test_cloze_task_file(tmp_path):
    questions = tmp_path / "stdlib cloze.jsonl"
    questions.write_text('{"question": "a", "choices": ["b", "c"], "answer": 0}\n')
    path = write_cloze_task(questions, tmp_path / "tasks")
    assert path.name == "minigpt_stdlib_cloze.yaml"
    text = path.read_text()
    assert text == cloze_task_yaml("minigpt_stdlib_cloze", questions)
    assert f"test: {questions.resolve()}" in text and 'target_delimiter: ""' in text
    assert "output_type: multiple_choice" in text and "doc_to_choice: choices" in text


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm-eval is installed")
def test_lm_eval_missing_is_one_line_before_loading(capsys):
    assert main(["eval", "--model", "/nonexistent", "--lm-eval-tasks", "x"]) == 2
    assert capsys.readouterr().err == ("minigpt: error: lm-eval is not installed: pip install 'lm-eval[hf]' "
                                       "(or minigpt[lm-eval])\n")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_missing_is_one_line_before_loading(capsys):
    assert main(["bench", "--model", "tiny-llama", "--engine", "vllm"]) == 2
    assert "--engine vllm needs vLLM" in capsys.readouterr().err


def test_lm_eval_runs_the_cloze_task_on_the_in_memory_model(tiny_tokenizer, tmp_path):
    """lm-eval's acc on minigpt's task equals the summed-log-likelihood accuracy computed here."""
    pytest.importorskip("lm_eval")
    from conftest import tiny_model

    from minigpt.tools.harness import run_tasks
    from minigpt.tools.mcq import accuracy

    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(f'{{"question": "def f(x):\\n    return x {op}", "choices": [" 1\\n", " y\\n", '
                                 f'" (x)\\n"], "answer": {i % 3}}}\n' for i, op in enumerate("+-*/%")))
    write_cloze_task(questions, tmp_path / "tasks", "minigpt_t")
    model = tiny_model("llama")
    result = run_tasks(model, tiny_tokenizer, ["minigpt_t"], include_path=tmp_path / "tasks")
    from minigpt.tools.mcq import load_questions

    ours = accuracy(model, tiny_tokenizer, load_questions(questions), normalise="none")
    assert result["minigpt_t"]["acc,none"] == pytest.approx(ours["accuracy"])
