"""``CalibrationStats``: per-neuron sums over a corpus, mergeable by addition, saved as safetensors + JSON."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

from minigpt.errors import MiniGPTError
from minigpt.models import adapters

FORMAT_VERSION = 2  # 2: ``sums`` of heads, hidden channels and layers (``minigpt.pipeline.taps``), optional Gram statistics
READABLE_VERSIONS = (1, 2)  # version 1 files (neither) still load
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures", "auto_map"}


def content_hash(obj) -> str:
    """16 hex digits of the SHA-256 of ``obj`` as canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(model, tokenizer=None) -> dict:
    """What identifies a model (and tokenizer) for statistics: architecture, shapes and content hashes."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    fp = {
        "model_type": model.config.model_type,
        "num_layers": len(adapters.mlps(model)),
        "mlp_widths": adapters.widths(model),
        "vocab_size": model.get_input_embeddings().weight.shape[0],
        "config_hash": content_hash(config),
    }
    if tokenizer is not None:
        fp["tokenizer_hash"] = content_hash(sorted(tokenizer.get_vocab().items()))
    return fp


def check_fingerprint(expected: dict, actual: dict, what: str = "statistics") -> None:
    """Refuse, in one line, to apply ``what`` collected on another model or tokenizer."""
    for key, value in expected.items():
        if key in actual and actual[key] != value:
            shown = value if not isinstance(value, list) else f"{len(value)} layers {value[:3]}..."
            raise MiniGPTError(
                f"{what} were collected on another model: {key} is {shown}, this model has "
                f"{actual[key] if not isinstance(actual[key], list) else str(actual[key][:3]) + '...'}"
            )


@dataclass
class CalibrationStats:
    """Sums over every calibration token, per MLP layer ``l`` with width ``N_l``.

    sum_abs, sum_sq: (N_l,) float64 – Σ|a| and Σa².   max_abs: (N_l,) float32 – max |a|.
    nonzero: (N_l,) int64 – active tokens (reference.active_ref).  token_counts: (V,) int64 – input-id histogram (padding ignored).
    tokens: tokens seen.   fingerprint: see ``fingerprint``.   meta: corpus description, backend, ...
    gram: (N_l, N_l) float64 – Σ h hᵀ of the activations entering the output projection (down_proj), over the
    first ``gram_tokens`` tokens; gram_sum: (N_l,) float64 – Σ h over the same tokens. None when not collected.
    """

    sum_abs: list[torch.Tensor]
    sum_sq: list[torch.Tensor]
    max_abs: list[torch.Tensor]
    nonzero: list[torch.Tensor]
    token_counts: torch.Tensor
    tokens: int
    fingerprint: dict
    meta: dict = field(default_factory=dict)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # float64 sums of other structures (minigpt.pipeline.taps),
    # with the attention output projections' Gram statistics over the same ``gram_tokens`` when ``gram`` is set
    gram: list[torch.Tensor] | None = None
    gram_sum: list[torch.Tensor] | None = None
    gram_tokens: int = 0

    @classmethod
    def empty(cls, fp: dict, device: str | torch.device = "cpu", gram: bool = False) -> CalibrationStats:
        """Zero statistics for a model with fingerprint ``fp`` (with zero Gram matrices when ``gram``)."""
        ws = fp["mlp_widths"]
        grams = ([torch.zeros(n, n, dtype=torch.float64, device=device) for n in ws],
                 [torch.zeros(n, dtype=torch.float64, device=device) for n in ws]) if gram else (None, None)
        return cls(
            sum_abs=[torch.zeros(n, dtype=torch.float64, device=device) for n in ws],
            sum_sq=[torch.zeros(n, dtype=torch.float64, device=device) for n in ws],
            max_abs=[torch.zeros(n, dtype=torch.float32, device=device) for n in ws],
            nonzero=[torch.zeros(n, dtype=torch.int64, device=device) for n in ws],
            token_counts=torch.zeros(fp["vocab_size"], dtype=torch.int64, device=device),
            tokens=0,
            fingerprint=dict(fp),
            gram=grams[0],
            gram_sum=grams[1],
        )

    @property
    def num_layers(self) -> int:
        return len(self.sum_abs)

    @property
    def gram_bytes(self) -> int:
        """Bytes the fp64 Gram totals take (0 when not collected)."""
        return sum(g.numel() * g.element_size() for g in self.gram) if self.gram is not None else 0

    def to(self, device) -> CalibrationStats:
        move = lambda ts: None if ts is None else [t.to(device) for t in ts]
        return CalibrationStats(
            move(self.sum_abs), move(self.sum_sq), move(self.max_abs), move(self.nonzero),
            self.token_counts.to(device), self.tokens, dict(self.fingerprint), dict(self.meta),
            {k: v.to(device) for k, v in self.sums.items()},
            move(self.gram), move(self.gram_sum), self.gram_tokens,
        )

    def merge(self, other: CalibrationStats) -> CalibrationStats:
        """Statistics of both corpora: sums add, maxima take the max. Refuses other models' stats."""
        check_fingerprint(self.fingerprint, other.fingerprint)
        o = other.to(self.token_counts.device)
        corpora = self.meta.get("corpora", [self.meta.get("corpus")]) + o.meta.get("corpora", [o.meta.get("corpus")])
        both = self.gram is not None and o.gram is not None  # Gram sums only where both runs collected them
        add = lambda xs, ys: [a + b for a, b in zip(xs, ys)] if both else None
        return CalibrationStats(
            [a + b for a, b in zip(self.sum_abs, o.sum_abs)],
            [a + b for a, b in zip(self.sum_sq, o.sum_sq)],
            [torch.maximum(a, b) for a, b in zip(self.max_abs, o.max_abs)],
            [a + b for a, b in zip(self.nonzero, o.nonzero)],
            self.token_counts + o.token_counts,
            self.tokens + o.tokens,
            dict(self.fingerprint),
            {**self.meta, "corpora": [c for c in corpora if c is not None]},
            {k: v + o.sums[k] for k, v in self.sums.items() if k in o.sums},
            add(self.gram, o.gram), add(self.gram_sum, o.gram_sum), self.gram_tokens + o.gram_tokens if both else 0,
        )

    def mean(self, name: str) -> list[torch.Tensor]:
        """Per-token mean of a summed statistic (``sum_abs`` → mean |a|, ``nonzero`` → firing rate), float64."""
        if self.tokens == 0:
            raise MiniGPTError("statistics hold no tokens")
        return [t.double() / self.tokens for t in getattr(self, name)]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"token_counts": self.token_counts.cpu().contiguous()}
        for i in range(self.num_layers):
            for name in ("sum_abs", "sum_sq", "max_abs", "nonzero"):
                out[f"layers.{i}.{name}"] = getattr(self, name)[i].cpu().contiguous()
            if self.gram is not None:
                out[f"layers.{i}.gram"] = self.gram[i].cpu().contiguous()
                out[f"layers.{i}.gram_sum"] = self.gram_sum[i].cpu().contiguous()
        out.update({f"sums.{k}": v.cpu().contiguous() for k, v in self.sums.items()})
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically as safetensors; metadata holds fingerprint, tokens and ``meta`` as JSON."""
        from safetensors.torch import save_file

        from minigpt.io import atomic_file

        header = {"format_version": FORMAT_VERSION, "tokens": self.tokens, "fingerprint": self.fingerprint,
                  "meta": self.meta, "gram_tokens": self.gram_tokens}
        with atomic_file(path) as tmp:
            save_file(self.tensors(), str(tmp), metadata={"minigpt": json.dumps(header)})

    def inconsistency(self) -> str | None:
        """Why these cannot be sums over a calibration of the fingerprinted model (None when they can)."""
        widths, vocab = self.fingerprint.get("mlp_widths"), self.fingerprint.get("vocab_size")
        expected = {"sum_abs": torch.float64, "sum_sq": torch.float64, "max_abs": torch.float32, "nonzero": torch.int64}
        for name, dtype in expected.items():
            ts = getattr(self, name)
            if [tuple(t.shape) for t in ts] != [(n,) for n in widths] or any(t.dtype != dtype for t in ts):
                return f"{name} does not match the MLP widths {widths[:3]}... ({dtype})"
        if tuple(self.token_counts.shape) != (vocab,) or self.token_counts.dtype != torch.int64:
            return f"token_counts does not match the vocabulary size {vocab}"
        if not isinstance(self.tokens, int) or self.tokens < 0:
            return f"tokens seen is {self.tokens!r}"
        if bool((self.token_counts < 0).any()) or int(self.token_counts.sum()) > self.tokens:
            return f"the token histogram is negative or counts more than the {self.tokens} tokens seen"
        for name in ("sum_abs", "sum_sq", "max_abs"):
            for layer, t in enumerate(getattr(self, name)):
                if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                    return f"{name} of layer {layer} holds negative or non-finite values"
        for name, t in self.sums.items():
            signed = t.diagonal() if name.endswith(".gram") else t[:0] if name.endswith(".gram_sum") else t
            if t.dtype != torch.float64 or not bool(torch.isfinite(t).all()) or bool((signed < 0).any()):
                return f"sums.{name} is not a float64 sum of non-negative finite values (Gram: its diagonal)"
        for layer, t in enumerate(self.nonzero):
            if bool((t < 0).any()) or bool((t > self.tokens).any()):
                return f"nonzero counts of layer {layer} are outside [0, {self.tokens}]"
        return None if self.gram is None else self._gram_inconsistency(widths)

    def _gram_inconsistency(self, widths: list[int]) -> str | None:
        if [tuple(g.shape) for g in self.gram] != [(n, n) for n in widths] or any(
                g.dtype != torch.float64 for g in (*self.gram, *self.gram_sum)):
            return f"the Gram matrices do not match the MLP widths {widths[:3]}... (float64)"
        if [tuple(s.shape) for s in self.gram_sum] != [(n,) for n in widths]:
            return "the Gram sums do not match the MLP widths"
        if not 0 <= self.gram_tokens <= self.tokens:
            return f"Gram tokens {self.gram_tokens} outside [0, {self.tokens}]"
        for layer, g in enumerate(self.gram):
            if not bool(torch.isfinite(g).all()) or bool((g.diagonal() < 0).any()):
                return f"the Gram matrix of layer {layer} holds non-finite values or a negative diagonal"
        return None

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationStats:
        """Read a stats file; a missing, truncated, corrupted or inconsistent file gets a one-line error."""
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise MiniGPTError(f"stats file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {})["minigpt"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
            n = header["fingerprint"]["num_layers"]
            per_layer = {
                name: [tensors[f"layers.{i}.{name}"] for i in range(n)]
                for name in ("sum_abs", "sum_sq", "max_abs", "nonzero")
            }
            grams = {name: [tensors[f"layers.{i}.{name}"] for i in range(n)]
                     for name in ("gram", "gram_sum")} if "layers.0.gram" in tensors else {}
            stats = cls(**per_layer, token_counts=tensors["token_counts"], tokens=header["tokens"],
                        fingerprint=header["fingerprint"], meta=header["meta"],
                        sums={k.removeprefix("sums."): t for k, t in tensors.items() if k.startswith("sums.")},
                        **grams, gram_tokens=header.get("gram_tokens", 0))
            problem = stats.inconsistency()
        except (KeyError, TypeError, json.JSONDecodeError, OSError, RuntimeError, ValueError) as err:
            raise MiniGPTError(f"stats file {path} is corrupted or not a minigpt stats file ({type(err).__name__})")
        except Exception as err:  # safetensors raises its own SafetensorError for truncated headers
            if type(err).__name__ == "SafetensorError":
                raise MiniGPTError(f"stats file {path} is corrupted or truncated: {str(err).splitlines()[0]}")
            raise
        if header.get("format_version") not in READABLE_VERSIONS:
            raise MiniGPTError(f"stats file {path} has format version {header.get('format_version')}, "
                               f"expected one of {READABLE_VERSIONS}")
        if problem is not None:
            raise MiniGPTError(f"stats file {path} is corrupted: {problem}")
        return stats
