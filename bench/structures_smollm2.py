"""SmolLM2 at −25 % parameters, pruned by structure: MLP only, heads + MLP, hidden + MLP, depth (Block Influence vs
random layers) and the ``--target-params`` allocation; held-out perplexity on stdlib and pydocs, and every plan's
paired difference to MLP-only with a bootstrap interval over documents.

    minigpt calibrate --data stdlib --max-tokens 8192 --doc-tokens 512 --batch-size 4 --gram --out stats.safetensors
    OMP_NUM_THREADS=1 python -m bench.structures_smollm2 --stats stats.safetensors

One calibration (stdlib, every statistic and the Gram statistics of down_proj's and o_proj's inputs in one pass)
serves every plan (``--stats``; calibrated here when absent). Every plan is compensated the same way: the least-squares
refit of every down_proj on the kept neurons and, where heads go, of every o_proj on the kept heads
(``--compensate lstsq``, the CLI default). For each mixed plan the fixed amount of the other structure is set and
the MLP ratio is the smallest on a 1/100 grid whose model keeps ≤ 75 % of the parameters (counted exactly on a
meta-device copy); depth alone removes the fewest layers reaching the budget. Each row is the ``minigpt prune``
command in the JSON.

Held-out text, per corpus (stdlib, pydocs): a window of at most ``--eval-doc-tokens`` tokens of each document in file
order, each window scored on its own after an EOS token (``minigpt.pipeline.budget.document_nll``). The first
documents up to ``--eval-tokens`` are the test slice; the next documents up to ``--val-tokens`` the validation
slice. The heads + MLP candidates (``--kv-groups``, ``--query-units``) are scored on the validation slice only, the
best KV-group and the best query-head plan (lowest mean over the two corpora of the per-token NLL difference to
MLP-only) are chosen there, and only then scored on the test slice with the other rows: the reported comparison is
not the one the choice was made on. For each row and corpus, ``Δ`` is the mean per-token NLL difference to MLP-only
on the same test tokens, ``ΣΔ_d / Σn_d`` over documents, with a percentile interval from a bootstrap over documents
(``bootstrap_difference``); "both" averages the two corpora (each resampled on its own). Writes
``bench/results/structures_smollm2_cpu.{json,md,png}`` (rewritten after every row). Last, vocabulary + MLP against
MLP-only in bits per byte (``per_byte``: a pruned vocabulary changes the tokens, so per-token NLLs do not compare).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

import minigpt
from minigpt.pipeline import importance
from minigpt.pipeline.budget import bootstrap_difference, document_nll, sizing_documents
from minigpt.pipeline.data import iter_texts, resolve_files
from minigpt.pipeline.policy import Policy, params_after, structure_plan
from minigpt.pipeline.stats import CalibrationStats

RESULTS = Path(__file__).with_name("results")
CORPORA = ("stdlib-heldout", "pydocs-heldout")
BASELINE = "MLP only"


def smallest_mlp(stats, model, policy: Policy, scores, budget: float, grid: int = 100) -> Policy:
    """``policy`` with the smallest MLP ratio (1/``grid`` grid) keeping ≤ ``budget`` parameters."""
    lo, hi = 0, int(0.95 * grid)
    structures = structure_plan(stats, model, policy)
    while lo < hi:
        mid = (lo + hi) // 2
        if params_after(stats, model, replace(policy, mlp=mid / grid), scores, structures) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return replace(policy, mlp=lo / grid)


def matched_mlp(stats, model, scores, params: int) -> Policy:
    """MLP only at the largest ratio on the per-neuron grid whose model keeps ≥ ``params`` parameters (both counts
    by ``params_after``, whose estimates are compared with each other only)."""
    grid = model.config.intermediate_size
    k = round(smallest_mlp(stats, model, Policy(mlp=0.0), scores, params, grid).mlp * grid)
    if params_after(stats, model, Policy(mlp=k / grid), scores) < params:
        k -= 1
    return Policy(mlp=k / grid)


def per_byte(stats, scores, docs: dict, mlp_row: dict, budget: float, args) -> dict:
    """MLP-only against vocabulary + MLP at no more parameters, in bits per byte: a pruned vocabulary tokenizes the
    same text into other tokens, so per-token NLLs do not compare. Both models score the decoded test windows, each
    with its own tokenizer after an EOS; Δ is per byte, bootstrapped over documents as the token Δ is.

    The kept vocabulary: counted over ``--vocab-tokens`` stdlib tokens and sized by ``choose_vocab`` on the
    unpruned model within ``--max-bpb-increase`` on the validation windows of both corpora (no test text); then
    the smallest MLP ratio (1/100 grid, the refit's MLP biases counted) whose model with that vocabulary keeps no
    more parameters than MLP-only."""
    from minigpt.pipeline.prune import prune_vocabulary
    from minigpt.pipeline.vocab import corpus_token_counts
    from minigpt.pipeline.vocab_size import choose_vocab

    model, tokenizer = minigpt.load_model()
    texts = {c: [tokenizer.decode(d) for d in docs[c]["test"]] for c in CORPORA}
    nbytes = {c: torch.tensor([len(t.encode()) for t in texts[c]], dtype=torch.float64) for c in CORPORA}
    validation = [tokenizer.decode(d) for c in CORPORA for d in docs[c]["validation"]]
    counts = corpus_token_counts(tokenizer, "stdlib", args.vocab_tokens, len(tokenizer), progress=False)
    keep, choice = choose_vocab(model, tokenizer, counts, validation, max_increase=args.max_bpb_increase)
    ceiling = mlp_row["params"]

    def score(model, tokenizer) -> dict:
        return {c: document_nll(model, tokenizer, [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"])
                                                   for t in texts[c]], batch_size=8)[0] for c in CORPORA}

    def row(name: str, model, tokenizer, ratio: float) -> dict:
        nll = score(model, tokenizer)
        return {"plan": name, "mlp_ratio": ratio, "vocab": len(tokenizer),
                "params": sum(p.numel() for p in model.parameters()),
                "bits_per_byte": {c: round(float(nll[c].sum() / nbytes[c].sum()) / math.log(2), 5) for c in CORPORA},
                "nll": {c: [round(float(x), 4) for x in nll[c]] for c in CORPORA}}

    rows = [row("unpruned", model, tokenizer, 0.0)]
    saved = sum(p.numel() for p in model.get_input_embeddings().parameters()) * (1 - len(keep) / len(tokenizer))
    ratio = smallest_mlp(stats, model, Policy(mlp=0.0), scores, budget + saved).mlp
    base_ratio = mlp_row["policy"]["ratio"]
    pruned, _ = minigpt.prune(model, tokenizer, stats=stats, policy=Policy(mlp=base_ratio), compensate="lstsq")
    rows.append(row(BASELINE, pruned, tokenizer, base_ratio))
    while True:  # the estimate ignores the refit's biases and rounding: step up until within MLP-only's size
        model, tokenizer = minigpt.load_model()
        pruned, _ = minigpt.prune(model, tokenizer, stats=stats, policy=Policy(mlp=ratio), compensate="lstsq")
        small, _, _ = prune_vocabulary(pruned, tokenizer, counts, min_count=None, keep_ids=keep)
        if sum(p.numel() for p in pruned.parameters()) <= ceiling:
            break
        ratio = round(ratio + 0.01, 2)
    rows.append(row(f"vocabulary {len(keep):,} tokens + MLP {100 * ratio:.0f} %", pruned, small, ratio))
    for r in rows[1:]:
        r["kept_pct"] = round(100 * r["params"] / rows[0]["params"], 2)
        for c in CORPORA:
            r.setdefault("vs_unpruned", {})[c] = round(r["bits_per_byte"][c] / rows[0]["bits_per_byte"][c], 4)
    last = rows[-1]
    last["vs_mlp"] = {}
    for i, c in enumerate(CORPORA):
        reps = bootstrap_difference(torch.tensor(rows[1]["nll"][c]), torch.tensor(last["nll"][c]), nbytes[c],
                                    args.resamples, i) / math.log(2)
        diff = float((torch.tensor(last["nll"][c]) - torch.tensor(rows[1]["nll"][c])).sum() / nbytes[c].sum())
        bits = interval(diff / math.log(2), reps, args.confidence)
        last["vs_mlp"][c] = {k: v for k, v in bits.items() if k != "ppl_ratio"}  # bits per byte, not nats per token
    return {"vocab_choice": {**choice, "counted_tokens": args.vocab_tokens, "sized_on": "validation windows"},
            "bytes": {c: int(nbytes[c].sum()) for c in CORPORA}, "threads": torch.get_num_threads(), "rows": rows}


def cli_flags(policy: Policy) -> str:
    """The ``minigpt prune`` flags of ``policy``."""
    if policy.target_params is not None:
        return f"--target-params {policy.target_params}"
    flags = [f"--mlp {policy.mlp:g}"]
    if policy.heads:
        flags.append(f"--heads {policy.heads:.6g}" + (" --heads-mode kv" if policy.kv_groups else "")
                     + (" --heads-scope global" if policy.heads_scope == "global" else ""))
    if policy.hidden:
        flags.append(f"--hidden {policy.hidden:g}")
    if policy.layers:
        flags.append(f"--layers {policy.layers}" + (" --layer-metric random" if policy.layer_metric == "random" else ""))
    return " ".join(flags)


def slices(tokenizer, corpus: str, doc_tokens: int, test_tokens: int, val_tokens: int,
           confirm_tokens: int) -> dict[str, list]:
    """``{"test", "validation", "confirm"}``: document windows ``(n_d,)`` of ``corpus``, whole documents in file
    order, the first reaching ``test_tokens``, then the next up to ``val_tokens``, then the next up to
    ``confirm_tokens`` (fewer where the corpus ends)."""
    docs = sizing_documents(tokenizer, iter_texts(resolve_files(corpus), seed=None),
                            test_tokens + val_tokens + confirm_tokens + 2 * doc_tokens, doc_tokens)
    ends = torch.tensor([d.numel() for d in docs]).cumsum(0)
    n_test = int((ends < test_tokens).sum()) + 1
    n_val = int((ends[n_test:] - ends[n_test - 1] <= val_tokens).sum())
    first = n_test + n_val
    n_confirm = int((ends[first:] - ends[first - 1] <= confirm_tokens).sum())
    return {"test": docs[:n_test], "validation": docs[n_test: first], "confirm": docs[first: first + n_confirm]}


def compare(base: list[float], other: list[float], tokens: torch.Tensor, resamples: int, seed: int,
            confidence: float) -> tuple[dict, torch.Tensor]:
    """The paired difference of ``other`` to ``base`` (per-document NLL sums) and its bootstrap replicates."""
    reps = bootstrap_difference(torch.tensor(base), torch.tensor(other), tokens, resamples, seed)
    diff = float((torch.tensor(other, dtype=torch.float64) - torch.tensor(base, dtype=torch.float64)).sum()
                 / tokens.sum())
    return interval(diff, reps, confidence), reps


def interval(diff: float, reps: torch.Tensor, confidence: float) -> dict:
    lo, hi = torch.quantile(reps, torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=reps.dtype))
    return {"diff": round(diff, 5), "lo": round(float(lo), 5), "hi": round(float(hi), 5),
            "ppl_ratio": round(math.exp(diff), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stats", help="statistics file (minigpt calibrate, with Gram statistics): reused")
    parser.add_argument("--cal-tokens", type=int, default=8192, help="calibration tokens when --stats is absent")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="test tokens per held-out corpus")
    parser.add_argument("--val-tokens", type=int, default=4096, help="validation tokens per held-out corpus")
    parser.add_argument("--eval-doc-tokens", type=int, nargs=2, default=[256, 512], metavar=("STDLIB", "PYDOCS"),
                        help="at most this many tokens of each stdlib / pydocs document")
    parser.add_argument("--keep", type=float, default=0.75, help="fraction of parameters kept")
    parser.add_argument("--kv-groups", type=int, nargs="+", default=[1, 2, 3],
                        help="candidates: KV groups removed over all layers (--heads-scope global)")
    parser.add_argument("--query-units", type=int, nargs="+", default=[3, 4, 5, 6],
                        help="candidates: units of one query head per KV group removed over all layers")
    parser.add_argument("--test-kv-groups", type=int, nargs="*", default=[3],
                        help="KV-group candidates also scored on the test slice whatever the validation says (3: the "
                             "plan an earlier table on 2,048 tokens favoured)")
    parser.add_argument("--confirm-tokens", type=int, default=0,
                        help="a third slice, the documents after the validation slice (corpora where it holds ≥ 10): "
                             "MLP only and the --test-kv-groups plans scored there after the test rows")
    parser.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples of the documents")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--extra", action="store_true",
                        help="also the unpruned model, one layer + MLP and KV groups 1/3 in every layer")
    parser.add_argument("--vocab-tokens", type=int, default=1_000_000,
                        help="stdlib tokens the vocabulary row counts token frequencies over")
    parser.add_argument("--max-bpb-increase", type=float, default=0.01,
                        help="the vocabulary row's bound on the validation windows' bits per byte")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of the saved JSON (same command) and measure only the missing ones")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the saved JSON")
    args = parser.parse_args()
    if not set(args.test_kv_groups) <= set(args.kv_groups):
        parser.error("--test-kv-groups must be among --kv-groups")
    if args.plot_only:
        return plot(json.loads((RESULTS / "structures_smollm2_cpu.json").read_text()))
    torch.manual_seed(0)
    model, tokenizer = minigpt.load_model()
    total = sum(p.numel() for p in model.parameters())
    budget = args.keep * total
    start = time.perf_counter()
    if args.stats and Path(args.stats).exists():
        stats = CalibrationStats.load(args.stats)
    else:
        stats = minigpt.calibrate(model, tokenizer, "stdlib", max_tokens=args.cal_tokens, seq_len=512,
                                  batch_size=4, doc_tokens=512, gram=True, progress=False)
        if args.stats:
            stats.save(args.stats)
    cal_seconds = stats.meta.get("seconds", round(time.perf_counter() - start, 1))
    scores = importance.scores("l1", stats=stats)
    docs = {c: slices(tokenizer, c, n, args.eval_tokens, args.val_tokens, args.confirm_tokens)
            for c, n in zip(CORPORA, args.eval_doc_tokens)}
    for sl in docs.values():  # a confirmation on a handful of documents would say nothing
        if len(sl["confirm"]) < 10:
            del sl["confirm"]
    tokens = {c: {s: torch.tensor([d.numel() for d in ds], dtype=torch.float64) for s, ds in sl.items()}
              for c, sl in docs.items()}
    layers = next(n for n in range(1, 30) if params_after(stats, model, Policy(mlp=0.0, layers=n), scores) <= budget)
    n_groups = model.config.num_hidden_layers * model.config.num_key_value_heads
    per = model.config.num_attention_heads // model.config.num_key_value_heads  # a unit: one head of each group
    candidates = {f"{g} KV groups (global) + MLP": Policy(mlp=0.0, heads=g / n_groups, kv_groups=True,
                                                          heads_scope="global") for g in args.kv_groups}
    candidates.update({f"{u}×{model.config.num_key_value_heads} query heads (global) + MLP": Policy(
        mlp=0.0, heads=u / (model.config.num_hidden_layers * per), heads_scope="global") for u in args.query_units})
    out = {"model": "SmolLM2-135M-Instruct", "device": "cpu", "threads": torch.get_num_threads(),
           "calibration": {"corpus": "stdlib", "tokens": stats.tokens, "gram_tokens": stats.gram_tokens,
                           "doc_tokens": stats.meta.get("corpus", {}).get("doc_tokens"), "seconds": cal_seconds},
           "compensate": "lstsq", "keep": args.keep, "total_params": total, "resamples": args.resamples,
           "confidence": args.confidence, "scoring": "each document window on its own after an EOS token",
           "corpora": {c: {"doc_tokens": n, **{s: {"documents": len(t), "tokens": int(t.sum()),
                                                   "tokens_per_doc": [int(x) for x in t]}
                                               for s, t in tokens[c].items()}}
                       for c, n in zip(CORPORA, args.eval_doc_tokens)},
           "selection": [], "chosen": {}, "rows": [],
           "command": "OMP_NUM_THREADS=1 python -m bench.structures_smollm2 --stats STATS " + " ".join(
               f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
               for k, v in vars(args).items() if k not in ("plot_only", "stats", "extra", "resume"))
           + (" --extra" if args.extra else "")}

    def run(name: str, policy: Policy | None, parts: tuple[str, ...]) -> dict:
        """Prune by ``policy`` (the MLP filling the budget where the name says so) and score the slices ``parts``."""
        model, tokenizer = minigpt.load_model()
        plan, t0 = None, time.perf_counter()
        if policy is not None:
            if "MLP" in name and not policy.mlp:  # the MLP fills the rest of the budget
                policy = smallest_mlp(stats, model, policy, scores, budget)
            model, plan = minigpt.prune(model, tokenizer, stats=stats, policy=policy, compensate="lstsq")
        row = {"plan": name, "params": sum(p.numel() for p in model.parameters()),
               "prune_seconds": round(time.perf_counter() - t0, 1), "policy": plan.policy if plan else None,
               "heads_per_layer": [len(h) for h in plan.heads] if plan and plan.heads else None,
               "cli": None if policy is None else f"minigpt prune --stats STATS {cli_flags(policy)}"}
        row["kept_pct"] = round(100 * row["params"] / total, 2)
        t0 = time.perf_counter()
        for part in parts:
            row[part] = {}
            for c in (c for c in CORPORA if part in docs[c]):
                nll, _ = document_nll(model, tokenizer, docs[c][part], batch_size=8)
                row[part][c] = {"ppl": round(math.exp(float(nll.sum() / tokens[c][part].sum())), 4),
                                "nll": [round(float(x), 4) for x in nll]}
        row["eval_seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({k: v for k, v in row.items() if k not in ("policy", "test", "validation")}), flush=True)
        return row

    def versus(row: dict, base: dict, part: str) -> dict:
        """Paired differences of ``row`` to ``base`` on ``part``, per corpus and for both."""
        res, reps = {}, []
        for i, c in enumerate(c for c in CORPORA if c in row[part]):
            res[c], r = compare(base[part][c]["nll"], row[part][c]["nll"], tokens[c][part], args.resamples, i,
                                args.confidence)
            reps.append(r)
        if len(reps) == len(CORPORA):
            res["both"] = interval(sum(res[c]["diff"] for c in CORPORA) / len(CORPORA), sum(reps) / len(reps),
                                   args.confidence)
        return res

    done: dict[str, dict] = {}
    if args.resume:
        saved = json.loads((RESULTS / "structures_smollm2_cpu.json").read_text())
        same = ("calibration", "corpora", "keep", "total_params", "resamples", "confidence")

        def measured(k: str, entry: dict) -> object:  # a confirmation slice added later may be missing from either
            return {c: {s: v for s, v in d.items() if s != "confirm"} for c, d in entry[k].items()} \
                if k == "corpora" else entry[k]

        differ = [k for k in same if measured(k, saved) != measured(k, out)]
        if differ:
            raise SystemExit(f"--resume: the saved rows differ in {', '.join(differ)}")
        out.update({k: saved[k] for k in ("selection", "rows", "chosen", "matched", "confirmation", "per_byte")
                    if k in saved})
        done = {r["plan"]: r for r in out["rows"]}

    def add(name: str, policy: Policy | None) -> dict:
        """The test row of ``name`` (measured unless resumed), with its paired difference to MLP-only."""
        if name in done:
            return done[name]
        row = run(name, policy, ("validation", "test") if name == BASELINE else ("test",))
        if name != BASELINE:
            row["vs_mlp"] = versus(row, mlp_row, "test")
        out["rows"].append(row)
        write(out)
        return row

    mlp_row = add(BASELINE, Policy(mlp=0.0))
    for name, policy in candidates.items():  # chosen on the validation slice before any test score
        if name in {s["plan"] for s in out["selection"]}:
            continue
        row = run(name, policy, ("validation",))
        vs = versus(row, mlp_row, "validation")
        out["selection"].append({"plan": name, "kept_pct": row["kept_pct"], "cli": row["cli"], "vs_mlp": vs,
                                 "validation": {c: row["validation"][c]["ppl"] for c in CORPORA}})
        write(out)
    for family in ("KV groups", "query heads"):
        pool = [s for s in out["selection"] if family in s["plan"]]
        if pool:
            out["chosen"][family] = min(pool, key=lambda s: s["vs_mlp"]["both"]["diff"])["plan"]
    for name in out["chosen"].values():
        add(name, candidates[name])
    for g in args.test_kv_groups:
        add(f"{g} KV groups (global) + MLP", candidates[f"{g} KV groups (global) + MLP"])
    if out["chosen"]:  # the best chosen plan against MLP-only of at least its size, not just within the budget
        best = min((s for s in out["selection"] if s["plan"] in out["chosen"].values()),
                   key=lambda s: s["vs_mlp"]["both"]["diff"])["plan"]
        best_row = next(r for r in out["rows"] if r["plan"] == best)
        policy = matched_mlp(stats, model, scores, params_after(
            stats, model, smallest_mlp(stats, model, candidates[best], scores, budget), scores))
        matched = add(f"MLP only (--mlp {policy.mlp:.6g}), ≥ the size of {best}", policy)
        out["matched"] = {"plan": best, "baseline": matched["plan"], "vs": versus(best_row, matched, "test")}
        write(out)
    if any("confirm" in sl for sl in docs.values()):  # plans fixed before this slice is scored
        by_name = {r["plan"]: r for r in out["rows"]}
        for name, policy in ((BASELINE, Policy(mlp=0.0)), *((f"{g} KV groups (global) + MLP", candidates[
                f"{g} KV groups (global) + MLP"]) for g in args.test_kv_groups)):
            if "confirm" not in by_name[name]:
                by_name[name]["confirm"] = run(name, policy, ("confirm",))["confirm"]
                write(out)
        out["confirmation"] = {name: versus(by_name[name], by_name[BASELINE], "confirm")
                               for name in by_name if name != BASELINE and "confirm" in by_name[name]}
        write(out)
    rows = {f"--target-params {args.keep}": Policy(target_params=args.keep),
            "hidden 5 % + MLP": Policy(mlp=0.0, hidden=0.05),
            f"depth {layers} layers (Block Influence)": Policy(mlp=0.0, layers=layers),
            f"depth {layers} layers (random, seed 0)": Policy(mlp=0.0, layers=layers, layer_metric="random")}
    if args.extra:
        rows.update({"unpruned": None, "depth 1 layer (Block Influence) + MLP": Policy(mlp=0.0, layers=1),
                     "KV groups 1/3 (every layer) + MLP": Policy(mlp=0.0, heads=1 / 3, kv_groups=True)})
    for name, policy in rows.items():
        add(name, policy)
    if "per_byte" not in out:
        out["per_byte"] = per_byte(stats, scores, docs, mlp_row, budget, args)
        write(out)
    plot(out)


def ci(v: dict) -> str:
    return f"{v['diff']:+.4f} [{v['lo']:+.4f}, {v['hi']:+.4f}]"


def write(out: dict) -> None:
    """The JSON and the markdown tables of the rows measured so far."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "structures_smollm2_cpu.json").write_text(json.dumps(out, indent=1))
    cal, corp, pct = out["calibration"], out["corpora"], f"{100 * out['confidence']:g} %"
    slices_text = "; ".join(
        f"{c}: test {v['test']['tokens']:,} tokens in {v['test']['documents']} documents, validation "
        f"{v['validation']['tokens']:,} tokens in {v['validation']['documents']} further documents (≤ "
        f"{v['doc_tokens']} tokens per document)" for c, v in corp.items())
    lines = [(f"SmolLM2-135M-Instruct at ≤ {100 * out['keep']:.0f} % of its {out['total_params']:,} parameters; "
             f"calibration {cal['tokens']} stdlib tokens (≤ {cal['doc_tokens']} per document, Gram statistics over "
             f"{cal['gram_tokens']}); every plan refitted by least squares (down_proj; o_proj where heads go). "
             f"Held-out text, each document window scored on its own after an EOS token: {slices_text}. "
             f"Δ: mean per-token NLL (nats) of the plan minus MLP-only's on the same test tokens, with the {pct} "
             f"percentile interval of {out['resamples']:,} bootstrap resamples of the documents; negative = better "
             "than MLP-only; *both* averages the two corpora. CPU, "
             f"{out['threads']} thread. Command: `{out['command']}`."), "",
             ("| plan | MLP removed | heads kept | params kept | stdlib ppl | Δ stdlib | pydocs ppl | Δ pydocs | Δ both "
              "| flags |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for row in out["rows"]:
        mlp = (row["policy"] or {}).get("ratio") or 0.0
        heads = sum(row["heads_per_layer"]) if row["heads_per_layer"] else "all"
        flags = row["cli"].removeprefix("minigpt prune --stats STATS ") if row["cli"] else ""
        vs = row.get("vs_mlp")
        s, p = CORPORA
        lines.append(f"| {row['plan']} | {100 * mlp:.1f} % | {heads} | {row['kept_pct']} % | "
                     f"{row['test'][s]['ppl']} | {ci(vs[s]) if vs else '—'} | {row['test'][p]['ppl']} | "
                     f"{ci(vs[p]) if vs else '—'} | {ci(vs['both']) if vs else '—'} | `{flags}` |")
    if out.get("matched"):
        m, by_plan = out["matched"], {r["plan"]: r for r in out["rows"]}
        lines += ["", (f"At equal size: {m['plan']} ({by_plan[m['plan']]['kept_pct']} %) minus {m['baseline']} "
                       f"({by_plan[m['baseline']]['kept_pct']} %), paired on the test tokens: Δ stdlib "
                       f"{ci(m['vs'][CORPORA[0]])}, Δ pydocs {ci(m['vs'][CORPORA[1]])}, Δ both {ci(m['vs']['both'])}.")]
    if out.get("confirmation"):
        first = next(iter(out["confirmation"].values()))
        sl = "; ".join(f"{c}: {corp[c]['confirm']['tokens']:,} tokens in {corp[c]['confirm']['documents']} documents"
                       for c in first if c in corp)
        lines += ["", f"Confirmation slice (the documents after the validation slice, {sl}; scored after the rows "
                      "above were fixed), Δ to MLP-only there: " + "; ".join(
                          f"{name}: " + ", ".join(f"{c} {ci(v)}" for c, v in vs.items())
                          for name, vs in out["confirmation"].items()) + "."]
    if out.get("per_byte"):
        pb, (s_, p_) = out["per_byte"], CORPORA
        vc = pb["vocab_choice"]
        lines += ["", (f"Vocabulary + MLP against MLP-only, in bits per byte ({pb['bytes'][s_]:,} / {pb['bytes'][p_]:,} "
                       "bytes of the decoded test windows, each model tokenizing them itself; the kept vocabulary "
                       f"counted over {vc['counted_tokens']:,} stdlib tokens and sized on the validation windows "
                       f"within +{vc['max_increase_pct']:g} % bits per byte on the unpruned model; Δ bits per byte "
                       f"to MLP-only with the {pct} bootstrap interval over documents):"), "",
                  ("| plan | vocabulary | MLP removed | params kept | stdlib bits/byte | Δ stdlib | pydocs bits/byte | "
                   "Δ pydocs |"), "|---|---|---|---|---|---|---|---|"]
        for r in pb["rows"]:
            vs = r.get("vs_mlp")
            lines.append(f"| {r['plan']} | {r['vocab']:,} | {100 * r['mlp_ratio']:.1f} % | {r.get('kept_pct', 100.0)} % "
                         f"| {r['bits_per_byte'][s_]} | {ci(vs[s_]) if vs else '—'} | {r['bits_per_byte'][p_]} | "
                         f"{ci(vs[p_]) if vs else '—'} |")
    if out["selection"]:
        lines += ["", ("Choice of the heads + MLP plans on the validation slice (Δ to MLP-only there; the lowest Δ "
                       "both of each family is chosen, then scored on the test slice above):"), "",
                  "| candidate | params kept | val Δ stdlib | val Δ pydocs | val Δ both | chosen |",
                  "|---|---|---|---|---|---|"]
        chosen = set(out["chosen"].values())
        for s in out["selection"]:
            v = s["vs_mlp"]
            lines.append(f"| {s['plan']} | {s['kept_pct']} % | {ci(v[CORPORA[0]])} | {ci(v[CORPORA[1]])} | "
                         f"{ci(v['both'])} | {'yes' if s['plan'] in chosen else ''} |")
    (RESULTS / "structures_smollm2_cpu.md").write_text("\n".join(lines) + "\n")


def plot(out: dict) -> None:
    """Δ NLL to MLP-only with its interval for the pruned plans within 0.05 nats of it (the others are far off: the
    table)."""
    from bench.plotting import bar_chart

    rows = [r for r in out["rows"] if r.get("vs_mlp") and abs(r["vs_mlp"]["both"]["diff"]) < 0.05
            and r["kept_pct"] < 100]
    bar_chart(RESULTS / "structures_smollm2_cpu.png",
              f"SmolLM2 at ≈ {100 * out['keep']:.0f} % parameters: plans within 0.05 nats of MLP only "
              f"({100 * out['confidence']:g} % bootstrap intervals over documents)",
              "Δ NLL per test token vs MLP only (nats; < 0 is better)",
              {c: [(r["plan"], r["vs_mlp"][c]["diff"], r["vs_mlp"][c]["lo"], r["vs_mlp"][c]["hi"]) for r in rows]
               for c in (*CORPORA, "both")})


if __name__ == "__main__":
    main()
