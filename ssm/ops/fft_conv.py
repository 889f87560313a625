"""Long causal convolution by FFT: the inner loop of S4, S4D, LSSL and SGConv.

    y[b, t, h] = (sum_{s <= t} k[h, s] * u[b, t - s, h] + D[h] u[b, t, h]) * gate[b, t, h]

(D and gate optional; circular: t - s mod L.) The XLA path zero-pads to an FFT size
n >= L + Lk - 1 (so the circular convolution has no wrap-around into the first L
outputs), multiplies spectra and keeps the first L outputs. Computed in float32
whatever the input dtype; the output has u's dtype. The Pallas path (impl="pallas") is
the Monarch-FFT kernel in ssm/ops/fft_conv_pallas.py; "auto" takes it on a Hopper GPU
only at the (device kind, dtype, FFT size) where it measured faster than jnp.fft
(ssm/ops/fft_conv_auto.json), else XLA.
"""

import jax
import jax.numpy as jnp

from ssm._checks import check_float
from ssm.ops._impl import choose_impl, interpret_mode


def _fft_size(n: int) -> int:
  """Smallest power of two >= n (the sizes cuFFT and the Monarch kernels favour)."""
  return 1 << max(0, (n - 1).bit_length())


def check_fft_conv_args(u, k):
  check_float("fft_conv", u=u, k=k)  # ints would round, complex lose their imaginary part
  if u.ndim != 3:
    raise ValueError(f"fft_conv: u must be (batch, length, channels), got shape {u.shape}")
  if k.ndim != 2:
    raise ValueError(f"fft_conv: k must be (channels, kernel_length), got shape {k.shape}")
  _, seq_len, channels = u.shape
  if k.shape[0] != channels:
    raise ValueError(
        f"fft_conv: k has {k.shape[0]} channels but u has {channels} (u {u.shape}, k {k.shape})")
  if not 1 <= k.shape[1] <= seq_len:
    raise ValueError(
        f"fft_conv: kernel length {k.shape[1]} must be in [1, sequence length {seq_len}]")


def fft_conv_xla(u, k, *, circular: bool = False):
  """Reference path: jnp.fft.rfft / irfft. u (b, l, h), k (h, lk) -> (b, l, h)."""
  seq_len = u.shape[1]
  n = seq_len if circular else _fft_size(seq_len + k.shape[1] - 1)
  u_f = jnp.fft.rfft(u.astype(jnp.float32), n=n, axis=1)  # (b, n//2+1, h)
  k_f = jnp.fft.rfft(k.astype(jnp.float32), n=n, axis=1)  # (h, n//2+1)
  y = jnp.fft.irfft(u_f * k_f.T[None], n=n, axis=1)[:, :seq_len]
  return y.astype(u.dtype)


def two_sided_kernel(k_causal, k_anticausal, n: int):
  """(..., lk) causal and anti-causal kernels -> one length-n circular kernel (float32):
  index s <- k_causal[s], index (n - s) mod n <- k_anticausal[s]. Circular convolution of
  a sequence zero-padded to n >= L + lk - 1 with it gives both sums without wrap-around."""
  lk = k_causal.shape[-1]
  pad = [(0, 0)] * (k_causal.ndim - 1) + [(0, n - lk)]
  kern = jnp.pad(k_causal.astype(jnp.float32), pad)
  if k_anticausal is None:
    return kern
  ka = k_anticausal.astype(jnp.float32)
  return kern + jnp.concatenate(
      [ka[..., :1], jnp.zeros(ka.shape[:-1] + (n - lk,), jnp.float32), ka[..., :0:-1]], axis=-1)


def fft_conv_bank_xla(u, k_causal, k_anticausal=None):
  """A bank of c kernels per channel, causal plus optional anti-causal, in one FFT pair.

      y[b, t, i, h] = sum_{s < lk} k_causal[i, h, s] u[b, t - s, h]
                    + sum_{s < lk} k_anticausal[i, h, s] u[b, t + s, h]

  u's spectrum is taken once for all c kernels and both directions: the anti-causal
  kernel sits at the end of the same length-n circular kernel (index n - s), and n >=
  L + lk - 1 keeps both halves from wrapping into the first L outputs. This halves the
  FFTs of a bidirectional S4 layer against convolving the reversed sequence separately.

  Args:
    u: (b, l, h); k_causal: (c, h, lk); k_anticausal: None or (c, h, lk); lk <= l.

  Returns:
    (b, l, c, h) float32.
  """
  check_float("fft_conv_bank_xla", u=u, k_causal=k_causal, k_anticausal=k_anticausal)
  if u.ndim != 3 or k_causal.ndim != 3 or k_causal.shape[1] != u.shape[2]:
    raise ValueError(f"fft_conv_bank_xla: u (b, l, h) and kernels (c, h, lk) expected, got "
                     f"{u.shape} and {k_causal.shape}")
  if k_anticausal is not None and k_anticausal.shape != k_causal.shape:
    raise ValueError(f"fft_conv_bank_xla: anti-causal kernels {k_anticausal.shape} must match "
                     f"the causal ones {k_causal.shape}")
  seq_len, lk = u.shape[1], k_causal.shape[2]
  if not 1 <= lk <= seq_len:
    raise ValueError(f"fft_conv_bank_xla: kernel length {lk} must be in [1, {seq_len}]")
  n = _fft_size(seq_len + lk - 1)
  kern = two_sided_kernel(k_causal, k_anticausal, n)
  u_f = jnp.fft.rfft(u.astype(jnp.float32), n=n, axis=1)              # (b, nf, h)
  k_f = jnp.moveaxis(jnp.fft.rfft(kern, axis=-1), -1, 0)              # (nf, c, h)
  return jnp.fft.irfft(u_f[:, :, None, :] * k_f[None], n=n, axis=1)[:, :seq_len]


def fft_conv(u: jax.Array, k: jax.Array, *, D: jax.Array | None = None,
             gate: jax.Array | None = None, circular: bool = False,
             impl: str = "auto") -> jax.Array:
  """Causal (or circular) convolution of each channel of u with its kernel, plus an
  optional skip D u, times an optional gate.

  Args:
    u: (batch, length, channels) input, real floating point (float32 or bfloat16);
      integer, bool and complex inputs are refused (TypeError).
    k: (channels, kernel_length) real kernels, kernel_length <= length.
    D: optional (channels,) skip: y = conv(u, k) + D * u (the kernel folds it into
      k[:, 0]).
    gate: optional (batch, length, channels); returns (conv(u, k) + D u) * gate.
    circular: indices mod length (no zero padding): y[t] = sum_s k[s] u[(t - s) mod L].
      The Pallas kernel needs a power-of-two length >= 256 for it.
    impl: "auto" (the Pallas kernel on a Hopper GPU where ssm/ops/fft_conv_auto.json
      says it measured faster on this device kind, dtype and FFT size; else XLA), "xla"
      or "pallas" (ssm/ops/fft_conv_pallas.py; ValueError for shapes it cannot take).

  Returns:
    (batch, length, channels), dtype of u.
  """
  check_fft_conv_args(u, k)
  check_float("fft_conv", gate=gate, D=D)
  if gate is not None and gate.shape != u.shape:
    raise ValueError(f"fft_conv: gate must have u's shape {u.shape}, got {gate.shape}")
  if D is not None and D.shape != (u.shape[2],):
    raise ValueError(f"fft_conv: D must be (channels,) = ({u.shape[2]},), got {D.shape}")

  from ssm.ops import fft_conv_pallas  # deferred: the kernel module loads only when called
  path = choose_impl(impl, op="fft_conv",
                     check=lambda: fft_conv_pallas.check_supported(u.shape, k.shape, circular),
                     prefer=lambda: fft_conv_pallas.check_preferred(u.shape, circular, u.dtype))
  if path == "pallas":
    return fft_conv_pallas.fft_conv_pallas(
        u, k, D=D, gate=gate, circular=circular, interpret=interpret_mode())
  y = fft_conv_xla(u, k, circular=circular)
  if D is None and gate is None:
    return y
  y = y.astype(jnp.float32)
  if D is not None:
    y = y + D.astype(jnp.float32) * u.astype(jnp.float32)
  if gate is not None:
    y = y * gate.astype(jnp.float32)
  return y.astype(u.dtype)
