"""Corpora: local files → streamed texts (``datasets``) → packed ``(batch, seq_len)`` token batches.

``--data`` takes files, directories, or a built-in corpus name: ``stdlib`` (CPython's standard-library
sources, shipped with the interpreter) and ``pydocs`` (the reST sources of Debian's ``python3.11-doc``),
each with a disjoint ``-heldout`` part (≈10 % of the files, chosen by a hash of the path) for evaluation.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from minigpt.errors import MiniGPTError

log = logging.getLogger("minigpt")
PYDOCS_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
TEXT_SUFFIXES = {".txt", ".py", ".rst", ".md", ".c", ".h", ".json", ".jsonl", ".parquet"}
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TEXT_SAMPLE_BYTES = 1 << 16
MAX_UNDECODABLE_SHARE = 0.01
"""A corpus file is text when at most this share of its first ``TEXT_SAMPLE_BYTES`` bytes is not UTF-8 (or NUL)."""


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def _pydocs_files() -> list[Path]:
    if not PYDOCS_ROOT.is_dir():
        raise MiniGPTError(f"corpus 'pydocs' needs Debian's python3.11-doc ({PYDOCS_ROOT} is missing): "
                           "apt-get install python3.11-doc")
    return sorted(p for p in PYDOCS_ROOT.rglob("*.rst.txt") if p.is_file())


BUILTIN_CORPORA = {"stdlib": _stdlib_files, "pydocs": _pydocs_files}


def is_heldout(path: Path) -> bool:
    """Deterministic ~10 % file split, stable across machines (hash of the last two path parts)."""
    return hashlib.sha1("/".join(path.parts[-2:]).encode()).digest()[0] % 10 == 0


def undecodable_share(path: Path) -> float:
    """Share of the first ``TEXT_SAMPLE_BYTES`` bytes of ``path`` that are NUL or not valid UTF-8."""
    with path.open("rb") as f:
        sample = f.read(TEXT_SAMPLE_BYTES)
    if not sample:
        return 0.0
    text = codecs.getincrementaldecoder("utf-8")("surrogateescape").decode(sample, final=False)  # cut char: fine
    bad = sum(1 for c in text if c == "\0" or "\udc80" <= c <= "\udcff")
    return bad / len(sample)


def check_text(path: Path) -> None:
    """Refuse a corpus file that is not text (parquet is binary by design); warn on a few undecodable bytes."""
    if path.suffix == ".parquet":
        return
    share = undecodable_share(path)
    if share > MAX_UNDECODABLE_SHARE:
        raise MiniGPTError(f"data file {path} is not text: {100 * share:.1f}% of its first "
                           f"{TEXT_SAMPLE_BYTES // 1024} KiB are NUL or not UTF-8 (at most "
                           f"{100 * MAX_UNDECODABLE_SHARE:g}% allowed)")
    if share:
        log.warning("data file %s: %.2f%% of its first bytes are not UTF-8 (replaced)", path, 100 * share)


def resolve_files(data: list[str] | str | None, default: str = "stdlib") -> list[Path]:
    """Expand corpus names, directories and files into a sorted file list; one-line errors for bad paths."""
    specs = [default] if not data else [data] if isinstance(data, str) else list(data)
    files: list[Path] = []
    for spec in specs:
        name, heldout = spec.removesuffix("-heldout"), spec.endswith("-heldout")
        if name in BUILTIN_CORPORA:
            files += [p for p in BUILTIN_CORPORA[name]() if is_heldout(p) == heldout]
            continue
        path = Path(spec)
        if not path.exists():
            raise MiniGPTError(f"data path {spec} does not exist (corpus names: {', '.join(BUILTIN_CORPORA)})")
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES) if path.is_dir() \
            else [path]
        for file in found:
            try:
                check_text(file)
            except OSError as err:
                raise MiniGPTError(f"data file {file} is unreadable: {err.strerror}") from err
        files += found
    if not files:
        raise MiniGPTError(f"corpus {' '.join(specs)} holds no files")
    return files


def iter_texts(
    files: list[Path], text_field: str = "text", seed: int | None = 0, rank: int = 0, world_size: int = 1
) -> Iterator[str]:
    """Stream documents from ``files`` (shuffled file order when ``seed`` is set; sharded by rank)."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    files = list(files)
    if seed is not None:
        random.Random(seed).shuffle(files)
    groups: dict[str, list[str]] = {}
    for f in files:
        groups.setdefault(_BUILDERS.get(f.suffix, "text"), []).append(str(f))
    datasets.disable_progress_bars()
    for builder, group in groups.items():
        kwargs = {"sample_by": "document", "encoding_errors": "replace"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=group, split="train", streaming=True, **kwargs)
        if world_size > 1:
            ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        for row in ds:
            if builder != "text" and text_field not in row:
                raise MiniGPTError(f"records in {group[0]} have no {text_field!r} field (use --text-field)")
            text = row[text_field]
            if text:
                yield text


def document_window(ids: list[int], length: int | None, seed: int | None = 0) -> list[int]:
    """``length`` consecutive tokens of a longer document, at an offset fixed by its content and ``seed``.

    The offset does not depend on the order documents arrive in, so every rank and every resumed run takes the
    same window of a document.
    """
    if length is not None and length < 1:
        raise MiniGPTError(f"tokens per document must be positive (got {length})")
    if length is None or len(ids) <= length:
        return ids
    key = hashlib.blake2b(repr((seed, len(ids), ids[:32])).encode(), digest_size=8).digest()
    start = random.Random(key).randrange(len(ids) - length + 1)
    return ids[start : start + length]


def iter_token_ids(tokenizer, texts: Iterator[str], doc_tokens: int | None = None,
                   seed: int | None = 0) -> Iterator[list[int]]:
    """Token ids of each document (a ``document_window`` of ``doc_tokens`` when given), then EOS if there is one."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in texts:
        yield document_window(tokenizer(text, add_special_tokens=False)["input_ids"], doc_tokens, seed) + eos


@dataclass
class Batches:
    """Packed calibration batches: ``input_ids: (B, seq_len)`` int64 with no padding.

    ``doc_tokens``: take at most that many tokens of each document (a seeded window), so that a token budget
    covers many documents instead of the first few long ones.
    """

    tokenizer: object
    files: list[Path]
    seq_len: int = 512
    batch_size: int = 8
    max_tokens: int | None = None
    text_field: str = "text"
    seed: int | None = 0
    rank: int = 0
    world_size: int = 1
    skip_sequences: int = 0  # resume: sequences of this stream already consumed
    allow_empty: bool = False  # a distributed rank's shard may hold no sequence (the total is checked)
    doc_tokens: int | None = None

    def __post_init__(self):
        if self.seq_len < 2 or self.batch_size < 1:
            raise MiniGPTError(f"seq_len must be ≥ 2 and batch_size ≥ 1 (got {self.seq_len}, {self.batch_size})")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise MiniGPTError(f"max_tokens must be positive (got {self.max_tokens})")

    @property
    def max_sequences(self) -> int | None:
        """Whole sequences covering at least ``max_tokens``."""
        return None if self.max_tokens is None else -(-self.max_tokens // self.seq_len)

    def sequences(self) -> Iterator[list[int]]:
        buf: list[int] = []
        n = 0
        texts = iter_texts(self.files, self.text_field, self.seed, self.rank, self.world_size)
        for ids in iter_token_ids(self.tokenizer, texts, self.doc_tokens, self.seed):
            buf.extend(ids)
            while len(buf) >= self.seq_len:
                if self.max_sequences is not None and n >= self.max_sequences:
                    return
                if n >= self.skip_sequences:
                    yield buf[: self.seq_len]
                n += 1
                buf = buf[self.seq_len :]
        if n == 0 and not self.allow_empty:
            raise MiniGPTError(
                f"corpus too small: {len(buf)} tokens, fewer than one sequence of {self.seq_len} "
                "(lower --seq-len or add data)"
            )

    def __iter__(self) -> Iterator[torch.Tensor]:
        rows: list[list[int]] = []
        for seq in self.sequences():
            rows.append(seq)
            if len(rows) == self.batch_size:
                yield torch.tensor(rows, dtype=torch.long)
                rows = []
        if rows:
            yield torch.tensor(rows, dtype=torch.long)
