"""Without CUDA, tests/gpu is not collected (tests/gpu/conftest.py): one line at the end says so, rather than
hundreds of skipped tests filling the progress line before the CPU suite's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_without_cuda_the_gpu_tests_are_not_collected_and_one_line_says_so():
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 5, done.stdout[-2000:]  # pytest's "no tests ran"
    assert "files not collected, no CUDA GPU on this machine" in done.stdout and "skipped" not in done.stdout
