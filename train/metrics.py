"""Losses and accuracy (pure), and where metrics go (workdir/metrics.jsonl, TensorBoard, tty).

Losses are cross-entropy weighted by the batch's "weights" (0 for the padding rows the
eval loaders add) and, for per-position tasks (kind "lm"), by its "mask". The step
functions return *sums* (loss_sum, correct, weight), so an evaluation over many batches
is exact: total loss_sum / total weight over all real examples (or target positions).

TensorBoard: tensorboardX writes the event files (workdir/tb/) without TensorFlow. A
resumed run opens its writer with purge_step = the checkpoint's step + 1, so TensorBoard
drops what a killed process logged past that checkpoint and shows each step once. Every
metric also goes to workdir/metrics.jsonl, one JSON object per line:
{"step": int, "split": "train" | "val" | "test", "time": unix seconds, <name>: float, ...}.

Progress: a tqdm bar (steps, rate, ETA, the latest loss) on a terminal; plain lines, one
per log interval or evaluation, when stdout is not a tty (a log file, a cluster's output).
"""

import json
import math
import os
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


# -- writers ----------------------------------------------------------------------------

class MetricWriter:
  """workdir/metrics.jsonl (always) and workdir/tb/ event files; only process 0 writes.

  The TensorBoard writer opens on the first write, after resume_at has set its
  purge_step (a resumed run) or not (a fresh workdir).
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    self._tb_dir = os.path.join(workdir, "tb") if tensorboard else None
    self._purge_step = None
    if self.enabled:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def resume_at(self, step: int) -> int:
    """Before a resumed run writes: metrics.jsonl keeps the records up to `step` (the
    checkpoint's); later ones go to metrics_superseded.jsonl (drop_after), and TensorBoard
    purges its events from step + 1 on. Returns how many records moved."""
    if not self.enabled:
      return 0
    path = self._jsonl.name
    self._jsonl.close()
    moved = drop_after(path, step)
    self._jsonl = open(path, "a")
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    self._purge_step = int(step) + 1
    return moved

  def _tensorboard(self):
    if self._tb is None and self._tb_dir is not None:
      from tensorboardX import SummaryWriter  # noqa: PLC0415 -- only process 0 needs it
      # tensorboardX names files by the second; a resumed writer may start within the
      # same one, and TensorBoard reads the files in name order: nanoseconds keep both.
      self._tb = SummaryWriter(self._tb_dir, purge_step=self._purge_step, flush_secs=10,
                               filename_suffix=f".{time.time_ns()}.{os.getpid()}")
    return self._tb

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
             for k, v in metrics.items()}
    line = dict(step=int(step), split=split, time=round(time.time(), 3), **clean)
    self._jsonl.write(json.dumps(line, allow_nan=True) + "\n")
    self._jsonl.flush()
    tb = self._tensorboard()
    if tb is not None:
      for k, v in clean.items():
        if isinstance(v, float) and math.isfinite(v):
          tb.add_scalar(f"{split}/{k}", v, global_step=int(step))
      if split != "train":  # rare and worth seeing at once; train scalars flush every 10 s
        tb.flush()

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
  """A tqdm progress bar on a terminal (steps, rate, ETA, latest values); plain lines,
  one per log interval or evaluation, otherwise. Only process 0 prints.

  Args:
    total_steps: the run's num_steps.
    initial: the step a resumed run starts from (the bar's rate counts new steps only).
    stream: where to print (sys.stdout); a tty gets the bar.
  """

  def __init__(self, total_steps: int, *, initial: int = 0, stream=None):
    self.stream = stream or sys.stdout
    self.total = total_steps
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.enabled = jax.process_index() == 0
    self._bar = None
    self._last_step = initial
    if self.enabled and self.tty:
      from tqdm import tqdm  # noqa: PLC0415
      self._bar = tqdm(total=total_steps, initial=initial, file=self.stream, unit="step",
                       dynamic_ncols=True, mininterval=0.1, smoothing=0.1)

  def _fmt(self, step: int, values: dict) -> str:
    parts = [f"step {step}/{self.total}"]
    for k, v in values.items():
      if isinstance(v, float):
        parts.append(f"{k} {v:.4g}")
      else:
        parts.append(f"{k} {v}")
    return "  ".join(parts)

  def live(self, step: int, values: dict) -> None:
    """Called every step: advances the bar and shows `values` beside it (tty only)."""
    if self._bar is None:
      return
    self._bar.update(step - self._last_step)
    self._last_step = step
    self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                           for k, v in values.items()}, refresh=False)

  def line(self, step: int, values: dict, prefix: str = "") -> None:
    """A permanent line (log intervals, evaluations); above the bar on a tty."""
    if not self.enabled:
      return
    text = (prefix + " " if prefix else "") + self._fmt(step, values)
    if self._bar is not None:
      self._bar.write(text, file=self.stream)
    else:
      self.stream.write(text + "\n")
      self.stream.flush()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
