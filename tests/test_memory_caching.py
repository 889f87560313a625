"""Memory caching over linear memories: parallel form vs a token-by-token float64
reference, vs the step form, closed forms, gradients and argument checks."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from jax.test_util import check_grads

from ssm.memory_caching import (
    MemoryCachingConfig, cached_memory_read, cached_memory_step, init_cache_state,
    memory_caching_config)

STATIC = ("segment_size", "variant", "top_k", "state_init", "chunk_size", "pooling")
# One compilation per configuration (eager dispatch of the many small ops is slower).
read = jax.jit(cached_memory_read, static_argnames=STATIC)


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  """On a GPU float32 matmuls default to TF32; compare at full float32 precision."""
  with jax.default_matmul_precision("highest"):
    yield


def naive_memory_caching(q, k, v, log_a, segment_size, variant="gated", top_k=None,
                         gate_u=None, gate_keys=None, state_init="checkpoint", pooling="mean"):
  """The definition, one token at a time, in float64 NumPy (module docstring)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  gu = q if gate_u is None else np.asarray(gate_u, np.float64)
  gk = k if gate_keys is None else np.asarray(gate_keys, np.float64)
  b, l = v.shape[:2]
  h = max(x.shape[2] for x in (q, k, v, gu, gk))
  pool = np.mean if pooling == "mean" else np.sum
  bc = lambda x: np.broadcast_to(x, x.shape[:2] + (h,) + x.shape[3:])
  q, k, v, gu, gk = map(bc, (q, k, v, gu, gk))
  if log_a is None:
    a = np.ones(q.shape)
  else:
    log_a = np.asarray(log_a, np.float64)
    a = np.exp(bc(log_a if log_a.ndim == 4 else log_a[..., None]))
    a = np.broadcast_to(a, q.shape)
  y = np.zeros((b, l, h, v.shape[-1]))
  for bi in range(b):
    for hi in range(h):
      state = np.zeros((q.shape[-1], v.shape[-1]))
      cached, summaries, seg_keys = [], [], []
      for t in range(l):
        if t > 0 and t % segment_size == 0:
          cached.append(state.copy())
          summaries.append(pool(seg_keys, axis=0))
          seg_keys = []
          if state_init == "restart":
            state = np.zeros_like(state)
        state = a[bi, t, hi][:, None] * state + np.outer(k[bi, t, hi], v[bi, t, hi])
        seg_keys.append(gk[bi, t, hi])
        qt, ut = q[bi, t, hi], gu[bi, t, hi]
        reads = [qt @ m for m in cached]
        y_on = qt @ state
        if variant == "residual":
          y[bi, t, hi] = y_on + sum(reads, np.zeros_like(y_on))
          continue
        scores = [ut @ s for s in summaries]
        idx = list(range(len(cached)))
        if variant == "sparse":
          idx = sorted(idx, key=lambda i: -scores[i])[:top_k]
        logits = np.array([scores[i] for i in idx] + [ut @ pool(seg_keys, axis=0)])
        w = np.exp(logits - logits.max())
        w /= w.sum()
        y[bi, t, hi] = w[-1] * y_on + sum((wi * reads[i] for wi, i in zip(w[:-1], idx)),
                                          np.zeros_like(y_on))
  return y


def make_inputs(seed, b=2, l=11, h=3, dk=4, dv=5, decay="scalar", q_heads=None, v_heads=None,
                gate=False):
  """Random q, k, v, log_a (and gate tokens / keys). decay: None | "scalar" | "key"."""
  rng = np.random.default_rng(seed)
  hq = h if q_heads is None else q_heads
  hv = h if v_heads is None else v_heads
  q = rng.standard_normal((b, l, hq, dk)).astype(np.float32)
  k = rng.standard_normal((b, l, hq, dk)).astype(np.float32)
  v = rng.standard_normal((b, l, hv, dv)).astype(np.float32)
  log_a = {None: None,
           "scalar": -rng.uniform(0.0, 0.5, (b, l, h)),
           "key": -rng.uniform(0.0, 0.5, (b, l, h, dk))}[decay]
  log_a = None if log_a is None else log_a.astype(np.float32)
  extra = {}
  if gate:
    extra = dict(gate_u=rng.standard_normal((b, l, h, 3)).astype(np.float32),
                 gate_keys=rng.standard_normal((b, l, 1, 3)).astype(np.float32))
  return q, k, v, log_a, extra


def assert_close(a, b, rtol=2e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(1.0, np.abs(b).max()))


CASES = [  # (variant, top_k, state_init, decay, segment_size, chunk_size)
    ("residual", None, "checkpoint", "scalar", 3, 2),
    ("residual", None, "restart", "key", 4, 64),
    ("gated", None, "checkpoint", "scalar", 4, 3),
    ("gated", None, "restart", None, 3, 64),
    ("soup", None, "restart", "scalar", 2, 64),
    ("sparse", 2, "checkpoint", "key", 3, 2),
]


@pytest.mark.parametrize("variant,top_k,state_init,decay,seg,chunk", CASES)
def test_parallel_matches_token_by_token_definition(variant, top_k, state_init, decay, seg,
                                                    chunk):
  """Given random inputs (length not a multiple of the segment), the parallel form equals
  the definition evaluated token by token in float64."""
  q, k, v, log_a, _ = make_inputs(len(CASES) * seg + chunk, decay=decay)
  opts = dict(variant=variant, top_k=top_k, state_init=state_init)
  y = read(q, k, v, log_a, segment_size=seg, chunk_size=chunk, **opts)
  assert y.shape == (2, 11, 3, 5) and y.dtype == jnp.float32
  assert_close(y, naive_memory_caching(q, k, v, log_a, seg, **opts))


def test_mamba1_layout_and_separate_gates():
  """Mamba-1's mapping (q, k with one head broadcast over d_inner heads, dv = 1, per-key
  decay) with separate gate tokens and single-head gate keys."""
  q, k, v, log_a, gates = make_inputs(7, h=6, dk=4, dv=1, decay="key", q_heads=1, gate=True)
  for variant in ("gated", "sparse"):
    opts = dict(variant=variant, top_k=2 if variant == "sparse" else None)
    y = read(q, k, v, log_a, segment_size=3, **gates, **opts)
    assert y.shape == (2, 11, 6, 1)
    assert_close(y, naive_memory_caching(q, k, v, log_a, 3, **gates, **opts))


def run_steps(q, k, v, log_a, gates, cfg, **state_kw):
  b, l, _, dk = q.shape
  h, dv = v.shape[2], v.shape[3]
  gk = gates.get("gate_keys", k)
  state = init_cache_state(b, h, dk, dv, max_segments=cfg.max_segments,
                           gate_heads=gk.shape[2], gate_dim=gk.shape[3], **state_kw)

  def body(state, xs):
    q_t, k_t, v_t, la_t, gu_t, gk_t = xs
    return cached_memory_step(state, q_t, k_t, v_t, la_t, gate_u_t=gu_t, gate_keys_t=gk_t,
                              **cfg.read_kwargs())

  t_major = lambda x: None if x is None else jnp.swapaxes(jnp.asarray(x), 0, 1)
  xs = tuple(map(t_major, (q, k, v, log_a, gates.get("gate_u"), gates.get("gate_keys"))))
  _, ys = jax.jit(lambda state, xs: jax.lax.scan(body, state, xs))(state, xs)
  return jnp.swapaxes(ys, 0, 1)


@pytest.mark.parametrize("variant,state_init,decay", [
    ("residual", "restart", "scalar"), ("soup", "checkpoint", "key"),
    ("sparse", "restart", None)])
def test_step_matches_parallel(variant, state_init, decay):
  """Token-by-token steps (soup mixes the states before reading) equal the parallel form,
  also once the ring buffer of cached memories is full (11 tokens = 4 segments + 2)."""
  q, k, v, log_a, gates = make_inputs(3, decay=decay, gate=True)
  cfg = MemoryCachingConfig(segment_size=3, variant=variant, state_init=state_init,
                            top_k=2 if variant == "sparse" else None, max_segments=3)
  y = read(q, k, v, log_a, **gates, **cfg.read_kwargs())
  assert_close(run_steps(q, k, v, log_a, gates, cfg), y)


@pytest.mark.parametrize("variant,top_k", [("gated", None), ("sparse", 1)])
def test_sum_pooling_parallel_step_and_definition(variant, top_k):
  """pooling="sum" (segment summaries are sums of the gate keys, as the unofficial
  package pools): parallel = definition = step form."""
  q, k, v, log_a, gates = make_inputs(17, decay="scalar", gate=True)
  cfg = MemoryCachingConfig(segment_size=3, variant=variant, top_k=top_k, pooling="sum",
                            max_segments=3)
  y = read(q, k, v, log_a, **gates, **cfg.read_kwargs())
  assert_close(y, naive_memory_caching(q, k, v, log_a, 3, variant, top_k, pooling="sum",
                                       **gates))
  assert_close(run_steps(q, k, v, log_a, gates, cfg), y)
  mean = read(q, k, v, log_a, **gates, segment_size=3, variant=variant, top_k=top_k)
  assert not np.allclose(mean, y)


@pytest.mark.parametrize("variant,decay", [("sparse", "key")])  # gated: mixer tests
def test_one_segment_is_the_base_recurrence(variant, decay):
  """A segment covering the whole sequence leaves only the online memory: y_t = q_t . S_t."""
  q, k, v, log_a, _ = make_inputs(5, decay=decay)
  y = read(q, k, v, log_a, segment_size=11, variant=variant,
           top_k=1 if variant == "sparse" else None)
  base = naive_memory_caching(q, k, v, log_a, 10 ** 6, "residual")
  assert_close(y, base)


def test_segment_size_one_residual_closed_forms():
  """Segment size 1, residual, no decay.

  restart: every token's memory is k_s v_s^T alone and all are summed, so
      y_t = sum_{s <= t} (q_t . k_s) v_s                   (causal linear attention);
  checkpoint: memory i is the prefix state P_i = sum_{r <= i} k_r v_r^T and
      y_t = P_t q_t + sum_{i < t} P_i q_t = sum_{s <= t} (t - s + 1) (q_t . k_s) v_s.
  """
  q, k, v, _, _ = make_inputs(9, decay=None)
  scores = np.einsum("bthk,bshk->bhts", q.astype(np.float64), k)
  t = np.arange(11)
  causal = (t[:, None] >= t[None, :]).astype(np.float64)
  weight = {"restart": causal, "checkpoint": causal * (t[:, None] - t[None, :] + 1)}
  for state_init, w in weight.items():
    want = np.einsum("bhts,bshv->bthv", scores * w, v)
    y = read(q, k, v, None, segment_size=1, variant="residual",
                           state_init=state_init)
    assert_close(y, want)


def test_top_k_covering_all_segments_equals_gated():
  q, k, v, log_a, gates = make_inputs(11, decay="scalar", gate=True)
  gated = read(q, k, v, log_a, segment_size=3, **gates)
  n_segments = 4  # 11 tokens: at most 3 cached memories per token
  sparse = read(q, k, v, log_a, segment_size=3, variant="sparse", top_k=n_segments - 1,
                **gates)
  assert_close(sparse, gated, rtol=1e-6)


@pytest.mark.parametrize("variant,decay,state_init", [
    ("gated", "scalar", "checkpoint"), ("sparse", "key", "restart")])
def test_gradients_float64(variant, decay, state_init):
  """Finite differences in float64 (q, k, v, log_a and the gate inputs)."""
  q, k, v, log_a, gates = make_inputs(13, b=1, l=7, h=2, dk=3, dv=2, decay=decay, gate=True)
  with jax.enable_x64(True):
    args = [jnp.asarray(x, jnp.float64) for x in (q, k, v, log_a, gates["gate_u"],
                                                    gates["gate_keys"])]
    f = lambda q, k, v, la, gu, gk: read(
        q, k, v, la, segment_size=2, variant=variant, top_k=1 if variant == "sparse" else None,
        gate_u=gu, gate_keys=gk, state_init=state_init, chunk_size=2)
    check_grads(jax.jit(f), args, order=1, modes=["rev"], eps=1e-6, atol=1e-5, rtol=1e-5)


def test_bfloat16_inputs_keep_dtype():
  q, k, v, log_a, _ = make_inputs(1, decay="scalar")
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)
  y = read(bf(q), bf(k), bf(v), log_a, segment_size=4)
  assert y.dtype == jnp.bfloat16
  assert_close(y.astype(jnp.float32), naive_memory_caching(bf(q), bf(k), bf(v), log_a, 4),
               rtol=2e-2)


def test_config_validation():
  assert memory_caching_config(None) is None
  cfg = memory_caching_config(dict(segment_size=8, variant="sparse", top_k=2))
  assert cfg.read_kwargs() == dict(segment_size=8, variant="sparse", top_k=2,
                                   state_init="checkpoint", pooling="mean")
  bad = [
      (dict(segment_size=0), "segment_size"),
      (dict(segment_size=2.0), "segment_size"),
      (dict(variant="gated"), "needs segment_size"),
      (dict(segment_size=4, variant="mean"), "variant"),
      (dict(segment_size=4, variant="sparse"), "top_k"),
      (dict(segment_size=4, variant="sparse", top_k=0), "top_k"),
      (dict(segment_size=4, variant="sparse", top_k=65), "max_segments"),
      (dict(segment_size=4, variant="gated", top_k=2), "only used by"),
      (dict(segment_size=4, state_init="fresh"), "state_init"),
      (dict(segment_size=4, pooling="max"), "pooling"),
      (dict(segment_size=4, max_segments=0), "max_segments"),
      (dict(segment_size=4, segments=3), "unknown keys"),
  ]
  for opts, match in bad:
    with pytest.raises(ValueError, match=match):
      memory_caching_config(opts)
  with pytest.raises(ValueError, match="dict"):
    memory_caching_config(4)


def test_bad_shapes_fail_clearly():
  q, k, v, log_a, _ = make_inputs(0)
  read = lambda *a, **kw: cached_memory_read(*a, segment_size=2, **kw)
  with pytest.raises(ValueError, match="q must be"):
    read(q[0], k, v)
  with pytest.raises(ValueError, match="share .batch, length"):
    read(q[:, :5], k, v)
  with pytest.raises(ValueError, match="key dim"):
    read(q[..., :3], k, v)
  with pytest.raises(ValueError, match="head axis"):
    read(q[:, :, :2], k[:, :, :2], v)
  with pytest.raises(ValueError, match="log_a"):
    read(q, k, v, log_a[..., None])
  with pytest.raises(ValueError, match="gate"):
    read(q, k, v, gate_u=q[..., :2])
  with pytest.raises(ValueError, match="chunk_size"):
    read(q, k, v, chunk_size=0)
  state = init_cache_state(2, 3, 4, 5, max_segments=2)
  with pytest.raises(ValueError, match="v_t must have shape"):
    cached_memory_step(state, q[:, 0], k[:, 0], v[:, 0, :, :4], segment_size=2)
  with pytest.raises(ValueError, match="log_a_t"):
    cached_memory_step(state, q[:, 0], k[:, 0], v[:, 0], log_a[:, 0, :2], segment_size=2)
