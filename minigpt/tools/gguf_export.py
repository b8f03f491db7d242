"""Export a (pruned) Llama-family model to one GGUF file that llama.cpp runs, with the ``gguf`` library.

llama.cpp's own converter recognises a BPE pre-tokenizer by hashing the token ids of a fixed text, which
vocabulary pruning renumbers; here the pre-tokenizer name comes from the tokenizer's own ``pre_tokenizer``
description (unchanged by vocabulary pruning), so a vocabulary-pruned model exports like the original and
llama.cpp splits text exactly as the saved tokenizer does. Per-layer MLP widths are refused: llama.cpp's
``llama`` architecture has one ``feed_forward_length``.

Tensors: 1-D ones (norms) stay F32, like llama.cpp's converter; matrices take ``--type``; a matrix whose rows are
not a multiple of the type's block (32 for Q8_0/Q4_0) falls back to F16, as llama.cpp does, and is reported.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from minigpt.errors import MiniGPTError
from minigpt.models import adapters

TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0",
         "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1"}
EXPORTABLE = ("llama",)
PER_LAYER_REFUSAL = ("llama.cpp's llama architecture has one feed_forward_length for every layer; prune with a "
                     "uniform --ratio to export")

# tokenizer.json ``pre_tokenizer`` descriptions → llama.cpp's pre-tokenizer names (its ``tokenizer.ggml.pre``).
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS = {
    "gpt-2": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
}


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer; one-line error naming the known ones otherwise."""
    described = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer")
    for name, description in PRE_TOKENIZERS.items():
        if described == description:
            return name
    raise MiniGPTError(f"pre-tokenizer {json.dumps(described)[:120]} is not one llama.cpp names here "
                       f"({', '.join(PRE_TOKENIZERS)}); give its llama.cpp name with --pre-tokenizer")


def _check_exportable(model) -> None:
    widths = adapters.widths(model)
    if len(set(widths)) > 1:
        raise MiniGPTError(f"cannot export per-layer MLP widths ({min(widths)}..{max(widths)}) to GGUF: "
                           f"{PER_LAYER_REFUSAL}")
    model_type = model.config.model_type
    if model_type not in EXPORTABLE:
        raise MiniGPTError(f"GGUF export supports {', '.join(EXPORTABLE)}, not {model_type!r}")


def _permute_for_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half q/k rows → the interleaved pairs llama.cpp's llama rope reads. ``w``: (heads·head_dim, in)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocabulary(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings by id and llama.cpp token types; ids past the tokenizer (padded embeddings) are UNUSED."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _quantised(w: np.ndarray, qtype):
    """``(data, type)``: F32 for 1-D tensors, F16 when rows do not fill whole blocks of ``qtype``."""
    import gguf

    if w.ndim == 1:
        return w.astype(np.float32), gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if w.shape[-1] % block:
        qtype = gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(w, qtype), qtype


def export_gguf(model, tokenizer, out: str | Path, qtype: str = "f16", pre_tokenizer: str | None = None,
                source_dir: str | Path | None = None) -> dict:
    """Write ``model`` (uniform widths, Llama family) and its tokenizer to ``out`` atomically; returns a report
    (tensor types, fallbacks to F16, file size). ``source_dir``: the saved model directory, for the tokenizer's
    merges, special ids and chat template (``gguf.SpecialVocab``)."""
    import gguf

    from minigpt.io import atomic_file

    if qtype not in TYPES:
        raise MiniGPTError(f"GGUF type must be one of {', '.join(TYPES)}, got {qtype!r}")
    _check_exportable(model)
    pre = pre_tokenizer or pre_tokenizer_name(tokenizer)
    cfg = model.config
    n_vocab = model.get_input_embeddings().num_embeddings
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    file_type = gguf.LlamaFileType[TYPES[qtype]]
    matrix_type = gguf.GGMLQuantizationType[qtype.upper()]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tokens, types = _vocabulary(tokenizer, n_vocab)
    rope = getattr(cfg, "rope_parameters", None) or {}
    report = {"type": qtype, "pre_tokenizer": pre, "tensors": {}, "f16_fallback": []}
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_name(Path(getattr(model, "name_or_path", "") or "model").name)
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(adapters.widths(model)[0])
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(n_vocab)
        writer.add_file_type(file_type)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        ids, bare = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
        writer.add_add_bos_token(len(ids) > len(bare))
        if source_dir is not None:
            gguf.SpecialVocab(source_dir, load_merges=True, n_vocab=n_vocab).add_to_gguf(writer)
        state = model.state_dict()
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        for hf_name, tensor in state.items():
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise MiniGPTError(f"no GGUF name for tensor {hf_name}")
            w = tensor.detach().to(torch.float32).cpu()
            if hf_name.endswith("q_proj.weight"):
                w = _permute_for_rope(w, cfg.num_attention_heads)
            elif hf_name.endswith("k_proj.weight"):
                w = _permute_for_rope(w, cfg.num_key_value_heads)
            data, used = _quantised(w.numpy(), matrix_type)
            writer.add_tensor(name, data, raw_dtype=used)
            report["tensors"][name] = used.name
            if used != matrix_type and w.ndim > 1:
                report["f16_fallback"].append(name)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    report["bytes"] = Path(out).stat().st_size
    return report
