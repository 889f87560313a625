"""Registry of data tasks: `load_task(data_cfg) -> (TaskSpec, splits)`.

The built-in tasks are TFDS datasets (data/builders.py): prepared once as array_record
under config.data.tfds_dir (default <cache>/tfds) and read with tfds.data_source. Their
options are the DEFAULTS of data/<task>.py plus `tfds_dir` and `cache_dir`.

TASKS names each task's direct reader `f(options: dict) -> (TaskSpec, {"train",
"validation", "test"} -> ArrayDataset)` by "module:attribute", imported on first use so
that importing `data` stays cheap: for the built-ins it is the reference the builders
are tested against (and what they store); a task added with `register_task` is read
through it. A loader declares its options with their defaults and passes the config
through `task_options`, which rejects keys it does not know.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from data.integrity import DataError, check_labels
from data.pipeline import ArrayDataset
from data.task import TaskSpec

TASKS: dict[str, str] = {
    "listops": "data.listops:load_task",
    "mqar": "data.mqar:load_task",
    "pathfinder": "data.pathfinder:load_task",
    "pathx": "data.pathfinder:load_pathx",
    "image": "data.image:load_task",
    "text": "data.text:load_task",
    "retrieval": "data.retrieval:load_task",
    "lm": "data.lm:load_task",
}

SPLITS = ("train", "validation", "test")

# Built-in tasks read through TFDS: task -> "module:DEFAULTS" of their options.
TFDS_TASKS: dict[str, str] = {
    "listops": "data.listops:DEFAULTS", "mqar": "data.mqar:DEFAULTS",
    "pathfinder": "data.pathfinder:DEFAULTS", "pathx": "data.pathfinder:PATHX_DEFAULTS",
    "image": "data.image:DEFAULTS", "text": "data.text:DEFAULTS",
    "retrieval": "data.retrieval:DEFAULTS", "lm": "data.lm:DEFAULTS",
}
TFDS_OPTIONS = dict(tfds_dir=None, cache_dir=None)  # where datasets are prepared / found


def register_task(name: str, target: str) -> None:
  """Add a task (or replace a built-in one) read by a direct loader; target is "module:loader"."""
  TASKS[name] = target
  TFDS_TASKS.pop(name, None)


def _attr(target: str):
  module_name, attr = target.split(":")
  return getattr(importlib.import_module(module_name), attr)


def _as_dict(data_cfg) -> dict[str, Any]:
  if hasattr(data_cfg, "to_dict"):  # ml_collections.ConfigDict
    return data_cfg.to_dict()
  if isinstance(data_cfg, Mapping):
    return dict(data_cfg)
  raise ValueError(f"data config must be a ConfigDict or a dict, got {type(data_cfg).__name__}")


def task_options(data_cfg: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
  """defaults updated by data_cfg; ValueError naming any key not in defaults."""
  unknown = sorted(set(data_cfg) - set(defaults))
  if unknown:
    raise ValueError(f"data task {data_cfg.get('task')!r} got unknown config keys {unknown}; "
                     f"valid keys: {sorted(defaults)}")
  return {**defaults, **data_cfg}


def load_task(data_cfg) -> tuple[TaskSpec, dict[str, ArrayDataset]]:
  """Build a task from the `config.data` section.

  Args:
    data_cfg: ConfigDict (or dict) with at least `task`; the other keys depend on the task.

  Returns:
    (task spec, {"train", "validation", "test"} -> ArrayDataset).

  Raises:
    ValueError: unknown task, or a config key the task does not accept.
    FileNotFoundError: a data_dir that does not hold the task's files.
    data.integrity.DataError: a source that is damaged, holds fewer examples than it
      should, or a split that is empty or has a single label (data/integrity.py).
  """
  cfg = _as_dict(data_cfg)
  task = cfg.get("task")
  if task not in TASKS:
    raise ValueError(f"unknown data task {task!r}; valid tasks: {sorted(TASKS)}")
  if task in TFDS_TASKS:
    opts = task_options(cfg, {**_attr(TFDS_TASKS[task]), **TFDS_OPTIONS})
    from data import builders  # noqa: PLC0415 -- tensorflow_datasets on first use only
    spec, splits = builders.load(opts)
  else:  # a registered task: its own loader, which need not know the TFDS options
    spec, splits = _attr(TASKS[task])({k: v for k, v in cfg.items()
                                       if not (k in TFDS_OPTIONS and v is None)})
  missing = set(SPLITS) - set(splits)
  if missing:
    raise RuntimeError(f"task {task!r} loader returned no {sorted(missing)} split(s)")
  for split, ds in splits.items():
    if not len(ds):
      raise DataError(f"task {task!r}: the {split} split is empty")
    if spec.kind != "lm":  # one label per sequence: a single class is a broken source
      check_labels(task, split, ds["targets"])
  return spec, splits
