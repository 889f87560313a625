"""S4: structured state spaces with a diagonal-plus-low-rank (DPLR) state matrix.

Gu, Goel, Re 2022, "Efficiently Modeling Long Sequences with Structured State
Spaces" (state-spaces/s4: src/models/sequence/kernels/ssm.py SSMKernelDPLR, dplr.py,
src/models/hippo/hippo.py nplr).

The state matrix of feature h is, in the eigenbasis of HiPPO's normal part,

    A = diag(Lambda_f) - P_f P_f^*       (Q = conj P in the repo's notation)

over the full N = d_state states. A, B, C are conjugate symmetric, so only one half
of each conjugate pair is stored: Lambda, B, C (n = N/2 entries) and P (r, n); the
other half is their conjugate (`conj_complete`), and sums over the full state are
2 Re of the half sums. At init (Lambda, P, B) is the NPLR form of the HiPPO matrix
(`ssm.hippo.nplr`), so the system is exactly the HiPPO one in another basis.

Discretisation: bilinear with step dt_h, in both modes,

    Ab = (2/dt - A)^-1 (2/dt + A),   Bb = 2 (2/dt - A)^-1 B,   K[j] = C Ab^j Bb.

Kernel (parallel mode). C-tilde = C (I - Ab^L) is learned directly (L = l_max fixed
at construction), so that the truncated generating function at the L-th roots of
unity w_k = exp(-2 pi i k / L) is a resolvent:

    sum_{j<L} K[j] w^j = C~ (I - w Ab)^-1 Bb = 2 C~ M(w)^-1 B,
    M(w) = (2/dt)(1 - w) - (1 + w) A = D(w) + (1 + w) P Q,  D_n = (2/dt)(1-w) - (1+w) Lambda_n.

With Cauchy sums r_ab(w) = sum_n a_n b_n / D_n(w) over the full (conjugate-completed)
state, for a in {C~, Q}, b in {B, P}, Woodbury gives

    Khat(w) = 2 [r_CB - (1 + w) r_CP (I_r + (1 + w) r_QP)^-1 r_QB]

and K = irfft(Khat, L). This is the repo's formula with r^repo = (1 + w) r, i.e.
Khat = 2/(1+w) [r_CB - r_CP r_QB / (1 + r_QP)] in the resolvent at z = (2/dt)(1-w)/(1+w),
rewritten so that w = -1 (the Nyquist node, z = infinity) is not a 0/0. A sequence
shorter than l_max uses the first L taps of the l_max kernel (as the repo does);
a longer one is an error. Cost O(c H N L) for the Cauchy sums plus the FFT.

Recurrent mode: x_t = Ab x_{t-1} + Bb u_t, y_t = 2 Re(C x_t) on the half state
(b, h, n) complex. The step applies (2/dt - A)^-1 by Woodbury in O(N r); the low-rank
inner products over the full state are 2 Re of the half ones. C is recovered from
C~ by solving (I - Ab^L)^T C^T = C~^T with the dense (N x N) Ab (`step_params`,
O(H N^3 log L)). `init_state` does that set-up once and the state (`S4State`) carries
it, as the repo's _setup_step does (XLA does not hoist it out of a scan over steps,
so per step it would dominate the step's cost: results/README.md).

Parameters (complex ones as float32 (..., 2) real/imaginary pairs, so that
optimizers, checkpoints and shardings see real arrays and real gradients):

    log_dt  (h,)          SSMParam  dt = exp(log_dt), log dt ~ U[log dt_min, log dt_max]
                                    (the repo's dt_transform="exp"; SPECS.md mentions softplus)
    a_re    (h, n)        SSMParam  Re Lambda = -exp(a_re)  (init -Re clamped >= 1e-4,
                                    since legt/lagt/fourier have Re Lambda = 0)
    a_im    (h, n)        SSMParam  Im Lambda = -a_im       (a_im >= 0 at init)
    P       (r, h, n, 2)  SSMParam  low-rank term
    B       (h, n, 2)     SSMParam
    C       (c, h, n, 2)  Param     C-tilde; init C ~ complex normal (E|C|^2 = 1), then
                                    C~ = C (I - Ab^l_max) as the repo does on first use
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssm import hippo
from ssm.discretize import full_precision, gbt_dense
from ssm.lssl import check_dt_range
from ssm.lti_mixer import lti_factory
from ssm.params import SSMParam

_RE_FLOOR = 1e-4  # smallest -Re Lambda at init (the repo clamps the same way)


# -- helpers -------------------------------------------------------------------

def conj_complete(x, axis: int = -1):
  """[x, conj x] along `axis`: the full vector of a conjugate-symmetric half."""
  return jnp.concatenate([x, jnp.conj(x)], axis=axis)


def _complex(x_ri):
  """(..., 2) real/imag pairs -> (...) complex."""
  return jax.lax.complex(x_ri[..., 0], x_ri[..., 1])


def _ri(z):
  """(...) complex -> (..., 2) real/imag pairs."""
  return jnp.stack([jnp.real(z), jnp.imag(z)], axis=-1)


@jax.jit
def dplr_from_params(a_re, a_im, P, B, C, log_dt):
  """Stored parameters -> (Lambda (h, n), P (r, h, n), B (h, n), C~ (c, h, n), dt (h,)).

  Complex outputs have the complex dtype of the inputs (complex64 from float32).
  """
  lam = jax.lax.complex(-jnp.exp(a_re), -a_im)
  return lam, _complex(P), _complex(B), _complex(C), jnp.exp(log_dt)


# -- kernel math (pure JAX; dtypes follow the inputs) -----------------------------

@functools.partial(jax.jit, static_argnames="L")
@full_precision
def s4_kernel(Lambda, P, B, C_tilde, dt, L: int):
  """S4 convolution kernel by Cauchy sums and Woodbury at the L-th roots of unity.

  Args:
    Lambda: (h, n) complex, diagonal half.
    P: (r, h, n) complex, low-rank half (Q = conj P).
    B: (h, n) complex.
    C_tilde: (c, h, n) complex, C (I - Ab^L) for this L.
    dt: (h,) real step sizes.
    L: kernel length (static int >= 1).

  Returns:
    K (c, h, L) real: K[c, h, j] = C[c, h] Ab_h^j Bb_h over the full state.
  """
  c, r = C_tilde.shape[0], P.shape[0]
  cdtype = jnp.result_type(Lambda, P, B, C_tilde, jnp.complex64)
  rdtype = jnp.finfo(cdtype).dtype
  w = jnp.asarray(np.exp(-2j * np.pi * np.arange(L // 2 + 1) / L), cdtype)  # (l,)
  dt = jnp.asarray(dt, rdtype)
  # 1 / D_n(w) over the full state: (h, 2n, l)
  d = ((2 / dt)[:, None, None] * (1 - w) - (1 + w) * conj_complete(Lambda)[..., None])
  inv_d = 1 / d
  rows = conj_complete(jnp.concatenate([C_tilde, jnp.conj(P)], axis=0))  # (c+r, h, 2n)
  cols = conj_complete(jnp.concatenate([B[None], P], axis=0))  # (1+r, h, 2n)
  res = jnp.einsum("ahn,bhn,hnl->abhl", rows, cols, inv_d)  # (c+r, 1+r, h, l)
  r_cb, r_cp = res[:c, 0], res[:c, 1:]  # (c, h, l), (c, r, h, l)
  r_qb, r_qp = res[c:, 0], res[c:, 1:]  # (r, h, l), (r, r, h, l)
  s = 1 + w
  if r == 1:
    corr = r_cp[:, 0] * r_qb[0] / (1 + s * r_qp[0, 0])
  else:
    m = jnp.eye(r, dtype=cdtype)[:, :, None, None] + s * r_qp  # (r, r, h, l)
    m = jnp.moveaxis(m, (0, 1), (-2, -1))  # (h, l, r, r)
    sol = jnp.linalg.solve(m, jnp.moveaxis(r_qb, 0, -1)[..., None])[..., 0]  # (h, l, r)
    corr = jnp.einsum("cjhl,hlj->chl", r_cp, sol)
  k_hat = 2 * (r_cb - s * corr)
  return jnp.fft.irfft(k_hat, n=L, axis=-1).astype(rdtype)


@jax.jit
@full_precision
def dense_system(Lambda, P, B, dt):
  """Dense bilinear discretisation of the full DPLR system (for the step setup and tests).

  Returns:
    Ab (h, N, N), Bb (h, N) complex, N = 2n, in the conjugate-completed basis.
  """
  lam_f, p_f = conj_complete(Lambda), conj_complete(P)
  A = (jnp.eye(lam_f.shape[-1], dtype=lam_f.dtype) * lam_f[..., None, :]
       - jnp.einsum("rhn,rhm->hnm", p_f, jnp.conj(p_f)))
  return gbt_dense(A, conj_complete(B), dt, 0.5)


@functools.partial(jax.jit, static_argnames="L")
@full_precision
def c_tilde_from_c(C, Ab, L: int):
  """C~ = C (I - Ab^L). C (c, h, n) half, Ab (h, N, N) full -> C~ (c, h, n)."""
  c_f = conj_complete(C)
  c_t = c_f - jnp.einsum("chn,hnm->chm", c_f, jnp.linalg.matrix_power(Ab, L))
  return c_t[..., :C.shape[-1]]


@functools.partial(jax.jit, static_argnames="L")
@full_precision
def c_from_c_tilde(C_tilde, Ab, L: int):
  """Solve C (I - Ab^L) = C~ for C. C~ (c, h, n) half, Ab (h, N, N) -> C (c, h, n).

  Ill-conditioned when Ab^L is close to I (dt L |Re Lambda| small, e.g. the Re 0 modes
  of legt/lagt/fourier): the step mode then loses accuracy, the kernel does not.
  """
  n_full = Ab.shape[-1]
  m_t = jnp.swapaxes(jnp.eye(n_full, dtype=Ab.dtype) - jnp.linalg.matrix_power(Ab, L), -1, -2)
  c_f = jnp.linalg.solve(jnp.broadcast_to(m_t, C_tilde.shape[:1] + m_t.shape),
                         conj_complete(C_tilde)[..., None])[..., 0]
  return c_f[..., :C_tilde.shape[-1]]


class S4StepParams(NamedTuple):
  """What the O(N) step needs (all (h, n) complex unless noted).

  D = (2/dt - Lambda)^-1, E = 2/dt + Lambda, P (r, h, n), Minv (h, r, r) real =
  (I + Q D P)^-1 over the full state, B2 = 2 B, C (c, h, n) recovered from C~.
  """
  D: jax.Array
  E: jax.Array
  P: jax.Array
  Minv: jax.Array
  B2: jax.Array
  C: jax.Array


class S4State(NamedTuple):
  """Recurrent state of `S4Kernel`: the half state x (b, h, n) complex and the step
  matrices (no batch axis), computed once by `init_state` as the repo's _setup_step."""
  x: jax.Array
  params: S4StepParams


@functools.partial(jax.jit, static_argnames="L")
@full_precision
def step_params(Lambda, P, B, C_tilde, dt, L: int) -> S4StepParams:
  """Set up the recurrent step of the kernel `s4_kernel(..., L)` describes."""
  r = P.shape[0]
  dt = dt[:, None]
  D = 1 / (2 / dt - Lambda)
  qdp = 2 * jnp.real(jnp.einsum("rhn,hn,shn->hrs", jnp.conj(P), D, P))
  Minv = jnp.linalg.inv(jnp.eye(r, dtype=qdp.dtype) + qdp)
  Ab, _ = dense_system(Lambda, P, B, dt[:, 0])
  C = c_from_c_tilde(C_tilde, Ab, L)
  return S4StepParams(D, 2 / dt + Lambda, P, Minv, 2 * B, C)


@jax.jit
@full_precision
def s4_step(params: S4StepParams, x, u):
  """One bilinear step on the half state in O(N r).

  x_new = (2/dt - A)^-1 ((2/dt + A) x + 2 B u), y = 2 Re(C x_new).

  Args:
    params: from `step_params`.
    x: (b, h, n) complex half state.
    u: (b, h) real input.

  Returns:
    (x_new (b, h, n), y (b, c, h) real).
  """
  D, E, P, Minv, B2, C = params
  qx = lambda v: 2 * jnp.real(jnp.einsum("rhn,bhn->brh", jnp.conj(P), v))  # Q v, full state
  pw = lambda s: jnp.einsum("rhn,brh->bhn", P, s.astype(P.dtype))
  v = E * x - pw(qx(x)) + B2 * u[..., None].astype(x.dtype)
  dv = D * v
  x_new = dv - D * pw(jnp.einsum("hrs,bsh->brh", Minv, qx(dv)))
  y = 2 * jnp.real(jnp.einsum("chn,bhn->bch", C, x_new))
  return x_new, y


# -- module ---------------------------------------------------------------------

def _c_tilde_init(a_re, a_im, p, b, c_ri, log_dt, l_max):
  """C~ = C (I - Ab^l_max) at init, in NumPy float64 (no per-op compiles, no rounding)."""
  lam = -np.exp(a_re.astype(np.float64)) - 1j * a_im
  dt = np.exp(log_dt.astype(np.float64))[:, None, None]
  A = hippo.dplr_dense(lam, p)  # (h, N, N)
  eye = np.eye(A.shape[-1])
  Ab_L = np.linalg.matrix_power(np.linalg.solve(eye - dt / 2 * A, eye + dt / 2 * A), l_max)
  c = c_ri[..., 0].astype(np.float64) + 1j * c_ri[..., 1]
  c_f = np.concatenate([c, np.conj(c)], axis=-1)
  return (c_f - np.einsum("chn,hnm->chm", c_f, Ab_L))[..., :c.shape[-1]]


class S4Kernel(nnx.Module):
  """S4 (DPLR) kernel module, following the protocol of `ssm.lti_mixer`.

  Args:
    d_model: h, number of features (independent SSMs).
    d_state: N, real state size (even: n = N/2 conjugate pairs are stored).
    channels: c, output maps C~ per feature (sharing Lambda, P, B, dt).
    l_max: kernel length the C~ parameterisation is tied to; longer sequences are
      an error, shorter ones use the first taps.
    measure: HiPPO measure of the NPLR init ("legs" default; "legt" needs rank 2).
    rank: r, rank of the low-rank term.
    dt_min, dt_max: range of the log-uniform dt initialisation (Path-X: dt_min 1e-4).
  """

  def __init__(self, d_model: int, *, d_state: int = 64, channels: int = 1,
               l_max: int = 1024, measure: str = "legs", rank: int = 1,
               dt_min: float = 1e-3, dt_max: float = 1e-1, rngs: nnx.Rngs):
    for name, v in (("d_model", d_model), ("d_state", d_state), ("channels", channels),
                    ("l_max", l_max), ("rank", rank)):
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"S4: {name} must be a positive int, got {v!r}")
    if d_state % 2:
      raise ValueError(f"S4: d_state must be even (conjugate pairs), got {d_state}")
    check_dt_range(dt_min, dt_max, "S4")
    lam, p, b = hippo.dplr(measure, d_state, rank, copies=d_model)  # validates measure, rank
    n = d_state // 2
    self.d_model, self.d_state, self.channels = d_model, d_state, channels
    self.l_max, self.measure, self.rank = l_max, measure, rank
    self.log_dt = SSMParam(jax.random.uniform(rngs.params(), (d_model,), jnp.float32,
                                              np.log(dt_min), np.log(dt_max)))
    self.a_re = SSMParam(jnp.asarray(np.log(np.maximum(-lam.real, _RE_FLOOR)), jnp.float32))
    self.a_im = SSMParam(jnp.asarray(-lam.imag, jnp.float32))
    self.P = SSMParam(jnp.asarray(np.stack([p.real, p.imag], -1), jnp.float32))
    self.B = SSMParam(jnp.asarray(np.stack([b.real, b.imag], -1), jnp.float32))
    # C ~ complex normal with E|C|^2 = 1, then turned into C~ for l_max.
    c0 = jax.random.normal(rngs.params(), (channels, d_model, n, 2), jnp.float32) / np.sqrt(2)
    c_t = _c_tilde_init(np.asarray(self.a_re[...]), np.asarray(self.a_im[...]), p, b,
                        np.asarray(c0), np.asarray(self.log_dt[...]), l_max)
    self.C = nnx.Param(jnp.asarray(np.stack([c_t.real, c_t.imag], -1), jnp.float32))

  def dplr(self):
    """(Lambda (h, n), P (r, h, n), B (h, n), C~ (c, h, n)) complex64 and dt (h,)."""
    return dplr_from_params(self.a_re[...], self.a_im[...], self.P[...], self.B[...],
                            self.C[...], self.log_dt[...])

  def __call__(self, seq_len: int) -> jax.Array:
    """Kernel K (c, h, seq_len) float32: the first seq_len taps of the l_max kernel."""
    if not isinstance(seq_len, int) or seq_len < 1:
      raise ValueError(f"S4: seq_len must be a positive int, got {seq_len!r}")
    if seq_len > self.l_max:
      raise ValueError(f"S4: sequence length {seq_len} exceeds l_max={self.l_max}; "
                       "build the layer with a larger l_max")
    return s4_kernel(*self.dplr(), self.l_max)[..., :seq_len].astype(jnp.float32)

  def step_params(self) -> S4StepParams:
    """Discretised step matrices and the C recovered from C~ (O(H N^3 log l_max))."""
    return step_params(*self.dplr(), self.l_max)

  def init_state(self, batch_size: int) -> "S4State":
    """Zero half state (batch_size, h, n) complex64, with the step matrices of the
    current parameters (set up once here, not per step; make a new state after
    changing the parameters)."""
    return S4State(jnp.zeros((batch_size, self.d_model, self.d_state // 2), jnp.complex64),
                   self.step_params())

  def step(self, state: "S4State", u_t: jax.Array) -> tuple["S4State", jax.Array]:
    """state from init_state, u_t (b, h) -> (state, y_t (b, c, h) float32). O(H N r)."""
    if u_t.ndim != 2 or u_t.shape[1] != self.d_model:
      raise ValueError(f"S4 step: u_t must be (batch, {self.d_model}), got {u_t.shape}")
    want = (u_t.shape[0], self.d_model, self.d_state // 2)
    if not isinstance(state, S4State):
      raise ValueError(f"S4 step: state must be an S4State from init_state({u_t.shape[0]}), "
                       f"got {type(state).__name__}")
    if state.x.shape != want or not jnp.iscomplexobj(state.x):
      raise ValueError(f"S4 step: state.x must be complex with shape {want} "
                       f"(batch, d_model, d_state // 2), got {state.x.shape} {state.x.dtype}")
    x, y = s4_step(state.params, state.x, u_t.astype(jnp.float32))
    return S4State(x, state.params), y.astype(jnp.float32)


# Registry factory: the kernel's and LTIMixer's options, their defaults written once in
# the two classes (`ssm.lti_mixer.lti_factory`).
make_mixer = lti_factory(
    S4Kernel,
    """An S4 layer: S4Kernel inside LTIMixer (GELU, then Linear to 2h and GLU, as S4).

    With bidirectional=True the kernel gets 2*channels C~ maps (forward half, backward half)
    sharing Lambda, P, B and dt, as the repo does.""")
