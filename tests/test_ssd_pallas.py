"""The SSD Pallas kernels (Mosaic GPU interpret mode on the CPU) against the token-by-token
reference: outputs, final state and gradients of x, dt, A, B, C, D and h0; groups, ragged
lengths, h0, packed documents, head and state sizes 64/128, float32 and bf16 inputs."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from ssm.ops import ssd, ssd_pallas
from ssm.ops.ssd import ssd_reference
from _testing import bf16_exact, rel

NAMES = ("x", "dt", "A", "B", "C", "D", "h0")


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


def inputs(seed, b, l, h, g, p, n, dtype):
  """Random SSD inputs; x, B, C are bf16-exact so that the comparison measures the
  kernel's own rounding (scores, decayed tiles, states), not the inputs'."""
  rng = np.random.default_rng(seed)
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  return dict(x=bf16_exact(rng.standard_normal((b, l, h, p)), dtype),
              dt=f32(np.log1p(np.exp(rng.standard_normal((b, l, h)) - 1))),
              A=f32(-np.exp(rng.standard_normal(h))),
              B=bf16_exact(rng.standard_normal((b, l, g, n)) / n ** 0.5, dtype),
              C=bf16_exact(rng.standard_normal((b, l, g, n)) / n ** 0.5, dtype),
              D=f32(rng.standard_normal(h)), h0=f32(rng.standard_normal((b, h, p, n)) / 4),
              wy=bf16_exact(rng.standard_normal((b, l, h, p))),
              ws=f32(rng.standard_normal((b, h, p, n))))


def loss_fn(impl, segment_ids, wy, ws):
  """A scalar of the output and the final state (bf16-exact output cotangents)."""
  def loss(x, dt, A, B, C, D, h0):
    if impl == "pallas":
      y, s = ssd(x, dt, A, B, C, D=D, h0=h0, segment_ids=segment_ids, return_state=True,
                 impl="pallas")
    else:
      f32 = lambda v: v.astype(jnp.float32)
      y, s = ssd_reference(f32(x), dt, A, f32(B), f32(C), D=D, h0=h0, segment_ids=segment_ids)
    return jnp.sum(wy * y.astype(jnp.float32)) + jnp.sum(ws * s)
  return loss


GRAD_TOL = dict(x=1e-2, dt=1e-2, A=2e-2, B=1e-2, C=1e-2, D=1e-2, h0=1e-2)


@pytest.mark.slow  # ~30-60 s each: the interpreter runs three kernels and their gradients
@pytest.mark.parametrize("b,l,h,g,p,n,dtype,packed", [
    (1, 100, 2, 1, 64, 64, jnp.float32, False),   # a group of 2 heads, a ragged second block
    (1, 70, 1, 1, 128, 128, jnp.bfloat16, True),  # two value tiles, N 128, packed documents
])
def test_matches_reference(b, l, h, g, p, n, dtype, packed):
  """Given random inputs, the kernel's output, final state and every gradient match the
  recurrence to bf16 accuracy, and padding never reaches the state."""
  a = inputs(l + h, b, l, h, g, p, n, dtype)
  seg = None
  if packed:  # documents of 1, 30 and 39 tokens: resets inside and at a block edge
    seg = jnp.asarray(np.repeat([5, 2, 9], [1, 30, 39])[None], jnp.int32)
  args = tuple(a[k] for k in NAMES)
  y, s = ssd(*args[:5], D=a["D"], h0=a["h0"], segment_ids=seg, return_state=True,
             impl="pallas")
  y_ref, s_ref = ssd_reference(*(v.astype(jnp.float32) for v in args[:5]), D=a["D"],
                               h0=a["h0"], segment_ids=seg)
  assert y.dtype == dtype and s.dtype == jnp.float32
  assert rel(y, y_ref) < 1e-2 and rel(s, s_ref) < 1e-2
  grads = jax.grad(loss_fn("pallas", seg, a["wy"], a["ws"]), range(7))(*args)
  grads_ref = jax.grad(loss_fn("ref", seg, a["wy"], a["ws"]), range(7))(*args)
  for name, u, v, arg in zip(NAMES, grads, grads_ref, args):
    assert u.dtype == arg.dtype, name
    assert rel(u, v) < GRAD_TOL[name], name


def test_kernel_shapes_are_checked():
  a = inputs(0, 1, 8, 2, 1, 64, 32, jnp.float32)
  with pytest.raises(ValueError, match="state size N=32 must be in"):
    ssd(a["x"], a["dt"], a["A"], a["B"], a["C"], impl="pallas")
  a = inputs(0, 1, 8, 2, 1, 64, 64, jnp.float16)
  with pytest.raises(ValueError, match="x must be float32 or bfloat16"):
    ssd(a["x"], a["dt"], a["A"], a["B"], a["C"], impl="pallas")


@pytest.mark.slow  # ~60 s: the interpreter runs the split's extra state chains too
def test_sequence_split_matches_reference():
  """Given each sequence split into 4 segments (each run as a sequence of its own, entered
  with the state the segments before it hand on), the output, final state and every
  gradient still match the recurrence, with documents that cross the segment edges."""
  b, l, h, g, p, n, dtype = 1, 250, 1, 1, 64, 64, jnp.bfloat16
  a = inputs(7, b, l, h, g, p, n, dtype)
  seg = jnp.asarray(np.repeat([3, 1, 4], [90, 70, 90])[None], jnp.int32)
  args = tuple(a[k] for k in NAMES)

  def split_loss(x, dt, A, B, C, D, h0):
    y, s = ssd_pallas.ssd_pallas(x, dt, A, B, C, D=D, h0=h0, segment_ids=seg, segments=4)
    return jnp.sum(a["wy"] * y.astype(jnp.float32)) + jnp.sum(a["ws"] * s)

  y, s = ssd_pallas.ssd_pallas(*args[:5], D=a["D"], h0=a["h0"], segment_ids=seg, segments=4)
  y_ref, s_ref = ssd_reference(*(v.astype(jnp.float32) for v in args[:5]), D=a["D"],
                               h0=a["h0"], segment_ids=seg)
  assert rel(y, y_ref) < 1e-2 and rel(s, s_ref) < 1e-2
  grads = jax.grad(split_loss, range(7))(*args)
  grads_ref = jax.grad(loss_fn("ref", seg, a["wy"], a["ws"]), range(7))(*args)
  for name, u, v in zip(NAMES, grads, grads_ref):
    assert rel(u, v) < GRAD_TOL[name], name


def test_segments_fill_one_wave_of_ctas():
  """auto_segments splits only grids short of one wave, down to 16 blocks a segment."""
  assert ssd_pallas.auto_segments(1, 64, 64, 32768, 132) == 4      # 64 CTAs -> 256
  assert ssd_pallas.auto_segments(2, 64, 64, 4096, 132) == 2       # 128 -> 256
  assert ssd_pallas.auto_segments(4, 64, 64, 2048, 132) == 1       # 256 CTAs: one wave
  assert ssd_pallas.auto_segments(1, 2, 64, 2048, 132) == 2        # 32 blocks: 16 a segment
  a = inputs(0, 1, 128, 2, 1, 64, 64, jnp.float32)
  with pytest.raises(ValueError, match="segments=3 must be a positive int dividing the 2"):
    ssd_pallas.ssd_pallas(a["x"], a["dt"], a["A"], a["B"], a["C"], segments=3)


def test_chain_ring_leaves_room_for_two_ctas_per_sm():
  """The chain kernel's SMEM ring fits its share of an SM (two CTAs interleave there)."""
  assert ssd_pallas.CHAIN_CTAS_PER_SM == 2
  assert ssd_pallas._chain_stages(128) == 3 and ssd_pallas._chain_stages(64) == 4
  per_stage, fixed = 2 * 64 * (64 + 128) + 2 * 64 * 4, 4 * 64 * 128 + 1024
  assert 2 * (3 * per_stage + fixed) <= ssd_pallas.SMEM_BUDGET
