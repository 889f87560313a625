"""The Monarch-FFT Pallas kernel (interpret mode on the CPU) against a direct float64
convolution: outputs and the gradients for u, k and gate, every size class."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from ssm.ops import fft_conv
from ssm.ops import fft_conv_pallas as fcp
from _testing import rel


def direct(u, k, gate=None, circular=False):
  """float64 y[b, t, h] = gate * sum_s k[h, s] u[b, t - s, h] (t - s mod L if circular)."""
  u, k = np.asarray(u, np.float64), np.asarray(k, np.float64)
  _, seq_len, _ = u.shape
  y = np.zeros_like(u)
  for s in range(k.shape[1]):
    shifted = np.roll(u, s, axis=1)
    if not circular:
      shifted[:, :s] = 0
    y += k[:, s][None, None] * shifted
  return y if gate is None else y * np.asarray(gate, np.float64)


def direct_grads(u, k, w, gate=None, circular=False):
  """Gradients of sum(w * y) in float64: (du, dk, dgate)."""
  u, k, w = (np.asarray(a, np.float64) for a in (u, k, w))
  conv = direct(u, k, circular=circular)
  dgate = None if gate is None else w * conv
  dy = w if gate is None else w * np.asarray(gate, np.float64)
  du = np.zeros_like(u)
  dk = np.zeros(k.shape)
  for s in range(k.shape[1]):
    # y[t] += k[s] u[t - s]  =>  du[t - s] += k[s] dy[t],  dk[s] += sum dy[t] u[t - s]
    back = np.roll(dy, -s, axis=1)
    shifted = np.roll(u, s, axis=1)
    if not circular:
      back[:, u.shape[1] - s:] = 0
      shifted[:, :s] = 0
    du += k[:, s][None, None] * back
    dk[:, s] = np.sum(dy * shifted, axis=(0, 1))
  return du, dk, dgate


def run(u, k, w, gate=None, circular=False):
  """Forward and all gradients of sum(w * y) through fft_conv(impl="pallas")."""
  args = (u, k) if gate is None else (u, k, gate)
  f = lambda *a: fft_conv(a[0], a[1], impl="pallas", circular=circular,
                          gate=a[2] if len(a) > 2 else None)
  y, vjp = jax.vjp(f, *args)
  return y, vjp(w.astype(y.dtype))


def inputs(seed, b, seq_len, h, k_len, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  u = jnp.asarray(rng.standard_normal((b, seq_len, h)), dtype)
  k = jnp.asarray(rng.standard_normal((h, k_len)) / np.sqrt(k_len), jnp.float32)
  w = jnp.asarray(rng.standard_normal((b, seq_len, h)), jnp.float32)
  return u, k, w


def test_plan_covers_every_size_class():
  # (p outer, q inner, rows, cols, sequences per tile)
  assert fcp.plan(256) == (1, 256, 16, 16, 4)
  assert fcp.plan(512) == (1, 512, 32, 16, 2)
  assert fcp.plan(2048) == (1, 2048, 64, 32, 1)
  assert fcp.plan(4096) == (1, 4096, 64, 64, 1)
  assert fcp.plan(131072) == (32, 4096, 64, 64, 1)
  assert fcp.fft_size(100, False) == 256 and fcp.fft_size(3000, False) == 8192
  with pytest.raises(ValueError, match="power of two"):
    fcp.plan(3000)


# Causal: stacked tiles (n = 256, odd batch, channels padded to the 4-per-tile stack),
# one sequence per tile (n = 2048), and order 3 (n = 8192: outer factor 2).
@pytest.mark.parametrize("b,seq_len,h,k_len", [(3, 100, 5, 33), (2, 1024, 1, 1000),
                                               (2, 4096, 1, 300)])
def test_causal_forward_and_gradients(b, seq_len, h, k_len):
  u, k, w = inputs(seq_len, b, seq_len, h, k_len)
  y, (du, dk) = run(u, k, w)
  assert y.shape == u.shape and y.dtype == u.dtype
  du_ref, dk_ref, _ = direct_grads(u, k, w)
  assert rel(y, direct(u, k)) < 3e-5
  assert rel(du, du_ref) < 3e-5
  assert rel(dk, dk_ref) < 3e-5


def test_gated_forward_and_gradients():
  u, k, w = inputs(7, 2, 200, 3, 50)
  gate = jnp.asarray(np.random.default_rng(8).standard_normal(u.shape), jnp.float32)
  y, (du, dk, dgate) = run(u, k, w, gate=gate)
  du_ref, dk_ref, dgate_ref = direct_grads(u, k, w, gate=gate)
  assert rel(y, direct(u, k, gate)) < 3e-5
  assert rel(du, du_ref) < 3e-5
  assert rel(dk, dk_ref) < 3e-5
  assert rel(dgate, dgate_ref) < 3e-5


def test_circular_forward_and_gradients():
  u, k, w = inputs(9, 2, 512, 2, 40)
  y, (du, dk) = run(u, k, w, circular=True)
  du_ref, dk_ref, _ = direct_grads(u, k, w, circular=True)
  assert rel(y, direct(u, k, circular=True)) < 3e-5
  assert rel(du, du_ref) < 3e-5
  assert rel(dk, dk_ref) < 3e-5


def test_bfloat16_input():
  u, k, w = inputs(11, 2, 100, 4, 100, dtype=jnp.bfloat16)
  y, (du, dk) = run(u, k, w)
  assert y.dtype == du.dtype == jnp.bfloat16
  du_ref, dk_ref, _ = direct_grads(u, k, w)
  # bf16 operands on the matrix units over 4 DFT stages (and a bf16 output)
  assert rel(y, direct(u, k)) < 3e-2
  assert rel(du, du_ref) < 3e-2
  assert rel(dk, dk_ref) < 3e-2


def test_unsupported_shapes():
  u = jnp.zeros((1, 300, 2))
  k = jnp.zeros((2, 4))
  with pytest.raises(ValueError, match="circular"):
    fft_conv(u, k, impl="pallas", circular=True)
  with pytest.raises(ValueError, match="power of two"):
    fft_conv(jnp.zeros((1, 70000, 1)), jnp.zeros((1, 4)), impl="pallas")
  with pytest.raises(ValueError, match="gate"):
    fft_conv(u, k, gate=jnp.zeros((1, 300, 3)))
  # "auto" off the GPU is the XLA path, circular included
  y = fft_conv(u + 1.0, k + 1.0, impl="auto", circular=True)
  np.testing.assert_allclose(y, direct(u + 1.0, k + 1.0, circular=True), rtol=1e-5)


def test_bidirectional_mixer_conv_is_one_circular_kernel_call():
  """lti_conv(impl="pallas") runs both directions of a bidirectional layer as one circular
  convolution with the two-sided kernel; it equals the XLA bank, values and gradients."""
  from ssm.lti_mixer import lti_conv  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((2, 100, 4)), jnp.float32)
  kern = jnp.asarray(rng.standard_normal((2, 4, 100)) / 10, jnp.float32)  # (2c, h, l), c = 1
  w = jnp.asarray(rng.standard_normal((2, 100, 1, 4)), jnp.float32)
  loss = lambda impl: lambda x, k: jnp.sum(w * lti_conv(x, k, bidirectional=True, impl=impl))
  y, y_ref = (lti_conv(x, kern, bidirectional=True, impl=i) for i in ("pallas", "xla"))
  assert y.shape == (2, 100, 1, 4)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4 * float(jnp.abs(y_ref).max()))
  g = jax.grad(loss("pallas"), argnums=(0, 1))(x, kern)
  g_ref = jax.grad(loss("xla"), argnums=(0, 1))(x, kern)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("n,m", [(16384, 8192), (16384, 16384), (131072, 65536)])
def test_outer_step_is_the_first_fft_factor(n, m):
  """The XLA side of order 3 (no kernel): _to_rows' outer DFT and twiddles followed by a
  q-point FFT of each row is the n-point FFT of the zero-padded input, and _from_rows
  inverts it (float64 NumPy reference)."""
  crel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)  # complex-aware
  p, q = fcp.plan(n)[:2]
  rng = np.random.default_rng(n + m)
  x = rng.standard_normal((2, 1, 2, m))                          # planes (re/im, P, H, m)
  xr, xi = fcp._to_rows(jnp.asarray(x[0], jnp.float32), jnp.asarray(x[1], jnp.float32), n, 2)
  rows = (np.asarray(xr, np.float64) + 1j * np.asarray(xi, np.float64)).reshape(1, 2, p, q)
  spec = np.fft.fft(rows, axis=-1)                               # [kp, kq] = X[kp + p kq]
  ref = np.fft.fft(x[0] + 1j * x[1], n=n, axis=-1)
  got = np.swapaxes(spec, -1, -2).reshape(1, 2, n)
  assert crel(got, ref) < 1e-5
  back = np.fft.ifft(spec, axis=-1).reshape(1, -1, 64, q // 64)
  length = m // 2 + 3
  yr, yi = fcp._from_rows(jnp.asarray(back.real, jnp.float32), jnp.asarray(back.imag, jnp.float32),
                          n, 2, length)
  assert yr.shape == (1, 2, length)
  assert crel(np.asarray(yr) + 1j * np.asarray(yi), (x[0] + 1j * x[1])[..., :length]) < 1e-5


@pytest.mark.parametrize("seq_len,circular,kernel", [
    (300, False, False),     # n 1024: the backward loses to cuFFT there
    (1000, False, True),     # n 2048
    (2048, False, True),     # n 4096
    (4096, True, True),      # circular n 4096
    (3000, False, False),    # n 8192: order 3, slower than cuFFT
    (300, True, False),      # circular needs a power of two: unsupported
])
def test_auto_takes_the_kernel_only_where_it_measured_faster(monkeypatch, seq_len, circular,
                                                             kernel):
  """On a Hopper GPU (simulated) fft_conv(impl="auto") calls the kernel at the FFT sizes of
  AUTO_FFT_SIZES and the XLA path elsewhere; off Hopper always XLA."""
  from ssm.ops import _impl
  calls = []
  monkeypatch.setattr(fcp, "fft_conv_pallas", lambda u, k, **kw: calls.append(kw) or u)
  u, k = jnp.ones((1, seq_len, 1)), jnp.ones((1, 8))
  fft_conv(u, k, impl="auto", circular=circular)
  assert calls == []                                        # the CPU is not Hopper
  monkeypatch.setattr(_impl, "on_gpu", lambda: True)
  monkeypatch.setattr(_impl, "on_hopper", lambda: True)
  fft_conv(u, k, impl="auto", circular=circular)
  assert len(calls) == int(kernel)
  if kernel:
    assert calls[0]["circular"] == circular


def test_lti_conv_auto_keeps_the_bank_on_hopper(monkeypatch):
  """The mixers' "auto" stays on the XLA bank on Hopper too (measured no faster end to end,
  ssm/lti_mixer.py), even at the ListOps layer's size where fft_conv's "auto" would take
  the kernel; impl="pallas" calls it."""
  from ssm import lti_mixer
  from ssm.ops import _impl
  calls = []
  monkeypatch.setattr(fcp, "fft_conv_pallas", lambda u, k, **kw: calls.append(kw) or u)
  monkeypatch.setattr(_impl, "on_gpu", lambda: True)
  monkeypatch.setattr(_impl, "on_hopper", lambda: True)
  x, kern = jnp.ones((1, 2000, 2)), jnp.ones((2, 2, 2000))
  y = lti_mixer.lti_conv(x, kern, bidirectional=True, impl="auto")
  assert calls == [] and y.shape == (1, 2000, 1, 2)
  lti_mixer.lti_conv(x, kern, bidirectional=True, impl="pallas")
  assert len(calls) == 1 and calls[0]["circular"]
