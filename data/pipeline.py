"""Input pipeline on grain: an in-memory dataset and a deterministic, resumable, sharded loader.

    ds = ArrayDataset({"inputs": x_nl, "mask": m_nl, "targets": y_n})
    loader = make_loader(ds, batch_size=32, shuffle=True, seed=0, drop_remainder=True,
                         shard_options=grain.sharding.ShardByJaxProcess(), worker_count=2)
    batch = next(loader)                  # dict of NumPy arrays, plus "weights" (b,) float32
    state = loader.get_state()            # grain's iterator state and more: JSON
    loader.set_state(state)               # the same batches follow again

The loader is a grain pipeline whose elements are chunks of k consecutive batches
(about 1 MB, at most 16; `chunk`), each made by one vectorised gather:

    grain.MapDataset.range(num_chunks).map(_Chunks)   # chunk c -> batches ck .. ck+k-1
        .to_iter_dataset()
        ThreadPrefetchIterDataset                      # a prefetch thread (prefetch > 0), or
        .mp_prefetch(...)                              # worker processes (worker_count > 0)

and the Loader hands out the chunk's batches as views. Chunks because grain costs about
15-25 us per element in Python here (0.7 ms through worker processes), as much as a whole
small batch. grain owns the iteration, prefetching, worker processes and the iterator
state; the Loader's state is {"grain": grain's state before the current chunk, "skip":
batches of it already returned, "chunk": k}, so a resumed loader continues with exactly
the batches an uninterrupted one would give, with or without workers (the same number).

Order. Batch j of the stream is epoch e = j // batches_per_epoch, position p = j mod
batches_per_epoch. Epoch e visits the examples in the order `permutation(n)` drawn from
`np.random.default_rng([seed, e])` (or 0..n-1 without shuffling); shard s of S takes
every S-th index of that order, starting at s: the shards are disjoint and, without
drop_remainder, together cover every example exactly once; every shard yields the same
number of batches per epoch. Why not grain's own `MapDataset.shuffle`: its index shuffle
runs once per example from Python (5-19 us each on the 2-core development CPU: 32 of them
cost 4-15x what a whole batch of 32 costs here, results/input_pipeline_cpu.txt), whereas a
permutation per epoch is one vectorised call. It also keeps the order of earlier runs.

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
import sys
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

  @property
  def total_batches(self) -> int | None:
    return None if self.num_epochs is None else self.num_epochs * self.batches_per_epoch


_CHUNK_BYTES = 1 << 20  # about this many bytes of batches per grain element (1 MB: larger
# gathers fall out of the cache and get slower; smaller ones pay grain per batch)
_MAX_CHUNK = 16


def chunk_batches(dataset: ArrayDataset, batch_size: int) -> int:
  """Batches per grain element: about _CHUNK_BYTES of them, 1 to _MAX_CHUNK."""
  row = sum(a.nbytes for a in dataset.take(np.zeros(1, np.int64)).values())  # as batches hold it
  return int(min(_MAX_CHUNK, max(1, _CHUNK_BYTES // max(row * batch_size, 1))))


class _Chunks:
  """grain map transform: chunk c -> batches c*k .. c*k+k-1 of the stream, concatenated.

  One grain element carries k batches, so grain's per-element cost (about 15-25 us in
  Python here, 0.7 ms through worker processes) and the gather are paid once per k.
  """

  def __init__(self, plan: _Plan, k: int):
    self.plan, self.k = plan, k
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

  def _rows(self, batch: int) -> tuple[np.ndarray, int]:
    """(batch_size example indices of global batch `batch`, how many are real)."""
    p = self.plan
    epoch, position = divmod(batch, p.batches_per_epoch)
    indices = self.epoch_indices(epoch)
    rows = indices[position * p.batch_size:(position + 1) * p.batch_size]
    num_real = len(rows)
    if num_real < p.batch_size:  # pad with copies of the shard's first row (weight 0)
      fill = indices[0] if len(indices) else 0  # a shard of a tiny split may have no rows
      rows = np.concatenate([rows, np.full(p.batch_size - num_real, fill, rows.dtype)])
    return rows, num_real

  def __call__(self, chunk: int) -> dict[str, np.ndarray]:
    p = self.plan
    first = chunk * self.k
    last = first + self.k if p.total_batches is None else min(first + self.k, p.total_batches)
    parts = [self._rows(b) for b in range(first, last)]
    out = p.dataset.take(np.concatenate([rows for rows, _ in parts]))
    real = np.concatenate([np.arange(p.batch_size) < n for _, n in parts]).astype(np.float32)
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
    chunk: batches per grain element.
  """

  def __init__(self, plan: _Plan, prefetch: int, worker_count: int, chunk: int):
    import grain  # noqa: PLC0415 -- on first use: `import data` stays cheap
    self._plan = plan
    self.chunk = chunk
    self._worker_count = worker_count
    total = plan.total_batches
    num_chunks = sys.maxsize if total is None else -(-total // chunk)
    ds = grain.MapDataset.range(num_chunks).map(_Chunks(plan, chunk))
    ahead = -(-prefetch // chunk)  # grain elements prepared ahead
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if prefetch and not worker_count:  # one background thread, as cheap as grain offers
      it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=ahead)
    if worker_count:
      _ensure_absl_flags_parsed()
      it = it.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=worker_count, per_worker_buffer_size=max(1, ahead)))
    self._dataset = it
    self._iter = None
    self._pending = None  # a state set_state or close left, applied when iteration resumes
    self._buffer = None   # the current chunk: (arrays, batches in it)
    self._before = None   # grain's state before the current chunk
    self._taken = 0       # batches of the current chunk already returned

  @property
  def batches_per_epoch(self) -> int:
    return self._plan.batches_per_epoch

  @property
  def num_epochs(self) -> int | None:
    return self._plan.num_epochs

  def _iterator(self):
    if self._iter is None:
      self._iter = iter(self._dataset)
      if self._pending is not None:
        grain_state, skip = self._pending
        self._iter.set_state(grain_state)
        self._pending = None
        if skip:
          self._fetch()
          self._taken = skip
    return self._iter

  def _fetch(self) -> None:
    self._before = self._iter.get_state()
    arrays = next(self._iter)  # StopIteration ends a finite stream
    self._buffer = (arrays, len(arrays["weights"]) // self._plan.batch_size)
    self._taken = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    self._iterator()
    if self._buffer is None or self._taken == self._buffer[1]:
      self._fetch()
    arrays, _ = self._buffer
    b, j = self._plan.batch_size, self._taken
    self._taken += 1
    return {k: a[j * b:(j + 1) * b] for k, a in arrays.items()}  # views into the chunk

  def get_state(self) -> dict:
    """{"grain": grain's iterator state before the current chunk, "skip": batches of it
    already returned}: the position after the last batch __next__ returned (prefetched
    ones not counted); JSON-serialisable (saved in the checkpoint by ocp.args.JsonSave)."""
    if self._pending is not None:
      grain_state, skip = self._pending
    elif self._iter is None and not self._worker_count:  # nothing read yet
      grain_state, skip = {"next_index": 0}, 0
    elif self._buffer is None or self._taken == self._buffer[1]:
      grain_state, skip = self._iterator().get_state(), 0
    else:
      grain_state, skip = self._before, self._taken
    return {"grain": grain_state, "skip": int(skip), "chunk": self.chunk}

  def set_state(self, state: Mapping) -> None:
    """Continue from a state returned by get_state of an identically built loader (same
    dataset, batch size, seed, shards and worker_count). The {"epoch", "position"} state of
    the loader before grain (older checkpoints) is accepted without workers."""
    if not isinstance(state, Mapping):
      raise ValueError(f"loader state must be a dict (Loader.get_state()), got {state!r}")
    state = dict(state)
    if set(state) == {"epoch", "position"}:
      state = self._from_position(state)
    if set(state) != {"grain", "skip", "chunk"} or not isinstance(state["grain"], Mapping):
      raise ValueError(f"loader state must have the keys 'grain', 'skip' and 'chunk' "
                       f"(Loader.get_state()), got {state!r}")
    skip, chunk = state["skip"], state["chunk"]
    if chunk != self.chunk:
      raise ValueError(f"loader state was saved with {chunk} batches per grain element, this "
                       f"loader makes {self.chunk} (another dataset or batch size?)")
    if isinstance(skip, bool) or not isinstance(skip, (int, np.integer)) or not 0 <= skip < chunk:
      raise ValueError(f"loader state skip must be an int in [0, {chunk}), got {skip!r}")
    # In process, grain's state is {"next_index"}; with workers, one per worker and more.
    if (set(state["grain"]) == {"next_index"}) != (self._worker_count == 0):
      raise ValueError(f"loader state's grain state {state['grain']!r} does not fit a loader "
                       f"with {self._worker_count} worker processes (saved with another "
                       "config.train.data_workers?)")
    v = state["grain"].get("next_index", 0)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
      raise ValueError(f"loader state next_index must be a non-negative int, got {v!r}")
    self.close()
    self._pending = (dict(state["grain"]), int(skip))

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
    chunk, skip = divmod(int(epoch) * per_epoch + int(position), self.chunk)
    return {"grain": {"next_index": chunk}, "skip": skip, "chunk": self.chunk}

  def close(self) -> None:
    """Stop grain's prefetch threads and worker processes; a later __next__ restarts them
    from the current state."""
    if self._iter is not None:
      state = self.get_state()
      close = getattr(self._iter, "close", None)
      if close is not None:
        close()
      self._iter, self._buffer = None, None
      self._pending = (state["grain"], state["skip"])

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def make_loader(dataset: ArrayDataset, *, batch_size: int, shuffle: bool, seed: int,
                drop_remainder: bool, shard_index: int = 0, shard_count: int = 1,
                shard_options: grain.sharding.ShardOptions | None = None,
                prefetch: int = 2, worker_count: int = 0,
                num_epochs: int | None | str = "auto", chunk: int | None = None) -> Loader:
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
  if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer))
                            or chunk < 1):
    raise ValueError(f"chunk must be None or a positive int, got {chunk!r}")
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
  return Loader(plan, int(prefetch), int(worker_count),
                chunk_batches(dataset, batch_size) if chunk is None else int(chunk))
