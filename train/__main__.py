r"""Command line: `python -m train --config=FILE.py[:ARG] --workdir=DIR [--config.X.Y=V ...]`.

  python -m train --config=configs/lra/listops.py:s4d --workdir=runs/listops_s4d
  python -m train --config=configs/lra/listops.py:s4d,local --workdir=/tmp/demo \
      --config.train.num_steps=300 --config.optim.lr=3e-3

The config is locked: overriding a field that does not exist fails. Rerunning with the
same workdir resumes from its latest checkpoint (a changed config is refused unless
--config.train.resume=allow_changes or =restart: train/workdir.py).

Exit status: 0 when the run finished (or halted at config.train.halt_at_step); 1 with a
one-line "train: error: ..." for a config, data, workdir or checkpoint problem (the line
names the field or file; --verbose adds the traceback; other errors are bugs and print
theirs); 128 + the signal number (130 SIGINT, 143 SIGTERM) after a signal stopped the
run and its checkpoint was saved: rerun the same command to continue.
"""

import logging
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':arg' (e.g. configs/lra/listops.py:s4d).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the full traceback of every error.")
flags.mark_flags_as_required(["config", "workdir"])


def _run_errors() -> tuple:
  from train import checkpoint, trainer, workdir
  return (trainer.NonFiniteLossError, checkpoint.CheckpointError,
          workdir.WorkdirLockedError, workdir.ConfigMismatchError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  # orbax logs every file operation at INFO through absl's logger; keep its warnings only,
  # and its errors (a failed background save logs a traceback per stage) in one line each.
  logging.getLogger("absl").setLevel(logging.WARNING)
  if not _VERBOSE.value:
    from train import checkpoint
    checkpoint.shorten_orbax_errors()
    checkpoint.quiet_abandoned_reads()  # a failed save's threads print as it fails
  try:
    from train import trainer  # run() connects a multi-host job first thing
    out = trainer.run(_CONFIG.value, _WORKDIR.value)
  except BaseException as e:  # noqa: BLE001 -- reported in one line, or re-raised
    from train import errors
    line = None if isinstance(e, SystemExit) else errors.one_line(e, _run_errors())
    if line is None or _VERBOSE.value:
      raise
    from train import checkpoint
    checkpoint.quiet_abandoned_reads()  # a failed save or read leaves orbax threads behind
    if isinstance(e, KeyboardInterrupt):
      line += f"; the checkpoints saved so far are kept in {_WORKDIR.value}: rerun to continue"
    print(f"train: error: {line}\n  (rerun with --verbose for the traceback)", file=sys.stderr)
    sys.exit(130 if isinstance(e, KeyboardInterrupt) else 1)
  if "stopped_at_step" in out:
    print(f"train: stopped by {out['signal']} at step {out['stopped_at_step']} of "
          f"{out['num_steps']}; checkpoint saved in {_WORKDIR.value}: rerun the same command "
          f"to continue", file=sys.stderr)
    signum = getattr(signal, str(out["signal"]), signal.SIGTERM)
    sys.exit(128 + int(signum))


def _config_error(e: BaseException) -> str:
  """One line for a config that failed to load or to take an override."""
  for cause in (e, e.__cause__, e.__context__):
    if isinstance(cause, KeyError) and cause.args:  # ml_collections: no such field
      return f"config: unknown field {' '.join(str(cause.args[0]).split())}"
  lines = str(e).strip().splitlines()
  if "Traceback (most recent call last)" in str(e):  # get_config raised: its last line
    return f"config: {lines[-1].strip()}"
  return " ".join(" ".join(lines).split())


def _parse_flags(argv):
  """absl's flag parsing, with the errors of a config file or override in one line."""
  try:
    args = flags.FLAGS(argv)
    _CONFIG.value.train  # noqa: B018 -- a config file that failed to load raises here
    return args
  except Exception as e:  # noqa: BLE001 -- a bad flag, config file or --config.* override
    if "--verbose" in argv:
      raise
    print(f"train: error: {_config_error(e)}\n  (python -m train --helpshort lists the "
          f"flags; --verbose adds the traceback)", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
