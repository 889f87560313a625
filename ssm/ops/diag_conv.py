"""Convolution with a diagonal SSM's kernel as a chunked linear recurrence (no FFT).

The kernel of a diagonal SSM (S4D) is a sum of n complex exponentials per feature,

    K[i, h, l] = 2 Re sum_m w[i, h, m] lam[h, m]^l,      lam = exp(log_ab), w = C Bb,

so y = K * u is the output of the recurrence x_t = lam x_{t-1} + u_t, y_t = 2 Re(w . x_t),
and the state-space duality's chunked algorithm (as SSD's for Mamba-2) computes it with
matrix products only. With chunks of T steps, t = k T + tau:

    intra  y[kT + tau] += sum_{sig <= tau} K[tau - sig] u[kT + sig]    a (T, T) Toeplitz
                                                                        product per feature
    state  L_k = sum_sig lam^(T-1-sig) u[kT + sig]                      (n, T) product
           X_k = lam^T X_{k-1} + L_k                                    a scan over chunks
    inter  y[kT + tau] += 2 Re sum_m w_m lam_m^(tau+1) X_{k-1}[m]       (T, n) product

All four are real matrix products (the complex ones split into real and imaginary
parts, the feature axis leading as their batch axis) except the scan over the L / T chunk
states (`SCAN`). Work per feature and token: O(T + n) multiply-adds on the matrix units,
against the FFT path's several passes over (b, h, 2L) complex arrays. On a GPU it loses:
the LRA S4D train steps on an H100 (2026-12-06, results/diag_conv_h100.txt) take 37.5 ms
(Text, f32) and 35.7 ms (ListOps) on it against 15.7 and 16.9 ms on the FFT bank; the
profile's largest items are the scan over chunk states (a while loop: its small complex
adds and reductions run 768 times a step) and 1,560 device-to-device copies. So the S4D
layer keeps the bank, and this stays an op: the FFT-free form, tested equal to the bank.
The same form gives the state that enters a chunk, which is what a sequence-parallel S4D
would pass between devices.

The anti-causal half of a bidirectional layer, sum_{s >= t} K_a[s - t] u[s], is the
causal recurrence on the time-reversed sequence (S4's bidirectional convention, as
`fft_conv_bank_xla`'s k_anticausal: the s = t term included).

Precision: the products run at `precision` (None: the default, TF32 on an NVIDIA GPU's
float32 matmuls; jax.lax.Precision.HIGHEST for full float32); the tests hold float64 to
the FFT path at 1e-10.
"""

import jax
import jax.numpy as jnp

from ssm._checks import check_float

DEFAULT_CHUNK = 64
# The scan over chunk states: "sequential" (lax.scan, one pass over them) or "associative"
# (lax.associative_scan: log2(l / T) passes, parallel). A module constant for an A/B.
SCAN = "sequential"


def _causal(u_hbkt, log_ab_hn, w_chn, precision):
  """The causal convolution of chunked u (h, b, k, T) -> (c, h, b, k, T). The feature axis
  leads every operand, so each product is a batched matrix product over h in place (the
  layout is changed once on the way in and once on the way out)."""
  t_len = u_hbkt.shape[-1]
  real = u_hbkt.dtype
  tau = jnp.arange(t_len, dtype=real)
  pow_hnt = jnp.exp(log_ab_hn[..., None] * tau)                             # lam^tau
  ein = lambda spec, a, b: jnp.einsum(spec, a, b, precision=precision)      # noqa: E731
  # intra-chunk: the first T taps as a lower-triangular Toeplitz matrix per feature
  k_cht = 2 * jnp.einsum("chn,hnt->cht", w_chn, pow_hnt,
                         precision=jax.lax.Precision.HIGHEST).real.astype(real)
  lag = tau.astype(jnp.int32)[:, None] - tau.astype(jnp.int32)[None, :]   # (T, T) t - s
  toeplitz = jnp.where(lag >= 0, k_cht[..., jnp.maximum(lag, 0)], 0)       # (c, h, T, T)
  y = ein("chts,hbks->chbkt", toeplitz, u_hbkt)
  # each chunk's own end state, then the states entering each chunk
  rev = pow_hnt[..., ::-1]                                                  # lam^(T-1-sig)
  local = jax.lax.complex(ein("hns,hbks->hnbk", rev.real.astype(real), u_hbkt),
                          ein("hns,hbks->hnbk", rev.imag.astype(real), u_hbkt))
  decay_hn = jnp.exp(t_len * log_ab_hn)[..., None, None]                    # lam^T
  if SCAN == "associative":
    decay = jnp.broadcast_to(decay_hn, local.shape)

    def combine(left, right):
      (a1, b1), (a2, b2) = left, right
      return a1 * a2, a2 * b1 + b2

    _, ends = jax.lax.associative_scan(combine, (decay, local), axis=3)    # X_k
    entering = jnp.concatenate([jnp.zeros_like(ends[..., :1]), ends[..., :-1]], axis=3)
  else:  # one pass over the chunk states: X_{k-1} out, X_k carried
    def advance(x_prev, local_k):
      return decay_hn[..., 0] * x_prev + local_k, x_prev

    _, entering = jax.lax.scan(advance, jnp.zeros_like(local[..., 0]),
                               jnp.moveaxis(local, 3, 0))
    entering = jnp.moveaxis(entering, 0, 3)                                # (h, n, b, k)
  # inter-chunk: 2 Re sum_m w_m lam_m^(tau+1) X_{k-1}[m]
  out_chnt = w_chn[..., None] * (pow_hnt * jnp.exp(log_ab_hn)[..., None])[None]
  y = y + 2 * (ein("chnt,hnbk->chbkt", out_chnt.real.astype(real), entering.real.astype(real))
               - ein("chnt,hnbk->chbkt", out_chnt.imag.astype(real),
                     entering.imag.astype(real)))
  return y


def diag_conv_chunked(u, log_ab, w_causal, w_anticausal=None, *, chunk: int = DEFAULT_CHUNK,
                      precision=None):
  """y[b, t, i, h] = sum_{s <= t} K_c[i, h, t - s] u[b, s, h]
                   (+ sum_{s >= t} K_a[i, h, s - t] u[b, s, h]),
  K_x[i, h, l] = 2 Re sum_m w_x[i, h, m] exp(l log_ab[h, m]) (module docstring).

  Args:
    u: (b, l, h) real.
    log_ab: (h, n) complex, Re < 0 (a stable discretised diagonal: S4D's log Ab).
    w_causal: (c, h, n) complex (S4D's C Bb); w_anticausal: None or (c, h, n).
    chunk: T, the steps per chunk (l is zero-padded to a multiple of it).
    precision: of the matrix products (module docstring).

  Returns:
    (b, l, c, h) in u's dtype promoted to at least float32; equal to
    `fft_conv_bank_xla(u, K_c, K_a)` with the kernels generated to length l.
  """
  check_float("diag_conv_chunked", u=u)
  if u.ndim != 3 or log_ab.ndim != 2 or log_ab.shape[0] != u.shape[2]:
    raise ValueError(f"diag_conv_chunked: u (b, l, h) and log_ab (h, n) expected, got "
                     f"{u.shape} and {log_ab.shape}")
  for name, w in (("w_causal", w_causal), ("w_anticausal", w_anticausal)):
    if w is not None and (w.ndim != 3 or w.shape[1:] != log_ab.shape):
      raise ValueError(f"diag_conv_chunked: {name} must be (c, {log_ab.shape[0]}, "
                       f"{log_ab.shape[1]}), got {w.shape}")
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"diag_conv_chunked: chunk must be a positive int, got {chunk!r}")
  real = jnp.promote_types(u.dtype, jnp.float32)
  b, length, h = u.shape
  chunks = -(-length // chunk)

  u_hbl = jnp.transpose(u.astype(real), (2, 0, 1))                          # (h, b, l)

  def run(v, w):
    v = jnp.pad(v, ((0, 0), (0, 0), (0, chunks * chunk - length)))
    y = _causal(v.reshape(h, b, chunks, chunk), log_ab, w, precision)
    return y.reshape(w.shape[0], h, b, chunks * chunk)[..., :length]

  y = run(u_hbl, w_causal)
  if w_anticausal is not None:
    y = y + run(u_hbl[..., ::-1], w_anticausal)[..., ::-1]
  return jnp.transpose(y, (2, 3, 0, 1))                                     # (b, l, c, h)
