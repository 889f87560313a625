"""Long causal convolution by FFT: the inner loop of S4, S4D, LSSL and SGConv.

    y[b, t, h] = (sum_{s <= t} k[h, s] * u[b, t - s, h] + D[h] u[b, t, h]) * gate[b, t, h]

(D and gate optional; circular: t - s mod L.) The XLA path zero-pads to an FFT size
n >= L + Lk - 1 (so the circular convolution has no wrap-around into the first L
outputs), multiplies spectra and keeps the first L outputs. Computed in float32
whatever the input dtype; the output has u's dtype. The Pallas path (impl="pallas") is
the Monarch-FFT kernel in ssm/ops/fft_conv_pallas.py; "auto" takes it on a Hopper GPU
only at the (device kind, dtype, FFT size) where it measured faster than jnp.fft
(ssm/ops/fft_conv_auto.json), else XLA.

`fft_conv_bank_xla` is the LTI layers' path: every channel and both directions of a layer
from one transform of u, with no inverse FFT and a custom VJP. Its default method,
"pairs", carries two sequences of the batch in one complex FFT (the comment above
`_pack`); "fft" keeps real FFTs and packs each inverse into a half-size forward FFT (the
comment above `_real_inverse_unscaled`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

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


def two_sided_kernel(k_causal, k_anticausal, n: int, dtype=jnp.float32):
  """(..., lk) causal and anti-causal kernels -> one length-n circular kernel in `dtype`:
  index s <- k_causal[s], index (n - s) mod n <- k_anticausal[s]. Circular convolution of
  a sequence zero-padded to n >= L + lk - 1 with it gives both sums without wrap-around."""
  lk = k_causal.shape[-1]
  pad = [(0, 0)] * (k_causal.ndim - 1) + [(0, n - lk)]
  kern = jnp.pad(k_causal.astype(dtype), pad)
  if k_anticausal is None:
    return kern
  ka = k_anticausal.astype(dtype)
  return kern + jnp.concatenate(
      [ka[..., :1], jnp.zeros(ka.shape[:-1] + (n - lk,), dtype), ka[..., :0:-1]], axis=-1)


# -- the bank's transforms: forward FFTs only --------------------------------------------
#
# XLA lowers irfft on GPU to cuFFT's c2r plus two more passes over the spectrum: a copy
# (c2r overwrites its input) and cuBLAS's scaling kernel for the 1/n; in the ListOps S4D
# step profile (results/lra_step_profile_h100.txt) those two took 14% of the step, as much
# as the c2r itself. The bank below never calls irfft: a real inverse of size n is one
# forward complex FFT of size n/2 of the packed half spectrum (even samples in the real
# part, odd ones in the imaginary part), unscaled, and the 1/n rides on the kernel's
# spectrum, which is (c, h, n/2+1) and computed once per call.

def _real_inverse_unscaled(y_f, n: int):
  """n * irfft(y_f, n) along the last axis with one forward FFT of size n/2.

  Args:
    y_f: (..., n // 2 + 1) complex half spectrum of a real length-n signal; n even.

  Returns:
    (..., n) real: y[t] = sum_{k < n} Y[k] exp(2 pi i k t / n), Y Hermitian-extended.

  With m = n/2, E[k] = Y[k] + conj(Y[m - k]) and O[k] = (Y[k] - conj(Y[m - k]))
  exp(2 pi i k / n) are 2x the length-m spectra of y's even and odd samples, so
  sum_k (E + i O)[k] exp(2 pi i k j / m) = n (y[2j] + i y[2j + 1]); that inverse sum is
  conj(fft(conj(E + i O))).
  """
  m = n // 2
  real = jnp.finfo(y_f.dtype).dtype
  lo, hi = y_f[..., :m], jnp.conj(y_f[..., m:0:-1])             # Y[k], conj(Y[m - k])
  twiddle = jnp.asarray(np.exp(2j * np.pi * np.arange(m) / n), y_f.dtype)
  z = jnp.fft.fft(jnp.conj((lo + hi) + 1j * (lo - hi) * twiddle), axis=-1)
  return jnp.stack([z.real, -z.imag], axis=-1).reshape(*y_f.shape[:-1], n).astype(real)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bank_conv(u_t, kern, seq_len: int):
  """u_t (b, h, l) zero-padded to n inside, kern (c, h, n) circular -> (b, c, h, seq_len)."""
  return _bank_conv_fwd(u_t, kern, seq_len)[0]


def _bank_conv_fwd(u_t, kern, seq_len):
  n = kern.shape[-1]
  u_f = jnp.fft.rfft(u_t, n=n, axis=-1)                            # (b, h, n/2+1)
  k_f = jnp.fft.rfft(kern, axis=-1) / n                            # (c, h, n/2+1), 1/n here
  y = _real_inverse_unscaled(u_f[:, None] * k_f[None], n)[..., :seq_len]
  return y, (u_f, k_f)


def _bank_conv_bwd(seq_len, res, g):
  """Correlations, by the same transforms: du = sum_c g (*) k, dk = sum_b g (*) u (the
  spectra conjugated); k_f already carries 1/n, dk's inverse takes it at the end."""
  u_f, k_f = res
  n = 2 * (k_f.shape[-1] - 1)
  g_f = jnp.fft.rfft(g, n=n, axis=-1)                              # (b, c, h, n/2+1)
  du = _real_inverse_unscaled(jnp.sum(g_f * jnp.conj(k_f)[None], axis=1), n)[..., :seq_len]
  dk = _real_inverse_unscaled(_batch_sum_conj_product(g_f, u_f), n) / n
  return du, dk


def _batch_sum_conj_product(g_f, u_f):
  """sum_b g_f[b, c] conj(u_f[b]): g_f (b, c, h, f), u_f (b, h, f) -> (c, h, f) complex.

  Two real sums. Three forms were timed on the H200 (results/lti_kernel_h200.txt;
  scripts/gpu/bank_dk_probe.py): on the bank's fwd+bwd at LRA Text (b = 16) a chain of
  b slice products took 1.140 ms, two real sums 1.199, one complex sum 1.297; in the Text
  S4D train step the real sums gave 13.83 ms and the chain 13.96 (the plain-kernel rows
  of the two calls 19.41 and 19.43), so the real sums, which also keep the program small.
  """
  gr, gi = jnp.real(g_f), jnp.imag(g_f)
  ur, ui = jnp.real(u_f)[:, None], jnp.imag(u_f)[:, None]
  return jax.lax.complex(jnp.sum(gr * ur + gi * ui, axis=0), jnp.sum(gi * ur - gr * ui, axis=0))


_bank_conv.defvjp(_bank_conv_fwd, _bank_conv_bwd)


# -- the bank by pairs: two real sequences per complex FFT -------------------------------
#
# The packing above reads each half spectrum twice, once reversed (Y[m - k]); on the H200
# those fusions ran at about a third of the bandwidth (results/lti_kernel_h200.txt). The
# pairs method needs no Hermitian symmetry at all: sequences b and b + B/2 ride as the real
# and imaginary parts of one complex sequence, whose full length-n spectrum is
# U = U_b + i U_{b+B/2}. Every kernel is real, so multiplying by its spectrum and
# inverting keeps the two convolutions apart (the real and imaginary parts of the result),
# and for dk, sum over pairs of G conj(U) = sum_b G_b conj(U_b) + i (a real signal's
# spectrum): its inverse's real part is the batch sum itself. Each inverse is a forward
# FFT of the conjugate (n ifft(Z) = conj(fft(conj(Z)))), the 1/n again on the kernel's
# spectrum; the FFTs are complex of size n over half the batch.

def _pack(x):
  """(B, ...) real, B even -> (B/2, ...) complex: x[p] + i x[p + B/2]."""
  half = x.shape[0] // 2
  return jax.lax.complex(x[:half], x[half:])


def _unpack_conj(v):
  """v = fft(conj(Z)) with n ifft(Z) = a + i b -> (B, ...) real: concat(a, b) = (v.re, -v.im)."""
  return jnp.concatenate([jnp.real(v), -jnp.imag(v)], axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pair_conv(u_t, kern, seq_len: int):
  """u_t (B, h, l), B even, kern (c, h, n) circular -> (B, c, h, seq_len)."""
  return _pair_conv_fwd(u_t, kern, seq_len)[0]


def _pair_conv_fwd(u_t, kern, seq_len):
  n = kern.shape[-1]
  u_f = jnp.fft.fft(_pack(u_t), n=n, axis=-1)                      # (B/2, h, n), zero-padded
  k_f = jnp.fft.fft(kern.astype(u_f.dtype), axis=-1) / n           # (c, h, n), 1/n here
  v = jnp.fft.fft(jnp.conj(u_f[:, None] * k_f[None]), axis=-1)[..., :seq_len]
  return _unpack_conj(v), (u_f, k_f)


def _pair_conv_bwd(seq_len, res, g):
  """du_b = sum_c g_b (*) k_c and dk_c = sum_b g_b (*) u_b (correlations), by pairs."""
  u_f, k_f = res
  n = k_f.shape[-1]
  g_f = jnp.fft.fft(_pack(g), n=n, axis=-1)                        # (B/2, c, h, n)
  du = _unpack_conj(jnp.fft.fft(jnp.sum(jnp.conj(g_f) * k_f[None], axis=1), axis=-1))
  # dk = Re ifft(S) = Re fft(conj(S)) / n, S = sum_p G_p conj(U_p)
  dk = jnp.real(jnp.fft.fft(jnp.conj(_batch_sum_conj_product(g_f, u_f)), axis=-1)) / n
  return du[..., :seq_len], dk


_pair_conv.defvjp(_pair_conv_fwd, _pair_conv_bwd)


def _bank_reference(u, kern, seq_len):
  """The bank by jnp.fft.rfft / irfft and autodiff (method="irfft"): (b, l, c, h)."""
  n = kern.shape[-1]
  u_f = jnp.fft.rfft(u, n=n, axis=1)                               # (b, nf, h)
  k_f = jnp.moveaxis(jnp.fft.rfft(kern, axis=-1), -1, 0)           # (nf, c, h)
  return jnp.fft.irfft(u_f[:, :, None, :] * k_f[None], n=n, axis=1)[:, :seq_len]


# The bank's default method: a module constant so that a benchmark or profile can time
# the methods of a whole model in one process (scripts/gpu/profile_train_step.py
# --bank_method); set it before the model's functions are traced. "pairs" measured
# fastest in both LRA S4D train steps (H200, f32, one call; results/lti_pairs_h200.txt):
# Text 14.10 -> 12.81 ms against "fft", ListOps 14.69 -> 14.40. On the bank op alone it
# wins at Text (fwd+bwd 1.189 -> 1.026 ms) but not at ListOps (0.749 -> 0.831), where
# the step still gained (presumably its packing and unpacking fuse with the layer's
# neighbours; not checked in the trace).
BANK_METHODS = ("pairs", "fft", "irfft")
BANK_METHOD = "pairs"


def fft_conv_bank_xla(u, k_causal, k_anticausal=None, *, method: str | None = None):
  """A bank of c kernels per channel, causal plus optional anti-causal, in one FFT pair.

      y[b, t, i, h] = sum_{s < lk} k_causal[i, h, s] u[b, t - s, h]
                    + sum_{s < lk} k_anticausal[i, h, s] u[b, t + s, h]

  u's spectrum is taken once for all c kernels and both directions: the anti-causal
  kernel sits at the end of the same length-n circular kernel (index n - s), and n >=
  L + lk - 1 keeps both halves from wrapping into the first L outputs. This halves the
  FFTs of a bidirectional S4 layer against convolving the reversed sequence separately.

  Args:
    u: (b, l, h); k_causal: (c, h, lk); k_anticausal: None or (c, h, lk); lk <= l.
    method: None takes BANK_METHOD ("pairs"). "pairs": two sequences of the batch per
      complex FFT of size n (`_pair_conv`), forward FFTs only, a custom VJP; "fft":
      real FFTs, each inverse a forward FFT of the packed half spectrum
      (`_real_inverse_unscaled`), a custom VJP; both put time on the transforms' last
      axis. "irfft": jnp.fft.rfft / irfft along axis 1 and autodiff (the reference).

  Returns:
    (b, l, c, h), float32 (float64 for float64 inputs).
  """
  check_float("fft_conv_bank_xla", u=u, k_causal=k_causal, k_anticausal=k_anticausal)
  if u.ndim != 3 or k_causal.ndim != 3 or k_causal.shape[1] != u.shape[2]:
    raise ValueError(f"fft_conv_bank_xla: u (b, l, h) and kernels (c, h, lk) expected, got "
                     f"{u.shape} and {k_causal.shape}")
  if k_anticausal is not None and k_anticausal.shape != k_causal.shape:
    raise ValueError(f"fft_conv_bank_xla: anti-causal kernels {k_anticausal.shape} must match "
                     f"the causal ones {k_causal.shape}")
  method = BANK_METHOD if method is None else method
  if method not in BANK_METHODS:
    raise ValueError(f"fft_conv_bank_xla: method must be one of {BANK_METHODS}, got {method!r}")
  seq_len, lk = u.shape[1], k_causal.shape[2]
  if not 1 <= lk <= seq_len:
    raise ValueError(f"fft_conv_bank_xla: kernel length {lk} must be in [1, {seq_len}]")
  n = max(2, _fft_size(seq_len + lk - 1))                          # even, for the packing
  kernels = (k_causal,) if k_anticausal is None else (k_causal, k_anticausal)
  dtype = jnp.promote_types(jnp.result_type(u, *kernels), jnp.float32)  # f32, or f64
  kern = two_sided_kernel(k_causal, k_anticausal, n, dtype)        # (c, h, n)
  if method == "irfft":
    return _bank_reference(u.astype(dtype), kern, seq_len)
  u_t = jnp.swapaxes(u.astype(dtype), 1, 2)                       # (b, h, l)
  if method == "fft":
    y = _bank_conv(u_t, kern, seq_len)                             # (b, c, h, l)
  else:
    b = u.shape[0]
    if b % 2:  # a zero sequence completes the last pair
      u_t = jnp.concatenate([u_t, jnp.zeros_like(u_t[:1])], axis=0)
    y = _pair_conv(u_t, kern, seq_len)[:b]
  return jnp.moveaxis(y, 3, 1)


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
