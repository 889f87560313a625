"""Bad inputs are refused at the boundary (ssm/_checks.py), not answered wrongly.

Given an integer, bool or (where unsupported) complex array, or a size argument that is a
bool, zero or negative, when an op or mixer receives it, then it raises naming the op and
the argument, instead of returning an int32 output, dropping an imaginary part, or
failing deep inside JAX.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from ssm import _checks
from ssm.ops import fft_conv, linear_scan, selective_scan

# Every registered mixer, with options that build it small; the causal ones have a
# recurrent mode.
KINDS = {"lssl": {}, "s4": dict(l_max=8), "s4d": {}, "sgconv": dict(l_max=8), "mamba": {},
         "mamba2": dict(headdim=4),
         "linear_attention": {}, "lightning": {}, "attention": dict(max_len=8)}


def _mixer(kind, d_model=8, **extra):
  return models.build_mixer(kind, d_model, rngs=nnx.Rngs(0), **KINDS[kind], **extra)


# -- ops ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64])
def test_fft_conv_refuses_non_real_float_inputs(dtype):
  u, k = jnp.ones((1, 8, 2), dtype), jnp.ones((2, 4), jnp.float32)
  with pytest.raises(TypeError, match=rf"fft_conv: u must be a real floating-point array, "
                                      rf"got dtype {jnp.dtype(dtype).name}"):
    fft_conv(u, k)
  with pytest.raises(TypeError, match="fft_conv: k must be"):
    fft_conv(jnp.ones((1, 8, 2)), k.astype(dtype))


def test_fft_conv_of_an_int_input_was_wrong_by_up_to_one():
  """Why: the float result cast back to int truncates (the case that prompted the check)."""
  u = np.random.default_rng(0).integers(-5, 5, (1, 16, 2))
  k = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
  exact = fft_conv(jnp.asarray(u, jnp.float32), jnp.asarray(k))
  assert np.abs(np.asarray(exact) - np.trunc(np.asarray(exact))).max() > 0.1  # not integral
  with pytest.raises(TypeError):
    fft_conv(jnp.asarray(u), jnp.asarray(k))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_scans_refuse_integer_and_bool_inputs(dtype):
  x = jnp.ones((1, 4, 2), dtype)
  with pytest.raises(TypeError, match="linear_scan: a must be a real or complex floating"):
    linear_scan(x, jnp.ones((1, 4, 2)))
  with pytest.raises(TypeError, match="selective_scan: u must be a real floating"):
    selective_scan(x, jnp.ones((1, 4, 2)), -jnp.ones((2, 3)), jnp.ones((1, 4, 3)),
                   jnp.ones((1, 4, 3)))


def test_linear_scan_keeps_complex_inputs():
  a = jnp.full((1, 3, 1), 0.5 + 0.5j, jnp.complex64)
  h = linear_scan(a, jnp.ones((1, 3, 1), jnp.complex64))
  assert h.dtype == jnp.complex64 and abs(complex(h[0, 1, 0]) - (1.5 + 0.5j)) < 1e-6


@pytest.mark.parametrize("chunk_size", [True, 0, -2, 1.5])
def test_chunk_sizes_must_be_positive_ints(chunk_size):
  x = jnp.ones((1, 4, 2))
  with pytest.raises(ValueError, match="linear_scan: chunk_size must be a positive int"):
    linear_scan(x, x, chunk_size=chunk_size)
  with pytest.raises(ValueError, match="selective_scan: chunk_size must be a positive int"):
    selective_scan(x, x, -jnp.ones((2, 3)), jnp.ones((1, 4, 3)), jnp.ones((1, 4, 3)),
                   chunk_size=chunk_size)


# -- mixers and blocks ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(KINDS))
def test_mixers_refuse_integer_inputs(kind):
  mixer = _mixer(kind)
  with pytest.raises(TypeError, match="x must be a real floating-point array, got dtype int32"):
    mixer(jnp.ones((1, 8, 8), jnp.int32))
  state = mixer.init_state(1)
  with pytest.raises(TypeError, match="x_t must be a real floating-point array, got dtype bool"):
    mixer.step(state, jnp.ones((1, 8), bool))


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("batch_size", [-1, 0, True, 2.0])
def test_init_state_refuses_bad_batch_sizes(kind, batch_size):
  with pytest.raises(ValueError, match="batch_size must be a positive int"):
    _mixer(kind).init_state(batch_size)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_d_model_true_is_refused(kind):
  with pytest.raises(ValueError, match="d_model must be a positive int, got True"):
    _mixer(kind, d_model=True)


@pytest.mark.parametrize("kind", ["mamba", "linear_attention", "lightning"])
def test_mixer_chunk_size_true_is_refused(kind):
  with pytest.raises(ValueError, match="chunk_size must be a positive int, got True"):
    _mixer(kind, chunk_size=True)


def test_backbone_refuses_bad_sizes_and_integer_inputs():
  from models.blocks import Backbone
  rngs = nnx.Rngs(0)
  backbone = Backbone([_mixer("s4d")], 8, rngs=rngs)
  for bad in (-1, True):
    with pytest.raises(ValueError, match="Backbone: batch_size must be a positive int"):
      backbone.init_state(bad)
  with pytest.raises(ValueError, match="ResidualBlock: max_len must be a positive int"):
    backbone.blocks[0].init_state(2, max_len=-3)
  with pytest.raises(TypeError, match="Backbone: x must be a real floating-point array"):
    backbone(jnp.ones((1, 8, 8), jnp.int32))
  with pytest.raises(ValueError, match="Backbone: d_model must be a positive int"):
    Backbone([_mixer("s4d")], True, rngs=rngs)


def test_the_helpers():
  assert _checks.positive_int("op", "n", np.int64(3)) == 3
  assert _checks.nonnegative_int("op", "n", 0) == 0
  assert _checks.optional_positive_int("op", "n", None) is None
  for bad in (True, np.bool_(True), 0, 1.0, "2"):
    with pytest.raises(ValueError, match=r"op: n must be a positive int"):
      _checks.positive_int("op", "n", bad)
  with pytest.raises(ValueError, match="non-negative"):
    _checks.nonnegative_int("op", "n", -1)
  _checks.check_float("op", x=jnp.ones(2, jnp.bfloat16), y=None, z=np.ones(2))
  _checks.check_float("op", complex_ok=True, c=jnp.ones(2, jnp.complex64))
  with pytest.raises(TypeError, match="op: c must be a real floating-point array, got dtype "
                                      "complex64 .*imaginary"):
    _checks.check_float("op", c=jnp.ones(2, jnp.complex64))
  _checks.check_integer("op", ids=jnp.arange(3), none=None)
  for dtype in (jnp.float32, jnp.bool_):
    with pytest.raises(TypeError, match="op: ids must be an integer array"):
      _checks.check_integer("op", ids=jnp.ones(3, dtype))
