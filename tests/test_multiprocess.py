"""A 2-process jax.distributed job on one machine (issue 28's multi-host launch, as far as
one host allows): two `python -m train` processes of one CPU device each, joined by
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID and gloo collectives, train
the tiny ListOps config on one shared workdir, losses equal to one process with two
devices, and resume from their checkpoint when the schedule is extended."""

import json
import os
import socket
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiprocess")]

CONFIG = "--config=configs/lra/listops.py:s4d,tiny"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


FAST_COMPILE = "--xla_backend_optimization_level=0"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(cache, **extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", SSMLAB_CACHE=str(cache), **extra)
  # no device-count flag from the caller; the suite's compile-time flag (conftest) stays
  env["XLA_FLAGS"] = FAST_COMPILE
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _two_processes(workdir, cache, *args):
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "train", CONFIG, f"--workdir={workdir}", *args],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=_env(cache, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo"))
      for i in range(2)]
  logs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    logs.append(out)
    assert p.returncode == 0, out[-3000:]
  return logs


def _train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if r.get("split") == "train"}


def test_two_processes_train_like_one_and_resume(tmp_path):
  cache = tmp_path / "cache"
  single = tmp_path / "single"
  # One process with two devices: the same (data=2) mesh and global batch.
  out = subprocess.run(
      [sys.executable, "-m", "train", CONFIG, f"--workdir={single}", "--config.train.num_steps=4"],
      cwd=REPO, capture_output=True, text=True, timeout=240,
      env=dict(_env(cache), XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}"))
  assert out.returncode == 0, out.stderr[-3000:]

  multi = tmp_path / "multi"
  logs = _two_processes(multi, cache, "--config.train.num_steps=4")
  assert "process 0 of 2" in logs[0] and "process 1 of 2" in logs[1]
  with open(multi / "results.json") as f:
    results = json.load(f)
  assert (results["steps"], results["process_count"], results["device_count"]) == (4, 2, 2)
  want, got = _train_losses(single), _train_losses(multi)
  assert sorted(got) == [1, 2, 3, 4]
  for step in got:
    assert got[step] == pytest.approx(want[step], rel=1e-4), (step, got, want)

  logs = _two_processes(multi, cache, "--config.train.num_steps=6")
  assert "resumed from step 4" in logs[0]
  with open(multi / "results.json") as f:
    assert json.load(f)["steps"] == 6
  assert sorted(_train_losses(multi)) == [1, 2, 3, 4, 5, 6]
