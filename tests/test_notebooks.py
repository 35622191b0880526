"""Execute the example notebooks with nbclient; any cell error fails the test.

Committed notebooks must have their outputs stripped (they are regenerated here).
"""

from __future__ import annotations

from pathlib import Path

import ipykernel  # noqa: F401  (the kernel the notebooks run on; a dev dependency)
import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_outputs_are_stripped(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{path.name}: commit notebooks without outputs")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("HS_NOTEBOOK_OUT", str(tmp_path))  # the kernel inherits it
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    # one BLAS/OpenMP thread in the kernel: on an oversubscribed machine a multi-threaded
    # OpenBLAS eigvalsh of a 1,600 x 1,600 matrix took 15 s instead of 0.4 s
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError naming the cell on any error
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
