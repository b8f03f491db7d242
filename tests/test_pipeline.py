"""End to end on tiny models of every adapter: calibrate → plan → compact → save → stock reload."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import minigpt
from minigpt.models import adapters
from minigpt.pipeline.evaluation import parameter_counts

DENSE_NEW = ["phi3", "gemma2", "gemma3_text", "smollm3", "olmo2"]  # fused gate_up, soft-capping, their own norms
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "opt", "gpt2", "phi", *DENSE_NEW]


def _expected_removed(model, kept: list[int]) -> int:
    """Parameters an MLP loses per removed neuron: a row (+bias) of each row projection, a column of each column one."""
    layout = adapters.get_layout(model)
    total = 0
    for mlp, k in zip(adapters.mlps(model), kept):
        for side, names in (("rows", layout.rows), ("cols", layout.cols)):
            for name in names:
                proj = getattr(mlp, name)
                n = adapters.widths(model)[0] - k
                per = proj.weight.shape[1 - adapters.neuron_dim(layout, side)]
                rows = 2 if side == "rows" and layout.packed else 1  # a fused gate_up: rows j and N+j
                total += n * rows * (per + (1 if side == "rows" and proj.bias is not None else 0))
    return total


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_adapter_prunes_saves_and_reloads(arch, tied, corpus_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch, tied)
    before = parameter_counts(model)["total"]
    stats = minigpt.calibrate(model, tiny_tokenizer, [str(corpus_dir)], max_tokens=256, seq_len=32, batch_size=4,
                              progress=False)
    assert stats.tokens == 256 and all(int(n.max()) <= 256 for n in stats.nonzero)
    model, plan = minigpt.prune(model, tiny_tokenizer, stats=stats, ratio=0.25)
    assert plan.kept_widths == [36, 36]
    after = parameter_counts(model)["total"]
    assert before - after == _expected_removed(tiny_model(arch, tied), plan.kept_widths)
    out = minigpt.save_pruned(model, tiny_tokenizer, tmp_path / "pruned", plan=plan)
    assert not (out / "modeling_minigpt.py").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # stock transformers, no minigpt code
    assert parameter_counts(reloaded)["total"] == after
    assert reloaded.config.tie_word_embeddings == tied
    ids = torch.tensor([tiny_tokenizer("def f(x):\n    return x")["input_ids"]])
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_nonuniform_widths_load_with_remote_code(arch, corpus_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch)
    stats = minigpt.calibrate(model, tiny_tokenizer, [str(corpus_dir)], max_tokens=128, seq_len=32, progress=False)
    pruning_plan = minigpt.PruningPlan(kept=[list(range(40)), list(range(1, 41, 2))], widths=[48, 48],
                                       fingerprint=stats.fingerprint)
    model, _ = minigpt.prune(model, pruning_plan=pruning_plan)
    assert adapters.widths(model) == [40, 20]
    out = minigpt.save_pruned(model, tiny_tokenizer, tmp_path / "pruned", plan=pruning_plan)
    assert (out / "modeling_minigpt.py").exists()
    stock = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ours, _ = minigpt.load_model(out)
    ids = torch.tensor([tiny_tokenizer("for i in range(3):")["input_ids"]])
    with torch.inference_mode():
        expected = model(ids).logits
        torch.testing.assert_close(stock(ids).logits, expected)
        torch.testing.assert_close(ours(ids).logits, expected)


def test_pruning_never_fired_relu_neurons_is_exact(corpus_dir, tiny_tokenizer):
    """OPT's ReLU: neurons with zero firing count contribute nothing, so removing them keeps logits."""
    model = tiny_model("opt")
    with torch.no_grad():
        for layer in adapters.mlps(model):
            layer.fc1.bias[::3] = -100.0  # a third of the neurons can never fire on this data
    data = [str(corpus_dir)]
    stats = minigpt.calibrate(model, tiny_tokenizer, data, max_tokens=512, seq_len=64, progress=False)
    dead = [int((n == 0).sum()) for n in stats.nonzero]
    assert all(d >= 16 for d in dead)
    batch = next(iter(minigpt.pipeline.data.Batches(tiny_tokenizer, minigpt.pipeline.data.resolve_files(data), seq_len=64,
                                           batch_size=8, max_tokens=512)))
    with torch.inference_mode():
        reference = model(batch).logits
    pruning_plan = minigpt.plan(stats, "freq", threshold=1e-12)
    assert pruning_plan.kept_widths == [48 - d for d in dead]
    model, _ = minigpt.prune(model, pruning_plan=pruning_plan)
    with torch.inference_mode():
        torch.testing.assert_close(model(batch).logits, reference, rtol=1e-5, atol=1e-5)


def test_unsupported_architecture_lists_supported():
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, is_decoder=True))
    with pytest.raises(minigpt.MiniGPTError, match="unsupported model_type 'bert'; supported: gemma, gpt2, llama"):
        adapters.get_layout(model)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("arch", ["llama", *DENSE_NEW])
def test_pruned_model_evaluates_and_benches(arch, corpus_dir, tiny_tokenizer, tmp_path, capsys):
    """``minigpt prune`` → ``minigpt eval`` → ``minigpt bench`` (the saved model against its source and the source
    pruned by ``@RATIO``) on every dense architecture added after llama's."""
    import json

    from minigpt.cli import main
    from minigpt.tools import bench

    src, out = tmp_path / "src", tmp_path / "pruned"
    tiny_model(arch).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    assert main(["prune", "--model", str(src), "--data", str(corpus_dir), "--max-tokens", "256", "--seq-len", "32",
                 "--ratio", "0.25", "--multiple", "1", "--eval-data", str(corpus_dir / "glob.py.txt"),
                 "--eval-tokens", "128", "--eval-seq-len", "32", "--no-progress", "--json", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["after"]["perplexity"] > 1
    assert main(["eval", "--model", str(out), "--data", str(corpus_dir / "glob.py.txt"), "--eval-tokens", "128",
                 "--eval-seq-len", "32", "--no-progress", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["perplexity"] == pytest.approx(report["after"]["perplexity"], rel=1e-4)
    measured = bench.benchmark([str(src), str(out), f"{src}@0.25"], prompt_lengths=[8], decode_tokens=2,
                               batch_sizes=[1], repeats=1, warmup=0)
    base, pruned, by_ratio = measured["models"]
    assert base["mlp_widths"] == [48, 48] and pruned["mlp_widths"] == by_ratio["mlp_widths"] == [36, 36]
    assert max(pruned["params"]["mlp"], by_ratio["params"]["mlp"]) < base["params"]["mlp"]
    assert all(m["decode"]["1"]["tokens_per_s"] > 0 for m in measured["models"])
