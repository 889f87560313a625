"""The Mamba-1 mixer: paper equations, init, parallel == step, memory caching, bad input."""

import math

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from models.registry import build_mixer
from ssm.mamba import Mamba, MambaState, causal_depthwise_conv, conv_step
from ssm.params import NoDecayParam
from _testing import perturbed, run_parallel, run_steps



def paper_mamba(model, x):
  """The block's equations, token by token in float64 NumPy (Gu & Dao 2023, Alg. 2)."""
  P = lambda v: np.asarray(v[...], np.float64)
  w_in, w_x, w_dt, b_dt = P(model.in_proj.kernel), P(model.x_proj.kernel), \
      P(model.dt_proj.kernel), P(model.dt_proj.bias)
  conv_w, conv_b, A_log, D, w_out = P(model.conv_w), P(model.conv_b), P(model.A_log), \
      P(model.D), P(model.out_proj.kernel)
  d_inner, n, r, k = model.d_inner, model.d_state, model.dt_rank, model.d_conv
  silu = lambda v: v / (1 + np.exp(-v))
  softplus = lambda v: np.log1p(np.exp(v))
  A = -np.exp(A_log)
  x = np.asarray(x, np.float64)
  bsz, seq_len, _ = x.shape
  out = np.zeros_like(x)
  for b in range(bsz):
    h = np.zeros((d_inner, n))
    past = [np.zeros(d_inner)] * (k - 1)          # conv inputs before t = 0 are zero
    for t in range(seq_len):
      xz = x[b, t] @ w_in
      xi, z = xz[:d_inner], xz[d_inner:]
      window = past[-(k - 1):] + [xi] if k > 1 else [xi]
      past.append(xi)
      xc = silu(sum(conv_w[j] * window[j] for j in range(k)) + conv_b)
      dbc = xc @ w_x
      dt = softplus(dbc[:r] @ w_dt + b_dt)        # (d_inner,)
      Bt, Ct = dbc[r:r + n], dbc[r + n:]
      for d in range(d_inner):                    # h_t = exp(dt A) h + dt B x, per channel
        h[d] = np.exp(dt[d] * A[d]) * h[d] + dt[d] * Bt * xc[d]
      y = h @ Ct + D * xc
      out[b, t] = (y * silu(z)) @ w_out
  return out


# One configuration for most tests, so they share their jit compilations.
CONFIG = dict(d_state=4, chunk_size=4)
X_SHAPE = (2, 11, 8)


def test_init_follows_the_reference():
  m = Mamba(8, **CONFIG, rngs=nnx.Rngs(0))
  assert m.d_inner == 16 and m.dt_rank == 1
  assert nnx.eval_shape(lambda: Mamba(40, rngs=nnx.Rngs(0))).dt_rank == math.ceil(40 / 16)
  assert isinstance(m.A_log, NoDecayParam) and isinstance(m.D, NoDecayParam)
  assert m.A_log[...].dtype == jnp.float32 and m.D[...].dtype == jnp.float32
  np.testing.assert_allclose(np.exp(m.A_log[...]), np.tile(np.arange(1, 5), (16, 1)), rtol=1e-6)
  np.testing.assert_array_equal(m.D[...], np.ones(16))
  dt = np.asarray(jax.nn.softplus(m.dt_proj.bias[...]))
  assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
  assert np.ptp(np.log(dt)) > 0.3 * np.log(100)   # spread over the log range
  assert np.abs(m.dt_proj.kernel[...]).max() <= 1.0  # U(+-dt_rank^-1/2)
  assert np.abs(m.conv_w[...]).max() <= 0.5 and m.conv_w[...].shape == (4, 16)


def test_matches_paper_equations():
  m = perturbed(Mamba(8, **CONFIG, rngs=nnx.Rngs(1)), 1)
  x = jax.random.normal(jax.random.key(2), X_SHAPE)
  y = run_parallel(m, x)
  ref = paper_mamba(m, x)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_parallel_equals_step():
  m = perturbed(build_mixer("mamba", 8, rngs=nnx.Rngs(3), **CONFIG), 3)
  x = jax.random.normal(jax.random.key(4), X_SHAPE)
  np.testing.assert_allclose(run_steps(m, x, max_len=True), run_parallel(m, x),
                             rtol=1e-4, atol=1e-5)


def test_depthwise_conv_step_matches_parallel():
  rng = np.random.default_rng(5)
  x = rng.standard_normal((2, 7, 3)).astype(np.float32)
  w = rng.standard_normal((3, 3)).astype(np.float32)     # width 3
  bias = rng.standard_normal(3).astype(np.float32)
  y = causal_depthwise_conv(jnp.asarray(x), jnp.asarray(w), jnp.asarray(bias))
  ref = np.stack([sum(w[k] * x[:, t - 2 + k] for k in range(3) if t - 2 + k >= 0) + bias
                  for t in range(7)], 1)
  np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
  win = jnp.zeros((2, 3, 2))
  for t in range(7):
    win, y_t = conv_step(win, x[:, t], w, bias)
    np.testing.assert_allclose(y_t, y[:, t], rtol=1e-6, atol=1e-6)


def test_gradients_reach_every_parameter():
  m = Mamba(8, **CONFIG, rngs=nnx.Rngs(6))
  x = jax.random.normal(jax.random.key(7), X_SHAPE)
  graphdef, params = nnx.split(m)
  g = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)))(params)
  for path, leaf in jax.tree_util.tree_leaves_with_path(g):
    assert np.all(np.isfinite(leaf)) and np.abs(leaf).max() > 0, path


def test_memory_caching_parallel_equals_step_and_first_segment_is_mamba():
  plain = perturbed(Mamba(8, **CONFIG, rngs=nnx.Rngs(8)), 8)
  m = Mamba(8, **CONFIG, memory_caching=dict(segment_size=4), rngs=nnx.Rngs(8))
  nnx.update(m, nnx.state(plain))   # same weights; the gate projection stays random
  x = jax.random.normal(jax.random.key(9), X_SHAPE)
  y = run_parallel(m, x)
  np.testing.assert_allclose(run_steps(m, x, max_len=True), y, rtol=1e-4, atol=1e-5)
  # Before the first cached segment only the online memory exists: plain Mamba.
  np.testing.assert_allclose(y[:, :4], run_parallel(plain, x)[:, :4], rtol=1e-5, atol=1e-6)
  assert np.abs(y[:, 4:] - run_parallel(plain, x)[:, 4:]).max() > 1e-4


def test_bad_input_fails_clearly():
  m = Mamba(8, d_state=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="d_model=8"):
    m(jnp.zeros((2, 5, 7)))
  with pytest.raises(ValueError, match="x_t must have 2 dims"):
    m.step(m.init_state(2), jnp.zeros((2, 1, 8)))
  state = m.init_state(2)
  with pytest.raises(ValueError, match=r"state.conv must have shape \(3, 16, 3\)"):
    m.step(state, jnp.zeros((3, 8)))
  with pytest.raises(ValueError, match=r"state.ssm must have shape \(2, 16, 4\)"):
    m.step(state._replace(ssm=jnp.zeros((2, 16, 5))), jnp.zeros((2, 8)))
  with pytest.raises(ValueError, match="state.conv"):
    m.step(state._replace(conv=jnp.zeros((2, 16, 4))), jnp.zeros((2, 8)))
  with pytest.raises(ValueError, match="MambaState"):
    m.step(tuple(state), jnp.zeros((2, 8)))
  cached = Mamba(8, d_state=4, memory_caching=dict(segment_size=4), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="MemoryCacheState"):
    cached.step(state, jnp.zeros((2, 8)))
  with pytest.raises(ValueError, match="unknown keys"):
    Mamba(8, memory_caching=dict(segment_size=4, segments=2), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="segment_size"):
    Mamba(8, memory_caching=dict(variant="gated"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown options"):
    build_mixer("mamba", 8, rngs=nnx.Rngs(0), d_sate=4)
  with pytest.raises(ValueError, match="d_conv"):
    Mamba(8, d_conv=0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="impl"):
    Mamba(8, impl="cuda", rngs=nnx.Rngs(0))
