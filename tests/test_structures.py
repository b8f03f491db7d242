"""Every structure (MLP neurons, query heads, KV heads, hidden channels, layers) of every architecture, from its
description alone: exactness (zeroed structure → identical logits once removed), parameter counts, save → reload
(stock ``from_pretrained`` when the config expresses the shapes) → forward → generate."""

from __future__ import annotations

import pytest
import torch

import minigpt
from minigpt import ops
from minigpt.models import surgery
from minigpt.models.architecture import describe
from minigpt.pipeline.planning import PruningPlan

WITH_ENTRY = ["llama", "mistral", "qwen2", "qwen3", "gemma", "opt", "gpt2", "phi"]
DENSE_NEW = ["phi3", "gemma2", "gemma3_text", "smollm3", "olmo2"]
NO_ENTRY = ["granite", "helium", "starcoder2", "glm"]  # nothing written for them: read from their tp plans
ARCHS = WITH_ENTRY + DENSE_NEW + NO_ENTRY
LAYER_NORM = {"opt", "gpt2", "phi", "starcoder2"}  # mean-subtracting norms: hidden pruning is approximate there
STRUCTURES = ["mlp", "heads", "kv", "hidden", "layers"]
HIDDEN, WIDTH, LAYERS = 32, 48, 3


def tiny_config(model_type: str, tied: bool = False):
    """3 layers, hidden 32, MLP 48, 4 query heads of 8 in 2 KV groups (GPT-2 / OPT: 4 heads, no GQA); ε tiny so
    that exactness is checked to fp32 rounding (see ``minigpt.models.surgery`` on ε)."""
    from transformers import AutoConfig

    common = {"vocab_size": 512, "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2,
              "pad_token_id": 0}
    per_type = {
        "gpt2": {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": 4, "n_inner": WIDTH, "n_positions": 64,
                 "layer_norm_epsilon": 1e-12},
        "opt": {"hidden_size": HIDDEN, "ffn_dim": WIDTH, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
                "word_embed_proj_dim": HIDDEN, "max_position_embeddings": 64},
    }
    kwargs = per_type.get(model_type, {
        "hidden_size": HIDDEN, "intermediate_size": WIDTH, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64, "rms_norm_eps": 1e-12,
        "layer_norm_eps": 1e-12, "norm_epsilon": 1e-12})
    return AutoConfig.for_model(model_type, **common, **kwargs)


def tiny(model_type: str, tied: bool = False):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, tied)).eval()


def removal(model, structure: str):
    """``(kept, {group: removed items per layer})``: what pruning ``structure`` keeps and drops in a tiny model."""
    arch = describe(model)
    layer = arch.layers[0]
    per_kv = layer.heads.size // layer.kv.size
    if structure == "mlp":
        return surgery.Kept(mlp=[[j for j in range(WIDTH) if j not in (3, 7 + i)] for i in range(LAYERS)])
    if structure == "heads":  # one query head out of every KV group (all of them when a group has one)
        drop = {g * per_kv + per_kv - 1 for g in range(layer.kv.size)} if per_kv > 1 else {1, 3}
        return surgery.Kept(heads=[[h for h in range(layer.heads.size) if h not in drop]] * LAYERS)
    if structure == "kv":  # the last KV group with its query heads
        return surgery.Kept(heads=[list(range(layer.heads.size - per_kv))] * LAYERS)
    if structure == "hidden":
        return surgery.Kept(hidden=[c for c in range(HIDDEN) if c not in (5, 17, 20, 30)])  # a multiple of the heads
    return surgery.Kept(layers=[0, 2])



def removal_or_all(model, structure: str) -> surgery.Kept:
    """``removal`` of one structure, or of every structure at once (``"all"``)."""
    if structure != "all":
        return removal(model, structure)
    parts = [removal(model, s) for s in ("mlp", "heads", "hidden", "layers")]
    return surgery.Kept(mlp=parts[0].mlp, heads=parts[1].heads, hidden=parts[2].hidden, layers=parts[3].layers)

def zero_removed(model, kept: surgery.Kept) -> int:
    """Zero every slice of what ``kept`` drops (layers: the weights writing the residual stream); returns the
    parameter count the removal should save."""
    arch = describe(model)
    removed = 0

    def zero(group, keep):
        nonlocal removed
        for item in sorted(set(range(group.size)) - set(keep)):
            for s in group.slices:
                p = model.get_parameter(s.param)
                p.narrow(s.dim, s.start + item * s.unit, s.unit).zero_()
                removed += s.unit * p.numel() // p.shape[s.dim]

    with torch.no_grad():
        for i, groups in enumerate(arch.layers):
            if kept.mlp is not None:
                zero(groups.mlp, kept.mlp[i])
            if kept.heads is not None:
                zero(groups.heads, kept.heads[i])
                zero(groups.kv, surgery.kv_heads(kept.heads[i], groups.heads.size, groups.kv.size))
            if kept.layers is not None and i not in kept.layers:
                block = model.get_submodule(f"{arch.blocks}.{i}")
                removed += sum(p.numel() for p in block.parameters())
                for s in (*groups.heads.slices, *groups.mlp.slices):
                    owner = model.get_submodule(s.param.rpartition(".")[0])
                    if s.dim == 1 - (type(owner).__name__ == "Conv1D"):  # rowwise: writes the residual stream
                        owner.weight.zero_()
                        if getattr(owner, "bias", None) is not None:
                            owner.bias.zero_()
        if kept.hidden is not None:
            zero(arch.hidden, kept.hidden)
    return removed


def plan_of(model, kept: surgery.Kept) -> PruningPlan:
    widths = minigpt.models.adapters.widths(model)
    return PruningPlan(kept=kept.mlp or [list(range(w)) for w in widths], widths=widths, heads=kept.heads,
                       hidden=kept.hidden, layers=kept.layers)


IDS = torch.tensor([[5, 9, 17, 33, 65, 100, 3, 8, 21, 44]])


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("arch", ARCHS)
def test_zeroed_structure_prunes_exactly(arch, structure):
    model = tiny(arch)
    kept = removal(model, structure)
    expected = zero_removed(model, kept)
    before = sum(p.numel() for p in model.parameters())
    with torch.inference_mode():
        reference = model(IDS).logits
    minigpt.compact(model, plan_of(model, kept))
    assert before - sum(p.numel() for p in model.parameters()) == expected
    with torch.inference_mode():
        logits = model(IDS).logits
    if structure == "hidden" and arch in LAYER_NORM:
        assert logits.shape == reference.shape  # approximate by design (see minigpt.models.surgery)
    else:
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("structure", "tied"), [(s, False) for s in STRUCTURES] + [("all", False), ("all", True)])
@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_model_saves_reloads_and_generates(arch, structure, tied, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny(arch, tied)
    kept = removal_or_all(model, structure)
    minigpt.compact(model, plan_of(model, kept))
    out = minigpt.save_pruned(model, tiny_tokenizer, tmp_path / "pruned")
    stock = not (out / "modeling_minigpt.py").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=not stock).eval()
    if arch not in ("gpt2", "opt", *NO_ENTRY) and structure != "all":
        assert stock  # head counts, hidden size and depth are all config keys there (helium's o_proj is not)
    assert reloaded.config.tie_word_embeddings == tied
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits)
        generated = reloaded.generate(IDS, max_new_tokens=3, do_sample=False, pad_token_id=0)
        torch.testing.assert_close(generated, model.generate(IDS, max_new_tokens=3, do_sample=False, pad_token_id=0))
    assert generated.shape == (1, IDS.shape[1] + 3)


def test_bad_structures_refused():
    model = tiny("llama")
    groups = describe(model).layers[0]
    with pytest.raises(minigpt.MiniGPTError, match="every attention head"):
        surgery.check(describe(model), surgery.Kept(heads=[[]] * LAYERS))
    with pytest.raises(minigpt.MiniGPTError, match="as many query heads"):
        surgery.check(describe(model), surgery.Kept(heads=[[0, 1, 2]] * LAYERS))
    with pytest.raises(minigpt.MiniGPTError, match="every layer"):
        surgery.check(describe(model), surgery.Kept(layers=[]))
    with pytest.raises(minigpt.MiniGPTError, match="head_dim"):
        surgery.check(describe(model), surgery.Kept(hidden=list(range(groups.head_dim - 1))))
    gather = lambda s, i, d: ops.gather(s, i, d, backend="torch")
    with pytest.raises(minigpt.MiniGPTError, match="sorted distinct"):
        surgery.shrink(model, surgery.Kept(hidden=[3, 1, 2] + list(range(4, 20))), gather)


def test_cli_prunes_every_structure_and_records_kept_indices(corpus_dir, tiny_tokenizer, tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from minigpt.cli import main

    tiny("llama").save_pretrained(tmp_path / "src")
    tiny_tokenizer.save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["prune", "--model", str(tmp_path / "src"), "--data", str(corpus_dir), "--seq-len", "32",
                 "--max-tokens", "256", "--no-progress", "--no-eval", "--mlp", "0.25", "--heads", "0.5",
                 "--hidden", "0.25", "--layers", "1", "--out", str(out)]) == 0
    plan = json.loads((out / "minigpt_plan.json").read_text())
    assert [len(h) for h in plan["heads"]] == [2, 2, 2] and len(plan["hidden"]) == 24 and len(plan["layers"]) == 2
    assert all({h // 2 for h in heads} == {0, 1} for heads in plan["heads"])  # one head left in each KV group
    assert plan["policy"]["heads"] == 0.5 and plan["policy"]["layer_metric"] == "influence"
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # stock
    assert reloaded.config.num_hidden_layers == 2 and reloaded.config.hidden_size == 24
    assert reloaded.config.num_attention_heads == 2 and reloaded.config.intermediate_size == 36


@pytest.mark.parametrize("arch,compensate", [("qwen2", "none"), ("llama", "lstsq")])
def test_target_params_allocation_reaches_the_budget(corpus_dir, tiny_tokenizer, arch, compensate):
    """The budget holds for the saved model, counting the MLP biases a Llama refit switches on (``mlp_bias``)."""
    from dataclasses import replace

    from minigpt.pipeline import importance

    model = tiny(arch)
    total = sum(p.numel() for p in model.parameters())
    stats = minigpt.calibrate(model, tiny_tokenizer, [str(corpus_dir)], max_tokens=256, seq_len=32, gram=True,
                              progress=False)
    policy = minigpt.Policy(target_params=0.8)
    mlp_bias = compensate != "none"
    chosen = minigpt.pipeline.policy.allocate(stats, model, policy, importance.scores("l1", stats=stats), mlp_bias)
    assert chosen.target_params is None and (not chosen.heads or (chosen.kv_groups and chosen.heads_scope == "global"))
    model, plan = minigpt.prune(model, tiny_tokenizer, stats=stats, policy=policy, compensate=compensate)
    assert bool(getattr(model.config, "mlp_bias", False)) == mlp_bias
    after = sum(p.numel() for p in model.parameters())
    assert after <= 0.8 * total and plan.policy["target_params"] == 0.8
    r = plan.policy["ratio"]
    assert r == chosen.mlp and plan.policy.get("heads", 0.0) == chosen.heads
    count = minigpt.pipeline.policy.params_after(stats, tiny(arch), chosen, importance.scores("l1", stats=stats),
                                                 mlp_bias=mlp_bias)
    assert count == after  # the count the budget search used is the saved model's
    looser = minigpt.pipeline.policy.params_after(stats, tiny(arch), replace(chosen, mlp=r - 0.005),
                                                  importance.scores("l1", stats=stats), mlp_bias=mlp_bias)
    assert looser > 0.8 * total  # the next smaller amount on the grid misses the budget


def test_policy_refuses_structures_the_description_lacks():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("opt", hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                                  word_embed_proj_dim=16, vocab_size=128, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(minigpt.MiniGPTError, match="no describable hidden channels"):
        minigpt.Policy(hidden=0.25).check_model(model)
