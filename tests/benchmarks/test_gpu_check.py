"""The GPU check runs on any machine: without CUDA it says so and exits non-zero."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the check runs for real (see BENCHMARKS.md)")
def test_gpu_check_exits_clearly_without_cuda():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2
    assert "no CUDA device here" in done.stderr and "Traceback" not in done.stderr


def test_gpu_check_sections_are_pluggable():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert [c.__name__ for c in gpu_check.CHECKS] == ["h2d_copy", "loader_to_gpu", "train_step", "train_throughput",
                                                     "generation", "lm_train_throughput"]

    @gpu_check.check
    def extra(ctx):
        return [gpu_check.Row("extra", "metric", 1.0)]

    try:
        assert gpu_check.CHECKS[-1] is extra
    finally:
        gpu_check.CHECKS.remove(extra)
