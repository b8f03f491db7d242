"""The experiment runner on a tiny model and two tiny domains: table, cross-domain matrix, plots, resume."""

from __future__ import annotations

import json

import pytest
from conftest import STDLIB, tiny_model

import minigpt
from minigpt import MiniGPTError
from minigpt.cli import main
from minigpt.pipeline.evaluation import perplexity
from minigpt.tools.experiment import Experiment, Settings, grid

DOMAINS = {"algo": ["heapq.py", "bisect.py", "queue.py", "graphlib.py", "sched.py", "colorsys.py", "fractions.py"],
           "text": ["textwrap.py", "shlex.py", "glob.py", "fnmatch.py", "string.py", "difflib.py", "cmd.py"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("experiment")
    tiny_model("llama").save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    corpora = {}
    for name, files in DOMAINS.items():
        for part, chosen in (("train", files[:3]), ("heldout", files[3:])):
            (root / name / part).mkdir(parents=True)
            for f in chosen:
                (root / name / part / f"{f}.txt").write_text((STDLIB / f).read_text())
        corpora[name] = {"train": str(root / name / "train"), "heldout": str(root / name / "heldout")}
    settings = Settings(model=str(root / "model"), domains=list(DOMAINS), calib_tokens=256, calib_seq_len=32,
                        eval_tokens=256, eval_seq_len=64, mcq_questions=4, corpora=corpora,
                        finetune={"max_steps": 4, "eval_every": 2, "seq_len": 32, "batch_size": 2,
                                  "learning_rate": 1e-3, "train_tokens": 256})
    return root, settings


CELLS = {"methods": ["l1", "selectivity", "random", "maw"], "ratios": [0.25], "thresholds": [0.1], "reverse": ["l1"]}


def test_sweep_writes_table_matrix_plots_and_resumes(setup, capsys):
    root, settings = setup
    out = root / "sweep"
    cells = grid(list(DOMAINS), **CELLS)
    assert len(cells) == 2 * (4 + 1 + 1) and cells[0].id == "algo/l1/r0.25"
    exp = Experiment(out, settings, progress=False)
    results = exp.run(cells, cross=["*/l1/r0.25"], mcq=["*/l1*"], finetune=["algo/l1/r0.25"])
    by_id = {r["id"]: r for r in results}
    assert set(by_id) == {c.id for c in cells}
    assert set(by_id["algo/l1/r0.25"]["perplexity"]) == {"algo", "text"}  # cross-domain cell
    assert set(by_id["algo/maw/r0.25"]["perplexity"]) == {"algo"} and "mcq" not in by_id["algo/maw/r0.25"]
    assert by_id["text/l1-reverse/r0.25"]["mcq"]["total"] == 4
    ft = by_id["algo/l1/r0.25"]["finetune"]
    assert ft["target"] == json.loads((out / "base.json").read_text())["algo"]["perplexity"]
    assert ft["stop"] in ("target", "max_steps", "overfitting") and "mcq" in ft
    for r in results:
        ratio = r["cell"]["ratio"]
        assert r["removed_fraction"] == 0.25 if ratio else 0 <= r["removed_fraction"] < 1
        assert 50 < r["relative_size_pct"] < 100 if ratio else r["relative_size_pct"] <= 100
    assert by_id["algo/l1/r0.25"]["kept_widths"] == [36, 36]
    assert sorted(p.name for p in (out / "stats").iterdir()) == ["algo.safetensors", "text.safetensors"]
    md = (out / "results.md").read_text()
    table = md.split("Cross-domain")[0]
    assert table.count("\n| algo |") == 6 and table.count("\n| text |") == 6 and "| selectivity | ratio 0.25 |" in md
    assert "Cross-domain (l1/r0.25)" in md and "| algo | " in md.split("Cross-domain")[1]
    report = json.loads((out / "results.json").read_text())
    assert len(report["cells"]) == 12 and set(report["base"]) == {"algo", "text"}
    assert all(b["mcq"]["total"] == 4 for b in report["base"].values())
    assert (out / "perplexity_vs_size.png").stat().st_size > 1000 and (out / "cross_domain.png").exists()
    assert (out / "recovery.png").stat().st_size > 1000  # the fine-tuned cell's curve
    saved = json.loads((out / "models" / "algo__l1__r0.25" / "minigpt_report.json").read_text())
    assert saved["source"] == settings.model and saved["finetune"] == ft  # `minigpt finetune` can continue it
    tuned = minigpt.load_model(out / "models" / "algo__l1__r0.25")[0]
    again = perplexity(tuned, exp.tokenizer, settings.corpora["algo"]["heldout"], seq_len=64, max_tokens=256)
    assert again["perplexity"] == pytest.approx(ft["perplexity_after"], rel=1e-4)

    # resume: finished cells are not redone; a missing one is
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    (out / "cells" / "text__random__r0.25.json").unlink()
    again = Experiment(out, settings, progress=False).run(cells, cross=["*/l1/r0.25"], mcq=["*/l1*"],
                                                          finetune=["algo/l1/r0.25"])
    assert [r["id"] for r in again] == [r["id"] for r in results]
    after = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    assert {n for n in after if after[n] != stamps.get(n)} == {"text__random__r0.25.json"}
    assert again[[r["id"] for r in again].index("text/random/r0.25")]["kept_widths"] == \
        by_id["text/random/r0.25"]["kept_widths"]

    # other fine-tuning settings (distillation from the unpruned model): only the fine-tuned cell is redone
    fewer = Settings(**{**settings.__dict__, "finetune": {**settings.finetune, "max_steps": 2, "distill": True}})
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    redone = Experiment(out, fewer, progress=False).run(cells[:2], mcq=[], finetune=["algo/l1/r0.25"])
    assert redone[0]["finetune"]["requested"]["max_steps"] == 2 and redone[0]["finetune"]["steps"] <= 2
    assert redone[0]["finetune"]["settings"]["distill"]
    after = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    assert {n for n in after if after[n] != stamps[n]} == {"algo__l1__r0.25.json"}
    saved = json.loads((out / "models" / "algo__l1__r0.25" / "minigpt_report.json").read_text())
    assert saved["finetune"]["requested"]["max_steps"] == 2  # the model of the redone fine-tune replaced the old
    assert sorted(p.name for p in (out / "models").iterdir()) == ["algo__l1__r0.25"]

    with pytest.raises(MiniGPTError, match="other settings"):
        Experiment(out, Settings(**{**settings.__dict__, "eval_tokens": 128}), progress=False)

    assert main(["experiment", "--out", str(out), "--model", settings.model, "--domains", *DOMAINS,
                 "--calib-tokens", "256", "--report-only", "--no-progress"]) == 2  # other settings: refused
    capsys.readouterr()


def test_selectivity_needs_a_second_domain(setup):
    root, settings = setup
    one = Settings(**{**settings.__dict__, "domains": ["algo"], "corpora": {"algo": settings.corpora["algo"]}})
    with pytest.raises(MiniGPTError, match="second domain"):
        Experiment(root / "single", one, progress=False).run(grid(["algo"], ["selectivity"], [0.25]), mcq=[])
    with pytest.raises(MiniGPTError, match="unknown method"):
        grid(["algo"], ["l3"], [0.25])
