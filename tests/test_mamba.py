"""The Mamba-1 mixer: paper equations, init, parallel == step, memory caching, bad input."""

import functools
import math

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from models.registry import build_mixer
from ssm import memory_caching as mcache
from ssm.mamba import (Mamba, MambaState, causal_depthwise_conv, conv_step,
                       selective_segment_reads)
from ssm.ops import selective_scan
from ssm.params import NoDecayParam
from _testing import kernel_path_error, perturbed, run_parallel, run_steps



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


def _segment_problem(seed, b=2, l=11, d=3, n=4):
  ks = jax.random.split(jax.random.key(seed), 4)
  u = jax.random.normal(ks[0], (b, l, d), jnp.float64)
  dt = jax.nn.softplus(jax.random.normal(ks[1], (b, l, d), jnp.float64) - 1.0)
  A = -jnp.exp(jax.random.normal(ks[2], (d, n), jnp.float64))
  B, C = jax.random.normal(ks[3], (2, b, l, n), jnp.float64)
  return u, dt, A, B, C


@pytest.mark.parametrize("variant,state_init", [("gated", "checkpoint"), ("gated", "restart"),
                                                ("residual", "checkpoint")])
def test_segment_reads_equal_memory_cachings_own_online_read(variant, state_init):
  """The selective scan over the segments as one batch (selective_segment_reads) gives
  memory caching's read of the per-key-decay memory, which materialises every state: the
  same output and gradients in float64 (segments of 4 over 11 tokens: a ragged last one)."""
  with jax.enable_x64(True):
    args = _segment_problem(0)

    @functools.partial(jax.jit, static_argnums=5)
    def read(u, dt, A, B, C, fused):
      online = (selective_segment_reads(u, dt, A, B, C, segment_size=4, state_init=state_init,
                                        impl="xla", chunk_size=2) if fused else None)
      y = mcache.cached_memory_read(C[:, :, None], B[:, :, None], (dt * u)[..., None],
                                    dt[..., None] * A, segment_size=4, variant=variant,
                                    state_init=state_init, online=online)
      return y, jnp.sum(jnp.sin(y))

    (y, _), (y_ref, _) = read(*args, True), read(*args, False)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-12)
    g, g_ref = (jax.jit(jax.grad(lambda *a, f=f: read(*a, f)[1], argnums=(0, 1, 2, 3, 4)))(
        *args) for f in (True, False))
    for a, b in zip(g, g_ref):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


def test_segment_reads_states_are_the_scans():
  """Checkpoint: the segment states are the plain scan's state at each segment's end, and
  the output is the plain scan's (no D); restart: each segment's scan from zero."""
  with jax.enable_x64(True):
    u, dt, A, B, C = _segment_problem(1, l=12)
    y, states = selective_segment_reads(u, dt, A, B, C, segment_size=4, state_init="checkpoint",
                                        impl="xla")
    for end in (4, 8, 12):
      y_ref, h = selective_scan(u[:, :end], dt[:, :end], A, B[:, :end], C[:, :end],
                                return_state=True, impl="xla")
      np.testing.assert_allclose(states[:, end // 4 - 1, ..., 0], h, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(y[..., 0], y_ref, rtol=1e-12, atol=1e-13)
    y, states = selective_segment_reads(u, dt, A, B, C, segment_size=4, state_init="restart",
                                        impl="xla")
    y_ref, h = selective_scan(u[:, 4:8], dt[:, 4:8], A, B[:, 4:8], C[:, 4:8],
                              return_state=True, impl="xla")
    np.testing.assert_allclose(states[:, 1, ..., 0], h, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(y[:, 4:8, :, 0], y_ref, rtol=1e-12, atol=1e-13)


@pytest.mark.slow  # the interpreted kernel, forward only
def test_memory_caching_on_the_kernel_path_equals_xla():
  """Memory-cached Mamba whose segments run through the selective-scan kernel (interpreted)
  gives the XLA path's output."""
  err = kernel_path_error(Mamba, 64, (1, 40, 64), 10, d_state=16,
                          memory_caching=dict(segment_size=16, variant="gated"))
  assert err < 1e-4, err


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
