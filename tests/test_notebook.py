import os

import pytest

from tests.backend_utils import end_to_end_once
from tests.test_mnist import MNIST

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks",
                        "mnist_iterative_pruning.ipynb")  # fmt: skip


@end_to_end_once
def test_notebook_runs_end_to_end_in_quick_mode(monkeypatch):
    if not os.path.isfile(MNIST):
        pytest.skip(f"needs the shared MNIST file at {MNIST}")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("KERAS_PRUNE_QUICK", "1")
    monkeypatch.setenv("KERAS_PRUNE_MNIST", os.path.abspath(MNIST))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}},
    )
    client.execute()
    outputs = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    ]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the accuracy plot and the weight histograms
    text = "".join(o.get("text", "") for o in outputs)
    assert "SparseDense" in text and "sparse model test accuracy" in text
