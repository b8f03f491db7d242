"""Time of neuron selection and of the least-squares refit, per layer, on a real model and its statistics.

For each amount and each method (``l1+lstsq``: the metric's lowest go; ``obs+lstsq``: greedy structured OBS,
``minigpt.pipeline.compensate.obs_keep``), every layer's selection and refit (``compensate_layer``: moments, solve, weight
copy) is timed on its own, as ``prune`` runs them. ``l1`` selection is one ranking of the whole model's scores
(``planning.plan``), shown divided by the layer count. Writes ``<out>.json`` and ``<out>.md``.

    python -m bench.compensation_timing --stats stdlib16k.safetensors --out bench/results/compensation_timing_cpu
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from minigpt.io import load_model
from minigpt.models import adapters
from minigpt.pipeline.compensate import DAMPING, compensate_layer, moments, obs_keep
from minigpt.pipeline.planning import plan
from minigpt.pipeline.stats import CalibrationStats


def _spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "total": sum(xs)}


def time_method(model, stats, ratio: float, select: str, damping: float = DAMPING) -> dict:
    """Per-layer seconds of selection and refit for one amount and selection method (on a copy of ``model``)."""
    model = copy.deepcopy(model)
    start = time.perf_counter()
    metric_plan = plan(stats, "l1", ratio=ratio)
    ranking = time.perf_counter() - start
    layers = len(metric_plan.kept)
    layout = adapters.get_layout(model)
    dim = adapters.neuron_dim(layout, "cols")
    select_s, refit_s = [], []
    for layer, (mlp, count) in enumerate(zip(adapters.mlps(model), metric_plan.kept_widths)):
        start = time.perf_counter()
        if select == "obs":
            m, _ = moments(stats, layer, centred=True)
            kept = obs_keep(getattr(mlp, layout.cols[0]).weight.detach().movedim(dim, 1), m, count, damping)
            select_s.append(time.perf_counter() - start)
        else:
            kept = metric_plan.kept_tensors()[layer]
            select_s.append(ranking / layers)
        start = time.perf_counter()
        compensate_layer(model, stats, layer, kept, "lstsq", damping)
        refit_s.append(time.perf_counter() - start)
    return {"ratio": ratio, "method": f"{'obs' if select == 'obs' else 'l1'}+lstsq", "layers": layers,
            "width": adapters.widths(model)[0], "kept": metric_plan.kept_widths[0],
            "select_seconds": _spread(select_s), "refit_seconds": _spread(refit_s),
            "per_layer_seconds": _spread([a + b for a, b in zip(select_s, refit_s)])}


def markdown(result: dict) -> str:
    lines = [(f"Selection + least-squares refit per layer, {result['model']} ({result['rows'][0]['layers']} layers, "
             f"MLP width {result['rows'][0]['width']}), statistics {result['stats']}; {result['machine']}, "
             f"torch {result['torch']}, load average {result['load_average']} at the start (shared machine). "
             "Median [min–max] seconds per layer; whole model = sum over layers."), "",
             "| MLP removed | method | selection s/layer | refit s/layer | selection + refit s/layer | whole model s |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        cells = [f"{r[k]['median']:.3f} [{r[k]['min']:.3f}–{r[k]['max']:.3f}]"
                 for k in ("select_seconds", "refit_seconds", "per_layer_seconds")]
        lines.append(f"| {100 * r['ratio']:.0f} % | {r['method']} | {' | '.join(cells)} | "
                     f"{r['per_layer_seconds']['total']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--stats", required=True, help="statistics with Gram matrices (minigpt calibrate)")
    p.add_argument("--out", required=True, help="path without suffix: writes OUT.json and OUT.md")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    stats = CalibrationStats.load(args.stats)
    result = {"model": args.model or "SmolLM2-135M-Instruct", "stats": f"{stats.gram_tokens:,} Gram tokens",
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), CPU",
              "torch": torch.__version__, "load_average": round(os.getloadavg()[0], 1), "rows": []}
    for ratio in args.ratios:
        for select in ("metric", "obs"):
            result["rows"].append(time_method(model, stats, ratio, select))
            print(json.dumps(result["rows"][-1]), flush=True)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
