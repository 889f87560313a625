"""Mamba-2 / SSD: chunked == quadratic == selective scan, parallel == step, init, bad input."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from models.registry import build_mixer
from ssm.mamba2 import Mamba2, gated_rms_norm
from ssm.params import NoDecayParam
from _testing import kernel_path_error, perturbed, run_parallel, run_steps

# One mixer configuration for most tests (shared compilations): 4 heads of 4, 2 groups.
CONFIG = dict(d_state=4, headdim=4, ngroups=2, chunk_size=4)
X_SHAPE = (2, 11, 8)


def test_gated_rms_norm_per_group():
  rng = np.random.default_rng(3)
  y, z, w = rng.standard_normal((2, 8)), rng.standard_normal((2, 8)), rng.standard_normal(8)
  out = gated_rms_norm(jnp.asarray(y), jnp.asarray(z), jnp.asarray(w), groups=2)
  g = (y * z / (1 + np.exp(-z))).reshape(2, 2, 4)
  ref = (g / np.sqrt(np.mean(g ** 2, -1, keepdims=True) + 1e-5)).reshape(2, 8) * w
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_init_follows_the_reference():
  m = Mamba2(8, **CONFIG, rngs=nnx.Rngs(0))
  assert (m.d_inner, m.nheads, m.conv_dim) == (16, 4, 16 + 2 * 2 * 4)
  for p in (m.A_log, m.D, m.dt_bias):
    assert isinstance(p, NoDecayParam) and p[...].dtype == jnp.float32 and p[...].shape == (4,)
  a = np.exp(m.A_log[...])
  assert a.min() >= 1 and a.max() <= 16
  dt = np.asarray(jax.nn.softplus(m.dt_bias[...]))
  assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
  np.testing.assert_array_equal(m.D[...], np.ones(4))
  np.testing.assert_array_equal(m.norm_w[...], np.ones(16))
  assert m.in_proj.kernel[...].shape == (8, 16 + 32 + 4)



def test_parallel_equals_step():
  m = perturbed(build_mixer("mamba2", 8, rngs=nnx.Rngs(4), **CONFIG), 4)
  x = jax.random.normal(jax.random.key(5), X_SHAPE)   # 11 tokens: 3 chunks, the last padded
  np.testing.assert_allclose(run_steps(m, x, max_len=True), run_parallel(m, x),
                             rtol=1e-4, atol=1e-5)


def test_memory_caching_parallel_equals_step_and_first_segment_is_mamba2():
  plain = perturbed(Mamba2(8, **CONFIG, rngs=nnx.Rngs(6)), 6)
  mc = dict(segment_size=3, variant="sparse", top_k=1)
  m = Mamba2(8, **CONFIG, memory_caching=mc, rngs=nnx.Rngs(6))
  nnx.update(m, nnx.state(plain))
  x = jax.random.normal(jax.random.key(7), X_SHAPE)
  y = run_parallel(m, x)
  np.testing.assert_allclose(run_steps(m, x, max_len=True), y, rtol=1e-4, atol=1e-5)
  y_plain = run_parallel(plain, x)
  np.testing.assert_allclose(y[:, :3], y_plain[:, :3], rtol=1e-5, atol=1e-6)
  assert np.abs(y[:, 3:] - y_plain[:, 3:]).max() > 1e-4


def test_bad_input_fails_clearly():
  with pytest.raises(ValueError, match="headdim=5 must divide"):
    Mamba2(8, headdim=5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="ngroups=3 must divide the 4 heads"):
    Mamba2(8, headdim=4, ngroups=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown keys"):
    Mamba2(8, **CONFIG, memory_caching=dict(segment_size=2, topk=1), rngs=nnx.Rngs(0))
  m = Mamba2(8, **CONFIG, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="d_model=8"):
    m(jnp.zeros((2, 5, 6)))
  state = m.init_state(2)
  with pytest.raises(ValueError, match=r"state.ssm must have shape \(2, 4, 4, 4\)"):
    m.step(state._replace(ssm=jnp.zeros((2, 4, 4, 3))), jnp.zeros((2, 8)))
  with pytest.raises(ValueError, match=r"state.conv must have shape \(1, 32, 3\)"):
    m.step(state, jnp.zeros((1, 8)))


def test_segment_ids_restart_the_state_after_a_boundary_only():
  """Packed documents: tokens before the first boundary are unchanged, the document
  after it gives exactly its output run alone (the SSM state and the convolution's window
  restart), and one id everywhere is the unpacked run."""
  m = perturbed(build_mixer("mamba2", 8, rngs=nnx.Rngs(8), **CONFIG), 8)
  x = jax.random.normal(jax.random.key(9), X_SHAPE)
  y = run_parallel(m, x)
  one = jnp.full(X_SHAPE[:2], 3, jnp.int32)
  np.testing.assert_allclose(m(x, segment_ids=one), y, rtol=1e-5, atol=1e-6)
  ids = jnp.asarray([[0] * 6 + [1] * 5, [4] * 11], jnp.int32)
  y_packed = m(x, segment_ids=ids)
  np.testing.assert_allclose(y_packed[:, :6], y[:, :6], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(y_packed[1], y[1], rtol=1e-5, atol=1e-6)
  assert np.abs(y_packed[0, 6:] - y[0, 6:]).max() > 1e-3
  np.testing.assert_allclose(y_packed[0, 6:], run_parallel(m, x[:1, 6:])[0], rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match="not supported with memory_caching"):
    Mamba2(8, **CONFIG, memory_caching=dict(segment_size=3), rngs=nnx.Rngs(0))(
        x, segment_ids=ids)


@pytest.mark.slow  # the interpreted kernel, forward only (~30 s)
@pytest.mark.parametrize("mc", [dict(segment_size=16, variant="gated"),
                                dict(segment_size=16, variant="residual",
                                     state_init="restart")])
def test_memory_caching_on_the_kernel_path_equals_xla(mc):
  """Memory-cached Mamba-2 whose online read and segment states come from the SSD kernel
  (interpreted) gives the XLA path's output to bf16 accuracy (the kernel's operands)."""
  err = kernel_path_error(Mamba2, 32, (1, 40, 32), 10, d_state=64, headdim=64,
                          memory_caching=mc)
  assert err < 1e-2, err
