"""The trainer end to end on tiny ListOps: training, resumption, faults, devices, outputs.

Every run uses the same tiny model, so after the first one XLA's compiled programs come
from a persistent compilation cache (enabled for this module only, in a temp dir), and
the subprocess runs share it through the environment.
"""

import json
import logging
import math
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from configs.lra import listops
from train import checkpoint as checkpoint_lib
from train import metrics as metrics_lib
from train import sharding, trainer

# One xdist worker runs this module: its runs share one persistent compilation cache.
pytestmark = pytest.mark.xdist_group("train")

REPO = pathlib.Path(__file__).resolve().parents[1]
CACHE_KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
              "jax_persistent_cache_min_entry_size_bytes")


def _reset_compile_cache():
  try:
    from jax.experimental.compilation_cache import compilation_cache as cc
    cc.reset_cache()
  except (ImportError, AttributeError):
    pass


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  """A persistent compilation cache for this module (restored afterwards)."""
  path = str(tmp_path_factory.mktemp("jax_cache"))
  old = {k: getattr(jax.config, k) for k in CACHE_KEYS}
  for k, v in zip(CACHE_KEYS, (path, 0.0, 0)):
    jax.config.update(k, v)
  _reset_compile_cache()
  yield path
  for k, v in old.items():
    jax.config.update(k, v)
  _reset_compile_cache()


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data_cache"))


# Settings of the tiny run shared by the tests (also passed on command lines).
TINY = {
    "data.seq_len": 32, "data.max_length": 30, "data.num_train": 16, "data.num_val": 24,
    "data.num_test": 24,
    "model.num_layers": 1, "model.dropout": 0.1,     # dropout on: resumption must replay it
    "optim.lr": 0.03, "optim.schedule": "constant", "optim.warmup_steps": 2,
    "train.num_steps": 16, "train.batch_size": 8, "train.eval_batch_size": 8,
    "train.eval_every": 4, "train.checkpoint_every": 4, "train.keep_checkpoints": 2,
    "train.log_every": 1,
}


def tiny_config(data_cache, **overrides):
  config = listops.get_config("s4d,tiny")
  config.data.cache_dir = data_cache
  for key, value in {**TINY, **overrides}.items():
    section, field = key.split(".", 1)
    if "." in field:
      sub, field = field.split(".")
      config[section][sub][field] = value
    else:
      config[section][field] = value
  return config


def train_losses(workdir) -> dict[int, float]:
  """step -> train loss; a step logged twice (rerun after a crash) must agree."""
  out = {}
  for m in metrics_lib.read_metrics(str(workdir)):
    if m["split"] == "train":
      if m["step"] in out:
        assert m["loss"] == pytest.approx(out[m["step"]], rel=1e-6), m["step"]
      out[m["step"]] = m["loss"]
  return out


def tb_scalars(workdir, tag) -> list[tuple[int, float]]:
  """(step, value) of a scalar as TensorBoard shows it (its own reader, purges applied)."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(str(pathlib.Path(workdir) / "tb"))
  acc.Reload()
  return [(e.step, e.value) for e in acc.Scalars(tag)]


def split_metrics(workdir, split) -> dict[int, dict]:
  return {m["step"]: m for m in metrics_lib.read_metrics(str(workdir)) if m["split"] == split}


def env_for_subprocess(jax_cache, devices=None):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  if devices:  # both spellings; the XLA flag goes first (a malformed later one stops parsing)
    env["JAX_NUM_CPU_DEVICES"] = str(devices)
    env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                        + env.get("XLA_FLAGS", "")).strip()
  return env


def cli_args(data_cache, workdir, **overrides):
  args = [sys.executable, "-m", "train", "--config=configs/lra/listops.py:s4d,tiny",
          f"--workdir={workdir}", f"--config.data.cache_dir={data_cache}"]
  args += [f"--config.{k}={v}" for k, v in {**TINY, **overrides}.items()]
  return args


@pytest.fixture(scope="module")
def reference(jax_cache, data_cache, tmp_path_factory):
  """One uninterrupted run: (workdir, returned results)."""
  workdir = tmp_path_factory.mktemp("reference")
  results = trainer.run(tiny_config(data_cache), str(workdir))
  return workdir, results


# -- training and outputs ---------------------------------------------------------------

def test_loss_decreases(reference):
  losses = train_losses(reference[0])
  assert sorted(losses) == list(range(1, 17))
  first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (14, 15, 16)])
  assert last < first - 0.3, losses


def test_outputs_in_workdir(reference, data_cache):
  workdir, results = reference
  on_disk = json.loads((workdir / "results.json").read_text())
  assert on_disk == results
  assert results["steps"] == 16 and results["config_name"] == "listops:s4d,tiny"
  assert results["val_examples"] == 24 and results["test_examples"] == 24  # every example once
  assert 0.0 <= results["test_accuracy"] <= 1.0 and math.isfinite(results["test_loss"])
  assert results["device_count"] == 1 and results["date"]
  # metrics.jsonl: every train step, validation every 4 steps, test at the end.
  assert sorted(split_metrics(workdir, "val")) == [4, 8, 12, 16]
  assert sorted(split_metrics(workdir, "test")) == [16]
  assert split_metrics(workdir, "val")[16]["accuracy"] == pytest.approx(results["val_accuracy"])
  later = split_metrics(workdir, "train")[10]
  for key in ("loss", "accuracy", "lr", "grad_norm", "examples_per_s", "tokens_per_s",
              "step_time_s"):
    assert key in later and math.isfinite(later[key]), key
  assert later["lr"] == pytest.approx(0.03)
  # TensorBoard event file with the same train losses, read by TensorBoard's reader.
  (event_file,) = (workdir / "tb").iterdir()
  tb = dict(tb_scalars(workdir, "train/loss"))
  assert tb == pytest.approx(train_losses(workdir), rel=1e-6)
  assert [s for s, _ in tb_scalars(workdir, "val/accuracy")] == [4, 8, 12, 16]
  # Config saved as JSON and as a loadable Python file.
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["data"]["seq_len"] == 32 and saved["model"]["mixer"]["d_state"] == 4
  namespace = {}
  exec((workdir / "config.py").read_text(), namespace)  # noqa: S102 -- our own file
  assert namespace["get_config"]().to_dict() == tiny_config(data_cache).to_dict()
  # keep-last-2 checkpoints, plus the best.
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [12, 16]
  assert len(list((workdir / "best").iterdir())) == 1


def test_evaluation_is_exact_over_all_examples(reference, data_cache):
  """The last val pass equals a direct computation over the 24 examples (3 batches)."""
  import data as data_lib
  workdir, results = reference
  config = tiny_config(data_cache)
  task, splits = data_lib.load_task(config.data)
  mesh = sharding.make_mesh(config.train.mesh)
  tr = trainer.Trainer(config, task, mesh)
  ckpt = checkpoint_lib.Checkpointer(str(workdir), keep=2)
  try:
    step, state, _, _ = ckpt.restore_latest(tr.abstract_state)
  finally:
    ckpt.close()
  assert step == 16
  rngs = tr.init_rngs()
  # One batch holding everything vs the trainer's padded batches of 8 (here 5 + pad).
  full = tr.evaluate(state, rngs, splits["validation"], batch_size=24)
  padded = tr.evaluate(state, rngs, splits["validation"], batch_size=5)
  assert full["weight"] == padded["weight"] == 24
  assert padded["loss"] == pytest.approx(full["loss"], rel=1e-5)
  assert padded["accuracy"] == pytest.approx(full["accuracy"])
  assert full["accuracy"] == pytest.approx(results["val_accuracy"])


# -- resumption and faults --------------------------------------------------------------

def _latest_meta(workdir, data_cache) -> dict:
  """The meta of the newest checkpoint in workdir (a tiny_config run)."""
  import data as data_lib
  config = tiny_config(data_cache)
  task, _ = data_lib.load_task(config.data)
  tr = trainer.Trainer(config, task, sharding.make_mesh(config.train.mesh))
  ckpt = checkpoint_lib.Checkpointer(str(workdir), keep=2)
  try:
    return ckpt.restore_latest(tr.abstract_state)[3]
  finally:
    ckpt.close()


def test_resume_matches_uninterrupted(reference, data_cache, tmp_path, caplog):
  caplog.set_level(logging.INFO, logger="train")
  out = trainer.run(tiny_config(data_cache, **{"train.halt_at_step": 8}), str(tmp_path))
  assert out["halted_at_step"] == 8
  assert not (tmp_path / "results.json").exists()
  first_meta = _latest_meta(tmp_path, data_cache)
  results = trainer.run(tiny_config(data_cache), str(tmp_path))
  assert "resumed from step 8" in caplog.text
  assert train_losses(tmp_path) == train_losses(reference[0])  # exactly, step by step
  assert results["val_accuracy"] == reference[1]["val_accuracy"]
  assert results["test_loss"] == reference[1]["test_loss"]
  # Training time adds up over the two processes; wall_time_s is the second one's alone.
  assert results["runs"] == 2 and reference[1]["runs"] == 1
  assert 0 < first_meta["train_time_s"] < results["train_time_s"]
  assert 0 < results["wall_time_s"] and first_meta["runs"] == 1


def test_corrupt_latest_checkpoint_falls_back(reference, data_cache, tmp_path, caplog):
  caplog.set_level(logging.INFO, logger="train")
  trainer.run(tiny_config(data_cache, **{"train.halt_at_step": 8}), str(tmp_path))
  ckpt_dir = tmp_path / "checkpoints"
  assert sorted(p.name for p in ckpt_dir.iterdir()) == ["4", "8"]
  # Garbage over every file of the newest checkpoint's arrays, and a half-written one.
  for f in (ckpt_dir / "8" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(os.urandom(max(f.stat().st_size // 2, 7)))
  (ckpt_dir / "12.orbax-checkpoint-tmp-1234").mkdir()
  results = trainer.run(tiny_config(data_cache), str(tmp_path))
  assert "step 8 is unreadable" in caplog.text
  assert "resumed from step 4" in caplog.text
  assert list((tmp_path / "corrupt").iterdir())[0].name.startswith("8-")
  assert train_losses(tmp_path) == train_losses(reference[0])
  assert results["test_loss"] == reference[1]["test_loss"]


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(jax_cache, data_cache,
                                                                       tmp_path):
  # lr 1e30 (no warmup): step 1 is finite, its update blows the weights up, step 2 is NaN.
  config = tiny_config(data_cache, **{"optim.lr": 1e30, "optim.warmup_steps": 0,
                                      "train.checkpoint_every": 1})
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step 2 .*last good checkpoint "
                                                        r"\(step 1\)"):
    trainer.run(config, str(tmp_path))
  assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["1"]
  assert not (tmp_path / "results.json").exists()


def test_missing_data_dir_fails_clearly(data_cache, tmp_path):
  config = tiny_config(data_cache)
  config.data.data_dir = str(tmp_path / "no_such_dir")
  with pytest.raises(FileNotFoundError, match="basic_train.tsv"):
    trainer.run(config, str(tmp_path / "work"))


@pytest.mark.parametrize("mesh,match", [({"data": 3}, "needs 3 devices"),
                                        ({"data": 0}, "positive"),
                                        ({"data": -1, "fsdp": -1}, "one -1")])
def test_bad_mesh_fails_clearly(data_cache, tmp_path, mesh, match):
  config = tiny_config(data_cache)
  config.train.mesh.update(mesh)
  with pytest.raises(ValueError, match=match):
    trainer.run(config, str(tmp_path))


# -- sharding ---------------------------------------------------------------------------

def test_param_sharding_rule():
  P = jax.sharding.PartitionSpec
  assert sharding.param_spec((64, 128), fsdp=2, min_size=1) == P(None, "fsdp")
  assert sharding.param_spec((128, 64), fsdp=2, min_size=1) == P("fsdp", None)
  assert sharding.param_spec((3, 5), fsdp=2, min_size=1) == P()          # nothing divisible
  assert sharding.param_spec((64, 128), fsdp=2, min_size=10**6) == P()   # small: replicated
  assert sharding.param_spec((64, 128), fsdp=1, min_size=1) == P()
  assert sharding.mesh_shape({"data": -1, "fsdp": 2}, 8) == (4, 2, 1)
  assert sharding.mesh_shape({"data": 8, "fsdp": 1}, 8) == (8, 1, 1)


EIGHT_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from tests.test_train import tiny_config
    from train import trainer
    assert jax.device_count() == 8, jax.devices()
    config = tiny_config(sys.argv[1], **{"train.mesh.data": 4, "train.mesh.fsdp": 2,
                                         "train.fsdp_min_size": 16})
    import data
    task, _ = data.load_task(config.data)
    tr = trainer.Trainer(config, task, trainer.sharding_lib.make_mesh(config.train.mesh))
    specs = [s.spec for s in jax.tree.leaves(tr.state_sharding.params)]
    sharded = sum("fsdp" in tuple(s) for s in specs)
    results = trainer.run(config, sys.argv[2])
    print("RESULT", json.dumps(dict(sharded=sharded, total=len(specs), results=results)))
""")


@pytest.mark.slow
def test_eight_devices_match_one(reference, jax_cache, data_cache, tmp_path):
  proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICE_SCRIPT, data_cache,
                         str(tmp_path)], cwd=REPO, env=env_for_subprocess(jax_cache, devices=8),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  out = json.loads(line[len("RESULT "):])
  assert out["sharded"] >= 2, out  # some parameters really are split over fsdp
  assert out["results"]["mesh"] == {"data": 4, "fsdp": 2, "seq": 1}
  ref, got = train_losses(reference[0]), train_losses(tmp_path)
  assert sorted(got) == sorted(ref)
  np.testing.assert_allclose([got[s] for s in sorted(ref)], [ref[s] for s in sorted(ref)],
                             rtol=2e-3)
  np.testing.assert_allclose(out["results"]["test_loss"], reference[1]["test_loss"], rtol=2e-3)


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_matches(jax_cache, data_cache, tmp_path):
  longer = {"train.num_steps": 300, "train.checkpoint_every": 20, "train.eval_every": 100}
  reference_dir = tmp_path / "uninterrupted"
  reference = trainer.run(tiny_config(data_cache, **longer), str(reference_dir))

  workdir = tmp_path / "killed"
  env = env_for_subprocess(jax_cache)
  proc = subprocess.Popen(cli_args(data_cache, workdir, **longer), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  ckpts = workdir / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.exists() else []
    if steps and max(steps) >= 60:
      break
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  proc.stderr.close()
  killed_at = max(train_losses(workdir))
  assert killed_at < 300

  done = subprocess.run(cli_args(data_cache, workdir, **longer), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resumed from step" in done.stderr
  got = train_losses(workdir)
  ref = train_losses(reference_dir)
  assert got == ref
  results = json.loads((workdir / "results.json").read_text())
  assert results["test_loss"] == reference["test_loss"]
  # one record per (step, split): what the killed process logged past its last checkpoint
  # was moved aside, not kept twice
  records = metrics_lib.read_metrics(str(workdir))
  keys = [(r["step"], r["split"]) for r in records]
  assert len(keys) == len(set(keys))
  resumed = int(done.stderr.split("resumed from step ")[1].split()[0])
  superseded = workdir / "metrics_superseded.jsonl"
  if superseded.exists():
    assert all(json.loads(line)["step"] > resumed for line in superseded.read_text().splitlines())
  # TensorBoard too: two event files, and each step shown once (purge_step on resume).
  assert len(list((workdir / "tb").iterdir())) == 2
  shown = tb_scalars(workdir, "train/loss")
  assert [s for s, _ in shown] == list(range(1, 301))
  assert dict(shown) == pytest.approx(ref, rel=1e-6)


@pytest.mark.slow
def test_grain_worker_processes_train_and_resume_like_the_reference(reference, jax_cache,
                                                                   data_cache, tmp_path):
  """Given 2 grain worker processes, when the CLI (absl, a __main__ guard) halts at step 8
  and the run resumes in process, then the losses are the uninterrupted run's without workers."""
  workers = {"train.data_workers": 2}
  proc = subprocess.run(cli_args(data_cache, tmp_path, **workers, **{"train.halt_at_step": 8}),
                        cwd=REPO, env=env_for_subprocess(jax_cache), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  state = json.loads((tmp_path / "checkpoints" / "8" / "loader" / "metadata").read_text())
  assert len(state["grain"]["iterators_in_use_states"]) == 2  # grain's multi-worker state
  results = trainer.run(tiny_config(data_cache, **workers), str(tmp_path))
  assert train_losses(tmp_path) == train_losses(reference[0])
  assert results["test_loss"] == reference[1]["test_loss"]


# -- metrics ------------------------------------------------------------------------------

def test_drop_after_moves_records_past_the_checkpoint(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [json.dumps(dict(step=s, split=sp, loss=float(s))) for s, sp in
           [(1, "train"), (2, "train"), (2, "val"), (3, "train"), (4, "val")]]
  path.write_text("\n".join(lines) + "\n")
  assert metrics_lib.drop_after(str(path), 2) == 2
  assert path.read_text().splitlines() == lines[:3]
  moved = tmp_path / "metrics_superseded.jsonl"
  assert moved.read_text().splitlines() == lines[3:]
  assert metrics_lib.drop_after(str(path), 2) == 0  # nothing more to move
  assert metrics_lib.drop_after(str(tmp_path / "absent.jsonl"), 0) == 0


def test_loss_sums_match_numpy_with_weights_and_mask():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((4, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (4, 5))
  mask = rng.random((4, 5)) < 0.6
  weights = np.array([1.0, 1.0, 0.0, 1.0], np.float32)  # a padding row
  batch = dict(targets=targets, mask=mask, weights=weights)
  got = jax.device_get(metrics_lib.loss_sums(logits, batch, "lm"))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  w = mask * weights[:, None]
  assert got["loss_sum"] == pytest.approx((ce * w).sum(), rel=1e-5)
  assert got["correct"] == pytest.approx(((logits.argmax(-1) == targets) * w).sum())
  assert got["weight"] == pytest.approx(w.sum())
  cls = jax.device_get(metrics_lib.loss_sums(logits[:, 0], dict(targets=targets[:, 0],
                                                                weights=weights), "classification"))
  assert cls["loss_sum"] == pytest.approx((ce[:, 0] * weights).sum(), rel=1e-5)
  with pytest.raises(ValueError, match="targets"):
    metrics_lib.loss_sums(logits, dict(targets=targets[:, 0], weights=weights), "classification")


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
  """A writer resumed at step 3 hides what an earlier process logged past it."""
  first = metrics_lib.MetricWriter(str(tmp_path))
  for step in range(1, 7):
    first.write(step, "train", {"loss": float(step)})
  first.close()
  resumed = metrics_lib.MetricWriter(str(tmp_path))
  assert resumed.resume_at(3) == 3  # metrics.jsonl: steps 4..6 moved aside
  for step in range(4, 9):
    resumed.write(step, "train", {"loss": step + 0.5, "note": "text is not a scalar"})
  resumed.close()
  assert tb_scalars(tmp_path, "train/loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.5),
                                                 (5, 5.5), (6, 6.5), (7, 7.5), (8, 8.5)]
  assert [r["step"] for r in metrics_lib.read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_progress_bar_on_a_terminal_and_lines_in_a_log():
  import io

  class Tty(io.StringIO):
    def isatty(self):
      return True

  tty, plain = Tty(), io.StringIO()
  for stream in (tty, plain):
    progress = metrics_lib.Progress(10, initial=2, stream=stream)
    for step in (3, 4, 5):
      progress.live(step, {"loss": 2.5})
    progress.line(5, {"loss": 2.25}, prefix="train")
    progress.close()
  shown = tty.getvalue()
  assert "5/10" in shown and "step/s" in shown and "<" in shown  # count, rate, ETA
  assert "loss=2.5" in shown and "train step 5/10  loss 2.25\n" in shown
  assert plain.getvalue() == "train step 5/10  loss 2.25\n"  # no bar in a log