"""Scanned layers (`config.model.scan_layers`, models.blocks): the blocks as one lax.scan
give the unrolled loop's outputs, gradients, dropout masks, BatchNorm statistics and remat
gradients, compile one block, and refuse blocks of different structure."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from data.task import TaskSpec
from models.blocks import Backbone
from models.registry import build_mixer

L, V, D, LAYERS = 16, 11, 16, 3
LM = TaskSpec("toy_lm", "lm", "tokens", L, V, vocab_size=V)
CLS = TaskSpec("toy_cls", "classification", "tokens", L, 3, vocab_size=V)


def _build(cfg, task, scan):
  return models.build_model(dict(cfg, scan_layers=scan, num_layers=LAYERS, d_model=D), task,
                            rngs=nnx.Rngs(params=0, dropout=1))


def _leaves(tree):
  """The tree's leaves as float64 NumPy arrays (PRNG keys as their key data)."""
  def plain(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x, np.float64)
  return [plain(x) for x in jax.tree.leaves(tree)]


def _close(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(_leaves(got), _leaves(want)):
    # float32: the scan body and the unrolled blocks fuse (and so round) differently; an
    # absolute floor relative to the leaf's scale (a gradient of max 7.5 differed by 2.9e-6)
    scale = max(1.0, float(np.max(np.abs(b))) if np.size(b) else 1.0)
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6 * scale)


def _batch(task, b=2):
  rng = np.random.default_rng(3)
  ids = rng.integers(1, V, (b, L)).astype(np.int32)
  ids[1, -3:] = 0  # padding
  batch = dict(inputs=jnp.asarray(ids), mask=jnp.asarray(ids != 0))
  if task.kind == "lm":
    batch["targets"] = jnp.asarray(np.roll(ids, -1, axis=1))
  return batch


def _loss_and_grads(model, batch, deterministic):
  """(loss, gradients, the non-parameter state after the call), jitted as the trainer does
  (the state an argument, so that dropout and BatchNorm can update it)."""
  graph, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, rest):
    m = nnx.merge(graph, params, jax.tree.map(lambda x: x, rest))  # fresh, as the trainer
    out = m(batch, deterministic=deterministic)
    return jnp.sum(jnp.sin(out)), nnx.state(m, nnx.Not(nnx.Param))
  (value, new_rest), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, rest)
  return value, grads, new_rest


CASES = {
    "attention": (dict(name="attention", ffn="mlp", norm="rms", pooling="none",
                       mixer=dict(num_heads=2)), LM, True),
    "mamba": (dict(name="mamba", norm="rms", pooling="none"), LM, True),
    "mamba2": (dict(name="mamba2", norm="rms", pooling="none", mixer=dict(headdim=8)), LM,
               True),
    # BatchNorm statistics and dropout streams (training mode) come back per block
    "s4d_batchnorm_dropout": (dict(name="s4d", norm="batch", dropout=0.3, ffn="glu",
                                   mixer=dict(dropout=0.2)), CLS, False),
    # per-layer decays (layer_idx) ride as stacked arrays; memory caching inside the body
    "lightning_caching": (dict(name="lightning", norm="layer", pooling="none",
                               mixer=dict(num_heads=2, memory_caching=dict(segment_size=4))),
                          LM, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_scanned_equals_unrolled(case):
  cfg, task, deterministic = CASES[case]
  batch = _batch(task)
  _close(_loss_and_grads(_build(cfg, task, True), batch, deterministic),
         _loss_and_grads(_build(cfg, task, False), batch, deterministic))


def test_scanned_training_mode_updates_state_like_unrolled():
  """Two training-mode calls in a row: the second sees the first's dropout counts and
  BatchNorm statistics, written back per block."""
  cfg, task, _ = CASES["s4d_batchnorm_dropout"]
  batch = _batch(task)
  outs = {}
  for scan in (True, False):
    model = _build(cfg, task, scan)
    graph, state = nnx.split(model)

    @jax.jit
    def call(state):
      m = nnx.merge(graph, state)
      return m(batch, deterministic=False), nnx.state(m)
    y1, state = call(state)
    y2, state = call(state)
    outs[scan] = [y1, y2, nnx.state(nnx.merge(graph, state), nnx.BatchStat)]
  assert not np.allclose(outs[True][0], outs[True][1])  # the masks moved on
  _close(outs[True], outs[False])


@pytest.mark.parametrize("remat", ["block", "dots_with_no_batch_dims_saveable"])
def test_scanned_remat_gradients_equal_unrolled(remat):
  cfg = dict(CASES["attention"][0], remat=remat)
  batch = _batch(LM)
  _close(_loss_and_grads(_build(cfg, LM, True), batch, True)[:2],
         _loss_and_grads(_build(dict(cfg, remat="none"), LM, False), batch, True)[:2])


def _count(jaxpr, name):
  """Equations named `name` in a closed jaxpr, nested bodies included."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == name
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      n += _count(sub, name)
  return n


def test_scanned_model_traces_one_block():
  """The scanned model's step holds one scan of length num_layers and the block's matrix
  products once, where the unrolled one holds them num_layers times."""
  cfg, task, _ = CASES["attention"]
  batch = _batch(task)
  counts = {}
  for scan in (True, False):
    model = _build(cfg, task, scan)
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graph, p, rest)(batch, deterministic=True))(
        params).jaxpr
    counts[scan] = (_count(jaxpr, "dot_general"),
                    [e.params["length"] for e in jaxpr.eqns if e.primitive.name == "scan"])
  (dots_scan, scans), (dots_loop, loops) = counts[True], counts[False]
  assert scans == [LAYERS] and loops == []
  # unrolled = outside + LAYERS * per block; scanned = outside + 1 * per block
  per_block = (dots_loop - dots_scan) / (LAYERS - 1)
  assert per_block >= 4 and per_block == int(per_block), counts  # qkv, out, fc1, fc2 at least


def test_scan_layers_refuses_blocks_of_different_structure():
  rngs = nnx.Rngs(0)
  mixers = [build_mixer("s4d", D, rngs=rngs), build_mixer("mamba", D, rngs=rngs)]
  with pytest.raises(ValueError, match="scan_layers needs blocks of one structure; block 1"):
    Backbone(mixers, D, scan_layers=True, rngs=rngs)
  with pytest.raises(ValueError, match="scan_layers must be a bool"):
    models.build_model(dict(name="s4d", d_model=D, num_layers=2, scan_layers="yes"), CLS,
                       rngs=nnx.Rngs(0))


def test_trainer_with_scanned_layers_matches_unrolled(tmp_path):
  """The tiny ListOps S4D run (dropout on, BatchNorm) at 2 layers: the same train losses
  step by step and the same test loss with model.scan_layers on and off."""
  from tests.test_train import tiny_config, train_losses  # noqa: PLC0415
  from train import trainer  # noqa: PLC0415
  out = {}
  for scan in (True, False):
    config = tiny_config(str(tmp_path / "data"), **{"model.num_layers": 2,
                                                    "train.num_steps": 6,
                                                    "train.eval_every": 6,
                                                    "train.checkpoint_every": 6})
    config.model.scan_layers = scan
    workdir = tmp_path / f"scan_{scan}"
    results = trainer.run(config, str(workdir))
    out[scan] = (train_losses(workdir), results["test_loss"])
  (got, got_test), (want, want_test) = out[True], out[False]
  assert sorted(got) == sorted(want) and len(want) == 6
  np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)],
                             rtol=1e-5)
  np.testing.assert_allclose(got_test, want_test, rtol=1e-5)


def test_scan_layers_refuses_to_drop_a_state_update_it_cannot_carry():
  """A block variable other than dropout counts and BatchNorm statistics that changes in
  training would be lost by the scan: tracing stops with an error naming it."""
  from ssm.mixer import Mixer  # noqa: PLC0415

  class Counting(Mixer):
    name = "counting"

    def __init__(self, d_model):
      self.d_model = d_model
      self._precision(None, "float32")
      self.calls = nnx.Variable(jnp.zeros((), jnp.int32))

    def forward(self, x, *, mask, deterministic, segment_ids):
      self.calls[...] = self.calls[...] + 1
      return x

    def _init_state(self, batch_size, max_len):
      return None

    def _step(self, state, x_t):
      return state, x_t

  rngs = nnx.Rngs(0)
  backbone = Backbone([Counting(D), Counting(D)], D, scan_layers=True, rngs=rngs)
  graph, state = nnx.split(backbone)

  def call(state):
    m = nnx.merge(graph, jax.tree.map(lambda x: x, state))
    return m(jnp.ones((1, L, D)), deterministic=False)
  with pytest.raises(ValueError, match=r"scan_layers cannot carry what block updates in .*calls"):
    jax.jit(call)(state)
