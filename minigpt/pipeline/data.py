"""Corpora: local files → streamed documents → packed ``(batch, seq_len)`` token batches.

Plain-text files are read directly (large ones in ~1 MiB pieces, ``text_pieces``), JSON lines and parquet
through ``datasets`` streaming; documents are dealt round-robin to ranks, tokenized in groups and packed in
linear time on a background thread (``Prefetch``).

``--data`` takes files, directories, or a built-in corpus name: ``stdlib`` (CPython's standard-library
sources, shipped with the interpreter) and ``pydocs`` (the reST sources of Debian's ``python3.11-doc``),
each with a disjoint ``-heldout`` part (≈10 % of the files, chosen by a hash of the path) for evaluation.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import queue
import random
import sysconfig
import threading
import time
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


LARGE_FILE_BYTES = 1 << 20
"""A plain-text file larger than this is read as ``⌈size / LARGE_FILE_BYTES⌉`` pieces, each one document."""
BOUNDARY_WINDOW = 1 << 16
"""Where a piece starts: after the first blank line in this many bytes from its nominal offset, else the first
line end, else the first UTF-8 character boundary."""


def _piece_start(f, size: int, k: int) -> int:
    """Byte offset where piece ``k`` of the open binary file ``f`` starts (``size`` for the end)."""
    nominal = k * LARGE_FILE_BYTES
    if k == 0 or nominal >= size:
        return min(nominal, size)
    f.seek(nominal)
    window = f.read(BOUNDARY_WINDOW)
    for sep in (b"\n\n", b"\n"):
        at = window.find(sep)
        if at >= 0:
            return nominal + at + len(sep)
    continuation = next((i for i, b in enumerate(window) if b & 0xC0 != 0x80), len(window))
    return nominal + continuation


def text_pieces(path: Path) -> int:
    """How many documents the plain-text file ``path`` is read as (1 up to ``LARGE_FILE_BYTES``)."""
    return max(1, -(-path.stat().st_size // LARGE_FILE_BYTES))


def read_pieces(path: Path, wanted) -> Iterator[str]:
    """The text of pieces ``wanted`` (increasing indices) of ``path``; memory bounded by one piece."""
    size = path.stat().st_size
    with path.open("rb") as f:
        for k in wanted:
            start, end = _piece_start(f, size, k), _piece_start(f, size, k + 1)
            f.seek(start)
            yield f.read(max(end - start, 0)).decode("utf-8", errors="replace")


def iter_texts(
    files: list[Path], text_field: str = "text", seed: int | None = 0, rank: int = 0, world_size: int = 1
) -> Iterator[str]:
    """Stream documents from ``files`` (shuffled file order when ``seed`` is set), round-robin across ranks.

    A plain-text file is one document, or pieces of about ``LARGE_FILE_BYTES`` cut at blank lines (see
    ``text_pieces``); JSON lines / parquet records are one document each (``datasets`` streaming). Documents are
    numbered in stream order and rank ``r`` of ``world_size`` takes those numbered ``r mod world_size``; it
    reads only its own text files and pieces.
    """
    import datasets

    files = list(files)
    if seed is not None:
        random.Random(seed).shuffle(files)
    index = 0
    records: dict[str, list[str]] = {}
    for f in files:
        builder = _BUILDERS.get(f.suffix)
        if builder is not None:
            records.setdefault(builder, []).append(str(f))
            continue
        n = text_pieces(f)
        first = (rank - index) % world_size
        index += n
        yield from filter(None, read_pieces(f, range(first, n, world_size)))
    datasets.disable_progress_bars()
    for builder, group in records.items():
        ds = datasets.load_dataset(builder, data_files=group, split="train", streaming=True)
        for row in ds:
            if text_field not in row:
                raise MiniGPTError(f"records in {group[0]} have no {text_field!r} field (use --text-field)")
            if index % world_size == rank and row[text_field]:
                yield row[text_field]
            index += 1


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


TOKENIZE_GROUP_CHARS = 1 << 18
"""Documents are tokenized in groups of about this many characters (one batched call to the tokenizer)."""


def _groups(texts: Iterator[str]) -> Iterator[list[str]]:
    group, chars = [], 0
    for text in texts:
        group.append(text)
        chars += len(text)
        if chars >= TOKENIZE_GROUP_CHARS:
            yield group
            group, chars = [], 0
    if group:
        yield group


def iter_token_ids(tokenizer, texts: Iterator[str], doc_tokens: int | None = None,
                   seed: int | None = 0) -> Iterator[list[int]]:
    """Token ids of each document (a ``document_window`` of ``doc_tokens`` when given), then EOS if there is one.

    Documents are tokenized a group at a time (``encode_batch`` for fast tokenizers).
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for group in _groups(texts):
        for ids in tokenizer(group, add_special_tokens=False)["input_ids"]:
            ids = document_window(ids, doc_tokens, seed)
            ids.extend(eos)  # a fresh list from the tokenizer or a slice: no copy of the document
            yield ids


class Prefetch:
    """Iterate ``source`` on a background thread, up to ``depth`` items ahead; ``wait_seconds`` is the time the
    consumer spent blocked on it. Closing (or dropping) the iteration stops the thread."""

    def __init__(self, source, depth: int = 4):
        self.source, self.depth, self.wait_seconds = source, depth, 0.0

    def __iter__(self):
        items: queue.Queue = queue.Queue(self.depth)
        stop = threading.Event()
        done = object()

        def put(item) -> bool:
            """Hand ``item`` over unless the consumer has stopped; False once it has."""
            while not stop.is_set():
                try:
                    items.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for item in self.source:
                    if not put(item):
                        return
                put(done)
            except Exception as err:  # noqa: BLE001 (re-raised in the consumer)
                put(err)

        thread = threading.Thread(target=produce, name="minigpt-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                start = time.perf_counter()
                item = items.get()
                self.wait_seconds += time.perf_counter() - start
                if item is done:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()


@dataclass
class Batches:
    """Packed calibration batches: ``input_ids: (B, seq_len)`` int64 with no padding.

    ``doc_tokens``: take at most that many tokens of each document (a seeded window), so that a token budget
    covers many documents instead of the first few long ones. Iterating reads, tokenizes and packs on a
    background thread (``Prefetch``); ``wait_seconds`` is how long the consumer waited for it.
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
    prefetch: int = 4  # batches read ahead on a background thread (0: none)

    def __post_init__(self):
        if self.seq_len < 2 or self.batch_size < 1:
            raise MiniGPTError(f"seq_len must be ≥ 2 and batch_size ≥ 1 (got {self.seq_len}, {self.batch_size})")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise MiniGPTError(f"max_tokens must be positive (got {self.max_tokens})")
        self.wait_seconds = 0.0

    @property
    def max_sequences(self) -> int | None:
        """Whole sequences covering at least ``max_tokens``."""
        return None if self.max_tokens is None else -(-self.max_tokens // self.seq_len)

    def sequences(self) -> Iterator[list[int]]:
        """Consecutive ``seq_len`` slices of the joined documents: linear time (a cursor into one buffer)."""
        buf: list[int] = []
        n = 0
        texts = iter_texts(self.files, self.text_field, self.seed, self.rank, self.world_size)
        for ids in iter_token_ids(self.tokenizer, texts, self.doc_tokens, self.seed):
            buf.extend(ids)
            cursor = 0
            while len(buf) - cursor >= self.seq_len:
                if self.max_sequences is not None and n >= self.max_sequences:
                    return
                if n >= self.skip_sequences:
                    yield buf[cursor : cursor + self.seq_len]
                n += 1
                cursor += self.seq_len
            del buf[:cursor]  # what is left is shorter than one sequence
        if n == 0 and not self.allow_empty:
            raise MiniGPTError(
                f"corpus too small: {len(buf)} tokens, fewer than one sequence of {self.seq_len} "
                "(lower --seq-len or add data)"
            )

    def _tensors(self) -> Iterator[torch.Tensor]:
        rows: list[list[int]] = []
        for seq in self.sequences():
            rows.append(seq)
            if len(rows) == self.batch_size:
                yield torch.tensor(rows, dtype=torch.long)
                rows = []
        if rows:
            yield torch.tensor(rows, dtype=torch.long)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if not self.prefetch:
            yield from self._tensors()
            return
        ahead = Prefetch(self._tensors(), self.prefetch)
        try:
            yield from ahead
        finally:
            self.wait_seconds += ahead.wait_seconds
