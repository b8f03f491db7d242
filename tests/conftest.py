"""Shared fixtures: tiny random-initialised models of every adapter, a tiny trained BPE tokenizer, corpora."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TINY_VOCAB = 512


def tiny_config(model_type: str, tied: bool = False, vocab_size: int = TINY_VOCAB):
    """A 2-layer config of ``model_type`` (hidden 32, MLP width 48) with untied or tied embeddings."""
    from transformers import AutoConfig

    common = {"vocab_size": vocab_size, "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2,
              "pad_token_id": 0}
    per_type = {
        "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_inner": 48, "n_positions": 128},
        "opt": {"hidden_size": 32, "ffn_dim": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
                "word_embed_proj_dim": 32, "max_position_embeddings": 128},
        "phi": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
                "max_position_embeddings": 128},
    }
    kwargs = per_type.get(model_type, {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                                       "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                                       "max_position_embeddings": 128})
    return AutoConfig.for_model(model_type, **common, **kwargs)


def tiny_model(model_type: str, tied: bool = False, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, tied)).eval()


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A small real corpus: a few stdlib modules copied as text files, plus a held-out one."""
    root = tmp_path_factory.mktemp("corpus")
    for name in ("heapq.py", "bisect.py", "textwrap.py", "shlex.py", "glob.py"):
        (root / f"{name}.txt").write_text((STDLIB / name).read_text())
    return root


@pytest.fixture(scope="session")
def tiny_tokenizer(corpus_dir):
    """A byte-level BPE tokenizer of ``TINY_VOCAB`` tokens trained on the corpus (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(p) for p in sorted(corpus_dir.iterdir())], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fp32, CPU) and its tokenizer; loaded once per session."""
    from minigpt.io import load_model

    return load_model()


@pytest.fixture
def one_thread():
    """Torch on one thread in this process: OpenMP's spinning threads crawl on a shared two-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
