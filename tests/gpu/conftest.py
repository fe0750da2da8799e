"""tests/gpu needs a CUDA GPU. Without one its files are not collected at all (hundreds of skipped tests would fill
the first half of the progress line and hide the CPU suite's progress); one line at the end of the run says so."""

import glob
import os

import torch

HERE = os.path.dirname(__file__)
NOT_COLLECTED = [] if torch.cuda.is_available() else sorted(glob.glob(os.path.join(HERE, "test_*.py")))
collect_ignore_glob = ["test_*.py"] if NOT_COLLECTED else []


def pytest_terminal_summary(terminalreporter):
    if NOT_COLLECTED:
        terminalreporter.write_line(f"tests/gpu: {len(NOT_COLLECTED)} files not collected, no CUDA GPU on this machine")
