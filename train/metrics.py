"""Losses and accuracy (pure), and where metrics go (workdir/metrics.jsonl, TensorBoard, tty).

Losses are cross-entropy weighted by the batch's "weights" (0 for the padding rows the
eval loaders add) and, for per-position tasks (kind "lm"), by its "mask". The step
functions return *sums* (loss_sum, correct, weight), so an evaluation over many batches
is exact: total loss_sum / total weight over all real examples (or target positions).

TensorBoard: flax's writer and clu need TensorFlow, which is not a dependency, so
`EventFileWriter` writes the event-file format itself (TFRecord framing with masked
CRC-32C, Event/Summary protobufs with scalar `simple_value`s hand-encoded: about 60
lines). Every metric also goes to workdir/metrics.jsonl, one JSON object per line:
{"step": int, "split": "train" | "val" | "test", "time": unix seconds, <name>: float, ...}.
"""

import json
import math
import os
import socket
import struct
import sys
import time

import jax
import jax.numpy as jnp
import optax


# -- losses -----------------------------------------------------------------------------

def loss_sums(logits, batch: dict, kind: str) -> dict:
  """Weighted cross-entropy and accuracy sums of one batch.

  Args:
    logits: (b, num_classes) for "classification" / "retrieval", (b, l, num_classes) for "lm".
    batch: "targets" (b,) or (b, l) int; "weights" (b,); "mask" (b, l) for "lm".
    kind: the TaskSpec kind.

  Returns:
    dict of float32 scalars: loss_sum, correct, weight (the sum of the weights).
  """
  targets = batch["targets"]
  weights = batch["weights"].astype(jnp.float32)
  if kind == "lm":
    if logits.ndim != 3 or targets.shape != logits.shape[:2]:
      raise ValueError(f"lm logits (b, l, c) and targets (b, l) expected, got "
                       f"{logits.shape} and {targets.shape}")
    weights = batch["mask"].astype(jnp.float32) * weights[:, None]
  elif logits.ndim != 2 or targets.shape != logits.shape[:1]:
    raise ValueError(f"{kind} logits (b, c) and targets (b,) expected, got "
                     f"{logits.shape} and {targets.shape}")
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return dict(loss_sum=jnp.sum(ce * weights), correct=jnp.sum(correct * weights),
              weight=jnp.sum(weights))


def summarize(sums: dict) -> dict:
  """loss and accuracy from summed metrics (host floats)."""
  w = float(sums["weight"])
  if w <= 0:
    return dict(loss=float("nan"), accuracy=float("nan"), weight=0.0)
  return dict(loss=float(sums["loss_sum"]) / w, accuracy=float(sums["correct"]) / w, weight=w)


# -- TensorBoard event files ------------------------------------------------------------

def _crc32c_table():
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte = n & 0x7F
    n >>= 7
    if n:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:  # length-delimited (wire type 2)
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: dict | None = None) -> bytes:
  """An Event protobuf: wall_time (1, double), step (2, int64), file_version (3),
  summary (5) = Summary { repeated Value value = 1 { tag = 1; simple_value = 2 (float) } }."""
  msg = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
  if file_version is not None:
    msg += _field_bytes(3, file_version.encode())
  if scalars:
    values = b"".join(
        _field_bytes(1, _field_bytes(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
        for tag, value in scalars.items())
    msg += _field_bytes(5, values)
  return msg


def _record(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", _masked_crc(header)) + data
          + struct.pack("<I", _masked_crc(data)))


class EventFileWriter:
  """Scalar summaries in TensorBoard's event-file format, without TensorFlow."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._f = open(self.path, "ab")
    self._f.write(_record(_event(time.time(), 0, file_version="brain.Event:2")))
    self._f.flush()

  def scalars(self, step: int, values: dict[str, float]) -> None:
    values = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
    if values:
      self._f.write(_record(_event(time.time(), int(step), scalars=values)))
      self._f.flush()

  def close(self) -> None:
    self._f.close()


def read_event_scalars(path: str) -> list[tuple[int, str, float]]:
  """(step, tag, value) of every scalar in an event file written above (for tests)."""
  out = []
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    (n,) = struct.unpack_from("<Q", data, pos)
    header = data[pos:pos + 8]
    if struct.unpack_from("<I", data, pos + 8)[0] != _masked_crc(header):
      raise ValueError("bad header CRC")
    body = data[pos + 12:pos + 12 + n]
    if struct.unpack_from("<I", data, pos + 12 + n)[0] != _masked_crc(body):
      raise ValueError("bad body CRC")
    pos += 16 + n
    fields = _parse(body)
    step = fields.get(2, [0])[0]
    for summary in fields.get(5, []):
      for value in _parse(summary).get(1, []):
        v = _parse(value)
        out.append((step, v[1][0].decode(), struct.unpack("<f", v[2][0])[0]))
  return out


def _parse(buf: bytes) -> dict[int, list]:
  """Minimal protobuf decoder: field number -> list of raw values."""
  fields, pos = {}, 0

  def varint():
    nonlocal pos
    shift = result = 0
    while True:
      b = buf[pos]
      pos += 1
      result |= (b & 0x7F) << shift
      shift += 7
      if not b & 0x80:
        return result

  while pos < len(buf):
    key = varint()
    number, wire = key >> 3, key & 7
    if wire == 0:
      value = varint()
    elif wire == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire == 2:
      n = varint()
      value, pos = buf[pos:pos + n], pos + n
    elif wire == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    else:
      raise ValueError(f"unsupported wire type {wire}")
    fields.setdefault(number, []).append(value)
  return fields


# -- writers ----------------------------------------------------------------------------

class MetricWriter:
  """workdir/metrics.jsonl (always) and workdir/tb/ event files; only process 0 writes."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if self.enabled:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      if tensorboard:
        self._tb = EventFileWriter(os.path.join(workdir, "tb"))

  def resume_at(self, step: int) -> int:
    """Before a resumed run writes: metrics.jsonl keeps the records up to `step` (the
    checkpoint's); later ones go to metrics_superseded.jsonl (drop_after). Returns how
    many moved."""
    if not self.enabled:
      return 0
    path = self._jsonl.name
    self._jsonl.close()
    moved = drop_after(path, step)
    self._jsonl = open(path, "a")
    return moved

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
             for k, v in metrics.items()}
    line = dict(step=int(step), split=split, time=round(time.time(), 3), **clean)
    self._jsonl.write(json.dumps(line, allow_nan=True) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.scalars(step, {f"{split}/{k}": v for k, v in clean.items()
                              if isinstance(v, float) and math.isfinite(v)})

  def close(self) -> None:
    for f in (self._jsonl, self._tb):
      if f is not None:
        f.close()
    self._jsonl = self._tb = None


def drop_after(path: str, step: int) -> int:
  """Moves the records of metrics.jsonl at `path` with a step past `step` to
  <name>_superseded.jsonl beside it (appended; nothing is deleted) and returns how many.

  A run resumed from the checkpoint at `step` redoes the steps after it, and the records
  the killed process wrote for them would otherwise sit twice in the curve (with
  different values: a GPU run is not bitwise reproducible).
  """
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  keep, drop = [], []
  for line in lines:
    try:
      past = int(json.loads(line)["step"]) > step
    except (ValueError, KeyError, TypeError):
      past = False  # not a record of ours: leave it where it is
    (drop if past else keep).append(line)
  if drop:
    with open(path[:-len(".jsonl")] + "_superseded.jsonl", "a") as f:
      f.writelines(drop)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)
  return len(drop)


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """A live status line on a terminal; plain lines (one per log interval) otherwise."""

  def __init__(self, total_steps: int, stream=None):
    self.stream = stream or sys.stdout
    self.total = total_steps
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.enabled = jax.process_index() == 0
    self._last = 0.0
    self._width = 0

  def _fmt(self, step: int, values: dict) -> str:
    parts = [f"step {step}/{self.total}"]
    for k, v in values.items():
      if isinstance(v, float):
        parts.append(f"{k} {v:.4g}")
      else:
        parts.append(f"{k} {v}")
    return "  ".join(parts)

  def live(self, step: int, values: dict) -> None:
    """Called every step; redraws the line at most 10 times a second (tty only)."""
    now = time.monotonic()
    if not (self.enabled and self.tty) or now - self._last < 0.1:
      return
    self._last = now
    line = self._fmt(step, values)
    self.stream.write("\r" + line.ljust(self._width))
    self._width = len(line)
    self.stream.flush()

  def line(self, step: int, values: dict, prefix: str = "") -> None:
    """A permanent line (log intervals, evaluations)."""
    if not self.enabled:
      return
    text = (prefix + " " if prefix else "") + self._fmt(step, values)
    if self.tty:
      self.stream.write("\r" + text.ljust(self._width) + "\n")
      self._width = 0
    else:
      self.stream.write(text + "\n")
    self.stream.flush()
