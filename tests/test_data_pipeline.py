"""ArrayDataset and the grain loader: coverage per epoch across shards, padding, resumption
(grain's iterator state, with and without worker processes), prefetch."""

import json

import chex
import numpy as np
import pytest

from data.pipeline import ArrayDataset, make_loader


def dataset(n, width=3):
  """Row i holds i everywhere, so a batch tells which examples it carries."""
  idx = np.arange(n)
  return ArrayDataset({"idx": idx, "x": np.repeat(idx[:, None], width, 1).astype(np.int32),
                       "mask": np.ones((n, width), bool)})


def take(loader, count):
  return [b for _, b in zip(range(count), loader)]


def ids(batches):
  return [b["idx"].tolist() for b in batches]


# ArrayDataset

def test_dataset_holds_arrays_with_a_common_leading_dim():
  ds = ArrayDataset({"a": [[1, 2], [3, 4]], "b": np.zeros(2)})
  assert len(ds) == 2 and set(ds.keys()) == {"a", "b"} and "a" in ds
  np.testing.assert_array_equal(ds.take([1])["a"], [[3, 4]])


@pytest.mark.parametrize("arrays,match", [
    ({}, "non-empty"),
    ({"a": np.zeros(3), "b": np.zeros((4, 2))}, "leading dimension.*'a': 3.*'b': 4"),
    ({"a": np.float32(1)}, "scalar"),
    ({"a": np.array([None, 1])}, "object"),
    ({1: np.zeros(3)}, "strings"),
])
def test_dataset_rejects_bad_arrays(arrays, match):
  with pytest.raises(ValueError, match=match):
    ArrayDataset(arrays)


# Eval loaders: one pass, padded, every example exactly once across shards.

@pytest.mark.parametrize("n,batch,shards", [(23, 4, 3), (8, 4, 1), (5, 4, 2), (2, 3, 4)])
def test_eval_pass_covers_every_example_once_across_shards(n, batch, shards):
  seen, lengths = [], set()
  for s in range(shards):
    loader = make_loader(dataset(n), batch_size=batch, shuffle=False, seed=0,
                         drop_remainder=False, shard_index=s, shard_count=shards)
    batches = list(loader)
    lengths.add(len(batches))
    assert len(batches) == loader.batches_per_epoch
    for b in batches:
      assert b["x"].shape == (batch, 3) and b["weights"].dtype == np.float32
      w = b["weights"]
      assert set(np.unique(w)) <= {0.0, 1.0}
      num_real = int(w.sum())
      assert (w[:num_real] == 1).all() and (w[num_real:] == 0).all()  # padding last
      assert b["mask"].all()  # padding rows are copies of real rows, never empty
      seen += b["idx"][w == 1].tolist()
  assert len(lengths) == 1  # every host runs the same number of eval steps
  assert sorted(seen) == list(range(n))


def test_eval_loader_stays_exhausted_and_reports_its_end():
  for prefetch in (0, 2):
    loader = make_loader(dataset(5), batch_size=2, shuffle=False, seed=0, drop_remainder=False,
                         prefetch=prefetch)
    assert ids(loader) == [[0, 1], [2, 3], [4, 0]]  # padded with a copy of the shard's first row
    assert list(loader) == []
    two_in = make_loader(dataset(5), batch_size=2, shuffle=False, seed=0, drop_remainder=False)
    take(two_in, 2)
    loader.set_state(two_in.get_state())
    assert ids(loader) == [[4, 0]]


def test_dataset_weights_multiply_the_padding_weights():
  ds = ArrayDataset({"idx": np.arange(3), "weights": np.array([0.5, 1.0, 2.0])})
  (b0, b1) = list(make_loader(ds, batch_size=2, shuffle=False, seed=0, drop_remainder=False))
  np.testing.assert_array_equal(b0["weights"], [0.5, 1.0])
  np.testing.assert_array_equal(b1["weights"], [2.0, 0.0])


# Train loaders: infinite, sharded, reshuffled every epoch.

def test_train_epochs_partition_the_data_across_shards_and_reshuffle():
  n, batch, shards = 24, 4, 3
  per_epoch = n // shards // batch  # 2
  streams = [take(make_loader(dataset(n), batch_size=batch, shuffle=True, seed=7,
                              drop_remainder=True, shard_index=s, shard_count=shards),
                  3 * per_epoch) for s in range(shards)]
  epochs = []
  for e in range(3):
    rows = [i for st in streams for b in st[e * per_epoch:(e + 1) * per_epoch]
            for i in b["idx"].tolist()]
    assert sorted(rows) == list(range(n))  # n divisible: every example exactly once
    assert all((b["weights"] == 1).all() for st in streams for b in st)
    epochs.append(rows)
  assert epochs[0] != epochs[1] != epochs[2]


def test_train_epoch_drops_the_same_count_on_every_shard():
  n, batch, shards = 26, 3, 4  # 26 // 4 = 6 per shard, 2 batches each; 2 examples dropped
  rows = []
  for s in range(shards):
    loader = make_loader(dataset(n), batch_size=batch, shuffle=True, seed=1,
                         drop_remainder=True, shard_index=s, shard_count=shards)
    assert loader.batches_per_epoch == 2
    rows += [i for b in take(loader, 2) for i in b["idx"].tolist()]
  assert len(rows) == len(set(rows)) == 24


def test_order_is_a_function_of_the_seed():
  def stream(seed):
    return ids(take(make_loader(dataset(20), batch_size=5, shuffle=True, seed=seed,
                                drop_remainder=True), 8))
  assert stream(0) == stream(0)
  assert stream(0) != stream(1)
  unshuffled = ids(take(make_loader(dataset(20), batch_size=5, shuffle=False, seed=0,
                                    drop_remainder=True), 5))
  assert unshuffled[4] == unshuffled[0] == [0, 1, 2, 3, 4]


# Resumption.

@pytest.mark.parametrize("consumed", [0, 3, 4, 6, 9])  # 4 batches per epoch: edges and middles
@pytest.mark.parametrize("prefetch", [0, 3])
@pytest.mark.parametrize("chunk", [1, 3, None])  # batches per grain element (None: auto, 16)
def test_set_state_resumes_the_identical_stream(consumed, prefetch, chunk):
  def new():
    return make_loader(dataset(17), batch_size=4, shuffle=True, seed=3, drop_remainder=True,
                       prefetch=prefetch, chunk=chunk)
  reference = take(new(), consumed + 6)
  first = new()
  take(first, consumed)
  state = json.loads(json.dumps(first.get_state()))  # as the checkpoint stores it
  if chunk == 1:  # grain's own state counts the batches (prefetched ones not counted)
    assert state == {"grain": {"next_index": consumed}, "skip": 0, "chunk": 1}
  resumed = new()
  resumed.set_state(state)
  chex.assert_trees_all_equal(take(resumed, 6), reference[consumed:])  # every array, exactly
  # And rewinding a running loader (its prefetch thread has run ahead).
  take(first, 5)
  first.set_state(state)
  chex.assert_trees_all_equal(take(first, 6), reference[consumed:])


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume_exactly():
  """Given 2 grain worker processes, the stream equals the in-process one, and a state
  saved mid-stream (JSON) resumes to the same batches in a new loader."""
  def new(workers):
    return make_loader(dataset(40), batch_size=4, shuffle=True, seed=5, drop_remainder=True,
                       worker_count=workers)
  reference = take(new(0), 14)
  with new(2) as loader:
    chex.assert_trees_all_equal(take(loader, 7), reference[:7])
    state = json.loads(json.dumps(loader.get_state()))
  with new(2) as resumed:
    resumed.set_state(state)
    chex.assert_trees_all_equal(take(resumed, 7), reference[7:])
  with pytest.raises(ValueError, match="worker processes"):
    new(0).set_state(state)


def test_the_state_before_grain_still_resumes():
  """Checkpoints of the earlier loader hold {"epoch", "position"}: the same batch follows."""
  def new():
    return make_loader(dataset(17), batch_size=4, shuffle=True, seed=3, drop_remainder=True)
  reference = take(new(), 9)
  loader = new()
  loader.set_state({"epoch": 1, "position": 2})
  chex.assert_trees_all_equal(take(loader, 3), reference[6:])
  loader.set_state({"epoch": 0, "position": 4})  # the end of an epoch is the next one
  chex.assert_trees_all_equal(next(loader), reference[4])


def test_order_matches_the_loader_before_grain():
  """Epoch e is permutation(n) of default_rng([seed, e]), shard s every S-th of it."""
  n, batch, shards, seed = 26, 3, 2, 4
  for s in range(shards):
    got = ids(take(make_loader(dataset(n), batch_size=batch, shuffle=True, seed=seed,
                               drop_remainder=True, shard_index=s, shard_count=shards), 8))
    want = []
    for e in range(2):
      order = np.random.default_rng([seed, e]).permutation(n)[s::shards]
      want += [order[i * batch:(i + 1) * batch].tolist() for i in range(4)]
    assert got == want


def test_grain_shard_options():
  import grain
  opts = grain.sharding.ShardOptions(shard_index=1, shard_count=2)
  a = make_loader(dataset(8), batch_size=2, shuffle=False, seed=0, drop_remainder=True,
                  shard_options=opts)
  assert ids(take(a, 2)) == [[1, 3], [5, 7]]
  b = make_loader(dataset(8), batch_size=2, shuffle=False, seed=0, drop_remainder=True,
                  shard_options=grain.sharding.ShardByJaxProcess())
  assert ids(take(b, 1)) == [[0, 1]]  # one process: the whole data


GOOD = {"grain": {"next_index": 1}, "skip": 0, "chunk": 2}


@pytest.mark.parametrize("state,match", [
    ([3], "must be a dict"),
    ({"epoch": 0}, "keys"),
    (dict(GOOD, grain={"next_index": -1}), "non-negative"),
    (dict(GOOD, grain={"next_index": 1.5}), "non-negative int"),
    (dict(GOOD, grain={"workers": []}), "worker processes"),
    (dict(GOOD, skip=2), "skip must be"),
    (dict(GOOD, chunk=3), "3 batches per grain element"),
    ({"epoch": -1, "position": 0}, "non-negative"),
    ({"epoch": 0, "position": 5}, "exceeds"),
])
def test_bad_state_fails_clearly(state, match):
  loader = make_loader(dataset(8), batch_size=4, shuffle=True, seed=0, drop_remainder=True,
                       chunk=2)
  loader.set_state(GOOD)  # the shape of a good one
  with pytest.raises(ValueError, match=match):
    loader.set_state(state)


# Prefetch and errors.

def test_close_stops_prefetching_and_next_continues():
  with make_loader(dataset(64), batch_size=2, shuffle=False, seed=0, drop_remainder=True,
                   prefetch=2) as loader:
    assert ids(take(loader, 2)) == [[0, 1], [2, 3]]
    loader.close()
    assert ids(take(loader, 1)) == [[4, 5]]  # restarted from the state at close


def test_errors_in_the_pipeline_reach_the_caller():
  class Broken(ArrayDataset):
    def take(self, indices):
      raise OSError("disk gone")

  for prefetch in (0, 2):
    loader = make_loader(Broken({"a": np.zeros(4)}), batch_size=2, shuffle=False, seed=0,
                         drop_remainder=True, prefetch=prefetch, chunk=1)  # no probe read
    with pytest.raises(OSError, match="disk gone"):
      next(loader)


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_size=0), "batch_size"),
    (dict(seed=-1), "seed"),
    (dict(shard_index=2, shard_count=2), "shard_index"),
    (dict(prefetch=-1), "prefetch"),
    (dict(worker_count=-1), "worker_count"),
    (dict(chunk=0), "chunk"),
    (dict(batch_size=5, shard_count=2), "no full batch"),
])
def test_bad_loader_arguments_fail_clearly(kwargs, match):
  args = dict(batch_size=2, shuffle=True, seed=0, drop_remainder=True)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    make_loader(dataset(8), **args)
  with pytest.raises(ValueError, match="empty"):
    make_loader(ArrayDataset({"a": np.zeros(0)}), batch_size=1, shuffle=False, seed=0,
                drop_remainder=False)


def test_num_epochs_overrides_the_default_passes():
  loader = make_loader(dataset(3), batch_size=2, shuffle=False, seed=0, drop_remainder=False,
                       num_epochs=2)
  assert ids(loader) == [[0, 1], [2, 0], [0, 1], [2, 0]]
  loader = make_loader(dataset(4), batch_size=2, shuffle=True, seed=0, drop_remainder=True,
                       num_epochs=1)
  assert sorted(sum(ids(loader), [])) == [0, 1, 2, 3]
  with pytest.raises(ValueError, match="num_epochs"):
    make_loader(dataset(4), batch_size=2, shuffle=True, seed=0, drop_remainder=True, num_epochs="all")
