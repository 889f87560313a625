"""ListOps (Nangia & Bowman 2018) as the Long Range Arena builds it: generator, TSV files, reader.

An example is a nested expression over the digits 0-9 with four list operators,
MIN, MAX, MED (int of the median: the mean of the two middle values, floored, for an
even count) and SM (sum mod 10); the label is its value (10 classes).

Generator (google-research/long-range-arena lra_benchmarks/data/listops.py): a node
at depth < max_depth (the root has depth 1) is an operator with probability 0.25,
else a digit; a node at max_depth is a digit; an operator has 2..max_args arguments.
Length counts operators, closing brackets and digits (the tokens left once the
parentheses are gone); a tree is kept when min_length < length < max_length (strict,
as LRA does: 500 and 2000) and it differs from every tree kept before. The first
num_train trees go to train, the next num_val to validation, the rest to test
(LRA: 96000/2000/2000). A tree that grows past max_length is abandoned as soon as it
does, which does not change which trees are kept.

Files (the LRA release layout, lra_release/listops-1000): basic_train.tsv,
basic_val.tsv, basic_test.tsv; header "Source<TAB>Target"; Source as LRA's writer
spells a tree, every operator application nested one parenthesis per argument:
[MAX 1 7 2] is written "( ( ( ( [MAX 1 ) 7 ) 2 ) ] )". A generated set also has
meta.json: its options, the example count of each split and each file's SHA-256.

Checks (read_folder): a generated set in the cache that is short of examples, edited or
unreadable is generated again (with a warning); a data_dir is checked against its
meta.json, or the release's counts (96000/2000/2000) for a folder named listops-1000,
and a mismatch is a DataError naming the file. write_meta(folder) records a set of your
own.

Tokens (as S4 and S5 read LRA's files): parentheses dropped, "]" read as "X",
operators with or without their "[". Vocabulary ids:

    0 <pad>   1 <unk>   2 MIN   3 MAX   4 MED   5 SM   6 X   7..16 the digits 0..9

Inputs are truncated or padded with 0 to seq_len (2000; no end token).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from data.integrity import DataError, check_count, file_sha256
from data.pipeline import ArrayDataset
from data.task import TaskSpec

log = logging.getLogger(__name__)

OPERATORS = ("MIN", "MAX", "MED", "SM")
OPERATOR_PROB = 0.25  # LRA's VALUE_P: a node below max depth is an operator when random() <= 0.25

VOCAB = ("<pad>", "<unk>", *OPERATORS, "X", *(str(d) for d in range(10)))
TOKEN_IDS = {token: i for i, token in enumerate(VOCAB)}
PAD_ID, UNK_ID = 0, 1
VOCAB_SIZE = len(VOCAB)
NUM_CLASSES = 10

SPLIT_FILES = {"train": "basic_train.tsv", "validation": "basic_val.tsv", "test": "basic_test.tsv"}
RELEASE_FOLDER = "listops-1000"  # lra_release/listops-1000 holds the LRA files
RELEASE_COUNTS = {"train": 96000, "validation": 2000, "test": 2000}
HEADER = "Source\tTarget"
GENERATOR_VERSION = 1  # part of the cache key: bump when generated sets change

DEFAULTS: dict[str, Any] = dict(
    task="listops",
    data_dir=None,   # a folder with the three TSV files; None: generate into the cache
    cache_dir=None,  # cache root; None: $SSMLAB_CACHE or ~/.cache/ssmlab
    seq_len=2000,
    # The generator's options (ignored when data_dir is set).
    num_train=96000,
    num_val=2000,
    num_test=2000,
    seed=0,
    min_length=500,
    max_length=2000,
    max_depth=10,
    max_args=10,
)


def apply_operator(op: str, args: list[int]) -> int:
  """Value of one operator on its digit arguments."""
  if op == "MIN":
    return min(args)
  if op == "MAX":
    return max(args)
  if op == "MED":
    s = sorted(args)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) // 2
  if op == "SM":
    return sum(args) % 10
  raise ValueError(f"unknown ListOps operator {op!r}; valid: {OPERATORS}")


# Source pieces: an operator with k arguments opens k + 1 parentheses (LRA's to_string).
_OPENERS = {op: [("( " * (k + 1)) + "[" + op for k in range(64)] for op in OPERATORS}
_DIGITS = [str(d) for d in range(10)]


class _TooLong(Exception):
  pass


def _operator(rng: random.Random, depth: int, max_depth: int, max_args: int, pieces: list[str],
              length: list[int], limit: float) -> int:
  """Expand a node already drawn as an operator; digits inline (most nodes) to save calls."""
  # int(k * random()) draws uniformly from range(k) at a third of randrange's cost.
  rand = rng.random
  op = OPERATORS[int(4 * rand())]
  num_args = 2 + int((max_args - 1) * rand())
  length[0] += 2  # the operator and its closing bracket
  if length[0] >= limit:
    raise _TooLong
  pieces.append(_OPENERS[op][num_args])
  args = []
  child_can_branch = depth + 1 < max_depth
  for _ in range(num_args):
    if child_can_branch and rand() <= OPERATOR_PROB:
      args.append(_operator(rng, depth + 1, max_depth, max_args, pieces, length, limit))
    else:
      digit = int(10 * rand())
      length[0] += 1
      if length[0] >= limit:
        raise _TooLong
      pieces.append(_DIGITS[digit])
      args.append(digit)
    pieces.append(")")
  pieces.append("] )")
  return apply_operator(op, args)


def generate_tree(rng: random.Random, *, max_depth: int = 10, max_args: int = 10,
                  max_length: int | None = None) -> tuple[str, int, int] | None:
  """One random tree, the LRA recipe (the root has depth 1).

  Returns:
    (source in the release's spelling, length, value), or None when the tree reached
    max_length (and could never be kept).
  """
  if not 2 <= max_args < len(_OPENERS["MIN"]):
    raise ValueError(f"ListOps max_args must be in [2, 63], got {max_args!r}")
  limit = max_length if max_length is not None else float("inf")
  if not (1 < max_depth and rng.random() <= OPERATOR_PROB):
    digit = int(10 * rng.random())
    return None if 1 >= limit else (_DIGITS[digit], 1, digit)
  pieces: list[str] = []
  length = [0]
  try:
    value = _operator(rng, 1, max_depth, max_args, pieces, length, limit)
  except _TooLong:
    return None
  return " ".join(pieces), length[0], value


def _check_generator_options(num_train, num_val, num_test, seed, min_length, max_length,
                             max_depth, max_args):
  for name, v in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test),
                  ("seed", seed), ("min_length", min_length)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      raise ValueError(f"ListOps {name} must be a non-negative int, got {v!r}")
  if not isinstance(max_depth, int) or max_depth < 2:
    raise ValueError(f"ListOps max_depth must be an int >= 2, got {max_depth!r}")
  if not isinstance(max_args, int) or not 2 <= max_args < 64:
    raise ValueError(f"ListOps max_args must be an int in [2, 63], got {max_args!r}")
  # The shortest operator tree has length 4 ([OP d d X]); some length must fit strictly between.
  if not isinstance(max_length, int) or max_length < max(min_length + 2, 5):
    raise ValueError(f"ListOps needs max_length >= max(min_length + 2, 5) (kept: min_length < "
                     f"length < max_length), got min_length={min_length}, max_length={max_length!r}")


def write_dataset(out_dir, *, num_train: int = 96000, num_val: int = 2000, num_test: int = 2000,
                  seed: int = 0, min_length: int = 500, max_length: int = 2000,
                  max_depth: int = 10, max_args: int = 10, max_rejections: int = 1_000_000) -> Path:
  """Generate a ListOps set and write the three TSV files (and meta.json) into out_dir.

  Deterministic given the arguments. Raises RuntimeError when max_rejections trees in
  a row are rejected (options that admit too few distinct trees).
  """
  _check_generator_options(num_train, num_val, num_test, seed, min_length, max_length,
                           max_depth, max_args)
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  rng = random.Random(seed)
  seen: set[bytes] = set()
  counts = {"train": num_train, "validation": num_val, "test": num_test}
  for split, count in counts.items():
    with open(out_dir / SPLIT_FILES[split], "w", encoding="ascii", newline="") as f:
      f.write(HEADER + "\n")
      written, rejected = 0, 0
      while written < count:
        tree = generate_tree(rng, max_depth=max_depth, max_args=max_args, max_length=max_length)
        key = None
        if tree is not None and tree[1] > min_length:
          key = hashlib.blake2b(tree[0].encode(), digest_size=16).digest()
        if key is None or key in seen:
          rejected += 1
          if rejected >= max_rejections:
            raise RuntimeError(
                f"ListOps generation rejected {rejected} trees in a row (kept {len(seen)}); "
                f"min_length={min_length}, max_length={max_length}, max_depth={max_depth}, "
                f"max_args={max_args} admit too few distinct trees for the sizes asked")
          continue
        seen.add(key)
        rejected = 0
        f.write(f"{tree[0]}\t{tree[2]}\n")
        written += 1
  meta = dict(counts, seed=seed, min_length=min_length, max_length=max_length,
              max_depth=max_depth, max_args=max_args, generator_version=GENERATOR_VERSION)
  write_meta(out_dir, meta)
  return out_dir


def write_meta(folder, meta: dict | None = None) -> Path:
  """folder/meta.json: the example count of each split (counted from the files when
  `meta` lacks them) and each file's SHA-256, which every read checks. Run it once on a
  set of your own, so that a later truncation or edit is caught."""
  folder = Path(folder)
  meta = dict(meta or {})
  for split, name in SPLIT_FILES.items():
    if split not in meta:
      meta[split] = len(read_tsv(folder / name)[0])
  meta["sha256"] = {name: file_sha256(folder / name) for name in SPLIT_FILES.values()}
  tmp = folder / "meta.json.tmp"
  tmp.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
  os.replace(tmp, folder / "meta.json")
  return folder / "meta.json"


def cache_root(cache_dir=None) -> Path:
  """cache_dir, else $SSMLAB_CACHE, else ~/.cache/ssmlab."""
  root = cache_dir or os.environ.get("SSMLAB_CACHE") or "~/.cache/ssmlab"
  return Path(root).expanduser()


def cache_name(*, num_train, num_val, num_test, seed, min_length, max_length, max_depth,
               max_args) -> str:
  return (f"listops-{num_train}_{num_val}_{num_test}-len{min_length}_{max_length}"
          f"-depth{max_depth}_args{max_args}-v{GENERATOR_VERSION}-seed{seed}")


def _complete(folder: Path) -> bool:
  return all((folder / f).is_file() for f in (*SPLIT_FILES.values(), "meta.json"))


def ensure_generated(cache_dir=None, **options) -> Path:
  """The folder of a generated set with these generator options, generating it if missing.

  The set is written into a temporary folder beside its final place and renamed in
  one step, so a killed generation leaves no half set; a concurrent generator of the
  same set (another host) simply wins the rename.
  """
  _check_generator_options(**options)
  root = cache_root(cache_dir)
  final = root / cache_name(**options)
  if _complete(final):
    return final
  root.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
  try:
    write_dataset(tmp, **options)
    if final.exists() and not _complete(final):
      shutil.rmtree(final)  # an incomplete folder left by hand; ours are complete or absent
    try:
      os.rename(tmp, final)
    except OSError:
      if not _complete(final):
        raise
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return final


# Reading. Fast path: every token becomes one character, so a line is encoded by one
# NumPy lookup; lines with anything unusual fall back to a per-token dictionary.
_ONE_CHAR = {"MIN": "\x02", "MAX": "\x03", "MED": "\x04", "SM": "\x05"}
_STRIP = str.maketrans({"(": None, ")": None, "[": None, "]": "X"})
_LOOKUP = np.full(256, UNK_ID, np.int32)
for _op, _ch in _ONE_CHAR.items():
  _LOOKUP[ord(_ch)] = TOKEN_IDS[_op]
_LOOKUP[ord("X")] = TOKEN_IDS["X"]
for _d in range(10):
  _LOOKUP[ord(str(_d))] = TOKEN_IDS[str(_d)]


def tokenize(source: str) -> np.ndarray:
  """Token ids (int32) of one Source string; unknown tokens -> <unk>."""
  stripped = source.translate(_STRIP)
  fast = stripped
  for op, ch in _ONE_CHAR.items():
    fast = fast.replace(op, ch)
  tokens = fast.split()
  joined = "".join(tokens)
  if len(joined) == len(tokens) and joined.isascii():
    return _LOOKUP[np.frombuffer(joined.encode("ascii"), np.uint8)]
  return np.array([TOKEN_IDS.get(t, UNK_ID) if t not in ("<pad>", "<unk>") else UNK_ID
                   for t in stripped.split()], np.int32)


def detokenize(ids) -> str:
  """Space-separated tokens of an id sequence, padding dropped (for inspection)."""
  return " ".join(VOCAB[i] for i in np.asarray(ids).tolist() if i != PAD_ID)


def read_tsv(path) -> tuple[list[str], np.ndarray]:
  """(sources, targets int32) of a ListOps TSV file with a "Source<TAB>Target" header."""
  path = Path(path)
  with open(path, encoding="utf-8", newline="") as f:
    lines = f.read().splitlines()
  if not lines:
    raise ValueError(f"{path} is empty; expected a header {HEADER!r}")
  header = lines[0].split("\t")
  if "Source" not in header or "Target" not in header:
    raise ValueError(f"{path}: header {lines[0]!r} lacks the columns Source and Target")
  src_col, tgt_col = header.index("Source"), header.index("Target")
  sources, targets = [], []
  for line_no, line in enumerate(lines[1:], start=2):
    if not line.strip():
      continue
    fields = line.split("\t")
    if len(fields) != len(header):
      raise ValueError(f"{path}:{line_no}: {len(fields)} fields, the header has {len(header)}")
    try:
      target = int(fields[tgt_col])
    except ValueError:
      raise ValueError(f"{path}:{line_no}: Target {fields[tgt_col]!r} is not an int") from None
    if not 0 <= target < NUM_CLASSES:
      raise ValueError(f"{path}:{line_no}: Target {target} is not in 0..{NUM_CLASSES - 1}")
    sources.append(fields[src_col])
    targets.append(target)
  return sources, np.asarray(targets, np.int32)


def encode(sources: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(inputs (n, seq_len) int32 padded with 0, untruncated lengths (n,) int32)."""
  inputs = np.zeros((len(sources), seq_len), np.int32)
  lengths = np.zeros(len(sources), np.int32)
  for i, source in enumerate(sources):
    ids = tokenize(source)
    lengths[i] = len(ids)
    ids = ids[:seq_len]
    inputs[i, :len(ids)] = ids
  return inputs, lengths


def read_split(path, seq_len: int = 2000, expected: int | None = None) -> ArrayDataset:
  """ArrayDataset with inputs (n, seq_len) int32, mask (n, seq_len) bool, targets (n,) int32;
  DataError when `expected` is given and the file holds another number of examples."""
  sources, targets = read_tsv(path)
  if expected is not None:
    check_count("examples", path, len(sources), expected)
  inputs, _ = encode(sources, seq_len)
  return ArrayDataset({"inputs": inputs, "mask": inputs != PAD_ID, "targets": targets})


def _read_meta(folder: Path) -> dict | None:
  path = folder / "meta.json"
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise DataError(f"{path} is not valid JSON ({e})") from None


def read_folder(folder, seq_len: int, *, record_checksums: bool = False) -> dict[str, ArrayDataset]:
  """The three splits of a folder, checked against what it should hold.

  Expected: folder/meta.json's counts and SHA-256s (write_dataset and write_meta write
  it); without one, a folder named listops-1000 (the LRA release) must hold the
  release's RELEASE_COUNTS, and any other is read as it is. record_checksums: add the
  SHA-256s to a meta.json that lacks them (a cache written before they existed).

  Raises:
    DataError: a file with the wrong count or content, naming it.
  """
  folder = Path(folder)
  meta = _read_meta(folder)
  expected = ({s: meta.get(s) for s in SPLIT_FILES} if meta is not None
              else RELEASE_COUNTS if folder.name == RELEASE_FOLDER else {})
  splits = {split: read_split(folder / name, seq_len, expected.get(split))
            for split, name in SPLIT_FILES.items()}
  digests = (meta or {}).get("sha256")
  if digests:
    for name in SPLIT_FILES.values():
      if file_sha256(folder / name) != digests.get(name):
        raise DataError(f"{folder / name}: its content differs from the SHA-256 in "
                        f"{folder / 'meta.json'} (edited or damaged)")
  elif meta is not None and record_checksums:
    write_meta(folder, meta)
  return splits


def _missing_files_error(folder: Path, missing: list[str]) -> FileNotFoundError:
  return FileNotFoundError(
      f"ListOps data_dir {str(folder)!r} lacks {missing}. Expected files there: "
      f"{list(SPLIT_FILES.values())} (TSV, header 'Source<TAB>Target'). Get them from the LRA "
      "release (lra_release.gz linked from github.com/google-research/long-range-arena; "
      "folder lra_release/listops-1000), or set data.data_dir=None to generate a set into "
      "the cache (~/.cache/ssmlab, or $SSMLAB_CACHE, or data.cache_dir).")


def load_task(data_cfg) -> tuple[TaskSpec, dict[str, ArrayDataset]]:
  """ListOps for `data.load_task`; data_cfg keys and defaults: see DEFAULTS."""
  from data.registry import task_options  # late: the registry imports this module lazily
  opts = task_options(data_cfg, DEFAULTS)
  seq_len = opts["seq_len"]
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"ListOps seq_len must be a positive int, got {seq_len!r}")
  if opts["data_dir"] is not None:
    folder = Path(opts["data_dir"]).expanduser()
    missing = [f for f in SPLIT_FILES.values() if not (folder / f).is_file()]
    if missing:
      raise _missing_files_error(folder, missing)
    try:
      splits = read_folder(folder, seq_len)
    except DataError as e:
      raise DataError(f"ListOps data_dir: {e}. Get the files again (the LRA release, or "
                      f"data.listops.write_dataset for a generated set)") from None
  else:
    gen = {k: opts[k] for k in ("num_train", "num_val", "num_test", "seed", "min_length",
                                "max_length", "max_depth", "max_args")}
    folder = ensure_generated(opts["cache_dir"], **gen)
    try:
      splits = read_folder(folder, seq_len, record_checksums=True)
    except (DataError, ValueError, OSError) as e:  # ours to rebuild: deterministic
      log.warning("generated ListOps set %s is damaged (%s); generating it again", folder, e)
      shutil.rmtree(folder)
      splits = read_folder(ensure_generated(opts["cache_dir"], **gen), seq_len)
  spec = TaskSpec(name="listops", kind="classification", input_kind="tokens", seq_len=seq_len,
                  num_classes=NUM_CLASSES, vocab_size=VOCAB_SIZE)
  return spec, splits
