"""The lightning attention Pallas kernels (Mosaic GPU interpret mode on the CPU) against
the XLA block form: outputs, final state and gradients of q, k, v, log_decay, h0; odd
lengths, no decay, head dims 64/128, bf16 and float32 inputs; dispatch and errors."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from ssm.ops import lightning_attention
from ssm.ops.lightning_attention import lightning_attention_xla
from _testing import rel

attn = jax.jit(lightning_attention, static_argnames=("return_state", "chunk_size", "impl"))


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


def inputs(seed, b, l, h, dk, dv, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q, k = (rng.standard_normal((b, l, h, dk)) / dk ** 0.5 for _ in range(2))
  v = rng.standard_normal((b, l, h, dv))
  h0 = rng.standard_normal((b, h, dk, dv)) / 4
  log_decay = -np.array([0.03, 0.4, 2.0][:h])
  # The kernel feeds bf16 to the matrix units: round the inputs so that the comparison
  # measures the kernel's own rounding (of scores and states), not the inputs'.
  rnd = lambda x: jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(dtype)
  return rnd(q), rnd(k), rnd(v), jnp.asarray(log_decay, jnp.float32), jnp.asarray(h0, jnp.float32)


def loss_fn(impl):
  """A scalar of the output and the final state with non-trivial cotangents."""
  def loss(q, k, v, log_decay, h0):
    if impl == "pallas":
      o, s = lightning_attention(q, k, v, log_decay, h0=h0, return_state=True, impl="pallas")
    else:
      o, s = lightning_attention_xla(q.astype(jnp.float32), k.astype(jnp.float32),
                                     v.astype(jnp.float32), log_decay, h0, chunk_size=32)
    o = o.astype(jnp.float32)
    return jnp.sum(o * jnp.sin(o)) + 0.3 * jnp.sum(s * jnp.cos(s))
  return loss


@pytest.mark.slow  # ~20 s each: the interpreter traces three kernels and their gradients
@pytest.mark.parametrize("l,h,dk,dv,decay,with_h0,dtype", [
    (100, 2, 64, 64, True, True, jnp.float32),    # two blocks, the last ragged; strong decay
    (37, 1, 128, 128, False, False, jnp.bfloat16),  # shorter than a block; two value tiles
])
def test_matches_xla(l, h, dk, dv, decay, with_h0, dtype):
  """Given random inputs, the kernel's output, final state and all gradients match the XLA
  path to bf16 accuracy (relative norm error < 1e-2), and padding never reaches the state."""
  q, k, v, log_decay, h0 = inputs(l, 1, l, h, dk, dv, dtype)
  log_decay = log_decay if decay else None
  h0 = h0 if with_h0 else None
  o, s = attn(q, k, v, log_decay, h0=h0, return_state=True, impl="pallas")
  o_ref, s_ref = lightning_attention_xla(*(x.astype(jnp.float32) for x in (q, k, v)),
                                         log_decay, h0)
  assert o.shape == (1, l, h, dv) and o.dtype == dtype
  assert s.shape == (1, h, dk, dv) and s.dtype == jnp.float32
  assert rel(o, o_ref) < 1e-2
  assert rel(s, s_ref) < 1e-2

  argnums = (0, 1, 2) + ((3,) if decay else ()) + ((4,) if with_h0 else ())
  args = (q, k, v, log_decay, h0)
  grads = jax.jit(jax.grad(loss_fn("pallas"), argnums=argnums))(*args)
  grads_ref = jax.jit(jax.grad(loss_fn("xla"), argnums=argnums))(*args)  # jit: not eager
  for i, g, g_ref in zip(argnums, grads, grads_ref):
    assert g.shape == args[i].shape and g.dtype == args[i].dtype, i
    assert rel(g, g_ref) < 2e-2, ("q k v log_decay h0".split()[i], rel(g, g_ref))


def test_dispatch_and_errors():
  """Off the GPU "auto" is the XLA path; "pallas" rejects what the kernel cannot take
  while "auto" falls back to XLA for it."""
  q, k, v, log_decay, h0 = inputs(0, 1, 20, 1, 32, 32)
  o_auto = lightning_attention(q, k, v, log_decay, h0=h0, impl="auto")
  o_xla = lightning_attention(q, k, v, log_decay, h0=h0, impl="xla")
  np.testing.assert_array_equal(np.asarray(o_auto), np.asarray(o_xla))
  with pytest.raises(ValueError, match="head dims"):
    lightning_attention(q, k, v, impl="pallas")
  q, k, v, _, _ = inputs(0, 1, 8, 1, 64, 64)
  with pytest.raises(ValueError, match="share a dtype"):
    lightning_attention(q.astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16),
                        impl="pallas")
  with pytest.raises(ValueError, match="share a dtype"):
    lightning_attention(q, k, v.astype(jnp.bfloat16), impl="pallas")


@pytest.mark.slow  # ~25 s: the interpreter runs the three kernels on four segments
def test_sequence_segments_match_xla():
  """Splitting the sequence into segments (states entering each from the XLA pre-pass,
  the kernel on the segments as a larger batch) gives the same output, final state and
  gradients as the XLA path, h0 and decay included."""
  from ssm.ops import lightning_pallas as lp  # pylint: disable=import-outside-toplevel
  q, k, v, log_decay, h0 = inputs(3, 1, 256, 2, 64, 64, jnp.bfloat16)

  def loss(q, k, v, log_decay, h0):
    o, s = lp.lightning_attention_pallas(q, k, v, log_decay, h0, interpret=True, segments=4)
    o = o.astype(jnp.float32)
    return jnp.sum(o * jnp.sin(o)) + 0.3 * jnp.sum(s * jnp.cos(s)), (o, s)

  args = (q, k, v, log_decay, h0)
  (_, (o, s)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4),
                                                  has_aux=True))(*args)
  o_ref, s_ref = lightning_attention_xla(*(x.astype(jnp.float32) for x in (q, k, v)),
                                         log_decay, h0)
  assert rel(o, o_ref) < 1e-2 and rel(s, s_ref) < 1e-2
  grads_ref = jax.jit(jax.grad(loss_fn("xla"), argnums=(0, 1, 2, 3, 4)))(*args)
  for name, g, g_ref in zip("q k v log_decay h0".split(), grads, grads_ref):
    assert rel(g, g_ref) < 3e-2, (name, rel(g, g_ref))


def test_segment_count_fills_the_gpu():
  from ssm.ops.lightning_pallas import num_segments  # pylint: disable=import-outside-toplevel
  sms = dict(num_sms=132)                        # an H100 SXM
  assert num_segments(8, 4096, 16, 64, **sms) == 1      # 128 CTAs already
  assert num_segments(4, 8192, 16, 64, **sms) == 1      # 64 CTAs: the pre-pass costs more
  assert num_segments(2, 16384, 16, 64, **sms) == 4     # 32 CTAs -> 128
  assert num_segments(1, 32768, 16, 64, **sms) == 8     # 16 CTAs -> 128
  assert num_segments(1, 1000, 16, 64, **sms) == 1      # not whole blocks: no split
  assert num_segments(1, 2048, 16, 64, **sms) == 2      # segments of at least 1024 tokens
  assert num_segments(1, 32768, 16, 64, num_sms=0) == 1  # no GPU to fill: no split


def test_segment_split_must_divide_the_length():
  from ssm.ops import lightning_pallas as lp  # pylint: disable=import-outside-toplevel
  q, k, v, _, _ = inputs(0, 1, 256, 1, 64, 64, jnp.bfloat16)
  with pytest.raises(ValueError, match="3 segments must divide the length 256"):
    lp.lightning_attention_pallas(q, k, v, segments=3, interpret=True)
