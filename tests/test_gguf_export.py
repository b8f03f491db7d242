"""GGUF export with the gguf library: metadata, tokenizer, tensors (read back), refusals; llama.cpp when installed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model

import minigpt
from minigpt.cli import main
from minigpt.tools.gguf_export import _permute_for_rope, export_gguf, pre_tokenizer_name

gguf = pytest.importorskip("gguf")


def _field(reader, key):
    return reader.fields[key].contents()


def _saved(tmp_path, tiny_tokenizer, model=None, name="model"):
    model = model or tiny_model("llama", tied=True)
    return minigpt.save_pruned(model, tiny_tokenizer, tmp_path / name), model


def test_f32_export_holds_the_model_and_tokenizer(tiny_tokenizer, tmp_path):
    directory, model = _saved(tmp_path, tiny_tokenizer)
    report = export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", "f32", source_dir=directory)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.feed_forward_length") == 48
    assert _field(reader, "llama.attention.head_count_kv") == 1
    assert _field(reader, "tokenizer.ggml.pre") == report["pre_tokenizer"] == "gpt-2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert tokens == [t for t, _ in sorted(tiny_tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    assert len(_field(reader, "tokenizer.ggml.merges")) == len(json.loads(tiny_tokenizer.backend_tokenizer.to_str())
                                                              ["model"]["merges"])
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tiny_tokenizer.eos_token_id
    tensors = {t.name: np.asarray(t.data).reshape(list(reversed(t.shape.tolist()))) for t in reader.tensors}
    assert "output.weight" not in tensors  # tied embeddings: llama.cpp reuses token_embd
    attn = model.model.layers[1].self_attn
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight"], _permute_for_rope(attn.q_proj.weight.detach(), 2).numpy())
    np.testing.assert_array_equal(tensors["blk.1.attn_k.weight"], _permute_for_rope(attn.k_proj.weight.detach(), 1).numpy())
    np.testing.assert_array_equal(tensors["blk.0.ffn_down.weight"], model.model.layers[0].mlp.down_proj.weight.detach().numpy())


def test_rope_permutation_interleaves_halves():
    """Rows (h, [x0..x3, y0..y3]) of one head become (x0, y0, x1, y1, ...): llama.cpp's pairwise rotation."""
    w = torch.arange(8.0)[:, None]
    assert _permute_for_rope(w, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_q8_0_quantises_whole_blocks_and_falls_back_to_f16(tiny_tokenizer, tmp_path):
    directory, model = _saved(tmp_path, tiny_tokenizer)
    report = export_gguf(model, tiny_tokenizer, tmp_path / "q.gguf", "q8_0", source_dir=directory)
    # hidden 32 = one Q8_0 block; ffn_down's rows are the MLP width 48, not whole blocks → F16, as llama.cpp does
    assert report["tensors"]["blk.0.ffn_gate.weight"] == "Q8_0" and report["tensors"]["blk.0.attn_norm.weight"] == "F32"
    assert sorted(report["f16_fallback"]) == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]
    reader = gguf.GGUFReader(tmp_path / "q.gguf")
    gate = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate.weight")
    values = gguf.quants.dequantize(gate.data, gate.tensor_type).reshape(48, 32)
    original = model.model.layers[0].mlp.gate_proj.weight.detach().numpy()
    bound = np.abs(original).max(axis=1, keepdims=True) / 127 * 0.5 + 1e-3 * np.abs(original).max()  # scale in f16
    assert (np.abs(values - original) <= bound).all()


def test_vocabulary_pruned_model_exports(corpus_dir, tiny_tokenizer, tmp_path):
    model = tiny_model("llama", tied=True)
    counts = torch.zeros(model.get_input_embeddings().num_embeddings, dtype=torch.long)
    counts[:300] = 1
    tokenizer, kept, _ = minigpt.pipeline.prune.prune_vocabulary(model, tiny_tokenizer, counts)
    directory = minigpt.save_pruned(model, tokenizer, tmp_path / "vocab")
    export_gguf(model, tokenizer, tmp_path / "v.gguf", "f16", source_dir=directory)
    reader = gguf.GGUFReader(tmp_path / "v.gguf")
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert len(_field(reader, "tokenizer.ggml.tokens")) == len(kept) < len(tiny_tokenizer)


def test_per_layer_widths_are_refused_with_the_reason(tiny_tokenizer, tmp_path, capsys):
    model = tiny_model("llama")
    plan = minigpt.PruningPlan(kept=[list(range(40)), list(range(20))], widths=[48, 48],
                               fingerprint=minigpt.pipeline.stats.fingerprint(model))
    model, _ = minigpt.prune(model, pruning_plan=plan)
    with pytest.raises(minigpt.MiniGPTError, match="one feed_forward_length"):
        export_gguf(model, tiny_tokenizer, tmp_path / "x.gguf")
    directory = minigpt.save_pruned(model, tiny_tokenizer, tmp_path / "per-layer")
    capsys.readouterr()
    assert main(["export", "--model", str(directory), "--gguf", str(tmp_path / "y.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minigpt: error: ") and "per-layer MLP widths" in err and len(err.splitlines()) == 1
    assert not list(tmp_path.glob("*.gguf"))


def test_unknown_pre_tokenizer_is_refused(tiny_tokenizer):
    from tokenizers import pre_tokenizers

    other = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer.__class__.from_str(
        tiny_tokenizer.backend_tokenizer.to_str()))
    other.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(minigpt.MiniGPTError, match="--pre-tokenizer"):
        pre_tokenizer_name(other)


def test_llama_cpp_runs_the_export_like_transformers(tiny_tokenizer, tmp_path):
    """Greedy tokens of llama.cpp on the exported file equal transformers' (the consumers check does SmolLM2)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    directory, model = _saved(tmp_path, tiny_tokenizer)
    export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", "f32", source_dir=directory)
    ids = tiny_tokenizer("def f(x):\n    return x", add_special_tokens=False)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=128, verbose=False)
    assert llm.tokenize(b"def f(x):\n    return x", add_bos=False, special=False) == ids
    got = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        got.append(int(token))
        if len(got) == 8:
            break
    with torch.inference_mode():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(ids):].tolist()
    assert got == expected
