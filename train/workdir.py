"""One run per workdir: its lock, its saved config against a new one, starting it over.

Lock. `workdir/lock` names the trainer that owns the workdir (JSON: pid, host, process
start time, command line); process 0 takes it for a whole multi-host job. A second trainer
refuses to start (WorkdirLockedError naming the owner). A lock whose process is gone from
this host (a trainer killed with -9) is stale and taken over with a warning; one from
another host cannot be checked from here, so the error says to delete it once that job is
gone. The file is created with a hard link of a complete temporary file, so it is never
seen half written, and removed when the run ends.

Config. Before anything is written, the config of a workdir that holds checkpoints
(workdir/config.json, written at every start) is compared with the new one, key by key:

  harmless (HARMLESS_KEYS: the run length, evaluation/checkpoint/logging cadence, the
    device mesh, gradient accumulation, the data cache folder): allowed; the differences are logged and
    appended to workdir/config_changes.jsonl;
  anything else (the model, the optimizer and its schedule, the data, batch size,
    seed): the run stops with ConfigMismatchError naming the keys, and nothing in the
    workdir changes.

`config.train.resume` says what to do instead (it is an instruction to one invocation,
so config.json always records "auto"):

  "auto"           resume when the configs agree up to harmless keys (the default);
  "allow_changes"  resume the latest checkpoint under the new config (the changes are
                   logged and recorded; the checkpoint must still fit the new model);
  "restart"        move this workdir's run (checkpoints, metrics, results, config) into
                   workdir/previous/<UTC time>/ and start from step 0.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import socket
import sys
import tempfile

import jax

from train import sharding as sharding_lib

log = logging.getLogger(__name__)

RESUME_MODES = ("auto", "allow_changes", "restart")
LOCK_FILE = "lock"
# Keys that change neither the train state nor its trajectory up to the steps trained.
HARMLESS_KEYS = ("name", "train.num_steps", "train.eval_every", "train.eval_batch_size",
                 "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
                 "train.halt_at_step", "train.prefetch", "train.resume", "train.fsdp_min_size",
                 "data.cache_dir", "data.tfds_dir", "data.num_workers",
                 # the batch stream is the same with any number of grain workers (a state
                 # saved with workers resumes only with as many: data/pipeline.py says so)
                 "train.data_workers",
                 # the same batches and the same update up to summation order (and
                 # BatchNorm's per-micro-batch statistics): a run may resume on fewer
                 # devices with its batch accumulated
                 "train.accum_steps")
HARMLESS_PREFIXES = ("train.mesh.",)
# Keys added to the config after runs had been saved, with what their absence meant: a
# config without one (a saved config.json, an old config file) reads as holding that value,
# so resuming such a run with today's configs is no change (train.trainer.validate_config
# accepts configs without them too).
ADDED_KEYS = {"train.accum_steps": 1, "optim.ssm_weight_decay": 0.0,
              "model.ffn_activation": "gelu", "model.scan_layers": False}
# What a run leaves in its workdir; "restart" moves these aside.
RUN_FILES = ("checkpoints", "best", "corrupt", "tb", "metrics.jsonl", "metrics_superseded.jsonl",
             "results.json", "config.json", "config.py", "config_changes.jsonl")


class WorkdirLockedError(RuntimeError):
  """Another trainer holds the workdir."""


class ConfigMismatchError(ValueError):
  """The new config changes what the workdir's checkpoints were trained with."""


# -- the lock ---------------------------------------------------------------------------

def _start_time(pid: int) -> str | None:
  """The kernel's start time of `pid` (tells a reused pid apart), or None off Linux."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except OSError:
    return None
  return None if fields[0] == "Z" else fields[19]  # a zombie is as good as gone


def _alive(pid: int, start_time: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # someone else's live process
  now = _start_time(pid)
  if os.path.exists("/proc/self/stat") and now is None:
    return False  # a zombie: killed, not yet reaped
  return start_time is None or now is None or now == start_time


def _owner_text(owner: dict) -> str:
  command = str(owner.get("command", "?"))
  command = command if len(command) <= 100 else command[:97] + "..."
  return f"pid {owner.get('pid')} on {owner.get('host')} (started {owner.get('started', '?')}: {command})"


class WorkdirLock:
  """workdir/lock for the life of a run (see the module docstring). A context manager."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._mine: dict | None = None

  def _read(self) -> dict | None:
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # unreadable: treated as held by an unknown owner

  def _try_create(self, owner: dict) -> bool:
    fd, tmp = tempfile.mkstemp(prefix=".lock.", dir=os.path.dirname(self.path))
    try:
      with os.fdopen(fd, "w") as f:
        json.dump(owner, f)
      os.link(tmp, self.path)  # atomic, and fails if the lock exists
      return True
    except FileExistsError:
      return False
    finally:
      os.remove(tmp)

  def _acquire_here(self) -> None:
    pid = os.getpid()
    me = dict(pid=pid, host=socket.gethostname(), start_time=_start_time(pid),
              started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              command=" ".join(sys.argv)[:500])
    for _ in range(3):
      if self._try_create(me):
        self._mine = me
        return
      owner = self._read()
      if owner is None:
        continue  # released meanwhile
      stale = (owner.get("host") == me["host"] and isinstance(owner.get("pid"), int)
               and not _alive(owner["pid"], owner.get("start_time")))
      if not stale:
        where = ("delete it if that process is gone" if owner.get("host") != me["host"]
                 else "stop that trainer first")
        raise WorkdirLockedError(
            f"workdir {os.path.dirname(self.path)} is in use by {_owner_text(owner)}; a second "
            f"trainer on one workdir would overwrite its checkpoints. Wait for it, use another "
            f"--workdir, or {where} (lock file {self.path}).")
      log.warning("taking over the stale lock of %s: that process is gone", _owner_text(owner))
      aside = f"{self.path}.stale-{pid}"
      try:
        os.rename(self.path, aside)
        os.remove(aside)
      except FileNotFoundError:
        pass  # another starter removed it first; try again
    raise WorkdirLockedError(f"could not take the lock {self.path} (it keeps changing)")

  def acquire(self) -> "WorkdirLock":
    """Takes the lock on process 0; every process raises if it could not."""
    error = None
    if jax.process_index() == 0:
      try:
        self._acquire_here()
      except WorkdirLockedError as e:
        error = e
    if not sharding_lib.from_process_0(error is None):
      raise error or WorkdirLockedError(f"process 0 could not lock {os.path.dirname(self.path)}")
    return self

  def release(self) -> None:
    if self._mine is not None and self._read() == self._mine:
      os.remove(self.path)
    self._mine = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


# -- the saved config -------------------------------------------------------------------

def flatten(d: dict, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def as_json(config) -> dict:
  """The config as the JSON config.json holds (tuples become lists, and so on)."""
  return json.loads(config.to_json_best_effort())


def is_harmless(key: str) -> bool:
  return key in HARMLESS_KEYS or key.startswith(HARMLESS_PREFIXES)


def config_changes(saved: dict, new: dict) -> tuple[dict, dict]:
  """(blocking, harmless): {flat key: [saved value, new value]} of the keys that differ.

  A key missing on one side counts as a difference (value None there), except the
  ADDED_KEYS, which read as their default where missing.
  """
  old, cur = dict(ADDED_KEYS), dict(ADDED_KEYS)
  old.update(flatten(saved))
  cur.update(flatten(new))
  diff = {k: [old.get(k), cur.get(k)] for k in sorted(set(old) | set(cur))
          if old.get(k) != cur.get(k)}
  harmless = {k: v for k, v in diff.items() if is_harmless(k)}
  return {k: v for k, v in diff.items() if k not in harmless}, harmless


def _steps_in(folder: str) -> list[int]:
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def has_checkpoints(workdir: str) -> bool:
  """Whether a run has saved state here: a checkpoint, or one moved to corrupt/."""
  corrupt = os.path.join(workdir, "corrupt")
  return bool(_steps_in(os.path.join(workdir, "checkpoints"))
              or _steps_in(os.path.join(workdir, "best"))
              or (os.path.isdir(corrupt) and os.listdir(corrupt)))


def read_saved_config(workdir: str) -> dict | None:
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    log.warning("%s is unreadable (%s); the checkpoints' shapes are still checked", path, e)
    return None


def _show(changes: dict, limit: int = 8) -> str:
  items = [f"{k} ({a!r} -> {b!r})" for k, (a, b) in changes.items()]
  more = f" and {len(items) - limit} more" if len(items) > limit else ""
  return ", ".join(items[:limit]) + more


def move_run_aside(workdir: str) -> str | None:
  """Moves the files of the run in workdir into workdir/previous/<UTC time>/ (process 0)."""
  present = [n for n in RUN_FILES if os.path.exists(os.path.join(workdir, n))]
  if not present:
    return None
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
  dest = os.path.join(workdir, "previous", stamp)
  if jax.process_index() == 0:
    os.makedirs(dest, exist_ok=True)
    for name in present:
      shutil.move(os.path.join(workdir, name), os.path.join(dest, name))
  sharding_lib.sync_processes(f"ssmlab_restart_{stamp}")
  return dest


def check_resume(workdir: str, config) -> dict:
  """Applies config.train.resume to workdir before the run writes anything there.

  Returns:
    {flat key: [saved, new]} of the changes allowed; write_config records them once the
    checkpoint has been restored.

  Raises:
    ConfigMismatchError: the workdir holds checkpoints of a config that differs in a
      key that is not harmless, and resume is "auto".
  """
  mode = config.train.resume
  if mode == "restart":
    dest = move_run_aside(workdir)
    if dest:
      log.warning("train.resume=restart: the previous run moved to %s; starting from step 0",
                  dest)
    return {}
  saved = read_saved_config(workdir) if has_checkpoints(workdir) else None
  if saved is None:
    return {}
  blocking, harmless = config_changes(saved, as_json(config))
  harmless.pop("train.resume", None)
  if blocking and mode != "allow_changes":
    raise ConfigMismatchError(
        f"the config differs from the one the checkpoints in {workdir} were trained with "
        f"(config.json) in {_show(blocking)}; nothing was changed. Use a new --workdir, or "
        f"--config.train.resume=allow_changes to continue the latest checkpoint with the new "
        f"values, or --config.train.resume=restart to move this run to {workdir}/previous/ "
        f"and start over.")
  if blocking:
    log.warning("train.resume=allow_changes: resuming with a changed config: %s", _show(blocking))
  if harmless:
    log.info("config changes allowed on resume: %s", _show(harmless))
  return {**blocking, **harmless}


def write_config(config, workdir: str, changes: dict | None = None) -> None:
  """workdir/config.json and workdir/config.py (loadable: --config=workdir/config.py), and
  the `changes` from the saved config appended to workdir/config_changes.jsonl."""
  if jax.process_index() != 0:
    return
  if changes:
    line = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                resume=config.train.resume, changes=changes)
    with open(os.path.join(workdir, "config_changes.jsonl"), "a") as f:
      f.write(json.dumps(line) + "\n")
  as_dict = as_json(config)
  as_dict["train"]["resume"] = "auto"  # an instruction to one invocation, not the run's
  path = os.path.join(workdir, "config.json")
  with open(path + ".tmp", "w") as f:
    json.dump(as_dict, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
  with open(os.path.join(workdir, "config.py"), "w") as f:
    f.write('"""The config of this run; `--config=<workdir>/config.py` reruns it."""\n\n'
            "import ml_collections\n\n\ndef get_config():\n"
            f"  return ml_collections.ConfigDict({as_dict!r})\n")
