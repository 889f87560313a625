"""S4D: the diagonal state-space layer.

Gu, Gupta, Goel, Re 2022, "On the Parameterization and Initialization of Diagonal
State Space Models" (state-spaces/s4: models/s4/s4d.py and SSMKernelDiag in
src/models/sequence/kernels/ssm.py).

Each feature h runs its own diagonal SSM with N = d_state real dimensions, held as
n = N/2 complex modes, each one half of a conjugate pair, so the real system's
output is twice the real part of the half sum:

    x'(t) = A x(t) + B u(t),   y(t) = 2 Re(C x(t)),   A = diag(A_n),  Re A_n < 0.

Discretised with step dt (ZOH or bilinear) to (Ab, Bb), the convolution kernel is a
Vandermonde product, Ab^l computed as exp(l log Ab) (= exp(l dt A) for ZOH):

    K[c, h, l] = 2 Re sum_n C[c, h, n] Bb[h, n] Ab[h, n]^l,

generated blocked (`vandermonde_kernel`: l = aT + t, two (h, n, ~sqrt L) power tables and
one small matrix product per feature), never as the (h, n, L) matrix.

and the recurrent mode is x_t = Ab x_{t-1} + Bb u_t,  y_t = 2 Re(C x_t).

Parameters. Complex ones are stored as float32 (..., 2) real/imaginary pairs, so
optimizers, checkpoints and shardings only ever see real arrays:

    a_re    (h, n)        SSMParam  Re A = -exp(a_re) ("exp") or -(relu(a_re) + 1e-4) ("relu")
    a_im    (h, n)        SSMParam  Im A = a_im
    log_dt  (h,)          SSMParam  dt = exp(log_dt), log dt ~ U[log dt_min, log dt_max]
    B       (h, n, 2)     SSMParam  1 (lin, inv, real) or the NPLR LegS B (legs)
    C       (c, h, n, 2)  Param     complex normal, E|C|^2 = 1

Initialisations of A for mode n = 0..N/2-1 (SPECS.md "S4D"):
    lin   A_n = -1/2 + i pi n                     (S4D-Lin)
    inv   A_n = -1/2 + i (N/pi)(N/(2n+1) - 1)     (S4D-Inv)
    legs  A_n = Lambda_n of the NPLR form of HiPPO-LegS, B = V* B_legs (S4D-LegS)
    real  A_n = -(n+1)                            (S4D-Real)
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssm.discretize import discretize
from ssm.lti_mixer import lti_factory
from ssm.params import SSMParam

INITS = ("legs", "lin", "inv", "real")
DISCS = ("zoh", "bilinear")
REAL_TRANSFORMS = ("exp", "relu")
_RELU_FLOOR = 1e-4  # keeps Re A < 0 strictly under the relu transform
# How S4DKernel generates its kernel: "blocked" (`vandermonde_kernel`) or "plain"
# (`vandermonde_kernel_reference`, the materialised product), module-wide so that a
# profile can A/B a whole model (scripts/gpu/profile_train_step.py --s4d_vandermonde).
VANDERMONDE_METHODS = ("blocked", "plain")
VANDERMONDE = "blocked"


# -- initialisation (NumPy, float64) ------------------------------------------

def init_diag(init: str, d_state: int) -> tuple[np.ndarray, np.ndarray]:
  """The diagonal (A, B) of an S4D initialisation.

  Args:
    init: "legs", "lin", "inv" or "real".
    d_state: N, the real state size (even); N/2 complex modes are returned.

  Returns:
    A, B: (N/2,) complex128 each.
  """
  if init not in INITS:
    raise ValueError(f"S4D: init must be one of {INITS}, got {init!r}")
  _check_d_state(d_state)
  n = np.arange(d_state // 2, dtype=np.float64)
  b = np.ones_like(n, dtype=np.complex128)
  if init == "lin":
    a = -0.5 + 1j * np.pi * n
  elif init == "inv":
    a = -0.5 + 1j * (d_state / np.pi) * (d_state / (2 * n + 1) - 1)
  elif init == "real":
    a = -(n + 1) + 0j
  else:  # legs: the diagonal of the NPLR form of HiPPO-LegS, with its B
    from ssm import hippo  # lazy: hippo is only needed for this init
    lam, _, b_legs, *_ = hippo.nplr("legs", d_state, 1)
    a = np.asarray(lam, np.complex128).reshape(d_state // 2)
    b = np.asarray(b_legs, np.complex128).reshape(d_state // 2)
  return a.astype(np.complex128), b


def real_param_from_re(re_a: np.ndarray, real_transform: str) -> np.ndarray:
  """The a_re that gives Re A = re_a (< 0) under `real_transform` (float64)."""
  mag = np.maximum(-np.asarray(re_a, np.float64), _RELU_FLOOR)
  if real_transform == "exp":
    return np.log(mag)
  if real_transform == "relu":
    return mag - _RELU_FLOOR
  raise ValueError(f"S4D: real_transform must be one of {REAL_TRANSFORMS}, got {real_transform!r}")


# -- kernel math (pure JAX, dtype follows the inputs) --------------------------

def diag_eigenvalues(a_re, a_im, real_transform: str = "exp"):
  """A = Re + i Im with a negative real part. a_re, a_im (h, n) -> A (h, n) complex."""
  if real_transform == "exp":
    re = -jnp.exp(a_re)
  elif real_transform == "relu":
    re = -(jax.nn.relu(a_re) + _RELU_FLOOR)
  else:
    raise ValueError(f"S4D: real_transform must be one of {REAL_TRANSFORMS}, got {real_transform!r}")
  return jax.lax.complex(re, a_im)


def discretize_diag(dt_h, a_hn, b_hn, disc: str = "zoh"):
  """Discretise a diagonal SSM with one step size per feature (`ssm.discretize`'s
  `zoh_diag` / `bilinear_diag`), plus log Ab for the Vandermonde kernel.

  ZOH:      Ab = exp(dt A),                Bb = (exp(dt A) - 1) / A * B  (by expm1: exact
            for small dt A, where exp(dt A) - 1 would cancel)
  bilinear: Ab = (1 + dt A/2) / (1 - dt A/2),  Bb = dt B / (1 - dt A/2)

  Args:
    dt_h: (h,) positive step sizes.
    a_hn, b_hn: (h, n) complex.

  Returns:
    ab_hn, bb_hn: (h, n) complex; log_ab_hn: (h, n) complex with exp(log_ab) = Ab
    (exactly dt A for ZOH, so Ab^l = exp(l dt A) keeps full precision).
  """
  if disc not in DISCS:
    raise ValueError(f"S4D: disc must be one of {DISCS}, got {disc!r}")
  ab, bb = discretize(a_hn, b_hn, dt_h[:, None], disc, diagonal=True)
  return ab, bb, (dt_h[:, None] * a_hn if disc == "zoh" else jnp.log(ab))


def vandermonde_block(seq_len: int) -> int:
  """The block T of `vandermonde_kernel`: the smallest power of two >= sqrt(seq_len)."""
  return 1 << max(0, math.ceil(math.log2(max(seq_len, 1)) / 2))


def vandermonde_kernel(c_chn, bb_hn, log_ab_hn, seq_len: int, *, block: int | None = None):
  """K[c, h, l] = 2 Re sum_n C[c,h,n] Bb[h,n] exp(l log Ab[h,n]), l = 0..seq_len-1.

  Blocked: writing l = a T + t (T = `block`, t < T), Ab^l = Ab^(aT) Ab^t, so

      K[c, h, aT + t] = 2 Re sum_n (CB[c,h,n] Ab[h,n]^(aT)) Ab[h,n]^t,

  one small real matrix product per feature (contracting n and the real/imaginary
  pair) between two (h, n, ~sqrt L) power tables. Nothing of size (h, n, L) is formed:
  the exps are O(h n sqrt L), and autodiff's backward is two more such products, where
  the plain Vandermonde product (`vandermonde_kernel_reference`) writes and reads the
  (h, n, L) complex matrix forward and backward (268 MB per layer at LRA Text). Each
  power is the product of two exps (one rounding more than the plain product's one exp;
  the tests hold the float32 error to the plain product's).

  Returns (c, h, seq_len), real dtype of the inputs.
  """
  if block is not None and (not isinstance(block, int) or block < 1):
    raise ValueError(f"S4D vandermonde_kernel: block must be a positive int, got {block!r}")
  real_dtype = jnp.real(log_ab_hn).dtype
  t_len = block or vandermonde_block(seq_len)
  a_len = -(-seq_len // t_len)
  pow_t_hnt = jnp.exp(log_ab_hn[..., None] * jnp.arange(t_len, dtype=real_dtype))
  pow_a_hna = jnp.exp(log_ab_hn[..., None] * (jnp.arange(a_len, dtype=real_dtype) * t_len))
  x_chna = (c_chn * bb_hn[None])[..., None] * pow_a_hna[None]
  # Re(x w) = x.re w.re - x.im w.im: one real contraction over (pair r, mode n).
  x_chrna = jnp.stack([jnp.real(x_chna), -jnp.imag(x_chna)], axis=2)
  w_hrnt = jnp.stack([jnp.real(pow_t_hnt), jnp.imag(pow_t_hnt)], axis=1)
  k_chat = jnp.einsum("chrna,hrnt->chat", x_chrna, w_hrnt,
                      precision=jax.lax.Precision.HIGHEST)
  c_dim, h_dim = k_chat.shape[:2]
  return 2 * k_chat.reshape(c_dim, h_dim, a_len * t_len)[..., :seq_len]


def vandermonde_kernel_reference(c_chn, bb_hn, log_ab_hn, seq_len: int):
  """The plain Vandermonde product: the (h, n, seq_len) matrix exp(l log Ab) materialised,
  O(h n L) time and memory. `vandermonde_kernel`'s reference. Returns (c, h, seq_len)."""
  real_dtype = jnp.real(log_ab_hn).dtype
  pos_l = jnp.arange(seq_len, dtype=real_dtype)
  vander_hnl = jnp.exp(log_ab_hn[..., None] * pos_l)
  cb_chn = c_chn * bb_hn[None]
  return 2 * jnp.einsum("chn,hnl->chl", cb_chn, vander_hnl,
                        precision=jax.lax.Precision.HIGHEST).real


def s4d_kernel(a_re, a_im, log_dt, b_hn, c_chn, seq_len: int, *, disc: str = "zoh",
               real_transform: str = "exp"):
  """The S4D convolution kernel from its parameters.

  Args:
    a_re, a_im: (h, n) real. log_dt: (h,). b_hn: (h, n) complex. c_chn: (c, h, n) complex.

  Returns:
    (c, h, seq_len) real.
  """
  a_hn = diag_eigenvalues(a_re, a_im, real_transform)
  _, bb_hn, log_ab_hn = discretize_diag(jnp.exp(log_dt), a_hn, b_hn, disc)
  return vandermonde_kernel(c_chn, bb_hn, log_ab_hn, seq_len)


def diag_step(state_bhn, u_bh, ab_hn, bb_hn, c_chn):
  """One recurrent step: x = Ab x + Bb u;  y = 2 Re(C x).

  Returns (state (b, h, n) complex, y (b, c, h) real).
  """
  state_bhn = ab_hn * state_bhn + bb_hn * u_bh[..., None]
  y_bch = 2 * jnp.einsum("chn,bhn->bch", c_chn, state_bhn).real
  return state_bhn, y_bch


def _as_complex(pair):
  """(..., 2) real/imaginary pairs -> (...) complex."""
  return jax.lax.complex(pair[..., 0], pair[..., 1])


def _check_d_state(d_state):
  if not isinstance(d_state, int) or d_state < 2 or d_state % 2:
    raise ValueError(f"S4D: d_state must be an even int >= 2 (N/2 conjugate-pair modes), "
                     f"got {d_state!r}")


# -- kernel module ------------------------------------------------------------

class S4DKernel(nnx.Module):
  """S4D kernel module (the LTIMixer kernel protocol, see ssm/lti_mixer.py).

  A, B, dt are per feature and shared by the `channels` output maps C.

  Args:
    d_model: h, the number of features.
    d_state: N, even; N/2 complex modes.
    channels: c, output channels (each with its own C).
    init: "legs" (default), "lin", "inv" or "real".
    disc: "zoh" (default) or "bilinear".
    real_transform: "exp" (Re A = -exp(a)) or "relu" (Re A = -(relu(a) + 1e-4)).
    dt_min, dt_max: range of the log-uniform initial step size.
  """

  def __init__(self, d_model: int, *, d_state: int = 64, channels: int = 1, init: str = "legs",
               disc: str = "zoh", real_transform: str = "exp", dt_min: float = 1e-3,
               dt_max: float = 1e-1, rngs: nnx.Rngs):
    if not isinstance(d_model, int) or d_model < 1:
      raise ValueError(f"S4D: d_model must be a positive int, got {d_model!r}")
    _check_d_state(d_state)
    if disc not in DISCS:
      raise ValueError(f"S4D: disc must be one of {DISCS}, got {disc!r}")
    if real_transform not in REAL_TRANSFORMS:
      raise ValueError(
          f"S4D: real_transform must be one of {REAL_TRANSFORMS}, got {real_transform!r}")
    if not isinstance(channels, int) or channels < 1:
      raise ValueError(f"S4D: channels must be a positive int, got {channels!r}")
    if not 0 < dt_min <= dt_max:
      raise ValueError(f"S4D: need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
    a_n, b_n = init_diag(init, d_state)
    h, n = d_model, d_state // 2
    self.d_model, self.channels, self.d_state = h, channels, d_state
    self.init, self.disc, self.real_transform = init, disc, real_transform

    tile = lambda v: np.broadcast_to(v, (h, n))
    self.a_re = SSMParam(jnp.asarray(tile(real_param_from_re(a_n.real, real_transform)),
                                     jnp.float32))
    self.a_im = SSMParam(jnp.asarray(tile(a_n.imag), jnp.float32))
    b_pairs = np.stack([b_n.real, b_n.imag], axis=-1)  # (n, 2)
    self.B = SSMParam(jnp.asarray(np.broadcast_to(b_pairs, (h, n, 2)), jnp.float32))
    log_lo, log_hi = math.log(dt_min), math.log(dt_max)
    self.log_dt = SSMParam(jax.random.uniform(rngs.params(), (h,), jnp.float32, log_lo, log_hi))
    # Complex standard normal: real and imaginary parts each N(0, 1/2). Drawn flat and
    # reshaped: XLA:CPU compiles a rank-1 draw several times faster than a rank-4 one.
    c_flat = jax.random.normal(rngs.params(), (channels * h * n * 2,), jnp.float32)
    self.C = nnx.Param(c_flat.reshape(channels, h, n, 2) * math.sqrt(0.5))

  # -- parameters -------------------------------------------------------------
  def eigenvalues(self) -> jax.Array:
    """A (h, n) complex64."""
    return diag_eigenvalues(self.a_re[...], self.a_im[...], self.real_transform)

  def discretized(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(Ab, Bb, log Ab) (h, n) and C (c, h, n), complex64."""
    ab, bb, log_ab = discretize_diag(jnp.exp(self.log_dt[...]), self.eigenvalues(),
                                     _as_complex(self.B[...]), self.disc)
    return ab, bb, log_ab, _as_complex(self.C[...])

  def diagonal(self) -> tuple[jax.Array, jax.Array]:
    """(log Ab (h, n), w = C Bb (c, h, n)), complex64: the kernel is
    K[c, h, l] = 2 Re sum_n w[c, h, n] exp(l log Ab[h, n]) (`ssm.ops.diag_conv`)."""
    _, bb, log_ab, c = self.discretized()
    return log_ab, c * bb[None]

  # -- kernel protocol ------------------------------------------------------------
  def __call__(self, seq_len: int) -> jax.Array:
    """The kernel (c, h, seq_len) float32, for any seq_len >= 1."""
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
      raise ValueError(f"S4D: seq_len must be a positive int, got {seq_len!r}")
    if VANDERMONDE not in VANDERMONDE_METHODS:
      raise ValueError(f"S4D: ssm.s4d.VANDERMONDE must be one of {VANDERMONDE_METHODS}, "
                       f"got {VANDERMONDE!r}")
    _, bb, log_ab, c = self.discretized()
    generate = vandermonde_kernel if VANDERMONDE == "blocked" else vandermonde_kernel_reference
    return generate(c, bb, log_ab, int(seq_len)).astype(jnp.float32)

  def init_state(self, batch_size: int) -> jax.Array:
    """Zero state (batch_size, h, n) complex64."""
    return jnp.zeros((batch_size, self.d_model, self.d_state // 2), jnp.complex64)

  def step(self, state: Any, u_t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """u_t (b, h) -> (state (b, h, n) complex64, y_t (b, c, h) float32). O(c h n) per token."""
    expected = (u_t.shape[0], self.d_model, self.d_state // 2)
    if not hasattr(state, "shape") or tuple(state.shape) != expected:
      raise ValueError(f"S4D step: state must have shape {expected} (batch, d_model, "
                       f"d_state/2), got {getattr(state, 'shape', type(state))}")
    ab, bb, _, c = self.discretized()
    state, y = diag_step(state.astype(jnp.complex64), u_t.astype(jnp.float32), ab, bb, c)
    return state, y.astype(jnp.float32)


# Registry factory: the kernel's and LTIMixer's options, their defaults written once in
# the two classes (`ssm.lti_mixer.lti_factory`).
make_mixer = lti_factory(
    S4DKernel,
    """An S4D layer: S4DKernel inside LTIMixer (conv + D u, activation, dropout, GLU).

    With bidirectional=True the kernel has 2 * channels output maps sharing A, B, dt (the last
    `channels` run backwards in time) and the layer has no step mode.""")
