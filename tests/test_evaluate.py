"""train.evaluate: a run trained on one device count restores and evaluates on another.

Runs on 8 devices are CPU devices faked in a subprocess (as tests/test_train.py does);
this pytest process has one. The evaluation must reproduce the run's own final numbers
to float tolerance.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.test_train import REPO, data_cache, env_for_subprocess, jax_cache, tiny_config  # noqa: F401
from train import checkpoint as checkpoint_lib
from train import evaluate as evaluate_lib
from train import trainer

# One xdist worker runs this module: its tests share a module-scoped trained run.
pytestmark = pytest.mark.xdist_group("evaluate")

# Shorter than test_train's TINY run; checkpoints at 4 and 8, the best one in best/.
SHORT = {"train.num_steps": 8, "train.eval_every": 4, "train.checkpoint_every": 4,
         "train.fsdp_min_size": 16}  # small arrays too are split when fsdp > 1


def _result(stdout: str):
  line = [l for l in stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def one_device_run(jax_cache, data_cache, tmp_path_factory):
  """A tiny run trained here, on this process's single CPU device: (workdir, results)."""
  workdir = tmp_path_factory.mktemp("one_device")
  results = trainer.run(tiny_config(data_cache, **SHORT), str(workdir))
  return workdir, results


def _assert_same_metrics(got: dict, loss: float, accuracy: float):
  assert got["loss"] == pytest.approx(loss, rel=1e-5)
  assert got["accuracy"] == pytest.approx(accuracy, abs=1e-9)
  assert got["examples"] == 24  # every test/validation example exactly once


# One 8-device process does both directions' 8-device side: it evaluates the run trained
# here on 1 device (through the CLI's main, with the parameters split over fsdp=2), then
# trains a run of its own on (data=4, fsdp=2), which this 1-device process evaluates.
EIGHT_DEVICES = textwrap.dedent("""
    import json, sys
    import jax
    from tests.test_evaluate import SHORT
    from tests.test_train import tiny_config
    from train import evaluate, trainer
    assert jax.device_count() == 8, jax.devices()
    one_device_workdir, data_cache, workdir = sys.argv[1:]
    evaluated = evaluate.main([f"--workdir={one_device_workdir}", "--split=test", "--fsdp=2"])
    config = tiny_config(data_cache, **SHORT, **{"train.mesh.data": 4, "train.mesh.fsdp": 2})
    trained = trainer.run(config, workdir)
    # How many parameters that mesh splits over fsdp (the same rule as the trainer's).
    import data
    tr = trainer.Trainer(config, data.load_task(config.data)[0],
                         trainer.sharding_lib.make_mesh(config.train.mesh))
    sharded = sum("fsdp" in tuple(s.spec) for s in jax.tree.leaves(tr.state_sharding.params))
    print("EIGHT", json.dumps(dict(evaluated=evaluated, trained=trained, sharded=sharded)))
""")


@pytest.fixture(scope="module")
def eight_devices(one_device_run, jax_cache, data_cache, tmp_path_factory):
  """(stdout, evaluation of the 1-device run, workdir and results of the 8-device run)."""
  workdir = tmp_path_factory.mktemp("eight_devices")
  proc = subprocess.run(
      [sys.executable, "-c", EIGHT_DEVICES, str(one_device_run[0]), data_cache, str(workdir)],
      cwd=REPO, env=env_for_subprocess(jax_cache, devices=8), capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("EIGHT ")][-1]
  out = json.loads(line[len("EIGHT "):])
  assert out["sharded"] >= 4, out  # the checkpoints really hold split parameters
  return proc.stdout, out["evaluated"], workdir, out["trained"]


@pytest.mark.slow
def test_trained_on_1_device_evaluates_on_8_with_fsdp(one_device_run, eight_devices):
  workdir, results = one_device_run
  stdout, got, _, _ = eight_devices
  assert results["device_count"] == 1 and results["mesh"] == {"data": 1, "fsdp": 1, "seq": 1}
  assert got["mesh"] == {"data": 4, "fsdp": 2, "seq": 1} and got["device_count"] == 8
  assert got["step"] == 8 and got["checkpoint"].endswith(os.path.join("checkpoints", "8"))
  _assert_same_metrics(got, results["test_loss"], results["test_accuracy"])
  assert "test step 8  loss" in stdout and _result(stdout) == got  # the CLI's printout
  assert json.loads((workdir / "eval_test_8dev.json").read_text()) == got


@pytest.mark.slow
def test_trained_on_8_devices_evaluates_on_1(eight_devices):
  import jax
  if jax.device_count() != 1:
    pytest.skip("this process must have exactly one device")
  # Given a run trained with its parameters split over (data=4, fsdp=2),
  _, _, workdir, results = eight_devices
  assert results["mesh"] == {"data": 4, "fsdp": 2, "seq": 1} and results["device_count"] == 8
  # when this one-device process evaluates its latest and its best checkpoint,
  test = evaluate_lib.evaluate(str(workdir), "test")
  val = evaluate_lib.evaluate(str(workdir), "val", "best")
  # then it reproduces the run's final test and best validation numbers.
  assert test["mesh"] == {"data": 1, "fsdp": 1, "seq": 1} and test["device_count"] == 1
  assert test["step"] == 8
  _assert_same_metrics(test, results["test_loss"], results["test_accuracy"])
  assert val["split"] == "validation" and val["step"] == results["best_val_step"]
  assert val["checkpoint"].endswith(os.path.join("best", str(results["best_val_step"])))
  assert val["accuracy"] == pytest.approx(results["best_val_accuracy"], abs=1e-9)
  if results["best_val_step"] == 8:
    _assert_same_metrics(val, results["val_loss"], results["val_accuracy"])
  assert json.loads((workdir / "eval_validation_1dev.json").read_text()) == val


def test_missing_workdir_and_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    evaluate_lib.evaluate(str(tmp_path / "no_such_run"))
  with pytest.raises(FileNotFoundError, match="no config.json or config.py"):
    evaluate_lib.evaluate(str(tmp_path))


def test_no_checkpoint(one_device_run, tmp_path):
  workdir, _ = one_device_run
  shutil.copy(workdir / "config.json", tmp_path / "config.json")
  with pytest.raises(evaluate_lib.CheckpointNotFoundError, match="no checkpoint in"):
    evaluate_lib.evaluate(str(tmp_path))
  with pytest.raises(evaluate_lib.CheckpointNotFoundError,
                     match=r"no checkpoint at step 5 .*checkpoints/ \[4, 8\], best/ \[\d+\]"):
    evaluate_lib.evaluate(str(workdir), step=5)
  with pytest.raises(ValueError, match="unknown split"):
    evaluate_lib.evaluate(str(workdir), split="dev")


def test_corrupt_checkpoint_fails_clearly_and_is_left_in_place(one_device_run, tmp_path):
  workdir, _ = one_device_run
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  for f in (copy / "checkpoints" / "8" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(os.urandom(max(f.stat().st_size // 2, 7)))
  with pytest.raises(checkpoint_lib.CorruptCheckpointError,
                     match=r"checkpoints/8 could not be restored .*other checkpoints: \[4\]"):
    evaluate_lib.evaluate(str(copy))
  assert (copy / "checkpoints" / "8").is_dir() and not (copy / "corrupt").exists()
  assert not (copy / "eval_test_1dev.json").exists()


def test_cli_errors_are_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "train.evaluate", f"--workdir={tmp_path}/x"],
                        cwd=REPO, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith("train.evaluate: error: "
                                                         "FileNotFoundError: workdir")
