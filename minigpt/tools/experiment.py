"""``minigpt experiment``: methods × policies (ratios, thresholds) × domains → the paper's results table.

One calibration per domain serves every activation metric (``stats/<domain>.safetensors``); ``selectivity``
uses the other domains' merged statistics as its reference. Each cell (``<domain>/<method>[-reverse]/r<ratio>``
or ``.../t<threshold>``) prunes a copy of the base model, measures its relative size, held-out perplexity
(on every domain for cells matching ``--cross``), cloze MCQ accuracy (``--mcq`` cells) and, for ``--finetune``
cells, recovery fine-tuning to the base model's perplexity (the fine-tuned model is saved in ``models/``, so
``minigpt finetune --model`` can continue it). A finished cell is written to ``cells/`` at once
and skipped when the sweep is run again, so an interrupted sweep resumes where it stopped (changed fine-tuning
settings redo only the fine-tunes); ``results.md``, ``results.json`` and the plots are rewritten from the cells.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minigpt.errors import MiniGPTError
from minigpt.pipeline.importance import METRICS, NEEDS_STATS

log = logging.getLogger("minigpt")


@dataclass
class Settings:
    """Everything that changes a cell's numbers (kept in ``settings.json``; a resumed sweep must match)."""

    model: str | None = None
    domains: list[str] = field(default_factory=lambda: ["stdlib", "pydocs"])
    calib_tokens: int = 16384
    calib_seq_len: int = 512
    calib_doc_tokens: int | None = None
    eval_tokens: int = 4096
    eval_seq_len: int = 512
    eval_doc_tokens: int | None = None
    mcq_questions: int = 40
    mcq_choices: int = 4
    mcq_normalise: str = "tokens"
    seed: int = 0
    finetune: dict = field(default_factory=lambda: {"max_steps": 200, "eval_every": 10, "seq_len": 256,
                                                    "batch_size": 4, "learning_rate": 5e-5, "train_tokens": None})
    corpora: dict = field(default_factory=dict)  # domain → {"train": data, "heldout": data}; built-ins by default

    def __post_init__(self):
        for d in self.domains:
            self.corpora.setdefault(d, {"train": d, "heldout": f"{d}-heldout"})


@dataclass(frozen=True)
class Cell:
    domain: str
    method: str
    reverse: bool = False
    ratio: float | None = None
    threshold: float | None = None

    @property
    def id(self) -> str:
        policy = f"r{self.ratio:g}" if self.ratio is not None else f"t{self.threshold:g}"
        return f"{self.domain}/{self.method}{'-reverse' if self.reverse else ''}/{policy}"

    def matches(self, patterns: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(self.id, p) for p in patterns)


def grid(domains, methods, ratios=(), thresholds=(), reverse=(), threshold_methods=("l1",)) -> list[Cell]:
    """The cells of a sweep: every method at every ratio, ``reverse`` methods reversed at every ratio, and
    ``threshold_methods`` at every threshold, for each domain."""
    for m in (*methods, *reverse, *threshold_methods):
        if m not in METRICS:
            raise MiniGPTError(f"unknown method {m!r}; expected one of {', '.join(METRICS)}")
    cells = []
    for d in domains:
        cells += [Cell(d, m, ratio=r) for m in methods for r in ratios]
        cells += [Cell(d, m, reverse=True, ratio=r) for m in reverse for r in ratios]
        cells += [Cell(d, m, threshold=t) for m in threshold_methods for t in thresholds]
    return cells


class Experiment:
    """A sweep directory: cached statistics, question sets, base results and finished cells."""

    def __init__(self, out: str | Path, settings: Settings, progress: bool = True):
        self.out, self.settings, self.progress = Path(out), settings, progress
        saved = self.out / "settings.json"
        if saved.exists():  # fine-tuning settings may change: cells fine-tuned otherwise are fine-tuned again
            old = json.loads(saved.read_text())
            new = json.loads(json.dumps(asdict(settings)))
            diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v and k != "finetune"}
            if diff:
                raise MiniGPTError(f"{self.out} holds a sweep with other settings {diff}; use a new --out")
        self._write("settings.json", asdict(settings))
        self._model = self._tokenizer = None

    def _write(self, name: str, obj) -> None:
        from minigpt.io import atomic_file

        with atomic_file(self.out / name) as tmp:
            tmp.write_text(json.dumps(obj, indent=1))

    def _load(self) -> None:
        if self._model is None:
            from minigpt.io import load_model

            self._model, self._tokenizer = load_model(self.settings.model)

    @property
    def model(self):
        """The base model (loaded once; cells prune deep copies)."""
        self._load()
        return self._model

    @property
    def tokenizer(self):
        self._load()
        return self._tokenizer

    def stats(self, domain: str):
        from minigpt.pipeline.calibration import calibrate
        from minigpt.pipeline.stats import CalibrationStats

        path = self.out / "stats" / f"{domain}.safetensors"
        if path.exists():
            return CalibrationStats.load(path)
        log.info("calibrating on %s", domain)
        s = self.settings
        stats = calibrate(self.model, self.tokenizer, s.corpora[domain]["train"], max_tokens=s.calib_tokens,
                          seq_len=s.calib_seq_len, doc_tokens=s.calib_doc_tokens, seed=s.seed, progress=self.progress)
        stats.save(path)
        return stats

    def reference(self, domain: str):
        """The other domains' statistics, merged (selectivity's reference)."""
        others = [d for d in self.settings.domains if d != domain]
        if not others:
            raise MiniGPTError("selectivity needs a second domain as its reference")
        ref = self.stats(others[0])
        for d in others[1:]:
            ref = ref.merge(self.stats(d))
        return ref

    def questions(self, domain: str) -> list[dict]:
        from minigpt.tools.mcq import build_cloze, load_questions, save_questions

        path = self.out / "mcq" / f"{domain}.jsonl"
        if not path.exists():
            s = self.settings
            save_questions(build_cloze(s.corpora[domain]["heldout"], s.mcq_questions, choices=s.mcq_choices, seed=s.seed),
                           path)
        return load_questions(path)

    def perplexity(self, model, domain: str) -> dict:
        from minigpt.pipeline.evaluation import perplexity

        s = self.settings
        r = perplexity(model, self.tokenizer, s.corpora[domain]["heldout"], seq_len=s.eval_seq_len,
                       max_tokens=s.eval_tokens, doc_tokens=s.eval_doc_tokens, progress=self.progress)
        return {"perplexity": r["perplexity"], "bits_per_byte": r["bits_per_byte"]}

    def mcq(self, model, domain: str) -> dict:
        from minigpt.tools.mcq import accuracy

        r = accuracy(model, self.tokenizer, self.questions(domain), normalise=self.settings.mcq_normalise,
                     progress=self.progress)
        return {k: r[k] for k in ("accuracy", "correct", "total")}

    def base(self, domain: str, mcq: bool) -> dict:
        """The unpruned model's perplexity (and MCQ accuracy) on ``domain`` (cached in ``base.json``)."""
        from minigpt.pipeline.evaluation import parameter_counts

        path = self.out / "base.json"
        done = json.loads(path.read_text()) if path.exists() else {}
        entry = dict(done.get(domain, {}))
        if "perplexity" not in entry:
            entry.update(self.perplexity(self.model, domain), params=parameter_counts(self.model))
        if mcq and "mcq" not in entry:
            entry["mcq"] = self.mcq(self.model, domain)
        if done.get(domain) != entry:
            self._write("base.json", {**done, domain: entry})
        return entry

    def cell_path(self, cell: Cell) -> Path:
        return self.out / "cells" / (cell.id.replace("/", "__") + ".json")

    def model_path(self, cell: Cell) -> Path:
        """Where a fine-tuned cell's model is saved (``minigpt finetune --model`` continues its recovery)."""
        return self.out / "models" / self.cell_path(cell).stem

    def prune(self, cell: Cell):
        """A pruned deep copy of the base model and its plan."""
        from minigpt.pipeline.planning import MLPPolicy
        from minigpt.pipeline.prune import prune

        s = self.settings
        stats = self.stats(cell.domain) if cell.method in NEEDS_STATS else None
        reference = self.reference(cell.domain) if cell.method == "selectivity" else None
        policy = MLPPolicy(mlp=cell.ratio, threshold=cell.threshold, reverse=cell.reverse)
        return prune(copy.deepcopy(self.model), self.tokenizer, stats=stats, metric=cell.method, policy=policy,
                     reference=reference, seed=s.seed)

    def run_cell(self, cell: Cell, cross: bool, mcq: bool, finetune: bool) -> dict:
        """Prune, evaluate, fine-tune as asked; each finished stage is saved before the next starts."""
        from minigpt.pipeline.evaluation import parameter_counts

        path = self.cell_path(cell)
        result = json.loads(path.read_text()) if path.exists() else {}
        todo_eval = [d for d in (self.settings.domains if cross else [cell.domain])
                     if d not in result.get("perplexity", {})]
        requested = json.loads(json.dumps(self.settings.finetune))
        finetune = finetune and result.get("finetune", {}).get("requested") != requested
        needs = todo_eval or (mcq and "mcq" not in result) or finetune
        if not needs:
            return result
        start = time.perf_counter()
        model, plan = self.prune(cell)
        base = self.base(cell.domain, mcq)
        params = parameter_counts(model)
        result.update(id=cell.id, cell=asdict(cell), kept_widths=plan.kept_widths, params=params,
                      removed_fraction=plan.removed_fraction,
                      relative_size_pct=100.0 * params["total"] / base["params"]["total"])
        result.setdefault("perplexity", {})
        for d in todo_eval:
            self.base(d, mcq=False)
            result["perplexity"][d] = self.perplexity(model, d)
        if mcq and "mcq" not in result:
            result["mcq"] = self.mcq(model, cell.domain)
        result["seconds"] = round(result.get("seconds", 0) + time.perf_counter() - start, 1)
        self._write(path.relative_to(self.out), result)
        if finetune:
            from minigpt.tools.finetune import finetune as run_finetune

            s = self.settings
            corpus = s.corpora[cell.domain]
            options = dict(s.finetune)
            teacher = self.model if options.pop("distill", False) else None  # the unpruned model
            report = run_finetune(model, self.tokenizer, corpus["train"], corpus["heldout"],
                                  target=base["perplexity"], eval_tokens=s.eval_tokens, eval_seq_len=s.eval_seq_len,
                                  eval_doc_tokens=s.eval_doc_tokens,
                                  seed=s.seed, progress=self.progress, teacher=teacher, **options)
            if mcq:
                report["mcq"] = self.mcq(model, cell.domain)
            result["finetune"] = {**report, "requested": requested}
            self._save_model(cell, model, plan, result["finetune"])
            self._write(path.relative_to(self.out), result)
        return result

    def _save_model(self, cell: Cell, model, plan, finetune: dict) -> None:
        """Save a fine-tuned cell's model with a report naming the unpruned source (the teacher and target of a
        continued ``minigpt finetune``); it replaces the model of an earlier fine-tune of the cell."""
        from minigpt.io import default_model_path
        from minigpt.pipeline.compact import save_pruned

        source = str(self.settings.model or default_model_path())
        report = {"source": source, "cell": cell.id, "finetune": finetune}
        save_pruned(model, self.tokenizer, self.model_path(cell), plan=plan, source=source, report=report,
                    overwrite=True)

    def run(self, cells: list[Cell], cross=(), mcq=("*",), finetune=()) -> list[dict]:
        """Run (or resume) every cell, rewriting the report after each; returns the cell results."""
        from tqdm.auto import tqdm

        results = []
        for domain in dict.fromkeys(c.domain for c in cells):  # the unpruned model first
            self.base(domain, mcq=any(c.matches(list(mcq)) for c in cells if c.domain == domain))
        with tqdm(cells, desc="sweep", unit="cell", disable=not self.progress) as bar:
            for i, cell in enumerate(bar, 1):
                bar.set_postfix_str(cell.id)
                log.warning("[%d/%d] %s", i, len(cells), cell.id)
                results.append(self.run_cell(cell, cell.matches(list(cross)), cell.matches(list(mcq)),
                                             cell.matches(list(finetune))))
                self.report(plots=False)
        self.report(plots=True)
        return results

    def report(self, plots: bool = True) -> str:
        """Write ``results.json``, ``results.md`` (and the plots) from every finished cell; returns the markdown."""
        cells = [json.loads(p.read_text()) for p in sorted((self.out / "cells").glob("*.json"))]
        base = json.loads((self.out / "base.json").read_text()) if (self.out / "base.json").exists() else {}
        report = {"settings": asdict(self.settings), "base": base, "cells": cells}
        self._write("results.json", report)
        table = markdown(report)
        from minigpt.io import atomic_file

        with atomic_file(self.out / "results.md") as tmp:
            tmp.write_text(table)
        if plots and cells:
            plot_size(report, self.out / "perplexity_vs_size.png")
            if cross_matrix(report):
                plot_cross(report, self.out / "cross_domain.png")
            if any(c.get("finetune") for c in cells):
                plot_recovery(report, self.out / "recovery.png")
        return table


def _order(cell: dict) -> tuple:
    c = cell["cell"]
    return (c["ratio"] is None, c["ratio"] or 0.0, -(c["threshold"] or 0.0), c["method"], c["reverse"])


def _name(c: dict) -> str:
    return c["method"] + (" (reverse)" if c["reverse"] else "")


def _chain(*values, fmt: str) -> str:
    """``a → b → c`` of the given values; perplexities of 10⁴ and more in ``.3g`` (a collapsed model)."""
    return " → ".join(format(v, ".3g" if fmt == ".3f" and v >= 1e4 else fmt) for v in values if v is not None)


def markdown(report: dict) -> str:
    """The results table (one row per cell) and the cross-domain matrix, as markdown."""
    base, s = report["base"], report["settings"]
    lines = [(f"Model: {s['model'] or 'SmolLM2-135M-Instruct'}; calibration {s['calib_tokens']:,} tokens per domain"
              f"{f' (at most {doc:,} per document)' if (doc := s.get('calib_doc_tokens')) else ''}; "
              f"perplexity on the first {s['eval_tokens']:,} held-out tokens"
              f"{f' (at most {doc:,} per document)' if (doc := s.get('eval_doc_tokens')) else ''}"
              f" (windows of {s['eval_seq_len']}); "
              f"MCQ: {s['mcq_questions']} cloze questions per domain, {s['mcq_choices']} choices."), "",
             ("| domain | method | policy | MLP removed | relative size | perplexity base → pruned → fine-tuned "
              "| × base | MCQ base → pruned → fine-tuned | recovery |"),
             "|---|---|---|---:|---:|---|---:|---|---|"]
    for domain in s["domains"]:
        for cell in sorted((x for x in report["cells"] if x["cell"]["domain"] == domain), key=_order):
            c, b = cell["cell"], base.get(domain, {})
            ft = cell.get("finetune") or {}
            pruned = cell["perplexity"][domain]["perplexity"]
            policy = f"ratio {c['ratio']:g}" if c["ratio"] is not None else f"ε = {c['threshold']:g}"
            mcq = _chain(*(x.get("mcq", {}).get("accuracy") for x in (b, cell, ft)), fmt=".0%") if "mcq" in cell else ""
            recovery = (f"{'✓' if ft['recovered'] else '✗'} {ft['steps']} steps, {ft['tokens']:,} tok"
                        + (f", {ft['epochs']:.2f} ep" if ft.get("epochs") else "") + f" ({ft['stop']})") if ft else ""
            lines.append(f"| {domain} | {_name(c)} | {policy} | {100 * cell['removed_fraction']:.1f}% "
                         f"| {cell['relative_size_pct']:.1f}% "
                         f"| {_chain(b.get('perplexity'), pruned, ft.get('perplexity_after'), fmt='.3f')} "
                         f"| ×{pruned / b['perplexity']:.3g} | {mcq} | {recovery} |")
    matrix = cross_matrix(report)
    for key, rows in matrix.items():
        lines += ["", f"Cross-domain ({key}): perplexity on the column's held-out text, (× that domain's base)", "",
                  "| calibrated on ↓ / evaluated on → | " + " | ".join(s["domains"]) + " |",
                  "|---|" + "---:|" * len(s["domains"])]
        for a in s["domains"]:
            if a in rows:
                lines.append(f"| {a} | " + " | ".join(f"{rows[a][d]['perplexity']:.3f} (×{rows[a][d]['ratio']:.2f})"
                                                       for d in s["domains"]) + " |")
    return "\n".join(lines) + "\n"


def cross_matrix(report: dict) -> dict:
    """``{method/policy: {calibrated on: {evaluated on: {perplexity, ratio}}}}`` for cells evaluated everywhere."""
    domains, base = report["settings"]["domains"], report["base"]
    out: dict = {}
    for cell in report["cells"]:
        if len(domains) > 1 and all(d in cell["perplexity"] and d in base for d in domains):
            key = cell["id"].split("/", 1)[1]
            out.setdefault(key, {})[cell["cell"]["domain"]] = {
                d: {"perplexity": cell["perplexity"][d]["perplexity"],
                    "ratio": cell["perplexity"][d]["perplexity"] / base[d]["perplexity"]} for d in domains}
    return out


def plot_size(report: dict, path: Path) -> None:
    """Perplexity (log) against relative size, one line per method, one panel per domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = report["settings"]["domains"]
    fig, axes = plt.subplots(1, len(domains), figsize=(6 * len(domains), 4.5), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        series: dict = {}
        for cell in report["cells"]:
            c = cell["cell"]
            if c["domain"] == domain:
                label = _name(c) + (" (ε)" if c["threshold"] is not None else "")
                series.setdefault(label, []).append((cell["relative_size_pct"], cell["perplexity"][domain]["perplexity"]))
        for label, points in sorted(series.items()):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=label)
        if domain in report["base"]:
            ax.axhline(report["base"][domain]["perplexity"], color="k", ls="--", lw=1, label="unpruned")
        ax.set(xscale="linear", yscale="log", xlabel="relative size (% of parameters)", ylabel="held-out perplexity",
               title=f"{domain}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cross(report: dict, path: Path) -> None:
    """Heat maps of perplexity × base: calibrated on the row's domain, evaluated on the column's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains, matrix = report["settings"]["domains"], cross_matrix(report)
    fig, axes = plt.subplots(1, len(matrix), figsize=(4.5 * len(matrix), 4), squeeze=False)
    for ax, (key, rows) in zip(axes[0], sorted(matrix.items())):
        calibrated = [d for d in domains if d in rows]
        values = [[rows[a][b]["ratio"] for b in domains] for a in calibrated]
        ax.imshow(values, cmap="viridis_r")
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, f"×{v:.2f}", ha="center", va="center", color="w" if v > min(map(min, values)) else "k")
        ax.set(xticks=range(len(domains)), xticklabels=domains, yticks=range(len(calibrated)),
               yticklabels=calibrated, xlabel="evaluated on", ylabel="calibrated on", title=f"{key}: perplexity × base")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_recovery(report: dict, path: Path) -> None:
    """Held-out perplexity against fine-tuning tokens for every fine-tuned cell, with its target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    targets = set()
    for cell in report["cells"]:
        ft = cell.get("finetune")
        if not ft:
            continue
        line, = ax.plot([h["tokens"] for h in ft["history"]], [h["perplexity"] for h in ft["history"]], marker=".",
                        label=f"{cell['id']}" + (" (distilled)" if ft["settings"].get("distill") else ""))
        if ft.get("target") and (cell["cell"]["domain"], ft["target"]) not in targets:
            targets.add((cell["cell"]["domain"], ft["target"]))
            ax.axhline(ft["target"], color=line.get_color(), ls="--", lw=1, label=f"{cell['cell']['domain']} unpruned")
    ax.set(xlabel="fine-tuning tokens", ylabel="held-out perplexity", title="recovery fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
