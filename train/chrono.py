"""The trainer's clock, in one object (after big_vision's `u.chrono`).

Two times are kept:
- `train_time_s`: wall time of the step loops (evaluation and saving included) that led
  to the state, summed over resumes through the checkpoint meta, with `runs` the number
  of processes behind it. What a killed process did after its last checkpoint is lost
  with it and not counted.
- the throughput window between two log lines: examples and steps over the time spent
  stepping, the first step of a process (compilation) and the pauses for evaluation and
  saving left out.
"""

from __future__ import annotations

import contextlib
import time


class Chrono:
  """Clock of one process's step loop; `meta`: the resumed checkpoint's (None: a fresh
  start)."""

  def __init__(self, meta: dict | None = None):
    self._earlier = float((meta or {}).get("train_time_s") or 0.0)
    # A checkpoint written before runs were counted had at least one run behind it.
    self._runs = 0 if meta is None else int(meta.get("runs") or 1)
    self._loop_start = time.time()
    self._open_window()

  def _open_window(self) -> None:
    self._window_start = time.perf_counter()
    self._examples = 0
    self._steps = 0

  def step(self, examples: int) -> None:
    """One more step of `examples` examples in the window."""
    self._examples += examples
    self._steps += 1

  def first_step_done(self) -> float:
    """Seconds the window has run (the first step, compilation included); the window
    restarts so that throughput leaves it out."""
    took = time.perf_counter() - self._window_start
    self._open_window()
    return took

  def rates(self) -> dict:
    """examples_per_s and step_time_s over the window ({} when it timed no step); the
    window restarts."""
    out = {}
    if self._steps:
      elapsed = max(time.perf_counter() - self._window_start, 1e-9)
      out = dict(examples_per_s=self._examples / elapsed, step_time_s=elapsed / self._steps)
    self._open_window()
    return out

  @contextlib.contextmanager
  def paused(self):
    """Time spent inside is not step time (evaluation, saving)."""
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self._window_start += time.perf_counter() - t0

  def meta(self) -> dict:
    """train_time_s and runs of the state as of now, for the checkpoint meta and results."""
    return dict(train_time_s=round(self._earlier + time.time() - self._loop_start, 2),
                runs=self._runs + 1)
