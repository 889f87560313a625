"""LRA Text (data/text.py): aclImdb folder and tar.gz readers, byte ids, splits, cache, config."""

import tarfile

import numpy as np
import pytest

import models
from configs import common
from configs.lra import retrieval as retrieval_config

from configs.lra import text as text_config
from data import load_task, make_loader
from data import text
from train import trainer

SEQ_LEN = 24


def _reviews(rng, split, label, count):
  """count random reviews: mixed ASCII and UTF-8, some longer than SEQ_LEN, one empty-ish."""
  out = {}
  for k in range(count):
    n = int(rng.integers(1, 3 * SEQ_LEN))
    body = "".join(rng.choice(list("abc XYZ.!<br />éü€")) for _ in range(n))
    out[f"{split}/{label}/{int(rng.integers(0, 10**5)) * 10 + k}_{int(rng.integers(1, 11))}.txt"] = (
        f"{split}-{label}-{k}: {body}".encode())
  return out


@pytest.fixture(scope="module")
def imdb(tmp_path_factory):
  """A tiny aclImdb folder and the same as tar.gz; returns (root, folder, tarball, files)."""
  root = tmp_path_factory.mktemp("imdb")
  rng = np.random.default_rng(0)
  files = {}
  for split, count in (("train", 6), ("test", 4)):
    for label in ("pos", "neg"):
      files.update(_reviews(rng, split, label, count))
  folder = root / "aclImdb"
  for rel, data in files.items():
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
  (folder / "README").write_text("not a review\n")
  tarball = root / "aclImdb.tar.gz"
  with tarfile.open(tarball, "w:gz") as tar:
    tar.add(folder, arcname="aclImdb")
  return root, folder, tarball, files


def _load(data_dir, cache_dir, **kw):
  return load_task(dict(task="text", data_dir=str(data_dir), cache_dir=str(cache_dir),
                        seq_len=SEQ_LEN, **kw))


def _expected(files, split):
  """(inputs, targets) built naively from the files, in (label, id) order."""
  rows = []
  for rel, data in files.items():
    s, label, name = rel.split("/")
    if s == split:
      rows.append((("neg", "pos").index(label), int(name.split("_")[0]), data))
  rows.sort()
  inputs = np.zeros((len(rows), SEQ_LEN), np.int64)
  for i, (_, _, data) in enumerate(rows):
    for j, byte in enumerate(data[:SEQ_LEN]):
      inputs[i, j] = byte + 1
  return inputs, np.array([r[0] for r in rows])


def test_folder_and_tarball_read_the_reviews_as_byte_ids(imdb, tmp_path):
  root, folder, tarball, files = imdb
  for data_dir in (folder, tarball, root):  # root holds aclImdb/ (folder wins over the tar)
    spec, splits = _load(data_dir, tmp_path / "cache")
    assert (spec.kind, spec.vocab_size, spec.num_classes, spec.seq_len) == (
        "classification", 257, 2, SEQ_LEN)
    for split, source in (("train", "train"), ("validation", "test"), ("test", "test")):
      ds = splits[split]
      inputs, targets = _expected(files, source)
      assert ds["inputs"].dtype == np.int32 and ds["inputs"].shape == inputs.shape
      np.testing.assert_array_equal(ds["inputs"], inputs)
      np.testing.assert_array_equal(ds["targets"], targets)
      assert ds["targets"].dtype == np.int32 and set(ds["targets"].tolist()) == {0, 1}
      assert ds["mask"].dtype == bool
      np.testing.assert_array_equal(ds["mask"], inputs != 0)
      assert ds["inputs"].max() <= 256 and ds["inputs"].min() >= 0
  assert text.decode_bytes(splits["test"]["inputs"][0]) == _first_test_review(files)


def _first_test_review(files):
  neg = sorted((int(r.split("/")[2].split("_")[0]), d) for r, d in files.items()
               if r.startswith("test/neg/"))
  return neg[0][1][:SEQ_LEN]


def test_cache_is_written_and_reused(imdb, tmp_path):
  """The direct reader's byte cache (data.load_task reads the TFDS dataset instead)."""
  _, folder, tarball, _ = imdb
  cache = tmp_path / "cache"

  def _load(data_dir, cache_dir):
    return text.load_task(dict(task="text", data_dir=str(data_dir), cache_dir=str(cache_dir),
                               seq_len=SEQ_LEN))
  _, first = _load(tarball, cache)
  assert len(list(cache.glob("imdb-bytes-*.npz"))) == 1
  _, again = _load(tarball, cache)
  for split in first:
    for key in ("inputs", "mask", "targets"):
      np.testing.assert_array_equal(first[split][key], again[split][key])
  _, longer = text.load_task(dict(task="text", data_dir=str(tarball), cache_dir=str(cache),
                                  seq_len=100))
  assert longer["train"]["inputs"].shape[1] == 100
  np.testing.assert_array_equal(longer["train"]["inputs"][:, :SEQ_LEN], first["train"]["inputs"])
  assert len(list(cache.glob("imdb-bytes-*.npz"))) == 1  # one cache for every seq_len


def test_validation_fraction_holds_out_part_of_train(imdb, tmp_path):
  _, folder, _, _ = imdb
  _, full = _load(folder, tmp_path)
  _, a = _load(folder, tmp_path, val_fraction=0.25, seed=3)
  _, b = _load(folder, tmp_path, val_fraction=0.25, seed=3)
  assert len(a["validation"]) == 3 and len(a["train"]) == 9
  np.testing.assert_array_equal(a["validation"]["inputs"], b["validation"]["inputs"])
  rows = {r.tobytes() for r in np.concatenate([a["train"]["inputs"], a["validation"]["inputs"]])}
  assert rows == {r.tobytes() for r in full["train"]["inputs"]}
  np.testing.assert_array_equal(a["test"]["inputs"], full["test"]["inputs"])


def test_loader_batches_and_resumes(imdb, tmp_path):
  _, folder, _, _ = imdb
  _, splits = _load(folder, tmp_path)
  loader = make_loader(splits["train"], batch_size=4, shuffle=True, seed=1, drop_remainder=True)
  next(loader)
  state = loader.get_state()
  expected = [next(loader) for _ in range(4)]
  batch = expected[0]
  assert batch["inputs"].shape == (4, SEQ_LEN) and batch["mask"].shape == (4, SEQ_LEN)
  assert batch["targets"].shape == (4,) and batch["weights"].dtype == np.float32
  resumed = make_loader(splits["train"], batch_size=4, shuffle=True, seed=1, drop_remainder=True)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_missing_data_fails_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match="ai.stanford.edu"):
    _load(tmp_path / "nowhere", tmp_path)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"aclImdb/train/\{pos,neg\}"):
    _load(tmp_path / "empty", tmp_path)
  partial = tmp_path / "partial" / "aclImdb"
  for s in ("train", "test"):
    for lab in ("pos", "neg"):
      (partial / s / lab).mkdir(parents=True)
  (partial / "train" / "pos" / "1_9.txt").write_bytes(b"good")
  with pytest.raises(FileNotFoundError, match="test/"):
    _load(partial, tmp_path)
  (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
  with pytest.raises(ValueError, match="not a readable tar"):
    _load(tmp_path / "junk.tar.gz", tmp_path)


@pytest.mark.parametrize("cfg,match", [(dict(seq_len=0), "seq_len"), (dict(val_fraction=1.0), "val_fraction"),
                                       (dict(seqlen=5), "unknown config keys")])
def test_bad_options(imdb, tmp_path, cfg, match):
  with pytest.raises(ValueError, match=match):
    load_task(dict(task="text", data_dir=str(imdb[1]), cache_dir=str(tmp_path), **cfg))


def test_real_imdb_tarball(tmp_path):
  if not text.DEFAULT_SOURCE.is_file():
    pytest.skip(f"{text.DEFAULT_SOURCE} not present")
  spec, splits = load_task(dict(task="text", cache_dir=str(tmp_path), seq_len=16))
  assert len(splits["train"]) == 25_000 and len(splits["test"]) == 25_000
  assert splits["validation"] is splits["test"]
  for split in ("train", "test"):
    assert np.bincount(splits[split]["targets"]).tolist() == [12_500, 12_500]
  assert spec.seq_len == 16 and splits["train"]["inputs"].shape == (25_000, 16)


def test_published_text_recipes():
  s4 = text_config.get_config("s4")
  assert (s4.model.num_layers, s4.model.d_model, s4.model.mixer.d_state) == (6, 256, 4)
  assert s4.model.prenorm and s4.model.norm == "batch" and s4.model.bidirectional
  assert (s4.train.batch_size, s4.optim.lr, s4.train.num_steps, s4.optim.warmup_steps) == (
      16, 0.01, 50_000, 5_000)
  assert s4.data.seq_len == 4096 and s4.model.mixer.l_max == 4096 and s4.data.data_dir is None
  with pytest.raises(ValueError, match="unknown model"):
    text_config.get_config("nosuchmodel")


@pytest.mark.parametrize("module", [text_config, retrieval_config], ids=["text", "retrieval"])
def test_every_text_and_retrieval_config_builds(module):
  for model in module.MODELS:
    for size in common.SIZES:
      config = module.get_config(f"{model},{size}" if size else model)
      trainer.validate_config(config)
      assert config.is_locked and config.data.task == module.__name__.rsplit(".", 1)[1]
      kind = "attention" if model == "transformer" else model
      try:
        accepted = models.mixer_options(kind)
      except (ImportError, ValueError):
        continue  # that mixer does not import yet
      assert not set(config.model.mixer.keys()) - set(accepted), (model, size)


def test_tiny_config_trains(imdb, tmp_path):
  config = text_config.get_config("s4d,tiny")
  config.data.data_dir = str(imdb[1])
  config.data.cache_dir = str(tmp_path / "cache")
  config.model.num_layers = 1  # compile time dominates; one layer exercises the path
  trainer.validate_config(config)
  results = trainer.run(config, str(tmp_path / "work"))
  assert results["steps"] == config.train.num_steps
