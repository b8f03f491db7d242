"""Attention compensation: the Gram statistics of o_proj's input, the least-squares refit of o_proj on the kept
heads (against an independent float64 solve), exactness for a duplicated head, the OBS cost of a head against the
error it measures, and heads removed where they cost least over all layers (per-layer counts) saved, reloaded and
generating."""

from __future__ import annotations

import copy

import pytest
import torch
from test_structures import tiny

import minigpt
from minigpt.models.architecture import describe, output_projection
from minigpt.pipeline.calibration import run_batches
from minigpt.pipeline.compensate import compensate_heads, head_columns, head_costs
from minigpt.pipeline.policy import Policy
from minigpt.pipeline.prune import prune
from minigpt.pipeline.stats import CalibrationStats, fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")
BATCHES = [torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(6)]


def _stats(model, batches=BATCHES, gram_tokens=None) -> CalibrationStats:
    stats = CalibrationStats.empty(fingerprint(model), gram=True)
    return run_batches(model, batches, stats, backend="torch", progress=False, gram_tokens=gram_tokens)


def _o_proj(model, layer):
    param, dim = output_projection(model, describe(model).layers[layer].heads)
    return model.get_submodule(param.rpartition(".")[0]), dim


@torch.inference_mode()
def _o_inputs(model, batches=BATCHES) -> list[torch.Tensor]:
    """Every layer's o_proj input ``(T, H·d)`` in float64, captured by hooks (the oracle)."""
    seen = [[] for _ in describe(model).layers]
    hooks = [_o_proj(model, i)[0].register_forward_pre_hook(
        lambda mod, args, i=i: seen[i].append(args[0].reshape(-1, args[0].shape[-1]).double()))
        for i in range(len(seen))]
    for ids in batches:
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return [torch.cat(s) for s in seen]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_attention_gram_is_the_sum_of_outer_products_and_merges(arch):
    model = tiny(arch)
    xs = _o_inputs(model)
    stats = _stats(model, gram_tokens=2 * 16 * 3)  # the first three batches only, like the MLP Gram
    for layer, x in enumerate(xs):
        first = x[: 2 * 16 * 3]
        torch.testing.assert_close(stats.sums[f"heads.{layer}.gram"], first.T @ first, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(stats.sums[f"heads.{layer}.gram_sum"], first.sum(0), rtol=1e-5, atol=1e-4)
    merged = _stats(model, BATCHES[:3]).merge(_stats(model, BATCHES[3:]))
    whole = _stats(model)
    assert merged.gram_tokens == whole.gram_tokens
    torch.testing.assert_close(merged.sums["heads.1.gram"], whole.sums["heads.1.gram"], rtol=1e-9, atol=1e-8)
    no_gram = run_batches(model, BATCHES, CalibrationStats.empty(fingerprint(model)), backend="torch",
                          progress=False)
    assert not any(k.endswith("gram") for k in no_gram.sums)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_o_proj_refit_equals_the_float64_closed_form(arch):
    """llama: no o_proj bias (uncentred refit); gpt2: c_proj's own bias takes the fitted mean."""
    model = tiny(arch)
    xs = _o_inputs(model)
    stats = _stats(model)
    d = describe(model).layers[0].head_dim
    old = [(_o_proj(model, i)[0].weight.detach().movedim(_o_proj(model, i)[1], 1).double().clone(),
            _o_proj(model, i)[0].bias) for i in range(len(xs))]
    old_b = [None if b is None else b.detach().double().clone() for _, b in old]
    kept_heads = [[0, 2], [1, 3], [0, 1]] if arch == "gpt2" else [[0, 2], [1, 3], [0, 3]]
    report = compensate_heads(model, stats, kept_heads, "lstsq", damping=0)
    with_bias = arch == "gpt2"
    assert report["bias"] == ("o_proj" if with_bias else "none")
    for layer, (x, (w, _)) in enumerate(zip(xs, old)):
        kept = head_columns(kept_heads[layer], d)
        removed = torch.tensor(sorted(set(range(x.shape[1])) - set(kept.tolist())))
        design = torch.cat([x[:, kept], torch.ones(x.shape[0], 1, dtype=x.dtype)], 1) if with_bias else x[:, kept]
        solution = torch.linalg.lstsq(design, x[:, removed] @ w[:, removed].T).solution.T
        proj, dim = _o_proj(model, layer)
        got = proj.weight.detach().movedim(dim, 1).double()
        tol = 5 * float(torch.linalg.cond(design)) * torch.finfo(torch.float32).eps
        expected = w[:, kept] + solution[:, : len(kept)]
        assert float((got[:, kept] - expected).norm() / expected.norm()) < tol
        assert float(got[:, removed].abs().max()) == 0
        if with_bias:
            expected_b = solution[:, -1] + old_b[layer]
            assert float((proj.bias.detach().double() - expected_b).norm()) < tol * float(expected_b.norm() + w.norm())


def test_nothing_removed_returns_the_original_o_proj():
    model = tiny("llama")
    stats = _stats(model)
    before = [p.detach().clone() for p in model.parameters()]
    compensate_heads(model, stats, [[0, 1, 2, 3]] * 3, "lstsq")
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


def _duplicate_heads(model):
    """Query head 1 = head 0 and head 3 = head 2 (same KV group, same q rows): their outputs are equal."""
    with torch.no_grad():
        for groups in describe(model).layers:
            q = model.get_submodule(groups.attention).q_proj.weight
            d = groups.head_dim
            q[d: 2 * d] = q[:d]
            q[3 * d: 4 * d] = q[2 * d: 3 * d]


def test_removing_a_duplicated_head_with_the_refit_leaves_the_logits_unchanged():
    model = tiny("llama")
    _duplicate_heads(model)
    stats = _stats(model)
    with torch.inference_mode():
        before = model(input_ids=BATCHES[0]).logits
    policy = Policy(mlp=0.0, heads=0.5)
    for method, unchanged in (("lstsq", True), ("none", False)):
        pruned, plan = prune(copy.deepcopy(model), stats=stats, policy=policy, compensate=method, damping=1e-10)
        assert plan.heads == [[0, 2]] * 3 or plan.heads == [[1, 3]] * 3 or all(len(h) == 2 for h in plan.heads)
        assert pruned.config.num_attention_heads == 2
        with torch.inference_mode():
            after = pruned(input_ids=BATCHES[0]).logits
        assert torch.allclose(after, before, atol=1e-4, rtol=1e-4) == unchanged, method
    assert plan.policy["compensate"]["attention"]["method"] == "none"


def test_head_cost_is_the_error_the_refit_leaves():
    """The OBS cost of removing a unit (damping 0) equals E‖W o − W'_K o_K‖² after the least-squares refit."""
    model = tiny("llama")
    x = _o_inputs(model)[1]
    stats = _stats(model)
    proj, dim = _o_proj(model, 1)
    w = proj.weight.detach().movedim(dim, 1).double()
    units = [[0], [3], [2, 3]]
    costs = head_costs(model, stats, 1, units, damping=0)
    for unit, cost in zip(units, costs):
        removed = head_columns(unit, 8)
        kept = torch.tensor(sorted(set(range(32)) - set(removed.tolist())))
        fit = torch.linalg.lstsq(x[:, kept], x @ w.T).solution  # (K, D)
        error = ((x @ w.T - x[:, kept] @ fit) ** 2).sum() / x.shape[0]
        torch.testing.assert_close(cost, error, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("kv", [True, False])
def test_global_heads_vary_per_layer_and_reload(kv, tiny_tokenizer, tmp_path):
    """Heads removed where they cost least over all layers: a layer whose heads matter little (its o_proj scaled
    down) loses them first; per-layer head counts save with the modeling file, reload and generate."""
    from transformers import AutoModelForCausalLM

    model = tiny("llama")
    with torch.no_grad():
        _o_proj(model, 1)[0].weight.mul_(1e-3)
    stats = _stats(model)
    policy = Policy(mlp=0.25, heads=1 / 6, kv_groups=kv, heads_scope="global")
    pruned, plan = prune(model, stats=stats, policy=policy, compensate="lstsq")
    counts = [len(h) for h in plan.heads]
    assert counts == [4, 2, 4], counts  # 1 of 6 KV groups / query-head units: layer 1's
    if kv:
        assert plan.heads[1] in ([0, 1], [2, 3])
    out = minigpt.save_pruned(pruned, tiny_tokenizer, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = BATCHES[0][:1, :6]
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(ids).logits, pruned(ids).logits)
        generated = reloaded.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 9)


def test_global_heads_refuse_removing_a_whole_layer():
    model = tiny("llama")
    with pytest.raises(minigpt.MiniGPTError, match="every head"):
        prune(model, stats=_stats(model), policy=Policy(mlp=0.0, heads=0.9, kv_groups=True, heads_scope="global"))
    with pytest.raises(minigpt.MiniGPTError, match="heads-scope"):
        Policy(heads=0.5, heads_scope="layer")


def test_target_params_spends_the_budget_on_cheap_heads_first():
    """Layer 1's attention barely writes to the residual stream (o_proj scaled by 1e-3): its KV group costs least
    per parameter, so the rule removes it (and only then MLP neurons); the budget is met."""
    from minigpt.pipeline import importance
    from minigpt.pipeline.policy import allocate

    model = tiny("llama")
    with torch.no_grad():
        _o_proj(model, 1)[0].weight.mul_(1e-3)
    stats = _stats(model)
    total = sum(p.numel() for p in model.parameters())
    chosen = allocate(stats, model, Policy(target_params=0.9), importance.scores("l1", stats=stats))
    assert chosen.heads == 1 / 6 and chosen.kv_groups and chosen.heads_scope == "global"
    pruned, plan = prune(model, stats=stats, policy=Policy(target_params=0.9))
    assert [len(h) for h in plan.heads] == [4, 2, 4]
    assert sum(p.numel() for p in pruned.parameters()) <= 0.9 * total


def test_cli_global_heads_save_per_layer_counts_and_reload(tiny_tokenizer, corpus_dir, tmp_path):
    """``minigpt prune --heads-scope global``: one layer loses a query head, the other keeps both; the report
    records the attention refit; the saved model (modeling file) reloads and generates."""
    import json

    from conftest import tiny_model
    from scale_helpers import save_model
    from transformers import AutoModelForCausalLM

    from minigpt.cli import main

    model_dir = save_model(tiny_model("llama"), tiny_tokenizer, tmp_path / "model")
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dir), "--data", str(corpus_dir), "--max-tokens", "512", "--seq-len",
                 "32", "--batch-size", "2", "--no-eval", "--no-progress", "--out", str(out), "--mlp", "0.2",
                 "--heads", "0.25", "--heads-scope", "global"]) == 0
    report = json.loads((out / "minigpt_report.json").read_text())
    plan = json.loads((out / "minigpt_plan.json").read_text())
    assert plan["policy"]["compensate"]["attention"]["method"] == "lstsq" and plan["policy"]["heads_scope"] == "global"
    assert sorted(len(h) for h in plan["heads"]) == [1, 2]
    assert "heads" in json.dumps(report)
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.inference_mode():
        generated = loaded.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 6)
