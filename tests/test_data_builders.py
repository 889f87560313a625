"""TFDS builders (data/builders.py): every task prepared as array_record from its real on-disk
layout reads back what the direct reader reads; prepared once; no TensorFlow anywhere."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import chex
import numpy as np
import pytest
import tensorflow_datasets as tfds

import data
import data.image
import data.integrity
import data.text
from data import builders, pathfinder, registry
from tests.test_data_image import write_pickles
from tests.test_data_lm import ARCHIVE_FILES, PARAGRAPHS, write_archive
from tests.test_data_retrieval import aan  # noqa: F401 -- fixture: the AAN release layout
from tests.test_data_text import imdb  # noqa: F401 -- fixture: an aclImdb folder and tarball

REPO = pathlib.Path(__file__).resolve().parents[1]


def assert_reads_like_the_reference(cfg):
  """Given a task's options, when loaded through TFDS, then every split's arrays (and the
  spec, and the LM statistics) equal the direct reader's, example for example."""
  spec, splits = data.load_task(cfg)
  defaults = registry._attr(registry.TFDS_TASKS[cfg["task"]])  # the direct reader's keys
  ref_spec, ref = builders.REFERENCE_LOADERS[cfg["task"]](
      {k: v for k, v in cfg.items() if k in defaults})
  assert spec == ref_spec
  for split in ("train", "validation", "test"):
    got = splits[split].take(np.arange(len(splits[split])))
    want = ref[split].take(np.arange(len(ref[split])))
    chex.assert_trees_all_equal(got, want)  # same keys, dtypes, shapes, values, order
    assert getattr(splits[split], "info", None) == getattr(ref[split], "info", None)
  return splits


def prepared(cache) -> list[str]:
  """builder/config/version folders prepared under a cache's tfds dir."""
  root = pathlib.Path(cache) / "tfds"
  return sorted(str(p.relative_to(root)) for p in root.glob("*/*/*") if p.is_dir())


def test_listops_generated_and_release_folder(tmp_path):
  gen = dict(task="listops", cache_dir=str(tmp_path), seq_len=40, num_train=12, num_val=6,
             num_test=6, min_length=5, max_length=38)
  assert_reads_like_the_reference(gen)
  assert prepared(tmp_path) == [
      "ssmlab_listops/gen-n12_6_6-len5_38-depth10_args10-v1-seed0/1.0.0"]
  # seq_len is a read-time transform: a new length reads the same prepared set
  assert_reads_like_the_reference(dict(gen, seq_len=7))
  assert len(prepared(tmp_path)) == 1
  # a folder in the release layout (basic_*.tsv)
  folder = data.listops.write_dataset(tmp_path / "listops-1000-mine", num_train=9, num_val=5,
                                      num_test=5, min_length=5, max_length=38, seed=3)
  assert_reads_like_the_reference(dict(task="listops", data_dir=str(folder),
                                       cache_dir=str(tmp_path), seq_len=40))
  assert any(p.startswith("ssmlab_listops/files-listops-1000-mine-") for p in prepared(tmp_path))


def test_text_from_folder_and_tarball(imdb, tmp_path):  # noqa: F811
  root, folder, tarball, _ = imdb
  for source in (folder, tarball):
    assert_reads_like_the_reference(dict(task="text", data_dir=str(source),
                                         cache_dir=str(tmp_path), seq_len=24))
  assert_reads_like_the_reference(dict(task="text", data_dir=str(folder), cache_dir=str(tmp_path),
                                       seq_len=24, val_fraction=0.25, seed=2))


def test_retrieval_release_layout(aan, tmp_path):  # noqa: F811
  assert_reads_like_the_reference(dict(task="retrieval", data_dir=str(aan[0]), seq_len=20,
                                       tfds_dir=str(tmp_path / "tfds")))


def test_image_from_pickles_gray_and_rgb(tmp_path):
  folder = tmp_path / "cifar-10-batches-py"
  write_pickles(folder)
  for gray in (True, False):
    assert_reads_like_the_reference(dict(task="image", data_dir=str(folder), grayscale=gray,
                                         val_fraction=0.2, cache_dir=str(tmp_path)))
  assert len(prepared(tmp_path)) == 1  # grayscale is applied when read


@pytest.mark.parametrize("normalize", ["unit", "s4"])
def test_pathfinder_generated_and_release_layout(tmp_path, normalize):
  gen = dict(task="pathfinder", cache_dir=str(tmp_path), num_examples=20, seed=1, num_workers=1,
             normalize=normalize)
  assert_reads_like_the_reference(gen)
  pathfinder.write_dataset(tmp_path / "release", num_examples=20, seed=2, size=32, num_workers=1)
  assert_reads_like_the_reference(dict(task="pathfinder", data_dir=str(tmp_path / "release"),
                                       cache_dir=str(tmp_path), normalize=normalize))


def test_mqar(tmp_path):
  assert_reads_like_the_reference(dict(task="mqar", cache_dir=str(tmp_path), vocab_size=64,
                                       seq_len=32, num_kv_pairs=4, num_train=40, num_test=10))


@pytest.mark.parametrize("tokenizer,test_fraction", [("byte", 0.1), ("char", 0.0)])
def test_lm_corpus(tmp_path, tokenizer, test_fraction):
  path = tmp_path / "corpus.txt"
  path.write_bytes(("\n\n".join(PARAGRAPHS)).encode() + b"\n\n\xff not utf-8 \xe9t\xe9\n")
  splits = assert_reads_like_the_reference(dict(
      task="lm", path=str(path), cache_dir=str(tmp_path), seq_len=16, tokenizer=tokenizer,
      test_fraction=test_fraction))
  if not test_fraction:
    assert splits["test"] is splits["validation"]


def test_lm_archive_with_segment_ids(tmp_path):
  path = write_archive(tmp_path / "docs.tar.gz", ARCHIVE_FILES)
  for segment_ids in (False, True):
    splits = assert_reads_like_the_reference(dict(
        task="lm", path=str(path), cache_dir=str(tmp_path), seq_len=8, val_fraction=0.25,
        test_fraction=0.25, segment_ids=segment_ids))
    assert ("segment_ids" in splits["train"]) == segment_ids
  assert len(prepared(tmp_path)) == 1  # segment ids are made when read


def test_prepared_once_then_only_read(tmp_path, monkeypatch):
  cfg = dict(task="mqar", cache_dir=str(tmp_path), vocab_size=32, seq_len=16, num_kv_pairs=2,
             num_train=8, num_test=8)
  data.load_task(cfg)
  monkeypatch.setattr(builders.SsmlabMqar, "_read", lambda self: pytest.fail("prepared again"))
  data.load_task(cfg)
  data.load_task(dict(cfg, tfds_dir=str(tmp_path / "tfds")))  # the same place, named


@pytest.mark.parametrize("damage", ["cut", "garbage", "lost"])
def test_a_damaged_prepared_dataset_is_prepared_again(tmp_path, caplog, damage):
  cfg = dict(task="mqar", cache_dir=str(tmp_path), vocab_size=32, seq_len=16, num_kv_pairs=2,
             num_train=64, num_test=8)
  _, good = data.load_task(cfg)
  (train,) = (tmp_path / "tfds").rglob("*-train.array_record-*")
  if damage == "cut":
    train.write_bytes(train.read_bytes()[: train.stat().st_size // 2])
  elif damage == "garbage":
    train.write_bytes(os.urandom(train.stat().st_size))
  else:
    train.unlink()
  caplog.set_level("WARNING", logger="data")
  _, again = data.load_task(cfg)
  assert "is unreadable" in caplog.text and "preparing it again" in caplog.text
  chex.assert_trees_all_equal(dict(again["train"].items()), dict(good["train"].items()))


def test_a_prepared_dataset_is_readable_from_another_tfds_dir(tmp_path):
  """Datasets prepared elsewhere (a shared disk) are read where they lie, not prepared."""
  cfg = dict(task="mqar", vocab_size=32, seq_len=16, num_kv_pairs=2, num_train=8, num_test=8)
  _, first = data.load_task(dict(cfg, cache_dir=str(tmp_path / "a")))
  os.rename(tmp_path / "a" / "tfds", tmp_path / "shared_tfds")
  _, again = data.load_task(dict(cfg, tfds_dir=str(tmp_path / "shared_tfds"),
                                 cache_dir=str(tmp_path / "b")))
  chex.assert_trees_all_equal(dict(first["train"].items()), dict(again["train"].items()))
  assert not (tmp_path / "b").exists()


class FakeCifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Stands for TFDS's own cifar10 (its features and splits), prepared as array_record."""

  name = "cifar10"
  VERSION = tfds.core.Version("3.0.2")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "id": tfds.features.Text(), "image": tfds.features.Image(shape=(32, 32, 3)),
        "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    rng = np.random.default_rng(0)
    return {s: self._generate_examples(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
            for s, n in (("train", 20), ("test", 6))}

  def _generate_examples(self, images):
    import io
    from PIL import Image
    for i, image in enumerate(images):
      png = io.BytesIO()
      Image.fromarray(image).save(png, format="PNG")  # TFDS encodes arrays with TensorFlow
      yield i, {"id": f"img_{i}", "image": png.getvalue(), "label": i % 10}


class FakeImdbReviews(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Stands for TFDS's imdb_reviews/plain_text."""

  name = "imdb_reviews"
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "text": tfds.features.Text(), "label": tfds.features.ClassLabel(names=["neg", "pos"])}))

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(s) for s in ("train", "test")}

  def _generate_examples(self, split):
    for i in range(8):
      yield i, {"text": f"{split} review {i}: {'good' if i % 2 else 'bad'} \u00e9", "label": i % 2}


def test_datasets_tfds_prepared_themselves_are_read(tmp_path):
  """Given TFDS's cifar10 / imdb_reviews prepared as array_record (what LRA's own pipelines
  load), when data_dir names their folder, then the task reads their examples (in the
  order TFDS stored them: shuffled by key, as TFDS does by default)."""
  for cls in (FakeCifar10, FakeImdbReviews):
    cls(data_dir=str(tmp_path / "tensorflow_datasets"), file_format="array_record").download_and_prepare()
  cifar = tmp_path / "tensorflow_datasets" / "cifar10" / "3.0.2"
  spec, splits = data.load_task(dict(task="image", data_dir=str(cifar), val_fraction=0.25,
                                     cache_dir=str(tmp_path)))
  assert spec.in_channels == 1 and {k: len(v) for k, v in splits.items()} == {
      "train": 15, "validation": 5, "test": 6}
  order = splits["test"]["targets"]  # label i of example i (< 10): the stored order
  assert sorted(order) == list(range(6))
  rng = np.random.default_rng(0)  # the fake's draws: train, then test
  rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
  test_images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
  rgb = data.load_task(dict(task="image", data_dir=str(cifar), val_fraction=0.25, grayscale=False,
                            cache_dir=str(tmp_path)))[1]["test"]["inputs"]
  np.testing.assert_array_equal(rgb, data.image.to_sequences(test_images[order], grayscale=False))
  assert any(p.startswith("ssmlab_image/tfds_cifar10-") for p in prepared(tmp_path))
  imdb_dir = tmp_path / "tensorflow_datasets" / "imdb_reviews" / "1.0.0"
  _, text_splits = data.load_task(dict(task="text", data_dir=str(imdb_dir), seq_len=40,
                                       cache_dir=str(tmp_path)))
  for split in ("train", "test"):
    texts = [data.text.decode_bytes(r).decode() for r in text_splits[split]["inputs"]]
    assert sorted(texts) == sorted(f"{split} review {i}: {'good' if i % 2 else 'bad'} \u00e9"
                                   for i in range(8))
    labels = [int(t.split()[2][:-1]) % 2 for t in texts]
    assert labels == text_splits[split]["targets"].tolist()


def test_a_tfds_folder_in_tfrecord_is_refused_clearly(tmp_path):
  folder = tmp_path / "cifar10" / "3.0.2"
  folder.mkdir(parents=True)
  FakeCifar10(data_dir=str(tmp_path / "x"), file_format="array_record").download_and_prepare()
  info = json.loads((tmp_path / "x" / "cifar10" / "3.0.2" / "dataset_info.json").read_text())
  info["fileFormat"] = "tfrecord"
  (folder / "dataset_info.json").write_text(json.dumps(info))
  (folder / "features.json").write_text(
      (tmp_path / "x" / "cifar10" / "3.0.2" / "features.json").read_text())
  with pytest.raises(data.integrity.DataError, match="prepared as tfrecord"):
    data.load_task(dict(task="image", data_dir=str(folder), cache_dir=str(tmp_path)))


NO_TENSORFLOW = textwrap.dedent("""
    import json, sys
    import data
    from data.pipeline import make_loader
    spec, splits = data.load_task(json.loads(sys.argv[1]))
    loader = make_loader(splits["train"], batch_size=2, shuffle=True, seed=0,
                         drop_remainder=True, prefetch=0)
    next(loader)
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tf_keras", "keras"))
    print("RESULT", json.dumps(dict(heavy=heavy, tfds="tensorflow_datasets" in sys.modules)))
""")


def test_loading_a_task_imports_no_tensorflow(tmp_path):
  cfg = dict(task="listops", cache_dir=str(tmp_path), seq_len=40, num_train=12, num_val=6,
             num_test=6, min_length=5, max_length=38)
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  for _ in range(2):  # preparing, then reading the prepared set
    proc = subprocess.run([sys.executable, "-c", NO_TENSORFLOW, json.dumps(cfg)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ")[1])
    assert out == {"heavy": [], "tfds": True}
