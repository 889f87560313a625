"""Optimizer groups, schedules and clipping (train/optim.py) on a toy model."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from ssm.params import NoDecayParam, SSMParam
from train import optim


class Toy(nnx.Module):
  """One parameter of every kind the trainer routes differently."""

  def __init__(self):
    self.ssm_A = SSMParam(jnp.array([[1.0, -2.0], [0.5, 3.0]]))    # -> "ssm"
    self.A_log = NoDecayParam(jnp.array([[0.3, -0.7], [1.5, 2.0]]))  # -> "no_decay"
    self.bias = nnx.Param(jnp.array([0.2, -0.4]))                  # 1-D -> "no_decay"
    self.w = nnx.Param(jnp.array([[1.0, 2.0], [-3.0, 4.0]]))       # 2-D -> "decay"
    self.stat = nnx.BatchStat(jnp.ones((2,)))                      # not a parameter


def optim_cfg(**kw):
  cfg = dict(optimizer="adamw", lr=0.1, ssm_lr=0.01, weight_decay=0.5, warmup_steps=0,
             schedule="constant", grad_clip=0.0, b1=0.9, b2=0.999, eps=1e-8)
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


def test_groups_follow_variable_type_and_rank():
  params = nnx.state(Toy(), nnx.Param)
  labels = optim.param_labels(params)
  assert labels["ssm_A"] == "ssm"
  assert labels["A_log"] == "no_decay"
  assert labels["bias"] == "no_decay"
  assert labels["w"] == "decay"
  assert "stat" not in params  # BatchStat is left to the forward pass
  assert optim.group_sizes(params) == {"ssm": 4, "no_decay": 6, "decay": 4}


def test_first_adamw_update_per_group():
  """Adam's first step is -lr * g / (|g| + eps); decay adds -lr * wd * p only for "decay"."""
  params = nnx.state(Toy(), nnx.Param)
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
  tx, _ = optim.make_optimizer(optim_cfg(), num_steps=10)
  updates, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)

  def adam(g):
    return np.asarray(g) / (np.abs(np.asarray(g)) + 1e-8)

  def check(name, lr, wd):
    p, g = np.asarray(params[name][...]), np.asarray(grads[name][...])
    expected = -lr * (adam(g) + wd * p)
    np.testing.assert_allclose(np.asarray(updates[name][...]), expected, rtol=1e-5, atol=1e-5)

  check("ssm_A", lr=0.01, wd=0.0)   # ssm_lr, no decay
  check("A_log", lr=0.1, wd=0.0)    # main lr, no decay
  check("bias", lr=0.1, wd=0.0)
  check("w", lr=0.1, wd=0.5)        # main lr with decoupled weight decay


def test_ssm_weight_decay_decays_the_ssm_group_only():
  """config.optim.ssm_weight_decay (SGConv's recipes) adds -ssm_lr * wd * p to the SSMParam
  group and leaves the others as they were; 0, or a config without the key (older runs),
  gives the same optimizer state structure as before the key existed."""
  params = nnx.state(Toy(), nnx.Param)
  rng = np.random.default_rng(1)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
  plain, _ = optim.make_optimizer(optim_cfg(), num_steps=10)
  decayed, _ = optim.make_optimizer(optim_cfg(ssm_weight_decay=0.25), num_steps=10)
  a, _ = jax.jit(plain.update)(grads, plain.init(params), params)
  b, _ = jax.jit(decayed.update)(grads, decayed.init(params), params)
  p = np.asarray(params["ssm_A"][...])
  np.testing.assert_allclose(np.asarray(b["ssm_A"][...]) - np.asarray(a["ssm_A"][...]),
                             -0.01 * 0.25 * p, rtol=1e-5, atol=1e-7)
  for name in ("A_log", "bias", "w"):
    np.testing.assert_array_equal(np.asarray(b[name][...]), np.asarray(a[name][...]))
  zero, _ = optim.make_optimizer(optim_cfg(ssm_weight_decay=0.0), num_steps=10)
  assert (jax.tree.structure(zero.init(params)) == jax.tree.structure(plain.init(params)))


def test_sgd_with_global_norm_clipping():
  params = nnx.state(Toy(), nnx.Param)
  grads = jax.tree.map(lambda p: 10.0 * jnp.ones_like(p), params)
  tx, _ = optim.make_optimizer(optim_cfg(optimizer="sgd", b1=0.0, weight_decay=0.0,
                                         grad_clip=1.0), num_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  # 14 entries of 10 -> global norm 10 sqrt(14), clipped to 1.
  scale = 1.0 / (10.0 * math.sqrt(14))
  np.testing.assert_allclose(updates["w"][...], -0.1 * 10.0 * scale * np.ones((2, 2)), rtol=1e-5)
  np.testing.assert_allclose(updates["ssm_A"][...], -0.01 * 10.0 * scale * np.ones((2, 2)),
                             rtol=1e-5)


@pytest.mark.parametrize("schedule", optim.SCHEDULES)
def test_schedules(schedule):
  peak, warmup, total = 2.0, 4, 20
  fn = optim.make_schedule(peak, schedule=schedule, warmup_steps=warmup, total_steps=total)
  got = np.array([float(fn(s)) for s in range(total + 3)])
  for s in range(total + 3):
    if s < warmup:
      want = peak * (s + 1) / warmup
    else:
      t = min(max((s - warmup) / (total - warmup), 0.0), 1.0)
      want = peak * {"cosine": 0.5 * (1 + math.cos(math.pi * t)), "linear": 1 - t,
                     "constant": 1.0, "rsqrt": math.sqrt(warmup / max(s + 1, warmup))}[schedule]
    assert got[s] == pytest.approx(want, rel=1e-5, abs=1e-6), (schedule, s)


def test_unknown_optimizer_and_schedule():
  with pytest.raises(ValueError, match="optimizer"):
    optim.make_optimizer(optim_cfg(optimizer="adagrad"), num_steps=10)
  with pytest.raises(ValueError, match="schedule"):
    optim.make_optimizer(optim_cfg(schedule="step"), num_steps=10)


def test_update_of_a_real_module_state_keeps_its_structure():
  """The optax state and updates work on nnx.State trees end to end (jit, apply)."""
  model = Toy()
  params = nnx.state(model, nnx.Param)
  tx, _ = optim.make_optimizer(optim_cfg(grad_clip=1.0), num_steps=10)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(lambda p: sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  new_params, _ = step(params, opt_state)
  assert jax.tree.structure(new_params) == jax.tree.structure(params)
  nnx.update(model, new_params)
  assert not np.allclose(model.w[...], [[1.0, 2.0], [-3.0, 4.0]])
