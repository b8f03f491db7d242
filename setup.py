"""Builds the optional C++/CUDA extension ``minigpt._C`` (see pyproject.toml for the package itself).

* ``pip install --no-build-isolation -e .`` compiles ``csrc/`` against the installed torch (C++/OpenMP CPU kernels,
  plus the CUDA kernels when torch has CUDA and ``CUDA_HOME`` is set).
* ``MINIGPT_NO_EXT=1`` skips the extension; the package then runs on the PyTorch reference.
* ``MAX_JOBS`` caps parallel compile jobs (default: min(4, CPUs)).
"""

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _skip(reason: str) -> dict:
    print(f"minigpt: not building the C++ extension minigpt._C: {reason}; the PyTorch reference will be used.",
          file=sys.stderr)
    return {}


def _extension_kwargs() -> dict:
    """``ext_modules``/``cmdclass`` for setup(), or {} (with the reason printed) when the extension is skipped."""
    if os.environ.get("MINIGPT_NO_EXT", "0") not in ("", "0"):
        return _skip("MINIGPT_NO_EXT is set")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return _skip("torch is not importable at build time (an isolated build environment?); "
                     "install torch first and use `pip install --no-build-isolation -e .`")

    os.environ.setdefault("MAX_JOBS", str(min(4, os.cpu_count() or 1)))
    sources = ["csrc/ops.cpp", *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc" / "cpu").glob("*.cpp")))]
    # same rounding on every ISA; vectorisable selects; no memcpy calls for short rows (slow on some CPUs)
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math", "-fno-tree-loop-distribute-patterns"]
    extension, nvcc_args = cpp_extension.CppExtension, {}
    if torch.version.cuda is None:
        print("minigpt: torch has no CUDA; building the CPU kernels only.", file=sys.stderr)
    elif cpp_extension.CUDA_HOME is None:
        print("minigpt: CUDA_HOME is not set (no nvcc found); building the CPU kernels only.", file=sys.stderr)
    else:
        cuda_dir = ROOT / "csrc" / "cuda"
        sources += [str(p.relative_to(ROOT)) for p in sorted(cuda_dir.iterdir()) if p.suffix in (".cu", ".cpp")]
        cxx.append("-DWITH_CUDA")
        nvcc_args = {"nvcc": ["-O3", "-DWITH_CUDA", "--expt-relaxed-constexpr"]}
        extension = cpp_extension.CUDAExtension
    ext = extension(
        "minigpt._C",
        sources,
        extra_compile_args={"cxx": cxx, **nvcc_args},
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}}


setup(**_extension_kwargs())
