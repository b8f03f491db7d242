"""Head, hidden-channel and Block Influence statistics of the calibration pass: values against a plain forward,
two halves merged equal one pass, files of format version 1 still load."""

from __future__ import annotations

import json

import pytest
import torch
from test_structures import tiny

import minigpt
from minigpt.pipeline.calibration import run_batches
from minigpt.pipeline.stats import CalibrationStats, fingerprint

BATCHES = [torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(4)]


def collect(model, batches):
    return run_batches(model, batches, CalibrationStats.empty(fingerprint(model)), backend="torch", progress=False)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "gemma2"])
def test_structure_sums_match_a_plain_forward(arch):
    model = tiny(arch)
    stats = collect(model, BATCHES)
    o_inputs = {}
    arch_heads = 4
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: o_inputs.setdefault(n, []).append(a[0]))
             for n in ("model.layers.1.self_attn.o_proj", "transformer.h.1.attn.c_proj") if _has(model, n)]
    with torch.inference_mode():
        states = [model(b, output_hidden_states=True).hidden_states for b in BATCHES]
    for h in hooks:
        h.remove()
    (o_in,) = o_inputs.values()
    norms = torch.cat([x.reshape(-1, arch_heads, x.shape[-1] // arch_heads).norm(dim=-1) for x in o_in]).double()
    torch.testing.assert_close(stats.sums["heads.1.sum"], norms.sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.sums["heads.1.sum_sq"], norms.pow(2).sum(0), rtol=1e-5, atol=1e-6)
    cos = torch.cat([torch.nn.functional.cosine_similarity(s[0], s[1], dim=-1).reshape(-1) for s in states])
    torch.testing.assert_close(stats.sums["layers.influence"][0], (1 - cos.double()).sum(), rtol=1e-4, atol=1e-5)
    assert stats.sums["hidden.sum_abs"].shape == (32,) and bool((stats.sums["hidden.sum_sq"] > 0).all())


def _has(model, name):
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def test_two_halves_merged_equal_one_pass():
    model = tiny("qwen3")
    whole = collect(model, BATCHES)
    merged = collect(model, BATCHES[:2]).merge(collect(model, BATCHES[2:]))
    assert set(whole.sums) == set(merged.sums) and len(whole.sums) == 3 * 2 + 4
    for key, value in whole.sums.items():
        torch.testing.assert_close(merged.sums[key], value, rtol=1e-10, atol=1e-9)


def test_format_1_files_still_load_and_2_round_trips(tmp_path):
    from safetensors.torch import save_file

    model = tiny("llama")
    stats = collect(model, BATCHES)
    stats.save(tmp_path / "v2.safetensors")
    again = CalibrationStats.load(tmp_path / "v2.safetensors")
    assert set(again.sums) == set(stats.sums)
    torch.testing.assert_close(again.sums["layers.influence"], stats.sums["layers.influence"])
    old = {k: v for k, v in stats.tensors().items() if not k.startswith("sums.")}
    header = {"format_version": 1, "tokens": stats.tokens, "fingerprint": stats.fingerprint, "meta": stats.meta}
    save_file(old, str(tmp_path / "v1.safetensors"), metadata={"minigpt": json.dumps(header)})
    v1 = CalibrationStats.load(tmp_path / "v1.safetensors")
    assert v1.sums == {} and v1.tokens == stats.tokens
    with pytest.raises(minigpt.MiniGPTError, match="format version 3"):
        header["format_version"] = 3
        save_file(old, str(tmp_path / "v3.safetensors"), metadata={"minigpt": json.dumps(header)})
        CalibrationStats.load(tmp_path / "v3.safetensors")
