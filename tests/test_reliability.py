"""The trainer never loses work: each case of issue 24 replayed, with its outcome asserted.

Given a workdir in some state, when a trainer starts (in process, or as `python -m train`
in a subprocess for exit codes, signals and what the user sees), then: the exit code, the
one-line message, the workdir unchanged where nothing should change, and losses after a
resume identical to an uninterrupted run. The tiny ListOps run and the compilation cache
are test_train's.
"""

import errno
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_train import (REPO, cli_args, data_cache, env_for_subprocess,  # noqa: F401
                              jax_cache, tiny_config, train_losses)
from train import checkpoint as checkpoint_lib
from train import errors as errors_lib
from train import signals as signals_lib
from train import trainer
from train import workdir as workdir_lib

# One xdist worker runs this module: its tests share a module-scoped trained run.
pytestmark = pytest.mark.xdist_group("reliability")


def snapshot(workdir) -> dict[str, str]:
  """relative path -> sha256 of every file under workdir (the lock included)."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def finished(jax_cache, data_cache, tmp_path_factory):  # noqa: F811
  """A finished tiny run: (workdir, results, train losses)."""
  workdir = tmp_path_factory.mktemp("finished")
  results = trainer.run(tiny_config(data_cache), str(workdir))
  return workdir, results, train_losses(workdir)


@pytest.fixture
def copy_of(tmp_path):
  """copy_of(workdir) -> a fresh copy of it under tmp_path."""
  import shutil

  def make(src):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst

  return make


# -- 1. a changed config is refused; only corruption moves a checkpoint -------------------

@pytest.mark.parametrize("overrides,keys", [
    ({"model.d_model": 32}, ["model.d_model"]),
    ({"model.name": "mamba", "optim.lr": 0.01}, ["model.name", "optim.lr"]),
])
def test_changed_config_is_refused_and_touches_nothing(finished, data_cache, copy_of,
                                                       overrides, keys):
  workdir = copy_of(finished[0])
  before = snapshot(workdir)
  with pytest.raises(workdir_lib.ConfigMismatchError) as e:
    trainer.run(tiny_config(data_cache, **overrides), str(workdir))
  message = str(e.value)
  for key in keys:
    assert key in message
  assert "--config.train.resume=allow_changes" in message and "restart" in message
  assert snapshot(workdir) == before  # no checkpoint moved, no results or metrics rewritten


def test_harmless_changes_resume_and_are_recorded(finished, data_cache, copy_of, caplog):
  caplog.set_level(logging.INFO, logger="train")
  workdir = copy_of(finished[0])
  out = trainer.run(tiny_config(data_cache, **{"train.num_steps": 18, "train.eval_every": 6,
                                               "train.log_every": 2}), str(workdir))
  assert out["steps"] == 18 and "resumed from step 16" in caplog.text
  assert "config changes allowed on resume: train.eval_every (4 -> 6)" in caplog.text
  (record,) = [json.loads(line) for line in (workdir / "config_changes.jsonl").open()]
  assert record["changes"]["train.num_steps"] == [16, 18]
  losses = train_losses(workdir)
  assert {s: losses[s] for s in range(1, 17)} == finished[2]  # the first 16 steps kept


def test_keys_added_since_a_run_was_saved_are_no_change():
  """A config.json saved before optim.ssm_weight_decay and train.accum_steps existed
  compares equal to today's config with their defaults, and unequal to other values."""
  new = {"optim": {"lr": 0.01, "ssm_weight_decay": 0.0},
         "train": {"num_steps": 5, "accum_steps": 1}}
  saved = {"optim": {"lr": 0.01}, "train": {"num_steps": 5}}
  assert workdir_lib.config_changes(saved, new) == ({}, {})
  blocking, harmless = workdir_lib.config_changes(
      saved, {"optim": {"lr": 0.01, "ssm_weight_decay": 0.05},
              "train": {"num_steps": 5, "accum_steps": 2}})
  assert blocking == {"optim.ssm_weight_decay": [0.0, 0.05]}
  assert harmless == {"train.accum_steps": [1, 2]}


def test_allow_changes_resumes_with_a_new_lr(finished, data_cache, copy_of, caplog):
  caplog.set_level(logging.INFO, logger="train")
  workdir = copy_of(finished[0])
  out = trainer.run(tiny_config(data_cache, **{"optim.lr": 0.01, "train.num_steps": 17,
                                               "train.resume": "allow_changes"}), str(workdir))
  assert out["steps"] == 17 and "resumed from step 16" in caplog.text
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["optim"]["lr"] == 0.01 and saved["train"]["resume"] == "auto"


def test_allow_changes_with_another_model_is_refused_and_touches_nothing(finished, data_cache,
                                                                         copy_of):
  workdir = copy_of(finished[0])
  before = snapshot(workdir)
  with pytest.raises(checkpoint_lib.StateMismatchError, match=r"checkpoints/16 holds a train "
                     r"state that does not fit .*saved \(1, 16\) float32, now \(1, 32\)"):
    trainer.run(tiny_config(data_cache, **{"model.d_model": 32,
                                           "train.resume": "allow_changes"}), str(workdir))
  assert snapshot(workdir) == before  # config.json still the old one: a rerun can resume


def test_restart_moves_the_run_aside_and_starts_over(finished, data_cache, copy_of):
  workdir = copy_of(finished[0])
  before = snapshot(workdir)
  trainer.run(tiny_config(data_cache, **{"train.resume": "restart"}), str(workdir))
  (previous,) = (workdir / "previous").iterdir()
  assert snapshot(previous) == before  # the old run, whole
  assert train_losses(workdir) == finished[2]  # a fresh run from step 0


def _garble_arrays(step_dir):
  for f in (step_dir / "state").rglob("*"):
    if f.is_file() and "ocdbt.process_0" in str(f):
      f.write_bytes(b"\0" * f.stat().st_size)  # zeroed: parses as far as the metadata


def test_no_readable_checkpoint_stops_instead_of_starting_over(finished, data_cache, copy_of):
  workdir = copy_of(finished[0])
  for step_dir in [*(workdir / "checkpoints").iterdir(), *(workdir / "best").iterdir()]:
    _garble_arrays(step_dir)
  results = (workdir / "results.json").read_text()
  for _ in range(2):  # and again: the moved checkpoints are not forgotten
    with pytest.raises(checkpoint_lib.NoUsableCheckpointError, match="no readable checkpoint "
                       "left.*resume=restart"):
      trainer.run(tiny_config(data_cache), str(workdir))
  assert sorted(p.name.split("-")[0] for p in (workdir / "corrupt").iterdir()) == [
      "12", "16", "best"]
  assert (workdir / "results.json").read_text() == results
  assert not list((workdir / "checkpoints").iterdir())


def test_checksum_mismatch_is_corruption_and_falls_back(finished, data_cache, copy_of, caplog):
  """An edited checkpoint that still parses: step 16 carrying step 12's meta."""
  import shutil
  caplog.set_level(logging.INFO, logger="train")
  workdir = copy_of(finished[0])
  ckpts = workdir / "checkpoints"
  shutil.rmtree(ckpts / "16" / "meta")
  shutil.copytree(ckpts / "12" / "meta", ckpts / "16" / "meta")
  out = trainer.run(tiny_config(data_cache), str(workdir))
  assert "checksums differ" in caplog.text and "resumed from step 12" in caplog.text
  assert train_losses(workdir) == finished[2] and out["steps"] == 16


# -- 2. only finite states are checkpointed; checksums cannot overflow -------------------

def test_checksum_is_exact_for_huge_and_non_finite_values():
  x = jnp.array([1e20, 3e38, -3e38, np.inf, np.nan, 1.0], jnp.float32)
  tree = {"nu": x, "bf": x.astype(jnp.bfloat16), "c": (x + 1j * x).astype(jnp.complex64),
          "i": jnp.arange(5, dtype=jnp.int32), "b": jnp.array([True, False])}
  same = jax.tree.map(lambda a: jnp.array(np.asarray(a)), tree)
  assert checkpoint_lib.checksum(tree) == checkpoint_lib.checksum(same)
  nudged = dict(tree, nu=x.at[0].set(np.nextafter(np.float32(1e20), np.float32(np.inf))))
  swapped = dict(tree, nu=x[jnp.array([1, 0, 2, 3, 4, 5])])
  assert checkpoint_lib.checksum(nudged) != checkpoint_lib.checksum(tree)
  assert checkpoint_lib.checksum(swapped) != checkpoint_lib.checksum(tree)  # order counts


def test_checkpoint_of_huge_values_restores(tmp_path):
  """Adam's second moments after a divergence (> 1.8e19) verify against themselves."""
  state = {"params": jnp.full((4,), 3.0e19, jnp.float32), "step": jnp.int32(3)}
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=1)
  try:
    ckpt.save(3, state, {"pos": 0}, {})
    ckpt.wait()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                           sharding=a.sharding), state)
    step, restored, _, _ = ckpt.restore_latest(abstract)
  finally:
    ckpt.close()
  assert step == 3 and float(restored["params"][0]) == pytest.approx(3.0e19)
  assert not (tmp_path / "corrupt").exists()


def test_an_update_that_overflows_is_not_checkpointed(data_cache, tmp_path):
  # Weight decay 1e38 at lr 10: step 1's loss and gradient are finite, its weights overflow.
  config = tiny_config(data_cache, **{"optim.weight_decay": 1e38, "optim.lr": 10.0,
                                      "optim.warmup_steps": 0, "train.checkpoint_every": 1})
  with pytest.raises(trainer.NonFiniteLossError, match="non-finite updated parameters or "
                     "optimizer state at step 1 .*no checkpoint had been written"):
    trainer.run(config, str(tmp_path))
  assert not list((tmp_path / "checkpoints").iterdir())


def test_nan_advice_works_when_followed(finished, data_cache, tmp_path):
  diverging = {"optim.lr": 1e30, "optim.warmup_steps": 0, "train.checkpoint_every": 1}
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step 2 .*last good checkpoint "
                     r"\(step 1\).*--config.train.resume=restart") as e:
    trainer.run(tiny_config(data_cache, **diverging), str(tmp_path))
  assert "allow_changes" not in str(e.value)  # step 1's weights gave the NaN: no way on
  # A sane lr alone is a changed config ...
  with pytest.raises(workdir_lib.ConfigMismatchError, match="optim.lr"):
    trainer.run(tiny_config(data_cache), str(tmp_path))
  # ... and the advice, followed, trains the run the sane config trains.
  out = trainer.run(tiny_config(data_cache, **{"train.resume": "restart"}), str(tmp_path))
  assert out["steps"] == 16 and train_losses(tmp_path) == finished[2]


def test_nan_advice_offers_continuing_only_when_it_can_work():
  m = dict(loss=float("nan"), grad_norm=float("nan"), lr=1.0, finite_loss=False)
  assert "allow_changes" not in trainer.nonfinite_message(9, m, 8, "/w")
  assert "continue from step 4" in trainer.nonfinite_message(9, m, 4, "/w")
  overflow = dict(m, loss=1.0, grad_norm=1.0, finite_loss=True)
  assert "continue from step 8" in trainer.nonfinite_message(9, overflow, 8, "/w")


@pytest.mark.parametrize("lr", [1e39, 3.5e38, float("inf")])
def test_lr_beyond_float32_is_refused(lr):
  config = tiny_config(None, **{"optim.lr": lr})
  with pytest.raises(ValueError, match=r"optim.lr=.*finite in float32"):
    trainer.validate_config(config)


def test_warmup_longer_than_the_run_is_shortened(data_cache, tmp_path, caplog):
  config = tiny_config(data_cache, **{"optim.warmup_steps": 1000, "train.num_steps": 4})
  fitted = trainer.fit_warmup(config)
  assert fitted.optim.warmup_steps == 4 and config.optim.warmup_steps == 1000
  trainer.validate_config(fitted)
  with pytest.raises(ValueError, match="warmup_steps"):  # validation itself stays strict
    trainer.validate_config(config)
  caplog.set_level(logging.WARNING, logger="train")
  out = trainer.run(config, str(tmp_path))
  assert out["steps"] == 4 and "warming up over all 4 steps" in caplog.text
  assert json.loads((tmp_path / "config.json").read_text())["optim"]["warmup_steps"] == 1000


# -- 3. one trainer per workdir ---------------------------------------------------------

def _lock(workdir, **owner):
  workdir.mkdir(exist_ok=True)
  (workdir / "lock").write_text(json.dumps(dict(host=socket.gethostname(), **owner)))


def test_live_lock_refuses_and_touches_nothing(finished, data_cache, copy_of):
  workdir = copy_of(finished[0])
  _lock(workdir, pid=os.getppid(), command="python -m train ...")
  before = snapshot(workdir)
  with pytest.raises(workdir_lib.WorkdirLockedError, match=f"in use by pid {os.getppid()}"):
    trainer.run(tiny_config(data_cache), str(workdir))
  assert snapshot(workdir) == before


def test_lock_of_another_host_says_how_to_clear_it(tmp_path):
  (tmp_path / "lock").write_text(json.dumps(dict(pid=1, host="elsewhere")))
  with pytest.raises(workdir_lib.WorkdirLockedError, match="delete it if that process is gone"):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()


def test_stale_lock_is_taken_over(tmp_path, caplog):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  _lock(tmp_path, pid=dead.pid)
  caplog.set_level(logging.WARNING, logger="train")
  with workdir_lib.WorkdirLock(str(tmp_path)):
    owner = json.loads((tmp_path / "lock").read_text())
    assert owner["pid"] == os.getpid()
    with pytest.raises(workdir_lib.WorkdirLockedError):  # held: a second taker refuses
      workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  assert "stale lock" in caplog.text and not (tmp_path / "lock").exists()


# -- 4. signals -------------------------------------------------------------------------

def test_second_signal_stops_at_once():
  before = signal.getsignal(signal.SIGINT)
  with signals_lib.StopOnSignal() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested and stop.name == "SIGTERM"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)  # the handler runs at the next bytecode
  assert signal.getsignal(signal.SIGINT) is before  # restored


def test_stop_vote_is_folded_into_the_step(data_cache):
  import data
  from train import sharding
  config = tiny_config(data_cache)
  task, splits = data.load_task(config.data)
  tr = trainer.Trainer(config, task, sharding.make_mesh(config.train.mesh))
  from data.pipeline import make_loader
  batch = next(make_loader(splits["train"], batch_size=8, shuffle=False, seed=0,
                           drop_remainder=True))
  with sharding.mesh_context(tr.mesh):
    votes = []
    for flag in (False, True):
      state, rngs = tr.init_state()
      _, m = tr.train_step(state, rngs, sharding.global_batch(batch, tr.mesh),
                           tr.stop_flags(flag))
      votes.append(bool(m["stop"]))
  assert votes == [False, True]


# -- CLI: one line, exit codes, subprocesses ---------------------------------------------

def _cli(data_cache, jax_cache, workdir, *extra, **overrides):  # noqa: F811
  args = cli_args(data_cache, workdir, **overrides) + list(extra)
  return subprocess.run(args, cwd=REPO, env=env_for_subprocess(jax_cache), capture_output=True,
                        text=True, timeout=600)


def _error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("train: error:")]


@pytest.mark.slow
@pytest.mark.parametrize("case,match", [
    ({"optim.lr": "1e39"}, r"train: error: config.optim.lr=1e\+39: must be a number in"),
    ({"train.num_stepz": 3}, "train: error: config: unknown field 'num_stepz'"),
    ({"data.data_dir": "/no/such/dir"}, "train: error: ListOps data_dir '/no/such/dir' lacks"),
    ({"model.d_model": 32}, "train: error: the config differs .* in model.d_model"),
])
def test_cli_reports_config_data_and_checkpoint_errors_in_one_line(finished, data_cache,
                                                                   jax_cache, copy_of,  # noqa: F811
                                                                   tmp_path, case, match):
  import re
  # A data error shows on a new run (on the finished one, the changed config stops first).
  workdir = tmp_path / "new" if "data.data_dir" in case else copy_of(finished[0])
  before = snapshot(workdir)
  proc = _cli(data_cache, jax_cache, workdir, **case)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  (line,) = _error_lines(proc.stderr)
  assert re.match(match, line), line
  assert "--verbose" in proc.stderr
  assert snapshot(workdir) == before


@pytest.mark.slow
def test_cli_verbose_prints_the_traceback(finished, data_cache, jax_cache, copy_of):  # noqa: F811
  proc = _cli(data_cache, jax_cache, copy_of(finished[0]), "--verbose", **{"model.d_model": 32})
  assert proc.returncode == 1 and "Traceback" in proc.stderr
  assert "ConfigMismatchError" in proc.stderr


@pytest.mark.slow
def test_cli_corrupt_checkpoint_is_handled_quietly(finished, data_cache, jax_cache, copy_of):  # noqa: F811
  workdir = copy_of(finished[0])
  _garble_arrays(workdir / "checkpoints" / "16")
  proc = _cli(data_cache, jax_cache, workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from step 12" in proc.stderr
  assert "Event loop is closed" not in proc.stderr and "Traceback" not in proc.stderr
  assert "never retrieved" not in proc.stderr
  assert train_losses(workdir) == finished[2]


FULL_DISK = textwrap.dedent("""
    import errno, runpy, sys
    from train import metrics
    def write(self, step, split, values):
      if step >= 3:
        raise OSError(errno.ENOSPC, "No space left on device", self._jsonl.name)
    metrics.MetricWriter.write = write
    sys.argv = ["train"] + sys.argv[1:]
    runpy.run_module("train", run_name="__main__")
""")


@pytest.mark.slow
def test_cli_full_disk_is_one_line(data_cache, jax_cache, tmp_path):  # noqa: F811
  args = cli_args(data_cache, tmp_path / "w")
  proc = subprocess.run([sys.executable, "-c", FULL_DISK, *args[3:]], cwd=REPO,
                        env=env_for_subprocess(jax_cache), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  (line,) = _error_lines(proc.stderr)
  assert line == f"train: error: No space left on device: {tmp_path / 'w' / 'metrics.jsonl'}"


def _raised_from(outer: BaseException, cause: BaseException) -> BaseException:
  """outer raised from cause, tracebacks and all (as a library leaves them)."""
  try:
    try:
      raise cause
    except BaseException as e:
      raise outer from e
  except BaseException as e:  # noqa: BLE001
    return e


def test_full_disk_is_found_inside_wrapped_errors():
  wrapped = _raised_from(
      ExceptionGroup("save failed", [RuntimeError("tensorstore write failed")]),
      OSError(errno.ENOSPC, "No space left on device", "/w/checkpoints/8/state/d/x"))
  assert errors_lib.one_line(wrapped) == "No space left on device: /w/checkpoints/8/state/d/x"
  assert errors_lib.one_line(KeyError("bug")) is None  # bugs keep their traceback


@pytest.mark.slow
def test_two_trainers_on_one_workdir(data_cache, jax_cache, tmp_path):  # noqa: F811
  """The second refuses while the first runs; the first's outputs stay whole."""
  workdir = tmp_path / "shared"
  long_run = {"train.num_steps": 100_000, "train.log_every": 500, "train.eval_every": 50_000,
              "train.checkpoint_every": 50_000}
  env = env_for_subprocess(jax_cache)
  first = subprocess.Popen(cli_args(data_cache, workdir, **long_run), cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while not (workdir / "lock").exists() and time.time() < deadline:
    time.sleep(0.05)
  second = _cli(data_cache, jax_cache, workdir, **long_run)
  assert first.poll() is None, "the first trainer ended early: " + first.stderr.read()[-2000:]
  first.send_signal(signal.SIGTERM)
  _, first_err = first.communicate(timeout=300)
  assert second.returncode == 1, second.stderr[-2000:]
  (line,) = _error_lines(second.stderr)
  assert f"is in use by pid {first.pid} on {socket.gethostname()}" in line
  assert first.returncode == 128 + signal.SIGTERM, first_err[-2000:]
  stopped = int(first_err.split("stopped by SIGTERM at step ")[1].split()[0])
  assert [p.name for p in (workdir / "checkpoints").iterdir()] == [str(stopped)]
  assert not list(workdir.rglob("*.orbax-checkpoint-tmp*")) and not (workdir / "lock").exists()
  keys = [(r["step"], r["split"]) for r in
          map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())]
  assert len(keys) == len(set(keys))  # one trainer's records only


@pytest.mark.slow
def test_sigint_then_sigterm_save_and_resume_exactly(data_cache, jax_cache, tmp_path):  # noqa: F811
  longer = {"train.num_steps": 600, "train.checkpoint_every": 1000, "train.eval_every": 300}
  reference = tmp_path / "uninterrupted"
  trainer.run(tiny_config(data_cache, **longer), str(reference))
  workdir = tmp_path / "signalled"
  env = env_for_subprocess(jax_cache)
  stopped = []
  for signum in (signal.SIGINT, signal.SIGTERM):
    proc = subprocess.Popen(cli_args(data_cache, workdir, **longer), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    start = max(train_losses(workdir), default=0) if (workdir / "metrics.jsonl").exists() else 0
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # wait for some steps past start
      if (workdir / "metrics.jsonl").exists() and max(train_losses(workdir), default=0) > start + 20:
        break
      time.sleep(0.05)
    assert proc.poll() is None, "ended before the signal: " + proc.stderr.read()[-2000:]
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "Traceback" not in err
    line = [l for l in err.splitlines() if l.startswith("train: stopped by")]
    assert len(line) == 1 and signal.Signals(signum).name in line[0], err[-2000:]
    step = int(line[0].split(" at step ")[1].split()[0])
    assert (workdir / "checkpoints" / str(step)).is_dir()  # saved although not a save step
    assert not (workdir / "lock").exists()
    stopped.append(step)
  assert 0 < stopped[0] < stopped[1] < 600
  done = _cli(data_cache, jax_cache, workdir, **longer)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"resumed from step {stopped[1]}" in done.stderr
  assert train_losses(workdir) == train_losses(reference)  # nothing lost, bit for bit
  assert (json.loads((workdir / "results.json").read_text())["test_loss"]
          == json.loads((reference / "results.json").read_text())["test_loss"])


def test_orbax_thread_errors_are_one_line():
  """A failed background save logs a traceback per stage; the CLI keeps one line each."""
  record = logging.LogRecord("absl", logging.ERROR, "/x/orbax/checkpoint/future.py", 1,
                             "save failed: %s\nmore detail", ("ENOSPC",), None)
  record.exc_info = (ValueError, ValueError("x"), None)
  checkpoint_lib._ShortOrbaxErrors().filter(record)
  assert record.getMessage() == "save failed: ENOSPC" and record.exc_info is None
  mine = logging.LogRecord("train", logging.ERROR, "/repo/train/trainer.py", 1, "a\nb", None,
                           None)
  checkpoint_lib._ShortOrbaxErrors().filter(mine)
  assert mine.getMessage() == "a\nb"  # only orbax's records
  assert checkpoint_lib._orbax_noise(None, RuntimeError("Event loop is closed"))
  assert not checkpoint_lib._orbax_noise(None, RuntimeError("something else"))


def test_a_failing_machine_is_not_corruption():
  """Permissions, a full disk or memory: the checkpoint stays where it is."""
  denied = OSError(errno.EACCES, "Permission denied", "/w/checkpoints/8/state")
  assert checkpoint_lib.is_environmental(_raised_from(ValueError("restore failed"), denied))
  assert checkpoint_lib.is_environmental(ValueError("RESOURCE_EXHAUSTED: out of memory"))
  assert not checkpoint_lib.is_environmental(ValueError("DATA_LOSS: bad checksum"))


def test_checkpoints_with_the_old_float_fingerprint_still_restore(tmp_path, monkeypatch):
  """Written before the checksums (their sum of squares overflowed to inf above 1.8e19)."""
  import orbax.checkpoint as ocp
  state = {"nu": jnp.full((3,), 2.0e19, jnp.float32), "w": jnp.arange(3.0)}

  def old_args(self, state, loader_state, meta):
    fingerprint = [[float(a), float(b)] for a, b in
                   jax.device_get(checkpoint_lib._legacy_fingerprint(jax.tree.leaves(state)))]
    return ocp.args.Composite(
        state=ocp.args.StandardSave(checkpoint_lib.tree_to_dict(state)),
        loader=ocp.args.JsonSave(loader_state),
        meta=ocp.args.JsonSave(dict(meta, fingerprint=fingerprint)))

  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=1)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          state)
  try:
    with monkeypatch.context() as m:
      m.setattr(checkpoint_lib.Checkpointer, "_args", old_args)
      ckpt.save(1, state, {}, {})
      ckpt.wait()
    assert ckpt.restore_latest(abstract)[0] == 1  # inf matches itself now
    edited = dict(state, w=jnp.arange(3.0) + 1)
    assert not checkpoint_lib._legacy_fingerprints_match(
        jax.device_get(checkpoint_lib._legacy_fingerprint(jax.tree.leaves(state))), edited)
  finally:
    ckpt.close()
