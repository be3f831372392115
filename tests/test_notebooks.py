"""Both notebooks execute top to bottom (nbclient) on the demo run and on a run trained on real
footage (tiny_run.tiny_real_run), and show that run's own data: its captions, its real clips, and
only the metrics that apply to it.

One kernel serves every notebook of this module (importing torch and Lightning in a fresh kernel
is most of a notebook's time here): each execution starts with a cell that sets the environment
variables the notebook reads, as a user's shell would.
"""

from __future__ import annotations

import os

import pytest
from tiny_run import REAL_WINDOWS, ROOT, tiny_real_run, tiny_run

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupyter_client = pytest.importorskip("jupyter_client")
ENV_VARS = ("DIT_VIDEO_RUN", "DIT_VIDEO_SHARDS", "DIT_VIDEO_STEPS", "DIT_VIDEO_NUM_PROMPTS")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {"demo": tiny_run(tmp_path_factory), "real": tiny_real_run(tmp_path_factory)}


@pytest.fixture(scope="module")
def kernel():
    km = jupyter_client.KernelManager(kernel_name="python3")
    # the kernel is a fresh process: one thread is fastest here; no network for Hugging Face
    km.start_kernel(cwd=str(ROOT), env=os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    try:
        yield km
    finally:
        km.shutdown_kernel(now=True)


def execute(kernel, name: str, **env) -> list:
    """Run notebooks/<name> in the shared kernel with `env` set (and the other DIT_VIDEO_* unset);
    returns the outputs of its own cells."""
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    values = {k: str(v) for k, v in env.items()}
    setup = nbformat.v4.new_code_cell(f"import os\nfor _k in {ENV_VARS!r}:\n    os.environ.pop(_k, None)\n"
                                      f"os.environ.update({values!r})")
    notebook.cells.insert(0, setup)
    nbclient.NotebookClient(notebook, km=kernel, timeout=300, kernel_name="python3").execute()
    return [o for cell in notebook.cells[1:] if cell.cell_type == "code" for o in cell.outputs]


def _html(outputs) -> str:
    return "".join(o.get("data", {}).get("text/html", "") for o in outputs)


def _text(outputs) -> str:
    return "".join(o.get("text", "") for o in outputs)


def _markdown(outputs) -> str:
    return "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)


def test_evaluate_checkpoint_notebook_on_the_demo_run(runs, kernel):
    outputs = execute(kernel, "evaluate_checkpoint.ipynb", DIT_VIDEO_RUN=runs["demo"]["run"], DIT_VIDEO_STEPS=2,
                      DIT_VIDEO_NUM_PROMPTS=3)
    text = _text(outputs)
    assert "3 captions of the run's validation clips" in text and text.count(" moving ") >= 3  # demo captions
    # each prompt: its real clip, then the EMA and raw samples, in one animation per row
    assert _html(outputs).count("data:image/gif;base64") == 3
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the loss figures
    markdown = _markdown(outputs)
    assert "| probe score (colour+direction) |" in markdown and "| metric | ema | raw |" in markdown
    assert "| held-out loss |" in markdown and "| motion vs real clip (same label) |" in markdown


def test_evaluate_checkpoint_notebook_on_a_non_demo_run(runs, kernel):
    outputs = execute(kernel, "evaluate_checkpoint.ipynb", DIT_VIDEO_RUN=runs["real"]["run"], DIT_VIDEO_STEPS=2,
                      DIT_VIDEO_NUM_PROMPTS=2)
    text = _text(outputs)
    for _, caption, _ in REAL_WINDOWS["val"]:  # the run's own validation captions are the prompts
        assert caption in text
    assert "moving" not in text
    assert _html(outputs).count("data:image/gif;base64") == 2
    markdown = _markdown(outputs)
    assert "probe score" not in markdown and "- probe: prompts are not demo captions" in markdown
    assert "| motion vs real clip (same label) |" in markdown and "| held-out loss |" in markdown


def test_explore_data_notebook_on_demo_shards(runs, kernel):
    outputs = execute(kernel, "explore_data.ipynb", DIT_VIDEO_SHARDS=f"{runs['demo']['shards']}/train-*.tar")
    text = _text(outputs)
    assert "32 samples" in text and "moving" in text
    assert "data:image/gif;base64" in _html(outputs)


def test_explore_data_notebook_on_a_non_demo_run(runs, kernel):
    outputs = execute(kernel, "explore_data.ipynb", DIT_VIDEO_RUN=runs["real"]["run"])
    text = _text(outputs)
    assert f"{len(REAL_WINDOWS['train'])} samples" in text and "moving" not in text
    for split in ("train", "val"):  # the run's training clips, then its validation split
        for _, caption, _ in REAL_WINDOWS[split]:
            assert caption in text
    assert f"{len(REAL_WINDOWS['val'])} validation samples" in text
    assert _html(outputs).count("data:image/gif;base64") >= 2  # the ingested clips have two sizes: one each
