"""Each equation of the table in ssm/memory_caching.py's docstring, on inputs small enough
to write the answer down (one head, hand-picked numbers), parallel and step forms."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from ssm.memory_caching import (
    MemoryCachingConfig, cached_memory_read, cached_memory_step, init_cache_state)


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


def arr(x):
  """(l, d) list -> (1, l, 1, d) float32."""
  return jnp.asarray(np.asarray(x, np.float32)[None, :, None, :])


def steps(q, k, v, cfg, log_a=None, gate_u=None):
  """The step form over a whole sequence, (1, l, 1, dv)."""
  state = init_cache_state(1, 1, q.shape[-1], v.shape[-1], max_segments=cfg.max_segments)
  ys = []
  for t in range(q.shape[1]):
    la = None if log_a is None else log_a[:, t]
    gu = None if gate_u is None else gate_u[:, t]
    state, y = cached_memory_step(state, q[:, t], k[:, t], v[:, t], la, gate_u_t=gu,
                                  **cfg.read_kwargs())
    ys.append(y)
  return jnp.stack(ys, axis=1)


def both(q, k, v, cfg, **kw):
  """Parallel and step forms agree; returns the parallel one as (l, dv) NumPy, (l,) when
  dv = 1."""
  y = cached_memory_read(q, k, v, kw.get("log_a"), gate_u=kw.get("gate_u"),
                         **cfg.read_kwargs())
  np.testing.assert_allclose(steps(q, k, v, cfg, **kw), y, rtol=1e-5, atol=1e-6)
  y = np.asarray(y[0, :, 0])
  return y[:, 0] if y.shape[1] == 1 else y


# Four tokens, two segments of two; dk = dv = 1 so every memory is a number.
Q = arr([[1.0], [2.0], [1.0], [3.0]])
K = arr([[1.0], [0.5], [2.0], [1.0]])
V = arr([[1.0], [2.0], [3.0], [4.0]])
KV = np.array([1.0, 1.0, 6.0, 4.0])  # k_t v_t


def test_segment_memories_checkpoint_and_restart():
  """Eq. (segment memory): M^(0) = k0 v0 + k1 v1 = 2 for both inits; the online memory of
  segment 1 is M^(0) + k2 v2 + ... (checkpoint) or k2 v2 + ... alone (restart). Residual
  aggregation (Eq. RM): y_t = M_t(q_t) + sum_{i < s(t)} M^(i)(q_t)."""
  m0 = KV[0] + KV[1]
  for init, carry in (("checkpoint", m0), ("restart", 0.0)):
    cfg = MemoryCachingConfig(segment_size=2, variant="residual", state_init=init)
    y = both(Q, K, V, cfg)
    online = np.array([KV[0], KV[0] + KV[1], carry + KV[2], carry + KV[2] + KV[3]])
    cached = np.array([0.0, 0.0, m0, m0])
    np.testing.assert_allclose(y, np.asarray(Q)[0, :, 0, 0] * (online + cached), rtol=1e-6)


def test_decay_runs_inside_the_segment_memory_only():
  """With a decay a, the cached memory is frozen at the segment end: token 3 reads
  a (a k2v2 + carry) ... : y_3 = q3 (a3 (a2 M^(0) + k2v2) + k3v3) + q3 M^(0) (checkpoint)."""
  a = 0.5
  log_a = jnp.full((1, 4, 1), np.log(a), jnp.float32)
  cfg = MemoryCachingConfig(segment_size=2, variant="residual")
  y = both(Q, K, V, cfg, log_a=log_a)
  m0 = a * KV[0] + KV[1]
  np.testing.assert_allclose(y[3], 3.0 * ((a * (a * m0 + KV[2]) + KV[3]) + m0), rtol=1e-6)


def grm_weights(u, summaries, online_summary):
  logits = np.array([u * s for s in summaries] + [u * online_summary])
  w = np.exp(logits - logits.max())
  return w / w.sum()


def test_gated_residual_memory_gates():
  """Eq. (GRM): y_t = g^on M_t(q_t) + sum_i g^i M^(i)(q_t), g = softmax over the cached
  segments and the online one of <u_t, MeanPooling(keys of the segment)>; the online
  segment's pool runs over its tokens up to t. Gate tokens u_t: q_t by default, or given."""
  cfg = MemoryCachingConfig(segment_size=2, variant="gated", state_init="restart")
  k = np.asarray(K)[0, :, 0, 0]
  for gate_u in (None, arr([[0.0], [0.0], [-1.5], [2.0]])):
    y = both(Q, K, V, cfg, gate_u=gate_u)
    u = np.asarray(Q if gate_u is None else gate_u)[0, :, 0, 0]
    m0 = KV[0] + KV[1]
    for t, on_keys, online in ((2, k[2:3], KV[2]), (3, k[2:4], KV[2] + KV[3])):
      w = grm_weights(u[t], [k[:2].mean()], on_keys.mean())
      q = np.asarray(Q)[0, t, 0, 0]
      np.testing.assert_allclose(y[t], w[1] * q * online + w[0] * q * m0, rtol=1e-5)
    # The first segment has no cached memory: its gate is 1 on the online memory.
    np.testing.assert_allclose(y[:2], np.asarray(Q)[0, :2, 0, 0] * np.cumsum(KV[:2]),
                               rtol=1e-6)


def test_memory_soup_mixes_the_memories_before_the_read():
  """Eq. (Soup): y_t = M*_t(q_t), M*_t = g^on M_t + sum_i g^i M^(i) (the memories'
  parameters mixed with the GRM gates). For a linear memory this equals GRM; the step
  form computes the mixture of states explicitly (matrices: dk = 2, dv = 3)."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 5, 1, d)), jnp.float32) for d in (2, 2, 3))
  cfg = MemoryCachingConfig(segment_size=2, variant="soup")
  y = both(q, k, v, cfg)
  qn, kn, vn = (np.asarray(x, np.float64)[0, :, 0] for x in (q, k, v))
  t = 4  # segment 2; cached memories after tokens 1 and 3 (checkpoint: prefix states)
  states = [sum(np.outer(kn[s], vn[s]) for s in range(e + 1)) for e in (1, 3, 4)]
  pools = [kn[0:2].mean(0), kn[2:4].mean(0), kn[4:5].mean(0)]
  logits = np.array([qn[t] @ p for p in pools])
  w = np.exp(logits - logits.max())
  w /= w.sum()
  mixed = sum(wi * s for wi, s in zip(w, states))
  np.testing.assert_allclose(y[t], qn[t] @ mixed, rtol=1e-5)
  gated = cached_memory_read(q, k, v, segment_size=2, variant="gated")
  np.testing.assert_allclose(y, np.asarray(gated)[0, :, 0], rtol=1e-6)


def test_sparse_selective_caching_router_top_k():
  """Eq. (SSC): the router scores r^i = <u_t, MeanPooling(segment i)> pick the top_k
  cached memories; the softmax runs over those and the online memory; the others get
  weight 0 (changing them leaves y unchanged)."""
  # Six tokens, segments of two; token 5 (segment 2) has two cached memories.
  q = arr([[1.0]] * 6)
  k = arr([[3.0], [3.0], [-2.0], [-2.0], [0.5], [0.5]])  # segment 0 scores highest
  v = arr([[1.0], [1.0], [5.0], [5.0], [2.0], [2.0]])
  cfg = MemoryCachingConfig(segment_size=2, variant="sparse", top_k=1, state_init="restart")
  y = both(q, k, v, cfg)
  w = grm_weights(1.0, [3.0], 0.5)  # segment 0 and the online segment
  m0, online = 3.0 * 2, 0.5 * 2 * 2
  np.testing.assert_allclose(y[5], w[0] * m0 + w[1] * online, rtol=1e-5)
  # Segment 1 (not selected) can change without effect on token 5.
  v2 = v.at[:, 2:4].set(-7.0)
  np.testing.assert_allclose(both(q, k, v2, cfg)[5], y[5], rtol=1e-6)
  # top_k = 2 selects both: the GRM output.
  cfg2 = MemoryCachingConfig(segment_size=2, variant="sparse", top_k=2, state_init="restart")
  gated = MemoryCachingConfig(segment_size=2, variant="gated", state_init="restart")
  np.testing.assert_allclose(both(q, k, v, cfg2), both(q, k, v, gated), rtol=1e-6)
