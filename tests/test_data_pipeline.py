"""ArrayDataset and the loader: coverage per epoch across shards, padding, resumption, threads."""

import gc
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
    assert list(loader) == [] and loader.get_state() == {"epoch": 1, "position": 0}
    loader.set_state({"epoch": 0, "position": 2})
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
def test_set_state_resumes_the_identical_stream(consumed, prefetch):
  def new():
    return make_loader(dataset(17), batch_size=4, shuffle=True, seed=3, drop_remainder=True,
                       prefetch=prefetch)
  reference = take(new(), consumed + 6)
  first = new()
  take(first, consumed)
  state = json.loads(json.dumps(first.get_state()))
  assert state == {"epoch": consumed // 4, "position": consumed % 4}
  resumed = new()
  resumed.set_state(state)
  chex.assert_trees_all_equal(take(resumed, 6), reference[consumed:])  # every array, exactly
  # And rewinding a running loader (its prefetch thread has run ahead).
  take(first, 5)
  first.set_state(state)
  chex.assert_trees_all_equal(take(first, 6), reference[consumed:])


def test_state_at_the_end_of_an_epoch_is_the_next_epoch():
  loader = make_loader(dataset(8), batch_size=4, shuffle=True, seed=0, drop_remainder=True)
  a = ids(take(loader, 4))
  loader.set_state({"epoch": 0, "position": 2})
  assert loader.get_state() == {"epoch": 1, "position": 0}
  assert ids(take(loader, 2)) == a[2:]


@pytest.mark.parametrize("state,match", [
    ({"epoch": 0}, "keys"),
    ({"epoch": -1, "position": 0}, "non-negative"),
    ({"epoch": 0, "position": 1.5}, "non-negative int"),
    ({"epoch": 0, "position": 5}, "exceeds"),
])
def test_bad_state_fails_clearly(state, match):
  loader = make_loader(dataset(8), batch_size=4, shuffle=True, seed=0, drop_remainder=True)
  with pytest.raises(ValueError, match=match):
    loader.set_state(state)


# The prefetch thread.

def test_prefetch_thread_stops_when_the_loader_is_dropped_or_reset():
  loader = make_loader(dataset(64), batch_size=2, shuffle=True, seed=0, drop_remainder=True,
                       prefetch=2)
  next(loader)
  old = loader._holder["worker"].thread
  loader.set_state({"epoch": 0, "position": 0})
  assert not old.is_alive()  # set_state joins the old thread
  next(loader)
  thread = loader._holder["worker"].thread
  assert thread.is_alive()  # blocked on its full queue
  del loader
  gc.collect()
  thread.join(timeout=5)
  assert not thread.is_alive()
  with make_loader(dataset(64), batch_size=2, shuffle=False, seed=0, drop_remainder=True) as ld:
    next(ld)
    thread = ld._holder["worker"].thread
  assert not thread.is_alive()


def test_errors_in_the_prefetch_thread_reach_the_caller():
  class Broken(ArrayDataset):
    def take(self, indices):
      raise OSError("disk gone")

  loader = make_loader(Broken({"a": np.zeros(4)}), batch_size=2, shuffle=False, seed=0,
                       drop_remainder=True)
  with pytest.raises(OSError, match="disk gone"):
    next(loader)


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_size=0), "batch_size"),
    (dict(seed=-1), "seed"),
    (dict(shard_index=2, shard_count=2), "shard_index"),
    (dict(prefetch=-1), "prefetch"),
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
