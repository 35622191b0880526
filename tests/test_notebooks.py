"""Execute the example notebooks with nbclient; any cell error fails the test.

Committed notebooks must have their outputs stripped (they are regenerated here).  The
last two tests run tiny notebooks that raise, so a runner that lets an error through
fails here rather than passing every notebook silently.
"""

from __future__ import annotations

from pathlib import Path

import ipykernel  # noqa: F401  (the kernel the notebooks run on; a dev dependency)
import nbclient
import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))


class NotebookErrorOutput(AssertionError):
    """A cell recorded an error output although execution went on (e.g. a cell tagged
    ``raises-exception``, which nbclient lets through)."""


def execute_notebook(nb: nbformat.NotebookNode, cwd: Path, timeout: int = 300) -> None:
    """Run every cell of ``nb`` in a fresh ``python3`` kernel started in ``cwd``.

    Raises:
        CellExecutionError: a cell raised (nbclient stops there; the message names it).
        NotebookErrorOutput: a cell holds an error output after the run.
    """
    client = nbclient.NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute()
    errors = [
        f"cell {i}: {o.get('ename')}: {o.get('evalue')}"
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "error"
    ]
    if errors:
        raise NotebookErrorOutput("; ".join(errors))


def _one_thread_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    # one BLAS/OpenMP thread in the kernel (it inherits the environment): on an
    # oversubscribed machine a multi-threaded OpenBLAS eigvalsh of a 1,600 x 1,600 matrix
    # took 15 s instead of 0.4 s
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_outputs_are_stripped(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{path.name}: commit notebooks without outputs"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("HS_NOTEBOOK_OUT", str(tmp_path))  # the kernel inherits it
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # `figures` is not installed, only checked out
    _one_thread_kernel(monkeypatch)
    execute_notebook(nbformat.read(path, as_version=4), ROOT)


def _notebook(*cells: nbformat.NotebookNode) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = list(cells)
    return nb


def test_a_cell_that_raises_fails_the_run(tmp_path, monkeypatch):
    _one_thread_kernel(monkeypatch)
    nb = _notebook(
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell("raise ValueError('broken example')"),
        nbformat.v4.new_code_cell("print('never reached')"),
    )
    with pytest.raises(CellExecutionError, match="broken example"):
        execute_notebook(nb, tmp_path, timeout=60)
    assert not nb.cells[2].outputs  # the run stopped at the error


def test_an_error_let_through_by_a_tag_still_fails(tmp_path, monkeypatch):
    _one_thread_kernel(monkeypatch)
    tagged = nbformat.v4.new_code_cell("1 / 0", metadata={"tags": ["raises-exception"]})
    nb = _notebook(tagged, nbformat.v4.new_code_cell("print('ran on')"))
    with pytest.raises(NotebookErrorOutput, match="cell 0: ZeroDivisionError"):
        execute_notebook(nb, tmp_path, timeout=60)
    assert nb.cells[1].outputs[0]["text"] == "ran on\n"  # nbclient did carry on
