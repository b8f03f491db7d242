"""Bad input, tried and survived: one line on stderr, a non-zero exit, no output or temporary left, source intact."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_model
from scale_helpers import minigpt, popen_with_default_sigint, run, save_model

from minigpt.cli import main
from minigpt.pipeline.stats import CalibrationStats

CAL = ("--seq-len", "32", "--max-tokens", "128", "--no-progress")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny llama saved in several shards (out-of-core pruning reads them)."""
    path = tmp_path_factory.mktemp("bad") / "model"
    tiny_model("llama").save_pretrained(path, max_shard_size="20KB")
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def stats_file(model_dir, corpus_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("stats") / "stats.safetensors"
    assert main(["calibrate", "--model", str(model_dir), "--data", str(corpus_dir), *CAL, "--out", str(path)]) == 0
    return path


def _digest(root) -> dict:
    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _fails(capsys, argv, match: str, tmp_path) -> None:
    """``main(argv)`` exits 2 with one ``minigpt: error:`` line containing ``match``; nothing half-written."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("minigpt: error:") and match in err[0], err
    assert not list(tmp_path.rglob("*partial*")) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, match", [("truncate", "corrupted or truncated"),
                                           ("overwrite", "is corrupted: the token histogram")])
@pytest.mark.parametrize("out_of_core", [False, True])
def test_truncated_or_corrupted_stats(damage, match, out_of_core, model_dir, stats_file, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    raw = bytearray(stats_file.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) * 2 // 3]
    else:  # bytes inside the token histogram's data: a valid file with impossible counts
        header_len = int.from_bytes(raw[:8], "little")
        begin = json.loads(raw[8:8 + header_len])["token_counts"]["data_offsets"][0] + 8 + header_len
        raw[begin:begin + 8] = b"\xff" * 8
    bad.write_bytes(bytes(raw))
    before = _digest(model_dir)
    _fails(capsys, ["prune", "--model", model_dir, "--stats", bad, "--no-eval", "--out", tmp_path / "out",
                    *(["--out-of-core"] if out_of_core else [])], match, tmp_path)
    assert _digest(model_dir) == before


def test_stats_and_checkpoint_from_another_model(model_dir, corpus_dir, tiny_tokenizer, tmp_path, capsys):
    other = save_model(tiny_model("llama", tied=True), tiny_tokenizer, tmp_path / "other")
    stats = tmp_path / "other.safetensors"
    assert main(["calibrate", "--model", str(other), "--data", str(corpus_dir), *CAL, "--out", str(stats)]) == 0
    _fails(capsys, ["prune", "--model", model_dir, "--stats", stats, "--out-of-core", "--out", tmp_path / "out"],
           "collected on another model", tmp_path)
    # a checkpoint of another model's calibration, resumed on this one
    checkpoint = tmp_path / "out.ckpt"
    loaded = CalibrationStats.load(stats)
    loaded.meta["checkpoint"] = {"run": {}, "positions": [1], "done": [0]}
    loaded.save(checkpoint)
    _fails(capsys, ["calibrate", "--model", model_dir, "--data", corpus_dir, *CAL, "--checkpoint", checkpoint,
                    "--resume", "--out", tmp_path / "out"], "checkpoint's statistics were collected on another model",
           tmp_path)
    assert CalibrationStats.load(checkpoint).tokens == loaded.tokens  # the checkpoint is kept


@pytest.mark.parametrize("damage", ["truncate", "header"])
@pytest.mark.parametrize("out_of_core", [False, True])
def test_corrupted_safetensors_shard(damage, out_of_core, model_dir, stats_file, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(model_dir, src)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) - 100] if damage == "truncate" else b"\x40\x00\x00\x00\x00\x00\x00\x00{garbage")
    before = _digest(src)
    _fails(capsys, ["prune", "--model", src, "--stats", stats_file, "--no-eval", "--out", tmp_path / "out",
                    *(["--out-of-core"] if out_of_core else [])], "corrupted", tmp_path)
    assert _digest(src) == before


def test_nan_or_inf_activations_name_the_layer(model_dir, corpus_dir, tiny_tokenizer, tmp_path, capsys):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 0] = float("inf")
    src = save_model(model, tiny_tokenizer, tmp_path / "src")
    out = tmp_path / "out"
    _fails(capsys, ["calibrate", "--model", src, "--data", corpus_dir, *CAL, "--checkpoint-every", "32", "--out", out],
           "non-finite activations (NaN or inf) in MLP layer 1", tmp_path)
    assert not (tmp_path / "out.ckpt").exists()


@pytest.mark.parametrize("text, match", [("", "corpus too small: 0 tokens"), ("x = 1\n", "fewer than one sequence")])
def test_empty_or_tiny_corpus(text, match, model_dir, tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text(text)
    _fails(capsys, ["calibrate", "--model", model_dir, "--data", data, *CAL, "--out", tmp_path / "out"], match,
           tmp_path)


FULL_DISK = """
import contextlib, io, json, resource, signal, sys
from minigpt.cli import main

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
results = []
for argv in json.loads(sys.argv[2]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    results.append({"code": code, "err": err.getvalue()})
print(json.dumps(results))
"""


def test_full_disk_while_saving(model_dir, corpus_dir, stats_file, tmp_path):
    """Writes past RLIMIT_FSIZE fail like on a full disk: stats over an existing file, in-memory and out-of-core
    model directories. Each: one line, exit 2, no temporary, the previous file intact."""
    old = tmp_path / "stats.safetensors"
    old.write_bytes(stats_file.read_bytes())
    old_bytes = old.read_bytes()
    cases = [
        ["calibrate", "--model", model_dir, "--data", corpus_dir, *CAL, "--out", old],
        ["prune", "--model", model_dir, "--stats", stats_file, "--no-eval", "--out", tmp_path / "mem"],
        ["prune", "--model", model_dir, "--stats", stats_file, "--out-of-core", "--out", tmp_path / "ooc"],
    ]
    limit = 3000  # below the stats file (the 512-token histogram alone is 4 KB) and every shard
    before = _digest(model_dir)
    done = run([sys.executable, "-c", FULL_DISK, str(limit), json.dumps([[str(a) for a in c] for c in cases])])
    assert done.returncode == 0, done.stderr
    for result in json.loads(done.stdout.strip().splitlines()[-1]):
        lines = result["err"].strip().splitlines()
        assert result["code"] == 2 and len(lines) == 1, result
        assert "could not write" in lines[0] and "File too large" in lines[0] and "nothing was written" in lines[0]
    assert old.read_bytes() == old_bytes and _digest(model_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.safetensors"]


@pytest.fixture(scope="module")
def medium_model(tmp_path_factory, tiny_tokenizer):
    """~90 MB of fp32 weights in 8 MB shards: an out-of-core save that lasts long enough to interrupt."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=512, hidden_size=512, intermediate_size=2048,
                                  num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=1, head_dim=64,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    root = tmp_path_factory.mktemp("medium")
    model.save_pretrained(root / "model", max_shard_size="8MB")
    tiny_tokenizer.save_pretrained(root / "model")
    from minigpt.pipeline.planning import MLPPolicy, plan_from_scores
    from minigpt.pipeline.stats import fingerprint

    scores = [torch.arange(2048, dtype=torch.float64)] * 6
    plan_from_scores(scores, MLPPolicy(mlp=0.25), fingerprint=fingerprint(model)).save(root / "plan.json")
    return root / "model", root / "plan.json"


def _interrupt_save(cmd, out, sig, attempts: int = 5) -> subprocess.Popen:
    """Start ``cmd`` and send ``sig`` once its temporary output directory holds a first shard.

    On a loaded machine the save can complete between seeing the shard and the signal landing (exit 0, ``out``
    written): that run proves nothing, so its output is removed and the command started again.
    """
    for _ in range(attempts):
        proc = popen_with_default_sigint(cmd)
        deadline = time.monotonic() + 240
        while not any(p.is_dir() and any(p.glob("model-*")) for p in out.parent.glob(f".{out.name}.partial-*")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(sig)
        proc.wait(timeout=120)
        if proc.returncode != 0:
            return proc
        shutil.rmtree(out)
    pytest.fail(f"the save finished before the signal in all {attempts} attempts")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_save(sig, medium_model, tmp_path):
    """Ctrl-C during the save: the temporary is removed, exit 130. SIGKILL: nothing can clean up, so the
    temporary (a hidden ``.out.partial-HOST-PID-*`` directory) stays until the next save to ``out`` removes it."""
    src, plan = medium_model
    before = _digest(src)
    out = tmp_path / "out"
    cmd = minigpt("prune", "--model", src, "--plan", plan, "--out-of-core", "--out", out)
    proc = _interrupt_save(cmd, out, sig)
    assert not out.exists() and _digest(src) == before
    if sig == signal.SIGINT:
        lines = proc.stderr.read().strip().splitlines()
        assert proc.returncode == 130 and lines == ["minigpt: interrupted; nothing was written"], lines
        assert not list(tmp_path.iterdir())
        return
    assert proc.returncode == -9 and len(list(tmp_path.glob(".out.partial-*"))) == 1
    assert main(cmd[3:]) == 0  # the same command again, in this process
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and json.loads((out / "minigpt_plan.json").read_text())


def test_killed_file_write_leaves_nothing_after_the_next_write(tmp_path):
    """A writer killed inside ``atomic_file`` leaves its temporaries, including the library's own (safetensors
    writes a ``.tmpXXXXXX`` beside its target), all inside one hidden partial directory the next write removes."""
    from safetensors.torch import save_file

    from minigpt.io import atomic_file

    out = tmp_path / "stats.safetensors"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, sys; from minigpt.io import atomic_file\n"
        "with atomic_file(sys.argv[1]) as tmp:\n"
        "    (tmp.parent / '.tmpABCDEF').write_bytes(b'half')  # where safetensors' own temporary goes\n"
        "    os.kill(os.getpid(), 9)\n"), str(out)], check=False)
    assert killed.returncode == -9 and next(tmp_path.iterdir()).name.startswith(".stats.safetensors.partial-")
    with atomic_file(out) as tmp:
        save_file({"x": torch.ones(2)}, str(tmp))
    assert [p.name for p in tmp_path.iterdir()] == ["stats.safetensors"]


MISSING = ("--model", "/nonexistent/model", "--data", "/nonexistent/corpus")  # reached only if options pass


@pytest.mark.parametrize("argv, match", [
    (["prune", *MISSING, "--ratio", "1.5"], "--ratio must be in [0, 1)"),
    (["prune", *MISSING, "--threshold", "-1"], "--threshold must be in [0, 1]"),
    (["prune", *MISSING, "--ratio", "nan"], "--ratio must be in [0, 1)"),
    (["prune", *MISSING, "--ratio", "0.2", "--min-keep", "2"], "--min-keep must be in [0, 1]"),
    (["prune", *MISSING, "--multiple", "0"], "--multiple must be a positive integer"),
    (["prune", *MISSING, "--vocab", "--vocab-pad-to", "0"], "--vocab-pad-to must be a positive integer"),
    (["prune", *MISSING, "--eval-tokens", "0"], "--eval-tokens must be a positive integer"),
    (["prune", *MISSING, "--max-ppl-increase", "0"], "--max-ppl-increase must be > 0"),
    (["prune", *MISSING, "--max-ppl-increase", "0.1", "--budget-confidence", "1"], "--budget-confidence must be in"),
    (["prune", *MISSING, "--max-ppl-increase", "0.1", "--budget-doc-tokens", "0"], "--budget-doc-tokens must be a"),
    (["prune", *MISSING, "--max-bpb-increase", "-0.01"], "--max-bpb-increase must be > 0"),
    (["prune", *MISSING, "--max-bpb-increase", "inf"], "--max-bpb-increase must be > 0"),
    (["calibrate", *MISSING, "--seq-len", "0"], "--seq-len must be ≥ 2"),
    (["calibrate", *MISSING, "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["calibrate", *MISSING, "--max-tokens", "-5"], "--max-tokens must be a positive integer"),
    (["calibrate", *MISSING, "--checkpoint-every", "-1"], "--checkpoint-every must be ≥ 0"),
    (["eval", *MISSING, "--stride", "0"], "--stride must be a positive integer"),
    (["finetune", *MISSING, "--lr", "-1"], "--lr must be > 0"),
    (["finetune", *MISSING, "--train-doc-tokens", "0"], "--train-doc-tokens must be a positive integer"),
    (["finetune", *MISSING, "--eval-doc-tokens", "0"], "--eval-doc-tokens must be a positive integer"),
    (["mcq", "--model", "/nonexistent/model", "--questions", "/nonexistent/q.jsonl", "--choices", "1"],
     "--choices must be ≥ 2"),
    (["bench", "--model", "/nonexistent/model", "--batch-sizes", "1,0"], "--batch-sizes must be a positive integer"),
])
def test_bad_option_values_refused_first(argv, match, tmp_path, capsys):
    """Each value is refused before the model, the corpus or any output is touched (their paths do not exist)."""
    out = [] if argv[0] in ("eval", "mcq", "bench") else ["--out", tmp_path / "out"]
    _fails(capsys, [*argv, *out], match, tmp_path)


def test_binary_corpus_file_refused(model_dir, tmp_path, capsys):
    """``--data /bin/ls`` (or any non-text file) is refused by name with the share of undecodable bytes."""
    _fails(capsys, ["calibrate", "--model", model_dir, "--data", sys.executable, *CAL, "--out", tmp_path / "out"],
           f"data file {sys.executable} is not text", tmp_path)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "ok.txt").write_text("def f():\n    return 1\n" * 20)
    (corpus / "blob.txt").write_bytes(bytes(range(256)) * 64)
    _fails(capsys, ["prune", "--model", model_dir, "--data", corpus, *CAL, "--out", tmp_path / "out"],
           "blob.txt is not text", tmp_path)


def test_a_few_undecodable_bytes_only_warn(model_dir, tmp_path, caplog):
    """Latin-1 leftovers in otherwise UTF-8 text (below the 1 % bound) calibrate, with a warning."""
    data = tmp_path / "corpus.txt"
    data.write_bytes(("x = 1  # ok\n" * 2000).encode() + b"caf\xe9\n")
    with caplog.at_level("WARNING", logger="minigpt"):
        assert main(["calibrate", "--model", str(model_dir), "--data", str(data), *CAL,
                     "--out", str(tmp_path / "s.safetensors")]) == 0
    assert "not UTF-8" in caplog.text


@pytest.mark.parametrize("flags, match", [
    (("--heads", "1.5"), "--heads must be a fraction in [0, 1)"),
    (("--hidden", "-0.1"), "--hidden must be a fraction"),
    (("--mlp", "1.0"), "--ratio must be in [0, 1)"),
    (("--layers", "-1"), "--layers must be a number"),
    (("--target-params", "1.2"), "--target-params must be the fraction"),
    (("--target-params", "0.7", "--mlp", "0.1"), "--target-params chooses the MLP and head amounts"),
    (("--heads", "0.9"), "would remove every head of a KV group"),
    (("--heads", "0.9", "--heads-mode", "kv"), "would remove every head of a KV group"),
    (("--layers", "2"), "would remove every one of the 2 layers"),
    (("--hidden", "0.6"), "leaves fewer channels than head_dim = 16"),
])
def test_bad_structure_amounts(flags, match, model_dir, stats_file, tmp_path, capsys):
    before = _digest(model_dir)
    _fails(capsys, ["prune", "--model", model_dir, "--stats", stats_file, *flags, "--no-eval", "--out",
                    tmp_path / "out"], match, tmp_path)
    assert _digest(model_dir) == before
