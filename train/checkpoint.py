"""Checkpoints with orbax: periodic + final, keep-last-N plus the best, corruption fallback.

Layout under the workdir:

  checkpoints/<step>/   the latest config.train.keep_checkpoints checkpoints
  best/<step>/          the one with the best validation accuracy so far
  corrupt/<step>-<t>/   checkpoints found unreadable at start, moved aside

Each checkpoint holds three items: "state" (the train state as a nested dict of arrays:
parameters, other model state such as BatchNorm statistics, optimizer state, step),
"loader" (the training data loader's JSON state, so the batch stream resumes exactly)
and "meta" (JSON: step, best validation accuracy so far, and a fingerprint of every
array: its float32 sum and sum of squares). Restoring re-checks the fingerprint, so a
checkpoint whose bytes changed is caught even when the file format still parses; a
checkpoint that fails to restore or to verify is logged, moved to corrupt/ and the
previous one is tried. orbax writes each step into a temporary directory and renames
it when complete, so a run killed mid-save leaves no half checkpoint behind.

The state is stored as a nested dict keyed by the pytree path (e.g.
state/params/layers/0/mixer/D), independent of the Python classes of the train state.
"""

import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

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


@jax.jit
def _fingerprint_arrays(leaves):
  def one(x):
    x = x.astype(jnp.float32)
    return jnp.stack([jnp.sum(x), jnp.sum(x * x)])
  return [one(x) for x in leaves]


def fingerprint(tree) -> list[list[float]]:
  """[sum, sum of squares] in float32 of every leaf: cheap evidence of unchanged bytes."""
  leaves = jax.tree.leaves(tree)
  return [[float(a), float(b)] for a, b in jax.device_get(_fingerprint_arrays(leaves))]


def _fingerprints_match(a, b, rtol=1e-4) -> bool:
  if len(a) != len(b):
    return False
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = np.maximum(np.abs(a), np.abs(b))
  ok = np.abs(a - b) <= rtol * scale + 1e-6
  return bool(np.all(ok))


class CorruptCheckpointError(RuntimeError):
  pass


class Checkpointer:
  """Saves and restores train states under a workdir (see the module docstring)."""

  def __init__(self, workdir: str, *, keep: int):
    self.workdir = os.path.abspath(workdir)
    self._opts = dict(create=True, enable_async_checkpointing=True)
    self._latest = ocp.CheckpointManager(
        os.path.join(self.workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, **self._opts))
    self._best = ocp.CheckpointManager(
        os.path.join(self.workdir, "best"),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, **self._opts))

  # -- saving ------------------------------------------------------------------------
  def _args(self, state, loader_state: dict, meta: dict):
    meta = dict(meta, fingerprint=fingerprint(state))
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
  def _restore_step(self, manager, step: int, abstract_state):
    target = tree_to_dict(abstract_state)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), loader=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    state = dict_to_tree(restored["state"], abstract_state)
    meta = dict(restored["meta"])
    if not _fingerprints_match(meta.pop("fingerprint", []), fingerprint(state)):
      raise CorruptCheckpointError("array fingerprints differ from the saved ones")
    return state, dict(restored["loader"]), meta

  def restore(self, step: int, abstract_state, *, best: bool = False):
    """Restores one checkpoint (under checkpoints/, or best/ with best=True), with the
    fingerprint check and no fallback: any failure raises.

    Returns:
      (state, loader_state, meta).
    """
    return self._restore_step(self._best if best else self._latest, step, abstract_state)

  def restore_latest(self, abstract_state):
    """Restores the newest readable checkpoint; unreadable ones are moved to corrupt/.

    Args:
      abstract_state: the train state's structure with jax.ShapeDtypeStruct leaves
        carrying the target shardings.

    Returns:
      (step, state, loader_state, meta) or None when there is no usable checkpoint.
    """
    for step in sorted(self._latest.all_steps(), reverse=True):
      try:
        state, loader_state, meta = self._restore_step(self._latest, step, abstract_state)
      except Exception as e:  # noqa: BLE001 -- any failure means: not usable
        self._quarantine(step, e)
        continue
      return step, state, loader_state, meta
    return None

  def _quarantine(self, step: int, error: Exception) -> None:
    src = os.path.join(self.workdir, "checkpoints", str(step))
    dst = os.path.join(self.workdir, "corrupt", f"{step}-{int(time.time())}")
    log.warning("checkpoint at step %d is unreadable (%s: %s); moving it to %s and trying "
                "the previous one", step, type(error).__name__, str(error)[:300], dst)
    if jax.process_index() == 0 and os.path.exists(src):
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.move(src, dst)
    if jax.process_count() > 1:  # the others wait until the move is visible
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"ssmlab_quarantine_{step}")
    # The manager caches the step list; re-read it.
    self._latest.reload()
