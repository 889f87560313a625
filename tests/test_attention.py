"""The softmax attention mixer against a float64 NumPy reference; its modes and errors."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from models import build_mixer
from models.attention import Attention, apply_rotary, rotary_angles

B, L, D = 2, 7, 16


def rotate_reference(x, positions, base=10000.0):
  """Rotary embedding written out: each pair (x[i], x[i + d/2]) at position p is rotated
  by the angle p * base^(-2i/d) with an explicit 2x2 matrix. x (b, l, heads, d)."""
  x = np.array(x, np.float64)
  d = x.shape[-1]
  out = np.empty_like(x)
  for t, p in enumerate(positions):
    for i in range(d // 2):
      theta = p * base ** (-2.0 * i / d)
      rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
      pair = np.stack([x[:, t, :, i], x[:, t, :, i + d // 2]], axis=-1)  # (b, heads, 2)
      new = pair @ rot.T
      out[:, t, :, i], out[:, t, :, i + d // 2] = new[..., 0], new[..., 1]
  return out


def reference_attention(mod, x, mask=None):
  """softmax(q k^T / sqrt(d_head) + masks) v, then the output projection, in float64."""
  x = np.asarray(x, np.float64)
  b, l, h = x.shape
  nh, dh = mod.num_heads, mod.head_dim
  qkv = (x @ np.asarray(mod.qkv.kernel[...], np.float64)).reshape(b, l, 3, nh, dh)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  if mod.rotary:
    q, k = rotate_reference(q, range(l)), rotate_reference(k, range(l))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
  allowed = np.ones((b, 1, l, l), bool)
  if not mod.bidirectional:
    allowed &= np.tril(np.ones((l, l), bool))
  if mask is not None:
    allowed &= np.asarray(mask)[:, None, None, :]
  logits = np.where(allowed, logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  o = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, l, h)
  return o @ np.asarray(mod.out_proj.kernel[...], np.float64) + np.asarray(
      mod.out_proj.bias[...], np.float64)


def _x(seed, shape=(B, L, D)):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("bidirectional,rotary,num_heads,masked", [
    (False, True, 2, False),
    (False, False, 4, False),
    (True, True, 2, True),
    (True, False, 1, False),
])
def test_matches_naive_softmax_attention(bidirectional, rotary, num_heads, masked):
  mod = build_mixer("attention", D, rngs=nnx.Rngs(num_heads), num_heads=num_heads,
                    bidirectional=bidirectional, rotary=rotary)
  x = _x(num_heads)
  mask = None
  if masked:  # row 0 full, row 1 with its last 3 positions padded
    mask = jnp.asarray(np.arange(L)[None] < np.array([[L], [L - 3]]))
  y = mod(x, mask=mask, deterministic=True)
  ref = reference_attention(mod, x, mask)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-5)


def test_gradients_match_reference():
  mod = Attention(D, num_heads=2, rngs=nnx.Rngs(0))
  x, w = _x(1), _x(2)
  nh, dh = mod.num_heads, mod.head_dim

  def naive(kernel, x):  # jnp twin of reference_attention (causal, rotary)
    q, k, v = jnp.moveaxis((x @ kernel).reshape(B, L, 3, nh, dh), 2, 0)
    ang = rotary_angles(jnp.arange(L), dh)[:, None, :]
    q, k = apply_rotary(q, ang), apply_rotary(k, ang)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
    s = jnp.where(jnp.tril(jnp.ones((L, L), bool)), s, -jnp.inf)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(B, L, D)
    return jnp.sum(w * mod.out_proj(o))

  graphdef, params, rest = nnx.split(mod, nnx.Param, ...)

  def actual(params, x):
    return jnp.sum(w * nnx.merge(graphdef, params, rest)(x, deterministic=True))

  g_state, g_x = jax.jit(jax.grad(actual, argnums=(0, 1)))(params, x)
  g = (g_state["qkv"]["kernel"][...], g_x)
  g_ref = jax.jit(jax.grad(naive, argnums=(0, 1)))(mod.qkv.kernel[...], x)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_rotary_logits_depend_only_on_offset():
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.standard_normal(8), jnp.float32) for _ in range(2))

  def logit(m, n):
    return jnp.dot(apply_rotary(q, rotary_angles(jnp.asarray(m), 8)),
                   apply_rotary(k, rotary_angles(jnp.asarray(n), 8)))

  for m, n, shift in [(3, 1, 5), (0, 4, 11), (9, 9, 2)]:
    np.testing.assert_allclose(logit(m, n), logit(m + shift, n + shift), rtol=1e-4, atol=1e-5)
  assert not np.isclose(logit(3, 1), logit(1, 3))  # but it does depend on the offset


def test_causal_output_independent_of_future_tokens():
  mod = Attention(D, num_heads=2, rngs=nnx.Rngs(0))
  x = _x(3)
  t0 = 3
  x2 = x.at[:, t0 + 1:].set(_x(4)[:, t0 + 1:])
  y, y2 = mod(x), mod(x2)
  np.testing.assert_allclose(y[:, :t0 + 1], y2[:, :t0 + 1], rtol=1e-6, atol=1e-6)
  assert not np.allclose(y[:, t0 + 1:], y2[:, t0 + 1:])


@pytest.mark.parametrize("max_len", [L, 12])
def test_kv_cache_step_matches_parallel(max_len):
  mod = Attention(D, num_heads=2, rngs=nnx.Rngs(5))
  x = _x(5)
  state = mod.init_state(B, max_len=max_len)
  assert state["k"].shape == (B, max_len, 2, D // 2)
  ys = []
  for t in range(L):
    state, y_t = mod.step(state, x[:, t])
    ys.append(y_t)
  np.testing.assert_allclose(np.stack(ys, 1), mod(x), rtol=1e-4, atol=1e-5)
  assert int(state["pos"]) == L


def test_step_past_the_cache_is_nan_not_wrong():
  mod = Attention(D, num_heads=2, rngs=nnx.Rngs(0))
  state = mod.init_state(B, max_len=2)
  x = _x(6)
  for t in range(2):
    state, y = mod.step(state, x[:, t])
    assert np.isfinite(y).all()
  _, y = mod.step(state, x[:, 2])
  assert np.isnan(y).all()


def test_dropout_only_when_not_deterministic():
  mod = Attention(D, num_heads=2, dropout=0.5, rngs=nnx.Rngs(0))
  ref = Attention(D, num_heads=2, rngs=nnx.Rngs(0))
  x = _x(7)
  np.testing.assert_allclose(mod(x, deterministic=True), ref(x), rtol=1e-6)
  assert not np.allclose(mod(x, deterministic=False), ref(x))


def test_default_heads_are_64_wide():
  for d_model, heads in [(128, 2), (16, 1)]:
    assert nnx.eval_shape(lambda: Attention(d_model, rngs=nnx.Rngs(0))).num_heads == heads


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_heads=3), "num_heads"),
    (dict(num_heads=16), "rotary needs an even head_dim"),
    (dict(dropout=1.0), "dropout"),
    (dict(max_len=0), "max_len"),
])
def test_bad_options_fail_clearly(kwargs, match):
  with pytest.raises(ValueError, match=match):
    Attention(D, rngs=nnx.Rngs(0), **kwargs)


def test_unknown_option_lists_valid_ones():
  with pytest.raises(ValueError, match="valid options.*num_heads"):
    build_mixer("attention", D, rngs=nnx.Rngs(0), heads=2)


def test_bad_inputs_and_states_fail_clearly():
  mod = Attention(D, num_heads=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="3 dims ending in d_model=16"):
    mod(jnp.zeros((B, L)))
  with pytest.raises(ValueError, match="d_model=16"):
    mod(jnp.zeros((B, L, D + 1)))
  with pytest.raises(ValueError, match="mask shape"):
    mod(jnp.zeros((B, L, D)), mask=jnp.ones((B, L + 1), bool))
  state = mod.init_state(B + 1, max_len=4)
  with pytest.raises(ValueError, match="state must come from init_state"):
    mod.step(state, jnp.zeros((B, D)))
  with pytest.raises(ValueError, match="x_t must have 2 dims"):
    mod.step(mod.init_state(B), jnp.zeros((B, 1, D)))
  bi = Attention(D, num_heads=2, bidirectional=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="not causal"):
    bi.init_state(B)


def test_masked_cudnn_path_keeps_no_score_sized_residuals(monkeypatch):
  """Differentiating the masked cuDNN path's cond (cuDNN for prefix masks, XLA else) makes
  each branch return the other's residuals: the XLA branch must be rematerialised, or
  the cuDNN branch writes zeros for its (b, heads, l, l) probabilities every layer. Traced
  only (no cuDNN here): the cuDNN call is replaced by a remat'd XLA attention."""
  import models.attention as attention_mod
  original = jax.nn.dot_product_attention

  def stand_in(q, k, v, *args, implementation=None, key_value_seq_lengths=None, **kw):
    if implementation == "cudnn":
      return jax.checkpoint(lambda q, k, v: original(
          q, k, v, is_causal=kw.get("is_causal", False), implementation="xla"))(q, k, v)
    return original(q, k, v, *args, implementation=implementation, **kw)

  monkeypatch.setattr(attention_mod.jax.nn, "dot_product_attention", stand_in)
  b, l, d = 2, 128, 64
  model = Attention(d, num_heads=2, impl="cudnn", rngs=nnx.Rngs(0))
  graph, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, x, mask):
    return jnp.sum(nnx.merge(graph, params, rest)(x, mask=mask))

  jaxpr = jax.make_jaxpr(jax.grad(loss))(
      params, jax.ShapeDtypeStruct((b, l, d), jnp.float32), jax.ShapeDtypeStruct((b, l), bool))
  conds = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
  assert conds, "the masked cuDNN path should branch on the mask being a prefix"
  for eqn in conds:
    shapes = [tuple(v.aval.shape) for v in eqn.outvars]
    assert not [s for s in shapes if s[-2:] == (l, l)], shapes


def test_masked_cudnn_path_equals_xla_for_every_mask(monkeypatch):
  """The masked cuDNN path (the cond on the mask being a prefix, around the projection)
  gives XLA attention's output and gradients for prefix and non-prefix masks.
  Traced on the CPU with cuDNN's call replaced by XLA attention over the first
  key_value_seq_lengths keys, which is what cuDNN computes."""
  import models.attention as attention_mod
  original = jax.nn.dot_product_attention

  def stand_in(q, k, v, *args, implementation=None, key_value_seq_lengths=None, **kw):
    if implementation == "cudnn":
      keep = None
      if key_value_seq_lengths is not None:
        keep = (jnp.arange(k.shape[1]) < key_value_seq_lengths[:, None])[:, None, None, :]
      return original(q, k, v, mask=keep, implementation="xla", **kw)
    return original(q, k, v, *args, implementation=implementation, **kw)

  monkeypatch.setattr(attention_mod.jax.nn, "dot_product_attention", stand_in)
  b, l, d = 2, 16, 32
  x = jax.random.normal(jax.random.key(1), (b, l, d), jnp.float32)
  prefix = jnp.arange(l)[None, :] < jnp.array([[11], [16]])
  holes = jax.random.bernoulli(jax.random.key(2), 0.7, (b, l)).at[:, 0].set(True)
  for bidirectional in (False, True):
    fast = Attention(d, num_heads=2, impl="cudnn", bidirectional=bidirectional,
                     rngs=nnx.Rngs(0))
    ref = Attention(d, num_heads=2, impl="xla", bidirectional=bidirectional, rngs=nnx.Rngs(0))
    for mask in (prefix, holes):
      def run(model):
        graph, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params, x):
          y = nnx.merge(graph, params, rest)(x, mask=mask)
          return jnp.sum(jnp.where(mask[..., None], y, 0.0) * jnp.cos(jnp.arange(d)))
        value, grads = jax.value_and_grad(loss, argnums=(0, 1))(params, x)
        return [value, *jax.tree.leaves(grads)]
      got, want = run(fast), run(ref)
      assert len(got) == len(want) == 5  # value, qkv, out kernel and bias, dx
      for a, r in zip(got, want):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-6)
