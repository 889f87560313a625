r"""The LRA table: our runs' test accuracy beside the published numbers of the same models.

  python -m train.lra_table runs/                      # markdown
  python -m train.lra_table runs/ --format=plain       # aligned columns for a terminal
  python -m train.lra_table runs/ --include-unfinished # also halted runs (validation only)

Finds every `results.json` under RUNS_DIR (train.trainer.run writes one when a run
finishes), identifies the task and model of each from its `config_name`
("listops:s4d", "image:s4,local", ...) or, failing that, from the workdir's
config.json / config.py, and prints one row per model and size with our test accuracy
(%) on ListOps, Text, Retrieval, Image, Pathfinder and Path-X and their average over
the tasks present, each followed by the published row of that model (averaged over the
same tasks). Marks:

  †  the run was shorter than the published schedule: fewer steps than the recipe's
     config.train.num_steps (configs/lra/<task>.py get_config(model)); a footnote
     gives "26k/80k steps".
  ‡  no test result: the cell is the best validation accuracy (unfinished runs, or
     curves read with `run_from_metrics`).

Test accuracy: of the best-validation checkpoint when `python -m train.evaluate
--workdir=W --step=best` has written W/eval_test_<n>dev.json at the run's best_val_step
(the papers' protocol; a footnote gives the final state's number too), else the final
state's (results.json).

Several runs of one (task, model, size): the one with the best validation accuracy is
shown, and a footnote says so and names the others. An unreadable results.json is
skipped with a warning naming the file; the others are still tabulated.

API: `collect(runs_dir) -> list[Run]`, `table(runs, fmt) -> str`, `main(argv)`, and
`run_from_metrics(path, task, model)` for a bare metrics.jsonl (notebooks/04).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import sys
import warnings

TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")
TASK_TITLES = {"listops": "ListOps", "text": "Text", "retrieval": "Retrieval", "image": "Image",
               "pathfinder": "Pathfinder", "pathx": "Path-X"}
# Other spellings of task names seen in run names and papers.
_TASK_ALIASES = {"aan": "retrieval", "imdb": "text", "cifar": "image", "path-x": "pathx",
                 "path_x": "pathx", "pathfinder32": "pathfinder"}
FAIL = "fail"  # the published model did not beat chance (LRA's "FAIL", the S4 paper's ✗)

PARTIAL_MARK = "†"  # shorter than the published schedule
VAL_MARK = "‡"      # validation accuracy, no test result

# Our models' names in the table (the published rows use their papers' names).
MODEL_TITLES = {"s4": "S4", "s4d": "S4D", "sgconv": "SGConv", "lssl": "LSSL",
                "transformer": "Transformer", "mamba": "Mamba", "mamba2": "Mamba-2",
                "lightning": "Lightning", "linear_attention": "Linear attention"}


# -- published numbers --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Published:
  """Test accuracy (%) of one model as its paper reports it."""
  label: str
  source: str
  accuracy: dict  # task -> float, or FAIL
  average: float  # the paper's own average


# Sources, one per row; only numbers from these tables (nothing estimated):
PUBLISHED = {
    # Gu, Goel & Ré, "Efficiently Modeling Long Sequences with Structured State Spaces",
    # ICLR 2022, LRA table of the revised paper (S4 v2); = SPECS.md "S4 (v2)".
    "s4": Published("S4", "Gu et al. 2022 (S4), LRA table, v2 numbers",
                    dict(listops=59.60, text=86.82, retrieval=90.90, image=88.65,
                         pathfinder=94.20, pathx=96.35), 86.09),
    # Gu, Gupta, Goel & Ré, "On the Parameterization and Initialization of Diagonal State
    # Space Models", NeurIPS 2022, LRA table, row S4D-LegS (our configs use init="legs").
    # Average 84.89 = the paper's "85% on average" (SPECS.md). ListOps, Text, Retrieval,
    # Pathfinder and Path-X agree, to the 0.1 they quote, with the S4D-LegS row that
    # Orvieto et al. 2023 (LRU paper, Table 3) copied from this table.
    "s4d": Published("S4D-LegS", "Gu et al. 2022 (S4D), LRA table, S4D-LegS row",
                     dict(listops=60.47, text=86.18, retrieval=89.46, image=88.19,
                          pathfinder=93.06, pathx=91.95), 84.89),
    # Li, Cai, Zhang, Chen & Dey, "What Makes Convolutional Models Great on Long Sequence
    # Modeling?", 2022 (SGConv), LRA table; = SPECS.md.
    "sgconv": Published("SGConv", "Li et al. 2022 (SGConv), LRA table",
                        dict(listops=61.45, text=89.20, retrieval=91.11, image=87.97,
                             pathfinder=95.46, pathx=97.83), 87.17),
    # Tay et al., "Long Range Arena: A Benchmark for Efficient Transformers", ICLR 2021,
    # Table 1, vanilla Transformer; Path-X FAIL; its average is over the other five.
    "transformer": Published("Transformer", "Tay et al. 2021 (LRA), Table 1",
                             dict(listops=36.37, text=64.27, retrieval=57.46, image=42.44,
                                  pathfinder=71.40, pathx=FAIL), 54.39),
}


# -- runs ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
  """One training run, as far as the table needs it (accuracies are fractions in [0, 1])."""
  path: str                       # the results.json (or metrics.jsonl) it was read from
  task: str                       # one of TASKS
  model: str                      # config.model.name: "s4d", "s4", ...
  size: str = ""                  # "" (published recipe), "short", "local", "tiny"
  steps: int = 0                  # steps trained
  schedule_steps: int | None = None  # the published recipe's num_steps; None: unknown
  test_accuracy: float | None = None
  val_accuracy: float | None = None       # at the last evaluation
  best_val_accuracy: float | None = None
  best_val_step: int | None = None
  config_name: str = ""
  finished: bool = True           # False: no results.json (halted or a bare curve)
  final_test_accuracy: float | None = None  # the final state's, when test_accuracy is the
                                            # best-validation checkpoint's (see load_run)

  @property
  def partial(self) -> bool:
    """Shorter than the published schedule."""
    return self.schedule_steps is not None and self.steps < self.schedule_steps

  @property
  def score(self) -> float | None:
    """Accuracy shown in the table: test, else the best validation accuracy."""
    if self.test_accuracy is not None:
      return self.test_accuracy
    return self.best_val_accuracy if self.best_val_accuracy is not None else self.val_accuracy

  @property
  def selection_accuracy(self) -> float:
    """What picks the best of several runs: validation accuracy (never test)."""
    for v in (self.best_val_accuracy, self.val_accuracy):
      if v is not None and math.isfinite(v):
        return v
    return -math.inf


def _canonical_task(name: str) -> str:
  name = name.strip().lower()
  for prefix in ("lra_", "lra-", "lra/"):
    if name.startswith(prefix):
      name = name[len(prefix):]
  return _TASK_ALIASES.get(name, name)


def parse_config_name(name: str) -> tuple[str, str, str] | None:
  """"listops:s4d,tiny" -> ("listops", "s4d", "tiny"); None when not of that form."""
  if not isinstance(name, str) or ":" not in name:
    return None
  task, _, arg = name.partition(":")
  parts = [p.strip() for p in arg.split(",")]
  if not parts[0] or len(parts) > 2:
    return None
  return _canonical_task(task), parts[0], parts[1] if len(parts) == 2 else ""


def schedule_steps(task: str, model: str) -> int | None:
  """config.train.num_steps of the published recipe (configs/lra/<task>.py), or None."""
  if task not in TASKS:
    return None
  try:
    module = importlib.import_module(f"configs.lra.{task}")
    return int(module.get_config(model).train.num_steps)
  except (ImportError, ValueError, KeyError):  # no recipe for this model
    return None


def _read_workdir_config(workdir: str) -> dict | None:
  """The run's config as a plain dict: config.json, else config.py (our own file)."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  path = os.path.join(workdir, "config.py")
  if os.path.exists(path):
    namespace: dict = {}
    with open(path) as f:
      exec(compile(f.read(), path, "exec"), namespace)  # noqa: S102 -- written by the trainer
    return namespace["get_config"]().to_dict()
  return None


def _identify(config_name: str, workdir: str) -> tuple[str, str, str, dict | None]:
  """(task, model, size, workdir config or None) of a run."""
  config = _read_workdir_config(workdir)
  parsed = parse_config_name(config_name)
  if parsed is None and config is not None:
    parsed = parse_config_name(config.get("name", ""))
  if parsed is not None:
    task, model, size = parsed
  elif config is not None:  # no usable name: the config's own fields
    task = _canonical_task(config["data"]["task"])
    model, size = config["model"]["name"], ""
  else:
    raise ValueError(f"cannot tell the task and model: config_name {config_name!r} is not "
                     f"'task:model[,size]' and {workdir} has no config.json or config.py")
  if config is not None:  # the config's own fields win over the name
    task = _canonical_task(config.get("data", {}).get("task", task))
    model = config.get("model", {}).get("name", model)
  return task, model, size, config


def _number(results: dict, key: str, *, required: bool = False) -> float | None:
  v = results.get(key)
  if v is None:
    if required:
      raise ValueError(f"no {key!r} field")
    return None
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    raise ValueError(f"{key}={v!r} is not a number")
  return float(v)


class NotLRAError(ValueError):
  """The run is of a task outside LRA (mqar, lm, ...)."""


def load_run(results_path: str) -> Run:
  """A Run from one results.json; ValueError / OSError (the caller names the file) when it
  cannot be read, NotLRAError for other tasks."""
  with open(results_path) as f:
    try:
      results = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"not valid JSON ({e})") from None
  if not isinstance(results, dict):
    raise ValueError(f"holds a JSON {type(results).__name__}, not an object")
  workdir = os.path.dirname(os.path.abspath(results_path))
  task, model, size, _ = _identify(results.get("config_name", ""), workdir)
  if task not in TASKS:
    raise NotLRAError(f"task {task!r} is not an LRA task")
  steps = _number(results, "steps", required=True)
  test = _number(results, "test_accuracy", required=True)
  best_step = results.get("best_val_step")
  best_step = int(best_step) if isinstance(best_step, (int, float)) else None
  best_test = _best_checkpoint_test(workdir, best_step)
  return Run(path=results_path, task=task, model=model, size=size, steps=int(steps),
             schedule_steps=schedule_steps(task, model),
             test_accuracy=test if best_test is None else best_test,
             val_accuracy=_number(results, "val_accuracy"),
             best_val_accuracy=_number(results, "best_val_accuracy"),
             best_val_step=best_step, config_name=results.get("config_name", ""),
             final_test_accuracy=None if best_test is None else test)


def _best_checkpoint_test(workdir: str, best_step: int | None) -> float | None:
  """Test accuracy of the best-validation checkpoint, when `python -m train.evaluate
  --workdir=W --step=best` has written it (W/eval_test_<n>dev.json at that step): the
  papers' protocol (S4's repo reports test at the best validation epoch). None if absent."""
  if best_step is None or not os.path.isdir(workdir):
    return None
  for name in sorted(os.listdir(workdir)):
    if not (name.startswith("eval_test_") and name.endswith(".json")):
      continue
    try:
      with open(os.path.join(workdir, name)) as f:
        ev = json.load(f)
    except (OSError, ValueError) as e:
      warnings.warn(f"skipping {os.path.join(workdir, name)}: {e}", stacklevel=3)
      continue
    if (isinstance(ev, dict) and ev.get("split") == "test" and ev.get("step") == best_step
        and isinstance(ev.get("accuracy"), (int, float))):
      return float(ev["accuracy"])
  return None


def run_from_metrics(path: str, task: str, model: str, *, size: str = "",
                     schedule: int | None = None) -> Run:
  """A Run from a metrics.jsonl alone (train/metrics.py lines): the curves of a run that
  stopped early, or of a committed results file. steps = the last step logged; test
  accuracy if a "test" line exists; schedule defaults to the recipe's num_steps."""
  task = _canonical_task(task)
  if task not in TASKS:
    raise ValueError(f"unknown LRA task {task!r}; valid: {TASKS}")
  val, test, last = [], None, 0
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        m = json.loads(line)
        step = int(m["step"])
      except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} line {n} is not a metrics record ({e})") from None
      last = max(last, step)
      if m.get("split") == "val" and "accuracy" in m:
        val.append((step, float(m["accuracy"])))
      elif m.get("split") == "test" and "accuracy" in m:
        test = float(m["accuracy"])
  if not val and test is None:
    raise ValueError(f"{path} has no validation or test accuracy")
  best = max(val, key=lambda sa: sa[1]) if val else (None, None)
  return Run(path=path, task=task, model=model, size=size, steps=last,
             schedule_steps=schedule if schedule is not None else schedule_steps(task, model),
             test_accuracy=test, val_accuracy=val[-1][1] if val else None,
             best_val_accuracy=best[1], best_val_step=best[0],
             config_name=f"{task}:{model}" + (f",{size}" if size else ""), finished=False)


def _unfinished_run(workdir: str) -> Run | None:
  """A run without results.json, from its config and metrics.jsonl (None if not LRA)."""
  config = _read_workdir_config(workdir)
  if config is None:
    raise ValueError(f"{workdir} has metrics.jsonl but no config.json or config.py")
  task, model, size, _ = _identify(config.get("name", ""), workdir)
  if task not in TASKS:
    return None
  return run_from_metrics(os.path.join(workdir, "metrics.jsonl"), task, model, size=size)


def collect(runs_dir: str, *, include_unfinished: bool = False) -> list[Run]:
  """Every LRA run under runs_dir (recursively), sorted by path.

  Raises FileNotFoundError when runs_dir does not exist or holds no results.json (with
  include_unfinished: no metrics.jsonl either). An unreadable file is skipped with a
  warning that names it; runs of non-LRA tasks are skipped silently.
  """
  if not os.path.isdir(runs_dir):
    raise FileNotFoundError(f"runs directory {runs_dir!r} does not exist")
  runs, found = [], 0
  for root, dirs, files in os.walk(runs_dir):
    dirs.sort()
    # Checkpoint folders hold no results; skip their (many) files.
    dirs[:] = [d for d in dirs if d not in ("checkpoints", "best", "corrupt", "tb")]
    if "results.json" in files:
      path = os.path.join(root, "results.json")
    elif include_unfinished and "metrics.jsonl" in files:
      path = os.path.join(root, "metrics.jsonl")
    else:
      continue
    found += 1
    try:
      run = load_run(path) if path.endswith(".json") else _unfinished_run(root)
    except NotLRAError:
      continue
    except (OSError, ValueError, KeyError, TypeError) as e:
      warnings.warn(f"skipping {path}: {e}", stacklevel=2)
      continue
    if run is not None:
      runs.append(run)
  if not found:
    what = "results.json or metrics.jsonl" if include_unfinished else "results.json"
    hint = "" if include_unfinished else (" (a run writes results.json when it finishes; "
                                          "--include-unfinished also reads halted runs)")
    raise FileNotFoundError(f"no {what} found under {runs_dir!r}{hint}")
  return runs


# -- the table ----------------------------------------------------------------------------

def _steps_text(n: int) -> str:
  """26000 -> "26k", 2250 -> "2.25k", 16 -> "16"."""
  if n < 1000:
    return str(n)
  return f"{n / 1000:.2f}".rstrip("0").rstrip(".") + "k"


def _model_order(model: str) -> tuple:
  known = list(PUBLISHED)
  return (known.index(model) if model in known else len(known), model)


def _row_label(model: str, size: str) -> str:
  name = MODEL_TITLES.get(model, model)
  return f"{name} ({size})" if size else name


def table(runs: list[Run], fmt: str = "markdown") -> str:
  """The LRA table of `runs` (see the module docstring); fmt "markdown" or "plain"."""
  if fmt not in ("markdown", "plain"):
    raise ValueError(f"unknown format {fmt!r}; valid: 'markdown', 'plain'")
  if not runs:
    raise ValueError("no runs to tabulate")
  groups: dict[tuple[str, str, str], list[Run]] = {}
  for run in runs:
    if run.task not in TASKS:
      raise ValueError(f"{run.path}: unknown LRA task {run.task!r}")
    groups.setdefault((run.model, run.size, run.task), []).append(run)

  notes: list[str] = []
  rows_by_key: dict[tuple[str, str], dict[str, str]] = {}
  scores_by_key: dict[tuple[str, str], dict[str, float]] = {}
  for (model, size, task), group in sorted(groups.items(), key=lambda kv: (
      _model_order(kv[0][0]), kv[0][1], TASKS.index(kv[0][2]))):
    best = max(group, key=lambda r: (r.selection_accuracy, r.score or -1.0))
    where = f"{TASK_TITLES[task]}, {_row_label(model, size)}"
    cell, marks = "–", ""
    if best.score is not None and math.isfinite(best.score):
      cell = f"{100 * best.score:.2f}"
      scores_by_key.setdefault((model, size), {})[task] = 100 * best.score
    said = []  # one footnote per cell
    if best.partial:
      marks += PARTIAL_MARK
      said.append(f"{_steps_text(best.steps)}/{_steps_text(best.schedule_steps)} steps of "
                  f"the published schedule")
    if best.final_test_accuracy is not None:
      said.append(f"test accuracy of the best-validation checkpoint (step "
                  f"{_steps_text(best.best_val_step)}); the final state's: "
                  f"{100 * best.final_test_accuracy:.2f}")
    if best.test_accuracy is None:
      marks += VAL_MARK
      step = f" (step {best.best_val_step})" if best.best_val_step is not None else ""
      said.append(f"best validation accuracy{step}, no test result")
    if len(group) > 1:
      others = ", ".join(r.path for r in group if r is not best)
      said.append(f"best of {len(group)} runs by validation accuracy (others: {others})")
    if said:
      notes.append(f"{marks or ' '} {where}: " + "; ".join(said) + f" [{best.path}]")
    rows_by_key.setdefault((model, size), {})[task] = cell + marks

  header = ["Model"] + [TASK_TITLES[t] for t in TASKS] + ["Avg"]
  body = []
  for (model, size), cells in rows_by_key.items():
    scores = scores_by_key.get((model, size), {})
    avg = f"{sum(scores.values()) / len(scores):.2f}" if scores else "–"
    name = MODEL_TITLES.get(model, model)
    body.append([f"{name} (ours, {size})" if size else f"{name} (ours)"]
                + [cells.get(t, "–") for t in TASKS] + [avg])
    if model in PUBLISHED:
      pub = PUBLISHED[model]
      pub_cells = [("✗" if pub.accuracy.get(t) == FAIL else
                    f"{pub.accuracy[t]:.2f}" if t in pub.accuracy else "–") for t in TASKS]
      same = [pub.accuracy.get(t) for t in scores]
      # The published average over the tasks our row has, so the two averages compare.
      pub_avg = (f"{sum(same) / len(same):.2f}" if same and all(
          isinstance(v, float) for v in same) else "–")
      body.append([f"{pub.label} (published)"] + pub_cells + [pub_avg])

  lines = (_markdown(header, body) if fmt == "markdown" else _plain(header, body))
  legend = ["Test accuracy (%). Avg: mean over the tasks our row has; a published row "
            "averages the same tasks."]
  pubs = sorted({m for m, _ in rows_by_key if m in PUBLISHED}, key=_model_order)
  if pubs:
    legend.append("Published: " + "; ".join(
        f"{PUBLISHED[m].label}: {PUBLISHED[m].source} (its 6-task average "
        f"{PUBLISHED[m].average:.2f}" + (", Path-X failed, average over the other five"
                                         if PUBLISHED[m].accuracy.get("pathx") == FAIL
                                         else "") + ")"
        for m in pubs) + ".")
  if any(PARTIAL_MARK in c or VAL_MARK in c for cells in rows_by_key.values()
         for c in cells.values()):
    legend.append(f"{PARTIAL_MARK} shorter than the published schedule; {VAL_MARK} validation "
                  "accuracy (no test result).")
  legend += notes
  bullet = "- " if fmt == "markdown" else ""  # one markdown paragraph per note
  return "\n".join(lines + [""] + [bullet + line for line in legend]) + "\n"


def _markdown(header, body) -> list[str]:
  out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1))
         + "|"]
  out += ["| " + " | ".join(row) + " |" for row in body]
  return out


def _plain(header, body) -> list[str]:
  widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
  fmt_row = lambda row: "  ".join(  # noqa: E731
      c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
  return [fmt_row(header), "  ".join("-" * w for w in widths)] + [fmt_row(r) for r in body]


# -- command line -------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m train.lra_table",
      description="The LRA table of the runs under RUNS_DIR beside the published numbers.")
  parser.add_argument("runs_dir", metavar="RUNS_DIR")
  parser.add_argument("--format", choices=("markdown", "plain"), default="markdown")
  parser.add_argument("--include-unfinished", action="store_true",
                      help="also runs without results.json (best validation accuracy)")
  args = parser.parse_args(argv)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      runs = collect(args.runs_dir, include_unfinished=args.include_unfinished)
    except FileNotFoundError as e:
      print(f"lra_table: error: {e}", file=sys.stderr)
      return 1
  for w in caught:
    print(f"lra_table: warning: {w.message}", file=sys.stderr)
  if not runs:
    print(f"lra_table: error: no readable LRA run under {args.runs_dir!r}", file=sys.stderr)
    return 1
  sys.stdout.write(table(runs, args.format))
  return 0


if __name__ == "__main__":
  sys.exit(main())
