"""``python -m swaa.eval`` in a subprocess, on the tiny model folder ``python -m swaa.tiny`` writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from swaa import tiny
from swaa.eval.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The folder of ``python -m swaa.tiny DIR`` (its entry point, in-process)."""
    path = tmp_path_factory.mktemp("tiny_model")
    assert tiny.main([str(path)]) == 0
    return path


def run_cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "swaa.eval", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_synthetic_grid_writes_results_and_prints_the_table_last(model_dir, tmp_path):
    configs = tmp_path / "configs.yaml"
    configs.write_text("- window: 24\n  sink: 4\n- window: 24\n  fa_decode: false\n")
    out = tmp_path / "out"
    done = run_cli("--model", model_dir, "--synthetic", "needle,multikey", "--length", "400", "--num", "1",
                   "--configs", configs, "--output", out, "--max-new-tokens", "3", "--quiet", "--dtype", "float32",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    table = done.stdout.strip().splitlines()
    assert table[0].startswith("| config |") and len(table) == 2 + 3
    assert table[2].startswith("| full attention |") and table[-1].startswith("| SWA 24 |")
    for name in ("results.csv", "results.json", "results.md", "predictions.jsonl", "accuracy_vs_time.png"):
        assert (out / name).exists(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["examples"] == 2 and saved["settings"]["dtype"] == "float32"


def test_cli_dataset_file_and_inline_json(model_dir, tmp_path, capsys, caplog):
    """The same entry point in-process (a subprocess per case would mostly time imports)."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "Say yes.", "answer": "yes", "question_type": "q"}\n')
    code = main(["--model", str(model_dir), "--data", str(data), "--configs", '{"window": 4}', "--output",
                 str(tmp_path / "o"), "--scorer", "exact", "--max-new-tokens", "2", "--quiet", "--no-plot"])
    assert code == 0
    assert "| SWA 4 + FA decode |" in capsys.readouterr().out
    assert "covers every token" not in caplog.text  # a window shorter than the prompt changes attention
    assert not (tmp_path / "o" / "accuracy_vs_time.png").exists()


def test_without_configs_the_recommended_config_runs_beside_full_attention_and_says_so(model_dir, tmp_path, capsys,
                                                                                        caplog):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "Say yes.", "answer": "yes"}\n')
    code = main(["--model", str(model_dir), "--data", str(data), "--output", str(tmp_path / "o"), "--max-new-tokens",
                 "2", "--quiet", "--no-plot"])
    assert code == 0
    out, err = capsys.readouterr()
    assert 'no --configs: comparing full attention with the recommended config {"window": 2048, "sink": 100,' in err
    rows = [line.split("|")[1].strip() for line in out.strip().splitlines()[2:]]
    assert rows == ["full attention", "SWA 2048 + FA decode + sink 100 + full 1::2"]
    # a window longer than every prompt attends as full attention does: the run says so
    assert "window 2048 covers every token of these prompts" in caplog.text
    assert "on a CPU the time column compares" in caplog.text  # SWAA rows may be slower there: it says why


def test_cli_bad_input_is_a_clear_error(model_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "Say yes."}\n')
    assert main(["--model", str(model_dir), "--data", str(data), "--output", str(tmp_path / "o"), "--quiet"]) == 2
    assert "example 0: missing field 'answer'" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "nowhere"), "--synthetic", "needle", "--output", str(tmp_path)]) == 2
    assert "not a local folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), "--synthetic", "needle", "--output", str(tmp_path), "--scorer", "bleu"])
    assert "invalid choice: 'bleu'" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--configs", '{"windw": 8}'], "unknown SWAA config field"),
    (["--synthetic", "needle,haystack"], "unknown task"),
    (["--device", "cuda"], "no CUDA GPU"),
], ids=["configs", "task", "device"])
def test_bad_arguments_are_reported_before_the_model_loads(argv, message, capsys, monkeypatch):
    import swaa.eval.runner

    if "--device" in argv and torch.cuda.is_available():
        pytest.skip("checks a machine without CUDA")
    monkeypatch.setattr(swaa.eval.runner, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    with pytest.raises(SystemExit, match=message):
        main(["--model", "/nonexistent", "--output", "/tmp/unused", "--synthetic", "needle", *argv])
