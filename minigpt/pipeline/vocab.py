"""Vocabulary pruning: keep the tokens a domain uses, with a tokenizer that stays valid.

``plan_vocab`` picks the kept token ids, ``prune_tokenizer`` rewrites the fast tokenizer's JSON so it can only
produce kept tokens (renumbered ``0..K-1``), ``shrink_vocab`` cuts the embedding and LM-head rows to match.
Two tokenizer families can be pruned, both of which can encode any text from a fixed set of base symbols that
always stays: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM: the 256-symbol byte alphabet) and SentencePiece-style
tokenizers with byte fallback (BPE as in Llama 2, Mistral and Gemma, or Unigram: the pieces ``<0x00>``…``<0xFF>``).
So any text remains encodable and ``decode(encode(text)) == text`` whenever it holds for the original.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import torch

from minigpt.errors import MiniGPTError

# Config / generation-config fields holding token ids that must follow the renumbering.
SPECIAL_ID_FIELDS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "unk_token_id",
    "sep_token_id",
    "decoder_start_token_id",
)
# Tokenizer attributes carried over to the pruned tokenizer besides its special tokens.
TOKENIZER_FIELDS = (
    "chat_template",
    "model_max_length",
    "padding_side",
    "truncation_side",
    "clean_up_tokenization_spaces",
)


# The byte-fallback pieces of SentencePiece-style tokenizers: a character missing from the vocabulary is encoded as
# the pieces of its UTF-8 bytes.
BYTE_PIECES = tuple(f"<0x{b:02X}>" for b in range(256))


def _byte_alphabet() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return ByteLevel.alphabet()


def _has_byte_level(pre: dict | None) -> bool:
    if not pre:
        return False
    if pre["type"] == "ByteLevel":
        return True
    return pre["type"] == "Sequence" and any(_has_byte_level(p) for p in pre["pretokenizers"])


def _byte_fallback(model: dict) -> bool:
    """A BPE or Unigram model that encodes unknown characters as its ``<0xNN>`` pieces, all 256 of them present."""
    return bool(model.get("byte_fallback")) and set(BYTE_PIECES) <= _model_vocab(model).keys()


def _spec(tokenizer) -> dict:
    """The tokenizer's ``tokenizer.json`` as a dict; refuses all but byte-level BPE and byte-fallback BPE/Unigram."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise MiniGPTError("vocabulary pruning needs a fast (tokenizers-backed) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    kind = model["type"]
    pre = (spec.get("pre_tokenizer") or {}).get("type")
    byte_level = kind == "BPE" and _has_byte_level(spec.get("pre_tokenizer"))
    if not byte_level and not (kind in ("BPE", "Unigram") and _byte_fallback(model)):
        raise MiniGPTError(
            f"vocabulary pruning needs a byte-level BPE tokenizer or a BPE/Unigram one with byte fallback "
            f"(model {kind}, pre-tokenizer {pre}, byte_fallback {model.get('byte_fallback', False)}):"
            " without the byte alphabet or the <0x00>..<0xFF> pieces, dropping tokens would make some text unencodable"
        )
    return spec


def _model_vocab(model: dict) -> dict[str, int]:
    """Piece → id of a BPE (a dict already) or Unigram (a list of ``[piece, score]``, id = position) model."""
    if model["type"] == "Unigram":
        return {piece: i for i, (piece, _) in enumerate(model["vocab"])}
    return model["vocab"]


def _base_symbols(spec: dict) -> list[str]:
    """The pieces that let any text be encoded: the byte-level alphabet, or the byte-fallback pieces."""
    vocab = _model_vocab(spec["model"])
    symbols = BYTE_PIECES if spec["model"].get("byte_fallback") else _byte_alphabet()
    return [s for s in symbols if s in vocab]


def _unknown_pieces(model: dict) -> list[str]:
    """Pieces kept so unknown characters are handled as before: the unknown token and, for Unigram, the
    lowest-scoring piece (its score sets the penalty of an unknown character in the Viterbi search)."""
    if model["type"] != "Unigram":
        return [model["unk_token"]] if model.get("unk_token") in model["vocab"] else []
    pieces = [] if model.get("unk_id") is None else [model["vocab"][model["unk_id"]][0]]
    return pieces + [min(model["vocab"], key=lambda piece_score: piece_score[1])[0]]


def _pairs(model: dict) -> list[tuple[str, str]]:
    """The BPE merges as ``(left, right)`` pairs (tokenizer.json stores ``[a, b]`` or ``"a b"``)."""
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]


def _merge_result(left: str, right: str, prefix: str) -> str:
    return left + (right[len(prefix) :] if prefix and right.startswith(prefix) else right)


def _id_to_token(spec: dict) -> dict[int, str]:
    ids = {i: t for t, i in _model_vocab(spec["model"]).items()}
    ids.update({a["id"]: a["content"] for a in spec["added_tokens"]})
    return ids


def _merge_parts(spec: dict) -> dict[int, list[tuple[int, int]]]:
    """For each token id, the ``(left, right)`` id pairs of every merge that produces it."""
    model = spec["model"]
    if model["type"] != "BPE":
        return {}
    vocab, prefix = model["vocab"], model.get("continuing_subword_prefix") or ""
    parts: dict[int, list[tuple[int, int]]] = {}
    for left, right in _pairs(model):
        result = vocab.get(_merge_result(left, right, prefix))
        if result is not None and left in vocab and right in vocab:
            parts.setdefault(result, []).append((vocab[left], vocab[right]))
    return parts


def _closure(ids: Iterable[int], keep: list[bool], parts: dict[int, list[tuple[int, int]]]) -> set[int]:
    """The ids not yet in ``keep`` needed to keep ``ids``: themselves and, recursively, their merge parts."""
    new: set[int] = set()
    stack = [i for i in ids if not keep[i]]
    while stack:
        i = stack.pop()
        if i in new:
            continue
        new.add(i)
        stack.extend(p for pair in parts.get(i, ()) for p in pair if not keep[p] and p not in new)
    return new


def plan_vocab(
    tokenizer,
    counts: torch.Tensor,
    min_count: int = 1,
    always_keep: Sequence[str] = (),
    pad_to: int = 1,
    min_size: int = 0,
) -> torch.Tensor:
    """Old token ids to keep (ascending): frequent, special, base-symbol and ``always_keep`` tokens, merge-closed.

    ``counts[i]`` is how often id ``i`` appeared in the calibration corpus (ids past the tokenizer's vocabulary,
    e.g. padding rows of the embedding, are ignored and dropped). The merge-closure adds both parts of every merge
    that produces a kept token, recursively, so any text whose original tokenisation uses only kept tokens
    tokenises identically (BPE). For a Unigram model, that text's best segmentation stays the best: the kept pieces
    and their scores are unchanged, and keeping the lowest-scoring piece keeps the penalty of an unknown character,
    so a segmentation through a dropped piece's unknown character scores below the original's best.
    The most frequent remaining tokens (ties: lowest id, i.e. earliest merge), with their closures, are then added
    until at least ``min_size`` tokens are kept and the count is a multiple of ``pad_to`` (or nothing is left to add).
    """
    spec = _spec(tokenizer)
    vocab, id_to_tok = _model_vocab(spec["model"]), _id_to_token(spec)
    size = max(id_to_tok) + 1
    counts = torch.as_tensor(counts).flatten().long()
    if counts.numel() < size:
        raise MiniGPTError(f"token counts cover {counts.numel()} ids but the tokenizer has {size}")
    if pad_to < 1:
        raise MiniGPTError(f"pad_to must be >= 1, got {pad_to}")
    counts = counts[:size].tolist()
    keep = [i in id_to_tok and counts[i] >= min_count for i in range(size)]

    forced = [a["id"] for a in spec["added_tokens"]] + list(tokenizer.all_special_ids)
    forced += [vocab[c] for c in _base_symbols(spec) + _unknown_pieces(spec["model"])]
    token_ids = {t: i for i, t in id_to_tok.items()}
    for tok in always_keep:
        if tok not in token_ids:
            raise MiniGPTError(f"always-keep token {tok!r} is not in the tokenizer's vocabulary")
        forced.append(token_ids[tok])
    parts = _merge_parts(spec)
    for i in _closure([i for i in range(size) if keep[i]] + forced, [False] * size, parts):
        keep[i] = True

    kept = sum(keep)
    need = -(-max(kept, min_size) // pad_to) * pad_to - kept
    order = sorted((i for i in id_to_tok if not keep[i]), key=lambda i: (-counts[i], i))
    while need and order:
        for i in order:
            if not need:
                break
            new = _closure([i], keep, parts)
            if 0 < len(new) <= need:
                for j in new:
                    keep[j] = True
                need -= len(new)
        order = [i for i in order if not keep[i]]
    return torch.tensor([i for i in range(size) if keep[i]], dtype=torch.long)


def _remap_processor(proc: dict | None, new_id: dict[int, int]) -> None:
    """Renumber the special-token ids a post-processor inserts (template, Roberta/Bert, sequences), in place."""
    if not proc:
        return
    for sub in proc.get("processors") or ():
        _remap_processor(sub, new_id)
    for special in (proc.get("special_tokens") or {}).values():
        special["ids"] = [new_id[i] for i in special["ids"]]
    for key in ("sep", "cls"):
        if key in proc:
            proc[key] = [proc[key][0], new_id[proc[key][1]]]


def _prune_unigram(model: dict, keep: list[int], vocab: dict[str, int], new_id: dict[int, int]) -> None:
    """Keep the Unigram pieces ``vocab`` (with their scores) at their new ids, in place; renumber ``unk_id``."""
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise MiniGPTError("a Unigram tokenizer's kept model pieces must come first in keep_ids (ids are positions)")
    model["vocab"] = [model["vocab"][old] for old in keep if old < len(model["vocab"])]
    if model.get("unk_id") is not None:
        model["unk_id"] = new_id[model["unk_id"]]


def prune_tokenizer(tokenizer, keep_ids: torch.Tensor | Sequence[int]):
    """A new fast tokenizer with only ``keep_ids`` (new id = position in ``keep_ids``); specials/template kept.

    Merges survive only if both parts and the result are kept, so a dropped token can never be produced; a Unigram
    model keeps its pieces' scores (its model pieces must come first in ``keep_ids``, as ids are list positions).
    Every added/special token, base symbol (byte alphabet or byte-fallback piece) and the Unigram unknown piece of
    the original must be in ``keep_ids``.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = _spec(tokenizer)
    model, id_to_tok = spec["model"], _id_to_token(spec)
    model_vocab = _model_vocab(model)
    keep = [int(i) for i in keep_ids]
    if len(set(keep)) != len(keep) or any(i not in id_to_tok for i in keep):
        raise MiniGPTError("keep_ids must be distinct ids of the tokenizer's vocabulary")
    new_id = {old: new for new, old in enumerate(keep)}
    required = [a["id"] for a in spec["added_tokens"]] + [model_vocab[c] for c in _base_symbols(spec)]
    if model["type"] == "Unigram" and model.get("unk_id") is not None:
        required.append(model["unk_id"])
    if dropped := [id_to_tok[i] for i in required if i not in new_id]:
        raise MiniGPTError(f"cannot drop special/added, unknown or byte-alphabet/byte-fallback tokens: {dropped[:5]}")

    vocab = {id_to_tok[old]: new for old, new in new_id.items() if id_to_tok[old] in model_vocab}
    if model["type"] == "Unigram":
        _prune_unigram(model, keep, vocab, new_id)
    else:
        prefix = model.get("continuing_subword_prefix") or ""
        model["merges"] = [
            m
            for m, (a, b) in zip(model["merges"], _pairs(model))
            if a in vocab and b in vocab and _merge_result(a, b, prefix) in vocab
        ]
        model["vocab"] = vocab
    for added in spec["added_tokens"]:
        added["id"] = new_id[added["id"]]
    _remap_processor(spec.get("post_processor"), new_id)
    if spec.get("padding"):
        spec["padding"]["pad_id"] = new_id[spec["padding"]["pad_id"]]

    kwargs = {k: v for k, v in tokenizer.special_tokens_map.items() if k in tokenizer.SPECIAL_TOKENS_ATTRIBUTES}
    kwargs.update({k: getattr(tokenizer, k) for k in TOKENIZER_FIELDS if getattr(tokenizer, k, None) is not None})
    if extra := getattr(tokenizer, "extra_special_tokens", None):
        kwargs["extra_special_tokens"] = list(extra)
    pruned = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), **kwargs)
    if len(pruned) != len(keep):
        raise MiniGPTError(f"pruned tokenizer has {len(pruned)} tokens, expected {len(keep)}")
    return pruned


def _check_keep(model, keep_ids) -> torch.Tensor:
    keep = torch.as_tensor(keep_ids, dtype=torch.long).flatten()
    rows = model.get_input_embeddings().weight.shape[0]
    if keep.numel() == 0 or keep.min() < 0 or keep.max() >= rows or keep.unique().numel() != keep.numel():
        raise MiniGPTError(f"keep_ids must be distinct ids below the model's vocabulary size {rows}")
    return keep


def _remap_ids(value, new_id: dict[int, int], field: str):
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [_remap_ids(v, new_id, field) for v in value]
    if int(value) not in new_id:
        raise MiniGPTError(f"{field}={value} is not among the kept tokens")
    return new_id[int(value)]


def shrink_vocab(model, keep_ids: torch.Tensor | Sequence[int]) -> None:
    """Cut the input embedding and LM head (and its bias) to the ``keep_ids`` rows, in place; renumber special ids.

    The existing modules keep their type (e.g. scaled embeddings) and only get smaller parameters; a tied model
    stays tied (one matrix). ``config.vocab_size`` and the bos/eos/pad/... ids of ``model.config`` and
    ``model.generation_config`` follow the renumbering.
    """
    keep = _check_keep(model, keep_ids)
    new_id = {int(old): new for new, old in enumerate(keep.tolist())}
    configs = [model.config, model.config.get_text_config()]
    if getattr(model, "generation_config", None) is not None:
        configs.append(model.generation_config)
    updates = [
        (cfg, f, _remap_ids(getattr(cfg, f), new_id, f))
        for cfg in configs
        for f in SPECIAL_ID_FIELDS
        if getattr(cfg, f, None) is not None
    ]

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight

    def cut(param: torch.nn.Parameter) -> torch.nn.Parameter:
        return torch.nn.Parameter(param.detach()[keep.to(param.device)].clone(), requires_grad=param.requires_grad)

    emb.weight = cut(emb.weight)
    emb.num_embeddings = len(keep)
    if getattr(emb, "padding_idx", None) is not None:
        emb.padding_idx = new_id.get(emb.padding_idx)
    if head is not None:
        head.weight = emb.weight if tied else cut(head.weight)
        if getattr(head, "bias", None) is not None:
            head.bias = cut(head.bias)
        head.out_features = len(keep)
    for cfg, field, value in updates:
        setattr(cfg, field, value)
    model.config.get_text_config().vocab_size = len(keep)
    if hasattr(model, "vocab_size"):
        model.vocab_size = len(keep)
    if tied:
        model.tie_weights()


def vocab_report(model, keep_ids: torch.Tensor | Sequence[int]) -> dict:
    """Tokens kept/removed and embedding parameters saved by ``shrink_vocab(model, keep_ids)`` (call it before)."""
    keep = _check_keep(model, keep_ids)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    params = {
        id(p): p for p in (emb.weight, getattr(head, "weight", None), getattr(head, "bias", None)) if p is not None
    }
    old, kept = emb.weight.shape[0], len(keep)
    per_row = sum(p[0].numel() for p in params.values())
    return {
        "vocab_old": old,
        "vocab_kept": kept,
        "vocab_removed": old - kept,
        "removed_pct": 100.0 * (old - kept) / old,
        "tied": head is not None and head.weight is emb.weight,
        "embedding_params_old": old * per_row,
        "embedding_params_saved": (old - kept) * per_row,
    }


def count_tokens(tokenizer, texts: Iterable[str], size: int | None = None) -> torch.Tensor:
    """How often each token id occurs when encoding ``texts`` (no special tokens added); int64 of length ``size``."""
    size = size or len(tokenizer)
    counts = torch.zeros(size, dtype=torch.long)
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=size)[:size]
    return counts


def corpus_token_counts(tokenizer, data, max_tokens: int, size: int, text_field: str = "text",
                        progress: bool = True) -> torch.Tensor:
    """Token histogram (int64, ``size``) of the first ``max_tokens`` packed tokens of a corpus: tokenizer only.

    The same tokens a calibration of ``max_tokens`` would see (documents joined with EOS), without any forward
    pass, so a vocabulary can be counted over far more text than the model can afford to read.
    """
    from tqdm.auto import tqdm

    from minigpt.pipeline.data import Batches, resolve_files

    counts = torch.zeros(size, dtype=torch.long)
    batches = Batches(tokenizer, resolve_files(data), seq_len=1024, batch_size=16, max_tokens=max_tokens,
                      text_field=text_field)
    with tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="counting tokens", disable=not progress) as bar:
        for ids in batches:
            counts += torch.bincount(ids.flatten(), minlength=size)[:size]
            bar.update(ids.numel())
    return counts


def tokens_per_byte(tokenizer, texts: Iterable[str]) -> float:
    """Tokens per UTF-8 byte over ``texts`` (no special tokens added): lower means better compression."""
    tokens = total = 0
    for text in texts:
        tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        total += len(text.encode("utf-8"))
    return tokens / max(total, 1)
