"""The chunked recurrence for a diagonal SSM's convolution (ssm/ops/diag_conv.py) against
the FFT bank with the kernel materialised, in float64: outputs and gradients (u, log Ab,
w), causal and bidirectional, every chunk regime (1, a divisor of nothing, longer than the
sequence); float32 tolerances; bad input; S4D's diagonal form against its kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.registry import build_mixer
from ssm.ops.diag_conv import diag_conv_chunked
from ssm.ops.fft_conv import fft_conv_bank_xla
from ssm.s4d import vandermonde_kernel_reference


def _problem(seed, b=2, length=37, h=3, n=4, c=2, dtype=np.float64):
  rng = np.random.default_rng(seed)
  u = rng.standard_normal((b, length, h)).astype(dtype)
  log_ab = -rng.uniform(0.01, 0.4, (h, n)) + 1j * rng.uniform(-3, 3, (h, n))
  w = rng.standard_normal((2 * c, h, n)) + 1j * rng.standard_normal((2 * c, h, n))
  cdtype = np.complex128 if dtype == np.float64 else np.complex64
  return jnp.asarray(u), jnp.asarray(log_ab.astype(cdtype)), jnp.asarray(w.astype(cdtype)), c


def _reference(u, log_ab, w_causal, w_anti):
  """The kernels written out (the plain Vandermonde product) and convolved by FFT."""
  length = u.shape[1]
  kernel = lambda w: vandermonde_kernel_reference(w, jnp.ones_like(log_ab), log_ab, length)  # noqa: E731
  return fft_conv_bank_xla(u, kernel(w_causal), None if w_anti is None else kernel(w_anti),
                           method="irfft")


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_equals_the_fft_convolution_float64(chunk, bidirectional):
  u, log_ab, w, c = _problem(chunk)
  anti = w[c:] if bidirectional else None
  got = diag_conv_chunked(u, log_ab, w[:c], anti, chunk=chunk)
  want = _reference(u, log_ab, w[:c], anti)
  assert got.shape == want.shape == (u.shape[0], u.shape[1], c, u.shape[2])
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradients_equal_the_fft_convolution_float64(bidirectional):
  u, log_ab, w, c = _problem(7, length=21)
  probe = jnp.asarray(np.random.default_rng(8).standard_normal((u.shape[0], 21, c, u.shape[2])))

  def loss(fn):
    def f(u, re, im, w):
      y = fn(u, jax.lax.complex(re, im), w[:c], w[c:] if bidirectional else None)
      return jnp.sum(y * probe)
    return jax.grad(f, argnums=(0, 1, 2, 3))(u, log_ab.real, log_ab.imag, w)

  got = loss(lambda *a: diag_conv_chunked(*a, chunk=8))
  want = loss(_reference)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-9 * float(jnp.abs(r).max()))


def test_float32_matches_float64():
  u, log_ab, w, c = _problem(3, length=300, dtype=np.float32)
  got = diag_conv_chunked(u, log_ab, w[:c], w[c:])
  with jax.enable_x64(True):
    want = _reference(u.astype(jnp.float64), log_ab.astype(jnp.complex128),
                      w[:c].astype(jnp.complex128), w[c:].astype(jnp.complex128))
  assert got.dtype == jnp.float32
  err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
  assert err < 1e-5, err


def test_bad_input_fails_clearly():
  u, log_ab, w, c = _problem(1)
  with pytest.raises(ValueError, match=r"u \(b, l, h\) and log_ab \(h, n\) expected"):
    diag_conv_chunked(u[0], log_ab, w)
  with pytest.raises(ValueError, match="w_causal must be"):
    diag_conv_chunked(u, log_ab, w[:, :, :2])
  with pytest.raises(ValueError, match="chunk must be a positive int"):
    diag_conv_chunked(u, log_ab, w, chunk=0)


def test_s4d_diagonal_form_gives_its_kernel():
  with jax.enable_x64(False):
    layer = build_mixer("s4d", 6, d_state=8, channels=2, rngs=nnx.Rngs(1))
    log_ab, w = layer.kernel.diagonal()
    want = layer.kernel(40)
    got = vandermonde_kernel_reference(w, jnp.ones_like(log_ab), log_ab, 40)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))
