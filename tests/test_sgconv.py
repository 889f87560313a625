"""SGConv: the multi-scale kernel against a NumPy transcription of the recipe,
normalisation, gradients, parallel vs recurrent, bidirectional, bad input."""

import math

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx
from jax.test_util import check_grads

from models import build_mixer
from ssm import sgconv
from ssm.params import SSMParam
from _lti_testing import reference_mixer
from _testing import max_rel, run_steps


def numpy_multiscale_kernel(subs_schd, seq_len, decay):
  """The recipe, transcribed directly: scale i upsampled by 2^max(i-1, 0) with linear
  interpolation between sample centres (np.interp, flat beyond the end samples),
  weighted by decay^-i, concatenated, cut to seq_len."""
  pieces = []
  for i, sub in enumerate(np.asarray(subs_schd, np.float64)):
    f = 2 ** max(i - 1, 0)
    d = sub.shape[-1]
    centres_in = np.arange(d) + 0.5  # sample i covers [i, i + 1) in input units
    centres_out = (np.arange(d * f) + 0.5) / f
    up = np.apply_along_axis(lambda v: np.interp(centres_out, centres_in, v), -1, sub)
    pieces.append(up * decay ** (-i))
  return np.concatenate(pieces, axis=-1)[..., :seq_len]


@pytest.mark.parametrize("l_max,d", [(1, 4), (4, 4), (5, 4), (20, 4), (64, 64), (65, 64),
                                     (1000, 64), (16384, 64)])
def test_num_scales(l_max, d):
  expected = max(1, 1 + math.ceil(math.log2(l_max / d)))
  assert sgconv.num_scales(l_max, d) == expected


def test_kernel_matches_numpy_recipe():
  # d = 4, l_max = 20: 4 scales of lengths 4, 4, 8, 16 (32 taps), cut to 20.
  kern = sgconv.SGConvKernel(3, l_max=20, channels=2, kernel_dim=4, decay=3.0, rngs=nnx.Rngs(0))
  subs = np.asarray(kern.kernels[...])
  assert subs.shape == (4, 2, 3, 4)
  ref = numpy_multiscale_kernel(subs, 20, 3.0)
  norm = np.linalg.norm(ref, axis=-1, keepdims=True)
  np.testing.assert_allclose(kern.kernel_norm[...], norm, rtol=1e-5)
  np.testing.assert_allclose(kern(20), ref / norm, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(kern(13), (ref / norm)[..., :13], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(kern(3), (ref / norm)[..., :3], rtol=1e-5, atol=1e-6)


def test_normalisation_fixed_at_init():
  kern = sgconv.SGConvKernel(5, l_max=100, channels=2, kernel_dim=8, rngs=nnx.Rngs(1))
  np.testing.assert_allclose(np.linalg.norm(kern(100), axis=-1), 1.0, rtol=1e-5)
  # The norm is a fixed, non-trainable variable: not a Param, and unchanged by training.
  assert not isinstance(kern.kernel_norm, nnx.Param)
  assert isinstance(kern.kernels, SSMParam)
  assert "kernel_norm" not in nnx.state(kern, nnx.Param)
  k_before = np.asarray(kern(100))
  kern.kernels[...] = kern.kernels[...] * 2.0
  np.testing.assert_allclose(kern(100), 2 * k_before, rtol=1e-5, atol=1e-6)


def test_kernel_gradients_match_finite_differences():
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    subs = jnp.asarray(rng.standard_normal((3, 2, 2, 4)))
    w = jnp.asarray(rng.standard_normal((2, 2, 13)))
    loss = lambda s: jnp.sum(w * sgconv.sgconv_kernel(s, 13, decay=2.0))
    check_grads(jax.jit(loss), (subs,), order=1, modes=("rev",), atol=1e-7, rtol=1e-7)


# -- the mixer ---------------------------------------------------------------

@pytest.mark.parametrize("channels,seq_len", [(1, 40), (2, 29)])
def test_parallel_equals_recurrent(channels, seq_len):
  # seq_len < l_max uses the kernel's first taps; the step window starts zero-filled.
  mixer = build_mixer("sgconv", 4, rngs=nnx.Rngs(0), l_max=40, kernel_dim=8, channels=channels)
  x = jax.random.normal(jax.random.key(1), (2, seq_len, 4), jnp.float32)
  y = mixer(x)
  np.testing.assert_array_less(max_rel(run_steps(mixer, x), y), 1e-4)
  np.testing.assert_array_less(max_rel(y, reference_mixer(mixer, x)), 1e-5)


def test_bidirectional_equals_sum_of_directions():
  mixer = build_mixer("sgconv", 4, rngs=nnx.Rngs(2), l_max=32, kernel_dim=8, bidirectional=True)
  assert mixer.kernel.channels == 2
  x = jax.random.normal(jax.random.key(3), (2, 32, 4), jnp.float32)
  np.testing.assert_array_less(max_rel(mixer(x), reference_mixer(mixer, x)), 1e-5)


# -- bad input --------------------------------------------------------------

def test_bad_inputs():
  mixer = build_mixer("sgconv", 4, rngs=nnx.Rngs(0), l_max=32, kernel_dim=8)
  with pytest.raises(ValueError, match="exceeds l_max=32"):
    mixer(jnp.zeros((1, 33, 4)))
  with pytest.raises(ValueError, match="3 dims"):
    mixer(jnp.zeros((32, 4)))
  with pytest.raises(ValueError, match="state must have shape"):
    mixer.step(jnp.zeros((1, 16, 4)), jnp.zeros((1, 4)))
  with pytest.raises(ValueError, match="unknown options"):
    build_mixer("sgconv", 4, rngs=nnx.Rngs(0), l_max=32, d_state=64)
  default = build_mixer("sgconv", 4, rngs=nnx.Rngs(0))  # l_max defaults to S4's 1024
  assert default.kernel.l_max == 1024
  with pytest.raises(ValueError, match="exceeds l_max=1024"):
    default(jnp.zeros((1, 1025, 4)))


@pytest.mark.parametrize("opts,match", [
    (dict(l_max=0), "l_max"),
    (dict(kernel_dim=0), "kernel_dim"),
    (dict(decay=0.0), "decay"),
    (dict(channels=0), "channels"),
    (dict(postact="relu"), "postact"),
])
def test_bad_options(opts, match):
  with pytest.raises(ValueError, match=match):
    build_mixer("sgconv", 4, rngs=nnx.Rngs(0), **{"l_max": 16, **opts})
