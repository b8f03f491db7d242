"""Importance metrics (selectivity, maw, maw-minmax, wanda, random) and reverse pruning, on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

import minigpt
from minigpt.cli import main
from minigpt.models import adapters
from minigpt.pipeline import importance
from minigpt.pipeline.planning import MLPPolicy, plan_from_scores
from minigpt.pipeline.stats import CalibrationStats, fingerprint


def _stats(model, mean_abs: list[list[float]], tokens: int = 10) -> CalibrationStats:
    stats = CalibrationStats.empty(fingerprint(model))
    stats.tokens = tokens
    for layer, values in enumerate(mean_abs):
        stats.sum_abs[layer] = torch.tensor(values, dtype=torch.float64) * tokens
        stats.sum_sq[layer] = (torch.tensor(values, dtype=torch.float64) ** 2) * tokens
    return stats


def test_selectivity_formula_and_ranking():
    model = tiny_model("llama")
    n = adapters.widths(model)[0]
    domain = [[1.0, 1.0, 0.1, 0.0] + [0.5] * (n - 4)] * 2
    ref = [[1.0, 0.0, 0.0, 0.0] + [0.5] * (n - 4)] * 2
    sel = importance.selectivity(_stats(model, domain), _stats(model, ref))
    expected = torch.tensor([0.5, 1.0, 0.1, 0.0] + [0.25] * (n - 4), dtype=torch.float64)
    torch.testing.assert_close(sel[0], expected, rtol=1e-9, atol=1e-9)
    # neuron 1 (domain only) outranks neuron 0 (as active on the domain, shared with the reference)
    kept = minigpt.plan(_stats(model, domain), "selectivity", reference=_stats(model, ref), ratio=1 - 2 / n).kept[0]
    assert kept == [0, 1]
    with pytest.raises(minigpt.MiniGPTError, match="reference"):
        minigpt.plan(_stats(model, domain), "selectivity", ratio=0.5)
    with pytest.raises(minigpt.MiniGPTError, match="another model"):
        importance.selectivity(_stats(model, domain), CalibrationStats.empty(fingerprint(tiny_model("qwen2"))))


def test_maw_and_minmax_on_known_weights():
    model = tiny_model("llama")
    mlp = adapters.mlps(model)[0]
    with torch.no_grad():
        mlp.gate_proj.weight.zero_()
        mlp.up_proj.weight.zero_()
        mlp.gate_proj.weight[0, :2] = torch.tensor([3.0, -1.0])  # max|w| 3, max+|min| 3+1
        mlp.up_proj.weight[0, :2] = torch.tensor([-2.0, -0.5])  # max|w| 2, max+|min| -0+2 (max is 0)
        mlp.gate_proj.weight[1, 0] = -4.0  # max|w| 4, max+|min| 0+4
    maw = importance.scores("maw", model=model)
    minmax = importance.scores("maw-minmax", model=model)
    assert maw[0][:3].tolist() == [5.0, 4.0, 0.0]
    assert minmax[0][:3].tolist() == [6.0, 4.0, 0.0]
    plan = minigpt.plan(None, "maw", model=model, ratio=1 - 2 / mlp.gate_proj.out_features)
    assert plan.kept[0] == [0, 1] and plan.policy["metric"] == "maw"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_wanda_is_rms_activation_times_output_column_l1(arch, corpus_dir, tiny_tokenizer):
    model = tiny_model(arch)
    stats = minigpt.calibrate(model, tiny_tokenizer, [str(corpus_dir)], max_tokens=128, seq_len=32, progress=False)
    layout = adapters.get_layout(model)
    for layer, mlp in enumerate(adapters.mlps(model)):
        w = getattr(mlp, layout.cols[0]).weight.detach().double()
        column_l1 = w.abs().sum(dim=1) if layout.conv1d else w.abs().sum(dim=0)  # Conv1D stores (in, out)
        expected = (stats.sum_sq[layer] / stats.tokens).sqrt() * column_l1
        torch.testing.assert_close(importance.wanda(stats, model)[layer], expected)


def test_random_is_seeded_and_reverse_removes_the_top():
    model = tiny_model("llama")
    a, b = (minigpt.plan(None, "random", model=model, ratio=0.5, seed=s).kept for s in (1, 1))
    c = minigpt.plan(None, "random", model=model, ratio=0.5, seed=2).kept
    assert a == b and a != c and [len(k) for k in a] == [24, 24]
    scores = [torch.tensor([4.0, 0.001, 2.0, 0.5, 0.0, 1.0], dtype=torch.float64)]
    assert plan_from_scores(scores, MLPPolicy(mlp=0.5, reverse=True)).kept == [[1, 3, 4]]
    assert plan_from_scores(scores, MLPPolicy(mlp=0.5, reverse=True, scope="global")).kept == [[1, 3, 4]]
    with pytest.raises(minigpt.MiniGPTError, match="reverse"):
        MLPPolicy(threshold=0.1, reverse=True)


def _logit_change(model, pruned, ids) -> float:
    with torch.inference_mode():
        return float((model(ids).logits - pruned(ids).logits).pow(2).mean())


def test_l1_pruning_perturbs_less_than_reverse_and_random(corpus_dir, tiny_tokenizer):
    model = tiny_model("llama")
    stats = minigpt.calibrate(model, tiny_tokenizer, [str(corpus_dir)], max_tokens=512, seq_len=64, progress=False)
    ids = torch.tensor([tiny_tokenizer((corpus_dir / "heapq.py.txt").read_text()[:2000])["input_ids"][:128]])
    change = {}
    for name, kwargs in {"l1": {}, "reverse": {"reverse": True}, "random": {"metric": "random"}}.items():
        pruned, _ = minigpt.prune(tiny_model("llama"), tiny_tokenizer, stats=stats, ratio=0.3,
                                  **{"metric": "l1", **kwargs})
        change[name] = _logit_change(model, pruned, ids)
    assert change["l1"] < change["random"] < change["reverse"], change


def test_pipeline_selectivity_calibrates_reference_and_maw_needs_no_data(corpus_dir, tiny_tokenizer):
    model, plan = minigpt.prune(tiny_model("llama"), tiny_tokenizer, data=[str(corpus_dir / "heapq.py.txt")],
                                reference_data=[str(corpus_dir / "textwrap.py.txt")], metric="selectivity",
                                ratio=0.25, calibration={"max_tokens": 128, "seq_len": 32, "progress": False})
    assert plan.kept_widths == [36, 36] and plan.policy["reference_tokens"] == 128
    model, plan = minigpt.prune(tiny_model("llama"), metric="maw-minmax", ratio=0.5)
    assert adapters.widths(model) == [24, 24] and plan.policy["tokens"] == 0


def test_cli_prune_methods(corpus_dir, tiny_tokenizer, tmp_path, capsys):
    src = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    out = tmp_path / "maw"
    assert main(["prune", "--model", str(src), "--metric", "maw", "--ratio", "0.25", "--out", str(out),
                 "--no-eval", "--no-progress"]) == 0
    assert json.loads((out / "minigpt_plan.json").read_text())["policy"]["metric"] == "maw"
    code = main(["prune", "--model", str(src), "--metric", "selectivity", "--data", str(corpus_dir), "--seq-len",
                 "32", "--max-tokens", "64", "--ratio", "0.25", "--out", str(tmp_path / "sel"), "--no-eval",
                 "--no-progress"])
    assert code == 2 and "reference" in capsys.readouterr().err
    code = main(["prune", "--model", str(src), "--metric", "selectivity", "--reverse", "--data", str(corpus_dir),
                 "--reference-data", str(corpus_dir / "glob.py.txt"), "--seq-len", "32", "--max-tokens", "64",
                 "--ratio", "0.25", "--out", str(tmp_path / "sel"), "--no-eval", "--no-progress"])
    plan = json.loads((tmp_path / "sel" / "minigpt_plan.json").read_text())
    assert code == 0 and plan["policy"]["reverse"] and plan["kept_widths"] == [36, 36]
