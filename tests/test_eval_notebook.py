"""examples/quickstart.ipynb runs top to bottom on a CPU (nbclient, a fresh kernel) from its own folder, as
Jupyter runs it, and leaves that folder as it was: its results go to a temporary folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbclient  # the [test] extra installs it, with nbformat and ipykernel
import nbformat

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def test_quickstart_notebook_runs_and_writes_nothing_into_the_source_tree(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    before = sorted(path.relative_to(EXAMPLES) for path in EXAMPLES.rglob("*") if "__pycache__" not in path.parts)
    nbclient.NotebookClient(notebook, timeout=60, kernel_name="python3",
                            resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    after = sorted(path.relative_to(EXAMPLES) for path in EXAMPLES.rglob("*") if "__pycache__" not in path.parts)
    assert after == before, f"the notebook wrote {sorted(set(after) - set(before))} into examples/"
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.get("output_type") == "error"]
    assert not [output for output in outputs if output.get("name") == "stderr" and "Warning" in output["text"]]
    text = "".join(output.get("text", "") for output in outputs)
    assert "| full attention |" in text and "| SWA 64 + FA decode + sink 4 + full 1::2 |" in text
    folder = Path(next(line for line in text.splitlines() if line.startswith("files in ")).split()[2].rstrip(":"))
    assert (folder / "accuracy_vs_time.png").exists() and not folder.is_relative_to(ROOT)
    shutil.rmtree(folder)
    assert any("image/png" in output.get("data", {}) for output in outputs)
