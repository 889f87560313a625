"""SIGINT and SIGTERM as a request to save and stop at the next step boundary.

The first signal sets a flag and the run goes on to the end of the current step; the
trainer feeds the flag into the train step, which returns its maximum over every process
(sharding.stop_flags), so all processes of a multi-host job see the request at the same
step, save the same checkpoint and stop together. A second signal raises
KeyboardInterrupt at once (no save).

Why not orbax's CheckpointManager.reached_preemption: it asks JAX's preemption service,
which exists only under jax.distributed and listens to SIGTERM alone; the flag covers
Ctrl-C and single-process runs too, and costs no extra synchronisation.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
  """Context manager: while inside, SIGINT/SIGTERM set `self.signum` instead of killing.

  Outside the main thread (where Python cannot install handlers) it does nothing.
  """

  def __init__(self, signals=SIGNALS):
    self.signals = tuple(signals)
    self.signum: int | None = None
    self._previous: dict = {}

  @property
  def name(self) -> str | None:
    return signal.Signals(self.signum).name if self.signum else None

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def _handle(self, signum, frame):
    if self.signum is not None:
      raise KeyboardInterrupt(f"second signal ({signal.Signals(signum).name}): stopping "
                              f"without saving")
    self.signum = signum
    log.warning("received %s: saving a checkpoint after the current step, then stopping "
                "(send it again to stop at once, without saving)", self.name)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()
