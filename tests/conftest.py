"""Shared test setup: fixtures over tests/tiny.py, the warning policy, and the one reason a test may skip.

- Builders of tiny models, inputs and tokenizers live in tests/tiny.py (importable from helpers too); the
  fixtures here hand out the ones tests only receive.
- Warnings: a test module that patches a model, or imports ``swaa.compat``, runs ``swaa/compat.py``, which
  exists to follow transformers' renames; there a DeprecationWarning warned from transformers' or swaa's code is
  an error, so an upstream rename fails the tests before it fails users
  (peft's test settings do the same). Elsewhere warnings show in the summary.
- Skips: only for something this machine lacks (a CUDA GPU, several GPUs, flash-attn, vLLM), the reason naming
  it; ``-rs`` (pyproject's addopts) prints every reason. A backend that does not take a case is asserted to
  refuse it (tests/test_backends.py), never skipped.
- ``slow`` marks tests that need not run on every change (``-m 'not slow'`` leaves them out); the README's
  test command runs them, as CI must.
"""

from __future__ import annotations

import re

import pytest
from tiny import chat_tokenizer

# warned from transformers' code, or from swaa's (a deprecated call compat.py makes): torch's own deprecations
# inside its compiler are not swaa's to follow
_DEPRECATIONS_THAT_FAIL = ("transformers", "swaa")
_RUNS_COMPAT = re.compile(r"patch_model\(|swaa\.patched\(|from swaa import compat|swaa\.compat\b")
SLOW_MODULES = {  # module -> why it need not run on every change; tests marked ``inductor`` are slow too
    "test_bench.py": "runs benchmarks/bench.py --smoke end to end, several times",
    "test_family_sweep.py": "builds a tiny model of every transformers family",
    "test_eval_notebook.py": "runs the quickstart notebook in a fresh Jupyter kernel",
}


def pytest_collection_modifyitems(config, items):
    patches: dict = {}
    for item in items:
        path = item.path
        if path not in patches:
            patches[path] = bool(_RUNS_COMPAT.search(path.read_text(encoding="utf-8")))
        if patches[path]:
            for module in _DEPRECATIONS_THAT_FAIL:
                item.add_marker(pytest.mark.filterwarnings(f"error::DeprecationWarning:{module}"))
        if path.name in SLOW_MODULES or item.get_closest_marker("inductor"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def tokenizer():
    """The library's byte-level chat tokenizer (``swaa.tiny``), one per test module."""
    return chat_tokenizer()
