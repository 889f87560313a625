"""Input pipeline on grain: an in-memory dataset and a deterministic, resumable, sharded loader.

    ds = ArrayDataset({"inputs": x_nl, "mask": m_nl, "targets": y_n})
    loader = make_loader(ds, batch_size=32, shuffle=True, seed=0, drop_remainder=True,
                         shard_options=grain.sharding.ShardByJaxProcess(), worker_count=2)
    batch = next(loader)                  # dict of NumPy arrays, plus "weights" (b,) float32
    state = loader.get_state()            # grain's iterator state: JSON (the checkpoint's)
    loader.set_state(state)               # the same batches follow again

The loader is a grain pipeline whose elements are whole batches:

    grain.MapDataset.range(batches_per_epoch).repeat(num_epochs)
        .map_with_index(_Batches)          # global batch index -> one batch (vectorised)
        .to_iter_dataset(ReadOptions)      # prefetch threads (prefetch > 0)
        .mp_prefetch(...)                  # worker processes (worker_count > 0)

grain owns the iteration, prefetching, worker processes and the iterator state, so a
resumed loader continues with exactly the batches an uninterrupted one would give,
with or without workers (same worker_count).

Order. Batch j of the stream is epoch e = j // batches_per_epoch, position p = j mod
batches_per_epoch. Epoch e visits the examples in the order `permutation(n)` drawn from
`np.random.default_rng([seed, e])` (or 0..n-1 without shuffling); shard s of S takes
every S-th index of that order, starting at s: the shards are disjoint and, without
drop_remainder, together cover every example exactly once; every shard yields the same
number of batches per epoch. Why not grain's own `MapDataset.shuffle`: its index shuffle
runs once per example in Python (5-19 us each on the 2-core development CPU, at least 10x
today's whole per-batch budget, results/input_pipeline_cpu.txt), whereas a permutation
per epoch is one vectorised call and each batch one NumPy gather. It also keeps the order
of earlier runs.

Passes. drop_remainder=True: infinite (epoch after epoch); each epoch first drops n mod S
examples so the shards are equal, then the last incomplete batch. drop_remainder=False:
one pass, the last batch padded to full size with copies of a real row whose weight is 0
(copies, not zeros, so no padding row is an all-masked sequence that could make a mean
pool divide by zero). `num_epochs` overrides either default.

Workers. worker_count > 0 runs the batch function in that many spawned processes (each
gets a pickled copy of the dataset); they need absl flags parsed (done here when the
caller has not) and a `__main__` guard in the launching script (the trainer has one).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping

import numpy as np


class ArrayDataset:
  """A dict of NumPy arrays sharing their leading (example) dimension.

  Args:
    arrays: name -> array of shape (n, ...); at least one entry; names are strings.

  Raises:
    ValueError: if arrays is empty, a value is a scalar or an object array, or the
      leading dimensions differ.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    if not isinstance(arrays, Mapping) or not arrays:
      raise ValueError("ArrayDataset needs a non-empty dict of name -> array")
    converted = {}
    for name, value in arrays.items():
      if not isinstance(name, str):
        raise ValueError(f"ArrayDataset keys must be strings, got {name!r}")
      array = np.asarray(value)
      if array.ndim == 0:
        raise ValueError(f"ArrayDataset array {name!r} is a scalar; arrays need a leading example axis")
      if array.dtype == object:
        raise ValueError(f"ArrayDataset array {name!r} has dtype object; use numeric or bool arrays")
      converted[name] = array
    lengths = {name: a.shape[0] for name, a in converted.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"ArrayDataset arrays must share their leading dimension, got {lengths}")
    self._arrays = converted
    self._len = next(iter(lengths.values()))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, name: str) -> np.ndarray:
    return self._arrays[name]

  def __contains__(self, name) -> bool:
    return name in self._arrays

  def keys(self):
    return self._arrays.keys()

  def items(self):
    return self._arrays.items()

  def take(self, indices) -> dict[str, np.ndarray]:
    """Rows `indices` (1-D int array) of every array, as a new dict."""
    indices = np.asarray(indices)
    return {name: a[indices] for name, a in self._arrays.items()}

  def __repr__(self) -> str:
    fields = ", ".join(f"{k}: {a.dtype}{list(a.shape)}" for k, a in self._arrays.items())
    return f"ArrayDataset(n={self._len}, {fields})"


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Everything that decides the batch stream (pickled into grain's worker processes)."""

  dataset: ArrayDataset
  batch_size: int
  shuffle: bool
  seed: int
  drop_remainder: bool
  shard_index: int
  shard_count: int
  num_epochs: int | None  # None: infinite

  @property
  def batches_per_epoch(self) -> int:
    n = len(self.dataset)
    if self.drop_remainder:
      return (n // self.shard_count) // self.batch_size
    return math.ceil(math.ceil(n / self.shard_count) / self.batch_size)


class _Batches:
  """grain map_with_index transform: global batch index -> the batch (dict of arrays)."""

  def __init__(self, plan: _Plan):
    self.plan = plan
    self._epoch = None  # (epoch, its indices): drawn once, used by all its batches

  def epoch_indices(self, epoch: int) -> np.ndarray:
    """This shard's example indices for one epoch, in visiting order."""
    if self._epoch is None or self._epoch[0] != epoch:
      self._epoch = (epoch, self._draw(epoch))
    return self._epoch[1]

  def _draw(self, epoch: int) -> np.ndarray:
    p = self.plan
    n = len(p.dataset)
    order = np.random.default_rng([p.seed, epoch]).permutation(n) if p.shuffle else np.arange(n)
    if p.drop_remainder:
      order = order[: (n // p.shard_count) * p.shard_count]
    return order[p.shard_index::p.shard_count]

  def __call__(self, index: int, position: int) -> dict[str, np.ndarray]:
    p = self.plan
    indices = self.epoch_indices(index // p.batches_per_epoch)
    rows = indices[position * p.batch_size:(position + 1) * p.batch_size]
    num_real = len(rows)
    if num_real < p.batch_size:
      fill = indices[0] if len(indices) else 0
      rows = np.concatenate([rows, np.full(p.batch_size - num_real, fill, rows.dtype)])
    out = p.dataset.take(rows)
    real = (np.arange(p.batch_size) < num_real).astype(np.float32)
    if "weights" in out:
      real = real * out["weights"].astype(np.float32)
    out["weights"] = real
    return out


def _ensure_absl_flags_parsed():
  # grain reads its absl flags when it starts workers; a library caller (a test, a
  # notebook) has not parsed any: take the defaults.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class Loader(Iterator):
  """Iterator over batches (dicts of NumPy arrays) on a grain pipeline; see the module docstring.

  Attributes:
    batches_per_epoch: batches this shard yields per epoch (the same on every shard).
    num_epochs: passes over the data (None: infinite).
  """

  def __init__(self, plan: _Plan, prefetch: int, worker_count: int):
    import grain  # noqa: PLC0415 -- on first use: `import data` stays cheap
    self._plan = plan
    self._prefetch = prefetch
    self._worker_count = worker_count
    ds = grain.MapDataset.range(plan.batches_per_epoch).repeat(plan.num_epochs)
    ds = ds.map_with_index(_Batches(plan))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if prefetch else 0,
                                              prefetch_buffer_size=prefetch))
    if worker_count:
      _ensure_absl_flags_parsed()
      it = it.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=worker_count, per_worker_buffer_size=max(prefetch, 1)))
    self._dataset = it
    self._iter = None
    self._state = None  # a state to apply when the grain iterator is (re)made

  @property
  def batches_per_epoch(self) -> int:
    return self._plan.batches_per_epoch

  @property
  def num_epochs(self) -> int | None:
    return self._plan.num_epochs

  def _iterator(self):
    if self._iter is None:
      self._iter = iter(self._dataset)
      if self._state is not None:
        self._iter.set_state(self._state)
    return self._iter

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator())

  def get_state(self) -> dict:
    """grain's state after the last batch __next__ returned (prefetched ones not counted);
    JSON-serialisable (saved in the checkpoint with ocp.args.JsonSave)."""
    return self._iterator().get_state()

  def set_state(self, state: Mapping) -> None:
    """Continue from a state returned by get_state of an identically built loader (same
    dataset, batch size, seed, shards and worker_count). The {"epoch", "position"} state of
    the loader before grain (older checkpoints) is accepted without workers."""
    if not isinstance(state, Mapping):
      raise ValueError(f"loader state must be a dict (Loader.get_state()), got {state!r}")
    state = dict(state)
    if set(state) == {"epoch", "position"}:
      state = self._from_position(state)
    expected = set(self._iterator().get_state())
    if set(state) != expected:
      raise ValueError(f"loader state has keys {sorted(state)}, this loader's have "
                       f"{sorted(expected)} (saved with another worker_count?)")
    if "next_index" in state:
      v = state["next_index"]
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"loader state next_index must be a non-negative int, got {v!r}")
    self._state = state
    self._iterator().set_state(state)

  def _from_position(self, state: dict) -> dict:
    epoch, position = state["epoch"], state["position"]
    per_epoch = self._plan.batches_per_epoch
    for name, v in (("epoch", epoch), ("position", position)):
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"loader state {name} must be a non-negative int, got {v!r}")
    if position > per_epoch:
      raise ValueError(f"loader state position {position} exceeds the {per_epoch} batches per epoch")
    if self._worker_count:
      raise ValueError("an {epoch, position} loader state (a checkpoint from before grain) "
                       "resumes only with config.train.data_workers=0")
    return {"next_index": int(epoch) * per_epoch + int(position)}

  def close(self) -> None:
    """Stop grain's prefetch threads and worker processes; a later __next__ restarts them
    from the current state."""
    if self._iter is not None:
      self._state = self._iter.get_state()
      close = getattr(self._iter, "close", None)
      if close is not None:
        close()
      self._iter = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def make_loader(dataset: ArrayDataset, *, batch_size: int, shuffle: bool, seed: int,
                drop_remainder: bool, shard_index: int = 0, shard_count: int = 1,
                shard_options: grain.sharding.ShardOptions | None = None,
                prefetch: int = 2, worker_count: int = 0,
                num_epochs: int | None | str = "auto") -> Loader:
  """A batch iterator over this host's shard of `dataset`.

  Args:
    dataset: an ArrayDataset (a Mapping of arrays is wrapped).
    batch_size: examples per batch on this shard (per host).
    shuffle: reshuffle every epoch from (seed, epoch).
    seed: non-negative int.
    drop_remainder: drop incomplete batches (train); otherwise pad the last batch
      with weight-0 rows (eval).
    shard_index, shard_count: this host's shard, e.g. jax.process_index(), jax.process_count().
    shard_options: a grain ShardOptions instead (e.g. grain.sharding.ShardByJaxProcess());
      its drop_remainder is not used (drop_remainder above decides).
    prefetch: batches prepared ahead (by a grain thread, or per worker process); 0 = none.
    worker_count: grain worker processes preparing batches; 0 = in this process.
    num_epochs: passes over the data; None = infinite; "auto" = infinite with
      drop_remainder, a single pass without.

  Returns:
    A Loader; every batch holds the dataset's arrays (leading dim batch_size) and
    "weights" (batch_size,) float32 (1 real row, 0 padding; times the dataset's own
    "weights" if it has them).
  """
  if not isinstance(dataset, ArrayDataset):
    dataset = ArrayDataset(dataset)
  if shard_options is not None:
    shard_index, shard_count = shard_options.shard_index, shard_options.shard_count
  for name, v in (("batch_size", batch_size), ("shard_count", shard_count)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name} must be a positive int, got {v!r}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}")
  if not isinstance(shard_index, (int, np.integer)) or not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index!r}")
  for name, v in (("prefetch", prefetch), ("worker_count", worker_count)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
      raise ValueError(f"{name} must be a non-negative int, got {v!r}")
  if isinstance(num_epochs, str) and num_epochs == "auto":
    num_epochs = None if drop_remainder else 1
  if num_epochs is not None and (isinstance(num_epochs, bool) or not isinstance(num_epochs, (int, np.integer))
                                 or num_epochs < 0):
    raise ValueError(f"num_epochs must be 'auto', None or a non-negative int, got {num_epochs!r}")
  if len(dataset) == 0:
    raise ValueError("cannot make a loader over an empty dataset")
  plan = _Plan(dataset, int(batch_size), bool(shuffle), int(seed), bool(drop_remainder),
               int(shard_index), int(shard_count), None if num_epochs is None else int(num_epochs))
  if plan.batches_per_epoch == 0:
    raise ValueError(
        f"{len(dataset)} examples over {shard_count} shard(s) make no full batch of {batch_size} "
        "with drop_remainder=True; lower batch_size or use drop_remainder=False")
  return Loader(plan, int(prefetch), int(worker_count))
