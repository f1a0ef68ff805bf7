"""The notebooks run top to bottom (nbclient) on CPU with their small settings, so they
cannot rot; their outputs are stripped in git."""
import glob
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
# What each notebook must print (its own asserts check the figures: logit parity, greedy = transformers').
EXPECTED = {"quickstart.ipynb": ("final loss", "['losses.png']", "Q: What color is the", "A: "),
            "hf_import.ipynb": ("max |logit diff|", "ours        ", "transformers ")}


def test_there_are_notebooks_and_their_outputs_are_stripped():
    assert sorted(map(os.path.basename, NOTEBOOKS)) == sorted(EXPECTED)
    for path in NOTEBOOKS:
        cells = nbformat.read(path, as_version=4).cells
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in cells if c.cell_type == "code"), \
            f"{path}: outputs not stripped"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path):
    """Executes every cell in a fresh kernel (about 40 s of CPU each on 2 cores, unloaded)."""
    notebook = nbformat.read(path, as_version=4)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(path)}})
    client.execute(env=env)  # a fresh kernel, 1 CPU device (not the tests' 8 fake ones)
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    for expected in EXPECTED[os.path.basename(path)]:
        assert expected in text, (expected, text[-2000:])
    if os.path.basename(path) == "quickstart.ipynb":  # the loss plot and the held-out image are shown
        assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
