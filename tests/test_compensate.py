"""Gram statistics, least-squares / bias compensation, OBS selection, sequential mode and the quality budget."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from scale_helpers import save_model

from minigpt.cli import main
from minigpt.models import adapters
from minigpt.pipeline.calibration import calibrate, run_batches
from minigpt.pipeline.compensate import compensate_layer, moments, obs_keep, refit
from minigpt.pipeline.data import Batches, resolve_files
from minigpt.pipeline.importance import stats_scores
from minigpt.pipeline.planning import MLPPolicy, PruningPlan, plan_from_scores
from minigpt.pipeline.prune import prune
from minigpt.pipeline.sequential import prune_sequential
from minigpt.pipeline.stats import CalibrationStats, fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")
CALIB = {"max_tokens": 1024, "seq_len": 64, "batch_size": 2, "progress": False}


def _batches(tokenizer, corpus_dir) -> list[torch.Tensor]:
    return list(Batches(tokenizer, resolve_files([str(corpus_dir)]), seq_len=64, batch_size=2, max_tokens=1024))


@torch.inference_mode()
def _down_inputs(model, batches) -> list[torch.Tensor]:
    """Every layer's down_proj input over ``batches`` as ``(T, N)`` float64, captured by hooks (the oracle)."""
    layout = adapters.get_layout(model)
    seen = [[] for _ in adapters.mlps(model)]
    hooks = [getattr(m, layout.cols[0]).register_forward_pre_hook(
        lambda mod, args, i=i: seen[i].append(args[0].reshape(-1, args[0].shape[-1]).double()))
        for i, m in enumerate(adapters.mlps(model))]
    for ids in batches:
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return [torch.cat(s) for s in seen]


def _gram_stats(model, tokenizer, batches, gram_tokens=None) -> CalibrationStats:
    stats = CalibrationStats.empty(fingerprint(model, tokenizer), gram=True)
    return run_batches(model, batches, stats, backend="torch", progress=False, gram_tokens=gram_tokens)


def test_gram_is_the_sum_of_outer_products_and_honours_its_token_budget(tiny_tokenizer, corpus_dir):
    model = tiny_model("llama")
    batches = _batches(tiny_tokenizer, corpus_dir)
    xs = _down_inputs(model, batches)
    stats = _gram_stats(model, tiny_tokenizer, batches)
    assert stats.gram_tokens == stats.tokens == xs[0].shape[0]
    for x, g, s in zip(xs, stats.gram, stats.gram_sum):
        torch.testing.assert_close(g, x.T @ x, rtol=1e-5, atol=1e-5 * float((x.T @ x).abs().max()))
        torch.testing.assert_close(s, x.sum(0), rtol=1e-5, atol=1e-4)
    partial = _gram_stats(model, tiny_tokenizer, batches, gram_tokens=200)  # whole batches of 128 tokens: 256
    x = xs[0][:256]
    assert partial.gram_tokens == 256 and partial.tokens == stats.tokens
    torch.testing.assert_close(partial.gram[0], x.T @ x, rtol=1e-5, atol=1e-5 * float((x.T @ x).abs().max()))


def test_gram_merges_saves_and_old_files_load(tiny_tokenizer, corpus_dir, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = tiny_model("llama")
    batches = _batches(tiny_tokenizer, corpus_dir)
    whole = _gram_stats(model, tiny_tokenizer, batches)
    merged = _gram_stats(model, tiny_tokenizer, batches[:3]).merge(_gram_stats(model, tiny_tokenizer, batches[3:]))
    assert merged.gram_tokens == whole.gram_tokens
    for a, b in zip(merged.gram, whole.gram):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))
    whole.save(tmp_path / "s.safetensors")
    back = CalibrationStats.load(tmp_path / "s.safetensors")
    assert back.gram_tokens == whole.gram_tokens and all(torch.equal(a, b) for a, b in zip(back.gram, whole.gram))
    # a format-1 file (before Gram statistics) still loads, without them; merging with one drops the Gram
    old = CalibrationStats.empty(whole.fingerprint)
    old.save(tmp_path / "v1.safetensors")
    with safe_open(str(tmp_path / "v1.safetensors"), framework="pt") as f:
        header, tensors = json.loads(f.metadata()["minigpt"]), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    header["format_version"] = 1
    header.pop("gram_tokens")
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata={"minigpt": json.dumps(header)})
    v1 = CalibrationStats.load(tmp_path / "v1.safetensors")
    assert v1.gram is None and whole.merge(v1).gram is None


def test_calibrate_collects_gram_when_asked_and_reports_its_size(tiny_tokenizer, corpus_dir):
    model = tiny_model("gpt2")
    stats = calibrate(model, tiny_tokenizer, [str(corpus_dir)], gram=True, **CALIB)
    assert stats.gram is not None and stats.meta["gram_bytes"] == 2 * 48 * 48 * 8
    assert calibrate(model, tiny_tokenizer, [str(corpus_dir)], gram=False, **CALIB).gram is None


def _calibrated(model_type: str, tokenizer, corpus_dir):
    """``(tiny model, calibration batches, down_proj inputs per layer, Gram statistics)``."""
    model = tiny_model(model_type)
    batches = _batches(tokenizer, corpus_dir)
    return model, batches, _down_inputs(model, batches), _gram_stats(model, tokenizer, batches)

BIAS_SLOT = {"llama": "mlp_bias", "smollm3": "mlp_bias", "opt": "down", "gpt2": "down", "phi": "down",
             **dict.fromkeys(["mistral", "qwen2", "qwen3", "gemma", "phi3", "gemma2", "gemma3_text", "olmo2"], "none")}
"""Every supported dense architecture and where a compensation bias goes (``compensate.bias_slot``)."""


@pytest.mark.parametrize("model_type", list(BIAS_SLOT))
def test_refit_equals_the_float64_closed_form(model_type, tiny_tokenizer, corpus_dir):
    """mlp_bias: switched on (Llama, SmolLM3); down: the projection's own bias (OPT, GPT-2, Phi); none: no place
    for a bias, the uncentred refit (the rest; Phi-3's packed gate_up_proj too)."""
    model, _, xs, stats = _calibrated(model_type, tiny_tokenizer, corpus_dir)
    layout = adapters.get_layout(model)
    dim = adapters.neuron_dim(layout, "cols")
    downs = [getattr(m, layout.cols[0]) for m in adapters.mlps(model)]
    old_w = [d.weight.detach().movedim(dim, 1).double().clone() for d in downs]
    old_b = [None if d.bias is None else d.bias.detach().double().clone() for d in downs]
    pruned, plan = prune(copy.deepcopy(model), tiny_tokenizer, stats=stats, ratio=0.4, compensate="lstsq", damping=0)
    with_bias = BIAS_SLOT[model_type] != "none"
    assert plan.policy["compensate"]["bias"] == BIAS_SLOT[model_type]
    for layer, (x, w, mlp) in enumerate(zip(xs, old_w, adapters.mlps(pruned))):
        kept = plan.kept_tensors()[layer]
        removed = torch.tensor(sorted(set(range(w.shape[1])) - set(kept.tolist())))
        design = torch.cat([x[:, kept], torch.ones(x.shape[0], 1, dtype=x.dtype)], 1) if with_bias else x[:, kept]
        solution = torch.linalg.lstsq(design, x[:, removed] @ w[:, removed].T).solution.T  # (D, K [+ 1])
        expected_w = w[:, kept] + solution[:, : len(kept)]
        down = getattr(mlp, layout.cols[0])
        got_w = down.weight.detach().movedim(dim, 1).double()
        cond = float(torch.linalg.cond(design))
        tol = 5 * cond * torch.finfo(torch.float32).eps  # fp32 Gram sums, fp32 weights: relative to the solution
        assert float((got_w - expected_w).norm() / expected_w.norm()) < tol
        if with_bias:
            expected_b = solution[:, -1] + (old_b[layer] if old_b[layer] is not None else 0)
            got_b = down.bias.detach().double()
            assert float((got_b - expected_b).norm()) < tol * float(expected_b.norm() + w.norm())
    if BIAS_SLOT[model_type] == "mlp_bias":
        assert pruned.config.mlp_bias and float(adapters.mlps(pruned)[0].gate_proj.bias.detach().abs().max()) == 0


@pytest.mark.parametrize("model_type", list(BIAS_SLOT))
def test_compensated_models_of_every_architecture_reload(model_type, tiny_tokenizer, corpus_dir, tmp_path):
    """lstsq (and bias where there is a place for one) on each architecture: the bias is the removed neurons' mean
    contribution, and the saved model reloads with stock ``from_pretrained`` computing the same logits.
    Architectures with no bias slot refuse ``bias`` with a one-line error."""
    from transformers import AutoModelForCausalLM

    from minigpt.errors import MiniGPTError
    from minigpt.pipeline.compact import save_pruned

    model, batches, xs, stats = _calibrated(model_type, tiny_tokenizer, corpus_dir)
    layout = adapters.get_layout(model)
    dim = adapters.neuron_dim(layout, "cols")
    for method in ("lstsq", "bias"):
        if method == "bias" and BIAS_SLOT[model_type] == "none":
            with pytest.raises(MiniGPTError, match="has no MLP output bias"):
                prune(copy.deepcopy(model), tiny_tokenizer, stats=stats, ratio=0.25, compensate="bias")
            continue
        pruned, plan = prune(copy.deepcopy(model), tiny_tokenizer, stats=stats, ratio=0.25, compensate=method)
        if method == "bias":
            for x, old, new, kept in zip(xs, adapters.mlps(model), adapters.mlps(pruned), plan.kept_tensors()):
                old, new = getattr(old, layout.cols[0]), getattr(new, layout.cols[0])
                w = old.weight.detach().movedim(dim, 1).double()
                removed = torch.ones(w.shape[1], dtype=torch.bool)
                removed[kept] = False
                expected = w[:, removed] @ x[:, removed].mean(0) + (0 if old.bias is None else old.bias.double())
                torch.testing.assert_close(new.bias.detach().double(), expected, rtol=1e-4, atol=1e-5)
        out = save_pruned(pruned, tiny_tokenizer, tmp_path / method, plan=plan)
        loaded = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.inference_mode():
            torch.testing.assert_close(loaded(input_ids=batches[0]).logits, pruned(input_ids=batches[0]).logits)


def test_nothing_removed_returns_the_original_weights():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    mu = x.mean(0)
    new, bias = refit(w, x.T @ x / 300 - torch.outer(mu, mu), mu, torch.arange(12), "lstsq", damping=0.01)
    assert torch.equal(new, w) and torch.equal(bias, torch.zeros(5, dtype=torch.float64))


def test_removing_an_exact_linear_combination_leaves_the_output_unchanged(tiny_tokenizer, corpus_dir):
    """OPT (ReLU, fc1 bias): neuron 7 duplicates neuron 3 in every layer, so h_7 = h_3 exactly; removing 7 and
    refitting moves its down column onto neuron 3 and the model's logits do not change."""
    model = tiny_model("opt")
    with torch.no_grad():
        for mlp in adapters.mlps(model):
            mlp.fc1.weight[7] = mlp.fc1.weight[3]
            mlp.fc1.bias[7] = mlp.fc1.bias[3]
    batches = _batches(tiny_tokenizer, corpus_dir)
    stats = _gram_stats(model, tiny_tokenizer, batches)
    widths = adapters.widths(model)
    plan = PruningPlan(kept=[[i for i in range(n) if i != 7] for n in widths], widths=widths,
                       fingerprint=stats.fingerprint)
    with torch.inference_mode():
        before = model(input_ids=batches[0]).logits
    for method, unchanged in (("lstsq", True), ("none", False)):
        pruned, _ = prune(copy.deepcopy(model), tiny_tokenizer, stats=stats, pruning_plan=plan, compensate=method,
                          damping=1e-10)
        with torch.inference_mode():
            after = pruned(input_ids=batches[0]).logits
        assert torch.allclose(after, before, atol=1e-4, rtol=1e-4) == unchanged, method


def _error(x, y, kept) -> float:
    """Least-squares error of fitting ``y: (T, D)`` from the columns ``kept`` of ``x: (T, N)``."""
    xs = x[:, sorted(kept)]
    return float(((y - xs @ torch.linalg.lstsq(xs, y).solution) ** 2).sum())


def test_obs_order_and_error_match_brute_force():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(400, 10, generator=gen, dtype=torch.float64) @ torch.randn(10, 10, generator=gen,
                                                                                 dtype=torch.float64)
    w = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    y, m = x @ w.T, x.T @ x
    alive = set(range(10))
    for keep in range(9, 3, -1):  # brute-force greedy: remove the neuron whose removal (refitting the rest) costs least
        alive.remove(min(alive, key=lambda j: _error(x, y, alive - {j})))
        got = obs_keep(w, m, keep, damping=0, block=1)
        assert set(got.tolist()) == alive, keep
        assert _error(x, y, got.tolist()) == pytest.approx(_error(x, y, alive), rel=1e-9)
    best = min(itertools.combinations(range(10), 4), key=lambda k: _error(x, y, set(k)))
    batched = obs_keep(w, m, 4, damping=0, block=3)
    assert len(batched) == 4 and _error(x, y, batched.tolist()) <= 3 * _error(x, y, set(best))


def test_sequential_equals_the_computation_by_hand(tiny_tokenizer, corpus_dir):
    model = tiny_model("llama")
    data = [str(corpus_dir)]
    auto, plan = prune_sequential(copy.deepcopy(model), tiny_tokenizer, data, policy=MLPPolicy(mlp=0.25), select="obs",
                                  compensate="lstsq", backend="torch", **{k: v for k, v in CALIB.items()
                                                                          if k != "progress"})
    hand = copy.deepcopy(model)  # by hand: calibrate the whole (partly refitted) model again before each layer
    kept = []
    for layer in range(len(adapters.mlps(hand))):
        stats = calibrate(hand, tiny_tokenizer, data, gram=True, backend="torch", **CALIB)
        count = plan_from_scores([stats_scores(stats, "l1")[layer]], MLPPolicy(mlp=0.25)).kept_widths[0]
        w = adapters.mlps(hand)[layer].down_proj.weight.detach()
        keep = obs_keep(w, moments(stats, layer, centred=True)[0], count)
        compensate_layer(hand, stats, layer, keep, "lstsq")
        kept.append(keep.tolist())
    assert plan.kept == kept and plan.policy["sequential"]
    for a, b, keep in zip(adapters.mlps(auto), adapters.mlps(hand), plan.kept_tensors()):
        torch.testing.assert_close(a.down_proj.weight, b.down_proj.weight.index_select(1, keep), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.down_proj.bias, b.down_proj.bias, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    return save_model(tiny_model("llama"), tiny_tokenizer, tmp_path_factory.mktemp("comp") / "model")


def _prune(model_dir, corpus_dir, out: Path, *extra) -> int:
    heldout = max(corpus_dir.iterdir())
    return main(["prune", "--model", str(model_dir), "--data", str(corpus_dir), "--max-tokens", "512", "--seq-len",
                 "32", "--batch-size", "2", "--eval-data", str(heldout), "--eval-tokens", "256", "--eval-seq-len",
                 "64", "--no-progress", "--out", str(out), *map(str, extra)])


def test_cli_compensated_obs_model_loads_with_stock_transformers(model_dir, corpus_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "obs"
    assert _prune(model_dir, corpus_dir, out, "--ratio", "0.3", "--select", "obs") == 0
    report = json.loads((out / "minigpt_report.json").read_text())
    assert report["plan"]["compensate"]["method"] == "lstsq" and report["plan"]["select"] == "obs"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.mlp_bias and float(adapters.mlps(loaded)[0].down_proj.bias.abs().max()) > 0


def test_cli_budget_and_sequential(model_dir, corpus_dir, tmp_path):
    out = tmp_path / "budget"
    assert _prune(model_dir, corpus_dir, out, "--max-ppl-increase", "0.05", "--budget-tokens", "256",
                  "--budget-doc-tokens", "64", "--eval-data", corpus_dir) == 0
    report = json.loads((out / "minigpt_report.json").read_text())
    budget = report["budget"]
    assert report["plan"]["budget"] == budget and len(budget["curve"]) >= 2
    assert budget["tokens"] == 256 and budget["documents"] == 4 and budget["confidence"] == 0.95
    assert report["removed_fraction"] == pytest.approx(budget["ratio"], abs=0.02)
    chosen = next(p for p in budget["curve"] if p["ratio"] == budget["ratio"])
    assert chosen["perplexity"] <= budget["limit"] and chosen["increase"] <= chosen["upper_increase"] <= 0.05
    assert all(p["upper_increase"] > 0.05 for p in budget["curve"] if p["ratio"] > budget["ratio"])
    assert _prune(model_dir, corpus_dir, tmp_path / "seq", "--ratio", "0.25", "--sequential") == 0
    assert json.loads((tmp_path / "seq" / "minigpt_plan.json").read_text())["policy"]["sequential"]


@pytest.mark.parametrize("extra", [("--compensate", "lstsq", "--no-gram"), ("--max-ppl-increase", "0"),
                                   ("--sequential", "--stats", "x.safetensors"), ("--sequential", "--reverse"),
                                   ("--sequential", "--threshold", "0.1"), ("--sequential", "--metric", "maw"),
                                   ("--select", "obs", "--out-of-core", "--stats", "x.safetensors")])
def test_bad_compensation_options_fail_fast(model_dir, corpus_dir, tmp_path, capsys, extra):
    if "--stats" in extra:
        CalibrationStats.empty(fingerprint(tiny_model("llama")), gram=True).save(tmp_path / "x.safetensors")
        extra = tuple(str(tmp_path / e) if e == "x.safetensors" else e for e in extra)
    assert _prune(model_dir, corpus_dir, tmp_path / "o", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minigpt: error: ") and not (tmp_path / "o").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gram_on_cuda_matches_the_float64_reference(tiny_tokenizer, corpus_dir, dtype):
    """The GPU path (the fused statistics op + cuBLAS addmm into fp32) against Σ h hᵀ of the same activations in
    float64: within the fp32 accumulation error of the activations' own dtype (bf16 rounds h itself)."""
    model = tiny_model("llama").to("cuda", dtype)
    batches = _batches(tiny_tokenizer, corpus_dir)
    xs = _down_inputs(model, [b.cuda() for b in batches])
    stats = CalibrationStats.empty(fingerprint(model, tiny_tokenizer), gram=True)
    run_batches(model, batches, stats, backend="auto", progress=False)
    for x, g in zip(xs, stats.gram):
        ref = (x.T @ x).cpu()
        torch.testing.assert_close(g.cpu(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
