"""Vocabulary pruning of SentencePiece-style tokenizers: Unigram and BPE with byte fallback (Llama 2, Mistral, Gemma).

The tokenizers are trained here with the ``tokenizers`` library on stdlib sources, with the pipeline of the
converted SentencePiece models (Metaspace ``▁``, byte-fallback pieces ``<0x00>``…``<0xFF>``, ByteFallback decoder).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from test_vocab import (
    CHAT_TEMPLATE,
    HELD_OUT_FILES,
    MULTILINGUAL,
    TRAIN_FILES,
    Case,
    check_reload,
    check_shrunk_model,
    read,
    tiny_model,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from minigpt.errors import MiniGPTError
from minigpt.pipeline.vocab import BYTE_PIECES, plan_vocab, prune_tokenizer

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def _with_byte_pieces(tok: Tokenizer) -> Tokenizer:
    """``tok`` with the 256 byte-fallback pieces inserted after the special tokens (score 0, as SentencePiece
    stores them) and ``byte_fallback`` on: the layout of a converted SentencePiece model."""
    spec = json.loads(tok.to_str())
    model, n = spec["model"], len(SPECIALS)
    if model["type"] == "Unigram":
        model["vocab"][n:n] = [[piece, 0.0] for piece in BYTE_PIECES]
    else:
        model["vocab"] = {t: i + 256 * (i >= n) for t, i in model["vocab"].items()}
        model["vocab"].update({piece: n + b for b, piece in enumerate(BYTE_PIECES)})
    model["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(spec))


def train_sentencepiece_style(kind: str) -> PreTrainedTokenizerFast:
    """A Unigram or byte-fallback BPE tokenizer (vocabulary 1000 + 256 byte pieces) trained on stdlib files."""
    if kind == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=1000, special_tokens=SPECIALS, unk_token="<unk>",
                                          show_progress=False)
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
        trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=SPECIALS, show_progress=False)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(  # Llama 2's decoder
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.train_from_iterator([read(f) for f in TRAIN_FILES], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=_with_byte_pieces(tok),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
    )


@pytest.fixture(scope="module", params=["unigram", "bpe-byte-fallback"])
def sp(request) -> Case:
    return Case(train_sentencepiece_style(request.param))


def _model(tokenizer) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())["model"]


def random_text(seed: int = 0, n: int = 3000) -> str:
    """Seeded random code points of every plane, except surrogates, the Metaspace symbol ``▁`` and a leading space
    (which SentencePiece's dummy prefix swallows, in the original too)."""
    rng = random.Random(seed)
    chars = ["x"]
    while len(chars) < n:
        c = chr(rng.choice([rng.randrange(0x20, 0x3000), rng.randrange(0x3000, 0x30000)]))
        if not 0xD800 <= ord(c) < 0xE000 and c != "▁":
            chars.append(c)
    return "".join(chars)


def test_plan_keeps_specials_byte_pieces_unknown_and_closure(sp):
    keep = set(sp.keep.tolist())
    assert 0 < len(keep) < len(sp.tok) and len(keep) % 8 == 0
    vocab, model = sp.tok.get_vocab(), _model(sp.tok)
    assert set(sp.tok.all_special_ids) <= keep and {vocab[p] for p in BYTE_PIECES} <= keep
    assert set(sp.counts.nonzero().flatten().tolist()) <= keep
    if model["type"] == "Unigram":
        lowest = min(score for _, score in model["vocab"])
        assert any(model["vocab"][i][1] == lowest for i in keep)  # the unknown-character penalty is unchanged
    else:
        for left, right in model["merges"]:
            if vocab[left + right] in keep:
                assert vocab[left] in keep and vocab[right] in keep, (left, right)


def test_pruned_json_keeps_scores_and_cannot_produce_dropped_tokens(sp):
    old, new = _model(sp.tok), _model(sp.pruned)
    assert new["byte_fallback"] and set(BYTE_PIECES) <= set(sp.pruned.get_vocab())
    assert sorted(sp.pruned.get_vocab().values()) == list(range(len(sp.keep)))
    if old["type"] == "Unigram":
        assert new["vocab"] == [old["vocab"][i] for i in sp.keep.tolist()]
        assert new["vocab"][new["unk_id"]][0] == "<unk>"
    else:
        vocab = new["vocab"]
        assert all(a in vocab and b in vocab and a + b in vocab for a, b in new["merges"])
    for tok in sp.tok.all_special_tokens:
        assert sp.pruned.convert_tokens_to_ids(tok) == sp.new_id[sp.tok.convert_tokens_to_ids(tok)]
    assert sp.pruned.chat_template == sp.tok.chat_template


def test_roundtrip_on_unseen_text(sp):
    byte_ids = set(sp.pruned.convert_tokens_to_ids(list(BYTE_PIECES)))
    for text in [read(f) for f in HELD_OUT_FILES] + MULTILINGUAL + [random_text()]:
        assert sp.tok.decode(sp.tok.encode(text)) == text  # the original can encode it
        ids = sp.pruned.encode(text)
        assert max(ids) < len(sp.keep)
        assert sp.pruned.decode(ids) == text
    assert byte_ids & set(sp.pruned.encode(MULTILINGUAL[3]))  # emoji go through the byte-fallback pieces


def test_text_with_kept_tokens_tokenises_identically(sp):
    lines = [line for f in HELD_OUT_FILES for line in read(f).splitlines(keepends=True) if line.strip()]
    kept_lines = [line for line in lines if (sp.new_id[sp.tok.encode(line)] >= 0).all()]
    assert len(kept_lines) > 100
    for text in sp.calib + kept_lines:
        old = torch.tensor(sp.tok.encode(text), dtype=torch.long)
        assert sp.pruned.encode(text) == sp.new_id[old].tolist()


@pytest.mark.parametrize("kind", ["llama-tied", "llama-untied"])
def test_shrink_and_reload_tiny_llama(sp, kind, tmp_path):
    model, tied = tiny_model(kind, len(sp.tok), sp.tok), kind == "llama-tied"
    logits = check_shrunk_model(sp, model, sp.calib[0], tied)
    check_reload(sp, model, sp.calib[0], logits, tmp_path, tied)


def test_refusals(sp):
    pieces = [("<unk>", 0.0), ("a", -1.0), ("b", -2.0), *((p, 0.0) for p in BYTE_PIECES[:255])]
    for backend in (
        Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=False)),  # T5-style: unknown text becomes <unk>
        Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True)),  # a byte piece is missing
    ):
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
        with pytest.raises(MiniGPTError, match="byte fallback") as err:
            plan_vocab(tok, torch.ones(len(tok), dtype=torch.long))
        assert "\n" not in str(err.value)
    byte_piece = sp.tok.convert_tokens_to_ids("<0xF0>")
    with pytest.raises(MiniGPTError, match="cannot drop"):
        prune_tokenizer(sp.tok, [i for i in sp.keep.tolist() if i != byte_piece])


def test_cli_prunes_the_vocabulary_of_a_sentencepiece_model(tmp_path):
    """``minigpt prune --vocab`` on a tiny Llama with a byte-fallback Unigram tokenizer: stock classes reload it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minigpt.cli import main

    tok = train_sentencepiece_style("unigram")
    model = tiny_model("llama-untied", len(tok), tok)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    corpus = tmp_path / "calib.txt"
    corpus.write_text(read("argparse.py"))
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tmp_path / "model"), "--vocab", "--ratio", "0", "--data", str(corpus),
                 "--max-tokens", "4096", "--seq-len", "128", "--no-eval", "--no-progress", "--out", str(out)]) == 0
    pruned, reloaded = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)
    assert len(pruned) < len(tok) and reloaded.get_input_embeddings().weight.shape[0] == len(pruned)
    for text in MULTILINGUAL + [read("shlex.py")[:2000]]:
        assert pruned.decode(pruned.encode(text)) == text
