"""examples/reproduce/reproduce.py --smoke: the whole pipeline (pretrain, grid, SWA-aware LoRA fine-tune,
grid, table, JSON, plots) runs on a CPU and writes a row for every config. Accuracies are not asserted:
a smoke run trains for seconds and checks plumbing, not the science."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "reproduce" / "reproduce.py"


def run_smoke(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--out", str(out), "--train-steps",
                           "4", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    done = run_smoke(out)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, done


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.strip().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] not in ("config", "") and not cells[0].startswith("---"):
            rows[cells[0]] = cells[1:]
    return rows


def test_smoke_writes_table_json_plots_and_checkpoint(smoke):
    out, _ = smoke
    for name in ("results.md", "results.json", "accuracy_vs_time_direct.png",
                 "accuracy_vs_time_think.png", "model/config.json", "model/task.json"):
        assert (out / name).is_file(), name
    assert (out / "accuracy_vs_time_think.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for grid in ("base_direct", "base_think", "finetuned_direct", "finetuned_think"):
        assert (out / "grids" / grid / "results.json").is_file(), grid


def test_table_has_a_row_for_every_config_and_is_printed_last(smoke):
    out, done = smoke
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import reproduce
    finally:
        sys.path.remove(str(SCRIPT.parent))
    from swaa.eval import config_name

    args = reproduce.parse_args(["--smoke", "--out", str(out)])
    table = (out / "results.md").read_text()
    rows = _table_rows(table)
    expected = ["full attention"] + [config_name(c) for c in reproduce.grid_configs(args)]
    assert list(rows) == expected
    paper = {"full attention"} | {config_name(c) for c in reproduce.grid_configs(args, "paper")}
    for name, cells in rows.items():
        assert len(cells) == 6, (name, cells)
        accuracies = cells[:4] if name in paper else cells[:2]
        for cell in accuracies:
            assert 0.0 <= float(cell) <= 100.0, (name, cells)
        if name not in paper:
            assert cells[2:4] == ["-", "-"], (name, cells)
        assert float(cells[4]) > 0 and float(cells[5]) > 0, (name, cells)
    # interleave with both parities, FA decode, two sink sizes, and combinations are all in the grid
    for part in ("full 0::2", "full 1::2", "full 0::4", "full 1::4", "FA decode", "sink 4", "sink 8"):
        assert any(part in name for name in rows), part
    assert done.stdout.rstrip().endswith(table.strip().splitlines()[-1])


def test_json_holds_every_row_with_config_and_timing(smoke):
    out, _ = smoke
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert {(r["model"], r["format"]) for r in rows} == {
        (m, f) for m in ("base", "finetuned") for f in ("direct", "think")}
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["n"] == 6 and row["seconds_per_example"] > 0
        assert (row["swaa_config"] is None) == (row["config"] == "full attention")
    assert result["train"]["steps"] > 0 and result["finetune"]["steps"] > 0
    assert result["finetune"]["config"]["fa_decode"] is True


def test_skip_train_reuses_the_checkpoint(smoke, tmp_path):
    out, _ = smoke
    done = run_smoke(tmp_path, "--skip-train", "--checkpoint", str(out / "model"), "--no-finetune",
                     "--eval-examples", "2")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "--skip-train" in done.stderr and "pretraining" not in done.stderr
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["train"]["loaded_from"] == str(out / "model")
    assert {r["model"] for r in result["rows"]} == {"base"}
