"""Saved formats for per-layer shapes: Nemotron-NAS (DeciLM) for Llama, minigpt's own class for the rest."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config, tiny_model

import minigpt
from minigpt.models import adapters, formats
from minigpt.models.modeling_minigpt import DeciLMConfig, DeciLMForCausalLM
from minigpt.pipeline.compact import REMOTE_CODE


def _per_layer(model):
    plan = minigpt.PruningPlan(kept=[list(range(40)), list(range(1, 41, 2))], widths=[48, 48],
                               fingerprint=minigpt.pipeline.stats.fingerprint(model))
    return minigpt.prune(model, pruning_plan=plan)


def _ids(tokenizer):
    return torch.tensor([tokenizer("def f(x):\n    return x")["input_ids"]])


def test_llama_per_layer_widths_save_as_decilm(tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model, plan = _per_layer(tiny_model("llama"))
    out = minigpt.save_pruned(model, tiny_tokenizer, tmp_path / "pruned", plan=plan)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    assert [b["ffn"] for b in config["block_configs"]] == [{"no_op": False, "intermediate_size": w} for w in (40, 20)]
    assert [b["attention"] for b in config["block_configs"]] == [{"no_op": False, "n_heads_in_group": 2}] * 2
    assert not any(k.startswith("minigpt_") for k in config)
    assert (out / "modeling_minigpt.py").read_bytes() == REMOTE_CODE.read_bytes()  # the shipped file, unchanged
    stock = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ours, _ = minigpt.load_model(out)
    assert adapters.widths(ours) == [40, 20]
    with torch.inference_mode():
        expected = model(_ids(tiny_tokenizer)).logits
        torch.testing.assert_close(stock(_ids(tiny_tokenizer)).logits, expected)
        torch.testing.assert_close(ours(_ids(tiny_tokenizer)).logits, expected)
    again = minigpt.save_pruned(ours, tiny_tokenizer, tmp_path / "again")  # a reloaded model stays DeciLM
    assert json.loads((again / "config.json").read_text())["block_configs"] == config["block_configs"]


def _decilm(block_configs):
    kwargs = tiny_config("llama").to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        kwargs.pop(key, None)
    kwargs.update(num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    return DeciLMForCausalLM(DeciLMConfig(block_configs=block_configs, **kwargs)).eval()


def test_per_layer_kv_heads_round_trip(tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _decilm(formats.block_configs([48, 24], [1, 4], num_heads=4))
    assert formats.kv_heads(model) == [1, 4] and adapters.widths(model) == [48, 24]
    out = minigpt.save_pruned(model, tiny_tokenizer, tmp_path / "kv")
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert formats.kv_heads(reloaded) == [1, 4]
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(_ids(tiny_tokenizer)).logits, model(_ids(tiny_tokenizer)).logits)
        generated = reloaded.generate(_ids(tiny_tokenizer), max_new_tokens=4, do_sample=False)  # KV cache per layer
        assert generated.shape[1] == _ids(tiny_tokenizer).shape[1] + 4


def test_no_op_ffn_adds_nothing(tiny_tokenizer):
    """A removed MLP (``no_op``) equals an MLP whose output projection is zero."""
    removed = _decilm([*formats.block_configs([48], [2], 4), {"attention": {"no_op": False, "n_heads_in_group": 2},
                                                              "ffn": {"no_op": True}}])
    zeroed = _decilm(formats.block_configs([48, 48], [2, 2], 4))
    state = {k: v for k, v in zeroed.state_dict().items() if "layers.1.mlp" not in k}
    removed.load_state_dict(state, strict=False)
    with torch.no_grad():
        zeroed.model.layers[1].mlp.down_proj.weight.zero_()
        torch.testing.assert_close(removed(_ids(tiny_tokenizer)).logits, zeroed(_ids(tiny_tokenizer)).logits)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_other_architectures_never_claim_stock_shapes(arch, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model, plan = _per_layer(tiny_model(arch))
    out = minigpt.save_pruned(model, tiny_tokenizer, tmp_path / "pruned", plan=plan)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MiniGPTForCausalLM"]
    with pytest.raises((ValueError, RuntimeError), match="trust_remote_code|mismatch"):  # loud, never misread
        AutoModelForCausalLM.from_pretrained(out)
    ours, _ = minigpt.load_model(out)
    with torch.inference_mode():
        torch.testing.assert_close(ours(_ids(tiny_tokenizer)).logits, model(_ids(tiny_tokenizer)).logits)


def test_block_configs_refuse_impossible_head_counts():
    with pytest.raises(ValueError, match="do not divide"):
        formats.block_configs([48], [3], num_heads=4)
