"""Mixture-of-experts statistics and pruning on tiny random Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE models."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from minigpt.cli import main
from minigpt.errors import MiniGPTError
from minigpt.pipeline.moe import (
    MoEPlan,
    MoEStats,
    check_expert_ratio,
    collect,
    fingerprint,
    moe_layers,
    moe_parameter_counts,
    moe_report,
    plan_moe,
    prune_moe,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
EXPERTS, WIDTH, SHARED_WIDTH, TOP_K = 8, 32, 64, 2
DEAD_EXPERTS = (5, 7)  # router rows set to zero: logit 0, below the two positive logits of every token
ZERO_NEURONS = (0, 5, 6, 9, 17, 20, 30, 31)  # up rows zeroed in every expert: h = act(gate) · 0 = 0 exactly
NEURON_RATIO = len(ZERO_NEURONS) / WIDTH
SHARED_ZERO = [*range(0, 64, 8), *range(3, 64, 8)]  # the same ratio of the shared expert's neurons


def moe_config(family: str, norm_topk_prob: bool = True, vocab_size: int = 512):
    kwargs = {"vocab_size": vocab_size, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 128, "num_experts": EXPERTS,
              "num_experts_per_tok": TOP_K, "intermediate_size": WIDTH, "bos_token_id": 1, "eos_token_id": 2,
              "pad_token_id": 0}
    if family.startswith("qwen"):
        kwargs.update(moe_intermediate_size=WIDTH, intermediate_size=40, norm_topk_prob=norm_topk_prob)
    if family == "qwen2_moe":
        kwargs["shared_expert_intermediate_size"] = SHARED_WIDTH
    if family == "qwen3_moe":
        kwargs["mlp_only_layers"] = [0]  # a dense layer among the sparse ones stays as it is
    if family == "olmoe":
        kwargs["norm_topk_prob"] = norm_topk_prob
    return AutoConfig.for_model(family, **kwargs)


def moe_model(family: str, norm_topk_prob: bool = True, seed: int = 0, vocab_size: int = 512):
    """A tiny random model whose routers never select ``DEAD_EXPERTS`` and whose experts have ``ZERO_NEURONS``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(moe_config(family, norm_topk_prob, vocab_size)).eval()
    with torch.no_grad():
        for moe in moe_layers(model):
            w = torch.randn(EXPERTS, model.config.hidden_size)
            w[1], w[3] = -w[0], -w[2]  # one of experts 0/1 and one of 2/3 has a positive logit on any input
            w[list(DEAD_EXPERTS)] = 0
            moe.router.weight.copy_(w)
            moe.experts.gate_up_proj.normal_(0, 0.3)
            moe.experts.down_proj.normal_(0, 0.3)
            moe.experts.gate_up_proj[:, [WIDTH + j for j in ZERO_NEURONS]] = 0
            if moe.shared is not None:
                moe.shared.up_proj.weight[SHARED_ZERO] = 0
    return model


def batches(n: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (2, 24), generator=g) for _ in range(n)]


def logits(model, data: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(ids).logits for ids in data])


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


def test_statistics_match_an_independent_recomputation(family):
    model, data = moe_model(family), batches(2)
    seen = []  # the stock forward's expert inputs, captured by a pre-hook on each sparse block's experts
    hooks = [m.experts.register_forward_pre_hook(lambda mod, args, i=i: seen.append((i, args)))
             for i, m in enumerate(moe_layers(model))]
    logits(model, data)
    for h in hooks:
        h.remove()
    stats = collect(model, data)
    assert stats.tokens == 2 * 48 and len(stats.layers) == len(moe_layers(model))
    for i, layer in enumerate(stats.layers):
        experts = moe_layers(model)[i].experts
        routed = torch.zeros(EXPERTS, dtype=torch.long)
        sum_abs = torch.zeros(EXPERTS, WIDTH, dtype=torch.float64)
        nonzero = torch.zeros(EXPERTS, WIDTH, dtype=torch.long)
        for _, (x, index, _weights) in (s for s in seen if s[0] == i):
            routed += torch.bincount(index.flatten(), minlength=EXPERTS)
            for e in range(EXPERTS):
                tok = (index == e).any(1)
                gate, up = (x[tok].double() @ experts.gate_up_proj[e].double().T).chunk(2, dim=-1)
                h = torch.nn.functional.silu(gate) * up
                sum_abs[e] += h.abs().sum(0)
                nonzero[e] += (h != 0).sum(0)
        assert torch.equal(layer["routed"], routed) and int(routed.sum()) == stats.tokens * TOP_K
        assert routed[list(DEAD_EXPERTS)].sum() == 0 and (routed[:4] > 0).all()
        torch.testing.assert_close(layer["sum_abs"], sum_abs, rtol=1e-4, atol=1e-6)
        assert torch.equal(layer["nonzero"], nonzero)
        assert (layer["sum_abs"][:, list(ZERO_NEURONS)] == 0).all()
        torch.testing.assert_close(layer["prob"].sum(), torch.tensor(float(stats.tokens), dtype=torch.float64))
        if getattr(model.config, "norm_topk_prob", True):
            torch.testing.assert_close(layer["weight"].sum(), torch.tensor(float(stats.tokens), dtype=torch.float64))
        if "shared_sum_abs" in layer:
            assert (layer["shared_nonzero"] == stats.tokens).sum() == SHARED_WIDTH - len(SHARED_ZERO)


def test_unrouted_experts_and_zero_neurons_are_removed_exactly(family, tmp_path):
    model, data = moe_model(family), batches()
    before = logits(model, data)
    stats = collect(model, data)
    plan = plan_moe(stats, experts=len(DEAD_EXPERTS) / EXPERTS, criterion="freq", neurons=NEURON_RATIO)
    assert all(set(keep) == set(range(EXPERTS)) - set(DEAD_EXPERTS) for keep in plan.experts)
    assert all(set(n).isdisjoint(ZERO_NEURONS) for layer in plan.neurons for n in layer)
    params = moe_parameter_counts(model)
    prune_moe(model, plan)
    after_params = moe_parameter_counts(model)
    kept = (EXPERTS - len(DEAD_EXPERTS)) * (WIDTH - len(ZERO_NEURONS))
    assert after_params["experts"] == params["experts"] * kept // (EXPERTS * WIDTH)
    torch.testing.assert_close(logits(model, data), before)

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # stock transformers, no minigpt code
    assert reloaded.config.num_experts == EXPERTS - len(DEAD_EXPERTS)
    assert reloaded.config.num_experts_per_tok == TOP_K
    width_key = "moe_intermediate_size" if family.startswith("qwen") else "intermediate_size"
    assert getattr(reloaded.config, width_key) == WIDTH - len(ZERO_NEURONS)
    if family == "qwen2_moe":
        assert reloaded.config.shared_expert_intermediate_size == SHARED_WIDTH - len(SHARED_ZERO)
    torch.testing.assert_close(logits(reloaded, data), before)


def test_without_renormalisation_removed_mass_is_reported(tmp_path):
    model, data = moe_model("qwen2_moe", norm_topk_prob=False), batches()
    before = logits(model, data)
    stats = collect(model, data)
    plan = plan_moe(stats, experts=0.25, criterion="mass")
    assert all(set(keep) == set(range(EXPERTS)) - set(DEAD_EXPERTS) for keep in plan.experts)
    report = moe_report(stats, plan)
    assert not report["norm_topk_prob"]
    for layer in report["layers"]:
        assert layer["kept_routed_share"] == 1.0 and 0 < layer["removed_router_mass"] < 1
    prune_moe(model, plan)
    # The kept experts' weights grow by 1 / (1 - m): the outputs change although no removed expert was selected.
    assert not torch.allclose(logits(model, data), before, atol=1e-4)


def test_stats_merge_and_save(tmp_path):
    model, data = moe_model("qwen2_moe"), batches(4)
    both = collect(model, data)
    first, second = collect(model, data[:2]), collect(model, data[2:])
    merged = first.merge(second)
    assert merged.tokens == both.tokens
    for a, b in zip(merged.layers, both.layers):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-9)
    resumed = collect(model, data[2:], stats=collect(model, data[:2]))  # continuing a run = adding its batches
    assert torch.equal(resumed.layers[0]["routed"], both.layers[0]["routed"])
    merged.save(tmp_path / "moe.safetensors")
    loaded = MoEStats.load(tmp_path / "moe.safetensors")
    assert loaded.fingerprint == merged.fingerprint and loaded.tokens == merged.tokens
    assert all(torch.equal(a[k], b[k]) for a, b in zip(loaded.layers, merged.layers) for k in a)
    with pytest.raises(MiniGPTError, match="another model"):
        collect(moe_model("olmoe"), data[:1], stats=loaded)
    plan = plan_moe(loaded, experts=0.5)
    (tmp_path / "plan.json").write_text(plan.to_json())
    assert MoEPlan.load(tmp_path / "plan.json") == plan


def test_plan_refusals():
    config = moe_config("mixtral")
    for ratio, message in ((1.0, r"\[0, 1\)"), (0.95, "remove every one"), (0.9, "fewer than the 2")):
        with pytest.raises(MiniGPTError, match=message) as err:
            check_expert_ratio(config, ratio)
        assert "\n" not in str(err.value)
    check_expert_ratio(config, 0.75)  # 2 experts left: exactly top-k
    with pytest.raises(MiniGPTError, match="mixture-of-experts"):
        check_expert_ratio(AutoConfig.for_model("llama"), 0.5)
    stats = MoEStats.empty(fingerprint(moe_model("olmoe")))
    with pytest.raises(MiniGPTError, match="fewer than the 2"):
        plan_moe(stats, experts=0.9)
    with pytest.raises(MiniGPTError, match="criterion"):
        plan_moe(stats, experts=0.5, criterion="popularity")


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> Path:
    """A tiny Mixtral with dead experts and a trained byte-level BPE tokenizer, saved as a model directory."""
    from test_vocab import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer()
    path = tmp_path_factory.mktemp("moe") / "tiny-mixtral"
    moe_model("mixtral", vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_prunes_experts_and_saves_a_stock_model(moe_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(moe_dir), "--experts", "0.25", "--expert-neurons", "0.25", "--data",
            str(STDLIB / "argparse.py"), "--max-tokens", "512", "--seq-len", "64", "--eval-data",
            str(STDLIB / "shlex.py"), "--eval-tokens", "256", "--eval-seq-len", "64", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| 1 | [0, 1, 2, 3, 4, 6] | 1.000 |" in printed and "perplexity" in printed
    report = json.loads((out / "minigpt_report.json").read_text())
    assert report["moe"]["tokens"] == 512 and report["params"]["after"]["experts"] < report["params"]["before"]["experts"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_local_experts == 6 and model.config.intermediate_size == 24
    assert MoEStats.load(out / "minigpt_expert_stats.safetensors").tokens == 512
    again = tmp_path / "again"  # the saved statistics plan again without calibrating
    assert main(["prune", "--model", str(moe_dir), "--experts", "0.5", "--expert-stats",
                 str(out / "minigpt_expert_stats.safetensors"), "--no-eval", "--out", str(again)]) == 0
    assert AutoModelForCausalLM.from_pretrained(again).config.num_local_experts == 4
    capsys.readouterr()
    assert main(["eval", "--model", str(again), "--data", str(STDLIB / "shlex.py"), "--eval-tokens", "256",
                 "--eval-seq-len", "64", "--no-progress", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["params"]["mlp"] == report["params"]["before"]["experts"] // 2 + 32 * 4 * 2  # 4 experts, routers


@pytest.mark.parametrize(("extra", "message"), [
    (["--experts", "1.0"], "must be in [0, 1)"),
    (["--experts", "0.9"], "keeps 1 of 8 experts per layer, fewer than the 2"),
    (["--experts", "0.5", "--vocab", "--min-keep", "0.1"], "--vocab, --min-keep cannot be combined"),
    (["--experts", "0.5", "--metric", "wanda"], "not available inside experts"),
    (["--experts", "0.5", "--expert-stats", "/nonexistent/moe.safetensors"], "cannot read expert statistics"),
])
def test_cli_refuses_bad_expert_plans_in_one_line(moe_dir, tmp_path, capsys, extra, message):
    assert main(["prune", "--model", str(moe_dir), *extra, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minigpt: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_cli_refuses_experts_on_a_dense_model(tmp_path, capsys):
    from conftest import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "llama")
    assert main(["prune", "--model", str(tmp_path / "llama"), "--experts", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "need a mixture-of-experts model" in capsys.readouterr().err


@pytest.mark.usefixtures("one_thread")
def test_calibrate_on_two_ranks_equals_one_process(tiny_tokenizer, tmp_path):
    """``minigpt calibrate`` on a MoE model writes expert statistics; under ``torchrun`` each rank takes its shard."""
    from scale_helpers import SEQ_LEN, aligned_corpus, aligned_tokens, run, save_model, torchrun

    model = save_model(moe_model("qwen2_moe", vocab_size=len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "model")
    corpus = aligned_corpus(tiny_tokenizer, tmp_path / "corpus", docs=9)
    args = ("--model", model, "--data", corpus, "--seq-len", SEQ_LEN, "--batch-size", 2, "--max-tokens", 10**9,
            "--no-progress")
    single, dist = tmp_path / "single.safetensors", tmp_path / "dist.safetensors"
    assert main(["calibrate", *map(str, args), "--out", str(single)]) == 0
    done = run(torchrun(2, "calibrate", *args, "--out", dist))
    assert done.returncode == 0, done.stderr
    assert "over 2 ranks" in done.stdout and done.stdout.count("wrote") == 1
    a, b = MoEStats.load(single), MoEStats.load(dist)
    assert a.tokens == b.tokens == aligned_tokens(corpus)
    _assert_same_sums(a, b)



def _assert_same_sums(a: MoEStats, b: MoEStats) -> None:
    """Counts equal exactly, float sums to summation-order rounding, layer by layer."""
    for x, y in zip(a.layers, b.layers):
        for key in x:
            if x[key].dtype == torch.int64:
                assert torch.equal(x[key], y[key]), key
            else:
                torch.testing.assert_close(x[key], y[key], rtol=1e-5, atol=1e-6)

@pytest.mark.usefixtures("one_thread")
def test_killed_calibration_resumes_to_the_uninterrupted_statistics(tiny_tokenizer, corpus_dir, tmp_path):
    from scale_helpers import SEQ_LEN, kill_after_checkpoint, minigpt, save_model

    model = save_model(moe_model("qwen2_moe", vocab_size=len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "model")
    args = ("--model", model, "--data", corpus_dir, "--seq-len", SEQ_LEN, "--batch-size", 1,
            "--max-tokens", 400 * SEQ_LEN, "--no-progress")
    whole, out = tmp_path / "whole.safetensors", tmp_path / "out.safetensors"
    checkpoint = tmp_path / "out.safetensors.ckpt"
    assert main(["calibrate", *map(str, args), "--checkpoint-every", "0", "--out", str(whole)]) == 0
    kill_after_checkpoint(minigpt("calibrate", *args, "--checkpoint-every", SEQ_LEN, "--out", out), checkpoint, out)
    saved = MoEStats.load(checkpoint)
    assert 0 < saved.tokens < 400 * SEQ_LEN
    again = ["calibrate", *map(str, args), "--checkpoint-every", str(SEQ_LEN), "--out", str(out)]
    assert main(again) == 2  # refuses to overwrite an interrupted run's progress
    assert main([*again, "--resume"]) == 0
    a, b = MoEStats.load(out), MoEStats.load(whole)
    assert a.tokens == b.tokens == 400 * SEQ_LEN
    for x, y in zip(a.layers, b.layers):
        assert all(torch.equal(x[k], y[k]) for k in x)  # the same batch sums added in the same order: bit for bit
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out.safetensors", "whole.safetensors"]


@pytest.mark.usefixtures("one_thread")
def test_two_ranks_killed_calibration_resumes_under_torchrun(tiny_tokenizer, tmp_path):
    """As the dense calibration: under ``torchrun`` rank 0 checkpoints the summed expert statistics and every rank's
    position; both workers and torchrun SIGKILLed after one, then resumed under torchrun: one process's sums."""
    from scale_helpers import SEQ_LEN, aligned_corpus, kill_after_checkpoint, run, save_model, torchrun

    model = save_model(moe_model("qwen2_moe", vocab_size=len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "model")
    corpus = aligned_corpus(tiny_tokenizer, tmp_path / "corpus", docs=300, seed=1)
    args = ("--model", model, "--data", corpus, "--seq-len", SEQ_LEN, "--batch-size", 1, "--max-tokens", 10**9,
            "--no-progress")
    whole, out = tmp_path / "whole.safetensors", tmp_path / "out.safetensors"
    checkpoint = tmp_path / "out.safetensors.ckpt"
    assert main(["calibrate", *map(str, args), "--out", str(whole)]) == 0
    kill_after_checkpoint(torchrun(2, "calibrate", *args, "--checkpoint-every", 1, "--out", out), checkpoint, out)
    saved = MoEStats.load(checkpoint)
    positions = saved.meta["checkpoint"]["positions"]
    assert min(positions) > 0 and sum(positions) * SEQ_LEN == saved.tokens < MoEStats.load(whole).tokens
    done = run(torchrun(2, "calibrate", *args, "--checkpoint-every", 1, "--out", out, "--resume"))
    assert done.returncode == 0, done.stderr
    a, b = MoEStats.load(out), MoEStats.load(whole)
    assert a.tokens == b.tokens
    _assert_same_sums(a, b)
    assert not checkpoint.exists()
