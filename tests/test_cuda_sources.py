"""Every ``csrc/**/*.cu`` compiles with nvcc (device code for sm_90), so the CUDA kernels cannot rot on CPU-only
machines. The .cu files need no torch headers (see csrc/cuda/launchers.h); skipped when nvcc is absent."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
NVCC = shutil.which("nvcc") or shutil.which(str(Path(CUDA_HOME) / "bin" / "nvcc"))
SOURCES = sorted(CSRC.rglob("*.cu"))


def test_sources_exist():
    assert SOURCES, f"no .cu files under {CSRC}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(CSRC)))
def test_nvcc_compiles(source, tmp_path):
    cmd = [NVCC, "-c", "-std=c++17", "-arch=sm_90", "-Xcompiler", "-Wall", "-Werror", "all-warnings",
           str(source), "-o", str(tmp_path / "kernel.o")]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
