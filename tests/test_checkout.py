"""The tests exercise this checkout's code: ``minigpt`` and its Triton kernels (``minigpt.kernels``, the top-level
``kernels/`` folder) both resolve inside the repository these tests belong to, even when an editable install of
another checkout maps ``minigpt.kernels`` elsewhere."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import minigpt
from minigpt import _checkout

ROOT = Path(__file__).resolve().parents[1]


def test_minigpt_and_its_kernels_come_from_this_checkout():
    assert Path(minigpt.__file__).resolve().parent == ROOT / "minigpt"
    assert _checkout.in_checkout()
    spec = importlib.util.find_spec("minigpt.kernels")
    assert Path(spec.origin).resolve() == ROOT / "kernels" / "__init__.py"
    assert [Path(p).resolve() for p in spec.submodule_search_locations] == [ROOT / "kernels"]


def test_a_fresh_interpreter_in_the_checkout_imports_its_kernels():
    """What ``python -m ...`` from the repository root sees, with any installed finder still on sys.meta_path."""
    code = "import sys, minigpt.kernels.act_stats; print(*(sys.modules[f'minigpt.kernels{m}'].__file__ for m in ('', '.act_stats')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"}, timeout=300).stdout.split()
    assert [Path(p).resolve() for p in out] == [ROOT / "kernels" / "__init__.py", ROOT / "kernels" / "act_stats.py"]
