"""fft_conv against a direct float64 convolution."""

import importlib

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from ssm.ops import fft_conv


def direct_conv(u, k):
  """y[b, t, h] = sum_{s <= t, s < lk} k[h, s] u[b, t - s, h], in float64."""
  u = np.asarray(u, np.float64)
  k = np.asarray(k, np.float64)
  b, l, h = u.shape
  y = np.zeros((b, l, h))
  for s in range(k.shape[1]):
    y[:, s:] += k[:, s][None, None] * u[:, : l - s]
  return y


@pytest.mark.parametrize("seq_len,k_len", [(1, 1), (17, 17), (64, 5), (100, 33), (257, 257)])
def test_matches_direct_convolution(seq_len, k_len):
  rng = np.random.default_rng(seq_len * 1000 + k_len)
  u = rng.standard_normal((2, seq_len, 3)).astype(np.float32)
  k = rng.standard_normal((3, k_len)).astype(np.float32)
  y = fft_conv(jnp.asarray(u), jnp.asarray(k), impl="xla")
  ref = direct_conv(u, k)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_gradients_match_direct_convolution():
  rng = np.random.default_rng(0)
  u = jnp.asarray(rng.standard_normal((2, 20, 3)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 7)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((2, 20, 3)), jnp.float32)

  def direct(u, k):
    y = sum(k[:, s][None, None] * jnp.pad(u, ((0, 0), (s, 0), (0, 0)))[:, :20] for s in range(7))
    return jnp.sum(w * y)

  g = jax.grad(lambda u, k: jnp.sum(w * fft_conv(u, k, impl="xla")), argnums=(0, 1))(u, k)
  g_ref = jax.grad(direct, argnums=(0, 1))(u, k)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_bfloat16_input_keeps_dtype():
  u = jnp.ones((1, 8, 2), jnp.bfloat16)
  k = jnp.ones((2, 3), jnp.float32)
  assert fft_conv(u, k).dtype == jnp.bfloat16


@pytest.mark.parametrize("u_shape,k_shape,match", [
    ((8, 3), (3, 4), "u must be"),
    ((1, 8, 3), (3, 4, 1), "k must be"),
    ((1, 8, 3), (2, 4), "channels"),
    ((1, 8, 3), (3, 9), "kernel length"),
])
def test_bad_shapes_fail_clearly(u_shape, k_shape, match):
  with pytest.raises(ValueError, match=match):
    fft_conv(jnp.zeros(u_shape), jnp.zeros(k_shape))


def test_unknown_impl_fails_clearly():
  # (impl="pallas" is tested in tests/test_fft_conv_pallas.py)
  with pytest.raises(ValueError, match="impl"):
    fft_conv(jnp.zeros((1, 8, 2)), jnp.zeros((2, 8)), impl="cuda")


def direct_anticausal(u, k):
  """y[b, t, h] = sum_{s < lk} k[h, s] u[b, t + s, h], in float64."""
  u = np.asarray(u, np.float64)
  k = np.asarray(k, np.float64)
  y = np.zeros(u.shape)
  for s in range(k.shape[1]):
    y[:, : u.shape[1] - s] += k[:, s][None, None] * u[:, s:]
  return y


@pytest.mark.parametrize("seq_len,k_len,two_sided", [(37, 37, True), (64, 9, True), (50, 50, False)])
def test_kernel_bank_matches_direct_convolutions(seq_len, k_len, two_sided):
  """One FFT pair for c kernels and both directions = the direct sums, values and grads."""
  from ssm.ops.fft_conv import fft_conv_bank_xla  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seq_len + k_len)
  c, h = 2, 3
  u = rng.standard_normal((2, seq_len, h))
  kc, ka = rng.standard_normal((2, c, h, k_len))
  ref = np.stack([direct_conv(u, kc[i]) + (direct_anticausal(u, ka[i]) if two_sided else 0)
                  for i in range(c)], axis=2)
  f = lambda u, kc, ka: fft_conv_bank_xla(u, kc, ka if two_sided else None)
  y = f(*(jnp.asarray(x, jnp.float32) for x in (u, kc, ka)))
  assert y.shape == (2, seq_len, c, h)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
  # gradients against the same sums written as shifted products (autodiff, float32)
  w = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)

  def direct(u, kc, ka):
    shift = lambda x, s: jnp.pad(x, ((0, 0), (s, 0), (0, 0)))[:, :seq_len]
    back = lambda x, s: jnp.pad(x, ((0, 0), (0, s), (0, 0)))[:, s:]
    ys = [sum(kc[i, :, s] * shift(u, s) + (ka[i, :, s] * back(u, s) if two_sided else 0)
              for s in range(k_len)) for i in range(c)]
    return jnp.sum(w * jnp.stack(ys, axis=2))

  args = tuple(jnp.asarray(x, jnp.float32) for x in (u, kc, ka))
  g = jax.grad(lambda *a: jnp.sum(w * f(*a)), argnums=(0, 1, 2))(*args)
  g_ref = jax.jit(jax.grad(direct, argnums=(0, 1, 2)))(*args)  # jit: one compile, not
  for a, b in zip(g[: 3 if two_sided else 2], g_ref):              # 100s of eager ops
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


# -- the bank's forward-FFT-only paths (methods "pairs", the default, and "fft") ---------

def _bank_direct(u, kc, ka):
  """The bank's sums in float64 numpy: (b, l, c, h)."""
  return np.stack([direct_conv(u, kc[i]) + (0 if ka is None else direct_anticausal(u, ka[i]))
                   for i in range(kc.shape[0])], axis=2)


@pytest.mark.parametrize("batch,seq_len,k_len,two_sided",
                         [(2, 1, 1, False), (1, 5, 3, True), (2, 33, 33, True), (3, 40, 7, False)])
def test_bank_forward_ffts_match_direct_sums_float64(batch, seq_len, k_len, two_sided):
  """Every method against the direct sums in float64 (so the packing's algebra, not float32
  noise, is what is checked), and their gradients equal the reference's; odd, tiny and
  short kernels, odd batches (the pairs method completes the last pair with zeros)."""
  from ssm.ops.fft_conv import BANK_METHODS, fft_conv_bank_xla  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(7 * seq_len + k_len)
  u = rng.standard_normal((batch, seq_len, 3))
  kc, ka = rng.standard_normal((2, 2, 3, k_len))
  ka = ka if two_sided else None
  ref = _bank_direct(u, kc, ka)
  w = rng.standard_normal(ref.shape)
  with jax.enable_x64(True):
    args = tuple(jnp.asarray(x) for x in (u, kc, ka if two_sided else kc))
    grads = {}
    for method in BANK_METHODS:
      f = lambda u, kc, ka, m=method: fft_conv_bank_xla(u, kc, ka if two_sided else None, method=m)
      y, vjp = jax.jit(lambda *a, f=f: jax.vjp(f, *a))(*args)  # one compile, not eager ops
      assert y.dtype == jnp.float64 and y.shape == ref.shape
      np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
      grads[method] = vjp(jnp.asarray(w))
    for method in BANK_METHODS:
      for a, b in zip(grads[method], grads["irfft"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12,
                                   atol=1e-12 * float(jnp.abs(b).max()) + 1e-300)


@pytest.mark.parametrize("method,batch", [("fft", 2), ("pairs", 3)])
def test_bank_custom_vjp_passes_numerical_gradient_check(method, batch):
  """The hand-written backwards (correlations by the same transforms) against finite
  differences in float64."""
  from jax.test_util import check_grads  # pylint: disable=import-outside-toplevel
  from ssm.ops.fft_conv import fft_conv_bank_xla  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    u, kc, ka = (jnp.asarray(rng.standard_normal(s))
                 for s in ((batch, 11, 2), (1, 2, 5), (1, 2, 5)))
    check_grads(lambda u, kc, ka: fft_conv_bank_xla(u, kc, ka, method=method), (u, kc, ka),
                order=1, modes=("rev",), eps=1e-6, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-6)])
def test_bank_low_precision_inputs_compute_in_float32(dtype, tol):
  """float32 and bf16 inputs: float32 output, both methods agree to float32 rounding (bf16
  inputs are upcast before the transforms, so the two paths see the same values)."""
  from ssm.ops.fft_conv import fft_conv_bank_xla  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(5)
  u = jnp.asarray(rng.standard_normal((2, 300, 4)), dtype)
  kc, ka = (jnp.asarray(rng.standard_normal((2, 4, 300)), dtype) for _ in range(2))
  b = fft_conv_bank_xla(u, kc, ka, method="irfft")
  scale = float(jnp.abs(b).max())
  for method in ("fft", "pairs"):
    a = fft_conv_bank_xla(u, kc, ka, method=method)
    assert a.dtype == jnp.float32
    assert float(jnp.abs(a - b).max()) <= tol * scale * np.log2(1024), method


@pytest.mark.parametrize("method,transform", [("fft", "RFFT"), ("pairs", "FFT")])
def test_bank_never_lowers_an_inverse_fft(method, transform):
  """The point of methods "fft" and "pairs": no IRFFT/IFFT (cuFFT c2r, its input copy and
  cuBLAS's 1/n scaling pass) in the forward or the backward."""
  from ssm.ops.fft_conv import fft_conv_bank_xla  # pylint: disable=import-outside-toplevel
  u, kc = jnp.ones((2, 16, 3)), jnp.ones((1, 3, 16))
  loss = lambda u, kc: jnp.sum(fft_conv_bank_xla(u, kc, kc, method=method) ** 2)
  hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(u, kc).as_text()
  assert f"fft_type={transform}" in hlo or transform in hlo
  assert "IRFFT" not in hlo and "IFFT" not in hlo
  hlo_ref = jax.jit(lambda u, kc: fft_conv_bank_xla(u, kc, method="irfft")).lower(u, kc).as_text()
  assert "IRFFT" in hlo_ref  # the check can see one


def test_bank_rejects_unknown_method():
  from ssm.ops.fft_conv import fft_conv_bank_xla  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="method must be"):
    fft_conv_bank_xla(jnp.ones((1, 8, 2)), jnp.ones((1, 2, 8)), method="dft")


@pytest.mark.parametrize("batch", [1, 3])
def test_bank_dk_batch_sum_both_forms(batch):
  fc = importlib.import_module("ssm.ops.fft_conv")  # the module (ssm.ops re-exports the function)
  rng = np.random.default_rng(batch)
  cplx = lambda *s: rng.standard_normal(s) + 1j * rng.standard_normal(s)
  g_f, u_f = cplx(batch, 2, 3, 5), cplx(batch, 3, 5)
  with jax.enable_x64(True):
    got = fc._batch_sum_conj_product(jnp.asarray(g_f), jnp.asarray(u_f))
    assert got.dtype == jnp.complex128
  want = np.einsum("bchf,bhf->chf", g_f, u_f.conj())
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
