"""Sequence parallelism for the recurrent primitives: the length axis split over a mesh axis.

Every primitive here is a linear recurrence with a diagonal (or per-head scalar) decay,

    S[t] = a[t] * S[t-1] + u[t],      y[t] = read_t(S[t]) + skip[t]      (read_t linear)

so a chunk of tokens acts on the state entering it as an affine map S_end = A_c S_in + E_c,
with A_c = prod_t a[t] (the chunk's total decay) and E_c the chunk's end state from zero,
and its outputs are linear in S_in: y[t] = y_zero[t] + read_t(P[t] S_in), P[t] = prod_{s<=t}
a[s]. With the length split over the n devices of the mesh axis `seq_axis` (batch split
over the other axes):

  1. each device runs its chunk with the op itself (`jax.shard_map` around the op, so any
     impl works: the Pallas kernels are custom calls XLA cannot partition) from a zero
     state, and returns (A_c, E_c); A_c costs one exp of a sum of log decays;
  2. the n pairs are all-gathered (the states are small next to the activations) and every
     device runs the exclusive scan over devices locally, n multiply-adds starting from the
     user's h0: the state entering its chunk. One all-gather is one collective round;
     a log-depth ppermute scan would need log2(n) rounds of latency to save (n - 1)
     states of memory, which only pays past the 8-16 devices a seq axis has;
  3. each device adds read_t(P[t] S_in) to its outputs, in XLA (an einsum or a
     blockwise product, the size of the op's own output term).

Packed documents (segment_ids): a run boundary cuts the entering state: P[t] = 0 from the
chunk's first boundary on, and A_c = 0 when the chunk holds one. A boundary at a chunk's
first token (its id differs from the previous device's last id, all-gathered with the
states) counts too; the op itself never sees it, and needs not: from a zero state a
restart changes nothing. The final state (return_state) is the last device's; it is
returned from that device only, so gradients flow through it once. Gradients of
everything flow through shard_map and the all-gather (their transposes are collectives).

    mesh = jax.make_mesh((2, 4), ("data", "seq"))
    y, state = ssd_seq_parallel(x, dt, A, B, C, h0=h0, return_state=True, mesh=mesh)

Shapes and options are those of the op (ssm/ops/<op>.py), plus `mesh`, `seq_axis`
(default "seq") and `batch_axes` ("auto": every other mesh axis, jointly, as the trainer
splits its batch over ("data", "fsdp"); or a name, a tuple of names, or None). The length
must be a multiple of the seq axis size and the batch of the batch axes' product
(ValueError otherwise). Call these under `jax.jit` or eagerly; inputs may carry any
sharding (shard_map moves them to its specs).

Mixers: Mamba, Mamba2, LinearAttention and Lightning take `seq_mesh=mesh` (and `seq_axis`)
and then call these variants; Mamba's and Mamba-2's depthwise convolution runs through
`depthwise_conv_seq_parallel` (an explicit halo of d_conv - 1 tokens from the previous
device, one ppermute); their projections stay ordinary XLA ops, partitioned by GSPMD
under the caller's jit.

Not here: the LTI mixers' FFT convolution (S4, S4D, LSSL, SGConv) has its own module,
ssm/ops/fft_conv_seq_parallel.py: a distributed FFT (each device transforms its chunk, two
all-to-alls carry the spectrum) and, beside it, an explicit all-gather of the length around
`fft_conv_bank_xla`; `ssm.lti_mixer.LTIMixer(seq_mesh=..., seq_conv=...)` picks one by the
bytes each moves. A plain `fft_conv` under a sequence-sharded input is still left to GSPMD,
which all-gathers the length around the FFT: correct, but no distributed FFT.
Heads are not split over a mesh axis (only batch and length).

The trainer (train/trainer.py, config.train.mesh.seq) builds its model with seq_mesh=its
mesh: these mixers and the LTI mixers get it; the layers without a sequence-parallel path
(attention, memory caching) get their input all-gathered over the length explicitly
(models.blocks.ResidualBlock, gather_mesh), so no Pallas or cuDNN custom call sees a
length-split operand.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from ssm.ops._segments import resets
from ssm.ops.lightning_attention import check_lightning_args, lightning_attention
from ssm.ops.linear_scan import check_linear_scan_args, linear_scan
from ssm.ops.selective_scan import (DEFAULT_CHUNK_SIZE as SELECTIVE_CHUNK, _spread,
                                    check_selective_scan_args, selective_scan)
from ssm.ops.ssd import DEFAULT_CHUNK_SIZE as SSD_CHUNK, check_ssd_args, ssd

__all__ = ["check_seq_mesh", "depthwise_conv_seq_parallel", "lightning_attention_seq_parallel",
           "linear_scan_seq_parallel", "selective_scan_seq_parallel", "ssd_seq_parallel"]


# -- the mesh: which axes split what ---------------------------------------------------------

def _axes(fn, mesh, seq_axis, batch_axes, batch, length):
  """Checks the mesh against the inputs; returns (seq size, batch axes as a tuple or None)."""
  if not isinstance(mesh, Mesh):
    raise ValueError(f"{fn}: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  names = tuple(mesh.axis_names)
  if seq_axis not in names:
    raise ValueError(f"{fn}: the mesh has no axis {seq_axis!r} to split the length over "
                     f"(its axes: {names})")
  if batch_axes == "auto":
    batch_axes = tuple(a for a in names if a != seq_axis)
  elif isinstance(batch_axes, str):
    batch_axes = (batch_axes,)
  batch_axes = tuple(batch_axes or ())
  for a in batch_axes:
    if a not in names or a == seq_axis:
      raise ValueError(f"{fn}: batch axis {a!r} is not a mesh axis other than {seq_axis!r} "
                       f"(mesh axes: {names})")
  n = mesh.shape[seq_axis]
  if length % n:
    raise ValueError(f"{fn}: length {length} is not divisible by the {n} devices of mesh "
                     f"axis {seq_axis!r}")
  n_batch = math.prod(mesh.shape[a] for a in batch_axes)
  if batch % n_batch:
    raise ValueError(f"{fn}: batch {batch} is not divisible by the {n_batch} devices of mesh "
                     f"axes {batch_axes}")
  return n, (batch_axes or None)


def _shard(body, mesh, in_specs, out_specs):
  """shard_map without the varying-axes checks: the ops' custom VJPs build their zero
  states inside (not varying over the mesh) and their backward rules return varying
  cotangents, which the checks refuse. Without them shard_map's transpose psums the
  cotangents of replicated inputs (A, D, ...) over the axes their specs leave out; the
  tests hold every gradient to the unsharded op's."""
  return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)


def check_seq_mesh(who: str, seq_mesh, seq_axis: str = "seq", memory_caching=None):
  """A mixer's sequence-parallel option: (seq_mesh, seq_axis) if usable, ValueError
  otherwise (not a Mesh, no such axis, or with memory caching, which has no such path)."""
  if seq_mesh is None:
    return None, seq_axis
  if not isinstance(seq_mesh, Mesh):
    raise ValueError(f"{who}: seq_mesh must be a jax.sharding.Mesh or None, got "
                     f"{type(seq_mesh).__name__}")
  if seq_axis not in seq_mesh.axis_names:
    raise ValueError(f"{who}: seq_mesh has no axis {seq_axis!r} (its axes: "
                     f"{tuple(seq_mesh.axis_names)})")
  if memory_caching is not None:
    raise ValueError(f"{who}: seq_mesh (sequence parallelism) does not apply with "
                     f"memory_caching")
  return seq_mesh, seq_axis


# -- the combine across devices ---------------------------------------------------------------

def _entering_state(total, end, h0, axis, n, reverse=False):
  """The state entering this device's chunk, and the state after the last chunk.

  total: this chunk's total decay, broadcastable against end; end (b, ...): its end state
  from zero; h0 (b, ...) or None: the state entering the first chunk (the last, reverse).
  Returns (s_in (b, ...), final (b, ...)), in end's dtype.
  """
  totals = lax.all_gather(total, axis)                         # (n, b, ...)
  ends = lax.all_gather(end, axis)
  order = range(n - 1, -1, -1) if reverse else range(n)
  s = jnp.zeros_like(end) if h0 is None else h0.astype(end.dtype)
  into = [None] * n
  for k in order:  # n fused multiply-adds on small states
    into[k] = s
    s = totals[k] * s + ends[k]
  return jnp.stack(into)[lax.axis_index(axis)], s


def _keep_entering(segment_ids, axis):
  """(b, lc) float32 1 while no run boundary has occurred in this chunk (up to and with t),
  counting one at its first token when the previous device's last id differs."""
  idx = lax.axis_index(axis)
  lasts = lax.all_gather(segment_ids[:, -1], axis)             # (n, b)
  prev = lasts[jnp.maximum(idx - 1, 0)]
  cut = resets(segment_ids).at[:, 0].set((idx > 0) & (segment_ids[:, 0] != prev))
  return (jnp.cumsum(cut.astype(jnp.int32), axis=1) == 0).astype(jnp.float32)


def _last_only(final):
  """Out-spec the final state per device, (1, b, ...): the caller keeps the last device's,
  so its cotangent reaches one device, not n."""
  return final[None]


def _spec(batch_axes, seq_axis, rank):
  """PartitionSpec of a (b, l, ...) array of this rank."""
  return P(batch_axes, seq_axis, *([None] * (rank - 2)))


# -- the causal depthwise convolution (Mamba's conv_4) -------------------------------------------

def depthwise_conv_seq_parallel(conv, x, w_kd, bias_d, segment_ids=None, *, mesh: Mesh,
                                seq_axis: str = "seq", batch_axes="auto"):
  """A causal depthwise convolution of width K with the length split over `seq_axis`.

  conv(x, w_kd, bias_d, segment_ids) -> y is the unsplit convolution (ssm.mamba's
  causal_depthwise_conv: zero before the start, taps reading another document zero).
  Each device receives the last K - 1 inputs (and ids) of the previous device's chunk
  (one ppermute; the first device gets zeros, the sequence's own zero start), runs conv
  on its chunk with them in front and drops their outputs: exactly the unsplit result.
  An explicit halo rather than GSPMD's: under jit, GSPMD's partitioning of this
  convolution's backward next to the shard_map'd scans gave wrong input gradients with
  packed documents on a seq axis of 2 (jax 0.10; tests/test_train_seq.py).

  x: (batch, length, d); w_kd: (K, d); bias_d: (d,); segment_ids: (batch, length) int.
  Each device's chunk must hold at least K - 1 tokens (ValueError otherwise).
  """
  width = w_kd.shape[0]
  n, bax = _axes("depthwise_conv_seq_parallel", mesh, seq_axis, batch_axes, *x.shape[:2])
  if width > 1 and x.shape[1] // n < width - 1:
    raise ValueError(f"depthwise_conv_seq_parallel: {x.shape[1] // n} tokens per device of "
                     f"mesh axis {seq_axis!r} are fewer than the convolution's window "
                     f"{width} - 1")
  return _conv_sp(x, w_kd, bias_d, segment_ids, conv=conv, mesh=mesh, seq_axis=seq_axis,
                  bax=bax, n=n)


@functools.partial(jax.jit, static_argnames=("conv", "mesh", "seq_axis", "bax", "n"))
def _conv_sp(x, w_kd, bias_d, segment_ids, *, conv, mesh, seq_axis, bax, n):
  halo = w_kd.shape[0] - 1

  def body(x, w_kd, bias_d, segment_ids):
    if halo == 0:
      return conv(x, w_kd, bias_d, segment_ids)
    to_next = [(i, i + 1) for i in range(n - 1)]
    x_prev = lax.ppermute(x[:, -halo:], seq_axis, to_next)      # zeros on the first device
    ids = None
    if segment_ids is not None:
      ids = jnp.concatenate([lax.ppermute(segment_ids[:, -halo:], seq_axis, to_next),
                             segment_ids], axis=1)
    y = conv(jnp.concatenate([x_prev, x], axis=1), w_kd, bias_d, ids)
    return y[:, halo:]

  x3 = _spec(bax, seq_axis, 3)
  return _shard(body, mesh, (x3, P(), P(), None if segment_ids is None
                             else _spec(bax, seq_axis, 2)), x3)(x, w_kd, bias_d, segment_ids)


# -- linear_scan ------------------------------------------------------------------------------

def linear_scan_seq_parallel(a, b, h0=None, *, mesh: Mesh, seq_axis: str = "seq",
                             batch_axes="auto", reverse: bool = False,
                             chunk_size: int | None = None, return_state: bool = False,
                             impl: str = "auto"):
  """`ssm.ops.linear_scan` with the length split over mesh axis `seq_axis`.

  a, b: (batch, length, features); h0: (batch, features) or None. Returns h (batch, length,
  features) [and the final state (batch, features)], as linear_scan does. The chunk decay
  is a cumulative product (a may be negative or complex, so no log).
  """
  check_linear_scan_args(a, b, h0, chunk_size)
  n, bax = _axes("linear_scan_seq_parallel", mesh, seq_axis, batch_axes, *a.shape[:2])
  return _linear_scan_sp(a, b, h0, mesh=mesh, seq_axis=seq_axis, bax=bax, n=n,
                         reverse=reverse, chunk_size=chunk_size, return_state=return_state,
                         impl=impl)


@functools.partial(jax.jit, static_argnames=("mesh", "seq_axis", "bax", "n", "reverse",
                                             "chunk_size", "return_state", "impl"))
def _linear_scan_sp(a, b, h0, *, mesh, seq_axis, bax, n, reverse, chunk_size, return_state,
                    impl):
  def body(a, b, h0):
    h, end = linear_scan(a, b, None, reverse=reverse, chunk_size=chunk_size,
                         return_state=True, impl=impl)
    ac = a.astype(end.dtype)
    if reverse:
      cum = jnp.flip(jnp.cumprod(jnp.flip(ac, 1), axis=1), 1)   # prod_{s>=t} a[s]
      total = cum[:, 0]
    else:
      cum = jnp.cumprod(ac, axis=1)                             # prod_{s<=t} a[s]
      total = cum[:, -1]
    s_in, final = _entering_state(total, end, h0, seq_axis, n, reverse)
    h = (h + cum * s_in[:, None]).astype(h.dtype)
    return h, _last_only(final)

  x_spec = _spec(bax, seq_axis, 3)
  h, finals = _shard(body, mesh, (x_spec, x_spec, None if h0 is None else P(bax, None)),
                     (x_spec, P(seq_axis, bax, None)))(a, b, h0)
  return (h, finals[-1]) if return_state else h


# -- selective_scan (Mamba-1) -------------------------------------------------------------------

def _blockwise(fn, block, *xs):
  """fn over blocks of `block` steps of axis 1 of every x (b, l, ...), lax.map'ed and
  rematerialised: bounds a (b, block, d, n) working set. Returns fn's (b, l, ...) output."""
  b, l = xs[0].shape[:2]
  block = min(block, l)
  nb = -(-l // block)
  pad = nb * block - l

  def split(x):  # (b, l, ...) -> (nb, b, block, ...)
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, nb, block, *x.shape[2:]), 1, 0)

  out = lax.map(jax.checkpoint(lambda args: fn(*args)), tuple(map(split, xs)))
  return jnp.moveaxis(out, 0, 1).reshape(b, nb * block, *out.shape[3:])[:, :l]


def selective_scan_seq_parallel(u, delta, A, B, C, D=None, *, z=None, delta_bias=None,
                                delta_softplus: bool = False, h0=None,
                                return_state: bool = False,
                                chunk_size: int = SELECTIVE_CHUNK, impl: str = "auto",
                                mesh: Mesh, seq_axis: str = "seq", batch_axes="auto"):
  """`ssm.ops.selective_scan` with the length split over mesh axis `seq_axis`.

  u, delta, z: (batch, length, D); A: (D, N); B, C: (batch, length, N) or (batch, length,
  G, N); D, delta_bias: (D,); h0: (batch, D, N). Returns y (batch, length, D) [and the
  final state (batch, D, N) float32]. The correction sum_n C[t] exp(A cumsum(dt)) h_in
  runs in blocks of chunk_size steps (the op's own working set).
  """
  B, C = check_selective_scan_args(u, delta, A, B, C, D, z, delta_bias, h0, chunk_size)
  n, bax = _axes("selective_scan_seq_parallel", mesh, seq_axis, batch_axes, *u.shape[:2])
  return _selective_sp(u, delta, A, B, C, D, z, delta_bias, h0, mesh=mesh, seq_axis=seq_axis,
                       bax=bax, n=n, delta_softplus=delta_softplus, return_state=return_state,
                       chunk_size=chunk_size, impl=impl)


def _op_dt(dt, bias, softplus: bool, dtype):
  """The step size the op itself uses: dt (+ bias), through softplus when asked, in dtype."""
  dt = dt.astype(dtype)
  if bias is not None:
    dt = dt + bias.astype(dtype)
  return jax.nn.softplus(dt) if softplus else dt


@functools.partial(jax.jit, static_argnames=("mesh", "seq_axis", "bax", "n", "delta_softplus",
                                             "return_state", "chunk_size", "impl"))
def _selective_sp(u, delta, A, B, C, D, z, delta_bias, h0, *, mesh, seq_axis, bax, n,
                  delta_softplus, return_state, chunk_size, impl):
  def body(u, delta, A, B, C, D, z, delta_bias, h0):
    y, end = selective_scan(u, delta, A, B, C, D, z=z, delta_bias=delta_bias,
                            delta_softplus=delta_softplus, return_state=True,
                            chunk_size=chunk_size, impl=impl)
    cdt = end.dtype
    dt = _op_dt(delta, delta_bias, delta_softplus, cdt)
    a_dn = A.astype(cdt)
    cs = jnp.cumsum(dt, axis=1)                                 # (b, lc, d) sum of dt to t
    total = jnp.exp(cs[:, -1, :, None] * a_dn)                  # (b, d, n)
    s_in, final = _entering_state(total, end, h0, seq_axis, n)
    d_inner = u.shape[-1]

    def read(cs_bld, c_blgn):  # sum_n C[t] exp(A cs[t]) s_in: (b, block, d)
      decay = jnp.exp(cs_bld[..., None] * a_dn)                 # (b, block, d, n)
      return jnp.sum(_spread(c_blgn.astype(cdt), d_inner) * decay * s_in[:, None], axis=-1)

    corr = _blockwise(read, chunk_size, cs, C)
    if z is not None:
      corr = corr * jax.nn.silu(z.astype(cdt))
    return (y.astype(cdt) + corr).astype(y.dtype), _last_only(final)

  x3, x4 = _spec(bax, seq_axis, 3), _spec(bax, seq_axis, 4)
  opt = lambda v, spec: None if v is None else spec
  in_specs = (x3, x3, P(), x4, x4, opt(D, P()), opt(z, x3), opt(delta_bias, P()),
              opt(h0, P(bax, None, None)))
  y, finals = _shard(body, mesh, in_specs, (x3, P(seq_axis, bax, None, None)))(
      u, delta, A, B, C, D, z, delta_bias, h0)
  return (y, finals[-1]) if return_state else y


# -- ssd (Mamba-2) -------------------------------------------------------------------------------

def ssd_seq_parallel(x, dt, A, B, C, *, D=None, h0=None, segment_ids=None, dt_bias=None,
                     dt_softplus: bool = False, return_state: bool = False,
                     chunk_size: int = SSD_CHUNK, impl: str = "auto", mesh: Mesh,
                     seq_axis: str = "seq", batch_axes="auto"):
  """`ssm.ops.ssd` with the length split over mesh axis `seq_axis`.

  x: (batch, length, heads, P); dt: (batch, length, heads); A, D, dt_bias: (heads,);
  B, C: (batch, length, G, N); h0: (batch, heads, P, N); segment_ids: (batch, length) int.
  Returns y (batch, length, heads, P) [and the final state (batch, heads, P, N) float32].
  """
  check_ssd_args(x, dt, A, B, C, D=D, h0=h0, segment_ids=segment_ids, dt_bias=dt_bias,
                 chunk_size=chunk_size, fn="ssd_seq_parallel")
  n, bax = _axes("ssd_seq_parallel", mesh, seq_axis, batch_axes, *x.shape[:2])
  return _ssd_sp(x, dt, A, B, C, D, h0, segment_ids, dt_bias, mesh=mesh, seq_axis=seq_axis,
                 bax=bax, n=n, dt_softplus=dt_softplus, return_state=return_state,
                 chunk_size=chunk_size, impl=impl)


def _read_heads(c_blgn, s_bhpn):
  """C[t] . S per head, head h reading group h // (H / G): (b, l, h, p)."""
  b, l, g, _ = c_blgn.shape
  s_bgrpn = s_bhpn.reshape(b, g, s_bhpn.shape[1] // g, *s_bhpn.shape[2:])
  y = jnp.einsum("blgn,bgrpn->blgrp", c_blgn.astype(s_bhpn.dtype), s_bgrpn)
  return y.reshape(b, l, -1, s_bhpn.shape[2])


@functools.partial(jax.jit, static_argnames=("mesh", "seq_axis", "bax", "n", "dt_softplus",
                                             "return_state", "chunk_size", "impl"))
def _ssd_sp(x, dt, A, B, C, D, h0, segment_ids, dt_bias, *, mesh, seq_axis, bax, n,
            dt_softplus, return_state, chunk_size, impl):
  def body(x, dt, A, B, C, D, h0, segment_ids, dt_bias):
    y, end = ssd(x, dt, A, B, C, D=D, segment_ids=segment_ids, dt_bias=dt_bias,
                 dt_softplus=dt_softplus, return_state=True, chunk_size=chunk_size, impl=impl)
    cdt = end.dtype
    dte = _op_dt(dt, dt_bias, dt_softplus, cdt)
    log_p = jnp.cumsum(dte * A.astype(cdt), axis=1)             # (b, lc, h) log P[t]
    p_t = jnp.exp(log_p)
    if segment_ids is not None:
      p_t = p_t * _keep_entering(segment_ids, seq_axis)[..., None].astype(cdt)
    total = p_t[:, -1, :, None, None]                           # (b, h, 1, 1)
    s_in, final = _entering_state(total, end, h0, seq_axis, n)
    corr = _read_heads(C, s_in) * p_t[..., None]                # (b, lc, h, p)
    return (y.astype(cdt) + corr).astype(y.dtype), _last_only(final)

  x4, x3 = _spec(bax, seq_axis, 4), _spec(bax, seq_axis, 3)
  opt = lambda v, spec: None if v is None else spec
  in_specs = (x4, x3, P(), x4, x4, opt(D, P()), opt(h0, P(bax, None, None, None)),
              opt(segment_ids, _spec(bax, seq_axis, 2)), opt(dt_bias, P()))
  y, finals = _shard(body, mesh, in_specs, (x4, P(seq_axis, bax, None, None, None)))(
      x, dt, A, B, C, D, h0, segment_ids, dt_bias)
  return (y, finals[-1]) if return_state else y


# -- lightning_attention ---------------------------------------------------------------------------

def lightning_attention_seq_parallel(q, k, v, log_decay=None, *, h0=None, segment_ids=None,
                                     return_state: bool = False, chunk_size: int = 64,
                                     impl: str = "auto", mesh: Mesh, seq_axis: str = "seq",
                                     batch_axes="auto"):
  """`ssm.ops.lightning_attention` with the length split over mesh axis `seq_axis`.

  q, k: (batch, length, heads, dk); v: (batch, length, heads, dv); log_decay: (heads,) or
  None; h0: (batch, heads, dk, dv); segment_ids: (batch, length) int. Returns o (batch,
  length, heads, dv) [and the final state (batch, heads, dk, dv) float32].
  """
  check_lightning_args(q, k, v, log_decay, h0, chunk_size, segment_ids)
  n, bax = _axes("lightning_attention_seq_parallel", mesh, seq_axis, batch_axes,
                 *q.shape[:2])
  return _lightning_sp(q, k, v, log_decay, h0, segment_ids, mesh=mesh, seq_axis=seq_axis,
                       bax=bax, n=n, return_state=return_state, chunk_size=chunk_size,
                       impl=impl)


@functools.partial(jax.jit, static_argnames=("mesh", "seq_axis", "bax", "n", "return_state",
                                             "chunk_size", "impl"))
def _lightning_sp(q, k, v, log_decay, h0, segment_ids, *, mesh, seq_axis, bax, n,
                  return_state, chunk_size, impl):
  def body(q, k, v, log_decay, h0, segment_ids):
    o, end = lightning_attention(q, k, v, log_decay, segment_ids=segment_ids,
                                 return_state=True, chunk_size=chunk_size, impl=impl)
    cdt = end.dtype
    lc, h = q.shape[1], q.shape[2]
    lam = jnp.zeros((h,), cdt) if log_decay is None else log_decay.astype(cdt)
    p_t = jnp.exp(lam * jnp.arange(1, lc + 1, dtype=cdt)[:, None])[None]   # (1, lc, h)
    if segment_ids is not None:
      p_t = p_t * _keep_entering(segment_ids, seq_axis)[..., None].astype(cdt)
    total = jnp.broadcast_to(p_t[:, -1], (q.shape[0], h))[..., None, None]  # (b, h, 1, 1)
    s_in, final = _entering_state(total, end, h0, seq_axis, n)
    corr = jnp.einsum("blhk,bhkv->blhv", q.astype(cdt), s_in) * p_t[..., None]
    return (o.astype(cdt) + corr).astype(o.dtype), _last_only(final)

  x4 = _spec(bax, seq_axis, 4)
  opt = lambda v, spec: None if v is None else spec
  in_specs = (x4, x4, x4, opt(log_decay, P()), opt(h0, P(bax, None, None, None)),
              opt(segment_ids, _spec(bax, seq_axis, 2)))
  o, finals = _shard(body, mesh, in_specs, (x4, P(seq_axis, bax, None, None, None)))(
      q, k, v, log_decay, h0, segment_ids)
  return (o, finals[-1]) if return_state else o
