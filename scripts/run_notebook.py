r"""Run a notebook's code cells top to bottom in plain Python, without Jupyter.

For machines that have the project's dependencies and matplotlib but no Jupyter kernel (the
GPU machines behind the device tool): the code cells run in order in one namespace, from
the notebook's own folder as the test suite runs them (tests/test_notebooks.py uses
nbclient and a real kernel). Each `plt.show()` saves the open figures as PNG files instead
of drawing them, and the time of each cell is printed. The first cell that raises stops
the run with its traceback and a non-zero exit status. Cells that use IPython magics
(lines starting with % or !) are refused, since plain Python cannot run them.

  python scripts/run_notebook.py notebooks/02_selective_scan.ipynb --figures /tmp/nb02
  python scripts/run_notebook.py notebooks/*.ipynb --figures /tmp/figs
"""

import argparse
import json
import os
import pathlib
import sys
import time
import traceback


def code_cells(path: pathlib.Path) -> list[str]:
  """The sources of the notebook's code cells, in order."""
  try:
    nb = json.loads(path.read_text())
    cells = nb["cells"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise SystemExit(f"{path}: not a readable .ipynb notebook ({e})") from e
  sources = []
  for i, cell in enumerate(cells):
    if cell.get("cell_type") != "code":
      continue
    src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
    magics = [line for line in src.splitlines() if line.lstrip().startswith(("%", "!"))]
    if magics:
      raise SystemExit(f"{path}: cell {i} uses IPython syntax ({magics[0]!r}); run it in "
                       "Jupyter instead")
    sources.append(src)
  return sources


def run(path: pathlib.Path, figures: pathlib.Path | None) -> bool:
  """Runs one notebook; True when every cell ran."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  # Figures left open by whoever ran before (another notebook, a test in the same process) are
  # not this notebook's: the first show() would save them under its name.
  plt.close("all")
  saved = []

  def show(*args, **kwargs):
    del args, kwargs
    for num in plt.get_fignums():
      if figures is not None:
        out = figures / f"{path.stem}_fig{len(saved) + 1}.png"
        plt.figure(num).savefig(out, dpi=90, bbox_inches="tight")
        saved.append(out)
      plt.close(num)

  cells = code_cells(path)
  namespace = {"__name__": "__main__", "__file__": str(path)}
  cwd = os.getcwd()
  os.chdir(path.parent)
  plt_show, plt.show = plt.show, show
  t_start = time.perf_counter()
  try:
    for i, src in enumerate(cells):
      t0 = time.perf_counter()
      print(f"--- {path.name}: code cell {i + 1}/{len(cells)}", flush=True)
      try:
        exec(compile(src, f"<{path.name} cell {i + 1}>", "exec"), namespace)  # noqa: S102
      except Exception:  # noqa: BLE001 - report any cell error and stop this notebook
        traceback.print_exc()
        print(f"FAILED {path.name} at code cell {i + 1}", flush=True)
        return False
      print(f"--- cell {i + 1} took {time.perf_counter() - t0:.1f} s", flush=True)
  finally:
    plt.show = plt_show
    plt.close("all")
    os.chdir(cwd)
  print(f"OK {path.name}: {len(cells)} cells in {time.perf_counter() - t_start:.1f} s, "
        f"{len(saved)} figures" + (f" in {figures}" if figures else ""), flush=True)
  return True


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("notebooks", nargs="+", type=pathlib.Path)
  parser.add_argument("--figures", type=pathlib.Path, default=None,
                      help="folder for the PNG files of the figures (default: not saved)")
  args = parser.parse_args(argv)
  for path in args.notebooks:
    if not path.is_file():
      parser.error(f"no such notebook: {path}")
  if args.figures is not None:
    args.figures.mkdir(parents=True, exist_ok=True)
  ok = [run(path.resolve(), args.figures and args.figures.resolve())
        for path in args.notebooks]
  return 0 if all(ok) else 1


if __name__ == "__main__":
  sys.exit(main())
