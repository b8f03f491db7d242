"""Run from a source checkout, ``minigpt.kernels`` is that checkout's ``kernels/`` folder.

The package ships the top-level ``kernels/`` folder as ``minigpt.kernels`` (pyproject's ``package-dir``). An editable
install maps that name to the installed checkout with a meta-path finder, so a second checkout whose ``minigpt`` is
first on ``sys.path`` would still import the first checkout's kernels. When this ``minigpt`` sits in a checkout
(its parent holds minigpt's ``pyproject.toml`` and ``kernels/``), a finder placed first maps ``minigpt.kernels`` to
that checkout's folder; an installed wheel (``minigpt/kernels`` inside the package) is left alone.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent
KERNELS = ROOT / "kernels"


class _CheckoutKernels(importlib.abc.MetaPathFinder):
    """Finds ``minigpt.kernels`` in ``KERNELS`` (its submodules then resolve through its ``__path__``)."""

    def find_spec(self, name, path=None, target=None):
        if name != "minigpt.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, KERNELS / "__init__.py", submodule_search_locations=[str(KERNELS)]
        )


def in_checkout() -> bool:
    """Whether this ``minigpt`` is the package folder of a source checkout with its own ``kernels/``."""
    pyproject = ROOT / "pyproject.toml"
    return (
        not (PACKAGE / "kernels").exists()
        and (KERNELS / "__init__.py").is_file()
        and pyproject.is_file()
        and 'name = "minigpt"' in pyproject.read_text()
    )


def use_checkout_kernels() -> None:
    """Put the checkout's finder first on ``sys.meta_path`` (once), when running from a checkout."""
    if in_checkout() and not any(isinstance(f, _CheckoutKernels) for f in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutKernels())
