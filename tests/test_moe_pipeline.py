"""The rest of the pipeline on tiny random MoE models of every family: per-layer expert counts (``--scope global``)
through ``modeling_minigpt.py``, out-of-core pruning equal to in-memory pruning, ``minigpt eval`` and ``minigpt
bench`` on the pruned models."""

from __future__ import annotations

import json

import pytest
import torch
from test_moe import DEAD_EXPERTS, EXPERTS, FAMILIES, STDLIB, batches, logits, moe_model

from minigpt.cli import main
from minigpt.errors import MiniGPTError
from minigpt.io import load_model
from minigpt.models.trust import is_own_code
from minigpt.pipeline.compact import save_pruned
from minigpt.pipeline.moe import collect, moe_layers, moe_parameter_counts, plan_moe, prune_moe
from minigpt.tools import bench

pytestmark = pytest.mark.usefixtures("one_thread")


def revived(family: str, vocab_size: int = 512):
    """``moe_model`` whose last sparse layer routes to every expert: only the first layers have dead experts."""
    model = moe_model(family, vocab_size=vocab_size)
    with torch.no_grad():
        moe_layers(model)[-1].router.weight[list(DEAD_EXPERTS)] = torch.randn(len(DEAD_EXPERTS), 32)
    return model


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])  # qwen3_moe's tiny model has one sparse layer
def test_global_scope_keeps_per_layer_counts_exactly_through_the_modeling_file(family, tiny_tokenizer, tmp_path):
    """A global ranking removes only the first layer's two never-routed experts (the last layer uses all eight):
    identical logits, saved with ``modeling_minigpt.py`` (accepted by its hash), reloaded, generating the same."""
    model, data = revived(family, len(tiny_tokenizer)), batches()
    before = logits(model, data)
    stats = collect(model, data)
    plan = plan_moe(stats, experts=len(DEAD_EXPERTS) / (2 * EXPERTS), scope="global", neurons=0.25)
    assert [len(k) for k in plan.experts] == [EXPERTS - len(DEAD_EXPERTS), EXPERTS]
    assert set(range(EXPERTS)) - set(plan.experts[0]) == set(DEAD_EXPERTS)
    prune_moe(model, plan)
    torch.testing.assert_close(logits(model, data), before)
    out = save_pruned(model, tiny_tokenizer, tmp_path / "pruned", plan=plan)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] and "model.layers.0.mlp.gate.weight" in config["minigpt_shapes"]
    assert is_own_code(out / "modeling_minigpt.py")
    reloaded, _ = load_model(str(out))  # the trust rule accepts minigpt's own file without --trust-remote-code
    assert type(reloaded).__name__ == "MiniGPTForCausalLM"
    assert [m.router.weight.shape[0] for m in moe_layers(reloaded)] == [6, 8]
    torch.testing.assert_close(logits(reloaded, data), before)
    prompt = data[0][:1, :8]
    greedy = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(reloaded.generate(prompt, **greedy), model.generate(prompt, **greedy))


def test_global_scope_keeps_top_k_in_every_layer():
    stats = collect(revived("mixtral"), batches())
    plan = plan_moe(stats, experts=0.75, scope="global")  # 4 of 16 kept: exactly top-k in each layer
    assert [len(k) for k in plan.experts] == [2, 2]
    with pytest.raises(MiniGPTError, match="scope"):
        plan_moe(stats, experts=0.5, scope="per-layer")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer):
    """Each family's tiny model (dead experts in the first layer) in small shards, with its expert statistics."""
    root = tmp_path_factory.mktemp("moe_ooc")

    def make(family: str):
        src = root / family
        if not src.exists():
            model = revived(family, len(tiny_tokenizer))
            model.save_pretrained(src, max_shard_size="40KB")
            tiny_tokenizer.save_pretrained(src)
            collect(model, batches()).save(root / f"{family}.safetensors")
        return src, root / f"{family}.safetensors"

    return make


def _same(a_dir, b_dir) -> None:
    a, b = load_model(str(a_dir))[0].state_dict(), load_model(str(b_dir))[0].state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for name in ("config.json", "minigpt_plan.json"):
        assert json.loads((a_dir / name).read_text()) == json.loads((b_dir / name).read_text()), name


@pytest.mark.parametrize("scope", ["uniform", "global"])
@pytest.mark.parametrize("family", FAMILIES)
def test_out_of_core_equals_in_memory(family, scope, saved, tmp_path, capsys):
    src, stats = saved(family)
    assert len(list(src.glob("model-*.safetensors"))) > 2
    ratio = "0.25" if scope == "uniform" else "0.125"  # global: the first layer's dead experts only
    common = ["prune", "--model", str(src), "--expert-stats", str(stats), "--experts", ratio, "--expert-neurons",
              "0.25", "--scope", scope, "--no-eval"]
    assert main([*common, "--out", str(tmp_path / "mem")]) == 0
    assert main([*common, "--out-of-core", "--out", str(tmp_path / "ooc")]) == 0
    assert "(out of core)" in capsys.readouterr().out
    _same(tmp_path / "mem", tmp_path / "ooc")
    counts = [len(k) for k in json.loads((tmp_path / "ooc" / "minigpt_plan.json").read_text())["experts"]]
    assert counts == ([6, 6] if scope == "uniform" else [6, 8]) if family != "qwen3_moe" else [6 if scope == "uniform" else 8]
    assert (tmp_path / "ooc" / "modeling_minigpt.py").exists() == (len(set(counts)) > 1)
    index = json.loads((tmp_path / "ooc" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) <= {p.name for p in (tmp_path / "ooc").glob("model-*.safetensors")}
    report = json.loads((tmp_path / "ooc" / "minigpt_report.json").read_text())
    assert report["weight_bytes"]["after"] < report["weight_bytes"]["before"]


def test_out_of_core_refusals(saved, tmp_path, capsys):
    src, stats = saved("olmoe")
    assert main(["prune", "--model", str(src), "--experts", "0.25", "--out-of-core", "--out", str(tmp_path / "x")]) == 2
    assert "--out-of-core needs --expert-stats" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in src.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    victim = next(n for n in index["weight_map"] if ".experts.3." in n)
    (broken / index["weight_map"][victim]).unlink()
    assert main(["prune", "--model", str(broken), "--expert-stats", str(stats), "--experts", "0.25", "--out-of-core",
                 "--out", str(tmp_path / "y")]) == 2
    assert "is missing" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_eval_and_bench_on_pruned_moe_models(saved, tmp_path, capsys):
    """``minigpt eval`` and ``minigpt bench`` read pruned MoE models, stock and per-layer: parameters (total,
    experts as MLP, active per token), latency and throughput."""
    src, stats = saved("qwen2_moe")
    dirs = {}
    for scope, ratio in (("uniform", "0.25"), ("global", "0.125")):
        dirs[scope] = tmp_path / scope
        assert main(["prune", "--model", str(src), "--expert-stats", str(stats), "--experts", ratio, "--scope", scope,
                     "--no-eval", "--out", str(dirs[scope])]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(dirs["global"]), "--data", str(STDLIB / "shlex.py"), "--eval-tokens", "128",
                 "--eval-seq-len", "32", "--no-progress", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] > 1 and result["params"]["mlp"] > 0
    report = bench.benchmark([str(src), str(dirs["uniform"]), str(dirs["global"])], prompt_lengths=[8],
                             decode_tokens=2, batch_sizes=[1], repeats=1, warmup=0)
    base, uniform, per_layer = report["models"]
    assert base["experts"] == [8, 8] and uniform["experts"] == [6, 6] and per_layer["experts"] == [6, 8]
    assert base["params"]["total"] > per_layer["params"]["total"] > uniform["params"]["total"]
    # a token goes through top-k experts of any count: only the routers' removed rows (2 layers × 2 × hidden 32) go
    assert base["params"]["active"] - uniform["params"]["active"] == 2 * 2 * 32 < base["params"]["total"]
    assert all(m["decode"]["1"]["tokens_per_s"] > 0 for m in report["models"])
    with pytest.raises(MiniGPTError, match="expert"):
        bench.benchmark([f"{src}@0.5"], prompt_lengths=[8], decode_tokens=2, batch_sizes=[1], repeats=1, warmup=0)
    model = load_model(str(dirs["uniform"]))[0]
    assert uniform["params"]["active"] == moe_parameter_counts(model)["active"]


def test_real_moe_experiment_runs_on_a_saved_model(saved, tmp_path):
    """``python -m bench.moe_routing --model DIR``, the documented command for a real checkpoint, on a tiny saved
    one: routing table, plan, parameters, perplexity before/after and the plot."""
    import sys
    from pathlib import Path

    from scale_helpers import run

    src, _ = saved("olmoe")
    out = tmp_path / "moe_olmoe"
    done = run([sys.executable, "-m", "bench.moe_routing", "--model", str(src), "--data", str(STDLIB / "argparse.py"),
                "--max-tokens", "256", "--seq-len", "32", "--eval-data", str(STDLIB / "shlex.py"), "--eval-tokens",
                "128", "--scope", "global", "--experts", "0.125", "--out", str(out)],
               cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    result = json.loads(out.with_suffix(".json").read_text())["results"][0]
    assert [layer["kept"] for layer in result["report"]["layers"]] == [[0, 1, 2, 3, 4, 6], list(range(8))]
    before, after = result["perplexity"]["before"], result["perplexity"]["after"]  # only never-routed experts went
    assert before["tokens"] == after["tokens"] > 100 and after["perplexity"] == pytest.approx(before["perplexity"])
    assert "| held-out perplexity" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_out_of_core_reads_fused_expert_tensors(saved, tmp_path):
    """A checkpoint holding the fused 3-D ``experts.gate_up_proj`` / ``experts.down_proj`` (as the model's own
    state dict names them) prunes out of core to the same model as the per-expert one."""
    from safetensors.torch import save_file

    src, stats = saved("qwen2_moe")
    fused = tmp_path / "fused"
    model, tokenizer = load_model(str(src))
    model.config.save_pretrained(fused)
    tokenizer.save_pretrained(fused)
    state = model.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight" or not model.config.tie_word_embeddings},
              str(fused / "model.safetensors"))
    args = ["--expert-stats", str(stats), "--experts", "0.25", "--expert-neurons", "0.25", "--no-eval", "--out-of-core"]
    assert main(["prune", "--model", str(src), *args, "--out", str(tmp_path / "a")]) == 0
    assert main(["prune", "--model", str(fused), *args, "--out", str(tmp_path / "b")]) == 0
    a, b = load_model(str(tmp_path / "a"))[0].state_dict(), load_model(str(tmp_path / "b"))[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
