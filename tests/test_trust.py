"""The trust rule: a model directory's own Python code runs only when it is minigpt's modeling file, or when the
user passes ``--trust-remote-code``; every command that loads a model refuses before importing anything."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model
from scale_helpers import save_model

import minigpt
from minigpt.cli import main
from minigpt.errors import MiniGPTError
from minigpt.models import adapters

EVIL = '''
import pathlib
pathlib.Path({marker!r}).write_text("imported")
from transformers import LlamaForCausalLM


class EvilForCausalLM(LlamaForCausalLM):  # a working model, so that the trusted load succeeds
    pass
'''


@pytest.fixture
def evil_dir(tmp_path, tiny_tokenizer):
    """A tiny llama whose ``auto_map`` names ``evil.py``, a module that writes ``marker`` when imported."""
    path = save_model(tiny_model("llama"), tiny_tokenizer, tmp_path / "evil")
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (path / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "marker"
    (path / "evil.py").write_text(EVIL.format(marker=str(marker)))
    return path, marker


def _commands(model, corpus, tmp_path) -> dict[str, list]:
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "def f(x):", "choices": [" return", " pass"], "answer": 0}) + "\n")
    cal = ["--data", corpus, "--seq-len", "32", "--max-tokens", "64", "--no-progress"]
    return {
        "eval": ["eval", "--model", model, "--data", corpus, "--eval-tokens", "64", "--eval-seq-len", "32"],
        "calibrate": ["calibrate", "--model", model, *cal, "--out", tmp_path / "s.safetensors"],
        "prune": ["prune", "--model", model, *cal, "--no-eval", "--out", tmp_path / "pruned"],
        "bench": ["bench", "--model", model, "--prompt-lengths", "8", "--batch-sizes", "1", "--decode-tokens", "2",
                  "--repeats", "1", "--warmup", "0"],
        "finetune": ["finetune", "--model", model, "--data", corpus, "--eval-data", corpus, "--target", "1.5",
                     "--max-steps", "1", "--seq-len", "32", "--no-progress", "--out", tmp_path / "ft"],
        "mcq": ["mcq", "--model", model, "--questions", questions, "--no-progress"],
    }


@pytest.mark.parametrize("command", ["eval", "calibrate", "prune", "bench", "finetune", "mcq"])
def test_every_command_refuses_foreign_code(command, evil_dir, corpus_dir, tmp_path, capsys):
    path, marker = evil_dir
    argv = _commands(path, corpus_dir, tmp_path)[command]
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path / "evil.py") in err[0] and "--trust-remote-code" in err[0], err
    assert not marker.exists()


def test_out_of_core_refuses_foreign_code(evil_dir, corpus_dir, tiny_tokenizer, tmp_path, capsys):
    """``prune --out-of-core`` builds the model from its config on the meta device: the same rule applies."""
    path, marker = evil_dir
    stats = tmp_path / "stats.safetensors"
    clean = save_model(tiny_model("llama"), tiny_tokenizer, tmp_path / "clean")  # same weights, no auto_map
    assert main(["calibrate", "--model", str(clean), "--data", str(corpus_dir), "--seq-len", "32", "--max-tokens",
                 "64", "--no-progress", "--out", str(stats)]) == 0
    assert main(["prune", "--model", str(path), "--stats", str(stats), "--out-of-core", "--out",
                 str(tmp_path / "pruned")]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err and not marker.exists()


def test_the_flag_runs_it(evil_dir, corpus_dir, tmp_path):
    """With ``--trust-remote-code`` (``trust_remote_code=True``) the module is imported: the refusal is real."""
    path, marker = evil_dir
    with pytest.raises(MiniGPTError, match="evil.py"):
        minigpt.load_model(path)
    assert not marker.exists()
    argv = _commands(path, corpus_dir, tmp_path)["eval"]
    assert main([str(a) for a in [*argv, "--trust-remote-code"]]) == 0
    assert marker.read_text() == "imported"


def _nonuniform(tiny_tokenizer, tmp_path):
    model = tiny_model("llama")
    plan = minigpt.PruningPlan(kept=[list(range(40)), list(range(0, 40, 2))], widths=[48, 48],
                               fingerprint=minigpt.pipeline.stats.fingerprint(model, tiny_tokenizer))
    model, _ = minigpt.prune(model, pruning_plan=plan)
    return model, minigpt.save_pruned(model, tiny_tokenizer, tmp_path / "nonuniform", plan=plan)


def test_minigpts_own_code_loads_without_the_flag(tiny_tokenizer, corpus_dir, tmp_path):
    _, out = _nonuniform(tiny_tokenizer, tmp_path)
    loaded, _ = minigpt.load_model(out)
    assert adapters.widths(loaded) == [40, 20]
    assert main(["eval", "--model", str(out), "--data", str(corpus_dir), "--eval-tokens", "64",
                 "--eval-seq-len", "32", "--no-progress"]) == 0


def test_a_changed_byte_in_minigpts_own_file_is_refused(tiny_tokenizer, tmp_path):
    _, out = _nonuniform(tiny_tokenizer, tmp_path)
    code = out / "modeling_minigpt.py"
    code.write_text(code.read_text() + "\n")
    with pytest.raises(MiniGPTError, match=f"{code}.*--trust-remote-code"):
        minigpt.load_model(out)
    assert adapters.widths(minigpt.load_model(out, trust_remote_code=True)[0]) == [40, 20]
