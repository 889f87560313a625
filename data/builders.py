"""Every task as a TFDS dataset: prepared once as array_record, read with tfds.data_source.

    spec, splits = data.load_task(config.data)   # prepares on first use, then reads

Each task has a `tfds.core.GeneratorBasedBuilder` below. Its builder config holds what
the examples are made from (a generator's options, or a source folder and its
fingerprint), so the config's name says what the dataset holds, e.g.
`ssmlab_listops/gen-n96000_2000_2000-len500_2000-depth10_args10-v1-seed0/1.0.0`. What only
changes how examples are presented (seq_len, padding, masks, grayscale, normalisation,
the LM tokenizer and packing) is not stored: `to_arrays` applies it when a split is read.
The examples are stored in their source order (no TFDS shuffling), the same examples in
the same order as the direct readers of data/<task>.py (`REFERENCE_LOADERS`) give.

Where. Datasets are prepared under `tfds_dir` (default <cache>/tfds, the cache being
config.data.cache_dir, $SSMLAB_CACHE or ~/.cache/ssmlab) as
<tfds_dir>/<builder>/<config>/<version>/; the builder VERSION is part of that key, so
changing what a builder writes means a new VERSION and a fresh prepare. Pointing
tfds_dir at a folder holding datasets prepared elsewhere (another machine, a shared
disk) reads them without preparing. Nothing here imports TensorFlow: array_record and
`tfds.data_source` only (the default tfrecord format and `as_dataset` would need it).

TFDS's own datasets. LRA's pipelines load TFDS's `cifar10` (Image) and `imdb_reviews`
(Text); where a user has them prepared as array_record, data_dir may name their folder
(e.g. ~/tensorflow_datasets/cifar10/3.0.2): their examples are read in their order and
prepared into this task's dataset like any other source (a tfrecord copy is refused,
saying how to prepare an array_record one).

Arrays. A split is read whole into NumPy arrays (data.pipeline.ArrayDataset), as the
LRA tasks fit in memory; the loader (data.pipeline, on grain) batches, shuffles and
shards them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data import image as image_lib
from data import listops as listops_lib
from data import lm as lm_lib
from data import mqar as mqar_lib
from data import pathfinder as pathfinder_lib
from data import retrieval as retrieval_lib
from data import text as text_lib
from data.integrity import DataError
from data.pipeline import ArrayDataset
from data.task import TaskSpec

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
FILE_FORMAT = "array_record"
_READ_CHUNK = 4096  # records per __getitems__ call when a split is read whole

# The direct readers (no TFDS): what the builders store, and the tests' reference.
REFERENCE_LOADERS = {
    "listops": listops_lib.load_task, "mqar": mqar_lib.load_task,
    "pathfinder": pathfinder_lib.load_task, "pathx": pathfinder_lib.load_pathx,
    "image": image_lib.load_task, "text": text_lib.load_task,
    "retrieval": retrieval_lib.load_task, "lm": lm_lib.load_task,
}


def _bytes_feature(dtype=np.uint8):
  """A 1-D sequence of any length, stored as raw bytes (cheap to decode)."""
  return tfds.features.Tensor(shape=(None,), dtype=dtype, encoding=tfds.features.Encoding.BYTES)


def _digest(text: str) -> str:
  return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def fingerprint(path: Path) -> str:
  """Path, size and mtime of a file, or of every file below a folder, hashed (12 hex)."""
  path = Path(path).resolve()
  if path.is_file():
    st = path.stat()
    return _digest(f"{path}|{st.st_size}|{st.st_mtime_ns}")
  parts = [str(path)]
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(files):
      st = os.stat(os.path.join(root, name))
      parts.append(f"{os.path.relpath(os.path.join(root, name), path)}|{st.st_size}|{st.st_mtime_ns}")
  return _digest("\n".join(parts))


# -- datasets TFDS itself prepared (what LRA's own pipelines read) --------------------------

def tfds_folder(path) -> Path | None:
  """`path` when it is a prepared TFDS dataset (a <name>/<version> folder with its
  dataset_info.json, e.g. ~/tensorflow_datasets/cifar10/3.0.2), else None."""
  path = Path(path).expanduser()
  return path if (path / "dataset_info.json").is_file() else None


def read_tfds_folder(folder: Path, split: str) -> list[dict]:
  """Every example of one split of a TFDS-prepared dataset (array_record only)."""
  b = tfds.builder_from_directory(str(folder))
  fmt = str(getattr(b.info.file_format, "value", b.info.file_format))
  if fmt != FILE_FORMAT:
    raise DataError(
        f"{folder} was prepared as {fmt}, which only TensorFlow reads; prepare it again as "
        f"array_record (tfds.builder(NAME).download_and_prepare(file_format='array_record')) "
        f"or point data.data_dir at the original files")
  if split not in b.info.splits:
    raise DataError(f"{folder} has no {split!r} split (it has {sorted(b.info.splits)})")
  source = b.as_data_source(split=split)
  rows = []
  for start in range(0, len(source), _READ_CHUNK):
    rows += source.__getitems__(range(start, min(len(source), start + _READ_CHUNK)))
  return rows


@dataclasses.dataclass(eq=False)
class TaskConfig(tfds.core.BuilderConfig):
  """A builder config: `options` are what the examples are made from (JSON values)."""

  options: dict = dataclasses.field(default_factory=dict)


class _TaskBuilder(tfds.core.GeneratorBasedBuilder):
  """Base: subclasses give FEATURES and `_read() -> {split: iterable of example dicts}`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  FEATURES: dict = {}

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, description=(self.__doc__ or "").strip(),
                                 features=tfds.features.FeaturesDict(dict(self.FEATURES)),
                                 disable_shuffling=True)  # keep the source order

  @property
  def options(self) -> dict:
    return self.builder_config.options

  def _split_generators(self, dl_manager):
    del dl_manager  # sources are local files or generators
    return {name: self._generate_examples(rows) for name, rows in self._read().items()}

  def _generate_examples(self, rows):
    for i, example in enumerate(rows):
      yield i, example

  def _read(self) -> dict:
    raise NotImplementedError


# -- builders -----------------------------------------------------------------------------

class SsmlabListops(_TaskBuilder):
  """ListOps (LRA): token ids of each expression (untruncated) and its value."""

  FEATURES = {"tokens": _bytes_feature(), "targets": tfds.features.Scalar(dtype=np.int32)}

  def _read(self):
    o = self.options
    with tempfile.TemporaryDirectory(prefix="listops-") as tmp:
      if o["data_dir"] is None:
        folder = listops_lib.write_dataset(tmp, **o["generator"])
      else:
        folder = Path(o["data_dir"])
      listops_lib.read_folder(folder, 1)  # the counts and checksums of meta.json or the release
      out = {}
      for split, name in listops_lib.SPLIT_FILES.items():
        sources, targets = listops_lib.read_tsv(folder / name)
        out[split] = [{"tokens": listops_lib.tokenize(s).astype(np.uint8), "targets": t}
                      for s, t in zip(sources, targets)]
    return out


class SsmlabText(_TaskBuilder):
  """LRA Text: the bytes of each IMDB review and its label (0 neg, 1 pos)."""

  FEATURES = {"text": _bytes_feature(), "targets": tfds.features.Scalar(dtype=np.int32)}

  def _read(self):
    o = self.options
    source = Path(o["source"])
    if tfds_folder(source):  # TFDS's imdb_reviews (label 0 neg, 1 pos, as ours): its order
      rows = {s: [{"text": np.frombuffer(_as_bytes(r["text"]), np.uint8),
                   "targets": int(r["label"])} for r in read_tfds_folder(source, s)]
              for s in ("train", "test")}
    else:
      reviews = text_lib._read_source(source)  # noqa: SLF001 -- the module's own reader
      text_lib._check_counts(source, reviews)  # noqa: SLF001
      rows = {s: [{"text": np.frombuffer(t, np.uint8), "targets": y} for t, y in zip(*reviews[s])]
              for s in ("train", "test")}
    if o["val_fraction"] > 0:
      train = rows["train"]
      order = np.random.default_rng(o["seed"]).permutation(len(train))
      n_val = max(1, int(round(o["val_fraction"] * len(train))))
      rows["validation"] = [train[i] for i in np.sort(order[:n_val])]
      rows["train"] = [train[i] for i in np.sort(order[n_val:])]
    return rows  # without val_fraction, validation is the test set (LRA): aliased when read


def _as_bytes(text) -> bytes:
  return text if isinstance(text, bytes) else str(text).encode("utf-8", errors="surrogateescape")


class SsmlabRetrieval(_TaskBuilder):
  """LRA Retrieval (AAN): the bytes of both documents of a pair and whether they cite."""

  FEATURES = {"text1": _bytes_feature(), "text2": _bytes_feature(),
              "targets": tfds.features.Scalar(dtype=np.int32)}

  def _read(self):
    folder = Path(self.options["data_dir"])
    out = {}
    for split, name in retrieval_lib.SPLIT_FILES.items():
      t1, t2, labels = retrieval_lib.read_tsv(folder / name)
      if not labels.size:
        raise ValueError(f"AAN file {folder / name} holds no pairs")
      out[split] = [{"text1": np.frombuffer(a, np.uint8), "text2": np.frombuffer(b, np.uint8),
                     "targets": y} for a, b, y in zip(t1, t2, labels)]
    return out


class SsmlabImage(_TaskBuilder):
  """LRA Image: CIFAR-10 images as uint8 (h, w, 3) and their class."""

  FEATURES = {"image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8,
                                            encoding=tfds.features.Encoding.BYTES),
              "targets": tfds.features.Scalar(dtype=np.int32)}

  def _read(self):
    o = self.options
    if tfds_folder(o["source"]):  # TFDS's cifar10: image (32, 32, 3) uint8, label 0..9
      raw = {}
      for split in ("train", "test"):
        rows = read_tfds_folder(Path(o["source"]), split)
        raw[split] = (np.stack([np.asarray(r["image"], np.uint8) for r in rows]),
                      np.asarray([r["label"] for r in rows], np.int32))
    else:
      raw = image_lib.read_cifar(o["source"], o["cache_dir"])
    for split, (_, labels) in raw.items():
      if len(labels) and not (labels.min() >= 0 and labels.max() < image_lib.NUM_CLASSES):
        raise ValueError(f"CIFAR-10 {split} labels outside 0..9")
    tr, va = image_lib.split_train(len(raw["train"][1]), o["val_fraction"], o["seed"])
    parts = {"train": (raw["train"], tr), "validation": (raw["train"], va),
             "test": (raw["test"], np.arange(len(raw["test"][1])))}
    return {s: [{"image": images[i], "targets": labels[i]} for i in idx]
            for s, ((images, labels), idx) in parts.items()}


class SsmlabPathfinder(_TaskBuilder):
  """Pathfinder / Path-X: a uint8 (size, size) image and whether its two markers connect."""

  FEATURES = {"image": tfds.features.Tensor(shape=(None, None), dtype=np.uint8,
                                            encoding=tfds.features.Encoding.BYTES),
              "targets": tfds.features.Scalar(dtype=np.int32)}

  def _read(self):
    o = self.options
    size = o["size"]
    if o["data_dir"] is not None:
      folder = pathfinder_lib._find_contour_dir(Path(o["data_dir"]), size, o["contour_length"])  # noqa: SLF001
      images, labels = pathfinder_lib.read_images(folder, size)
    elif o.get("pack"):  # the same generated set, carried as one file
      folder = o["pack"]
      images, labels = pathfinder_lib.read_pack(folder, pathfinder_lib.generator_identity(
          **_identity_args(o["generator"], o)))
    else:
      with tempfile.TemporaryDirectory(prefix="pathfinder-") as tmp:
        folder = pathfinder_lib.write_dataset(tmp, **o["generator"], size=size,
                                              contour_length=o["contour_length"])
        images, labels = pathfinder_lib.read_generated(folder, size)
    if len(labels) < 10:
      raise ValueError(f"{folder}: {len(labels)} non-empty images; need at least 10 to split")
    return {s: [{"image": images[i], "targets": labels[i]} for i in idx]
            for s, idx in pathfinder_lib.split_indices(len(labels), o["split_seed"]).items()}


class SsmlabMqar(_TaskBuilder):
  """MQAR: generated sequences, targets and query masks (data/mqar.py)."""

  FEATURES = {"inputs": _bytes_feature(np.int32), "targets": _bytes_feature(np.int32),
              "mask": _bytes_feature(np.bool_)}

  def _read(self):
    o = dict(self.options)
    n_train, n_test, seed = o.pop("num_train"), o.pop("num_test"), o.pop("seed")
    out = {}
    for split, n, stream in (("train", n_train, 0), ("test", n_test, 1)):
      arrays = mqar_lib.generate(n, seed=[seed, stream], **o)
      out[split] = [{k: a[i] for k, a in arrays.items()} for i in range(n)]
    return out  # validation is the test split (Zoology has no other): aliased when read


class SsmlabLm(_TaskBuilder):
  """A text corpus split by document: each document's UTF-8 bytes (surrogateescape)."""

  FEATURES = {"document": _bytes_feature()}

  def _read(self):
    o = self.options
    docs = lm_lib.read_documents(o["path"], pattern=o["pattern"],
                                 document_split=o["document_split"], block_size=o["block_size"],
                                 members=o.get("members"))
    index = lm_lib.split_by_document(len(docs), val_fraction=o["val_fraction"],
                                     test_fraction=o["test_fraction"], seed=o["seed"],
                                     shuffle=o["shuffle_documents"])
    if not o["test_fraction"]:
      del index["test"]  # the test split is the validation split (to_arrays)
    return {s: [{"document": np.frombuffer(docs[i].encode("utf-8", errors="surrogateescape"),
                                           np.uint8)} for i in idx]
            for s, idx in index.items()}


# -- options -> (builder class, config) ---------------------------------------------------

def _positive_int(task, name, v):
  if isinstance(v, bool) or not isinstance(v, int) or v < 1:
    raise ValueError(f"{task} {name} must be a positive int, got {v!r}")


def _listops(opts):
  _positive_int("ListOps", "seq_len", opts["seq_len"])
  if opts["data_dir"] is not None:
    folder = Path(opts["data_dir"]).expanduser()
    missing = [f for f in listops_lib.SPLIT_FILES.values() if not (folder / f).is_file()]
    if missing:
      raise listops_lib._missing_files_error(folder, missing)  # noqa: SLF001
    options = dict(data_dir=str(folder.resolve()), fingerprint=fingerprint(folder))
    return SsmlabListops, f"files-{folder.name}-{options['fingerprint']}", options
  gen = {k: opts[k] for k in ("num_train", "num_val", "num_test", "seed", "min_length",
                              "max_length", "max_depth", "max_args")}
  listops_lib._check_generator_options(**gen)  # noqa: SLF001
  name = listops_lib.cache_name(**gen).replace("listops-", "gen-n", 1)
  return SsmlabListops, name, dict(data_dir=None, generator=gen)


def _text(opts):
  _positive_int("text", "seq_len", opts["seq_len"])
  frac = opts["val_fraction"]
  if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac < 1:
    raise ValueError(f"text val_fraction must be in [0, 1), got {frac!r}")
  source = (tfds_folder(opts["data_dir"]) if opts["data_dir"] is not None else None) or \
      text_lib.resolve_source(opts["data_dir"])
  options = dict(source=str(source.resolve()), fingerprint=fingerprint(source),
                 val_fraction=float(frac), seed=int(opts["seed"]))
  stem = _stem(source)
  return SsmlabText, f"{stem}-{options['fingerprint']}-val{frac:g}-seed{opts['seed']}", options


def _stem(source: Path) -> str:
  """A source's short name: "aclImdb", "cifar10-jpeg", or "tfds_cifar10" for a TFDS folder."""
  if tfds_folder(source):
    info = json.loads((source / "dataset_info.json").read_text())
    return f"tfds_{info.get('name', source.parent.name)}"
  return source.name.split(".")[0]


def _retrieval(opts):
  _positive_int("retrieval", "seq_len", opts["seq_len"])
  folder = retrieval_lib.resolve_dir(opts["data_dir"])
  options = dict(data_dir=str(folder.resolve()), fingerprint=fingerprint(folder))
  return SsmlabRetrieval, f"aan-{options['fingerprint']}", options


def _image(opts):
  image_lib._check(opts)  # noqa: SLF001
  source = image_lib.DEFAULT_SOURCE if opts["data_dir"] is None else Path(opts["data_dir"]).expanduser()
  if not source.exists():
    raise image_lib.missing_data_error(source)
  options = dict(source=str(source.resolve()), fingerprint=fingerprint(source),
                 cache_dir=opts["cache_dir"], val_fraction=float(opts["val_fraction"]),
                 seed=int(opts["seed"]))
  stem = _stem(source)
  name = f"{stem}-{options['fingerprint']}-val{opts['val_fraction']:g}-seed{opts['seed']}"
  return SsmlabImage, name, options


def _pathfinder(opts):
  task, size = opts["task"], opts["size"]
  if size not in pathfinder_lib.PRESETS:
    raise ValueError(f"{task} size must be one of {sorted(pathfinder_lib.PRESETS)}, got {size!r}")
  if opts["seq_len"] != size * size:
    raise ValueError(f"{task} seq_len must be size * size = {size * size}, got {opts['seq_len']!r}")
  if opts["normalize"] not in pathfinder_lib.NORMALIZE:
    raise ValueError(f"{task} normalize must be one of {pathfinder_lib.NORMALIZE}, "
                     f"got {opts['normalize']!r}")
  common = dict(size=size, contour_length=opts["contour_length"], split_seed=opts["split_seed"])
  tail = f"s{size}-len{opts['contour_length']}-split{opts['split_seed']}"
  if opts["data_dir"] is not None:
    folder = pathfinder_lib._find_contour_dir(Path(opts["data_dir"]).expanduser(), size,  # noqa: SLF001
                                              opts["contour_length"])
    options = dict(common, data_dir=str(folder.resolve()), fingerprint=fingerprint(folder))
    return SsmlabPathfinder, f"files-{options['fingerprint']}-{tail}", options
  version = opts.get("generator_version", pathfinder_lib.GENERATOR_VERSION)
  if version not in pathfinder_lib.GENERATOR_VERSIONS:
    raise ValueError(f"{task} generator_version must be one of "
                     f"{pathfinder_lib.GENERATOR_VERSIONS}, got {version!r}")
  gen = dict(num_examples=opts["num_examples"], seed=opts["seed"], num_workers=opts["num_workers"])
  if version != 2:  # v2 sets keep the options (and cache entries) they had before v3
    gen["version"] = version
  identity = pathfinder_lib.generator_identity(**_identity_args(gen, opts))
  # v3's images changed with its revision (data/pathfinder_v3.py REVISION): part of the name
  rev = f"r{identity['revision']}" if "revision" in identity else ""
  name = f"gen-n{gen['num_examples']}-v{version}{rev}-seed{gen['seed']}-{tail}"
  options = dict(common, data_dir=None, generator=gen)
  if opts.get("generated_pack"):
    # checked now (a clear error before any compile), read when the cache is built
    pack = Path(opts["generated_pack"]).expanduser().resolve()
    pathfinder_lib.read_pack_header(pack, identity)
    options["pack"] = str(pack)
  return SsmlabPathfinder, name, options


def _identity_args(gen, opts) -> dict:
  return dict(num_examples=gen["num_examples"], seed=gen["seed"], size=opts["size"],
              contour_length=opts["contour_length"], generator_version=gen.get("version", 2))


def _mqar(opts):
  for name in ("num_train", "num_test", "seed"):
    v = opts[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      raise ValueError(f"MQAR {name} must be a non-negative int, got {v!r}")
  shape = dict(vocab_size=opts["vocab_size"], seq_len=opts["seq_len"],
               num_kv_pairs=opts["num_kv_pairs"], power_a=opts["power_a"])
  mqar_lib.check_options(**shape)
  options = dict(shape, random_non_queries=bool(opts["random_non_queries"]),
                 num_train=opts["num_train"], num_test=opts["num_test"], seed=opts["seed"])
  name = (f"v{shape['vocab_size']}-l{shape['seq_len']}-k{shape['num_kv_pairs']}-"
          f"a{shape['power_a']:g}-fill{int(options['random_non_queries'])}-"
          f"n{opts['num_train']}_{opts['num_test']}-seed{opts['seed']}")
  return SsmlabMqar, name, options


def _lm(opts):
  lm_lib.check_options(opts)
  path, members = lm_lib.resolve_path(opts["path"])
  if not path.exists():
    lm_lib.read_documents(path)  # its FileNotFoundError names the corpus
  if opts["tokenizer"] != "char":  # a bad tokenizer fails before anything is prepared
    lm_lib.make_tokenizer(opts["tokenizer"])
  keys = ("pattern", "document_split", "block_size", "val_fraction", "test_fraction",
          "shuffle_documents", "seed")
  options = dict({k: opts[k] for k in keys}, path=str(path.resolve()), fingerprint=fingerprint(path))
  options["shuffle_documents"] = bool(options["shuffle_documents"])
  if members is not None:  # a named corpus: its member filter is part of what is stored
    options["members"] = members
  stem = opts["path"] if members is not None else path.name.split(".")[0]
  split = (opts["document_split"] if opts["document_split"] == "paragraph"
           else f"block{opts['block_size']}")
  name = (f"{stem}-{options['fingerprint']}-{split}-val{opts['val_fraction']:g}"
          f"-test{opts['test_fraction']:g}-{'shuffled' if options['shuffle_documents'] else 'kept'}"
          f"-seed{opts['seed']}-{_digest(repr(sorted(options.items())))}")
  return SsmlabLm, name, options


# -- stored examples -> arrays --------------------------------------------------------------

def _pad(rows: list[np.ndarray], seq_len: int, shift: int = 0) -> np.ndarray:
  """(n, seq_len) int32: each row + shift, truncated, padded with 0."""
  out = np.zeros((len(rows), seq_len), np.int32)
  for i, r in enumerate(rows):
    r = r[:seq_len]
    out[i, :len(r)] = r.astype(np.int32) + shift
  return out


def _tokens(cols, opts):
  inputs = _pad(cols["tokens"], opts["seq_len"])
  return ArrayDataset({"inputs": inputs, "mask": inputs != 0, "targets": _targets(cols)})


def _text_arrays(cols, opts):
  inputs = _pad(cols["text"], opts["seq_len"], shift=1)  # byte + 1; 0 pads
  return ArrayDataset({"inputs": inputs, "mask": inputs != 0, "targets": _targets(cols)})


def _retrieval_arrays(cols, opts):
  inputs = np.stack([_pad(cols["text1"], opts["seq_len"], 1), _pad(cols["text2"], opts["seq_len"], 1)],
                    axis=1)
  return ArrayDataset({"inputs": inputs, "mask": inputs != 0, "targets": _targets(cols)})


def _image_arrays(cols, opts):
  images = np.stack(cols["image"])
  h, w = images.shape[1:3]
  if h * w != opts["seq_len"]:
    raise ValueError(f"image seq_len {opts['seq_len']} must equal the images' h * w = {h}x{w}")
  x = image_lib.to_sequences(images, opts["grayscale"])
  return ArrayDataset({"inputs": x, "mask": np.ones(x.shape[:2], bool), "targets": _targets(cols)})


def _pathfinder_arrays(cols, opts):
  flat = np.stack(cols["image"]).reshape(len(cols["image"]), -1)
  return pathfinder_lib.PixelDataset({"inputs": flat, "targets": _targets(cols)},
                                     opts["normalize"])


def _mqar_arrays(cols, opts):
  return ArrayDataset({k: np.stack(cols[k]) for k in ("inputs", "targets", "mask")})


def _targets(cols) -> np.ndarray:
  return np.asarray(cols["targets"], np.int32)


TASKS = {  # task -> (options -> (builder, config name, options), (columns, opts) -> dataset)
    "listops": (_listops, _tokens), "text": (_text, _text_arrays),
    "retrieval": (_retrieval, _retrieval_arrays), "image": (_image, _image_arrays),
    "pathfinder": (_pathfinder, _pathfinder_arrays), "pathx": (_pathfinder, _pathfinder_arrays),
    "mqar": (_mqar, _mqar_arrays), "lm": (_lm, None),
}


# -- prepare and read -----------------------------------------------------------------------

def tfds_dir(opts) -> Path:
  """Where datasets are prepared and read: opts["tfds_dir"], else <cache root>/tfds."""
  if opts.get("tfds_dir"):
    return Path(opts["tfds_dir"]).expanduser()
  return listops_lib.cache_root(opts.get("cache_dir")) / "tfds"


class _QuietTfds(logging.Filter):
  """Drops TFDS's warnings about what is intended here (configs made at run time, a
  version folder not prepared yet); its other messages pass."""

  EXPECTED = ("Using custom data configuration", "has no dataset_info.json")

  def filter(self, record: logging.LogRecord) -> bool:
    return not any(text in record.getMessage() for text in self.EXPECTED)


logging.getLogger("absl").addFilter(_QuietTfds())


def builder(opts) -> tfds.core.DatasetBuilder:
  """The (unprepared or prepared) builder of a task's options."""
  make_config, _ = TASKS[opts["task"]]
  cls, name, options = make_config(opts)
  config = TaskConfig(name=name, options=options, description=f"ssmlab {opts['task']}: {name}")
  return cls(config=config, data_dir=str(tfds_dir(opts)), file_format=FILE_FORMAT)


def prepare(opts) -> tfds.core.DatasetBuilder:
  """The builder, prepared (written once; later calls only read its dataset_info)."""
  b = builder(opts)
  if not b.is_prepared():
    tfds.disable_progress_bar()  # one log line instead of per-split bars
    log.info("preparing %s/%s into %s", b.name, b.builder_config.name, b.data_dir)
    # TFDS prints its progress on stdout; it goes to stderr with the logs, so that stdout
    # keeps only what a command prints as its result (tables, RESULT lines).
    with contextlib.redirect_stdout(sys.stderr):
      b.download_and_prepare(download_dir=os.path.join(tempfile.gettempdir(), "ssmlab-tfds-dl"))
  return b


def read_split(b: tfds.core.DatasetBuilder, split: str) -> dict[str, list]:
  """Every example of a prepared split, as feature -> list of values (the stored order).

  Raises DataError when the split holds another number of examples than its
  dataset_info.json records (a file lost or cut)."""
  source = b.as_data_source(split=split)  # tfds.data_source: array_record, no TensorFlow
  expected = b.info.splits[split].num_examples
  if len(source) != expected:
    raise DataError(f"{b.data_dir}: the {split} split holds {len(source)} examples, its "
                    f"dataset_info.json records {expected}")
  rows = []
  for start in range(0, len(source), _READ_CHUNK):
    rows += source.__getitems__(range(start, min(len(source), start + _READ_CHUNK)))
  names = list(b.info.features.keys())
  return {k: [r[k] for r in rows] for k in names}


def _lm_splits(b, opts) -> tuple[TaskSpec, dict]:
  docs = {s: [d.tobytes().decode("utf-8", errors="surrogateescape") for d in read_split(b, s)["document"]]
          for s in b.info.splits.keys()}
  return lm_lib.build_splits(docs, opts)  # no stored test split: test is validation


def _spec(opts, splits) -> TaskSpec:
  task = opts["task"]
  if task == "listops":
    return TaskSpec(name=task, kind="classification", input_kind="tokens", seq_len=opts["seq_len"],
                    num_classes=listops_lib.NUM_CLASSES, vocab_size=listops_lib.VOCAB_SIZE)
  if task in ("text", "retrieval"):
    return TaskSpec(name=task, kind="classification" if task == "text" else "retrieval",
                    input_kind="tokens", seq_len=opts["seq_len"], num_classes=2,
                    vocab_size=text_lib.VOCAB_SIZE)
  if task == "image":
    return TaskSpec(name=task, kind="classification", input_kind="pixels", seq_len=opts["seq_len"],
                    num_classes=image_lib.NUM_CLASSES, in_channels=1 if opts["grayscale"] else 3)
  if task in ("pathfinder", "pathx"):
    return TaskSpec(name=task, kind="classification", input_kind="pixels",
                    seq_len=opts["seq_len"], num_classes=pathfinder_lib.NUM_CLASSES, in_channels=1)
  if task == "mqar":
    return TaskSpec(name=task, kind="lm", input_kind="tokens", seq_len=opts["seq_len"],
                    num_classes=opts["vocab_size"], vocab_size=opts["vocab_size"])
  raise ValueError(f"no TaskSpec rule for task {task!r}")


def load(opts: dict) -> tuple[TaskSpec, dict[str, ArrayDataset]]:
  """A task's (spec, splits) through its TFDS dataset (prepared here on first use).

  A prepared dataset that fails to read back (a file cut, edited or lost) is ours to
  rebuild: it is named in a warning, deleted and prepared again from its source.

  opts: the task's options, already checked against its DEFAULTS (data.registry).
  """
  try:
    return _load_prepared(prepare(opts), opts)
  except _READ_ERRORS as e:
    b = builder(opts)
    if not b.is_prepared():
      raise  # failed while preparing: the source's error, not the copy's
    log.warning("prepared dataset %s is unreadable (%s: %s); deleting it and preparing it "
                "again", b.data_dir, type(e).__name__, str(e)[:200])
    shutil.rmtree(b.data_dir)
    return _load_prepared(prepare(opts), opts)


# What reading a damaged array_record file or dataset_info.json raises.
_READ_ERRORS = (DataError, OSError, RuntimeError, ValueError, KeyError, IndexError)


def _load_prepared(b, opts):
  if opts["task"] == "lm":
    return _lm_splits(b, opts)
  _, to_arrays = TASKS[opts["task"]]
  stored = list(b.info.splits.keys())
  missing = [s for s in ("train", "test") if s not in stored]
  if missing:
    raise DataError(f"TFDS dataset {b.data_dir} lacks the split(s) {missing}; delete it to "
                    "prepare it again")
  splits = {s: to_arrays(read_split(b, s), opts) for s in stored}
  # Text without val_fraction, MQAR: validation is the test split (one object, as before).
  splits.setdefault("validation", splits["test"])
  return _spec(opts, splits), splits
