"""Vocabulary pruning: the pruned tokenizer stays valid and the shrunk model computes the same logits."""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from minigpt.errors import MiniGPTError
from minigpt.pipeline.vocab import (
    count_tokens,
    plan_vocab,
    prune_tokenizer,
    shrink_vocab,
    tokens_per_byte,
    vocab_report,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Disjoint stdlib sources: training the tiny tokenizer, calibrating, held out.
TRAIN_FILES = ["ast.py", "dataclasses.py", "functools.py", "inspect.py"]
CALIB_FILES = ["argparse.py", "enum.py", "typing.py"]
HELD_OUT_FILES = ["json/decoder.py", "shlex.py", "textwrap.py"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MULTILINGUAL = [
    "机器学习模型的词汇表剪枝。東京で会いましょう。한국어 텍스트",
    "Обрезка словаря языковой модели — съешь ещё этих мягких булок.",
    "تقليم المفردات في نماذج اللغة الكبيرة، مرحبا بالعالم",
    "emoji: 🎉👍🏽🧑‍🚀🇫🇷 ❤️ 🐍",
]


def read(name: str) -> str:
    return (STDLIB / name).read_text(encoding="utf-8")


def random_unicode(tokenizer, seed: int = 0, n: int = 3000) -> str:
    """Seeded random code points (all planes) whose UTF-8 bytes the original tokenizer's vocabulary covers."""
    vocab = tokenizer.get_vocab()
    ok = {b for b in range(256) if _byte_char(b) in vocab}
    rng = random.Random(seed)
    chars = []
    while len(chars) < n:
        c = chr(rng.choice([rng.randrange(0x20, 0x3000), rng.randrange(0x3000, 0x30000)]))
        if not 0xD800 <= ord(c) < 0xE000 and set(c.encode("utf-8")) <= ok:
            chars.append(c)
    return "".join(chars)


def _byte_char(b: int) -> str:
    """The byte-level alphabet symbol of byte ``b`` (GPT-2's bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if b in printable:
        return chr(b)
    return chr(256 + [x for x in range(256) if x not in printable].index(b))


def train_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (vocab 1000) trained on a few stdlib files, with ChatML specials."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([read(f) for f in TRAIN_FILES], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


class Case:
    """A tokenizer with its calibration counts, plan and pruned tokenizer."""

    def __init__(self, tokenizer, calib_chars: int | None = None):
        self.tok = tokenizer
        self.calib = [read(f)[:calib_chars] for f in CALIB_FILES]
        self.counts = count_tokens(tokenizer, self.calib)
        self.keep = plan_vocab(tokenizer, self.counts, pad_to=8)
        self.pruned = prune_tokenizer(tokenizer, self.keep)
        self.new_id = torch.full((len(tokenizer),), -1, dtype=torch.long)
        self.new_id[self.keep] = torch.arange(len(self.keep))


@pytest.fixture(scope="module")
def tiny() -> Case:
    return Case(train_tiny_tokenizer())


@pytest.fixture(scope="module")
def smol() -> Case:
    from minigpt.io import default_model_path

    # ~60k tokens of stdlib source calibrate the real SmolLM2 tokenizer.
    return Case(AutoTokenizer.from_pretrained(default_model_path()), calib_chars=80_000)


@pytest.fixture(scope="module", params=["tiny", "smol"])
def case(request) -> Case:
    return request.getfixturevalue(request.param)


def held_out_texts(case: Case) -> list[str]:
    return [read(f) for f in HELD_OUT_FILES] + MULTILINGUAL + [random_unicode(case.tok)]


def test_plan_keeps_specials_bytes_and_merge_closure(case):
    keep = case.keep.tolist()
    assert keep == sorted(set(keep)) and len(keep) % 8 == 0
    assert 0 < len(keep) < len(case.tok)
    kept = set(keep)
    assert set(case.tok.all_special_ids) <= kept
    vocab = case.tok.get_vocab()
    assert {vocab[c] for c in pre_tokenizers.ByteLevel.alphabet() if c in vocab} <= kept
    assert set(case.counts.nonzero().flatten().tolist()) <= kept
    spec = json.loads(case.tok.backend_tokenizer.to_str())["model"]
    for left, right in spec["merges"]:
        if vocab[left + right] in kept:
            assert vocab[left] in kept and vocab[right] in kept, (left, right)


def test_pruned_tokenizer_json_cannot_produce_dropped_tokens(case):
    spec = json.loads(case.pruned.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(len(case.keep)))
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in spec["model"]["merges"])
    for tok in case.tok.all_special_tokens:
        assert case.pruned.convert_tokens_to_ids(tok) == case.new_id[case.tok.convert_tokens_to_ids(tok)]
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(case.pruned, name) == case.new_id[getattr(case.tok, name)]
    assert case.pruned.chat_template == case.tok.chat_template


def test_roundtrip_on_unseen_text(case):
    for text in held_out_texts(case):
        assert case.tok.decode(case.tok.encode(text)) == text  # the original can encode it
        ids = case.pruned.encode(text)
        assert max(ids) < len(case.keep)
        assert case.pruned.decode(ids) == text


def test_text_with_kept_tokens_tokenises_identically(case):
    lines = [line for f in HELD_OUT_FILES for line in read(f).splitlines(keepends=True)]
    kept_lines = [line for line in lines if (case.new_id[case.tok.encode(line)] >= 0).all()]
    assert len(kept_lines) > 100
    for text in case.calib + kept_lines:
        old = torch.tensor(case.tok.encode(text), dtype=torch.long)
        assert case.pruned.encode(text) == case.new_id[old].tolist()


def test_compression_and_report(tiny):
    held = [read(f) for f in HELD_OUT_FILES]
    old, new = tokens_per_byte(tiny.tok, held), tokens_per_byte(tiny.pruned, held)
    assert 0 < old <= new < 1
    text = MULTILINGUAL[0]
    assert tokens_per_byte(tiny.tok, [text]) == len(tiny.tok.encode(text)) / len(text.encode("utf-8"))


def test_non_byte_level_tokenizers_are_refused():
    vocab = {"[UNK]": 0, "a": 1, "b": 2, "ab": 3}
    wordpiece = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    char_bpe = Tokenizer(models.BPE(vocab, [("a", "b")], unk_token="[UNK]"))
    char_bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    unigram = Tokenizer(models.Unigram([("[UNK]", 0.0), ("a", -1.0), ("b", -1.0)], unk_id=0))
    for backend in (wordpiece, char_bpe, unigram):
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
        with pytest.raises(MiniGPTError, match="needs a byte-level BPE tokenizer") as err:
            plan_vocab(tok, torch.ones(len(tok), dtype=torch.long))
        assert "\n" not in str(err.value)
        with pytest.raises(MiniGPTError, match="byte-level BPE"):
            prune_tokenizer(tok, [0, 1])


def test_plan_options_and_refusals(tiny):
    base = plan_vocab(tiny.tok, tiny.counts, min_count=5)
    padded = plan_vocab(tiny.tok, tiny.counts, min_count=5, pad_to=64)
    assert len(padded) % 64 == 0 and set(base.tolist()) <= set(padded.tolist())
    small = plan_vocab(tiny.tok, tiny.counts, min_count=50)
    sized = plan_vocab(tiny.tok, tiny.counts, min_count=50, min_size=len(small) + 10, pad_to=8)
    assert len(sized) == -(-(len(small) + 10) // 8) * 8 and set(small.tolist()) <= set(sized.tolist())
    assert len(plan_vocab(tiny.tok, tiny.counts, min_count=10**9)) < len(base)
    word = max(tiny.tok.get_vocab(), key=len)
    assert tiny.tok.convert_tokens_to_ids(word) in plan_vocab(tiny.tok, tiny.counts * 0, always_keep=[word])
    with pytest.raises(MiniGPTError, match="always-keep"):
        plan_vocab(tiny.tok, tiny.counts, always_keep=["no such token"])
    with pytest.raises(MiniGPTError, match="counts"):
        plan_vocab(tiny.tok, tiny.counts[:10])
    special = tiny.tok.convert_tokens_to_ids("<|im_end|>")
    with pytest.raises(MiniGPTError, match="cannot drop"):
        prune_tokenizer(tiny.tok, [i for i in tiny.keep.tolist() if i != special])


def tiny_model(kind: str, vocab_size: int, tok):
    torch.manual_seed(0)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, **ids)).eval()
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=kind == "llama-tied",
        **ids,
    )
    model = LlamaForCausalLM(config).eval()
    if kind == "llama-bias":
        model.lm_head = torch.nn.Linear(32, vocab_size, bias=True)
    return model


def check_shrunk_model(case: Case, model, text: str, tied: bool, n: int = 300) -> torch.Tensor:
    """Shrink ``model``; its logits on (calibration) ``text`` equal the original's kept columns. Returns them."""
    old_ids = torch.tensor([case.tok.encode(text)[:n]])
    new_ids = case.new_id[old_ids]
    assert (new_ids >= 0).all()
    with torch.no_grad():
        before = model(old_ids).logits[..., case.keep]
    report = vocab_report(model, case.keep)
    shrink_vocab(model, case.keep)
    k, dim = len(case.keep), model.get_input_embeddings().weight.shape[1]
    assert report["vocab_kept"] == k and report["tied"] == tied
    assert report["embedding_params_saved"] >= (report["vocab_old"] - k) * dim * (1 if tied else 2)
    assert model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == k
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert model.config.vocab_size == k and model.config.eos_token_id == case.pruned.eos_token_id
    with torch.no_grad():
        after = model(new_ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    return after


def check_reload(case: Case, model, text: str, logits: torch.Tensor, tmp_path: Path, tied: bool) -> None:
    """Save; reload with stock Auto* classes (same ids and logits); a chat prompt generates and decodes."""
    model.save_pretrained(tmp_path)
    case.pruned.save_pretrained(tmp_path)
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    assert (model2.get_output_embeddings().weight is model2.get_input_embeddings().weight) == tied
    old_ids = torch.tensor(case.tok.encode(text))
    assert len(tok2) == len(case.keep) and tok2.encode(text) == case.new_id[old_ids].tolist()
    with torch.no_grad():
        torch.testing.assert_close(model2(case.new_id[old_ids[None, : logits.shape[1]]]).logits, logits)
    chat = tok2.apply_chat_template(
        [{"role": "user", "content": "Write a Python loop."}], add_generation_prompt=True, return_tensors="pt"
    )
    chat = chat if torch.is_tensor(chat) else chat["input_ids"]
    out = model2.generate(chat, max_new_tokens=6, do_sample=False, pad_token_id=tok2.pad_token_id)
    assert out.shape[1] > chat.shape[1] and (out < len(case.keep)).all()
    assert isinstance(tok2.decode(out[0, chat.shape[1] :]), str)


@pytest.mark.parametrize("kind", ["llama-tied", "llama-untied", "llama-bias", "gpt2"])
def test_shrink_tiny_models(tiny, kind, tmp_path):
    model, tied = tiny_model(kind, len(tiny.tok), tiny.tok), kind in ("llama-tied", "gpt2")
    logits = check_shrunk_model(tiny, model, tiny.calib[0], tied)
    if kind != "llama-bias":  # stock Llama has no LM-head bias to reload
        check_reload(tiny, model, tiny.calib[0], logits, tmp_path, tied)


def test_shrink_remaps_eos_list_and_refuses_dropped_ids(tiny):
    model = tiny_model("llama-untied", len(tiny.tok), tiny.tok)
    end, im_end = tiny.tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    model.generation_config.eos_token_id = [im_end, end]
    dropped = [i for i in range(len(tiny.tok)) if i not in set(tiny.keep.tolist())][:3]
    with pytest.raises(MiniGPTError, match="eos_token_id"):
        shrink_vocab(model, [i for i in tiny.keep.tolist() if i != im_end] + dropped)
    assert model.get_input_embeddings().weight.shape[0] == len(tiny.tok)  # refused before any change
    shrink_vocab(model, tiny.keep)
    assert model.generation_config.eos_token_id == tiny.new_id[[im_end, end]].tolist()
    assert model.config.pad_token_id == tiny.pruned.pad_token_id


@pytest.mark.slow
def test_shrink_smollm2(smol, tmp_path):
    from minigpt.io import load_model

    model, _ = load_model()
    logits = check_shrunk_model(smol, model, smol.calib[1], tied=True, n=200)
    check_reload(smol, model, smol.calib[1], logits, tmp_path, tied=True)
