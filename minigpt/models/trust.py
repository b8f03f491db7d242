"""Which model directories may run their own Python code (``auto_map`` modules under ``trust_remote_code``).

The rule: a directory's code runs only when it is minigpt's own ``modeling_minigpt.py``, byte-identical (by
SHA-256) to the file this version of minigpt writes for that base class, or when the user says so
(``--trust-remote-code`` / ``trust_remote_code=True``). Anything else is refused, naming the file and the flag.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from minigpt.errors import MiniGPTError

REMOTE_CODE = Path(__file__).with_name("modeling_minigpt.py")
_BASE_LINE = re.compile(r'^BASE_CLASS = "(\w+)"$', re.MULTILINE)


def remote_code_text(base: str) -> str:
    """The ``modeling_minigpt.py`` minigpt saves beside a model whose stock class is ``base``."""
    return _BASE_LINE.sub(f'BASE_CLASS = "{base}"', REMOTE_CODE.read_text(), count=1)


def _sha256(text: bytes) -> str:
    return hashlib.sha256(text).hexdigest()


def is_own_code(file: Path) -> bool:
    """True when ``file`` is byte-identical to the ``modeling_minigpt.py`` this version writes (any base class)."""
    if file.name != REMOTE_CODE.name or not file.is_file():
        return False
    data = file.read_bytes()
    found = _BASE_LINE.search(data.decode("utf-8", errors="replace"))
    return found is not None and _sha256(data) == _sha256(remote_code_text(found.group(1)).encode())


def _auto_map_modules(path: Path) -> set[str]:
    """Module names the ``auto_map`` entries of ``path``'s config and tokenizer config point at."""
    modules = set()
    for name in ("config.json", "tokenizer_config.json"):
        file = path / name
        if not file.is_file():
            continue
        try:
            auto_map = json.loads(file.read_text()).get("auto_map") or {}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue  # transformers reports a broken config itself
        for ref in auto_map.values():
            for item in ref if isinstance(ref, list) else [ref]:
                if isinstance(item, str):
                    modules.add(item.rsplit(".", 1)[0])
    return modules


def needs_remote_code(path: str | Path, trust_remote_code: bool = False) -> bool:
    """Whether loading the directory ``path`` runs its own code; refuses (one line) code that is not trusted.

    ``trust_remote_code``: the user's explicit permission to run whatever ``auto_map`` names.
    """
    path = Path(path)
    modules = _auto_map_modules(path)
    if not modules or trust_remote_code:
        return bool(modules)
    for module in sorted(modules):
        file = path / f"{module.replace('.', '/')}.py" if "--" not in module else None
        if file is None or not is_own_code(file):
            shown = file if file is not None else f"{module} (another repository)"
            raise MiniGPTError(f"{path} would run its own code {shown}, which is not minigpt's "
                               f"{REMOTE_CODE.name}; pass --trust-remote-code (trust_remote_code=True) to run it")
    return True
