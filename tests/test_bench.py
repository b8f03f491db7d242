"""``minigpt.tools.bench`` on tiny random models: report fields, pruned < original, JSON/markdown/PNG, bad specs."""

from __future__ import annotations

import argparse
import json

import pytest

from minigpt.cli import bench as bench_cli
from minigpt.errors import MiniGPTError
from minigpt.tools import bench

SMALL = {"prompt_lengths": [8, 16], "decode_tokens": 2, "batch_sizes": [1, 2], "repeats": 2, "warmup": 0}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest and steadiest on one thread


@pytest.fixture(scope="module")
def report():
    return bench.benchmark(["tiny-llama", "tiny-llama@0.5"], **SMALL)


def test_report_fields(report):
    assert set(report["meta"]) >= {"device", "dtype", "torch", "cpu_threads", *SMALL}
    for m in report["models"]:
        assert set(m["params"]) >= {"total", "mlp", "attention", "embedding"} and m["weight_bytes"] > 0
        assert set(m["prefill"]) == {"8", "16"} and set(m["decode"]) == {"1", "2"}
        assert all(s["q1_ms"] <= s["median_ms"] <= s["q3_ms"] for s in (*m["prefill"].values(), m["generate"]))
        assert all(d["tokens_per_s"] > 0 for d in m["decode"].values())
        assert {p: set(v) >= {"peak_bytes", "increase_bytes", "method"} for p, v in m["memory"].items()} == {
            "prefill": True, "generate": True}
        assert set(m["relative"]) >= {"weight_bytes_saving_pct", "prefill_speedup", "decode_speedup"}
    assert report["models"][0]["relative"]["decode_speedup"] == {"1": 1.0, "2": 1.0}


def test_pruned_is_smaller(report):
    base, pruned = report["models"]
    assert pruned["mlp_widths"] == [128, 128] and base["mlp_widths"] == [256, 256]
    assert pruned["params"]["total"] < base["params"]["total"] and pruned["weight_bytes"] < base["weight_bytes"]
    assert pruned["params"]["mlp"] == base["params"]["mlp"] // 2
    assert pruned["relative"]["weight_bytes_saving_pct"] > 0


def test_specs_and_ablation():
    assert bench.ModelSpec.parse("llama-3.1-8b@0.4/128") == bench.ModelSpec("llama-3.1-8b@0.4/128", "llama-3.1-8b",
                                                                              0.4, 128)
    specs = bench.expand_ablation([bench.ModelSpec.parse(s) for s in ("tiny-llama", "tiny-llama@0.4")], [1, 64])
    assert [s.text for s in specs] == ["tiny-llama", "tiny-llama@0.4/1", "tiny-llama@0.4/64"]


def test_parameter_budget_spec():
    """``@params=KEEP``: the ``--target-params`` rule on the named shape (it decides how many heads and MLP neurons
    go; the MLP ratio fills the budget, so close to KEEP of the parameters stay)."""
    assert bench.ModelSpec.parse("llama-3.1-8b@params=0.6") == bench.ModelSpec(
        "llama-3.1-8b@params=0.6", "llama-3.1-8b", target_params=0.6)
    report = bench.benchmark(["tiny-llama", "tiny-llama@params=0.7"], **SMALL)
    base, pruned = (m["params"] for m in report["models"])
    assert 0.65 * base["total"] <= pruned["total"] <= 0.7 * base["total"] and pruned["mlp"] < base["mlp"]
    model = bench.load(bench.ModelSpec.parse("tiny-llama@params=0.7"), "cpu", bench.torch.float32)
    assert sum(p.numel() for p in model.parameters()) == pruned["total"]


@pytest.mark.parametrize("spec", ["no-such-model", "tiny-llama@1.5", "tiny-llama@x", "tiny-llama@0.4/0",
                                  "tiny-llama@params=0", "tiny-llama@params=1"])
def test_bad_spec_is_one_line(spec):
    with pytest.raises(MiniGPTError) as err:
        bench.benchmark([spec], **SMALL)
    assert "\n" not in str(err.value) and spec in str(err.value)


def test_cli_writes_json_markdown_png(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench_cli.add_parser(parser.add_subparsers(dest="command"))
    out = {k: tmp_path / f"bench.{k}" for k in ("json", "md", "png")}
    args = parser.parse_args(["bench", "--model", "tiny-llama", "--model", "tiny-llama@0.25/64", "--device", "cpu",
                              "--prompt-lengths", "8", "--batch-sizes", "1", "--decode-tokens", "2", "--repeats", "1",
                              "--warmup", "0", "--json", str(out["json"]), "--markdown", str(out["md"]),
                              "--plot", str(out["png"])])
    args.func(args)
    report = json.loads(out["json"].read_text())
    assert [m["spec"] for m in report["models"]] == ["tiny-llama", "tiny-llama@0.25/64"]
    assert "| tiny-llama@0.25/64 |" in capsys.readouterr().out and "decode b1 tok/s" in out["md"].read_text()
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
