"""Checkpoints with orbax: periodic + final, keep-last-N plus the best, corruption fallback.

Layout under the workdir:

  checkpoints/<step>/   the latest config.train.keep_checkpoints checkpoints
  best/<step>/          the one with the best validation accuracy so far
  corrupt/<step>-<t>/   checkpoints found unreadable at start, moved aside

Each checkpoint holds three items: "state" (the train state as a nested dict of arrays:
parameters, other model state such as BatchNorm statistics, optimizer state, step),
"loader" (the training data loader's JSON state, so the batch stream resumes exactly)
and "meta" (JSON: step, best validation accuracy so far, and a checksum of every array:
sums of its bit patterns as uint32, exact and immune to overflow, whatever the values).
orbax writes each step into a temporary directory and renames it when complete, so a
run killed mid-save leaves no half checkpoint behind.

Restoring tells three failures apart:
  * the saved arrays do not fit the state this config builds (names, shapes, dtypes in
    the checkpoint's metadata differ): StateMismatchError, nothing is moved (the config
    changed; train/workdir.py usually says so earlier);
  * the files are unreadable or the checksums differ (real corruption):
    CorruptCheckpointError; restore_latest moves that checkpoint to corrupt/ and tries
    the next newest (checkpoints/, then best/ as the last resort), and raises
    NoUsableCheckpointError when none is left rather than let the run start over;
  * the environment (permissions, a full disk, memory): the error itself, nothing moved.
After a handled failure, orbax's abandoned reads would print "Task exception was never
retrieved" and "Event loop is closed" tracebacks from its background threads; those are
silenced (only those).

The state is stored as a nested dict keyed by the pytree path (e.g.
state/params/layers/0/mixer/D), independent of the Python classes of the train state.
"""

import errno
import logging
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax

from train import sharding as sharding_lib

log = logging.getLogger(__name__)


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def tree_to_dict(tree) -> dict:
  """Nested dict {path component: ...: array} of the array leaves of a pytree."""
  out: dict = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [_key_name(k) for k in path]
    names = names[:-1] if len(names) > 1 and names[-1] == "value" else names  # nnx Variable
    node = out
    for name in names[:-1]:
      node = node.setdefault(name, {})
      if not isinstance(node, dict):
        raise ValueError(f"checkpoint path collision at {'/'.join(names)}")
    if names[-1] in node:
      raise ValueError(f"checkpoint path collision at {'/'.join(names)}")
    node[names[-1]] = leaf
  return out


def dict_to_tree(d: dict, like):
  """Inverse of tree_to_dict: the leaves of d in the structure of `like`."""
  leaves = []
  for path, _ in jax.tree_util.tree_flatten_with_path(like)[0]:
    names = [_key_name(k) for k in path]
    names = names[:-1] if len(names) > 1 and names[-1] == "value" else names
    node = d
    for name in names:
      node = node[name]
    leaves.append(node)
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)


# -- checksums ------------------------------------------------------------------------

def _as_uint32(x):
  """The bit patterns of x as uint32 (complex as its real and imaginary parts)."""
  if jnp.iscomplexobj(x):
    x = jnp.stack([x.real, x.imag], axis=-1)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = x.dtype.itemsize * 8
  if width == 64:
    return lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2)
  unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[width]
  return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _checksum_arrays(leaves):
  def one(x):
    u = _as_uint32(x)
    # Flat index without a reshape (which would gather a sharded array).
    flat, stride = jnp.zeros(u.shape, jnp.uint32), 1
    for axis in reversed(range(u.ndim)):
      flat = flat + lax.broadcasted_iota(jnp.uint32, u.shape, axis) * jnp.uint32(stride)
      stride *= u.shape[axis]
    # uint32 sums wrap around exactly: any order of summation gives the same bits.
    return jnp.stack([jnp.sum(u), jnp.sum(u * (2 * flat + 1))])
  return [one(x) for x in leaves]


def checksum(tree) -> list[list[int]]:
  """[sum of bits, position-weighted sum of bits] (mod 2**32) of every leaf.

  Exact (integer arithmetic on the bit patterns): equal arrays give equal checksums on
  any device count or sharding, NaN and inf included; a changed or moved value changes
  them. Cheap: one pass over the arrays on their devices.
  """
  leaves = jax.tree.leaves(tree)
  return [[int(a), int(b)] for a, b in jax.device_get(_checksum_arrays(leaves))]


@jax.jit
def _legacy_fingerprint(leaves):
  return [jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(jnp.float32)))])
          for x in leaves]


def _legacy_fingerprints_match(saved, state) -> bool:
  """Checkpoints written before the checksums: float32 [sum, sum of squares] per leaf
  (inf where that overflowed, which now matches itself)."""
  leaves = jax.tree.leaves(state)
  if len(saved) != len(leaves):
    return False
  got = np.asarray(jax.device_get(_legacy_fingerprint(leaves)), np.float64).reshape(-1, 2)
  want = np.asarray(saved, np.float64).reshape(-1, 2)
  with np.errstate(invalid="ignore"):
    return bool(np.all(np.isclose(got, want, rtol=1e-4, atol=1e-6, equal_nan=True)
                       | (np.isinf(got) & (got == want))))


def verify(meta: dict, state) -> bool:
  """Whether `state` matches the checksums in a checkpoint's meta (popping them)."""
  if "checksum" in meta:
    return meta.pop("checksum") == checksum(state)
  if "fingerprint" in meta:
    return _legacy_fingerprints_match(meta.pop("fingerprint"), state)
  return False


# -- errors -----------------------------------------------------------------------------

class CheckpointError(RuntimeError):
  """A checkpoint cannot be used; the message says which and what to do."""


class CorruptCheckpointError(CheckpointError):
  """Unreadable files, or arrays that fail their checksums."""


class StateMismatchError(CheckpointError):
  """The saved arrays do not fit the train state of this config."""


class NoUsableCheckpointError(CheckpointError):
  """The workdir had checkpoints, and none of them is readable."""


_ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EMFILE, errno.ENFILE,
                       errno.ENOMEM, errno.EIO, errno.EROFS}
_ENVIRONMENT_CODES = ("PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNAVAILABLE")  # tensorstore


def is_environmental(error: BaseException) -> bool:
  """Whether a failed read says more about the machine than about the files."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, MemoryError) or (isinstance(error, OSError)
                                          and error.errno in _ENVIRONMENT_ERRNOS):
      return True
    if any(code in str(error)[:200] for code in _ENVIRONMENT_CODES):
      return True
    error = error.__cause__ or error.__context__
  return False


# -- orbax's background noise -----------------------------------------------------------

class _ShortOrbaxErrors(logging.Filter):
  """One line per error orbax logs from its threads (a failed save logs each stage's
  traceback; the error that matters is raised to the trainer anyway)."""

  def filter(self, record):
    if record.levelno >= logging.ERROR and "orbax" in record.pathname:
      first = record.getMessage().strip().splitlines()[0]
      record.msg = first if len(first) <= 300 else first[:297] + "..."
      record.args, record.exc_info, record.exc_text = None, None, None
    return True


def shorten_orbax_errors() -> None:
  """Makes the errors orbax logs one line each (the command lines call it; --verbose
  keeps them whole)."""
  logger = logging.getLogger("absl")  # orbax logs through absl
  if not any(isinstance(f, _ShortOrbaxErrors) for f in logger.filters):
    logger.addFilter(_ShortOrbaxErrors())


_QUIET = False


def _loop_closed(exc) -> bool:
  return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


def _orbax_noise(obj, exc) -> bool:
  code = getattr(obj, "cr_code", None)
  return _loop_closed(exc) or (code is not None and "orbax" in code.co_filename)


class _AbandonedTasks(logging.Filter):
  def filter(self, record):
    return "exception was never retrieved" not in str(record.msg)[:200]


def quiet_abandoned_reads() -> None:
  """Silences what orbax's abandoned reads and writes print once a restore or save has
  failed: asyncio's "... exception was never retrieved" records, and "Event loop is
  closed" raised in callbacks of tensorstore's threads and in coroutines collected later.
  The failure itself is raised to the caller; other unraisable exceptions still print."""
  global _QUIET
  if _QUIET:
    return
  _QUIET = True
  logging.getLogger("asyncio").addFilter(_AbandonedTasks())
  unraisable, excepthook = sys.unraisablehook, sys.excepthook

  def unraisable_hook(u):
    if not _orbax_noise(u.object, u.exc_value):
      unraisable(u)

  def except_hook(kind, value, tb):  # C++ callbacks report their errors through it
    if not _loop_closed(value):
      excepthook(kind, value, tb)

  sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook


def _handlers():
  return dict(state=ocp.StandardCheckpointHandler(), loader=ocp.JsonCheckpointHandler(),
              meta=ocp.JsonCheckpointHandler())


def _flat_paths(tree) -> dict:
  """{"a/b/c": leaf} of a nested dict (or orbax's tree metadata)."""
  return {"/".join(_key_name(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def state_differences(saved, target) -> list[str]:
  """How the arrays of a checkpoint's metadata differ from the target's (nested dicts of
  leaves with .shape and .dtype); empty when the checkpoint fits."""
  saved, target = _flat_paths(saved), _flat_paths(target)
  order = lambda paths: sorted(paths, key=lambda p: (not p.startswith("params/"), p))  # noqa: E731
  out = [f"{p}: not in the checkpoint" for p in order(set(target) - set(saved))]
  out += [f"{p}: in the checkpoint only" for p in order(set(saved) - set(target))]
  for p in order(set(saved) & set(target)):
    a, b = saved[p], target[p]
    if tuple(a.shape) != tuple(b.shape) or np.dtype(a.dtype) != np.dtype(b.dtype):
      out.append(f"{p}: saved {tuple(a.shape)} {np.dtype(a.dtype)}, "
                 f"now {tuple(b.shape)} {np.dtype(b.dtype)}")
  return out


def _barriers(prefix: str):
  return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix)


class Checkpointer:
  """Saves and restores train states under a workdir (see the module docstring)."""

  def __init__(self, workdir: str, *, keep: int):
    self.workdir = os.path.abspath(workdir)
    self._opts = dict(create=True, enable_async_checkpointing=True)
    # Each manager's multi-process barriers get their own prefix: their keys are made of
    # the step, so the two managers saving one step would meet at the same barrier
    # ("Barrier _async_write_complete.N is already ongoing" under jax.distributed).
    self._latest = ocp.CheckpointManager(
        os.path.join(self.workdir, "checkpoints"), item_handlers=_handlers(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, **self._opts,
                                             multiprocessing_options=_barriers("latest")))
    self._best = ocp.CheckpointManager(
        os.path.join(self.workdir, "best"), item_handlers=_handlers(),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, **self._opts,
                                             multiprocessing_options=_barriers("best")))

  # -- saving ------------------------------------------------------------------------
  def _args(self, state, loader_state: dict, meta: dict):
    meta = dict(meta, checksum=checksum(state))
    return ocp.args.Composite(state=ocp.args.StandardSave(tree_to_dict(state)),
                              loader=ocp.args.JsonSave(loader_state),
                              meta=ocp.args.JsonSave(meta))

  def save(self, step: int, state, loader_state: dict, meta: dict) -> None:
    """A periodic or final checkpoint (asynchronous; the arrays are copied first)."""
    if step in self._latest.all_steps():
      return
    self._latest.save(step, args=self._args(state, loader_state, meta), force=True)

  def save_best(self, step: int, state, loader_state: dict, meta: dict) -> None:
    if step in self._best.all_steps():
      return
    self._best.save(step, args=self._args(state, loader_state, meta), force=True)

  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def wait(self) -> None:
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self._latest.close()
    self._best.close()

  # -- restoring ---------------------------------------------------------------------
  def _path(self, manager, step: int) -> str:
    return os.path.join(self.workdir, "best" if manager is self._best else "checkpoints",
                        str(step))

  def _restore_step(self, manager, step: int, abstract_state):
    """(state, loader_state, meta) of one checkpoint, or the error that says why not."""
    target = tree_to_dict(abstract_state)
    path = self._path(manager, step)
    try:
      saved = manager.item_metadata(step)["state"]
    except Exception as e:  # noqa: BLE001 -- unreadable metadata: the files are damaged
      if is_environmental(e):
        raise
      raise CorruptCheckpointError(f"{path}: metadata unreadable ({type(e).__name__}: "
                                   f"{str(e)[:200]})") from e
    if saved is None:
      raise CorruptCheckpointError(f"{path}: no state metadata")
    differences = state_differences(saved, target)
    if differences:
      more = f"; {len(differences) - 3} more" if len(differences) > 3 else ""
      raise StateMismatchError(
          f"checkpoint {path} holds a train state that does not fit this config "
          f"({'; '.join(differences[:3])}{more}); nothing was changed. Use a new --workdir "
          f"or --config.train.resume=restart, or the config the checkpoint was trained with")
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), loader=ocp.args.JsonRestore(),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 -- the arrays' files are damaged
      quiet_abandoned_reads()
      if is_environmental(e):
        raise
      root = e
      while root.__cause__ is not None:  # tensorstore's own words are at the bottom
        root = root.__cause__
      raise CorruptCheckpointError(f"{path}: unreadable ({type(root).__name__}: "
                                   f"{str(root).splitlines()[0][:200]})") from e
    state = dict_to_tree(restored["state"], abstract_state)
    meta = dict(restored["meta"])
    if not verify(meta, state):
      raise CorruptCheckpointError(f"{path}: the arrays' checksums differ from the saved ones")
    return state, dict(restored["loader"]), meta

  def restore(self, step: int, abstract_state, *, best: bool = False):
    """Restores one checkpoint (under checkpoints/, or best/ with best=True), with the
    checks and no fallback: any failure raises (CheckpointError for the file's problems).

    Returns:
      (state, loader_state, meta).
    """
    return self._restore_step(self._best if best else self._latest, step, abstract_state)

  def _candidates(self) -> list:
    """(step, manager): checkpoints/ newest first, then best/ as the last resort (a run
    killed before its first periodic checkpoint, or whose periodic ones are all corrupt)."""
    return ([(s, self._latest) for s in sorted(self._latest.all_steps(), reverse=True)]
            + [(s, self._best) for s in sorted(self._best.all_steps(), reverse=True)])

  def restore_latest(self, abstract_state):
    """Restores the newest usable checkpoint of checkpoints/ (else of best/); corrupt
    ones are moved to corrupt/ and the next one is tried.

    Args:
      abstract_state: the train state's structure with jax.ShapeDtypeStruct leaves
        carrying the target shardings.

    Returns:
      (step, state, loader_state, meta), or None when the workdir never held a checkpoint.

    Raises:
      StateMismatchError: the newest checkpoint does not fit abstract_state (nothing moved).
      NoUsableCheckpointError: every checkpoint is corrupt (all moved to corrupt/).
    """
    tried = []
    for step, manager in self._candidates():
      try:
        state, loader_state, meta = self._restore_step(manager, step, abstract_state)
      except CorruptCheckpointError as e:
        self._quarantine(manager, step, e)
        tried.append(step)
        continue
      return step, state, loader_state, meta
    corrupt = os.path.join(self.workdir, "corrupt")
    if tried or (os.path.isdir(corrupt) and os.listdir(corrupt)):
      raise NoUsableCheckpointError(
          f"no readable checkpoint left in {self.workdir} (the unreadable ones are in "
          f"{corrupt}); the run would start over, so it stops. Use "
          f"--config.train.resume=restart to start over (this run moves to previous/), or a "
          f"new --workdir")
    return None

  def _quarantine(self, manager, step: int, error: Exception) -> None:
    src = self._path(manager, step)
    name = f"{step}-{int(time.time())}" if manager is self._latest else f"best-{step}-{int(time.time())}"
    dst = os.path.join(self.workdir, "corrupt", name)
    log.warning("checkpoint at step %d is unreadable (%s); moving it to %s and trying "
                "the previous one", step, str(error)[:300], dst)
    if jax.process_index() == 0 and os.path.exists(src):
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.move(src, dst)
    sharding_lib.sync_processes(f"ssmlab_quarantine_{step}")  # the move is visible to all
    manager.reload()  # the manager caches the step list; re-read it
