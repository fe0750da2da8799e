"""Every command line tool answers ``--help`` without importing torch or another heavy library: they are
imported after the arguments are read, so that ``--help`` (and every mistyped option) answers in a second,
not in the 7-14 s torch and transformers' training code take to import on a small CPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIS = {  # name: (how runpy runs it, target)
    "python -m swaa.eval": ("module", "swaa.eval"),
    "python -m swaa.tiny": ("module", "swaa.tiny"),
    "examples/finetune_lora.py": ("path", "examples/finetune_lora.py"),
    "examples/reproduce/reproduce.py": ("path", "examples/reproduce/reproduce.py"),
    "benchmarks/bench.py": ("path", "benchmarks/bench.py"),
    "benchmarks/cache_memory.py": ("path", "benchmarks/cache_memory.py"),
    "benchmarks/flex_tuning.py": ("path", "benchmarks/flex_tuning.py"),
    "benchmarks/fsdp_speed.py": ("path", "benchmarks/fsdp_speed.py"),
    "benchmarks/train_speed.py": ("path", "benchmarks/train_speed.py"),
}
HEAVY = ("torch", "datasets", "peft", "accelerate", "matplotlib", "pandas", "pyarrow", "transformers.modeling_utils",
         "transformers.training_args")

# One interpreter runs every --help in turn and reports what each newly imported (modules stay imported, so
# a heavy import is charged to the first tool that makes it).
PROBE = """
import contextlib, io, json, runpy, sys
report = {}
for name, (kind, target) in json.loads(sys.argv[1]).items():
    for module in [m for m in sys.modules if m == "swaa" or m.startswith("swaa.")]:
        del sys.modules[module]  # each tool imports swaa afresh, beside what earlier tools loaded
    before = set(sys.modules)
    sys.argv = [target, "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_module(target, run_name="__main__") if kind == "module" else runpy.run_path(target, run_name="__main__")
            code = None
        except SystemExit as exit:
            code = exit.code
    new = set(sys.modules) - before
    report[name] = {"code": code, "usage": "usage:" in out.getvalue(),
                    "heavy": sorted(h for h in HEAVY if any(m == h or m.startswith(h + ".") for m in new))}
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def report() -> dict:
    done = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{PROBE}", json.dumps(CLIS)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CLIS))
def test_help_imports_nothing_heavy(report, name):
    assert report[name]["code"] in (0, None) and report[name]["usage"], report[name]
    heavy = report[name]["heavy"]
    assert not heavy, f"{name} --help imported {heavy}: import them after the arguments are read"
