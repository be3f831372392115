"""Both notebooks execute top to bottom on a tiny checkpoint and shard set (nbclient)."""

from __future__ import annotations

import pytest
from tiny_run import ROOT, tiny_run

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory)


def execute(name: str, monkeypatch, **env) -> list:
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel is a fresh process: one thread is fastest here
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]


def _html(outputs) -> str:
    return "".join(o.get("data", {}).get("text/html", "") for o in outputs)


def test_evaluate_checkpoint_notebook_runs(run, monkeypatch):
    outputs = execute("evaluate_checkpoint.ipynb", monkeypatch, DIT_VIDEO_RUN=run["run"], DIT_VIDEO_STEPS=2)
    assert _html(outputs).count("data:image/gif;base64") == 2  # EMA and raw samples shown inline
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the loss figures
    assert any("| probe score |" in o.get("data", {}).get("text/markdown", "") for o in outputs)


def test_explore_data_notebook_runs(run, monkeypatch):
    outputs = execute("explore_data.ipynb", monkeypatch, DIT_VIDEO_SHARDS=f"{run['shards']}/train-*.tar")
    text = "".join(o.get("text", "") for o in outputs)
    assert "32 samples" in text and "moving" in text
    assert "data:image/gif;base64" in _html(outputs)
