"""Mamba-2: the SSD (state-space duality) block (Dao & Gu 2024; state-spaces/mamba
`modules/mamba2.py`, `modules/ssd_minimal.py`).

    [z, xBC, dt] = in_proj(u)          z (b, l, d_inner), xBC (b, l, d_inner + 2 G N), dt (b, l, H)
    [x, B, C]    = silu(causal depthwise conv_4(xBC))   x (b, l, H, P), B, C (b, l, G, N)
    dt           = softplus(dt + dt_bias);  A = -exp(A_log)   (one scalar per head)
    h_t          = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T        (H, P, N) per token
    y_t          = h_t C_t + D x_t
    out          = out_proj(RMSNorm_grouped(y * silu(z)))

H = d_inner / headdim heads; head i reads the B/C group i // (H / G); the gated
RMSNorm normalises each of the G groups of d_inner / G channels (the reference's
`RMSNormGated(group_size=d_inner // ngroups)`, eps 1e-5, norm after the gate).

The convolution + silu is `ssm.ops.causal_conv1d` (a Mosaic GPU kernel on Hopper when the
channels are a multiple of 128, the XLA shifted sum elsewhere). The SSM is `ssm.ops.ssd`
(the chunked matrix form in XLA, or the Pallas kernel on a Hopper GPU: `impl`), with the D
skip, dt_bias and the softplus of dt inside the op; `segment_ids` (packed documents) restart
the SSM state and the convolution window where the id changes. The step mode runs
`ssm.ops.ssd.ssd_step`, one token of the recurrence.

Sequence parallelism: `seq_mesh=mesh` (a jax.sharding.Mesh with an axis `seq_axis`, default
"seq") runs the SSD through `ssm.ops.seq_parallel.ssd_seq_parallel`, the length split over
that axis, and the depthwise convolution through `depthwise_conv_seq_parallel` (its window
crosses the chunk boundaries: each device gets the previous chunk's last d_conv - 1 inputs);
the projections and norm are left to GSPMD under the caller's jit and input sharding.

Memory caching (`memory_caching=dict(segment_size=..., ...)`, see `ssm.memory_caching`):
SSD is a linear memory with heads = H, dk = N, dv = P, q = C_t, k = B_t, v = dt_t x_t
and scalar log-decay dt_t A_h; `cached_memory_read` / `cached_memory_step` replace the
plain read and step. On the kernel path the online read and every segment's end state
come from `ssm.ops.ssd` (`ssd_segment_reads`: one or two kernel calls over the segments
as a batch). Gated variants use a learned gate token u_t = W_u u (d_model -> N) against
the segment means of B_t.

Init as the reference: A_log = log U[1, 16], D = 1, dt_bias = softplus^-1 of a
log-uniform dt in [dt_min, dt_max]; all three are float32 `NoDecayParam`s (the
reference excludes them from weight decay). Defaults here are d_state 64 and
chunk 64 (the paper uses 128 and 256): the CPU tests and small models stay fast;
pass d_state=128, chunk_size=256 for the paper's layer.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ssm import memory_caching as mcache
from ssm._checks import positive_int
from ssm.mamba import (MambaState, causal_depthwise_conv, conv_impl, conv_init, conv_step,
                       dt_bias_init)
from ssm.mixer import Mixer, cached_memory
from ssm.ops import causal_conv1d, ssd
from ssm.ops._impl import check_impl
from ssm.ops.seq_parallel import check_seq_mesh, depthwise_conv_seq_parallel, ssd_seq_parallel
from ssm.ops.ssd import ssd_path, ssd_step
from ssm.params import NoDecayParam

RMS_EPS = 1e-5


# -- SSD with memory caching on the kernel ------------------------------------------

def ssd_segment_reads(x, dt, A, B, C, *, segment_size: int, state_init: str, impl: str):
  """The online read of memory caching for SSD, through `ssm.ops.ssd`: the memory's own
  output at every token (no D term) and its state at every segment's end, the latter in
  memory caching's (dk, dv) = (N, P) orientation.

  The sequence is cut into segments of `segment_size` tokens run as a batch (the
  padding of the last one has dt = 0: it neither adds to nor decays the state).
  "restart": one call from zero states gives both. "checkpoint": that call's end states
  R_s and each segment's total decay chain the entering states
  (`ssm.memory_caching.entering_states`), and a second call from them gives the outputs.
  x (b, l, h, p), dt (b, l, h) > 0, A (h,), B, C (b, l, g, n) ->
  y (b, l, h, p), states (b, ceil(l / segment_size), h, n, p), float32.
  """
  b, l, h, p = x.shape
  S = segment_size
  n_seg = -(-l // S)
  pad = n_seg * S - l
  seg = lambda v: jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2)).reshape(
      b * n_seg, S, *v.shape[2:])
  xs, dts, Bs, Cs = seg(x), seg(dt), seg(B), seg(C)
  run = functools.partial(ssd, return_state=True, chunk_size=min(S, 64), impl=impl)
  y, ends = run(xs, dts, A, Bs, Cs)                          # from zero states
  if state_init == "checkpoint":
    decay = jnp.exp(jnp.sum(dts.astype(jnp.float32) * A, axis=1)).reshape(b, n_seg, h)
    starts = mcache.entering_states(ends.reshape(b, n_seg, *ends.shape[1:]),
                                    decay[..., None, None])
    y, ends = run(xs, dts, A, Bs, Cs, h0=starts.reshape(ends.shape))
  y = y.reshape(b, n_seg * S, h, p)[:, :l]
  return y, jnp.swapaxes(ends.reshape(b, n_seg, h, p, -1), -1, -2)


def gated_rms_norm(y, z, weight, groups, eps=RMS_EPS):
  """RMSNorm(y * silu(z)) over each of `groups` equal slices of the last axis, times weight;
  computed in float32 (or wider), returned in y's dtype."""
  out_dtype = y.dtype
  cdt = jnp.result_type(jnp.float32, y, z)
  y = y.astype(cdt) * jax.nn.silu(z.astype(cdt))
  yg = y.reshape(*y.shape[:-1], groups, y.shape[-1] // groups)
  yg = yg * jax.lax.rsqrt(jnp.mean(yg * yg, axis=-1, keepdims=True) + eps)
  return (yg.reshape(y.shape) * weight).astype(out_dtype)


# -- the layer ------------------------------------------------------------------------

class Mamba2State(MambaState):
  """Recurrent state of `Mamba2` (MambaState's fields): conv (b, d_inner + 2 G N,
  d_conv - 1), ssm (b, H, P, N); with memory caching, ssm is None and mc holds the
  `MemoryCacheState`."""
  __slots__ = ()


class Mamba2(Mixer):
  """The Mamba-2 mixer: (b, l, d_model) -> (b, l, d_model). See the module docstring; the
  call, state and step contract is `ssm.mixer.Mixer`'s."""

  name = "Mamba2"
  takes_segments = True

  def __init__(self, d_model: int, *, d_state: int = 64, headdim: int = 64, expand: int = 2,
               ngroups: int = 1, d_conv: int = 4, chunk_size: int = 64,
               dt_min: float = 1e-3, dt_max: float = 1e-1, A_init_range=(1.0, 16.0),
               memory_caching: dict | None = None, impl: str = "auto",
               dtype: str | None = None, param_dtype: str = "float32", seq_mesh=None,
               seq_axis: str = "seq", rngs: nnx.Rngs):
    for name, v in (("d_model", d_model), ("d_state", d_state), ("headdim", headdim),
                    ("expand", expand), ("ngroups", ngroups), ("d_conv", d_conv),
                    ("chunk_size", chunk_size)):
      positive_int("Mamba2", name, v)
    d_inner = expand * d_model
    if d_inner % headdim:
      raise ValueError(f"Mamba2: headdim={headdim} must divide d_inner = expand * d_model "
                       f"= {d_inner}")
    nheads = d_inner // headdim
    if nheads % ngroups:
      raise ValueError(f"Mamba2: ngroups={ngroups} must divide the {nheads} heads")
    lo, hi = A_init_range
    if not 0 < lo <= hi:
      raise ValueError(f"Mamba2: A_init_range must satisfy 0 < lo <= hi, got {A_init_range}")
    check_impl("Mamba2", impl)
    self._precision(dtype, param_dtype)
    memory_caching = mcache.memory_caching_config(memory_caching)  # fails before any parameter
    self.seq_mesh, self.seq_axis = check_seq_mesh("Mamba2", seq_mesh, seq_axis, memory_caching)
    self.d_model, self.d_inner, self.d_state, self.d_conv = d_model, d_inner, d_state, d_conv
    self.headdim, self.nheads, self.ngroups = headdim, nheads, ngroups
    self.chunk_size, self.impl = chunk_size, impl
    self.conv_dim = d_inner + 2 * ngroups * d_state

    self.in_proj = self.dense(d_model, d_inner + self.conv_dim + nheads, use_bias=False,
                              rngs=rngs)
    self.conv_w = nnx.Param(conv_init(rngs.params(), (d_conv, self.conv_dim), d_conv))
    self.conv_b = nnx.Param(conv_init(rngs.params(), (self.conv_dim,), d_conv))
    self.dt_bias = NoDecayParam(dt_bias_init(rngs.params(), (nheads,), dt_min, dt_max))
    a = jax.random.uniform(rngs.params(), (nheads,), jnp.float32, lo, hi)
    self.A_log = NoDecayParam(jnp.log(a))
    self.D = NoDecayParam(jnp.ones((nheads,), jnp.float32))
    self.norm_w = nnx.Param(jnp.ones((d_inner,), jnp.float32))
    self.out_proj = self.dense(d_inner, d_model, use_bias=False, rngs=rngs)
    # Memory caching: one gate token of N per position, scored against the B_t (the keys).
    self.memory = cached_memory(memory_caching, d_model, gate_heads=1, gate_dim=d_state,
                                rngs=rngs)

  def flops_per_token(self, seq_len: int) -> float:
    """The depthwise convolution (2 K conv_dim) and SSD's chunked form at chunk Q: per
    group C B^T within the chunk (2 Q N), per head the masked scores times X (2 Q P), the
    chunk state B^T X and its read C S (4 N P)."""
    q = min(self.chunk_size, seq_len)
    n, p = self.d_state, self.headdim
    return (2.0 * self.d_conv * self.conv_dim + 2.0 * q * n * self.ngroups
            + self.nheads * (2.0 * q * p + 4.0 * n * p))

  # -- shared pieces -------------------------------------------------------------------
  def _split_in(self, zxbcdt):
    d, c = self.d_inner, self.conv_dim
    return zxbcdt[..., :d], zxbcdt[..., d:d + c], zxbcdt[..., d + c:]

  def _split_xbc(self, xbc):
    """(..., conv_dim) -> x (..., H, P), B, C (..., G, N)."""
    d, gn = self.d_inner, self.ngroups * self.d_state
    lead = xbc.shape[:-1]
    return (xbc[..., :d].reshape(*lead, self.nheads, self.headdim),
            xbc[..., d:d + gn].reshape(*lead, self.ngroups, self.d_state),
            xbc[..., d + gn:].reshape(*lead, self.ngroups, self.d_state))

  def _tail(self, y, z, dtype):
    """y (..., H, P) SSM output with the D skip -> (..., d_model)."""
    y = y.reshape(*y.shape[:-2], self.d_inner)
    y = gated_rms_norm(y, z, self.norm_w[...], self.ngroups)
    return self.out_proj(self.compute(y)).astype(dtype)

  # -- parallel mode ---------------------------------------------------------------------
  def forward(self, x, *, mask, deterministic, segment_ids):
    """x (b, l, d_model) -> (b, l, d_model). No dropout; padded rows are zero already.

    segment_ids (b, l) int: packed documents; the SSM state and the depthwise
    convolution's window restart where the id changes (the reference's seq_idx), so each
    document's output is that of the document alone.
    """
    del mask, deterministic
    f32 = jnp.float32
    z, xbc, dt = self._split_in(self.in_proj(x))
    # The convolution + silu (ssm.ops.causal_conv1d) reads xbc in the compute dtype, sums
    # its taps in float32 and returns xbc's dtype for SSD (bf16 operands, float32
    # accumulation). On a Hopper GPU it is a kernel: in XLA the chain's layout followed the
    # weight-gradient reduction (transposes of (b, c, l) float32 arrays, about half of the
    # LM train step on an H200 at B 16, L 2048, d_model 768). Under sequence parallelism:
    # an explicit halo around the XLA convolution (GSPMD's own split gave wrong gradients).
    w, bias = self.conv_w[...].astype(f32), self.conv_b[...].astype(f32)
    if self.seq_mesh is None:
      xbc = causal_conv1d(xbc, w, bias, segment_ids=segment_ids, activation="silu",
                          impl=conv_impl(self.impl))
    else:
      xbc = jax.nn.silu(depthwise_conv_seq_parallel(
          causal_depthwise_conv, xbc, w, bias, segment_ids, mesh=self.seq_mesh,
          seq_axis=self.seq_axis))
    xs, B, C = self._split_xbc(xbc.astype(self.dtype or f32))
    A = -jnp.exp(self.A_log[...])
    if self.memory is None:
      run = (ssd if self.seq_mesh is None else functools.partial(
          ssd_seq_parallel, mesh=self.seq_mesh, seq_axis=self.seq_axis))
      y = run(xs, dt.astype(f32), A, B, C, D=self.D[...], segment_ids=segment_ids,
              dt_bias=self.dt_bias[...], dt_softplus=True, chunk_size=self.chunk_size,
              impl=self.impl)
    else:
      dt = jax.nn.softplus(dt.astype(f32) + self.dt_bias[...])               # (b, l, H)
      y = self._cached_read(x, xs, dt, A, B, C) + self.D[...][:, None] * xs
    return self._tail(y, z, x.dtype)

  def _qk(self, C, B):
    """Queries and keys per head: (..., G, N) -> (..., 1 or H, N)."""
    r = self.nheads // self.ngroups
    return tuple(jnp.repeat(v, r, axis=-2) if self.ngroups > 1 else v for v in (C, B))

  def _cached_read(self, u, x, dt, A, B, C):
    """SSD as a linear memory (heads = H, dk = N, dv = P) read through memory caching;
    on the kernel path the online read and the segment states come from `ssm.ops.ssd`
    (`ssd_segment_reads`), else from memory caching's own chunked recurrence."""
    q, k = self._qk(C, B)
    online, config = None, self.memory.config
    if ssd_path(self.impl, x, B, C) == "pallas":
      online = ssd_segment_reads(x, dt, A, B, C, segment_size=config.segment_size,
                                 state_init=config.state_init, impl=self.impl)
    return self.memory.read(u, q, k, dt[..., None] * x, dt * A, chunk_size=self.chunk_size,
                            online=online)

  # -- recurrent mode ----------------------------------------------------------------------
  def _init_state(self, batch_size: int, max_len: int | None) -> Mamba2State:
    """Zero state for `step`.

    With memory caching the SSM state lives in `mc` (its online memory, (b, H, N, P))
    and the cache holds enough segments for max_len tokens (default: max_segments).
    """
    conv = jnp.zeros((batch_size, self.conv_dim, self.d_conv - 1), jnp.float32)
    if self.memory is None:
      ssm = jnp.zeros((batch_size, self.nheads, self.headdim, self.d_state), jnp.float32)
      return Mamba2State(conv, ssm)
    return Mamba2State(conv, None, self.memory.init_state(
        batch_size, self.nheads, self.d_state, self.headdim,
        key_heads=1 if self.ngroups == 1 else self.nheads, max_len=max_len))

  def _step(self, state: Mamba2State, x_t: jax.Array) -> tuple[Mamba2State, jax.Array]:
    """One token: x_t (b, d_model) -> (state, y_t (b, d_model))."""
    f32 = jnp.float32
    z, xbc, dt = self._split_in(self.in_proj(x_t))
    conv, xbc = conv_step(state.conv, xbc.astype(f32), self.conv_w[...], self.conv_b[...])
    x, B, C = self._split_xbc(jax.nn.silu(xbc))
    dt = jax.nn.softplus(dt.astype(f32) + self.dt_bias[...])
    A = -jnp.exp(self.A_log[...])
    if self.memory is None:
      ssm, y = ssd_step(state.ssm, x, dt, A, B, C)
      new_state = Mamba2State(conv, ssm)
    else:
      q, k = self._qk(C, B)
      mc_state, y = self.memory.step(state.mc, x_t, q, k, dt[..., None] * x, dt * A)
      new_state = Mamba2State(conv, None, mc_state)
    return new_state, self._tail(y + self.D[...][:, None] * x, z, x_t.dtype)


# Registry factory for kind "mamba2": the class itself, so its options and defaults are
# written once (models.registry reads them off the signature).
make_mixer = Mamba2
