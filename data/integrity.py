"""Data that is what it says it is: expected counts, checksums, caches that rebuild.

Sources and caches carry what they should hold (example counts per split, a SHA-256 of
their content) and are checked against it when read:

  * a cache (ours: generated sets, decoded arrays) that is unreadable, incomplete or
    edited is named in a warning, deleted and rebuilt from its source;
  * a source (a data_dir, an archive) that is unreadable, or holds fewer examples than
    its own record or its release says, stops the run with DataError naming the file
    and how to get a good copy (nothing trains on part of the data);
  * any classification split of a few examples or more with a single label is an
    error (an archive of positive reviews alone trains to accuracy 1.0); see
    check_labels, which data.load_task applies to every task.

Cache files are .npz with an extra "__meta__" entry: JSON with the arrays' SHA-256
(over names, dtypes, shapes and bytes) and whatever the writer records (counts, the
source's key), written to a temporary file and renamed, so a reader never sees half.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# A split this large with one label is no accident of sampling.
MIN_EXAMPLES_FOR_LABEL_CHECK = 8
# What a damaged npz, gzip or tar file raises while being read.
READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)


class DataError(ValueError):
  """A data source or cache is not what it should be; the message names the file."""


def file_sha256(path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
  """SHA-256 over the names, dtypes, shapes and bytes of arrays, in name order."""
  h = hashlib.sha256()
  for name in sorted(arrays):
    a = np.ascontiguousarray(arrays[name])
    h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.data)
  return h.hexdigest()


def check_labels(task: str, split: str, targets) -> None:
  """DataError when a split of MIN_EXAMPLES_FOR_LABEL_CHECK or more has one label."""
  targets = np.asarray(targets)
  if len(targets) >= MIN_EXAMPLES_FOR_LABEL_CHECK and len(np.unique(targets)) < 2:
    raise DataError(
        f"{task} {split} split: all {len(targets)} examples have label {targets[0]}; a source "
        f"with one class trains to a meaningless accuracy. Check data.data_dir (an archive "
        f"or folder missing the other classes?)")


def check_count(what: str, path, got: int, expected: int) -> None:
  if got != expected:
    raise DataError(f"{path}: {got} {what}, expected {expected} (truncated, or not the file "
                    f"its record describes)")


def load_npz(path, expect: Mapping | None = None) -> dict[str, np.ndarray] | None:
  """The arrays of a cache written by save_npz, or None (after a warning, the file gone)
  when it is missing, unreadable, fails its checksum or its meta lacks `expect`'s items."""
  path = Path(path)
  if not path.is_file():
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays.pop("__meta__")).decode())
    problem = None
    if meta.get("sha256") != arrays_sha256(arrays):
      problem = "its arrays fail their checksum (edited or damaged)"
    elif any(meta.get(k) != v for k, v in (expect or {}).items()):
      problem = "its record does not match the source"
  except READ_ERRORS as e:
    problem = f"unreadable ({type(e).__name__}: {str(e)[:200]})"
  if problem is None:
    return arrays
  log.warning("data cache %s is %s; deleting it and rebuilding it from the source", path,
              problem)
  path.unlink(missing_ok=True)
  return None


def save_npz(path, arrays: Mapping[str, np.ndarray], meta: Mapping | None = None) -> None:
  """Writes a cache that load_npz verifies (atomically: a concurrent writer just wins)."""
  path = Path(path)
  record = dict(meta or {}, sha256=arrays_sha256(arrays))
  payload = dict(arrays, __meta__=np.frombuffer(json.dumps(record).encode(), np.uint8))
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **payload)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
