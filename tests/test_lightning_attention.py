"""lightning_attention (block form) against a float64 token-by-token recurrence and the
plain quadratic form: outputs, final state, gradients; argument checks."""

import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from ssm.ops import lightning_attention
from ssm.ops.lightning_attention import lightning_attention_reference, lightning_attention_xla

attn = jax.jit(lightning_attention, static_argnames=("return_state", "chunk_size", "impl"))
quadratic = jax.jit(lightning_attention_reference, static_argnames=("return_state",))


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  """On a GPU float32 matmuls default to TF32; compare at full float32 precision."""
  with jax.default_matmul_precision("highest"):
    yield


def sequential(q, k, v, log_decay=None, h0=None):
  """S_t = lambda S_{t-1} + k_t v_t^T, o_t = q_t . S_t, in float64 NumPy."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, l, h, dk = q.shape
  lam = np.ones(h) if log_decay is None else np.exp(np.asarray(log_decay, np.float64))
  state = np.zeros((b, h, dk, v.shape[-1])) if h0 is None else np.asarray(h0, np.float64)
  o = np.zeros(v.shape[:3] + (v.shape[-1],))
  for t in range(l):
    state = lam[None, :, None, None] * state + np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
    o[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], state)
  return o, state


def inputs(seed, b=2, l=37, h=3, dk=4, dv=5):
  rng = np.random.default_rng(seed)
  q, k = (rng.standard_normal((b, l, h, dk)).astype(np.float32) for _ in range(2))
  v = rng.standard_normal((b, l, h, dv)).astype(np.float32)
  h0 = rng.standard_normal((b, h, dk, dv)).astype(np.float32)
  log_decay = -np.array([0.05, 0.5, 2.0][:h], np.float32)
  return q, k, v, log_decay, h0


def close(a, b, rtol=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


@pytest.mark.parametrize("seq_len,chunk,decay,with_h0", [
    (37, 8, True, True),      # ragged last block, decay, initial state
    (64, 64, False, False),   # one full block, plain linear attention
    (5, 16, True, False),     # shorter than a block
    (33, 32, False, True),    # one token past a block
])
def test_matches_sequential_recurrence(seq_len, chunk, decay, with_h0):
  """Given random inputs, the block form's outputs and final state equal the float64
  recurrence (padding of the last block never reaches the state)."""
  q, k, v, log_decay, h0 = inputs(seq_len, l=seq_len)
  log_decay = log_decay if decay else None
  h0 = h0 if with_h0 else None
  o, state = attn(q, k, v, log_decay, h0=h0, return_state=True, chunk_size=chunk)
  o_ref, state_ref = sequential(q, k, v, log_decay, h0)
  assert o.shape == (2, seq_len, 3, 5) and o.dtype == jnp.float32
  assert state.shape == (2, 3, 4, 5) and state.dtype == jnp.float32
  close(o, o_ref)
  close(state, state_ref)
  o_quad, state_quad = quadratic(q, k, v, log_decay, h0=h0, return_state=True)
  close(o, o_quad)
  close(state, state_quad)
  if seq_len == 37:  # the cross-block recurrence as a lax.scan gives the same
    o_seq, state_seq = jax.jit(functools.partial(
        lightning_attention_xla, chunk_size=chunk, state_scan="sequential"))(
            q, k, v, log_decay, h0)
    close(o_seq, o_ref)
    close(state_seq, state_ref)


def test_gradients_match_quadratic_form_float64():
  """Gradients of q, k, v and h0 through outputs and final state, block form vs the
  quadratic reference, both in float64."""
  q, k, v, log_decay, h0 = inputs(1, l=21)
  rng = np.random.default_rng(2)
  w_o = rng.standard_normal((2, 21, 3, 5))
  w_s = rng.standard_normal((2, 3, 4, 5))
  with jax.enable_x64(True):
    args = [jnp.asarray(x, jnp.float64) for x in (q, k, v, h0)]
    ld = jnp.asarray(log_decay, jnp.float64)

    def loss(fn, q, k, v, h0):
      o, s = fn(q, k, v, ld, h0=h0, return_state=True)
      return jnp.sum(o * w_o) + jnp.sum(s * w_s)

    block = functools.partial(lightning_attention, chunk_size=8)
    g = jax.jit(jax.grad(functools.partial(loss, block), argnums=(0, 1, 2, 3)))(*args)
    g_ref = jax.jit(jax.grad(functools.partial(loss, lightning_attention_reference),
                             argnums=(0, 1, 2, 3)))(*args)
  for a, b in zip(g, g_ref):
    close(a, b, rtol=1e-10)


def test_bfloat16_keeps_dtype_and_accuracy():
  q, k, v, log_decay, _ = inputs(3)
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)
  o, state = attn(bf(q), bf(k), bf(v), log_decay, return_state=True, chunk_size=16)
  assert o.dtype == jnp.bfloat16 and state.dtype == jnp.float32
  o_ref, _ = sequential(bf(q).astype(np.float32), bf(k).astype(np.float32),
                        bf(v).astype(np.float32), log_decay)
  close(o.astype(jnp.float32), o_ref, rtol=2e-2)


def test_bad_input_fails_clearly():
  q, k, v, log_decay, h0 = inputs(0, l=8)
  cases = [
      (dict(q=q[0]), "q must be"),
      (dict(k=k[:, :4]), "k must have"),
      (dict(v=v[:, :, :2]), "v must be"),
      (dict(log_decay=log_decay[:2]), "log_decay must be"),
      (dict(log_decay=-log_decay), "<= 0"),
      (dict(h0=h0[:, :, :2]), "h0 must be"),
      (dict(chunk_size=0), "chunk_size"),
  ]
  for override, match in cases:
    kw = dict(q=q, k=k, v=v, log_decay=log_decay, h0=h0, chunk_size=4) | override
    with pytest.raises(ValueError, match=match):
      lightning_attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("log_decay"), **kw)
  with pytest.raises(ValueError, match="head dims"):  # the kernel takes dk, dv in {64, 128}
    lightning_attention(q, k, v, impl="pallas")
  with pytest.raises(ValueError, match="impl"):
    lightning_attention(q, k, v, impl="triton")


@pytest.mark.parametrize("decay", [True, False])
def test_packed_documents_equal_each_document_alone(decay):
  """With segment_ids, every document of a packed row gets what it gets alone (the first
  from h0), and the final state is the last document's, against the float64 recurrence."""
  q, k, v, log_decay, h0 = inputs(11, b=1, l=21)
  log_decay = log_decay if decay else None
  bounds = [0, 7, 8, 21]
  seg = jnp.asarray(np.repeat([4, 1, 4], np.diff(bounds))[None], jnp.int32)
  o, s = lightning_attention(q, k, v, log_decay, h0=h0, segment_ids=seg, return_state=True,
                             chunk_size=4)
  for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
    o_doc, s_doc = sequential(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], log_decay,
                              h0 if i == 0 else None)
    np.testing.assert_allclose(o[:, lo:hi], o_doc, rtol=1e-4, atol=1e-4, err_msg=str(i))
  np.testing.assert_allclose(s, s_doc, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="segment_ids must be"):
    lightning_attention(q, k, v, log_decay, segment_ids=seg[:, :5])
  with pytest.raises(TypeError, match="segment_ids must be an integer"):
    lightning_attention(q, k, v, log_decay, segment_ids=seg.astype(jnp.float32))
