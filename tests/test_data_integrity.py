"""Data that is what it says (data/integrity.py): short, edited or damaged sources and caches.

Given a source or cache with a fault, when a task loads, then a cache is rebuilt (with a
warning naming it) and yields the data it should, and a source stops with a DataError
naming the file: nothing trains on part of the data, or on one class. The caches are the
direct readers' (data/<task>.py, which the TFDS builders read from): their tests call
those readers; the source errors go through data.load_task.
"""

import io
import json
import logging
import shutil
import tarfile

import numpy as np
import pytest

import data
from data import integrity, listops, pathfinder, text
from tests.test_data_listops import SMALL
from tests.test_data_text import _reviews


def _cut_lines(path, keep: int):
  """Keeps the header and `keep` examples: a file cut at a line boundary."""
  lines = path.read_text().splitlines(keepends=True)
  path.write_text("".join(lines[:1 + keep]))


def _listops(cache_dir, **kw):
  return listops.load_task(dict(task="listops", cache_dir=str(cache_dir), seq_len=64,
                             **SMALL, **kw))


def _generated_folder(cache_dir):
  return listops.cache_root(cache_dir) / listops.cache_name(**SMALL)


# -- ListOps ----------------------------------------------------------------------------

def test_listops_cache_cut_at_a_line_is_rebuilt(tmp_path, caplog):
  _, good = _listops(tmp_path)
  folder = _generated_folder(tmp_path)
  _cut_lines(folder / "basic_train.tsv", 20)
  caplog.set_level(logging.WARNING, logger="data")
  _, again = _listops(tmp_path)
  assert "basic_train.tsv: 20 examples, expected 60" in caplog.text
  assert "generating it again" in caplog.text
  np.testing.assert_array_equal(again["train"]["inputs"], good["train"]["inputs"])


def test_listops_cache_edited_but_valid_is_rebuilt(tmp_path, caplog):
  _, good = _listops(tmp_path)
  path = _generated_folder(tmp_path) / "basic_val.tsv"
  lines = path.read_text().splitlines(keepends=True)
  source, target = lines[1].rstrip("\n").split("\t")
  lines[1] = f"{source}\t{(int(target) + 1) % 10}\n"  # still a well-formed example
  path.write_text("".join(lines))
  caplog.set_level(logging.WARNING, logger="data")
  _, again = _listops(tmp_path)
  assert "basic_val.tsv: its content differs from the SHA-256" in caplog.text
  np.testing.assert_array_equal(again["validation"]["targets"], good["validation"]["targets"])


def test_listops_cache_without_checksums_gets_them(tmp_path):
  """A cache written before the checksums: recorded on first use, then enforced."""
  _listops(tmp_path)
  meta_path = _generated_folder(tmp_path) / "meta.json"
  meta = json.loads(meta_path.read_text())
  del meta["sha256"]
  meta_path.write_text(json.dumps(meta))
  _listops(tmp_path)
  assert set(json.loads(meta_path.read_text())["sha256"]) == set(listops.SPLIT_FILES.values())


def test_listops_data_dir_cut_at_a_line_is_an_error(tmp_path):
  folder = listops.write_dataset(tmp_path / "set", **SMALL)
  _cut_lines(folder / "basic_train.tsv", 20)
  before = (folder / "basic_train.tsv").read_bytes()
  with pytest.raises(integrity.DataError, match=r"basic_train.tsv: 20 examples, expected 60"):
    data.load_task(dict(task="listops", data_dir=str(folder), seq_len=64))
  assert (folder / "basic_train.tsv").read_bytes() == before  # a source is never touched


def test_listops_release_folder_must_hold_the_release(tmp_path):
  folder = listops.write_dataset(tmp_path / "listops-1000", **SMALL)
  (folder / "meta.json").unlink()  # the release has none: its published counts apply
  with pytest.raises(integrity.DataError, match="60 examples, expected 96000"):
    data.load_task(dict(task="listops", data_dir=str(folder), seq_len=64))
  listops.write_meta(folder)  # a set of one's own, recorded: accepted from now on
  _, splits = data.load_task(dict(task="listops", data_dir=str(folder), seq_len=64))
  assert len(splits["train"]) == 60


# -- IMDB -------------------------------------------------------------------------------

def _imdb_tarball(path, labels=("pos", "neg")):
  rng = np.random.default_rng(1)
  files = {}
  for split in ("train", "test"):
    for label in labels:
      files.update(_reviews(rng, split, label, 8))
  with tarfile.open(path, "w:gz") as tar:
    for rel, content in files.items():
      info = tarfile.TarInfo(f"aclImdb/{rel}")
      info.size = len(content)
      tar.addfile(info, io.BytesIO(content))
  return path


def _text(source, cache, load=data.load_task):
  return load(dict(task="text", data_dir=str(source), cache_dir=str(cache), seq_len=24))


def test_imdb_with_one_class_is_an_error(tmp_path):
  source = _imdb_tarball(tmp_path / "aclImdb.tar.gz", labels=("pos",))
  with pytest.raises(integrity.DataError, match=r"text train split: all 8 examples have label 1"):
    _text(source, tmp_path / "cache")


def test_imdb_truncated_archive_names_the_file(tmp_path):
  source = _imdb_tarball(tmp_path / "aclImdb.tar.gz")
  source.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
  with pytest.raises(integrity.DataError, match=r"aclImdb.tar.gz: the archive is damaged"):
    _text(source, tmp_path / "cache")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "edited"])
def test_imdb_damaged_cache_is_named_and_rebuilt(tmp_path, caplog, damage):
  source = _imdb_tarball(tmp_path / "aclImdb.tar.gz")
  _, good = _text(source, tmp_path / "cache", text.load_task)  # the direct reader's cache
  (cache,) = (tmp_path / "cache").glob("imdb-bytes-*.npz")
  if damage == "garbage":
    cache.write_bytes(b"not a zip file at all")
  elif damage == "truncated":
    cache.write_bytes(cache.read_bytes()[:100])
  else:  # a valid npz, one label flipped, its record kept
    with np.load(cache) as z:
      arrays = {k: z[k] for k in z.files}
    arrays["train_labels"] = 1 - arrays["train_labels"]
    np.savez(cache, **arrays)
  caplog.set_level(logging.WARNING, logger="data")
  _, again = _text(source, tmp_path / "cache", text.load_task)
  assert f"data cache {cache} is" in caplog.text and "rebuilding it" in caplog.text
  np.testing.assert_array_equal(again["train"]["targets"], good["train"]["targets"])
  assert integrity.load_npz(cache) is not None  # the rebuilt cache verifies


# -- Pathfinder and the shared pieces ---------------------------------------------------

def test_pathfinder_cache_missing_an_image_is_rebuilt(tmp_path, caplog):
  cfg = dict(task="pathfinder", cache_dir=str(tmp_path), num_examples=20, num_workers=1)
  load = pathfinder.load_task  # the direct reader and its cache of generated images
  _, good = load(cfg)
  (image,) = list(tmp_path.rglob("sample_3.png"))
  image.write_bytes(b"")  # read as a skipped (empty) image: one example short
  caplog.set_level(logging.WARNING, logger="data")
  _, again = load(cfg)
  assert "19 images, expected 20" in caplog.text and "generating it again" in caplog.text
  np.testing.assert_array_equal(again["train"]["inputs"], good["train"]["inputs"])


def test_empty_and_one_label_splits_are_refused():
  with pytest.raises(integrity.DataError, match="all 8 examples have label 3"):
    integrity.check_labels("listops", "train", np.full(8, 3))
  integrity.check_labels("listops", "test", np.full(3, 3))  # a handful may share a label
  integrity.check_labels("listops", "train", np.arange(8) % 2)


def test_npz_cache_round_trip_and_checksum(tmp_path):
  arrays = {"x": np.arange(6, dtype=np.int32).reshape(2, 3), "y": np.ones(2, bool)}
  path = tmp_path / "c.npz"
  integrity.save_npz(path, arrays, {"source": "a"})
  got = integrity.load_npz(path, expect={"source": "a"})
  assert got.keys() == arrays.keys() and all(np.array_equal(got[k], arrays[k]) for k in arrays)
  assert integrity.load_npz(path, expect={"source": "b"}) is None  # another source's cache
  assert not path.exists()
  assert integrity.load_npz(tmp_path / "absent.npz") is None
  assert not list(tmp_path.glob(".*"))  # no temporary file left behind
  shutil.rmtree(tmp_path)
