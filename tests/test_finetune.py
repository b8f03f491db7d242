"""Recovery fine-tuning on tiny models: loss falls, target and over-fitting stops, per-layer widths, distillation,
the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import minigpt
from minigpt.cli import main
from minigpt.errors import MiniGPTError
from minigpt.models import adapters
from minigpt.pipeline.data import Batches
from minigpt.pipeline.evaluation import perplexity
from minigpt.tools.finetune import TokenStream, distillation_loss, finetune, overfitting, stalled

SMALL = {"seq_len": 64, "batch_size": 4, "eval_tokens": 512, "eval_seq_len": 128, "progress": False}


@pytest.fixture(scope="module")
def split(corpus_dir):
    train = [str(corpus_dir / f) for f in ("heapq.py.txt", "bisect.py.txt", "textwrap.py.txt")]
    return train, [str(corpus_dir / "glob.py.txt")]


def test_finetune_lowers_training_loss_and_heldout_perplexity(tiny_tokenizer, split):
    model = tiny_model("llama")
    report = finetune(model, tiny_tokenizer, *split, max_steps=12, eval_every=4, learning_rate=3e-3,
                      train_tokens=1024, **SMALL)
    ppl = [h["perplexity"] for h in report["history"]]
    losses = [h["train_loss"] for h in report["history"][1:]]
    assert report["stop"] == "max_steps" and report["steps"] == 12 and len(ppl) == 4
    assert losses[-1] < losses[0] and ppl[-1] < 0.8 * ppl[0], report["history"]
    assert report["tokens"] == 12 * 4 * 64 and report["epochs"] == pytest.approx(12 * 256 / 1024)
    assert not model.training
    again = perplexity(model, tiny_tokenizer, split[1], seq_len=128, max_tokens=512)["perplexity"]
    assert again == pytest.approx(report["perplexity_after"], rel=1e-5)


def test_stops_at_target(tiny_tokenizer, split):
    base = perplexity(tiny_model("llama"), tiny_tokenizer, split[1], seq_len=128, max_tokens=512)["perplexity"]
    report = finetune(tiny_model("llama"), tiny_tokenizer, *split, target=0.95 * base, max_steps=40, eval_every=2,
                      learning_rate=3e-3, **SMALL)
    assert report["recovered"] and report["stop"] == "target" and report["steps"] < 40
    assert report["perplexity_after"] <= 0.95 * base < report["history"][-2]["perplexity"]
    assert report["epochs"] is None  # the whole corpus was not gone through once
    untouched = finetune(tiny_model("llama"), tiny_tokenizer, *split, target=2 * base, **SMALL)
    assert untouched["steps"] == 0 and untouched["recovered"]


def test_token_stream_passes_are_shuffled_permutations(tiny_tokenizer, split):
    files = [Path(f) for f in split[0]]
    plain = list(Batches(tiny_tokenizer, files, seq_len=32, batch_size=1, max_tokens=1024).sequences())
    stream = iter(TokenStream(tiny_tokenizer, files, 32, 1024, shuffle_buffer=8))
    passes = [[next(stream)["input_ids"].tolist() for _ in plain] for _ in range(2)]
    for p in passes:
        assert sorted(p) == sorted(plain) and p != plain
    assert passes[0] != passes[1]
    reseeded = iter(TokenStream(tiny_tokenizer, files, 32, 1024, seed=1, shuffle_buffer=8))
    assert [next(reseeded)["input_ids"].tolist() for _ in plain] != passes[0]



def test_token_stream_doc_tokens_spreads_a_pass_over_every_document(tiny_tokenizer, split):
    files = [Path(f) for f in split[0]]
    windows = list(Batches(tiny_tokenizer, files, seq_len=16, batch_size=1, doc_tokens=48).sequences())
    whole = list(Batches(tiny_tokenizer, files, seq_len=16, batch_size=1).sequences())
    assert 3 * 48 // 16 - 2 <= len(windows) <= 3 * 48 // 16 < len(whole)  # ≤ 48 tokens of each of the 3 files
    stream = iter(TokenStream(tiny_tokenizer, files, 16, None, shuffle_buffer=4, doc_tokens=48))
    one_pass = [next(stream)["input_ids"].tolist() for _ in windows]
    assert sorted(one_pass) == sorted(windows)
    assert next(stream)["input_ids"].tolist() in windows  # the next pass cycles over the same windows

def test_overfitting_rule():
    h = lambda p, loss: {"perplexity": p, "train_loss": loss}
    start = {"perplexity": 9.0, "train_loss": None}
    assert overfitting([start, h(5, 3.0), h(6, 2.0), h(7, 1.0)], patience=2)
    assert not overfitting([start, h(5, 3.0), h(6, 2.0), h(7, 1.0)], patience=3)
    assert not overfitting([start, h(5, 3.0), h(6, 2.0), h(5.5, 1.0)], patience=2)  # perplexity fell again
    assert not overfitting([start, h(5, 3.0), h(6, 3.5), h(7, 4.0)], patience=2)  # training loss rose too


def test_stalled_rule():
    h = lambda p: {"perplexity": p, "train_loss": 1.0}
    assert stalled([h(9.0), h(5.0), h(6.0), h(5.5)], patience=2)  # neither 6.0 nor 5.5 beats 5.0
    assert not stalled([h(9.0), h(5.0), h(6.0), h(4.9)], patience=2)  # 4.9 does
    assert not stalled([h(9.0), h(5.0), h(6.0), h(5.5)], patience=3)  # 5.0 is within the last three


def test_overfitting_stops_and_restores_best(tiny_tokenizer, split):
    model = tiny_model("llama")
    report = finetune(model, tiny_tokenizer, split[0][:1], split[1], max_steps=60, eval_every=3,
                      learning_rate=1e-2, train_tokens=128, **{**SMALL, "batch_size": 2})
    ppl = [h["perplexity"] for h in report["history"]]
    assert report["stop"] == "overfitting" and report["steps"] < 60 and report["epochs"] > 5
    assert ppl[-1] > ppl[-2] > ppl[-3] and report["perplexity_after"] == min(ppl)
    again = perplexity(model, tiny_tokenizer, split[1], seq_len=128, max_tokens=512)["perplexity"]
    assert again == pytest.approx(min(ppl), rel=1e-5)  # the best weights are back


def test_per_layer_widths_train(tiny_tokenizer, split):
    model = tiny_model("llama")
    plan = minigpt.PruningPlan(kept=[list(range(40)), list(range(0, 48, 3))], widths=[48, 48],
                               fingerprint={}, policy={})
    model, _ = minigpt.prune(model, tiny_tokenizer, pruning_plan=plan)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = finetune(model, tiny_tokenizer, *split, max_steps=6, eval_every=3, learning_rate=3e-3, **SMALL)
    assert adapters.widths(model) == [40, 16]
    assert report["history"][-1]["perplexity"] < report["history"][0]["perplexity"]
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if "mlp" in n)


def test_cli_finetune_reaches_source_perplexity(tiny_tokenizer, corpus_dir, tmp_path, capsys):
    src, pruned, tuned = tmp_path / "tiny", tmp_path / "pruned", tmp_path / "tuned"
    data = [str(corpus_dir / f) for f in ("heapq.py.txt", "bisect.py.txt", "textwrap.py.txt")]
    heldout = str(corpus_dir / "glob.py.txt")
    source = tiny_model("llama")
    finetune(source, tiny_tokenizer, data, heldout, max_steps=10, learning_rate=3e-3, **SMALL)  # a model to damage
    source.save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    assert main(["prune", "--model", str(src), "--metric", "maw", "--threshold", "0.9", "--compensate", "none",
                 "--out", str(pruned),
                 "--eval-data", heldout, "--eval-tokens", "512", "--eval-seq-len", "128", "--no-progress"]) == 0
    assert len(set(json.loads((pruned / "minigpt_plan.json").read_text())["kept_widths"])) == 2  # per-layer widths
    capsys.readouterr()
    code = main(["finetune", "--model", str(pruned), "--data", *data, "--eval-data", heldout, "--out", str(tuned),
                 "--max-steps", "40", "--eval-every", "2", "--seq-len", "64", "--lr", "3e-3", "--eval-tokens", "512",
                 "--eval-seq-len", "128", "--no-progress", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["recovered"] and report["target_model"] == str(src)
    assert report["perplexity_after"] <= report["target"] < report["perplexity_before"]
    saved = json.loads((tuned / "minigpt_report.json").read_text())
    assert saved["finetune"]["steps"] == report["steps"] and saved["source"] == str(src)
    reloaded, tok = minigpt.load_model(tuned)
    again = perplexity(reloaded, tok, heldout, seq_len=128, max_tokens=512)["perplexity"]
    assert again == pytest.approx(report["perplexity_after"], rel=1e-4)

    # fine-tuning the fine-tuned model continues its recovery (text in another order), keeping every stage
    more = tmp_path / "tuned-more"
    code = main(["finetune", "--model", str(tuned), "--data", *data, "--eval-data", heldout, "--out", str(more),
                 "--target", str(0.9 * report["perplexity_after"]), "--max-steps", "4", "--eval-every", "2",
                 "--seq-len", "64", "--lr", "3e-3", "--eval-tokens", "512", "--eval-seq-len", "128", "--seed", "1",
                 "--no-progress", "--json"])
    second = json.loads(capsys.readouterr().out)
    assert code == 0 and second["perplexity_before"] == pytest.approx(report["perplexity_after"], rel=1e-4)
    stages = json.loads((more / "minigpt_report.json").read_text())
    assert stages["earlier_finetunes"] == [saved["finetune"]] and stages["finetune"]["steps"] == second["steps"]
    assert stages["source"] == str(src)


def test_distillation_loss_matches_its_definition():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, 3] = -100
    targets = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(student[:, :-1].reshape(-1, 11), targets.reshape(-1), ignore_index=-100)
    assert torch.allclose(distillation_loss(student, teacher, labels, 0.0, 1.0), ce)
    tau, mask = 2.0, targets != -100
    p_teacher = (teacher[:, :-1][mask] / tau).softmax(-1)
    kl = (p_teacher * (p_teacher.log() - (student[:, :-1][mask] / tau).log_softmax(-1))).sum(-1).mean()
    assert torch.allclose(distillation_loss(student, teacher, labels, 0.3, tau), 0.7 * ce + 0.3 * tau**2 * kl)
    assert distillation_loss(student, student, labels, 1.0, tau).abs() < 1e-6  # nothing to learn from itself


def test_distillation_loss_is_the_models_own_loss_without_teacher(tiny_tokenizer):
    model = tiny_model("llama")
    ids = torch.randint(0, tiny_tokenizer.vocab_size, (2, 16))
    out = model(input_ids=ids, labels=ids)
    assert torch.allclose(distillation_loss(out.logits, out.logits, ids, 0.0, 1.0), out.loss, rtol=1e-6)


def _kl_to(teacher, student, ids) -> float:
    with torch.no_grad():
        t, s = teacher(input_ids=ids).logits, student(input_ids=ids).logits
    return torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True,
                                      reduction="batchmean").item()


def test_distillation_pulls_a_pruned_model_towards_its_teacher(tiny_tokenizer, split):
    teacher = tiny_model("llama")
    finetune(teacher, tiny_tokenizer, *split, max_steps=20, learning_rate=3e-3, **SMALL)
    student, _ = minigpt.prune(tiny_model("llama", seed=1), tiny_tokenizer, metric="random", ratio=0.5)
    ids = next(iter(Batches(tiny_tokenizer, [Path(split[1][0])], seq_len=64, batch_size=4)))
    before, weights = _kl_to(teacher, student, ids), {k: v.clone() for k, v in teacher.state_dict().items()}
    report = finetune(student, tiny_tokenizer, *split, teacher=teacher, distill_alpha=1.0, max_steps=16, eval_every=8,
                      learning_rate=3e-3, lr_scheduler="cosine", **SMALL)
    assert report["settings"]["distill"] and report["settings"]["lr_scheduler"] == "cosine"
    after = _kl_to(teacher, student, ids)
    assert after < 0.5 * before, before
    assert all(torch.equal(v, weights[k]) for k, v in teacher.state_dict().items()) and not teacher.training


def test_distillation_refuses_another_vocabulary(tiny_tokenizer, split):
    teacher = tiny_model("llama")
    student = tiny_model("llama")
    student.resize_token_embeddings(student.config.vocab_size - 8)
    with pytest.raises(MiniGPTError, match="teacher's vocabulary"):
        finetune(student, tiny_tokenizer, *split, teacher=teacher, max_steps=2, **SMALL)
    with pytest.raises(MiniGPTError, match="distill_alpha"):
        finetune(student, tiny_tokenizer, *split, teacher=teacher, distill_alpha=1.5, max_steps=2, **SMALL)


def test_cli_distill_needs_the_unpruned_model(tiny_tokenizer, corpus_dir, tmp_path, capsys):
    src = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    code = main(["finetune", "--model", str(src), "--data", str(corpus_dir / "heapq.py.txt"), "--eval-data",
                 str(corpus_dir / "glob.py.txt"), "--out", str(tmp_path / "out"), "--target", "5", "--distill",
                 "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--distill needs the unpruned model" in err[0]
    assert not (tmp_path / "out").exists()


def test_cli_doc_tokens_options(tiny_tokenizer, corpus_dir, tmp_path, capsys):
    src, pruned, tuned = tmp_path / "tiny", tmp_path / "pruned", tmp_path / "tuned"
    heldout = [str(corpus_dir / f) for f in ("shlex.py.txt", "glob.py.txt")]
    tiny_model("llama").save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    assert main(["prune", "--model", str(src), "--metric", "maw", "--ratio", "0.25", "--compensate", "none",
                 "--no-eval", "--out", str(pruned), "--no-progress"]) == 0
    capsys.readouterr()
    code = main(["finetune", "--model", str(pruned), "--data", str(corpus_dir / "heapq.py.txt"), "--eval-data",
                 *heldout, "--out", str(tuned), "--max-steps", "2", "--eval-every", "2", "--seq-len", "64",
                 "--eval-tokens", "256", "--eval-seq-len", "64", "--eval-doc-tokens", "128",
                 "--train-doc-tokens", "64", "--no-progress", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["settings"]["eval_doc_tokens"] == 128 and report["settings"]["train_doc_tokens"] == 64
    ppl = {"seq_len": 64, "max_tokens": 256}
    source, tok = minigpt.load_model(src)
    spread = perplexity(source, tok, heldout, doc_tokens=128, **ppl)["perplexity"]
    assert report["target"] == pytest.approx(spread, rel=1e-5)
    assert spread != pytest.approx(perplexity(source, tok, heldout, **ppl)["perplexity"], rel=1e-3)  # 2 files, not 1
    start, _ = minigpt.load_model(pruned)
    assert report["history"][0]["perplexity"] == pytest.approx(
        perplexity(start, tok, heldout, doc_tokens=128, **ppl)["perplexity"], rel=1e-5)
