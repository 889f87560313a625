"""linear_scan against a float64 sequential loop: values, final states, gradients."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from jax import lax

from ssm.ops import linear_scan


def loop_scan(a, b, h0=None, reverse=False):
  """h[t] = a[t] h[t-1] + b[t], one step at a time in NumPy (float64 / complex128)."""
  a, b = np.asarray(a), np.asarray(b)
  dtype = np.complex128 if np.iscomplexobj(a) or np.iscomplexobj(b) else np.float64
  a, b = a.astype(dtype), b.astype(dtype)
  h = np.zeros((a.shape[0], a.shape[2]), dtype) if h0 is None else np.asarray(h0, dtype)
  out = np.zeros_like(b)
  steps = range(a.shape[1] - 1, -1, -1) if reverse else range(a.shape[1])
  for t in steps:
    h = a[:, t] * h + b[:, t]
    out[:, t] = h
  return out, h


def lax_scan_ref(a, b, h0, reverse=False):
  """The same recurrence with lax.scan (differentiable reference)."""
  def step(h, ab):
    h = ab[0] * h + ab[1]
    return h, h
  _, h = lax.scan(step, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)), reverse=reverse)
  return jnp.moveaxis(h, 0, 1)


def random_inputs(rng, shape, complex_=False):
  a = rng.uniform(0.5, 1.0, shape)  # |a| < 1 keeps long products tame
  b = rng.standard_normal(shape)
  h0 = rng.standard_normal((shape[0], shape[2]))
  if complex_:
    a = a * np.exp(1j * rng.uniform(-np.pi, np.pi, shape))
    b = b + 1j * rng.standard_normal(shape)
    h0 = h0 + 1j * rng.standard_normal(h0.shape)
  return a, b, h0


def pytest_generate_tests(metafunc):
  """Each suite class runs its own table of cases (`CASES`)."""
  if "case" in metafunc.fixturenames:
    cases = metafunc.cls.CASES
    metafunc.parametrize("case", cases, ids=[
        f"L{c[0]}-chunk{c[1]}" + "-rev" * c[2] + "-h0" * c[3] + "-complex" * c[4] for c in cases])


class TestXLA:
  """The op against a float64 sequential loop, written once and run for each
  implementation (the subclass flips IMPL): tolerances by dtype, features the kernel takes."""

  IMPL = "xla"
  FEATURES = 3
  # (seq_len, chunk_size, reverse, use_h0, complex)
  CASES = [
      (1, None, False, True, False),
      (37, None, False, False, False),
      (37, 8, False, True, False),     # length not a multiple of the chunk
      (37, 8, True, True, False),
      (32, 8, True, False, True),
      (41, 16, False, True, True),
      (16, 64, False, True, False),    # chunk longer than the sequence
  ]

  def test_matches_sequential_loop(self, case):
    seq_len, chunk_size, reverse, use_h0, complex_ = case
    rng = np.random.default_rng(seq_len)
    a, b, h0 = random_inputs(rng, (2, seq_len, self.FEATURES), complex_)
    dtype = jnp.complex64 if complex_ else jnp.float32
    h, last = linear_scan(jnp.asarray(a, dtype), jnp.asarray(b, dtype),
                          jnp.asarray(h0, dtype) if use_h0 else None, reverse=reverse,
                          chunk_size=chunk_size, return_state=True, impl=self.IMPL)
    ref, ref_last = loop_scan(a, b, h0 if use_h0 else None, reverse)
    assert h.dtype == dtype and last.dtype == dtype
    np.testing.assert_allclose(np.asarray(h), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(last), ref_last, rtol=1e-5, atol=1e-5)


class TestPallas(TestXLA):
  """The same suite on the Mosaic GPU kernel (interpreted on the CPU; chunk_size does not
  apply to it): 128 channels, one CTA, the cases that differ for it (one token, a ragged
  tile reversed, complex planes)."""

  IMPL = "pallas"
  FEATURES = 128
  CASES = [(1, None, False, True, False), (37, None, True, True, False),
           (41, None, False, True, True)]


def test_chunked_equals_unchunked():
  rng = np.random.default_rng(1)
  a, b, h0 = (jnp.asarray(x, jnp.float32) for x in random_inputs(rng, (3, 100, 4)))
  full = linear_scan(a, b, h0)
  for cs in (1, 7, 32):
    np.testing.assert_allclose(linear_scan(a, b, h0, chunk_size=cs), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reverse,chunk_size,complex_", [
    (False, None, False), (True, 5, False), (False, 5, True)])
def test_gradients_match_lax_scan_float64(reverse, chunk_size, complex_):
  rng = np.random.default_rng(2)
  with jax.enable_x64(True):
    a, b, h0 = (jnp.asarray(x) for x in random_inputs(rng, (2, 13, 3), complex_))
    w = jnp.asarray(rng.standard_normal((2, 13, 3)))
    w_last = jnp.asarray(rng.standard_normal((2, 3)))

    def loss(fn):
      # Real-valued loss of both outputs; for complex h the real part (JAX then returns
      # the conjugate gradient, identically for both paths).
      def f(a, b, h0):
        h, last = fn(a, b, h0)
        return jnp.sum(jnp.real(w * h)) + jnp.sum(jnp.real(w_last * last))
      return f

    def ours(a, b, h0):
      return linear_scan(a, b, h0, reverse=reverse, chunk_size=chunk_size, return_state=True)

    def ref(a, b, h0):
      h = lax_scan_ref(a, b, h0, reverse)
      return h, h[:, 0] if reverse else h[:, -1]

    g = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(a, b, h0)
    g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(a, b, h0)
    for x, y in zip(g, g_ref):
      assert x.dtype == y.dtype
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-10, atol=1e-12)


def test_long_sequence_chunked():
  """L = 65536 in chunks: right values at the end, where errors would accumulate."""
  rng = np.random.default_rng(3)
  a, b, h0 = random_inputs(rng, (1, 65536, 2))
  a = 1 - 1e-3 * a  # long memory
  h = linear_scan(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                  jnp.asarray(h0, jnp.float32), chunk_size=4096)
  ref, _ = loop_scan(a, b, h0)
  np.testing.assert_allclose(np.asarray(h[:, -100:]), ref[:, -100:], rtol=2e-4, atol=2e-4)


def test_real_a_complex_b_and_bfloat16():
  rng = np.random.default_rng(4)
  a, b, _ = random_inputs(rng, (1, 9, 2))
  bc = b + 1j * b[::-1]
  h = linear_scan(jnp.asarray(a, jnp.float32), jnp.asarray(bc, jnp.complex64))
  assert h.dtype == jnp.complex64
  np.testing.assert_allclose(np.asarray(h), loop_scan(a, bc)[0], rtol=1e-5, atol=1e-5)
  h, last = linear_scan(jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16),
                        return_state=True)
  assert h.dtype == jnp.bfloat16 and last.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(h, np.float32), loop_scan(a, b)[0], rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("a_shape,b_shape,h0_shape,kw,match", [
    ((8, 3), (8, 3), None, {}, "a must be"),
    ((1, 8, 3), (1, 8, 2), None, {}, "same shape"),
    ((2, 8, 3), (2, 8, 3), (2, 4), {}, "h0 must be"),
    ((1, 8, 3), (1, 8, 3), None, {"chunk_size": 0}, "chunk_size"),
    ((1, 0, 3), (1, 0, 3), None, {}, "empty"),
    ((1, 8, 3), (1, 8, 3), None, {"impl": "triton"}, "impl"),
])
def test_bad_input_fails_clearly(a_shape, b_shape, h0_shape, kw, match):
  h0 = None if h0_shape is None else jnp.zeros(h0_shape)
  with pytest.raises(ValueError, match=match):
    linear_scan(jnp.zeros(a_shape), jnp.zeros(b_shape), h0, **kw)


def test_pallas_rejects_what_the_kernel_cannot_take():
  with pytest.raises(ValueError, match="multiple of 128"):
    linear_scan(jnp.zeros((1, 8, 2)), jnp.zeros((1, 8, 2)), impl="pallas")
  # "auto" off a Hopper GPU is the XLA path, whatever the shape.
  assert linear_scan(jnp.ones((1, 8, 2)), jnp.ones((1, 8, 2)), impl="auto").shape == (1, 8, 2)
