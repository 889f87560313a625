"""First-order linear recurrences by parallel (associative) scan.

    h[t] = a[t] * h[t-1] + b[t],    h[-1] = h0 (or 0)          (elementwise)

The pairs (a[t], b[t]) compose associatively: applying (a0, b0) then (a1, b1)
is (a1 a0, a1 b0 + b1), so `jax.lax.associative_scan` computes every h[t] in
O(log L) depth. Real and complex inputs.

Chunked mode (chunk_size < L) bounds the working set for long sequences: an
associative scan inside each chunk, and a sequential loop over chunks that
carries the last state of one chunk into the next (a shorter last chunk when
chunk_size does not divide L).

Gradients come from a custom VJP: the adjoint of a linear recurrence is the same
recurrence run backwards in time,

    lam[t] = g[t] + a[t+1] * lam[t+1],   db[t] = lam[t],
    da[t] = lam[t] * h[t-1],             dh0 = a[0] * lam[0],

(JAX's VJP transposes, it does not conjugate, so the complex case has the same
form), which needs only a and h as residuals, not the scan tree's intermediates.

Computed in float32 (complex64) or wider whatever the input dtype; h has the
dtype of a * b, the final state the compute dtype (states are float32).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ssm._checks import check_float, optional_positive_int
from ssm.ops._dtypes import compute_dtype
from ssm.ops._impl import choose_impl, interpret_mode


def _combine(first, second):
  """(a0, b0) then (a1, b1) -> (a1 a0, a1 b0 + b1)."""
  a0, b0 = first
  a1, b1 = second
  return a1 * a0, a1 * b0 + b1


def assoc_scan(a, b, h0=None):
  """Inclusive scan over axis 1 in one piece: h[t] = a[t] h[t-1] + b[t], h[-1] = h0 or 0.

  a, b (b, l, ...), a broadcastable against b past the first two axes (a per-head decay
  over (dk, dv) states: lightning attention's blocks, memory caching's chunks and
  segments); h0 (b, ...) -> h (b, l, ...).
  """
  a = jnp.broadcast_to(a, b.shape[:2] + a.shape[2:])
  if h0 is not None:
    b = b.at[:, 0].add(a[:, 0] * h0)
  _, h = lax.associative_scan(_combine, (a, b), axis=1)
  return h


def chunked_scan(a, b, h0=None, chunk_size=None):
  """As `assoc_scan`, in chunks of chunk_size along axis 1 (None: one chunk).

  A sequential loop over the whole chunks slices its inputs and writes its
  outputs in place (no transposed copies); a shorter last chunk is scanned after it.
  """
  bsz, seq_len = a.shape[:2]
  if chunk_size is None or chunk_size >= seq_len:
    return assoc_scan(a, b, h0)
  n_full = seq_len // chunk_size
  if h0 is None:
    h0 = jnp.zeros((bsz, *a.shape[2:]), b.dtype)

  def body(i, carry):
    h_prev, out = carry
    start = i * chunk_size
    h = assoc_scan(lax.dynamic_slice_in_dim(a, start, chunk_size, axis=1),
                   lax.dynamic_slice_in_dim(b, start, chunk_size, axis=1), h_prev)
    return h[:, -1], lax.dynamic_update_slice_in_dim(out, h, start, axis=1)

  h_last, out = lax.fori_loop(0, n_full, body, (h0.astype(b.dtype), jnp.zeros_like(b)))
  tail = n_full * chunk_size
  if tail < seq_len:
    out = lax.dynamic_update_slice_in_dim(out, assoc_scan(a[:, tail:], b[:, tail:], h_last),
                                          tail, axis=1)
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def scan_with_vjp(a, b, h0, chunk_size):
  """Forward recurrence over axis 1 with the reverse-scan VJP. h0 (b, ...) is required."""
  return chunked_scan(a, b, h0, chunk_size)


def _scan_fwd(a, b, h0, chunk_size):
  h = chunked_scan(a, b, h0, chunk_size)
  return h, (a, h, h0)


def _scan_bwd(chunk_size, res, g):
  a, h, h0 = res
  # lam[t] = g[t] + a[t+1] lam[t+1]: the same recurrence on time-reversed inputs.
  a_next = jnp.concatenate([a[:, 1:], jnp.zeros_like(a[:, :1])], axis=1)
  lam = chunked_scan(jnp.flip(a_next, 1), jnp.flip(g, 1), None, chunk_size)
  lam = jnp.flip(lam, 1)
  h_prev = jnp.concatenate([h0[:, None].astype(h.dtype), h[:, :-1]], axis=1)
  return lam * h_prev, lam, (a[:, 0] * lam[:, 0]).astype(h0.dtype)


scan_with_vjp.defvjp(_scan_fwd, _scan_bwd)


def check_linear_scan_args(a, b, h0, chunk_size):
  check_float("linear_scan", complex_ok=True, a=a, b=b, h0=h0)  # ints would give int states
  if a.ndim != 3:
    raise ValueError(f"linear_scan: a must be (batch, length, features), got shape {a.shape}")
  if a.shape[1] < 1:
    raise ValueError(f"linear_scan: empty sequence (shape {a.shape})")
  if b.shape != a.shape:
    raise ValueError(f"linear_scan: a and b must have the same shape, got {a.shape} and {b.shape}")
  if h0 is not None and h0.shape != (a.shape[0], a.shape[2]):
    raise ValueError(f"linear_scan: h0 must be (batch, features) = {(a.shape[0], a.shape[2])}, "
                     f"got {h0.shape}")
  optional_positive_int("linear_scan", "chunk_size", chunk_size)


def linear_scan(a: jax.Array, b: jax.Array, h0: jax.Array | None = None, *,
                reverse: bool = False, chunk_size: int | None = None,
                return_state: bool = False, impl: str = "auto"):
  """h[t] = a[t] * h[t-1] + b[t] along the length axis.

  Args:
    a, b: (batch, length, features), real or complex floating point (a real and b
      complex is fine); integer and bool inputs are refused (TypeError).
    h0: (batch, features) initial state (h[-1]); zeros when None.
    reverse: run from the end: h[t] = a[t] * h[t+1] + b[t], h[length] = h0.
    chunk_size: scan in chunks of this many steps (memory bounded for long
      sequences); None scans the whole length at once.
    return_state: also return the final state (h[length-1], or h[0] when reverse).
    impl: "auto" (the Pallas kernel on a Hopper GPU when it takes the inputs, else
      XLA), "xla" or "pallas" (ssm/ops/linear_scan_pallas.py: features a multiple of 128,
      float32/bfloat16/complex64; chunk_size does not apply to it).

  Returns:
    h (batch, length, features) with the dtype of a * b; and, when return_state,
    the final state (batch, features) in float32/complex64 (or wider).
  """
  check_linear_scan_args(a, b, h0, chunk_size)
  from ssm.ops import linear_scan_pallas as kernel  # pylint: disable=import-outside-toplevel
  path = choose_impl(impl, op="linear_scan", check=lambda: kernel.check_supported(a, b))
  if path == "pallas":
    h, last = kernel.linear_scan_pallas(a, b, h0, reverse=reverse, interpret=interpret_mode())
    return (h, last) if return_state else h
  return _linear_scan(a, b, h0, reverse=reverse, chunk_size=chunk_size,
                      return_state=return_state)


@functools.partial(jax.jit, static_argnames=("reverse", "chunk_size", "return_state"))
def _linear_scan(a, b, h0, *, reverse, chunk_size, return_state):
  out_dtype = jnp.result_type(a, b)
  dtype = compute_dtype(a, b, h0)
  a, b = a.astype(dtype), b.astype(dtype)
  h0 = jnp.zeros((a.shape[0], a.shape[2]), dtype) if h0 is None else h0.astype(dtype)
  if reverse:
    a, b = jnp.flip(a, 1), jnp.flip(b, 1)
  h = scan_with_vjp(a, b, h0, chunk_size)
  last = h[:, -1]
  if reverse:
    h = jnp.flip(h, 1)
  h = h.astype(out_dtype)
  return (h, last) if return_state else h
