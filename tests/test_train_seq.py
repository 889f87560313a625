"""Sequence parallelism in the trainer: config.train.mesh.seq splits every sequence's length.

Given the tiny byte-level LM config (configs/lm/shakespeare.py, size "tiny": one layer,
d_model 16, 32 tokens) on a small corpus, when it trains 4 steps on 8 fake CPU devices
with the length split over "seq" (data 2 x seq 4, data 2 x fsdp 2 x seq 2, data 4 x
seq 2 for mamba, seq 8), then every step's loss and the final validation and test losses equal the
one-device run's within float32 noise: mamba, mamba2 and lightning (the last two with
packed documents, segment_ids, whose boundaries cross the devices' chunks) run their
scans sequence-parallel; s4d its FFT convolution (seq_conv "auto": the distributed FFT on
seq 4, the all-gather around the convolution on fsdp 2 x seq 2); the transformer (no such
path) has the length all-gathered around the layer. The same with the blocks as one
lax.scan (model.scan_layers; mamba2 on data 2 x seq 4). A run halted at step 2 under the
seq mesh (copied) resumes from its checkpoint to the same losses, under the same mesh and
under a data-only one.
Gradient accumulation (train.accum_steps=2, dropout off) under data 2 x seq 4 equals the
one-device, one-batch run.

The 8-device runs happen in one subprocess (XLA_FLAGS must be set before JAX starts; this
pytest process keeps one device), which prints its results as JSON; the one-device
references run here.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from configs.lm import shakespeare
from train import metrics as metrics_lib
from tests._testing import write_word_corpus
from train import sharding, trainer

pytestmark = pytest.mark.xdist_group("train_seq")

REPO = pathlib.Path(__file__).resolve().parents[1]
KINDS = ("mamba", "mamba2", "lightning")       # sequence-parallel scans
GATHERED = ("transformer",)                    # all-gathered over the length
LTI = ("s4d",)                                 # split FFT convolution (fft_conv_seq_parallel)
MESHES = {"data4_seq2": dict(data=4, seq=2), "data2_seq4": dict(data=2, seq=4),
          "data2_fsdp2_seq2": dict(data=2, fsdp=2, seq=2)}
# Every kind on the seq-4 and the fsdp x seq-2 mesh; the plain seq-2 one (the same split
# as the fsdp one's, without fsdp) for mamba only: a run is ~20 s of the suite's time.
RUNS = [(k, m) for k in KINDS for m in MESHES if m != "data4_seq2" or k == "mamba"]
RTOL = 1e-4  # float32 noise over a 4-step run (the sums run in another order)


def lm_config(kind: str, corpus: str, dropout: float = 0.1, accum_steps: int = 1, **mesh):
  """The tiny LM config of `kind`, batch 8, packed-document ids where the kind takes them."""
  config = shakespeare.get_config(f"{kind},tiny")
  config.data.path = corpus
  config.data.segment_ids = kind in ("mamba2", "lightning")
  config.model.dropout = dropout  # on by default: its masks must not depend on the mesh
  config.train.update(dict(batch_size=8, eval_batch_size=8, fsdp_min_size=16,
                           accum_steps=accum_steps))
  config.train.mesh.update(mesh)
  return config


def losses(workdir) -> dict:
  """{"train": [loss per step], "val": loss, "test": loss} of a finished run."""
  out = {"train": {}}
  for m in metrics_lib.read_metrics(str(workdir)):
    if m["split"] == "train":
      out["train"][m["step"]] = m["loss"]
    else:
      out[m["split"]] = m["loss"]
  out["train"] = [out["train"][s] for s in sorted(out["train"])]
  return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return str(write_word_corpus(tmp_path_factory.mktemp("corpus")))


# Runs in the 8-device subprocess: argv = corpus, workdir root; prints RESULT <json>.
EIGHT_DEVICE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import jax
    from jax.sharding import PartitionSpec as P
    import data
    import shutil
    from tests.test_train_seq import GATHERED, LTI, MESHES, RUNS, lm_config, losses
    from train import sharding, trainer
    assert jax.device_count() == 8, jax.devices()
    corpus, root = sys.argv[1], sys.argv[2]
    out = {}
    runs = RUNS + [("mamba", "seq8")]
    runs += [(k, "data2_seq4") for k in GATHERED]
    runs += [(k, m) for k in LTI for m in ("data2_seq4", "data2_fsdp2_seq2")]
    meshes = dict(MESHES, seq8=dict(data=1, seq=8))
    for kind, mesh in runs:
      workdir = os.path.join(root, f"{kind}_{mesh}")
      trainer.run(lm_config(kind, corpus, **meshes[mesh]), workdir)
      out[f"{kind}/{mesh}"] = losses(workdir)
    # the blocks as one lax.scan (model.scan_layers) around the sequence-parallel SSD
    scanned = lm_config("mamba2", corpus, **MESHES["data2_seq4"])
    scanned.model.scan_layers = True
    trainer.run(scanned, os.path.join(root, "mamba2_scanned"))
    out["mamba2/data2_seq4/scanned"] = losses(os.path.join(root, "mamba2_scanned"))

    # What the trainer built: the mixers' seq_mesh, the batch's length split over "seq".
    config = lm_config("mamba2", corpus, **MESHES["data2_seq4"])
    task, splits = data.load_task(config.data)
    tr = trainer.Trainer(config, task, sharding.make_mesh(config.train.mesh))
    from data.pipeline import make_loader
    local = next(make_loader(splits["train"], batch_size=8, shuffle=False, seed=0,
                             drop_remainder=True))
    out["specs"] = {k: str(tuple(v.sharding.spec)) for k, v in tr.global_batch(local).items()}
    out["seq_layers"] = {kind: trainer.Trainer(
        lm_config(kind, corpus, **MESHES["data2_seq4"]), task,
        tr.mesh).seq_layers for kind in ("mamba2", "s4d")}

    # Resume under the seq mesh: one run halted at step 2, copied, each copy rerun to the
    # end (same mesh, and data only).
    halted = os.path.join(root, "halted")
    first = lm_config("mamba2", corpus, **MESHES["data2_seq4"])
    first.train.halt_at_step = 2
    trainer.run(first, halted)
    out["halted_steps"] = len(losses(halted)["train"])
    for name, second in (("same", MESHES["data2_seq4"]), ("data8", dict(data=8, seq=1))):
      workdir = os.path.join(root, f"resume_{name}")
      shutil.copytree(halted, workdir)
      trainer.run(lm_config("mamba2", corpus, **second), workdir)
      out[f"resume/{name}"] = losses(workdir)

    # Gradient accumulation under the seq mesh: micro-batches of 4 over data 2 x seq 4.
    workdir = os.path.join(root, "accum2")
    trainer.run(lm_config("mamba2", corpus, dropout=0.0, accum_steps=2,
                          **MESHES["data2_seq4"]), workdir)
    out["accum2"] = losses(workdir)
    try:  # micro-batches of 4 cannot split over 8 data devices
      trainer.run(lm_config("mamba", corpus, accum_steps=2, data=8),
                  os.path.join(root, "bad_accum"))
      out["accum_error"] = None
    except ValueError as e:
      out["accum_error"] = str(e)

    # One-line errors: a length the seq axis does not divide.
    bad = lm_config("mamba", corpus, data=2, seq=4)
    bad.data.seq_len = 30
    try:
      trainer.run(bad, os.path.join(root, "bad"))
      out["error"] = None
    except ValueError as e:
      out["error"] = str(e)
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def references(corpus, tmp_path_factory):
  """One-device runs of every kind: {kind: losses}."""
  root = tmp_path_factory.mktemp("one_device")
  out = {}
  for kind in KINDS + GATHERED + LTI:
    trainer.run(lm_config(kind, corpus), str(root / kind))
    out[kind] = losses(root / kind)
  return out


@pytest.fixture(scope="module")
def eight(corpus, tmp_path_factory):
  root = tmp_path_factory.mktemp("eight_devices")
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8",
             PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                      + env.get("XLA_FLAGS", "")).strip()
  env.pop("PYTEST_XDIST_WORKER", None)
  # programs repeat across its runs (a resumed run recompiles the halted one's step)
  env.update(JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICE_SCRIPT, corpus, str(root)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def assert_same_run(got, want, rtol=RTOL):
  assert len(got["train"]) == len(want["train"]) == 4
  np.testing.assert_allclose(got["train"], want["train"], rtol=rtol)
  np.testing.assert_allclose([got["val"], got["test"]], [want["val"], want["test"]], rtol=rtol)


@pytest.mark.slow
@pytest.mark.parametrize("kind,mesh", RUNS)
def test_seq_mesh_matches_one_device(references, eight, kind, mesh):
  assert_same_run(eight[f"{kind}/{mesh}"], references[kind])


@pytest.mark.slow
def test_scanned_layers_under_the_seq_mesh_match_one_device(references, eight):
  assert_same_run(eight["mamba2/data2_seq4/scanned"], references["mamba2"])


@pytest.mark.slow
def test_all_of_the_length_on_seq(references, eight):
  assert_same_run(eight["mamba/seq8"], references["mamba"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", GATHERED)
def test_layers_without_a_seq_path_are_gathered_and_match(references, eight, kind):
  assert_same_run(eight[f"{kind}/data2_seq4"], references[kind])


@pytest.mark.slow
@pytest.mark.parametrize("kind,mesh", [(k, m) for k in LTI
                                       for m in ("data2_seq4", "data2_fsdp2_seq2")])
def test_lti_layers_split_their_convolution_and_match(references, eight, kind, mesh):
  assert_same_run(eight[f"{kind}/{mesh}"], references[kind])


@pytest.mark.slow
def test_trainer_splits_the_length_and_gives_the_mixers_the_mesh(eight):
  specs = eight["specs"]
  for key in ("inputs", "targets", "mask", "segment_ids"):
    assert specs[key] == "(('data', 'fsdp'), 'seq')", (key, specs)
  assert specs["weights"] == "(('data', 'fsdp'),)", specs
  assert eight["seq_layers"] == {"mamba2": dict(parallel=1, gathered=0, plain=0),
                                 "s4d": dict(parallel=1, gathered=0, plain=0)}


@pytest.mark.slow
@pytest.mark.parametrize("second", ["same", "data8"])
def test_resume_under_the_seq_mesh(references, eight, second):
  assert eight["halted_steps"] == 2  # the copies resumed from a run that stopped at step 2
  got = eight[f"resume/{second}"]
  assert_same_run(got, references["mamba2"])
  assert_same_run(got, eight["mamba2/data2_seq4"], rtol=1e-5)


@pytest.mark.slow
def test_accumulation_under_the_seq_mesh_matches_one_batch_on_one_device(corpus, eight, tmp_path):
  # dropout off: micro-batches draw their own dropout masks
  trainer.run(lm_config("mamba2", corpus, dropout=0.0), str(tmp_path))
  assert_same_run(eight["accum2"], losses(tmp_path))
  error = eight["accum_error"]
  assert error and "\n" not in error
  assert "config.train.accum_steps=2" in error and "8 devices of the data/fsdp mesh" in error, error


@pytest.mark.slow
def test_length_not_divisible_by_seq_fails_in_one_line(eight):
  error = eight["error"]
  assert error and "\n" not in error
  assert "config.data.seq_len=30" in error and "mesh axis 'seq'" in error, error


# -- without devices: the config side ----------------------------------------------------

def test_mesh_config_takes_seq_and_configs_without_it():
  assert sharding.mesh_shape({"data": -1, "fsdp": 1, "seq": 4}, 8) == (2, 1, 4)
  assert sharding.mesh_shape({"data": 2, "fsdp": 2}, 4) == (2, 2, 1)  # no "seq": 1
  assert sharding.mesh_shape({"data": 1, "fsdp": 1, "seq": -1}, 8) == (1, 1, 8)
  with pytest.raises(ValueError, match="needs 8 devices"):
    sharding.mesh_shape({"data": 2, "fsdp": 1, "seq": 4}, 4)


def test_validate_config_knows_seq(corpus):
  config = lm_config("mamba", corpus)
  trainer.validate_config(config)
  config.train.mesh.seq = 0
  trainer.validate_config(config)  # an int: its value is make_mesh's to check
  with pytest.raises(ValueError, match="sizes must be positive"):
    sharding.make_mesh(config.train.mesh)
  # A config written before the seq axis (a saved config.json): seq is 1.
  old = config.train.mesh.to_dict()
  del old["seq"]
  assert sharding.mesh_sizes(old) == dict(data=-1, fsdp=1, seq=1)


def test_batch_spec():
  P = sharding.P
  mesh = sharding.jax.make_mesh((1, 1, 1), sharding.AXES)
  assert sharding.batch_spec(2, mesh) == P(("data", "fsdp"))  # seq 1: nothing on the length
  assert sharding.length_axis("retrieval") == 2 and sharding.length_axis("lm") == 1
