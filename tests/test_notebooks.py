"""Execute every notebook in notebooks/ (stored without outputs) on the CPU.

Each notebook runs top to bottom in a fresh "python3" kernel (nbclient), with its
working directory notebooks/ (as when opened there in Jupyter; the notebooks find the
repository root themselves) and matplotlib's non-interactive Agg backend. A notebook
fails the test when a cell raises, which includes the asserts the notebooks make about
the agreements they show. They are also checked to be stored without outputs.
"""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

from scripts import run_notebook

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def test_there_are_notebooks():
  assert NOTEBOOKS, f"no notebooks found in {NOTEBOOKS_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, (
          f"{path.name}: cell {i} has outputs; store notebooks cleared")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
  # The kernel inherits this process's environment.
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("PYTHONWARNINGS", "ignore::DeprecationWarning")
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                          resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors, errors


def _notebook(path, *sources):
  nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# title")]
                                + [nbformat.v4.new_code_cell(s) for s in sources])
  nbformat.write(nb, path)
  return path


def test_plain_python_runner(tmp_path, capsys):
  """scripts/run_notebook.py (the GPU machines have no Jupyter): cells share one namespace
  and run from the notebook's folder, plt.show saves the figures, an error stops the run."""
  runner = run_notebook
  good = _notebook(tmp_path / "good.ipynb",
                   "import os, matplotlib.pyplot as plt\nx = 3\nhere = os.getcwd()",
                   "plt.plot([0, x]); plt.show()\nplt.plot([1]); plt.figure(); plt.show()\n"
                   "print('cwd', here)")
  figures = tmp_path / "figs"
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  plt.figure()  # left open by an earlier test in this process: not the notebook's figure
  assert runner.main([str(good), f"--figures={figures}"]) == 0
  assert sorted(p.name for p in figures.iterdir()) == [
      "good_fig1.png", "good_fig2.png", "good_fig3.png"]
  assert f"cwd {tmp_path}" in capsys.readouterr().out

  bad = _notebook(tmp_path / "bad.ipynb", "y = 1", "raise ValueError('boom')", "z = 2")
  assert runner.main([str(bad)]) == 1
  out = capsys.readouterr().out
  assert "FAILED bad.ipynb at code cell 2" in out and "cell 3/3" not in out

  magic = _notebook(tmp_path / "magic.ipynb", "%matplotlib inline")
  with pytest.raises(SystemExit, match="IPython syntax"):
    runner.main([str(magic)])
  with pytest.raises(SystemExit):
    runner.main([str(tmp_path / "missing.ipynb")])
