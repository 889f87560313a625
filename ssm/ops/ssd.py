"""Mamba-2's state-space duality (SSD): a matrix state per head with a scalar decay per token.

Per head h (state S: (P, N)), with g(h) = h // (H / G) the head's group of B and C:

    S[t] = exp(dt[t, h] A[h]) S[t-1] + dt[t, h] x[t, h] B[t, g(h)]^T,   S[-1] = h0 (or 0)
    y[t, h] = S[t] C[t, g(h)] + D[h] x[t, h]

dt > 0 (the mixer's softplus(dt + dt_bias); `dt_bias` / `dt_softplus` apply it here, as
the CUDA kernels do) and A < 0, so the decay exp(dt A) lies in (0, 1). segment_ids
(b, l) int restart the state from zero wherever the id changes between neighbours
(packed documents): token t then sees only the tokens of its own run, and h0 reaches
only the first run. The final state is the state after the last token (of the last run).

Paths (impl):
  "xla"     `ssd_chunked`: the chunked matrix form (Dao & Gu 2024, `ssd_minimal`): inside
            chunks of T tokens the quadratic (attention-like) form
            Y = (C B^T o exp(segsum(dt A)) o same-run) (dt x); each chunk's end state
            passed to the next by a linear recurrence across chunks. Portable, any shape.
  "pallas"  the Mosaic GPU kernels of `ssm/ops/ssd_pallas.py` (Hopper; P, N in {64, 128};
            blocks of 64 tokens whatever chunk_size says; bf16 operands on the tensor
            cores, float32 accumulation and state; interpreted on the CPU).
  "auto"    the kernel on a Hopper GPU for the shapes it takes, else XLA; also XLA when
            full float32 products are asked for (jax.default_matmul_precision "highest"
            or "float32"): the kernel rounds float32 inputs to bf16 for the matrix units,
            a relative error of about 3e-3 (the XLA path on a GPU uses TF32 by default,
            about 1e-3).

`ssd_reference` (a sequential scan over tokens) is the obviously-right reference the
tests hold both paths to; `ssd_step` is one token of the recurrence (the mixers' step
mode). Shapes (b batch, l length, h heads, p head dim, g groups, n state):
x (b, l, h, p), dt (b, l, h), A (h,), B, C (b, l, g, n), D (h,), h0 and the state
(b, h, p, n) float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ssm._checks import check_float, check_integer, check_nonpositive, positive_int
from ssm.ops import ssd_pallas
from ssm.ops._dtypes import compute_dtype
from ssm.ops._impl import choose_impl
from ssm.ops._segments import resets, run_index
from ssm.ops.linear_scan import linear_scan

DEFAULT_CHUNK_SIZE = 64


# -- validation -------------------------------------------------------------------------

def check_ssd_args(x, dt, A, B, C, *, D=None, h0=None, segment_ids=None, dt_bias=None,
                   chunk_size=DEFAULT_CHUNK_SIZE, fn="ssd"):
  """Shapes, dtypes and sizes of an SSD call; TypeError (dtypes) or ValueError naming the
  argument otherwise."""
  check_float(fn, x=x, dt=dt, A=A, B=B, C=C, D=D, h0=h0, dt_bias=dt_bias)
  check_integer(fn, segment_ids=segment_ids)
  if x.ndim != 4:
    raise ValueError(f"{fn}: x must be (batch, length, heads, headdim), got shape {x.shape}")
  b, l, h, p = x.shape
  if l < 1:
    raise ValueError(f"{fn}: empty sequence (x {x.shape})")
  if dt.shape != (b, l, h):
    raise ValueError(f"{fn}: dt must be (batch, length, heads) = {(b, l, h)}, got {dt.shape}")
  if jnp.shape(A) != (h,):
    raise ValueError(f"{fn}: A must be (heads,) = ({h},), got shape {jnp.shape(A)}")
  if B.ndim != 4 or B.shape[:2] != (b, l) or C.shape != B.shape:
    raise ValueError(f"{fn}: B and C must both be (batch, length, groups, N) with (batch, "
                     f"length) = {(b, l)}, got {B.shape} and {C.shape}")
  g = B.shape[2]
  if g < 1 or h % g:
    raise ValueError(f"{fn}: {g} groups of B/C must divide the {h} heads")
  for name, v in (("D", D), ("dt_bias", dt_bias)):
    if v is not None and jnp.shape(v) != (h,):
      raise ValueError(f"{fn}: {name} must be (heads,) = ({h},), got shape {jnp.shape(v)}")
  if h0 is not None and h0.shape != (b, h, p, B.shape[3]):
    raise ValueError(f"{fn}: h0 must be (batch, heads, headdim, N) = {(b, h, p, B.shape[3])}, "
                     f"got {h0.shape}")
  if segment_ids is not None:
    if jnp.shape(segment_ids) != (b, l):
      raise ValueError(f"{fn}: segment_ids must be (batch, length) = {(b, l)}, got shape "
                       f"{jnp.shape(segment_ids)}")
  positive_int(fn, "chunk_size", chunk_size)
  check_nonpositive(fn, "A", A)


# -- reference and step -------------------------------------------------------------------

def ssd_step(state, x_t, dt_t, A, B_t, C_t):
  """One token. state (b, h, p, n); x_t (b, h, p); dt_t (b, h); A (h,); B_t, C_t (b, g, n).

  Returns (state, y_t (b, h, p)) without the D term.
  """
  r = x_t.shape[1] // B_t.shape[1]
  Bh = jnp.repeat(B_t, r, axis=1)                              # (b, h, n)
  Ch = jnp.repeat(C_t, r, axis=1)
  decay = jnp.exp(dt_t * A)[..., None, None]
  state = decay * state + (dt_t[..., None] * x_t)[..., None] * Bh[:, :, None, :]
  return state, jnp.sum(state * Ch[:, :, None, :], axis=-1)


def ssd_reference(x, dt, A, B, C, *, D=None, h0=None, segment_ids=None):
  """The recurrence itself, token by token (lax.scan), in float32 (float64 for float64
  inputs). Returns (y (b, l, h, p) in x's dtype, final state (b, h, p, n))."""
  check_ssd_args(x, dt, A, B, C, D=D, h0=h0, segment_ids=segment_ids, fn="ssd_reference")
  return _reference(x, dt, A, B, C, D, h0, segment_ids)


@jax.jit
def _reference(x, dt, A, B, C, D, h0, segment_ids):
  cdt = compute_dtype(x, dt, A, B, C, D, h0)
  b, l, h, p = x.shape
  n = B.shape[3]
  state = jnp.zeros((b, h, p, n), cdt) if h0 is None else h0.astype(cdt)
  keep = (jnp.ones((b, l), cdt) if segment_ids is None
          else 1.0 - resets(segment_ids).astype(cdt))
  t_major = lambda v: jnp.swapaxes(v.astype(cdt), 0, 1)

  def body(s, inputs):
    x_t, dt_t, B_t, C_t, keep_t = inputs
    s, y_t = ssd_step(s * keep_t[:, None, None, None], x_t, dt_t, A.astype(cdt), B_t, C_t)
    return s, y_t

  state, y = jax.lax.scan(body, state, tuple(map(t_major, (x, dt, B, C, keep))))
  y = jnp.swapaxes(y, 0, 1)
  if D is not None:
    y = y + D.astype(cdt)[:, None] * x.astype(cdt)
  return y.astype(x.dtype), state


# -- the chunked XLA path -------------------------------------------------------------------

def segsum(a):
  """Stable segment sums: out[..., i, j] = sum_{j < k <= i} a[..., k] (i >= j), -inf above.

  Masked copies summed with cumsum, not a difference of cumsums (which cancels
  catastrophically once the cumulative sums grow). (..., T) -> (..., T, T).
  """
  t = a.shape[-1]
  aa = jnp.broadcast_to(a[..., :, None], (*a.shape, t))         # aa[..., k, j] = a[k]
  strict = jnp.tril(jnp.ones((t, t), bool), -1)                  # k > j
  out = jnp.cumsum(jnp.where(strict, aa, 0.0), axis=-2)          # sum over j < k <= i
  return jnp.where(jnp.tril(jnp.ones((t, t), bool)), out, -jnp.inf)


def _split_heads(v, g):
  """(b, l, h, ...) -> (b, l, g, h / g, ...)."""
  return v.reshape(*v.shape[:2], g, v.shape[2] // g, *v.shape[3:])


def ssd_chunked(x, dt, A, B, C, *, D=None, h0=None, segment_ids=None,
                chunk_size: int = DEFAULT_CHUNK_SIZE):
  """The chunked SSD form (see the module docstring); any shape, differentiable by autodiff.

  Returns (y (b, l, h, p) in x's dtype, final state (b, h, p, n) float32).
  """
  check_ssd_args(x, dt, A, B, C, D=D, h0=h0, segment_ids=segment_ids, chunk_size=chunk_size,
                 fn="ssd_chunked")
  return _chunked(x, dt, A, B, C, D, h0, segment_ids, chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames="chunk_size")
def _chunked(x, dt, A, B, C, D, h0, segment_ids, *, chunk_size):
  cdt = compute_dtype(x, dt, A, B, C, D, h0)
  out_dtype = x.dtype
  xc, dt, A, B, C = (v.astype(cdt) for v in (x, dt, A, B, C))
  bsz, seq_len, h, p = xc.shape
  g, n = B.shape[2:]
  t = min(chunk_size, seq_len)
  nc = -(-seq_len // t)
  pad = nc * t - seq_len

  def chunks(v, mode="constant"):  # (b, l, ...) -> (b, c, t, ...)
    v = jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2), mode=mode)
    return v.reshape(bsz, nc, t, *v.shape[2:])

  # dt = 0 in the padding: no decay, no input.
  xdt = chunks(_split_heads(xc * dt[..., None], g))            # (b, c, t, g, r, p)
  a = chunks(_split_heads(dt * A, g))                          # (b, c, t, g, r)
  Bc, Cc = chunks(B), chunks(C)                                # (b, c, t, g, n)
  a_gr = jnp.moveaxis(a, 2, -1)                                # (b, c, g, r, t)

  if segment_ids is None:
    same = cin = tail = None
  else:
    # Runs relative to the chunk: the padding joins the last run; a pair (i, j) interacts
    # only inside one run, the state entering the chunk reaches the entering run (cin)
    # and only the chunk's last run reaches its end state (tail).
    runs = chunks(run_index(segment_ids), mode="edge")          # (b, c, t)
    entering = jnp.concatenate([runs[:, :1, :1], runs[:, :-1, -1:]], axis=1)
    same = (runs[..., :, None] == runs[..., None, :]).astype(cdt)   # (b, c, t, t)
    cin = (runs == entering).astype(cdt)                       # (b, c, t)
    tail = (runs == runs[:, :, -1:]).astype(cdt)

  # 1. within each chunk: the quadratic form.
  cb = jnp.einsum("bcign,bcjgn->bcgij", Cc, Bc)
  decay = jnp.exp(segsum(a_gr))                                # (b, c, g, r, i, j)
  if same is not None:
    decay = decay * same[:, :, None, None]
  y_diag = jnp.einsum("bcgij,bcgrij,bcjgrp->bcigrp", cb, decay, xdt)

  # 2. each chunk's contribution to its end state: decay from step j to the chunk end,
  #    sum_{j < k < t} a_k, as a shifted reversed cumsum (no cancellation).
  to_end = jnp.flip(jnp.cumsum(jnp.flip(a[:, :, 1:], 2), axis=2), 2)
  to_end = jnp.exp(jnp.concatenate([to_end, jnp.zeros_like(a[:, :, :1])], axis=2))
  if tail is not None:
    to_end = to_end * tail[..., None, None]
  states = jnp.einsum("bcjgn,bcjgr,bcjgrp->bcgrpn", Bc, to_end, xdt)

  # 3. pass states across chunks: S_c = exp(sum of chunk c's a) S_{c-1} + states_c.
  chunk_decay = jnp.exp(jnp.sum(a, axis=2))                    # (b, c, g, r)
  if cin is not None:
    chunk_decay = chunk_decay * cin[:, :, -1, None, None]
  flat = (bsz, nc, h * p * n)
  a_full = jnp.broadcast_to(chunk_decay[..., None, None], states.shape).reshape(flat)
  init = (jnp.zeros((bsz, h * p * n), cdt) if h0 is None else h0.astype(cdt).reshape(bsz, -1))
  ends = linear_scan(a_full, states.reshape(flat), init, impl="xla")     # after each chunk
  starts = jnp.concatenate([init[:, None], ends[:, :-1]], axis=1).reshape(states.shape)

  # 4. the state entering each chunk, decayed to each step and read by C.
  into = jnp.exp(jnp.cumsum(a, axis=2))                        # (b, c, t, g, r)
  if cin is not None:
    into = into * cin[..., None, None]
  y_off = jnp.einsum("bcign,bcgrpn,bcigr->bcigrp", Cc, starts, into)

  y = (y_diag + y_off).reshape(bsz, nc * t, h, p)[:, :seq_len]
  if D is not None:
    y = y + D.astype(cdt)[:, None] * xc
  return y.astype(out_dtype), ends[:, -1].reshape(bsz, h, p, n)


# -- the public op ---------------------------------------------------------------------------

def _full_f32_products() -> bool:
  """Whether jax.default_matmul_precision asks for full float32 products."""
  prec = jax.config.jax_default_matmul_precision
  return str(prec).lower() in ("highest", "float32", "precision.highest")


def _prefer_kernel() -> None:
  """ValueError when full float32 products are asked for: "auto" then keeps XLA (the
  kernel rounds float32 inputs to bf16 for the matrix units)."""
  if _full_f32_products():
    raise ValueError("ssd: jax.default_matmul_precision asks for full float32 products")


def ssd_path(impl: str, x, B, C) -> str:
  """The path `ssd` takes for these inputs: "pallas" or "xla" (module docstring).
  impl="pallas" raises ValueError for shapes or dtypes the kernel cannot take."""
  return choose_impl(impl, op="ssd", check=lambda: ssd_pallas.check_supported(x, B, C),
                     prefer=_prefer_kernel)


def ssd(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
        D: jax.Array | None = None, h0: jax.Array | None = None,
        segment_ids: jax.Array | None = None, dt_bias: jax.Array | None = None,
        dt_softplus: bool = False, return_state: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE, impl: str = "auto"):
  """Mamba-2's SSD recurrence over a whole sequence (see the module docstring).

  Args:
    x: (batch, length, heads, headdim) float32 or bf16.
    dt: (batch, length, heads) step sizes, > 0 after dt_bias / dt_softplus.
    A: (heads,) <= 0.  B, C: (batch, length, groups, N), heads % groups == 0.
    D: (heads,) skip, or None.  h0: (batch, heads, headdim, N) initial state, or None.
    segment_ids: (batch, length) int: the state restarts where the id changes.
    dt_bias: (heads,) added to dt; dt_softplus: then dt = softplus(dt) (float32).
    return_state: also return the state after the last token.
    chunk_size: chunk of the XLA path (the kernel's blocks are 64 tokens).
    impl: "auto" | "xla" | "pallas" (ValueError if the kernel cannot take the call).

  Returns:
    y (batch, length, heads, headdim) in x's dtype [and the final state (batch, heads,
    headdim, N) float32].
  """
  check_ssd_args(x, dt, A, B, C, D=D, h0=h0, segment_ids=segment_ids, dt_bias=dt_bias,
                 chunk_size=chunk_size)
  path = ssd_path(impl, x, B, C)
  if dt_bias is not None or dt_softplus:
    dt = dt.astype(compute_dtype(dt))
    if dt_bias is not None:
      dt = dt + dt_bias.astype(dt.dtype)
    if dt_softplus:
      dt = jax.nn.softplus(dt)
  if path == "pallas":
    y, state = ssd_pallas.ssd_pallas(x, dt, A, B, C, D=D, h0=h0, segment_ids=segment_ids)
  else:
    y, state = _chunked(x, dt, A, B, C, D, h0, segment_ids, chunk_size=chunk_size)
  return (y, state) if return_state else y
