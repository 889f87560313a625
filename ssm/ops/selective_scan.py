"""Mamba-1's selective scan: a diagonal SSM whose dt, B and C change per token.

For each channel d and state index n (Mamba's discretization, ZOH for A and
Euler for B):

    h[t, d, n] = exp(dt[t, d] A[d, n]) h[t-1, d, n] + dt[t, d] B[t, g(d), n] u[t, d]
    y[t, d]    = sum_n C[t, g(d), n] h[t, d, n] + D[d] u[t, d]
    y[t, d]   *= silu(z[t, d])                                  (when z is given)

with dt = softplus(delta + delta_bias) when delta_softplus, else delta + delta_bias,
and g(d) = d // (D / G) the group of channel d when B, C have G groups (channels
are group-major, as in state-spaces/mamba's selective_scan_ref).

The XLA path walks the sequence in chunks: a sequential `lax.scan` over chunks
carries the (batch, D, N) state, and inside a chunk the recurrence is an
associative scan (`ssm.ops.linear_scan.scan_with_vjp`). Only one chunk's
(batch, chunk, D, N) expansion exists at a time, also in the backward pass: the
chunk body is rematerialised (`jax.checkpoint`), as the CUDA kernel recomputes
its states in the backward pass instead of storing them.

Computed in float32 whatever the input dtype (float64 when the inputs are float64);
y has u's dtype, the state is float32. Inputs must be real floating point (integer,
bool and complex arrays are refused at the boundary).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ssm._checks import check_float, positive_int
from ssm.ops._impl import choose_impl, interpret_mode
from ssm.ops._dtypes import compute_dtype
from ssm.ops.linear_scan import scan_with_vjp

DEFAULT_CHUNK_SIZE = 128


def _as_groups(x, name, bsz, seq_len, n_state, d_inner):
  """B or C as (b, l, g, n), checking its shape against u and A."""
  if x.ndim == 3:
    x = x[:, :, None, :]
  if x.ndim != 4 or x.shape[:2] != (bsz, seq_len) or x.shape[3] != n_state:
    raise ValueError(
        f"selective_scan: {name} must be (batch, length, N) = {(bsz, seq_len, n_state)} or "
        f"(batch, length, G, N), got {x.shape}")
  if x.shape[2] < 1 or d_inner % x.shape[2]:
    raise ValueError(f"selective_scan: {name} has {x.shape[2]} groups, which must divide "
                     f"the {d_inner} channels of u")
  return x


def check_selective_scan_args(u, delta, A, B, C, D, z, delta_bias, h0, chunk_size):
  """Validate shapes; returns B and C as (b, l, g, n)."""
  if u.ndim != 3:
    raise ValueError(f"selective_scan: u must be (batch, length, D), got shape {u.shape}")
  bsz, seq_len, d_inner = u.shape
  if seq_len < 1:
    raise ValueError(f"selective_scan: empty sequence (u {u.shape})")
  if delta.shape != u.shape:
    raise ValueError(f"selective_scan: delta must have u's shape {u.shape}, got {delta.shape}")
  if z is not None and z.shape != u.shape:
    raise ValueError(f"selective_scan: z must have u's shape {u.shape}, got {z.shape}")
  if A.ndim != 2 or A.shape[0] != d_inner:
    raise ValueError(f"selective_scan: A must be (D, N) with D = {d_inner}, got {A.shape}")
  if jnp.issubdtype(A.dtype, jnp.complexfloating):
    raise ValueError("selective_scan: A must be real (Mamba-1 uses real diagonal A)")
  check_float("selective_scan", u=u, delta=delta, A=A, B=B, C=C, D=D, z=z,
              delta_bias=delta_bias, h0=h0)
  for name, v in (("D", D), ("delta_bias", delta_bias)):
    if v is not None and v.shape != (d_inner,):
      raise ValueError(f"selective_scan: {name} must be ({d_inner},), got {v.shape}")
  n_state = A.shape[1]
  if h0 is not None and h0.shape != (bsz, d_inner, n_state):
    raise ValueError(f"selective_scan: h0 must be (batch, D, N) = {(bsz, d_inner, n_state)}, "
                     f"got {h0.shape}")
  positive_int("selective_scan", "chunk_size", chunk_size)
  return (_as_groups(B, "B", bsz, seq_len, n_state, d_inner),
          _as_groups(C, "C", bsz, seq_len, n_state, d_inner))


def _spread(x_blgn, d_inner):
  """(b, l, g, n) -> (b, l, D, n), channel d reading group d // (D / g)."""
  return jnp.repeat(x_blgn, d_inner // x_blgn.shape[2], axis=2)


def _chunk(A_dn, h_bdn, u_bld, dt_bld, B_blgn, C_blgn):
  """One chunk of the recurrence: state in, (state out, C.h) for each step."""
  d_inner = u_bld.shape[-1]
  dA = jnp.exp(dt_bld[..., None] * A_dn)                              # (b, l, d, n)
  dBu = (dt_bld * u_bld)[..., None] * _spread(B_blgn, d_inner)        # (b, l, d, n)
  h = scan_with_vjp(dA, dBu, h_bdn, None)
  # Elementwise product + sum, not einsum: exact f32 on every backend (no TF32).
  y = jnp.sum(h * _spread(C_blgn, d_inner), axis=-1)                  # (b, l, d)
  return h[:, -1], y


def selective_scan_xla(u, dt, A, B, C, h0, chunk_size):
  """The recurrence in float32. u, dt (b, l, d); A (d, n); B, C (b, l, g, n); h0 (b, d, n).

  Returns (C.h without the D term (b, l, d), last state (b, d, n)).
  """
  bsz, seq_len, d_inner = u.shape
  if seq_len <= chunk_size:
    h_last, y = _chunk(A, h0, u, dt, B, C)
    return y, h_last
  n_chunks = -(-seq_len // chunk_size)
  pad = n_chunks * chunk_size - seq_len

  def to_chunks(x):  # (b, l, ...) -> (nc, b, cs, ...); dt = 0 in the padding keeps the state
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(bsz, n_chunks, chunk_size, *x.shape[2:]), 1, 0)

  body = jax.checkpoint(lambda h, xs: _chunk(A, h, *xs), prevent_cse=False)
  h_last, y = lax.scan(body, h0, tuple(map(to_chunks, (u, dt, B, C))))
  y = jnp.moveaxis(y, 0, 1).reshape(bsz, n_chunks * chunk_size, d_inner)[:, :seq_len]
  return y, h_last


def selective_scan(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array,
                   C: jax.Array, D: jax.Array | None = None, *, z: jax.Array | None = None,
                   delta_bias: jax.Array | None = None, delta_softplus: bool = False,
                   h0: jax.Array | None = None, return_state: bool = False,
                   chunk_size: int = DEFAULT_CHUNK_SIZE, impl: str = "auto"):
  """Mamba-1's selective scan (see the module docstring for the recurrence).

  Args:
    u, delta: (batch, length, D) input and step sizes (before bias/softplus).
    A: (D, N) real, usually negative (A = -exp(A_log)).
    B, C: (batch, length, N), or (batch, length, G, N) with D % G == 0.
    D: (D,) skip connection, or None.
    z: (batch, length, D) gate: y * silu(z), or None.
    delta_bias: (D,) added to delta before the softplus, or None.
    delta_softplus: apply softplus to delta (+ bias).
    h0: (batch, D, N) initial state, zeros when None.
    return_state: also return the last state.
    chunk_size: steps per chunk (bounds the (batch, chunk, D, N) working set).
    impl: "auto" (the Pallas kernel on a Hopper GPU when it takes the inputs, else
      XLA), "xla" or "pallas" (ssm/ops/selective_scan_pallas.py: N in {4, 8, 16}, each group
      of channels a multiple of 128, float32/bfloat16; chunk_size does not apply).

  Returns:
    y (batch, length, D) with u's dtype; and, when return_state, the last state
    (batch, D, N) float32.
  """
  B, C = check_selective_scan_args(u, delta, A, B, C, D, z, delta_bias, h0, chunk_size)
  from ssm.ops import selective_scan_pallas as kernel  # pylint: disable=import-outside-toplevel
  path = choose_impl(impl, op="selective_scan", check=lambda: kernel.check_supported(u, A, B))
  if path == "pallas":
    y, last = kernel.selective_scan_pallas(
        u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        h0=h0, interpret=interpret_mode())
    return (y, last) if return_state else y
  return _selective_scan(u, delta, A, B, C, D, z, delta_bias, h0,
                         delta_softplus=delta_softplus, return_state=return_state,
                         chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("delta_softplus", "return_state", "chunk_size"))
def _selective_scan(u, delta, A, B, C, D, z, delta_bias, h0, *, delta_softplus, return_state,
                    chunk_size):
  # float32 whatever the activation dtype (float64 only when the inputs are, for tests).
  cdt = compute_dtype(u, delta, A, B, C)
  uc = u.astype(cdt)
  dt = delta.astype(cdt)
  if delta_bias is not None:
    dt = dt + delta_bias.astype(cdt)
  if delta_softplus:
    dt = jax.nn.softplus(dt)
  if h0 is None:
    h0 = jnp.zeros((u.shape[0], u.shape[2], A.shape[1]), cdt)
  y, h_last = selective_scan_xla(uc, dt, A.astype(cdt), B.astype(cdt), C.astype(cdt),
                                 h0.astype(cdt), chunk_size)
  if D is not None:
    y = y + D.astype(cdt) * uc
  if z is not None:
    y = y * jax.nn.silu(z.astype(cdt))
  y = y.astype(u.dtype)
  return (y, h_last) if return_state else y
