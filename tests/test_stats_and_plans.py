"""CalibrationStats (streaming = merged halves, save/load, refusal) and plan policies."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import minigpt
from minigpt.pipeline.calibration import run_batches
from minigpt.pipeline.data import Batches, resolve_files
from minigpt.pipeline.planning import MLPPolicy, plan_from_scores
from minigpt.pipeline.stats import CalibrationStats, fingerprint


def _assert_stats_equal(a: CalibrationStats, b: CalibrationStats) -> None:
    assert a.tokens == b.tokens
    assert torch.equal(a.token_counts, b.token_counts)
    for name in ("nonzero", "max_abs"):
        for x, y in zip(getattr(a, name), getattr(b, name)):
            assert torch.equal(x, y), name
    for name in ("sum_abs", "sum_sq"):
        for x, y in zip(getattr(a, name), getattr(b, name)):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=0), name


def test_two_halves_merged_equal_one_pass(corpus_dir, tiny_tokenizer):
    model = tiny_model("llama")
    files = resolve_files([str(corpus_dir)])
    fp = fingerprint(model, tiny_tokenizer)
    whole = run_batches(model, Batches(tiny_tokenizer, files, seq_len=32, batch_size=4, max_tokens=512),
                        CalibrationStats.empty(fp), progress=False)
    first = run_batches(model, Batches(tiny_tokenizer, files, seq_len=32, batch_size=4, max_tokens=256),
                        CalibrationStats.empty(fp), progress=False)
    second = run_batches(model, Batches(tiny_tokenizer, files, seq_len=32, batch_size=4, max_tokens=512,
                                        skip_sequences=8), CalibrationStats.empty(fp), progress=False)
    _assert_stats_equal(first.merge(second), whole)


def test_save_load_round_trip_and_refusals(corpus_dir, tiny_tokenizer, tmp_path):
    model = tiny_model("gpt2")
    stats = minigpt.calibrate(model, tiny_tokenizer, [str(corpus_dir)], max_tokens=128, seq_len=32, progress=False)
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    loaded = CalibrationStats.load(path)
    _assert_stats_equal(loaded, stats)
    assert loaded.fingerprint == stats.fingerprint and loaded.meta["corpus"]["seq_len"] == 32
    assert [p.name for p in tmp_path.iterdir()] == ["stats.safetensors"]  # no temporary left behind

    other = tiny_model("gpt2", tied=True)
    with pytest.raises(minigpt.MiniGPTError, match="collected on another model"):
        minigpt.prune(other, tiny_tokenizer, stats=loaded, ratio=0.2)
    other_stats = minigpt.calibrate(tiny_model("llama"), tiny_tokenizer, [str(corpus_dir)], max_tokens=64,
                                    seq_len=32, progress=False)
    with pytest.raises(minigpt.MiniGPTError, match="another model"):
        stats.merge(other_stats)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(minigpt.MiniGPTError, match="corrupted"):
        CalibrationStats.load(truncated)


def _scores():
    return [torch.tensor([4.0, 0.001, 2.0, 0.5, 0.0, 1.0], dtype=torch.float64),
            torch.tensor([0.2, 0.1, 0.05, 0.4], dtype=torch.float64)]


def test_threshold_is_on_max_normalised_mean():
    plan = plan_from_scores(_scores(), MLPPolicy(threshold=0.2))
    assert plan.kept == [[0, 2, 5], [0, 1, 3]]  # normalised: [1, .00025, .5, .125, 0, .25], [.5, .25, .125, 1]


def test_ratio_uniform_global_multiple_and_floor():
    assert plan_from_scores(_scores(), MLPPolicy(mlp=0.5)).kept == [[0, 2, 5], [0, 3]]
    glob = plan_from_scores(_scores(), MLPPolicy(mlp=0.5, scope="global"))  # the 5 lowest of all normalised scores go
    assert glob.kept == [[0, 2], [0, 1, 3]] and glob.removed_fraction == 0.5
    assert plan_from_scores(_scores(), MLPPolicy(mlp=0.9, multiple=4)).kept_widths == [4, 4]
    assert plan_from_scores(_scores(), MLPPolicy(threshold=1.0)).kept_widths == [1, 1]  # never empty
    assert plan_from_scores(_scores(), MLPPolicy(threshold=1.0, min_keep=0.5)).kept_widths == [3, 2]


def test_plan_json_round_trip(tmp_path):
    plan = plan_from_scores(_scores(), MLPPolicy(mlp=0.5), record={"metric": "l1"})
    plan.save(tmp_path / "plan.json")
    loaded = minigpt.PruningPlan.load(tmp_path / "plan.json")
    assert loaded.kept == plan.kept and loaded.widths == plan.widths and loaded.policy == {"metric": "l1"}


@pytest.mark.parametrize("kwargs", [{"ratio": 1.0}, {"ratio": -0.1}, {"threshold": 1.5}, {},
                                    {"ratio": 0.2, "threshold": 0.1}, {"ratio": 0.2, "multiple": 0}])
def test_bad_policy_refused(kwargs):
    with pytest.raises(minigpt.MiniGPTError):  # by the policy's own checks, or (neither amount) when planning
        plan_from_scores(_scores(), MLPPolicy.of(None, kwargs))


def test_plan_and_prune_take_a_policy_or_its_keywords():
    model = tiny_model("llama")
    by_keywords = minigpt.plan(None, "maw", model=model, ratio=0.5, scope="global", multiple=4)
    by_policy = minigpt.plan(None, "maw", model=model, policy=minigpt.Policy(mlp=0.5, scope="global", multiple=4))
    assert by_keywords.kept == by_policy.kept and by_keywords.policy == by_policy.policy
    assert by_keywords.policy == {"metric": "maw", "threshold": None, "ratio": 0.5, "scope": "global", "multiple": 4,
                                  "min_keep": 0.0, "reverse": False, "tokens": 0}  # what plans have always recorded
    assert minigpt.prune(tiny_model("llama"), metric="maw", policy=MLPPolicy(mlp=0.5, scope="global",
                                                                              multiple=4))[1].kept == by_policy.kept
    with pytest.raises(minigpt.MiniGPTError, match="not both"):
        minigpt.plan(None, "maw", model=model, policy=MLPPolicy(mlp=0.5), ratio=0.5)
    with pytest.raises(TypeError, match="ratoi"):
        minigpt.prune(model, metric="maw", ratoi=0.5)
    with pytest.raises(minigpt.MiniGPTError, match="ratio must be in"):
        minigpt.Policy(mlp=1.0, heads=0.5)
