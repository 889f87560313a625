"""LRA Text: IMDB movie reviews (Maas et al. 2011) as byte sequences, 2 classes.

The Long Range Arena definition (google-research/long-range-arena
lra_benchmarks/text_classification/input_pipeline.py, byte-level "char" tokenizer,
i.e. tfds ByteTextEncoder): every UTF-8 byte b of a review becomes the id b + 1, so
the vocabulary has 257 symbols and id 0 stays padding. Reviews are truncated or
padded with 0 to seq_len (4096 by default; LRA's shorter variants are seq_len 1000 or
2000). Labels: neg = 0, pos = 1. Like LRA, the 25,000 test reviews double as the
validation set unless `val_fraction` > 0, which holds out that (seeded) fraction of
the training reviews instead.

Files: the standard aclImdb distribution (ai.stanford.edu/~amaas/data/sentiment/),
either the folder (aclImdb/train/{pos,neg}/<id>_<rating>.txt, aclImdb/test/...) or
its tar.gz, read member by member without extracting. With data_dir=None the
project's copy ../shared/data/imdb/aclImdb.tar.gz is read. The reviews' raw bytes
are cached (data/integrity.py's npz, keyed by the source's path, size and mtime; for a
folder its own mtime, so delete the cache after editing reviews in place) so later runs
skip the 50,000-file walk; the cache holds bytes, not padded arrays, so every seq_len
shares it. A damaged or edited cache is rebuilt; a damaged archive is a DataError
naming it; the shared copy must hold the standard 12,500 reviews per split and label,
and data.load_task refuses a split with one label (an archive of positive reviews).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np

from data.archive import read_members
from data.integrity import check_count, load_npz, save_npz
from data.listops import cache_root
from data.pipeline import ArrayDataset
from data.task import TaskSpec

PAD_ID = 0
VOCAB_SIZE = 257  # 256 byte values shifted by one, plus padding
NUM_CLASSES = 2
LABELS = ("neg", "pos")
SOURCE_SPLITS = ("train", "test")
CACHE_VERSION = 1  # part of the cache key: bump when the cached content changes
DEFAULT_SOURCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imdb" / "aclImdb.tar.gz"
DOWNLOAD = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
STANDARD_COUNT = 25_000  # reviews per split of aclImdb, half of them per label

DEFAULTS: dict[str, Any] = dict(
    task="text",
    data_dir=None,      # aclImdb folder (or its parent), or aclImdb*.tar.gz; None: DEFAULT_SOURCE
    cache_dir=None,     # cache root; None: $SSMLAB_CACHE or ~/.cache/ssmlab
    seq_len=4096,
    val_fraction=0.0,   # 0: validation = test (LRA); > 0: that fraction of train, seeded
    seed=0,
)

# A review file: .../{train,test}/{pos,neg}/<id>_<rating>.txt (the id sorts reviews).
_MEMBER = re.compile(r"(?:^|/)(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")

Reviews = dict[str, tuple[list[bytes], np.ndarray]]  # split -> (texts, labels int32)


def encode_bytes(texts: list[bytes], seq_len: int) -> np.ndarray:
  """(n, seq_len) int32: byte + 1, truncated, padded with 0."""
  out = np.zeros((len(texts), seq_len), np.int32)
  for i, text in enumerate(texts):
    ids = np.frombuffer(text[:seq_len], np.uint8)
    out[i, :len(ids)] = ids.astype(np.int32) + 1
  return out


def decode_bytes(ids) -> bytes:
  """Inverse of encode_bytes for one row (padding dropped)."""
  ids = np.asarray(ids)
  return (ids[ids != PAD_ID] - 1).astype(np.uint8).tobytes()


def _sorted_reviews(found: list[tuple[str, str, int, bytes]]) -> Reviews:
  """Deterministic order (label, id) per split whatever order the files were listed in."""
  out = {}
  for split in SOURCE_SPLITS:
    rows = sorted((LABELS.index(lab), num, text) for s, lab, num, text in found if s == split)
    out[split] = ([r[2] for r in rows], np.array([r[0] for r in rows], np.int32))
  return out


def read_folder(folder) -> Reviews:
  """Reviews of an aclImdb folder (the one holding train/ and test/)."""
  folder = Path(folder)
  found = []
  for split in SOURCE_SPLITS:
    for label in LABELS:
      for path in (folder / split / label).glob("*.txt"):
        m = _MEMBER.search(path.as_posix())
        if m:
          found.append((split, label, int(m.group(3)), path.read_bytes()))
  return _sorted_reviews(found)


def read_tarball(path, hint: str = "") -> Reviews:
  """Reviews of an aclImdb tar.gz, streamed member by member (data/archive.py; DataError
  naming a damaged archive, `hint` appended)."""
  members = read_members(path, lambda name: _MEMBER.search(name) is not None, hint=hint)
  found = []
  for name, data in members:
    m = _MEMBER.search(name)
    found.append((m.group(1), m.group(2), int(m.group(3)), data))
  return _sorted_reviews(found)


def _missing_error(where: Path, what: str) -> FileNotFoundError:
  return FileNotFoundError(
      f"IMDB (LRA Text) data not found: {what} ({str(where)!r}). Expected data.data_dir to be "
      "the aclImdb folder (aclImdb/train/{pos,neg}/<id>_<rating>.txt and aclImdb/test/{pos,neg}/"
      "...), a folder holding aclImdb/ or aclImdb.tar.gz, or the tar.gz itself; data_dir=None "
      f"reads {DEFAULT_SOURCE}. Get the data from {DOWNLOAD} (ai.stanford.edu/~amaas/data/"
      "sentiment/).")


def resolve_source(data_dir) -> Path:
  """The aclImdb folder or tarball that data_dir names (None: the shared tarball)."""
  where = Path(data_dir).expanduser() if data_dir is not None else DEFAULT_SOURCE
  if where.is_file():
    return where
  if not where.is_dir():
    raise _missing_error(where, "no such file or folder")
  for candidate in (where, where / "aclImdb"):
    if all((candidate / s / lab).is_dir() for s in SOURCE_SPLITS for lab in LABELS):
      return candidate
  for name in ("aclImdb.tar.gz", "aclImdb_v1.tar.gz"):
    if (where / name).is_file():
      return where / name
  raise _missing_error(where, "no aclImdb/{train,test}/{pos,neg} folders or aclImdb.tar.gz there")


def _source_key(source: Path) -> str:
  st = source.stat()
  return f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}|{CACHE_VERSION}"


def _cache_file(source: Path, cache_dir) -> Path:
  digest = hashlib.blake2b(_source_key(source).encode(), digest_size=8).hexdigest()
  return cache_root(cache_dir) / f"imdb-bytes-v{CACHE_VERSION}-{digest}.npz"


def _read_source(source: Path) -> Reviews:
  """Reviews of a folder or tarball; DataError naming a damaged archive."""
  if not source.is_file():
    return read_folder(source)
  return read_tarball(source, hint=f"; download it again from {DOWNLOAD}")


def _check_counts(source: Path, reviews: Reviews) -> None:
  empty = [split for split, (texts, _) in reviews.items() if not texts]
  if empty:
    raise _missing_error(source, f"no review files {empty[0]}/(pos|neg)/<id>_<rating>.txt inside")
  if source.resolve() == DEFAULT_SOURCE.resolve():  # the standard distribution's counts
    for split, (texts, labels) in reviews.items():
      for label, name in enumerate(LABELS):
        check_count(f"{split}/{name} reviews", source, int(np.sum(labels == label)),
                    STANDARD_COUNT // 2)


def load_reviews(source: Path, cache_dir=None) -> Reviews:
  """Reviews of a folder or tarball, through the on-disk byte cache (data/integrity.py:
  a damaged or edited cache is rebuilt)."""
  cache = _cache_file(source, cache_dir)
  z = load_npz(cache, expect={"source": _source_key(source)})
  if z is not None:
    out = {}
    for split in SOURCE_SPLITS:
      flat, offsets = z[f"{split}_bytes"].tobytes(), z[f"{split}_offsets"]
      texts = [flat[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
      out[split] = (texts, z[f"{split}_labels"])
    return out
  reviews = _read_source(source)
  _check_counts(source, reviews)
  arrays = {}
  for split, (texts, labels) in reviews.items():
    arrays[f"{split}_bytes"] = np.frombuffer(b"".join(texts), np.uint8)
    arrays[f"{split}_offsets"] = np.cumsum([0] + [len(t) for t in texts]).astype(np.int64)
    arrays[f"{split}_labels"] = labels
  save_npz(cache, arrays, {"source": _source_key(source)})
  return reviews


def _dataset(texts: list[bytes], labels: np.ndarray, seq_len: int) -> ArrayDataset:
  inputs = encode_bytes(texts, seq_len)
  return ArrayDataset({"inputs": inputs, "mask": inputs != PAD_ID,
                       "targets": np.asarray(labels, np.int32)})


def load_task(data_cfg) -> tuple[TaskSpec, dict[str, ArrayDataset]]:
  """LRA Text for `data.load_task`; data_cfg keys and defaults: see DEFAULTS."""
  from data.registry import task_options  # late: the registry imports this module lazily
  opts = task_options(data_cfg, DEFAULTS)
  seq_len, frac, seed = opts["seq_len"], opts["val_fraction"], opts["seed"]
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"text seq_len must be a positive int, got {seq_len!r}")
  if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac < 1:
    raise ValueError(f"text val_fraction must be in [0, 1), got {frac!r}")
  reviews = load_reviews(resolve_source(opts["data_dir"]), opts["cache_dir"])
  train_texts, train_labels = reviews["train"]
  test = _dataset(*reviews["test"], seq_len)
  if frac > 0:
    order = np.random.default_rng(seed).permutation(len(train_texts))
    n_val = max(1, int(round(frac * len(train_texts))))
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    splits = {"train": _dataset([train_texts[i] for i in train_idx], train_labels[train_idx], seq_len),
              "validation": _dataset([train_texts[i] for i in val_idx], train_labels[val_idx], seq_len)}
  else:
    splits = {"train": _dataset(train_texts, train_labels, seq_len), "validation": test}
  splits["test"] = test
  spec = TaskSpec(name="text", kind="classification", input_kind="tokens", seq_len=seq_len,
                  num_classes=NUM_CLASSES, vocab_size=VOCAB_SIZE)
  return spec, splits
