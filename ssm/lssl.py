"""LSSL: the Linear State-Space Layer with a dense HiPPO state matrix.

Gu, Johnson, Goel, Saab, Dao, Rudra, Re 2021, "Combining Recurrent, Convolutional,
and Continuous-time Models with Linear State-Space Layers" (state-spaces/s4:
src/models/sequence/modules/lssl.py, src/models/functional/krylov.py).

Each feature h runs the continuous system dx/dt = A x + B u (A, B a HiPPO pair, N
states) with its own step dt_h, discretised (bilinear by default) to dense (Ab, Bb),
and c output maps C (one per kernel channel):

    K[c, h, j] = C[c, h] Ab_h^j Bb_h,  j = 0..L-1     (the Krylov matrix, times C)
    x_t = Ab x_{t-1} + Bb u_t,  y_t = C x_t           (recurrent mode; no D term here)

This is the paper's slow baseline that S4 replaced: the kernel costs O(H N^2 L) work
(log2 L matrix-matrix doublings of the Krylov matrix, plus an O(H N^3) discretisation)
and a recurrent step O(H N^2): `init_state` discretises once (O(H N^3)) and the state
(`LSSLState`) carries (Ab, Bb), so the steps only multiply. Dense powers of the
non-normal HiPPO matrices also lose accuracy for long L; S4's DPLR kernel avoids them.

Parameters (as the repo's defaults, `learn=0`: A and B fixed):

    log_dt  (h,)       SSMParam  dt = exp(log_dt), log dt ~ U[log dt_min, log dt_max]
    C       (c, h, N)  Param     N(0, 1)
    A, B               fixed HiPPO constants (learn="none"); SSMParam (N, N), (N,) shared
                       by all features (learn="shared", the repo's learn=1) or (h, N, N),
                       (h, N) per feature (learn="per_feature", learn=2)

The layer around the kernel (D, GELU, output linear over the features as the repo
does) is `ssm.lti_mixer.LTIMixer`; `make_mixer` builds it.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssm import hippo
from ssm.discretize import METHODS, discretize, full_precision
from ssm.lti_mixer import lti_factory
from ssm.params import SSMParam

LEARN = ("none", "shared", "per_feature")


# -- kernel math (pure JAX; dtypes follow the inputs) -----------------------------

@functools.partial(jax.jit, static_argnames="L")
@full_precision
def krylov(L: int, Ab, b):
  """Krylov matrix [b, Ab b, Ab^2 b, ..., Ab^(L-1) b] by repeated squaring.

  Each doubling appends Ab^(2^i) [columns so far] and squares Ab^(2^i): ceil(log2 L)
  batched matmuls, O(N^2 L) work per system.

  Args:
    L: number of columns (static int >= 1).
    Ab: (..., N, N).
    b: (..., N), broadcastable with Ab's batch shape.

  Returns:
    (..., N, L) with [..., :, j] = Ab^j b.
  """
  if L < 1:
    raise ValueError(f"krylov: L must be >= 1, got {L}")
  batch = jnp.broadcast_shapes(Ab.shape[:-2], b.shape[:-1])
  x = jnp.broadcast_to(b, batch + b.shape[-1:])[..., None]  # (..., N, 1)
  power = Ab
  while x.shape[-1] < L:
    need = min(x.shape[-1], L - x.shape[-1])
    x = jnp.concatenate([x, power @ x[..., :need]], axis=-1)
    if x.shape[-1] < L:
      power = power @ power
  return x


@functools.partial(jax.jit, static_argnames=("L", "method"))
@full_precision
def lssl_kernel(A, B, C, dt, L: int, method: str = "bilinear"):
  """Convolution kernel of the discretised LSSL.

  Args:
    A: (N, N) or (h, N, N) continuous state matrix.
    B: (N,) or (h, N).
    C: (c, h, N).
    dt: (h,) step sizes.
    L: kernel length.
    method: discretisation, one of `ssm.discretize.METHODS`.

  Returns:
    K (c, h, L): K[c, h, j] = C[c, h] Ab_h^j Bb_h.
  """
  Ab, Bb = discretize(A, B, dt, method)  # (h, N, N), (h, N)
  return jnp.einsum("chn,hnl->chl", C, krylov(L, Ab, Bb))


@jax.jit
@full_precision
def lssl_step(Ab, Bb, C, x, u):
  """One recurrent step. Ab (h, N, N), Bb (h, N), C (c, h, N), x (b, h, N), u (b, h).

  Returns (x_new (b, h, N), y (b, c, h)) with x_new = Ab x + Bb u, y = C x_new.
  """
  x = jnp.einsum("hnm,bhm->bhn", Ab, x) + Bb * u[..., None]
  return x, jnp.einsum("chn,bhn->bch", C, x)


# -- module ---------------------------------------------------------------------

class LSSLState(NamedTuple):
  """Recurrent state of `LSSLKernel`: x (b, h, N) and the discretised Ab (h, N, N),
  Bb (h, N) (no batch axis), computed once by `init_state`."""
  x: jax.Array
  Ab: jax.Array
  Bb: jax.Array


def _log_uniform(key, shape, lo, hi):
  return jax.random.uniform(key, shape, jnp.float32, np.log(lo), np.log(hi))


def check_dt_range(dt_min, dt_max, who):
  if not 0 < dt_min <= dt_max:
    raise ValueError(f"{who}: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")


class LSSLKernel(nnx.Module):
  """LSSL kernel module (the protocol of `ssm.lti_mixer`): HiPPO (A, B), per-feature dt.

  Args:
    d_model: h, number of features (independent SSMs).
    d_state: N, HiPPO order.
    channels: c, output maps C per feature.
    l_max: longest kernel the module may be asked for (None: no limit).
    measure: HiPPO measure ("legs", "legt", "lagt", "fourier").
    dt_min, dt_max: range of the log-uniform dt initialisation.
    learn: "none" (A, B fixed, the repo's default), "shared" or "per_feature".
    disc: discretisation method ("bilinear" default, "zoh", "forward_euler",
      "backward_euler").
  """

  def __init__(self, d_model: int, *, d_state: int = 64, channels: int = 1,
               l_max: int | None = None, measure: str = "legs", dt_min: float = 1e-3,
               dt_max: float = 1e-1, learn: str = "none", disc: str = "bilinear",
               rngs: nnx.Rngs):
    for name, v in (("d_model", d_model), ("d_state", d_state), ("channels", channels)):
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"LSSL: {name} must be a positive int, got {v!r}")
    if l_max is not None and (not isinstance(l_max, int) or l_max < 1):
      raise ValueError(f"LSSL: l_max must be a positive int or None, got {l_max!r}")
    if learn not in LEARN:
      raise ValueError(f"LSSL: learn must be one of {LEARN}, got {learn!r}")
    if disc not in METHODS:
      raise ValueError(f"LSSL: disc must be one of {METHODS}, got {disc!r}")
    check_dt_range(dt_min, dt_max, "LSSL")
    A, B = hippo.transition(measure, d_state)  # raises on an unknown measure
    self.d_model, self.d_state, self.channels = d_model, d_state, channels
    self.l_max, self.measure, self.learn, self.disc = l_max, measure, learn, disc
    if learn == "shared":
      self.A = SSMParam(jnp.asarray(A, jnp.float32))
      self.B = SSMParam(jnp.asarray(B, jnp.float32))
    elif learn == "per_feature":
      self.A = SSMParam(jnp.tile(jnp.asarray(A, jnp.float32), (d_model, 1, 1)))
      self.B = SSMParam(jnp.tile(jnp.asarray(B, jnp.float32), (d_model, 1)))
    self.log_dt = SSMParam(_log_uniform(rngs.params(), (d_model,), dt_min, dt_max))
    self.C = nnx.Param(jax.random.normal(rngs.params(), (channels, d_model, d_state),
                                         jnp.float32))

  def system(self):
    """Continuous (A, B, dt): A (N, N) or (h, N, N), B (N,) or (h, N), dt (h,)."""
    if self.learn == "none":
      A, B = hippo.transition(self.measure, self.d_state)
      A, B = jnp.asarray(A, jnp.float32), jnp.asarray(B, jnp.float32)
    else:
      A, B = self.A[...], self.B[...]
    return A, B, jnp.exp(self.log_dt[...])

  def discretized(self):
    """(Ab (h, N, N), Bb (h, N)) of the current parameters."""
    A, B, dt = self.system()
    return discretize(A, B, dt, self.disc)

  def __call__(self, seq_len: int) -> jax.Array:
    """Kernel K (c, h, seq_len) float32."""
    if not isinstance(seq_len, int) or seq_len < 1:
      raise ValueError(f"LSSL: seq_len must be a positive int, got {seq_len!r}")
    if self.l_max is not None and seq_len > self.l_max:
      raise ValueError(f"LSSL: sequence length {seq_len} exceeds l_max={self.l_max}")
    A, B, dt = self.system()
    return lssl_kernel(A, B, self.C[...], dt, seq_len, self.disc).astype(jnp.float32)

  def init_state(self, batch_size: int) -> "LSSLState":
    """Zero state (batch_size, h, N) float32, with (Ab, Bb) of the current parameters
    (discretised once here, not per step; make a new state after changing them)."""
    Ab, Bb = self.discretized()
    return LSSLState(jnp.zeros((batch_size, self.d_model, self.d_state), jnp.float32), Ab, Bb)

  def step(self, state: "LSSLState", u_t: jax.Array) -> tuple["LSSLState", jax.Array]:
    """state from init_state, u_t (b, h) -> (state, y_t (b, c, h)). O(H N^2)."""
    if u_t.ndim != 2 or u_t.shape[1] != self.d_model:
      raise ValueError(f"LSSL step: u_t must be (batch, {self.d_model}), got {u_t.shape}")
    if not isinstance(state, LSSLState):
      raise ValueError(f"LSSL step: state must be an LSSLState from init_state({u_t.shape[0]}), "
                       f"got {type(state).__name__}")
    want = (u_t.shape[0], self.d_model, self.d_state)
    if state.x.shape != want:
      raise ValueError(f"LSSL step: state.x must have shape {want} (batch, d_model, d_state), "
                       f"got {state.x.shape}")
    x, y = lssl_step(state.Ab, state.Bb, self.C[...], state.x, u_t.astype(jnp.float32))
    return LSSLState(x, state.Ab, state.Bb), y


# Registry factory: the kernel's and LTIMixer's options, their defaults written once in
# the two classes (`ssm.lti_mixer.lti_factory`).
make_mixer = lti_factory(
    LSSLKernel,
    """An LSSL layer: LSSLKernel inside LTIMixer (GELU, then a linear over c*h, as the repo).

    With bidirectional=True the kernel gets 2*channels output maps (forward half, backward half)
    sharing A, B and dt.""", postact="linear")
