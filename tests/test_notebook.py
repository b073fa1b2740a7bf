"""chapter.ipynb: it runs top to bottom, writes what a reader relies on, and is committed bare."""
import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

from conftest import ROOT, read_tensorboard

NOTEBOOK = ROOT / "chapter.ipynb"
STEPS = 3


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    import keras
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel inherits these: the project from the repository, a handful of steps, no TensorBoard server.
    monkeypatch.setenv("CYCLEGAN_REPO", str(ROOT))
    monkeypatch.setenv("CYCLEGAN_NOTEBOOK_STEPS", str(STEPS))
    monkeypatch.setenv("CYCLEGAN_NOTEBOOK_TEST", "1")
    # Raises CellExecutionError, naming the cell, if any cell fails.
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["datasets", "logs", "results"]
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["notebook"]
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["notebook"]
    run = tmp_path / "results" / "notebook"
    for grid in ("epoch_0000.png", "epoch_0001.png"):
        assert Image.open(run / "samples" / grid).size[0] > 100
    generator = keras.models.load_model(run / "models" / "generatorAToB.h5")
    assert generator(np.zeros((1, 32, 32, 3), "float32")).shape == (1, 32, 32, 3)
    translated = np.asarray(Image.open(run / "translated.png"))
    assert translated.shape == (64, 64, 3) and translated.std() > 0

    events = read_tensorboard(tmp_path / "logs" / "notebook")
    assert len(events.Tensors("loss/D_A")) == 5 + STEPS  # the chapter's five steps, then the run's
    magic = [c for c in notebook.cells if "%tensorboard" in c.source]
    assert len(magic) == 1 and magic[0].outputs == []  # skipped under the test: no server left
    images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 4  # two sample grids, the loss plot, the translation


def test_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert notebook.metadata.kernelspec.name == "python3"
