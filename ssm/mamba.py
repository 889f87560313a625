"""Mamba-1: the selective state-space block (Gu & Dao 2023; state-spaces/mamba
`modules/mamba_simple.py`).

    [x, z] = in_proj(u)                          (b, l, 2 d_inner), d_inner = expand * d_model
    x      = silu(causal depthwise conv_4(x))
    [dt_low, B, C] = x_proj(x)                   dt_low (b, l, dt_rank), B, C (b, l, N)
    dt     = softplus(W_dt dt_low + b_dt)        (b, l, d_inner)
    A      = -exp(A_log)                         (d_inner, N)
    h_t    = exp(dt_t A) h_{t-1} + dt_t B_t x_t  (d_inner, N) per token
    y_t    = C_t . h_t + D x_t
    out    = out_proj(y * silu(z))

Init as the reference: dt = exp(U[log dt_min, log dt_max]) clamped >= 1e-4 and
b_dt = softplus^-1(dt); W_dt ~ U(+-dt_rank^-1/2); A_log[d, n] = log(n + 1)
(S4D-real); D = 1; depthwise conv weights and bias ~ U(+-1/sqrt(d_conv)) (PyTorch's
Conv1d default). A_log and D are `NoDecayParam`s in float32. The dense projections
use Flax's default init (the reference model re-initialises them at the LM level).

The convolution + silu is `ssm.ops.causal_conv1d` (a Mosaic GPU kernel on Hopper,
see `conv_impl`; `causal_depthwise_conv`, its XLA path, is re-exported here).

Modes: parallel `__call__` (ssm.ops.selective_scan, chunked) and recurrent
`init_state` / `step`, one token at a time. The step state is a `MambaState`:
the last d_conv - 1 conv inputs (b, d_inner, d_conv - 1) and the SSM state
(b, d_inner, N), both float32.

Sequence parallelism: `seq_mesh=mesh` (a jax.sharding.Mesh with an axis `seq_axis`, default
"seq") runs the scan through `ssm.ops.seq_parallel.selective_scan_seq_parallel`, the length
split over that axis, and the depthwise convolution through
`ssm.ops.seq_parallel.depthwise_conv_seq_parallel` (each device gets the previous chunk's
last d_conv - 1 inputs); the projections are left to GSPMD under the caller's jit.

Memory caching (`memory_caching=dict(segment_size=..., variant="gated", top_k=None,
state_init="checkpoint", max_segments=64)`, see `ssm.memory_caching`): the SSM is
read as a linear memory with one head per channel, q = C_t, k = B_t (shared by all
channels), v = dt_t x_t (dv = 1) and per-(channel, state) log-decay dt_t A, so
S_t = h_t; `cached_memory_read` replaces the selective scan and
`cached_memory_step` the recurrence (the online memory is then the SSM state). The online
read and the segment states still come from the selective scan, run over the segments as
one batch (`selective_segment_reads`: the kernel on a GPU, no (b, l, d, N) states). The
gated variants score segments with a learned gate token u_t = W_u u (d_model -> N)
against the mean of the segment's B_t. With one segment covering the sequence (and
state_init="checkpoint") the layer is exactly Mamba.
"""

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ssm import memory_caching as mcache
from ssm._checks import positive_int
from ssm.mixer import Mixer, cached_memory
from ssm.ops import causal_conv1d, selective_scan
from ssm.ops.causal_conv import causal_depthwise_conv  # noqa: F401  (the XLA path, re-exported)
from ssm.ops._impl import check_impl
from ssm.ops.selective_scan import DEFAULT_CHUNK_SIZE
from ssm.ops.seq_parallel import (check_seq_mesh, depthwise_conv_seq_parallel,
                                  selective_scan_seq_parallel)
from ssm.params import NoDecayParam

# -- pure functions shared with Mamba-2 ------------------------------------------

def dt_bias_init(key, shape, dt_min=1e-3, dt_max=1e-1, dt_floor=1e-4):
  """b_dt with softplus(b_dt) = dt ~ log-uniform in [dt_min, dt_max], dt >= dt_floor."""
  if not 0 < dt_min <= dt_max:
    raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
  log_dt = jax.random.uniform(key, shape, jnp.float32, math.log(dt_min), math.log(dt_max))
  dt = jnp.maximum(jnp.exp(log_dt), dt_floor)
  return dt + jnp.log(-jnp.expm1(-dt))  # softplus^-1(dt)


def conv_step(window_bdk, x_bd, w_kd, bias_d):
  """One step of `causal_depthwise_conv`.

  window_bdk: the previous K - 1 inputs, oldest first (b, d, K - 1); x_bd: (b, d).
  Returns (new window, y (b, d)).
  """
  full = jnp.concatenate([window_bdk, x_bd[..., None].astype(window_bdk.dtype)], axis=-1)
  y = jnp.einsum("bdk,kd->bd", full, w_kd, precision="highest") + bias_d
  return full[..., 1:], y


def conv_impl(impl: str, seq_mesh=None) -> str:
  """The depthwise convolution's path for a layer's `impl`: "xla" stays XLA; "auto" and
  "pallas" (a request for the scan kernels) take the conv kernel where it fits the shape
  ("auto": a Hopper GPU, channels a multiple of 128). Under sequence parallelism the
  length is sharded: the layers run the XLA convolution behind an explicit halo."""
  return "xla" if impl == "xla" or seq_mesh is not None else "auto"


def conv_init(key, shape, width):
  """PyTorch's Conv1d default for a depthwise conv: U(+-1/sqrt(fan_in)), fan_in = width."""
  bound = 1.0 / math.sqrt(width)
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


# -- the layer ----------------------------------------------------------------

class MambaState(NamedTuple):
  """Recurrent state of `Mamba`: conv (b, d_inner, d_conv - 1), ssm (b, d_inner, N).

  With memory caching, ssm is None and mc holds the `MemoryCacheState` (whose
  online memory is the SSM state, as (b, d_inner, N, 1)).
  """
  conv: jax.Array
  ssm: jax.Array | None
  mc: Any = None


class Mamba(Mixer):
  """The Mamba-1 mixer: (b, l, d_model) -> (b, l, d_model). See the module docstring; the
  call, state and step contract is `ssm.mixer.Mixer`'s."""

  name = "Mamba"

  def __init__(self, d_model: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 2,
               dt_rank: int | None = None, dt_min: float = 1e-3, dt_max: float = 1e-1,
               chunk_size: int = DEFAULT_CHUNK_SIZE, memory_caching: dict | None = None,
               impl: str = "auto", dtype: str | None = None, param_dtype: str = "float32",
               seq_mesh=None, seq_axis: str = "seq", rngs: nnx.Rngs):
    for name, v in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv),
                    ("expand", expand), ("chunk_size", chunk_size)):
      positive_int("Mamba", name, v)
    dt_rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
    positive_int("Mamba", "dt_rank", dt_rank)
    check_impl("Mamba", impl)
    self._precision(dtype, param_dtype)
    memory_caching = mcache.memory_caching_config(memory_caching)  # fails before any parameter
    self.seq_mesh, self.seq_axis = check_seq_mesh("Mamba", seq_mesh, seq_axis, memory_caching)
    d_inner = expand * d_model
    self.d_model, self.d_inner, self.d_state, self.d_conv = d_model, d_inner, d_state, d_conv
    self.dt_rank, self.chunk_size, self.impl = dt_rank, chunk_size, impl

    self.in_proj = self.dense(d_model, 2 * d_inner, use_bias=False, rngs=rngs)
    self.conv_w = nnx.Param(conv_init(rngs.params(), (d_conv, d_inner), d_conv))
    self.conv_b = nnx.Param(conv_init(rngs.params(), (d_inner,), d_conv))
    self.x_proj = self.dense(d_inner, dt_rank + 2 * d_state, use_bias=False, rngs=rngs)
    std = dt_rank ** -0.5
    # dt's projection keeps float32 weights: its bias is dt's (an SSM parameter).
    self.dt_proj = nnx.Linear(
        dt_rank, d_inner, rngs=rngs,
        kernel_init=lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -std, std),
        bias_init=lambda k, s, d=jnp.float32: dt_bias_init(k, s, dt_min, dt_max).astype(d))
    a_log = jnp.log(jnp.arange(1, d_state + 1, dtype=jnp.float32))
    self.A_log = NoDecayParam(jnp.broadcast_to(a_log, (d_inner, d_state)))
    self.D = NoDecayParam(jnp.ones((d_inner,), jnp.float32))
    self.out_proj = self.dense(d_inner, d_model, use_bias=False, rngs=rngs)
    # Memory caching: one gate token of N per position, scored against the B_t (the keys).
    self.memory = cached_memory(memory_caching, d_model, gate_heads=1, gate_dim=d_state,
                                rngs=rngs)

  def flops_per_token(self, seq_len: int) -> float:
    """The depthwise convolution (2 K d_inner) and the selective scan's state update and
    read (9 d_inner N, the Mamba paper's count)."""
    del seq_len
    return 2.0 * self.d_conv * self.d_inner + 9.0 * self.d_inner * self.d_state

  # -- shared pieces -------------------------------------------------------------
  def _ssm_inputs(self, xc):
    """Conv output (..., d_inner) -> (delta before bias (..., d_inner), B, C (..., N))."""
    dbc = self.x_proj(xc)
    r, n = self.dt_rank, self.d_state
    dt_low, B, C = dbc[..., :r], dbc[..., r:r + n], dbc[..., r + n:]
    # The bias goes into the softplus (in float32, in the scan).
    delta = jnp.dot(dt_low, self.dt_proj.kernel[...].astype(dt_low.dtype))
    return delta, B, C

  # -- parallel mode ---------------------------------------------------------------
  def forward(self, x, *, mask, deterministic, segment_ids):
    """x (b, l, d_model) -> (b, l, d_model). No dropout; padded rows are zero already."""
    del mask, deterministic, segment_ids
    xz = self.in_proj(x)
    xs, z = xz[..., :self.d_inner], xz[..., self.d_inner:]
    # The convolution and silu (taps summed in float32), stored in the compute dtype: the
    # kernel (ssm.ops.causal_conv1d) on a Hopper GPU; under sequence parallelism an
    # explicit halo around the XLA convolution (GSPMD's own split gave wrong gradients).
    if self.seq_mesh is None:
      xc = causal_conv1d(xs, self.conv_w[...], self.conv_b[...], activation="silu",
                         impl=conv_impl(self.impl))
    else:
      xc = jax.nn.silu(depthwise_conv_seq_parallel(
          causal_depthwise_conv, xs.astype(jnp.float32), self.conv_w[...], self.conv_b[...],
          mesh=self.seq_mesh, seq_axis=self.seq_axis))
    xc = self.compute(xc)
    delta, B, C = self._ssm_inputs(xc)
    A = -jnp.exp(self.A_log[...])
    if self.memory is None:
      scan = (selective_scan if self.seq_mesh is None else functools.partial(
          selective_scan_seq_parallel, mesh=self.seq_mesh, seq_axis=self.seq_axis))
      y = scan(xc, delta, A, B, C, self.D[...], z=z, delta_bias=self.dt_proj.bias[...],
               delta_softplus=True, chunk_size=self.chunk_size, impl=self.impl)
    else:
      y = self._cached_read(x, xc, delta, A, B, C, z)
    return self.out_proj(y).astype(x.dtype)

  def _cached_read(self, x, xc, delta, A, B, C, z):
    """The SSM as a linear memory read through memory caching (see the module docstring);
    the online read and the segment states come from the selective scan
    (`selective_segment_reads`: the kernel where it runs)."""
    f32 = jnp.float32
    dt = jax.nn.softplus(delta.astype(f32) + self.dt_proj.bias[...])        # (b, l, d)
    u = xc.astype(f32)
    B, C = B.astype(f32), C.astype(f32)
    config = self.memory.config
    online = selective_segment_reads(u, dt, A, B, C, segment_size=config.segment_size,
                                     state_init=config.state_init, impl=self.impl,
                                     chunk_size=self.chunk_size)
    y = self.memory.read(x, C[:, :, None], B[:, :, None], (dt * u)[..., None],
                         dt[..., None] * A, online=online)
    y = (y[..., 0] + self.D[...] * u) * jax.nn.silu(z.astype(f32))
    return y.astype(xc.dtype)

  # -- recurrent mode ----------------------------------------------------------------
  def _init_state(self, batch_size: int, max_len: int | None) -> MambaState:
    """Zero state for `step`.

    With memory caching the SSM state lives in `mc` (its online memory) and the
    cache holds enough segments for max_len tokens (default: max_segments of the
    option).
    """
    conv = jnp.zeros((batch_size, self.d_inner, self.d_conv - 1), jnp.float32)
    if self.memory is None:
      return MambaState(conv, jnp.zeros((batch_size, self.d_inner, self.d_state), jnp.float32))
    return MambaState(conv, None, self.memory.init_state(
        batch_size, self.d_inner, self.d_state, 1, key_heads=1, max_len=max_len))

  def _step(self, state: MambaState, x_t: jax.Array) -> tuple[MambaState, jax.Array]:
    """One token: x_t (b, d_model) -> (state, y_t (b, d_model))."""
    f32 = jnp.float32
    xz = self.in_proj(x_t)
    xs, z = xz[..., :self.d_inner], xz[..., self.d_inner:]
    conv, xc = conv_step(state.conv, xs.astype(f32), self.conv_w[...], self.conv_b[...])
    xc = jax.nn.silu(xc)
    delta, B, C = self._ssm_inputs(xc)
    dt = jax.nn.softplus(delta + self.dt_proj.bias[...])                      # (b, d)
    A = -jnp.exp(self.A_log[...])
    if self.memory is None:
      h = jnp.exp(dt[..., None] * A) * state.ssm + (dt * xc)[..., None] * B[:, None, :]
      y = jnp.sum(h * C[:, None, :], axis=-1)
      new_state = MambaState(conv, h)
    else:
      mc_state, y = self.memory.step(state.mc, x_t, C[:, None], B[:, None],
                                     (dt * xc)[..., None], dt[..., None] * A)
      y = y[..., 0]
      new_state = MambaState(conv, None, mc_state)
    y = (y + self.D[...] * xc) * jax.nn.silu(z.astype(f32))
    return new_state, self.out_proj(self.compute(y)).astype(x_t.dtype)


def selective_segment_reads(u, dt, A, B, C, *, segment_size: int, state_init: str,
                            impl: str = "auto", chunk_size: int = DEFAULT_CHUNK_SIZE):
  """The online read of memory caching for Mamba-1, through `ssm.ops.selective_scan`: the
  memory's own output at every token (no D term, no gate) and its state at every segment's
  end, in memory caching's layout (heads = channels, dk = N, dv = 1).

  Memory caching's own path for a per-(channel, state) decay materialises every state,
  (b, l, d, N); this runs the segments as one batch of the scan (the kernel on a GPU) and
  keeps only their end states. The padding of the last segment has dt = 0, which neither
  adds to nor decays the state. "restart": one call from zero states gives both.
  "checkpoint": that call's end states and each segment's total decay exp(A sum dt) chain
  the entering states (`ssm.memory_caching.entering_states`), and a second call from them
  gives the outputs (as `ssm.mamba2.ssd_segment_reads` does for SSD).
  u, dt (b, l, d) (dt after the softplus), A (d, N), B, C (b, l, N) ->
  y (b, l, d, 1), states (b, ceil(l / segment_size), d, N, 1), float32.
  """
  b, l, d = u.shape
  S = segment_size
  n_seg = -(-l // S)
  pad = n_seg * S - l
  seg = lambda v: jnp.pad(v, [(0, 0), (0, pad), (0, 0)]).reshape(b * n_seg, S, v.shape[-1])
  us, dts, Bs, Cs = seg(u), seg(dt), seg(B), seg(C)
  run = functools.partial(selective_scan, return_state=True, chunk_size=chunk_size, impl=impl)
  y, ends = run(us, dts, A, Bs, Cs)                          # from zero states
  if state_init == "checkpoint":
    decay = jnp.exp(jnp.sum(dts, axis=1)[..., None] * A)    # (b n_seg, d, N)
    starts = mcache.entering_states(ends.reshape(b, n_seg, d, -1),
                                    decay.reshape(b, n_seg, d, -1))
    y, ends = run(us, dts, A, Bs, Cs, h0=starts.reshape(ends.shape))
  y = y.reshape(b, n_seg * S, d)[:, :l]
  return y[..., None], ends.reshape(b, n_seg, d, -1)[..., None]


# Registry factory for kind "mamba": the class itself, so its options and defaults are
# written once (models.registry reads them off the signature).
make_mixer = Mamba
