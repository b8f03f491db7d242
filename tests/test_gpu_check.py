"""``bash bench/gpu_check.sh`` on a machine without a GPU: it says so and fails (exit 1); ``--dry-run`` collects the
GPU tests, imports every benchmark and prints the plan with every target "not measured" (exit 0)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the command measures for minutes")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          timeout=600, check=False)


def test_without_a_gpu_it_fails_loudly():
    proc = _run()
    assert proc.returncode == 1
    assert "no CUDA GPU present" in proc.stdout and "nothing was measured" in proc.stdout


def test_dry_run_goes_as_far_as_a_cpu_can():
    proc = _run("--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DRY RUN" in proc.stdout and "no CUDA GPU present here" in proc.stdout
    assert proc.stdout.count("not measured") == 5
    assert "tests/test_gpu.py::test_calibration_never_synchronises_per_batch[cuda]" in proc.stdout
