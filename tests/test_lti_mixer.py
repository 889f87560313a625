"""LTIMixer itself, around a toy kernel module with an explicit kernel.

Given a kernel module whose kernel is a plain array, when the mixer runs, then its
output equals the float64 reference (direct convolution, D, activation, projection),
bidirectional equals the two directions added, and step equals the parallel mode.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssm.lti_mixer import LTIMixer
from _lti_testing import reference_mixer
from _testing import max_rel, run_steps


class ToyKernel(nnx.Module):
  """Kernel protocol with an explicit random kernel (c, h, l_max); step by a window."""

  def __init__(self, d_model, channels, l_max, *, rngs):
    self.d_model, self.channels, self.l_max = d_model, channels, l_max
    decay = 0.9 ** jnp.arange(l_max)
    self.k = nnx.Param(jax.random.normal(rngs.params(), (channels, d_model, l_max)) * decay)

  def __call__(self, seq_len):
    return self.k[...][..., :seq_len]

  def init_state(self, batch_size):
    return jnp.zeros((batch_size, self.l_max, self.d_model))

  def step(self, state, u_t):
    state = jnp.concatenate([state[:, 1:], u_t[:, None]], axis=1)
    return state, jnp.einsum("blh,chl->bch", state, self.k[...][..., ::-1])


def make(channels=1, bidirectional=False, seed=0, l_max=24, d_model=3, **kw):
  rngs = nnx.Rngs(seed)
  kernel = ToyKernel(d_model, channels, l_max, rngs=rngs)
  return LTIMixer(kernel, bidirectional=bidirectional, rngs=rngs, **kw)


def inputs(shape, seed=1):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("channels,activation,postact", [
    (1, "gelu", "glu"), (2, "silu", "linear"), (1, "tanh", "none"), (2, "relu", "glu")])
def test_causal_matches_reference(channels, activation, postact):
  mixer = make(channels, activation=activation, postact=postact)
  x = inputs((2, 20, 3))
  np.testing.assert_array_less(max_rel(mixer(x), reference_mixer(mixer, x)), 1e-5)


@pytest.mark.parametrize("channels,postact", [(1, "glu"), (2, "linear"), (1, "none")])
def test_bidirectional_is_sum_of_directions(channels, postact):
  # The kernel module has 2c channels: c forward, c applied to the reversed sequence.
  mixer = make(2 * channels, bidirectional=True, postact=postact)
  assert mixer.channels == channels
  x = inputs((2, 24, 3))
  np.testing.assert_array_less(max_rel(mixer(x), reference_mixer(mixer, x)), 1e-5)


def test_bidirectional_is_not_causal_and_causal_is():
  x = inputs((1, 24, 3))
  x2 = x.at[:, 12:].set(0.0)
  causal, bidir = make(2), make(2, bidirectional=True)
  np.testing.assert_allclose(causal(x)[:, :12], causal(x2)[:, :12], rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(bidir(x)[:, :12] - bidir(x2)[:, :12])).max() > 1e-3


def test_step_matches_parallel():
  mixer = make(2)
  x = inputs((2, 24, 3))
  np.testing.assert_array_less(max_rel(run_steps(mixer, x), mixer(x)), 1e-5)


def test_dropout_determinism():
  x = inputs((2, 24, 3))
  mixer = make(2, dropout=0.5)
  y_det = mixer(x, deterministic=True)
  # deterministic=True is reproducible and equals the dropout-free layer with the same params
  np.testing.assert_array_equal(y_det, mixer(x, deterministic=True))
  np.testing.assert_allclose(y_det, make(2, dropout=0.0)(x), rtol=1e-6, atol=1e-6)
  # training mode drops units: differs from eval and between calls (the rng stream advances)
  y1, y2 = mixer(x, deterministic=False), mixer(x, deterministic=False)
  assert np.abs(np.asarray(y1 - y_det)).max() > 1e-3
  assert np.abs(np.asarray(y1 - y2)).max() > 1e-3
  # ... and is reproducible from the seed
  np.testing.assert_array_equal(y1, make(2, dropout=0.5)(x, deterministic=False))
  # step mode never drops
  np.testing.assert_array_less(max_rel(run_steps(mixer, x), y_det), 1e-5)


def test_bfloat16_input_keeps_dtype():
  mixer = make(1)
  y = mixer(inputs((1, 8, 3)).astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16 and y.shape == (1, 8, 3)


@pytest.mark.parametrize("kw,match", [
    (dict(activation="swish"), "activation"),
    (dict(postact="gelu"), "postact"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(channels=3, bidirectional=True), "even number"),
    (dict(channels=2, postact="none"), "one channel"),
])
def test_bad_constructor_args(kw, match):
  with pytest.raises(ValueError, match=match):
    make(**kw)


def test_bad_inputs():
  mixer = make(1)
  with pytest.raises(ValueError, match="3 dims"):
    mixer(jnp.zeros((8, 3)))
  with pytest.raises(ValueError, match="d_model=3"):
    mixer(jnp.zeros((1, 8, 4)))
  with pytest.raises(ValueError, match="2 dims"):
    mixer.step(mixer.init_state(1), jnp.zeros((1, 1, 3)))
  bidir = make(2, bidirectional=True)
  with pytest.raises(ValueError, match="bidirectional"):
    bidir.init_state(1)
  with pytest.raises(ValueError, match="bidirectional"):
    bidir.step(None, jnp.zeros((1, 3)))

