"""Pallas Mosaic GPU kernels of `ssm.ops.linear_scan`: h[t] = a[t] h[t-1] + b[t].

One thread per channel, the sequence in CHUNK-token TMA tiles (layout and padding:
`_scan_tiles`); one FMA per token and thread (four for complex, run as re/im planes).

Backward (custom_vjp), also a kernel: the adjoint recurrence lam[t] = g[t] + a[t+1]
lam[t+1] runs in the other direction of time; da[t] = lam[t] h[t-1] uses the forward
output h as its only residual besides a (h is stored in the output dtype: with bf16
inputs da sees h rounded to bf16, an error of the order of the inputs' own rounding).

Constraints (else `check_supported` raises ValueError; impl="auto" then takes the XLA
path): D a multiple of 128; float32, bfloat16 or complex64.
(Split out of the former scan_pallas.py, which held both scans.)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ssm.ops import _pallas
from ssm.ops._scan_tiles import (BLOCK_D, CHUNK, F32, LINE, ScanCfg, pad_len, pad_time, params,
                                 stage_count, unrolled)


def check_supported(a, b) -> None:
  """ValueError naming why the kernel cannot take these inputs."""
  d = a.shape[-1]
  if d % BLOCK_D:
    raise ValueError(f"linear_scan (pallas): the feature count {d} must be a multiple of {BLOCK_D}")
  for x in (a, b):
    base = jnp.real(jnp.zeros((), x.dtype)).dtype
    if base not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
      raise ValueError(f"linear_scan (pallas): dtype {x.dtype} (float32, bfloat16 or complex64)")


@dataclasses.dataclass(frozen=True)
class _LinCfg(ScanCfg):
  complex: bool
  reverse: bool  # direction of the forward recurrence


def _cmul(x, y):
  """Complex product of (re, im) pairs (real when the tuples have one element)."""
  if len(x) == 1:
    return (x[0] * y[0],)
  return (x[0] * y[0] - x[1] * y[1], x[0] * y[1] + x[1] * y[0])


def _cadd(x, y):
  return tuple(p + q for p, q in zip(x, y))


def _lin_walk(cfg: _LinCfg, backward: bool):
  """(tile index, token index) maps for a walk in time order (forward) or against it."""
  against = cfg.reverse != backward  # True: from the end of the array to its start
  nt = cfg.n_tiles

  def tile(i):
    return nt - 1 - i if against else i

  def token(r):
    return CHUNK - 1 - r if against else r

  return tile, token, against


def _groups(refs, npl: int, n: int):
  """A kernel's refs as n groups of npl planes (re/im or one), then the barrier."""
  return [refs[i * npl:(i + 1) * npl] for i in range(n)] + [refs[n * npl]]


def _tile_fetcher(srcs, dsts, bars, tile_of):
  """This CTA's batch row, channel block and `fetch(i, slot)`: the TMA copies of the i-th
  tile of the walk from every source into its slot, completing on bars[slot]."""
  bi = lax.axis_index("b")
  cols = pl.ds(lax.axis_index("d") * BLOCK_D, BLOCK_D)

  def fetch(i, slot):
    rows = pl.ds(tile_of(i) * CHUNK, CHUNK)
    for src, dst in zip(srcs, dsts):
      plgpu.copy_gmem_to_smem(src.at[bi, rows, cols], dst.at[slot], bars.at[slot])

  return bi, cols, fetch


@functools.partial(jax.jit, static_argnums=0)
def _lin_fwd_call(cfg: _LinCfg, a_planes, b_planes, h0_planes):
  """h (out planes, f32 math) and the final state. a/b planes (B, Lp, D); h0 planes (B, D) f32."""
  npl = len(a_planes)
  tile_of, token_of, _ = _lin_walk(cfg, backward=False)
  nt = cfg.n_tiles
  in_bytes = sum(CHUNK * BLOCK_D * x.dtype.itemsize for x in a_planes + b_planes)
  stages = stage_count(nt, in_bytes)
  out_dtype = jnp.result_type(a_planes[0].dtype, b_planes[0].dtype)
  shape = (cfg.batch, cfg.seq_len, cfg.dim)
  out_type = ([jax.ShapeDtypeStruct(shape, out_dtype)] * npl
              + [jax.ShapeDtypeStruct((cfg.batch, cfg.dim), F32)] * npl)
  scratch = [plgpu.SMEM((stages, CHUNK, BLOCK_D), x.dtype) for x in a_planes + b_planes]
  scratch.append(plgpu.Barrier(num_arrivals=2 * npl, num_barriers=stages))
  interp = cfg.interpret

  def body(*refs):
    a_g, b_g, h0_g, h_g, last_g, a_s, b_s, bars = _groups(refs, npl, 7)
    bi, cols, fetch = _tile_fetcher(a_g + b_g, a_s + b_s, bars, tile_of)

    for i in range(stages):
      fetch(i, i)
    h = tuple(_pallas.load(r.at[bi, cols], LINE, interp) for r in h0_g)

    def tile(i, h):
      slot = lax.rem(i, stages)
      plgpu.barrier_wait(bars.at[slot])
      base = tile_of(i) * CHUNK

      def step(r, h):
        t = token_of(r)
        av = tuple(_pallas.load(s.at[slot, t], LINE, interp).astype(F32) for s in a_s)
        bv = tuple(_pallas.load(s.at[slot, t], LINE, interp).astype(F32) for s in b_s)
        h = _cadd(_cmul(av, h), bv)
        for dst, x in zip(h_g, h):
          dst[bi, base + t, cols] = x.astype(dst.dtype)
        return h

      h = unrolled(CHUNK, step, h)
      plgpu.commit_smem()  # every thread is done with this slot: refill it

      @pl.when(i + stages < nt)
      def _():
        fetch(i + stages, slot)

      return h

    h = lax.fori_loop(0, nt, tile, h)
    for dst, x in zip(last_g, h):
      dst[bi, cols] = x

  call = _pallas.kernel(body, interpret=interp, out_type=tuple(out_type),
                        grid=(cfg.dim // BLOCK_D, cfg.batch), grid_names=("d", "b"),
                        scratch_types=scratch, compiler_params=params(),
                        kernel_name="linear_scan_fwd")
  outs = call(*a_planes, *b_planes, *h0_planes)
  return outs[:npl], outs[npl:]


@functools.partial(jax.jit, static_argnums=0)
def _lin_bwd_call(cfg: _LinCfg, a_planes, h_planes, g_planes, h0_planes, dlast_planes):
  """Adjoint sweep. Returns (da planes, db planes) (B, Lp, D) f32 and dh0 planes (B, D) f32.

  lam[s] = g[s] + a[s+1] lam[s+1] (s in the forward's time order), lam[L] = dlast;
  db[s] = lam[s]; da[s] = lam[s] h[s-1] (h[-1] = h0); dh0 = a[0] lam[0].
  Written one step late: at step s the sweep knows lam[s+1] and reads h[s].
  """
  npl = len(a_planes)
  tile_of, token_of, against = _lin_walk(cfg, backward=True)
  nt = cfg.n_tiles
  in_bytes = sum(CHUNK * BLOCK_D * x.dtype.itemsize for x in a_planes + h_planes + g_planes)
  stages = stage_count(nt, in_bytes)
  shape = (cfg.batch, cfg.seq_len, cfg.dim)
  out_type = ([jax.ShapeDtypeStruct(shape, F32)] * (2 * npl)
              + [jax.ShapeDtypeStruct((cfg.batch, cfg.dim), F32)] * npl)
  scratch = [plgpu.SMEM((stages, CHUNK, BLOCK_D), x.dtype)
             for x in a_planes + h_planes + g_planes]
  scratch.append(plgpu.Barrier(num_arrivals=3 * npl, num_barriers=stages))
  interp = cfg.interpret
  # `against` (the sweep runs from the array's end to its start) means the forward ran
  # from start to end, so the forward-time successor of position p is p + 1.
  nxt = 1 if against else -1

  def body(*refs):
    a_g, h_g, g_g, h0_g, dl_g, da_g, db_g, dh0_g, a_s, h_s, g_s, bars = _groups(refs, npl, 11)
    bi, cols, fetch = _tile_fetcher(a_g + h_g + g_g, a_s + h_s + g_s, bars, tile_of)

    for i in range(stages):
      fetch(i, i)
    lam = tuple(_pallas.load(r.at[bi, cols], LINE, interp) for r in dl_g)
    one = 1.0 + 0.0 * lam[0]
    a_next = (one,) + tuple(0.0 * lam[0] for _ in range(npl - 1))

    def step_fn(i, slot, base, write_prev):
      def step(r, carry):
        lam, a_next = carry
        t = token_of(r)
        av = tuple(_pallas.load(s.at[slot, t], LINE, interp).astype(F32) for s in a_s)
        hv = tuple(_pallas.load(s.at[slot, t], LINE, interp).astype(F32) for s in h_s)
        gv = tuple(_pallas.load(s.at[slot, t], LINE, interp).astype(F32) for s in g_s)
        pos = base + t

        # da[s + 1] = lam[s + 1] h[s]; the last position (s + 1 = L) has none.
        @pl.when(write_prev(i, r))
        def _():
          for dst, x in zip(da_g, _cmul(lam, hv)):
            dst[bi, pos + nxt, cols] = x

        lam = _cadd(gv, _cmul(a_next, lam))
        for dst, x in zip(db_g, lam):
          dst[bi, pos, cols] = x
        return lam, av

      return step

    def write_prev(i, r):
      return jnp.logical_or(i > 0, r > 0)

    def tile(i, carry):
      slot = lax.rem(i, stages)
      plgpu.barrier_wait(bars.at[slot])
      base = tile_of(i) * CHUNK
      carry = unrolled(CHUNK, step_fn(i, slot, base, write_prev), carry)
      plgpu.commit_smem()

      @pl.when(i + stages < nt)
      def _():
        fetch(i + stages, slot)

      return carry

    lam, a_first = lax.fori_loop(0, nt, tile, (lam, a_next))
    # The sweep ended at the forward's first position p0: da[p0] = lam[p0] h0, dh0 = a[p0] lam[p0].
    h0v = tuple(_pallas.load(r.at[bi, cols], LINE, interp) for r in h0_g)
    p0 = 0 if against else cfg.seq_len - 1
    for dst, x in zip(da_g, _cmul(lam, h0v)):
      dst[bi, p0, cols] = x
    for dst, x in zip(dh0_g, _cmul(a_first, lam)):
      dst[bi, cols] = x

  call = _pallas.kernel(body, interpret=interp, out_type=tuple(out_type),
                        grid=(cfg.dim // BLOCK_D, cfg.batch), grid_names=("d", "b"),
                        scratch_types=scratch, compiler_params=params(),
                        kernel_name="linear_scan_bwd")
  outs = call(*a_planes, *h_planes, *g_planes, *h0_planes, *dlast_planes)
  return outs[:npl], outs[npl:2 * npl], outs[2 * npl:]


def _split(x, is_complex):
  return (jnp.real(x), jnp.imag(x)) if is_complex else (x,)


def _join(planes, is_complex):
  return lax.complex(*planes) if is_complex else planes[0]


def _lin_prepare(cfg: _LinCfg, a, b, h0):
  """Planes padded with identity steps (a = 1, b = 0) at the end of the array."""
  a_p = tuple(pad_time(x, cfg.seq_len, v) for x, v in zip(_split(a, cfg.complex), (1.0, 0.0)))
  b_p = tuple(pad_time(x, cfg.seq_len) for x in _split(b, cfg.complex))
  h0_p = tuple(x.astype(F32) for x in _split(h0, cfg.complex))
  return a_p, b_p, h0_p


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _lin_scan(cfg: _LinCfg, seq_len: int, a, b, h0):
  return _lin_scan_fwd(cfg, seq_len, a, b, h0)[0]


def _lin_scan_fwd(cfg, seq_len, a, b, h0):
  a_p, b_p, h0_p = _lin_prepare(cfg, a, b, h0)
  h_p, last_p = _lin_fwd_call(cfg, a_p, b_p, h0_p)
  h = _join(tuple(x[:, :seq_len] for x in h_p), cfg.complex)
  last = _join(last_p, cfg.complex)
  return (h, last), (a_p, h_p, h0_p, a, b, h0)


def _lin_scan_bwd(cfg, seq_len, res, cts):
  a_p, h_p, h0_p, a, b, h0 = res
  g, dlast = cts
  g_p = tuple(pad_time(x.astype(F32), cfg.seq_len) for x in _split(g, cfg.complex))
  dl_p = tuple(x.astype(F32) for x in _split(dlast, cfg.complex))
  da_p, db_p, dh0_p = _lin_bwd_call(cfg, a_p, h_p, g_p, h0_p, dl_p)
  da = _join(tuple(x[:, :seq_len] for x in da_p), cfg.complex)
  db = _join(tuple(x[:, :seq_len] for x in db_p), cfg.complex)
  dh0 = _join(dh0_p, cfg.complex)
  return (_cotangent(da, a), _cotangent(db, b), _cotangent(dh0, h0))


def _cotangent(d, x):
  """Cast a float32/complex64 gradient to the primal's dtype (real part for a real primal)."""
  if not jnp.iscomplexobj(x) and jnp.iscomplexobj(d):
    d = jnp.real(d)
  return d.astype(x.dtype)


_lin_scan.defvjp(_lin_scan_fwd, _lin_scan_bwd)


def linear_scan_pallas(a, b, h0=None, *, reverse: bool = False, interpret: bool = False):
  """h[t] = a[t] h[t-1] + b[t] by the kernel; returns (h, final state).

  a, b: (batch, length, D) float32/bfloat16 or complex64 (complex as re/im planes);
  h0: (batch, D) or None. h has dtype result_type(a, b) (complex if either is);
  the final state is float32/complex64.
  """
  check_supported(a, b)
  is_complex = jnp.iscomplexobj(a) or jnp.iscomplexobj(b)
  if is_complex:
    a, b = a.astype(jnp.complex64), b.astype(jnp.complex64)
  bsz, seq_len, dim = a.shape
  if h0 is None:
    h0 = jnp.zeros((bsz, dim), jnp.complex64 if is_complex else F32)
  h0 = h0.astype(jnp.complex64 if is_complex else F32)
  cfg = _LinCfg(batch=bsz, seq_len=pad_len(seq_len), dim=dim, complex=is_complex,
                reverse=reverse, interpret=interpret)
  return _lin_scan(cfg, seq_len, a, b, h0)


# ---------------------------------------------------------------------------------------------
# selective_scan
# ---------------------------------------------------------------------------------------------
