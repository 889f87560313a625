"""Pallas Mosaic GPU kernels of `ssm.ops.selective_scan` (Mamba-1).

One thread per channel, the sequence in CHUNK-token TMA tiles (layout and padding:
`_scan_tiles`); the (batch, length, D, N) expansion exists only as N registers per
thread. B and C are the same for all channels of a group: their (CHUNK, N) tiles are
read as warp-uniform scalars from shared memory. Padded tokens have dt = 0.

Costs per token and thread: the forward N exp2 and about 4N FMAs, the backward about
3N exp2 (the states are recomputed twice, see below), 12N other operations and 31
shuffles per 32 dB/dC products, plus N exp2 in the segment pre-pass.

Backward (custom_vjp), also kernels: the forward also writes the state entering every
BWD_TILE tokens, and the final state last (batch, L / 16 + 1, N, D) float32 (1/16 of the
states). The backward walks
16-token tiles in reverse: it rebuilds the state entering each sub-tile of SUB
tokens, then per sub-tile (last first) the state entering each token into a
shared-memory history, and runs the adjoint backwards over it. dB and dC are
sums over channels: each warp sums its 32 channels' products with a butterfly
of lane shuffles (`_WarpRow`), the four warps' rows are added once per tile,
and XLA adds the channel blocks (deterministic, no atomics). The tiles are
small so that two CTAs share an SM (about 110 KB of shared memory each), and
each sequence is split into `bwd_segments_for` pieces that run in parallel
CTAs: the (D / 128) * batch CTAs alone leave most SMs idle. The cotangent
entering each piece comes from a pre-pass kernel (the adjoint over the piece
from a zero end cotangent, and the piece's total decay) chained in XLA; the
adjoint is linear in it, so this is exact up to rounding.

Three backward kernels (`bwd_variant`; BWD_VARIANT is the default): 1 `_ss_bwd_call` as
described above; 2 `_ss_bwd_call_v2`, the same passes with fewer instructions (below); 3 the
same kernel with select-free dB/dC sums at N = 16 (`_RotRow`; other N run 2).

Where the backward's time goes (issue 22; Mamba-1 LM at B 8, L 2048, D 1536, N 16, bf16,
H100/H200, 132 SMs; per token and channel unless said; estimates from the code, not a
profile, except where a measurement is named):

* HBM. Minimum for a fused backward: read u, delta, z, dout, write du, ddelta, dz: 14 B
  (bf16). Ours: the main kernel reads those 8 B plus the saved states (N * 4 / 16 = 4 B)
  and writes 6 B plus the per-block dB/dC partials (2N * 4 / 128 = 1 B, summed by XLA:
  1 B more); the pre-pass reads delta, dout, z (6 B) on (S - 1) / S of the tokens (S = 8
  at this shape: 5.25 B). About 25 B in all, 630 MB per layer at B 8: 0.15 ms at 4 TB/s,
  against ~0.8 ms measured (1.64 ms per layer at B 16 x 2048: 31.9% of the 10.28 ms
  two-layer step, results/train_step_h200.txt call D; fwd+bwd - fwd = 0.54 ms at B 4,
  results/pallas_scan_h100.txt). Not bandwidth-bound (~5x off).
* Instructions (warp instructions per warp-token, i.e. 32 channels x 1 token), v1: pass 3,
  the adjoint, ~456 (9 per state for the adjoint itself: 144; the dB/dC butterfly: 31
  shuffles + 31 adds + 62 selects; N loads each of h, B, C; the decays N exp2 and the
  rebuilt h_t 2N; softplus, sigmoids, stores); the two state-rebuild passes ~173 (1.5
  advances per token: pass 1 over 12 of 16 tokens, pass 2 over 3 of every 4, each with
  its softplus and N exp2); the pre-pass ~95 on 7/8 of the tokens; ~730 in all. At 4
  issues per clock per SM (132 SMs, ~1.98 GHz) that is ~0.55 ms at B 8: close to the
  ~0.8 ms measured, so issue slots are the bound. MUFU: ~75 ex2/lg2/rcp per warp-token
  (3.5N exp2 in all), at 16 lanes per clock per SM ~0.45 ms: close behind.
* Recomputation: states are rebuilt 2.5 times per token in the main kernel (passes 1, 2
  and the h_t of pass 3) plus the pre-pass's decays (3.4N exp2 per token against N for
  one decay per token); softplus 3 times per token plus once in the pre-pass.
* Serial dependency per CTA: L / S = 256 tokens (16 tiles) in order; within a token the N
  states are independent (16-way ILP), but v1 ran pass 3 one token per loop iteration,
  each ending in the butterfly's 5 dependent shuffle rounds (~125 cycles) at a back edge.
* Parallelism: 12 x 8 = 96 CTAs of 4 warps; two fit an SM (shared memory ~110 KB; 194
  registers a thread in the last Nsight Compute profile, of an earlier version), i.e. 8
  warps per SM, 2 per scheduler: little latency hiding, which
  is why the instruction stream has to be dense. S = 8 gives 768 CTAs over 264 slots (2.9
  waves); the pre-pass costs ~11% of the instructions for that parallelism.

So the lever looked like instructions per token, not bytes. v2 (`_ss_bwd_call_v2`): delta
(softplus) once per token in pass 1 into a shared-memory cache (passes 2 and 3 read it:
~24 fewer); the history holds the state after each token, so pass 3 reads h_t instead of
rebuilding it and the dA/ddelta term is gh (h_t - du B_t) (2N = 32 fewer); the last
token's h_t is the next sub-tile's entry or the next tile's saved state (no copies; the
freed rows hold the cache, so shared memory is not above v1's); pass 3 unrolled over the
SUB tokens of a sub-tile (static offsets; the shuffle tail can overlap the next token's
arithmetic); the dB/dC TMA store double-buffered instead of waited for every tile; the
divisions of softplus and the sigmoids (IEEE div.rn / rcp.rn, ~8 instructions each) as
rsqrt(y)^2 (`_recip_pos`: one MUFU op; also in v2's pre-pass and in the forward, which all
variants share). About -85 instructions (-12%) and -13% MUFU per warp-token. v3 adds, at
N = 16, the rotated state order of `_RotRow`: the dB/dC sums without selects (-60 more,
~-20% against v1). These are instruction counts read off the code. Measured (H200,
2026-12-03, bf16, this shape; results/README.md): v3's backward 0.943 ms against v1's 0.987
(1.05x for ~8% fewer instructions than v2's count), so at 8 warps per SM latency binds more
than issue slots; v2 unmeasured. BWD_VARIANT stays 1 until v2/v3 are timed and checked
against XLA on the GPU in f32 and bf16 (scripts/gpu/ss_check.py).
Left for later: splitting N over two warpgroups (twice the warps per SM, at the price of
duplicated per-channel work), the f32 tiles' single prefetch stage (f32 only), and the
segment count's cost model (scripts/gpu/ss_bwd_ab.py --segments sweeps it).

Constraints (else `check_supported` raises ValueError; impl="auto" then takes the XLA
path): N in {4, 8, 16} and each group of D / G channels a multiple of 128; float32 or
bfloat16. (Split out of the former scan_pallas.py, which held both scans.)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.experimental.mosaic.gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, memref, nvvm, vector

from ssm.ops import _impl, _pallas
from ssm.ops._scan_tiles import (BLOCK_D, CHUNK, F32, LINE, ScanCfg, pad_len, pad_time, params,
                                 stage_count, unrolled)

BWD_TILE = 16  # tokens per tile of the backward (the forward saves a state each)
SUB = 4  # tokens per history sub-tile in the backward
_BWD_SMEM = 110 * 1024  # two backward CTAs per SM (228 KB, 1 KB reserved per CTA)
SS_STATES = (4, 8, 16)
# The backward kernel by default: 1 `_ss_bwd_call` (the one checked against XLA on the GPU);
# 3 measured 1.05x faster on the H200 in bf16, 2 unmeasured there (results/README.md).
BWD_VARIANT = 1
_WARP = 32
_WARPS = BLOCK_D // _WARP
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_PAD_DELTA = -1.0e4  # softplus(-1e4 + bias) == 0 in float32: a padded token is an identity step


def check_supported(u, A, B) -> None:
  """ValueError when the kernel cannot take these shapes/dtypes. B is (b, l, g, n)."""
  d_inner, n_state = A.shape
  groups = B.shape[2]
  if n_state not in SS_STATES:
    raise ValueError(f"selective_scan (pallas): N = {n_state} (the kernel takes N in {SS_STATES})")
  if d_inner % BLOCK_D or (d_inner // groups) % BLOCK_D:
    raise ValueError(f"selective_scan (pallas): D = {d_inner} with {groups} group(s): each group "
                     f"of channels must be a multiple of {BLOCK_D}")
  if jnp.dtype(u.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"selective_scan (pallas): dtype {u.dtype} (float32 or bfloat16)")


@dataclasses.dataclass(frozen=True)
class _SSCfg(ScanCfg):
  n_state: int
  groups: int
  softplus: bool
  has_z: bool
  save_states: bool
  bwd_segments: int = 1  # parallel pieces of each sequence in the backward
  true_len: int = 0  # the unpadded length (0: seq_len)
  bwd_variant: int = 2  # 2: `_ss_bwd_call_v2` (default); 1: the previous `_ss_bwd_call`

  @property
  def group_blocks(self) -> int:  # channel blocks per group
    return self.dim // self.groups // BLOCK_D


def _softplus(x):
  """log(1 + e^x) with log1p accuracy (log(w) e / (w - 1), w = 1 + e), x for x > 20."""
  e = jnp.exp(jnp.minimum(x, 20.0))
  w = 1.0 + e
  lp = jnp.where(w == 1.0, e, jnp.log(w) * (e / (w - 1.0)))
  return jnp.where(x > 20.0, x, lp)


def _recip_pos(y):
  """1 / y for y > 0 (inf -> 0) as rsqrt(y)^2: one MUFU rsqrt under approx_math (relative
  error ~3e-7), where a division lowers to IEEE div.rn / rcp.rn (a reciprocal seed, Newton
  steps and a range check: about 8 instructions)."""
  r = lax.rsqrt(y)
  return r * r


def _softplus_fast(x):
  """`_softplus` with its division by `_recip_pos`."""
  e = jnp.exp(jnp.minimum(x, 20.0))
  w = 1.0 + e
  lp = jnp.where(w == 1.0, e, jnp.log(w) * (e * _recip_pos(w - 1.0)))
  return jnp.where(x > 20.0, x, lp)


def _sigmoid_fast(x):
  """sigmoid(x) = 1 / (1 + e^-x) by `_recip_pos` (0 where e^-x overflows)."""
  return _recip_pos(1.0 + jnp.exp(-x))


def _ss_tiles(cfg: _SSCfg, names, refs, smem, bars, bi, gi, cols, n, slot, size=CHUNK):
  rows = pl.ds(n * size, size)
  for name in names:
    plgpu.copy_gmem_to_smem(refs[name].at[bi, rows, cols], smem[name].at[slot], bars.at[slot])
  for name in ("bm", "cm"):
    plgpu.copy_gmem_to_smem(refs[name].at[bi, gi, rows], smem[name].at[slot], bars.at[slot])


@functools.partial(jax.jit, static_argnums=0)
def _ss_fwd_call(cfg: _SSCfg, u, dt, z, bm, cm, bias, dskip, a2t, h0t):
  """u, dt, z (B, Lp, D); bm, cm (B, G, Lp, N) f32; bias, dskip (D,); a2t (N, D) = A log2(e)
  transposed; h0t (B, N, D). Returns y (B, Lp, D) u.dtype, final (B, N, D) f32 and, with
  save_states, the state entering every BWD_TILE tokens and, last, the final state
  (B, Lp / BWD_TILE + 1, N, D) f32 (slot n + 1 is tile n's exit for the v2 backward)."""
  N, nt = cfg.n_state, cfg.n_tiles
  interp = cfg.interpret
  tile_names = ["u", "dt"] + (["z"] if cfg.has_z else [])
  arrays = dict(u=u, dt=dt, z=z, bm=bm, cm=cm)
  per_stage = sum(CHUNK * BLOCK_D * arrays[k].dtype.itemsize for k in tile_names) + 2 * CHUNK * N * 4
  stages = stage_count(nt, per_stage)
  out_type = [jax.ShapeDtypeStruct(u.shape, u.dtype),
              jax.ShapeDtypeStruct((cfg.batch, N, cfg.dim), F32)]
  if cfg.save_states:
    out_type.append(jax.ShapeDtypeStruct((cfg.batch, cfg.seq_len // BWD_TILE + 1, N, cfg.dim),
                                         F32))
  smem_names = tile_names + ["bm", "cm"]
  scratch = [plgpu.SMEM((stages, CHUNK, BLOCK_D), arrays[k].dtype) for k in tile_names]
  scratch += [plgpu.SMEM((stages, CHUNK, N), F32)] * 2
  scratch.append(plgpu.Barrier(num_arrivals=len(smem_names), num_barriers=stages))
  in_names = tile_names + ["bm", "cm", "bias", "dskip", "a2t", "h0t"]
  out_names = ["y", "final"] + (["states"] if cfg.save_states else [])

  def body(*all_refs):
    refs = dict(zip(in_names + out_names, all_refs))
    smem = dict(zip(smem_names, all_refs[len(in_names) + len(out_names):]))
    bars = all_refs[-1]
    di, bi = lax.axis_index("d"), lax.axis_index("b")
    gi = di // cfg.group_blocks
    cols = pl.ds(di * BLOCK_D, BLOCK_D)
    fetch = functools.partial(_ss_tiles, cfg, tile_names, refs, smem, bars, bi, gi, cols)
    for i in range(stages):
      fetch(i, i)
    vec = lambda r: _pallas.load(r, LINE, interp)
    bias, dskip = vec(refs["bias"].at[cols]), vec(refs["dskip"].at[cols])
    a2 = [vec(refs["a2t"].at[j, cols]) for j in range(N)]
    h = tuple(vec(refs["h0t"].at[bi, j, cols]) for j in range(N))

    def tile(n, h):
      slot = lax.rem(n, stages)
      plgpu.barrier_wait(bars.at[slot])
      bm_s, cm_s = smem["bm"].at[slot], smem["cm"].at[slot]

      def token(t, h):
        x = vec(smem["dt"].at[slot, t]).astype(F32) + bias
        delta = _softplus_fast(x) if cfg.softplus else x
        uu = vec(smem["u"].at[slot, t]).astype(F32)
        du = delta * uu
        y = dskip * uu
        h = list(h)
        for j in range(N):
          h[j] = jnp.exp2(delta * a2[j]) * h[j] + du * bm_s[t, j]
          y = y + h[j] * cm_s[t, j]
        if cfg.has_z:
          zz = vec(smem["z"].at[slot, t]).astype(F32)
          y = y * (zz * _sigmoid_fast(zz))
        refs["y"][bi, n * CHUNK + t, cols] = y.astype(refs["y"].dtype)
        return tuple(h)

      for part in range(CHUNK // BWD_TILE):
        if cfg.save_states:
          for j in range(N):
            refs["states"][bi, n * (CHUNK // BWD_TILE) + part, j, cols] = h[j]
        h = unrolled(BWD_TILE, lambda t, h, o=part * BWD_TILE: token(o + t, h), h)
      plgpu.commit_smem()

      @pl.when(n + stages < nt)
      def _():
        fetch(n + stages, slot)

      return h

    h = lax.fori_loop(0, nt, tile, h)
    for j in range(N):
      refs["final"][bi, j, cols] = h[j]
      if cfg.save_states:
        refs["states"][bi, cfg.seq_len // BWD_TILE, j, cols] = h[j]

  call = _pallas.kernel(body, interpret=interp, out_type=tuple(out_type),
                        grid=(cfg.dim // BLOCK_D, cfg.batch), grid_names=("d", "b"),
                        scratch_types=scratch, compiler_params=params(),
                        kernel_name="selective_scan_fwd")
  arrays.update(bias=bias, dskip=dskip, a2t=a2t, h0t=h0t)
  return call(*(arrays[k] for k in in_names))


# -- channel sums of the backward's dB/dC terms: a butterfly across each warp's 32 lanes ---------
#
# A thread holds one channel's 32 products of a row (2N per token, 32 / 2N tokens). Five
# reduce-scatter steps over lanes 16, 8, 4, 2, 1 apart each halve the values a lane keeps and
# add its partner's other half; lane l then holds its warp's sum of product l (31 shuffles
# per row instead of 32 x 32 shared-memory round trips). The four warps' rows are added once
# per tile. In interpret mode the same steps run on the (128,) value arrays, lane exchange
# by reshaping, so the bookkeeping is tested on the CPU.


def _lane_swap(x, dist: int):
  """x[i ^ dist] for a (128,) array (interpret mode's shfl.bfly)."""
  return x.reshape(-1, 2, dist)[:, ::-1, :].reshape(x.shape)


def _bfly_interp(dist: int, vals):
  upper = (jnp.arange(BLOCK_D) & dist) != 0
  m = len(vals) // 2
  return [jnp.where(upper, hi, lo) + _lane_swap(jnp.where(upper, lo, hi), dist)
          for lo, hi in zip(vals[:m], vals[m:])]


def _mgpu_bfly(dist: int, vals):
  """One step on MLIR scalars (one per thread): lanes with bit `dist` keep the upper half."""
  i32 = ir.IntegerType.get_signless(32)
  lane = arith.andi(mgpu_utils.thread_idx(), mgpu_utils.c(_WARP - 1, i32))
  upper = arith.cmpi(arith.CmpIPredicate.ne, arith.andi(lane, mgpu_utils.c(dist, i32)),
                     mgpu_utils.c(0, i32))
  m = len(vals) // 2
  out = []
  for lo, hi in zip(vals[:m], vals[m:]):
    mine, theirs = arith.select(upper, hi, lo), arith.select(upper, lo, hi)
    out.append(arith.addf(mine, mgpu_utils.shfl_bfly(theirs, dist)))
  return out


def _one_reg(x):  # the thread's single element of a (128,) LINE array
  return vector.extract(x.registers.flat[0], dynamic_position=[],
                        static_position=ir.DenseI64ArrayAttr.get([0]))


@plgpu.inline_mgpu(arg_types=(LINE, LINE),
                   return_type=plgpu.ShapeDtypeStruct((BLOCK_D,), F32, layout=LINE))
def _first_step_gpu(ctx, lo, hi):
  del ctx
  (v,) = _mgpu_bfly(_WARP // 2, [_one_reg(lo), _one_reg(hi)])
  regs = lo.registers.copy()
  regs.flat[0] = vector.broadcast(regs.flat[0].type, v)
  return mgpu.FragmentedArray(_registers=regs, _layout=lo.layout, _is_signed=None)


@plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) + (LINE,) * (_WARP // 2))
def _finish_gpu(ctx, row_ref, *parts):
  """Steps 8..1, then lane l of warp w stores its sum of product l at row_ref[w, l]."""
  del ctx
  vals = [_one_reg(p) for p in parts]
  dist = _WARP // 4
  while dist:
    vals = _mgpu_bfly(dist, vals)
    dist //= 2
  i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
  tid = mgpu_utils.thread_idx()
  lane = arith.andi(tid, mgpu_utils.c(_WARP - 1, i32))
  warp = arith.andi(arith.shrui(tid, mgpu_utils.c(5, i32)), mgpu_utils.c(_WARPS - 1, i32))
  memref.store(vals[0], row_ref, [arith.index_cast(index, warp), arith.index_cast(index, lane)])


class _WarpRow:
  """Collects the 32 products of one row; pairs 16 apart take the first step as soon as both
  exist (16 partial sums live instead of 32)."""

  def __init__(self, interp: bool):
    self.interp, self.waiting, self.firsts = interp, {}, [None] * (_WARP // 2)

  def put(self, i: int, v):
    other = self.waiting.pop(i ^ (_WARP // 2), None)
    if other is None:
      self.waiting[i] = v
      return
    lo, hi = (v, other) if i < _WARP // 2 else (other, v)
    k = i % (_WARP // 2)
    if self.interp:
      (self.firsts[k],) = _bfly_interp(_WARP // 2, [lo, hi])
    else:
      self.firsts[k] = _first_step_gpu(lo, hi)

  def store(self, row_ref):
    """row_ref: (warps, 32) shared ref; row_ref[w, l] = warp w's sum of product l."""
    assert not self.waiting and all(f is not None for f in self.firsts)
    if self.interp:
      vals, dist = self.firsts, _WARP // 4
      while dist:
        vals = _bfly_interp(dist, vals)
        dist //= 2
      row_ref[...] = vals[0].reshape(_WARPS, _WARP)
    else:
      _finish_gpu(row_ref, *self.firsts)
    self.firsts = [None] * (_WARP // 2)


# -- select-free channel sums for N = 16 (backward variant 3) ------------------------------------
#
# The butterfly above spends two selects per pair and step (62 per row of 32 products). With
# N = 16 a token's 32 products are (dC_j, dB_j) for j < 16, put at position p = 2j + c (c = 0
# for dC, 1 for dB). Lane l of a warp works in a rotated state order: its "virtual" state v
# is the real state (v + x_l) mod 16, x_l = l // 2 (A, the cotangents, B and C are read in
# that order: B and C from rows stored twice, so the rotation is a per-lane base offset).
# Then in the first four reduce-scatter steps every lane keeps the lower half of its values
# and adds the upper half of lane l - m (m = 16, 8, 4, 2 in slot units), which holds the same
# real positions: an indexed shuffle and an add, no select. The last step (lanes 1 apart,
# dC against dB) is the plain butterfly. Lane l ends with the warp's sum of position l.


def _rot_x(interp_lanes):
  """x_l = (lane % 32) // 2 for each of the 128 threads (interpret mode: an int array)."""
  return (interp_lanes % _WARP) // 2


def _lane_rot_interp(x, m: int):
  """y[l] = x[(l - m) mod 32] within each warp (interpret mode's indexed shuffle)."""
  return jnp.roll(x.reshape(_WARPS, _WARP), m, axis=1).reshape(x.shape)


def _shfl_sync_idx(x, src):
  i32 = ir.IntegerType.get_signless(32)
  xi = arith.bitcast(i32, x)
  args = (mgpu_utils.c(0xFFFFFFFF, i32), xi, src, mgpu_utils.c(0x1F, i32), nvvm.ShflKind.idx)
  first_param, *_ = inspect.signature(nvvm.shfl_sync).parameters.keys()
  y = (nvvm.shfl_sync(i32, *args) if first_param != "thread_mask"
       else nvvm.shfl_sync(*args, results=[i32]))
  return arith.bitcast(x.type, y)


def _mgpu_lane():
  i32 = ir.IntegerType.get_signless(32)
  return arith.andi(mgpu_utils.thread_idx(), mgpu_utils.c(_WARP - 1, i32))


def _mgpu_rot_step(m: int, vals):
  """vals[k] + (vals[k + m/2... ] of lane l - m): one select-free step on MLIR scalars."""
  i32 = ir.IntegerType.get_signless(32)
  src = arith.andi(arith.subi(_mgpu_lane(), mgpu_utils.c(m, i32)), mgpu_utils.c(_WARP - 1, i32))
  h = len(vals) // 2
  return [arith.addf(lo, _shfl_sync_idx(hi, src)) for lo, hi in zip(vals[:h], vals[h:])]


def _as_line(like, v):
  regs = like.registers.copy()
  regs.flat[0] = vector.broadcast(regs.flat[0].type, v)
  return mgpu.FragmentedArray(_registers=regs, _layout=like.layout, _is_signed=None)


@plgpu.inline_mgpu(arg_types=(LINE, LINE),
                   return_type=plgpu.ShapeDtypeStruct((BLOCK_D,), F32, layout=LINE))
def _rot_first_gpu(ctx, lo, hi):
  del ctx
  (v,) = _mgpu_rot_step(_WARP // 2, [_one_reg(lo), _one_reg(hi)])
  return _as_line(lo, v)


@plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) + (LINE,) * (_WARP // 2))
def _rot_finish_gpu(ctx, row_ref, *parts):
  """Steps m = 8, 4, 2 (indexed shuffles), then the butterfly 1 apart; lane l of warp w
  stores its sum of position l at row_ref[w, l]."""
  del ctx
  vals = [_one_reg(p) for p in parts]
  for m in (8, 4, 2):
    vals = _mgpu_rot_step(m, vals)
  vals = _mgpu_bfly(1, vals)
  i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
  tid = mgpu_utils.thread_idx()
  warp = arith.andi(arith.shrui(tid, mgpu_utils.c(5, i32)), mgpu_utils.c(_WARPS - 1, i32))
  memref.store(vals[0], row_ref, [arith.index_cast(index, warp),
                                  arith.index_cast(index, _mgpu_lane())])


class _RotRow:
  """`_WarpRow` for the rotated N = 16 layout: put(s, v) with s = 2 * (virtual state) + c."""

  def __init__(self, interp: bool):
    self.interp, self.waiting, self.firsts = interp, {}, [None] * (_WARP // 2)

  def put(self, s: int, v):
    if s < _WARP // 2:
      self.waiting[s] = v
      return
    lo = self.waiting.pop(s - _WARP // 2)
    k = s - _WARP // 2
    if self.interp:
      self.firsts[k] = lo + _lane_rot_interp(v, _WARP // 2)
    else:
      self.firsts[k] = _rot_first_gpu(lo, v)

  def store(self, row_ref):
    assert not self.waiting and all(f is not None for f in self.firsts)
    if self.interp:
      vals = self.firsts
      for m in (8, 4, 2):
        h = len(vals) // 2
        vals = [a + _lane_rot_interp(b, m) for a, b in zip(vals[:h], vals[h:])]
      (v,) = _bfly_interp(1, vals)
      row_ref[...] = v.reshape(_WARPS, _WARP)
    else:
      _rot_finish_gpu(row_ref, *self.firsts)
    self.firsts = [None] * (_WARP // 2)


def _rot_row_gpu(n: int):
  """Loads v_j = row[x_l + j], j < n, from a (2n,) SMEM row (B or C stored twice)."""
  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), LINE),
                     return_type=tuple(plgpu.ShapeDtypeStruct((BLOCK_D,), F32, layout=LINE)
                                       for _ in range(n)))
  def load(ctx, row_ref, like):
    del ctx
    i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
    x = arith.shrui(_mgpu_lane(), mgpu_utils.c(1, i32))
    out = []
    for j in range(n):
      i = arith.index_cast(index, arith.addi(x, mgpu_utils.c(j, i32)))
      out.append(_as_line(like, memref.load(row_ref, [i])))
    return tuple(out)
  return load


def _rot_rows_gpu(n: int):
  """Loads v_j[i] = ref[(j + x_i) mod n, i] from an (n, 128) GMEM view (thread i, channel i)."""
  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), LINE),
                     return_type=tuple(plgpu.ShapeDtypeStruct((BLOCK_D,), F32, layout=LINE)
                                       for _ in range(n)))
  def load(ctx, ref, like):
    del ctx
    i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
    tid = arith.andi(mgpu_utils.thread_idx(), mgpu_utils.c(BLOCK_D - 1, i32))
    x = arith.shrui(_mgpu_lane(), mgpu_utils.c(1, i32))
    col = arith.index_cast(index, tid)
    out = []
    for j in range(n):
      r = arith.andi(arith.addi(x, mgpu_utils.c(j, i32)), mgpu_utils.c(n - 1, i32))
      out.append(_as_line(like, memref.load(ref, [arith.index_cast(index, r), col])))
    return tuple(out)
  return load


_rot_row_cache, _rot_rows_cache = {}, {}


def _rot_load_row(ref, n: int, like, interp: bool):
  """[row[x_i + j] for j < n] (LINE arrays) from the (2n,) SMEM row `ref`."""
  if interp:
    x = _rot_x(jnp.arange(BLOCK_D))
    vals = ref[...][x[:, None] + jnp.arange(n)[None, :]]
    return tuple(vals[:, j] for j in range(n))
  if n not in _rot_row_cache:
    _rot_row_cache[n] = _rot_row_gpu(n)
  return _rot_row_cache[n](ref, like)


def _rot_load_rows(ref, n: int, like, interp: bool):
  """[ref[(j + x_i) mod n, i] for j < n] (LINE arrays) from the (n, 128) view `ref`."""
  if interp:
    x = _rot_x(jnp.arange(BLOCK_D))
    idx = (jnp.arange(n)[:, None] + x[None, :]) % n
    vals = jnp.take_along_axis(ref[...], idx, axis=0)
    return tuple(vals[j] for j in range(n))
  if n not in _rot_rows_cache:
    _rot_rows_cache[n] = _rot_rows_gpu(n)
  return _rot_rows_cache[n](ref, like)


def _rot_index(dim: int, n: int, inverse: bool = False):
  """(n, dim) rows: virtual state v of channel d is real (v + x_d) mod n (inverse: real ->
  virtual), x_d = (d % 32) // 2."""
  x = _rot_x(jnp.arange(dim))
  v = jnp.arange(n)[:, None]
  return ((v - x[None, :]) if inverse else (v + x[None, :])) % n


def bwd_segments_for(batch: int, dim: int, n_tiles: int, num_sms: int) -> int:
  """Segments per sequence for the selective-scan backward: (D / 128) * batch CTAs alone can
  leave SMs idle (48 of 132 at B 4, D 1536). Minimises the estimated time in units of an
  unsplit row: waves of the main kernel over S and the adjoint pre-pass on S - 1 segments
  (about a fifth of the main kernel's cost per token). S divides the BWD_TILE-token tiles;
  S <= 16."""
  ctas, slots = (dim // BLOCK_D) * batch, 2 * num_sms  # two backward CTAs fit an SM

  def cost(s):
    return (-(-ctas * s // slots) + 0.2 * -(-ctas * (s - 1) // slots)) / s

  best = 1
  for s in range(2, 17):
    if n_tiles % s == 0 and cost(s) < cost(best) - 1e-9:
      best = s
  return best


@functools.partial(jax.jit, static_argnums=(0, 1))
def _ss_seg_call(cfg: _SSCfg, segments: int, dt, z, dout, cm, bias, a2t):
  """The adjoint over segments 1 .. S-1 of each sequence from a zero cotangent at the
  segment's end, and the segment's decay exp2(a2 * sum(delta)) (B, S - 1, N, D) each: the
  cotangent entering segment s is gloc[s - 1] + decay[s - 1] * (the one at its end)."""
  N, per = cfg.n_state, cfg.seq_len // BWD_TILE // segments
  interp = cfg.interpret
  fast = cfg.bwd_variant >= 2  # reciprocals by rsqrt (v1 keeps its divisions, for A/B)
  tile_names = ["dt", "dout"] + (["z"] if cfg.has_z else [])
  arrays = dict(dt=dt, z=z, dout=dout, cm=cm)
  per_stage = sum(BWD_TILE * BLOCK_D * arrays[k].dtype.itemsize for k in tile_names) + BWD_TILE * N * 4
  stages = stage_count(per, per_stage)
  shape = jax.ShapeDtypeStruct((cfg.batch, segments - 1, N, cfg.dim), F32)
  smem_names = tile_names + ["cm"]
  scratch = [plgpu.SMEM((stages, BWD_TILE, BLOCK_D), arrays[k].dtype) for k in tile_names]
  scratch += [plgpu.SMEM((stages, BWD_TILE, N), F32),
              plgpu.Barrier(num_arrivals=len(smem_names), num_barriers=stages)]
  in_names = tile_names + ["cm", "bias", "a2t"]

  def body(*all_refs):
    refs = dict(zip(in_names + ["gloc", "decay"], all_refs))
    smem = dict(zip(smem_names, all_refs[len(in_names) + 2:]))
    bars = all_refs[-1]
    di, bi, sp = lax.axis_index("d"), lax.axis_index("b"), lax.axis_index("s")
    gi = di // cfg.group_blocks
    cols = pl.ds(di * BLOCK_D, BLOCK_D)
    last = (sp + 1) * per + per - 1  # this segment's last tile

    def fetch(step, slot):
      rows = pl.ds((last - step) * BWD_TILE, BWD_TILE)
      for name in tile_names:
        plgpu.copy_gmem_to_smem(refs[name].at[bi, rows, cols], smem[name].at[slot], bars.at[slot])
      plgpu.copy_gmem_to_smem(refs["cm"].at[bi, gi, rows], smem["cm"].at[slot], bars.at[slot])

    for i in range(stages):
      fetch(i, i)
    vec = lambda r: _pallas.load(r, LINE, interp)
    bias = vec(refs["bias"].at[cols])
    a2 = [vec(refs["a2t"].at[j, cols]) for j in range(N)]
    zero = 0.0 * bias

    def tile(step, carry):
      slot = lax.rem(step, stages)
      plgpu.barrier_wait(bars.at[slot])

      def token(k, carry):
        g, sumd = carry
        t = BWD_TILE - 1 - k
        x = vec(smem["dt"].at[slot, t]).astype(F32) + bias
        delta = (_softplus_fast if fast else _softplus)(x) if cfg.softplus else x
        dy = vec(smem["dout"].at[slot, t]).astype(F32)
        if cfg.has_z:
          zz = vec(smem["z"].at[slot, t]).astype(F32)
          dy = dy * (zz * (_sigmoid_fast if fast else jax.nn.sigmoid)(zz))
        g = tuple((g[j] + dy * smem["cm"][slot, t, j]) * jnp.exp2(delta * a2[j]) for j in range(N))
        return g, sumd + delta

      carry = unrolled(BWD_TILE, token, carry)
      plgpu.commit_smem()  # every thread is done with the slot

      @pl.when(step + stages < per)
      def _():
        fetch(step + stages, slot)

      return carry

    g, sumd = lax.fori_loop(0, per, tile, (tuple(zero for _ in range(N)), zero))
    for j in range(N):
      refs["gloc"][bi, sp, j, cols] = g[j]
      refs["decay"][bi, sp, j, cols] = jnp.exp2(a2[j] * sumd)

  call = _pallas.kernel(body, interpret=interp, out_type=(shape, shape),
                        grid=(cfg.dim // BLOCK_D, cfg.batch, segments - 1),
                        grid_names=("d", "b", "s"), scratch_types=scratch,
                        compiler_params=params(), kernel_name="selective_scan_bwd_segments")
  arrays.update(bias=bias, a2t=a2t)
  return call(*(arrays[k] for k in in_names))


def _segment_cotangents(cfg, segments, dt, z, dout, cm, bias, a2t, dfin_t):
  """The state cotangent leaving each of the `segments` pieces of every sequence
  (B, segments, N, D): `_ss_seg_call`'s local adjoints chained here (last piece: dfin_t)."""
  if segments == 1:
    return dfin_t[:, None]
  gloc, decay = _ss_seg_call(cfg, segments, dt, z, dout, cm, bias, a2t)
  g_in = [dfin_t]  # the cotangent leaving each segment, last segment first
  for s in range(segments - 2, -1, -1):
    g_in.append(gloc[:, s] + decay[:, s] * g_in[-1])
  return jnp.stack(g_in[::-1], axis=1)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _ss_bwd_call(cfg: _SSCfg, segments: int, u, dt, z, dout, bm, cm, bias, dskip, a2t, states,
                 dfin_t):
  """Cotangents of the padded kernel inputs of `_ss_fwd_call`.

  dout (B, Lp, D) (u's dtype); states (B, Lp / BWD_TILE, N, D) from the forward; dfin_t (B, N, D).
  Each sequence runs as `segments` parallel pieces; the cotangent entering each comes from
  `_ss_seg_call` chained here (the adjoint is linear in it).
  Returns du, ddt (B, Lp, D) [, dz] in u's dtype, then float32: dbc (B, D / 128, Lp * 2N) (per
  channel block and token: N terms of dC then N of dB), ddskip, dbias (B, D), dA (B, N, D),
  dh0 (B, N, D). ddt is w.r.t. the pre-softplus delta + bias; dbias is its sum over time.
  """
  N, nt, bsz, dim = cfg.n_state, cfg.seq_len // BWD_TILE, cfg.batch, cfg.dim
  per = nt // segments
  width = 2 * N
  group = _WARP // width  # tokens per row of 32 products
  assert _WARP % width == 0 and SUB % group == 0 and nt % segments == 0, (N, segments)
  interp = cfg.interpret
  g_in = _segment_cotangents(cfg, segments, dt, z, dout, cm, bias, a2t, dfin_t)
  tile_names = ["u", "dt"] + (["z"] if cfg.has_z else []) + ["dout"]
  arrays = dict(u=u, dt=dt, z=z, dout=dout, bm=bm, cm=cm)
  red_len = BWD_TILE * width
  fixed = (BWD_TILE // SUB + SUB) * N * BLOCK_D * 4 + (_WARPS + 1) * red_len * 4
  per_stage = sum(BWD_TILE * BLOCK_D * arrays[k].dtype.itemsize for k in tile_names) + 2 * BWD_TILE * N * 4
  stages = stage_count(per, per_stage, fixed, most=2, budget=_BWD_SMEM)
  big = jax.ShapeDtypeStruct((bsz, cfg.seq_len, dim), u.dtype)  # written once, in u's dtype
  per_seg = lambda *shape: jax.ShapeDtypeStruct((bsz, segments) + shape, F32)
  out_names = ["du", "ddt"] + (["dz"] if cfg.has_z else []) + ["dbc", "ddskip", "dbias", "da",
                                                                 "dh0"]
  out_type = [big, big] + ([big] if cfg.has_z else []) + [
      jax.ShapeDtypeStruct((bsz, dim // BLOCK_D, cfg.seq_len * width), F32),
      per_seg(dim), per_seg(dim), per_seg(N, dim), per_seg(N, dim)]
  smem_names = tile_names + ["bm", "cm"]
  scratch = [plgpu.SMEM((stages, BWD_TILE, BLOCK_D), arrays[k].dtype) for k in tile_names]
  scratch += [plgpu.SMEM((stages, BWD_TILE, N), F32)] * 2
  scratch += [plgpu.SMEM((BWD_TILE // SUB, N, BLOCK_D), F32),  # state entering each sub-tile
              plgpu.SMEM((SUB, N, BLOCK_D), F32),  # state entering each token of a sub-tile
              plgpu.SMEM((_WARPS, red_len), F32),  # per-warp channel sums of the tile's rows
              plgpu.SMEM((red_len,), F32),  # the CTA's sums for the tile
              plgpu.Barrier(num_arrivals=len(smem_names), num_barriers=stages)]
  in_names = tile_names + ["bm", "cm", "bias", "dskip", "a2t", "states", "g_in"]
  red_line = plgpu.Layout.WG_STRIDED((red_len,), vec_size=1)

  def body(*all_refs):
    refs = dict(zip(in_names + out_names, all_refs))
    rest = all_refs[len(in_names) + len(out_names):]
    smem = dict(zip(smem_names, rest))
    subs, hist, part, red, bars = rest[len(smem_names):]
    di, bi, sg = lax.axis_index("d"), lax.axis_index("b"), lax.axis_index("s")
    gi = di // cfg.group_blocks
    cols = pl.ds(di * BLOCK_D, BLOCK_D)
    last = sg * per + per - 1  # the segment's last tile
    fetch = functools.partial(_ss_tiles, cfg, tile_names, refs, smem, bars, bi, gi, cols)
    for i in range(stages):
      fetch(last - i, i, size=BWD_TILE)
    vec = lambda r: _pallas.load(r, LINE, interp)
    bias, dskip = vec(refs["bias"].at[cols]), vec(refs["dskip"].at[cols])
    a2 = [vec(refs["a2t"].at[j, cols]) for j in range(N)]
    zero = 0.0 * bias
    g0 = tuple(vec(refs["g_in"].at[bi, sg, j, cols]) for j in range(N))
    acc0 = (tuple(zero for _ in range(N)), zero, zero)  # dA terms, dD, dbias

    def tile(step, carry):
      n = last - step
      slot = lax.rem(step, stages)
      plgpu.barrier_wait(bars.at[slot])
      tiles = {k: smem[k].at[slot] for k in smem_names}

      def inputs(t):
        x = vec(tiles["dt"].at[t]).astype(F32) + bias
        delta = _softplus(x) if cfg.softplus else x
        return x, delta, vec(tiles["u"].at[t]).astype(F32)

      def advance(h, t):
        _, delta, uu = inputs(t)
        du = delta * uu
        return [jnp.exp2(delta * a2[j]) * h[j] + du * tiles["bm"][t, j] for j in range(N)]

      def entry(s, h):  # pass 1: the state entering every sub-tile
        for j in range(N):
          subs[s, j, :] = h[j]
        return unrolled(SUB, lambda r, h: tuple(advance(h, s * SUB + r)), h, unroll=2)

      h = tuple(vec(refs["states"].at[bi, n, j, cols]) for j in range(N))
      h = lax.fori_loop(0, BWD_TILE // SUB - 1, entry, h)
      for j in range(N):
        subs[BWD_TILE // SUB - 1, j, :] = h[j]

      def back_token(s, r, k, row, carry):
        """The adjoint step at token t = s * SUB + r; its dC/dB terms go to `row` (a _WarpRow)
        from position k * 2N on (k: the token's static place in the row)."""
        g, (da, dd, db) = carry
        g, da = list(g), list(da)
        t = s * SUB + r
        pos = n * BWD_TILE + t
        q = k * width
        x, delta, uu = inputs(t)
        du = delta * uu
        hp = [vec(hist.at[r, j]) for j in range(N)]
        dec = [jnp.exp2(delta * a2[j]) for j in range(N)]
        bt = [tiles["bm"][t, j] for j in range(N)]
        ct = [tiles["cm"][t, j] for j in range(N)]
        ht = [dec[j] * hp[j] + du * bt[j] for j in range(N)]
        dout = vec(tiles["dout"].at[t]).astype(F32)
        if cfg.has_z:
          y = dskip * uu
          for j in range(N):
            y = y + ht[j] * ct[j]
          zz = vec(tiles["z"].at[t]).astype(F32)
          sgm = jax.nn.sigmoid(zz)
          dy = dout * (zz * sgm)
          refs["dz"][bi, pos, cols] = (dout * y * (sgm * (1.0 + zz * (1.0 - sgm)))).astype(
              refs["dz"].dtype)
        else:
          dy = dout
        dd = dd + dy * uu
        d_du = zero  # cotangent of delta * u
        d_dec_a = zero  # sum_j d(dec_j) dec_j a2_j, the delta term of the decays
        for j in range(N):
          gh = g[j] + dy * ct[j]  # total cotangent of h_t[j]
          row.put(q + j, dy * ht[j])  # dC_t[j] term
          row.put(q + N + j, gh * du)  # dB_t[j] term
          d_du = d_du + gh * bt[j]
          gdec = gh * hp[j] * dec[j]
          da[j] = da[j] + gdec * delta
          d_dec_a = d_dec_a + gdec * a2[j]
          g[j] = gh * dec[j]
        ddelta = d_dec_a * _LN2 + d_du * uu
        if cfg.softplus:
          ddelta = ddelta * jnp.where(x > 20.0, 1.0, jax.nn.sigmoid(x))
        refs["ddt"][bi, pos, cols] = ddelta.astype(refs["ddt"].dtype)
        refs["du"][bi, pos, cols] = (dy * dskip + d_du * delta).astype(refs["du"].dtype)
        if not cfg.softplus and 0 < cfg.true_len < cfg.seq_len:
          # a padded step (delta = 0) still sees the final state's cotangent: not part of dbias
          ddelta = ddelta * (pos < cfg.true_len).astype(F32)
        return tuple(g), (tuple(da), dd, db + ddelta)

      def sub_back(k, carry):  # pass 2, sub-tiles last first
        s = BWD_TILE // SUB - 1 - k

        def remember(r, h):  # the state entering each token of the sub-tile
          for j in range(N):
            hist[r, j, :] = h[j]
          return tuple(advance(h, s * SUB + r))

        h = lax.fori_loop(0, SUB - 1, remember, tuple(vec(subs.at[s, j]) for j in range(N)))
        for j in range(N):
          hist[SUB - 1, j, :] = h[j]

        def token_row(i, carry):  # `group` tokens (one row of 32 products), last first
          r0 = (SUB // group - 1 - i) * group
          row = _WarpRow(interp)
          for q in reversed(range(group)):
            carry = back_token(s, r0 + q, q, row, carry)
          row.store(part.at[:, pl.ds((s * SUB + r0) * width, _WARP)])
          return carry

        return lax.fori_loop(0, SUB // group, token_row, carry)

      carry = lax.fori_loop(0, BWD_TILE // SUB, sub_back, carry)
      plgpu.commit_smem()  # the slot is read and every warp's row sums are stored

      @pl.when(step + stages < per)
      def _():
        fetch(n - stages, slot, size=BWD_TILE)

      total = _pallas.load(part.at[0], red_line, interp)
      for w in range(1, _WARPS):
        total = total + _pallas.load(part.at[w], red_line, interp)
      red[...] = total
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(red, refs["dbc"].at[bi, di, pl.ds(n * red_len, red_len)])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      return carry

    g, (da, dd, db) = lax.fori_loop(0, per, tile, (g0, acc0))
    plgpu.wait_smem_to_gmem(0)
    for j in range(N):
      refs["dh0"][bi, sg, j, cols] = g[j]
      refs["da"][bi, sg, j, cols] = da[j]
    refs["ddskip"][bi, sg, cols] = dd
    refs["dbias"][bi, sg, cols] = db

  call = _pallas.kernel(body, interpret=interp, out_type=tuple(out_type),
                        grid=(dim // BLOCK_D, bsz, segments), grid_names=("d", "b", "s"),
                        scratch_types=scratch, compiler_params=params(),
                        kernel_name="selective_scan_bwd")
  arrays.update(bias=bias, dskip=dskip, a2t=a2t, states=states, g_in=g_in)
  outs = list(call(*(arrays[k] for k in in_names)))
  ddskip, dbias, da, dh0 = outs[-4:]
  return outs[:-4] + [ddskip.sum(axis=1), dbias.sum(axis=1), da.sum(axis=1), dh0[:, 0]]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _ss_bwd_call_v2(cfg: _SSCfg, segments: int, u, dt, z, dout, bm, cm, bias, dskip, a2t, states,
                    dfin_t):
  """`_ss_bwd_call` with fewer instructions per token (same operands and results; states
  must hold the final state in its last slot, as `_ss_fwd_call` writes it).

  * delta is computed (softplus included) once per token, in pass 1, into a shared-memory
    row cache; passes 2 and 3 read it back (one load instead of a softplus each).
  * The history holds the state *after* each token (h_t), not before: pass 3 reads h_t
    instead of rebuilding it from h_{t-1} (2N fewer operations), and the dA / ddelta
    term gh dec h_{t-1} becomes gh (h_t - du B_t). The state after a sub-tile's last token
    is the next sub-tile's entry (pass 1 keeps them) or, for the tile's last token, the
    next tile's saved state (`states[n + 1]`), so pass 2 advances SUB - 1 tokens and
    keeps SUB - 1 rows (the freed rows hold the delta cache: same shared memory).
  * Pass 3 is unrolled over the SUB tokens of a sub-tile (static token and history
    offsets, and the scheduler may overlap one token's warp-sum shuffles with the next
    token's arithmetic).
  * Softplus and the sigmoids divide by rsqrt(y)^2 (`_recip_pos`), here and in the
    pre-pass; the tile's dB/dC sums go out by a double-buffered TMA store, not waited for.
  * cfg.bwd_variant == 3 and N == 16: every lane works in a rotated state order and the
    dB/dC warp sums need no selects (`_RotRow`); A, the entering cotangents and the
    saved states are read in that order, dA and dh0 put back in XLA.
  """
  N, nt, bsz, dim = cfg.n_state, cfg.seq_len // BWD_TILE, cfg.batch, cfg.dim
  per = nt // segments
  nsub = BWD_TILE // SUB
  width = 2 * N
  group = _WARP // width  # tokens per row of 32 products
  assert _WARP % width == 0 and SUB % group == 0 and nt % segments == 0, (N, segments)
  assert states.shape[1] == nt + 1, states.shape
  interp = cfg.interpret
  g_in = _segment_cotangents(cfg, segments, dt, z, dout, cm, bias, a2t, dfin_t)
  rot = cfg.bwd_variant == 3 and N == 16  # variant 3: select-free dB/dC sums
  if rot:  # every lane in its rotated state order (see _RotRow); B and C rows stored twice
    idx = _rot_index(dim, N)
    a2t = jnp.take_along_axis(a2t, idx, axis=0)
    g_in = jnp.take_along_axis(g_in, idx[None, None], axis=2)
    bm, cm = jnp.concatenate([bm, bm], axis=-1), jnp.concatenate([cm, cm], axis=-1)
  bcw = bm.shape[-1]
  tile_names = ["u", "dt"] + (["z"] if cfg.has_z else []) + ["dout"]
  arrays = dict(u=u, dt=dt, z=z, dout=dout, bm=bm, cm=cm)
  red_len = BWD_TILE * width
  fixed = ((nsub - 1 + SUB - 1) * N * BLOCK_D * 4 + BWD_TILE * BLOCK_D * 4
           + (_WARPS + 2) * red_len * 4)
  per_stage = sum(BWD_TILE * BLOCK_D * arrays[k].dtype.itemsize for k in tile_names) + 2 * BWD_TILE * bcw * 4
  stages = stage_count(per, per_stage, fixed, most=2, budget=_BWD_SMEM)
  big = jax.ShapeDtypeStruct((bsz, cfg.seq_len, dim), u.dtype)  # written once, in u's dtype
  per_seg = lambda *shape: jax.ShapeDtypeStruct((bsz, segments) + shape, F32)
  out_names = ["du", "ddt"] + (["dz"] if cfg.has_z else []) + ["dbc", "ddskip", "dbias", "da",
                                                                 "dh0"]
  out_type = [big, big] + ([big] if cfg.has_z else []) + [
      jax.ShapeDtypeStruct((bsz, dim // BLOCK_D, cfg.seq_len * width), F32),
      per_seg(dim), per_seg(dim), per_seg(N, dim), per_seg(N, dim)]
  smem_names = tile_names + ["bm", "cm"]
  scratch = [plgpu.SMEM((stages, BWD_TILE, BLOCK_D), arrays[k].dtype) for k in tile_names]
  scratch += [plgpu.SMEM((stages, BWD_TILE, bcw), F32)] * 2
  scratch += [plgpu.SMEM((nsub - 1, N, BLOCK_D), F32),  # state after sub-tiles 0 .. nsub-2
              plgpu.SMEM((SUB - 1, N, BLOCK_D), F32),  # state after tokens 0 .. SUB-2 of one
              plgpu.SMEM((BWD_TILE, BLOCK_D), F32),  # delta of every token of the tile
              plgpu.SMEM((_WARPS, red_len), F32),  # per-warp channel sums of the tile's rows
              plgpu.SMEM((2, red_len), F32),  # the CTA's sums, double-buffered for the TMA store
              plgpu.Barrier(num_arrivals=len(smem_names), num_barriers=stages)]
  in_names = tile_names + ["bm", "cm", "bias", "dskip", "a2t", "states", "g_in"]
  red_line = plgpu.Layout.WG_STRIDED((red_len,), vec_size=1)

  def body(*all_refs):
    refs = dict(zip(in_names + out_names, all_refs))
    rest = all_refs[len(in_names) + len(out_names):]
    smem = dict(zip(smem_names, rest))
    subs, hist, dcache, part, red, bars = rest[len(smem_names):]
    di, bi, sg = lax.axis_index("d"), lax.axis_index("b"), lax.axis_index("s")
    gi = di // cfg.group_blocks
    cols = pl.ds(di * BLOCK_D, BLOCK_D)
    last = sg * per + per - 1  # the segment's last tile
    fetch = functools.partial(_ss_tiles, cfg, tile_names, refs, smem, bars, bi, gi, cols)
    for i in range(stages):
      fetch(last - i, i, size=BWD_TILE)
    vec = lambda r: _pallas.load(r, LINE, interp)
    bias, dskip = vec(refs["bias"].at[cols]), vec(refs["dskip"].at[cols])
    a2 = [vec(refs["a2t"].at[j, cols]) for j in range(N)]
    zero = 0.0 * bias
    g0 = tuple(vec(refs["g_in"].at[bi, sg, j, cols]) for j in range(N))
    acc0 = (tuple(zero for _ in range(N)), zero, zero)  # dA terms, dD, dbias

    def tile(step, carry):
      n = last - step
      slot = lax.rem(step, stages)
      plgpu.barrier_wait(bars.at[slot])
      tiles = {k: smem[k].at[slot] for k in smem_names}
      if rot:
        saved = lambda m: _rot_load_rows(refs["states"].at[bi, m, :, cols], N, bias, interp)
        row_of = lambda name, t: _rot_load_row(tiles[name].at[t], N, bias, interp)
      else:
        saved = lambda m: tuple(vec(refs["states"].at[bi, m, j, cols]) for j in range(N))
        row_of = lambda name, t: [tiles[name][t, j] for j in range(N)]

      def x_of(t):
        return vec(tiles["dt"].at[t]).astype(F32) + bias

      def u_of(t):
        return vec(tiles["u"].at[t]).astype(F32)

      def advance(h, t, delta):
        du = delta * u_of(t)
        bt = row_of("bm", t)
        return tuple(jnp.exp2(delta * a2[j]) * h[j] + du * bt[j] for j in range(N))

      def cache_delta(t):
        x = x_of(t)
        delta = _softplus_fast(x) if cfg.softplus else x
        dcache[t, :] = delta
        return delta

      def entry(s, h):  # pass 1: delta of every token; the state after every sub-tile but the last
        h = unrolled(SUB, lambda r, h: advance(h, s * SUB + r, cache_delta(s * SUB + r)), h,
                     unroll=2)
        for j in range(N):
          subs[s, j, :] = h[j]
        return h

      lax.fori_loop(0, nsub - 1, entry, saved(n))
      for r in range(SUB):
        cache_delta((nsub - 1) * SUB + r)

      def back_token(s, r, k, row, ht, carry):
        """The adjoint step at token t = s * SUB + r (h_t = ht); its dC/dB terms go to `row`
        (a _WarpRow) from position k * 2N on (k: the token's place in the row)."""
        g, (da, dd, db) = carry
        g, da = list(g), list(da)
        t = s * SUB + r
        pos = n * BWD_TILE + t
        q = k * width
        delta = vec(dcache.at[t])
        uu = u_of(t)
        du = delta * uu
        dec = [jnp.exp2(delta * a2[j]) for j in range(N)]
        bt, ct = row_of("bm", t), row_of("cm", t)
        dout = vec(tiles["dout"].at[t]).astype(F32)
        if cfg.has_z:
          y = dskip * uu
          for j in range(N):
            y = y + ht[j] * ct[j]
          zz = vec(tiles["z"].at[t]).astype(F32)
          sgm = _sigmoid_fast(zz)
          dy = dout * (zz * sgm)
          refs["dz"][bi, pos, cols] = (dout * y * (sgm * (1.0 + zz * (1.0 - sgm)))).astype(
              refs["dz"].dtype)
        else:
          dy = dout
        dd = dd + dy * uu
        d_du = zero  # cotangent of delta * u
        d_dec_a = zero  # sum_j d(dec_j) dec_j a2_j, the delta term of the decays
        for j in range(N):
          gh = g[j] + dy * ct[j]  # total cotangent of h_t[j]
          row.put(2 * j if rot else q + j, dy * ht[j])  # dC_t[j] term
          row.put(2 * j + 1 if rot else q + N + j, gh * du)  # dB_t[j] term
          d_du = d_du + gh * bt[j]
          gdec = gh * (ht[j] - du * bt[j])  # gh dec_j h_{t-1}[j]
          da[j] = da[j] + gdec * delta
          d_dec_a = d_dec_a + gdec * a2[j]
          g[j] = gh * dec[j]
        ddelta = d_dec_a * _LN2 + d_du * uu
        if cfg.softplus:
          x = x_of(t)
          ddelta = ddelta * jnp.where(x > 20.0, 1.0, _sigmoid_fast(x))
        refs["ddt"][bi, pos, cols] = ddelta.astype(refs["ddt"].dtype)
        refs["du"][bi, pos, cols] = (dy * dskip + d_du * delta).astype(refs["du"].dtype)
        if not cfg.softplus and 0 < cfg.true_len < cfg.seq_len:
          # a padded step (delta = 0) still sees the final state's cotangent: not part of dbias
          ddelta = ddelta * (pos < cfg.true_len).astype(F32)
        return tuple(g), (tuple(da), dd, db + ddelta)

      def sub_back(k, carry):  # passes 2 and 3, sub-tiles last first
        s = nsub - 1 - k
        h = lax.cond(s == 0, lambda: saved(n),
                     lambda: tuple(vec(subs.at[jnp.maximum(s - 1, 0), j]) for j in range(N)))
        for r in range(SUB - 1):  # pass 2: the state after each token but the last
          h = advance(h, s * SUB + r, vec(dcache.at[s * SUB + r]))
          for j in range(N):
            hist[r, j, :] = h[j]
        h_end = lax.cond(s == nsub - 1, lambda: saved(n + 1),
                         lambda: tuple(vec(subs.at[jnp.minimum(s, nsub - 2), j])
                                       for j in range(N)))
        for i in reversed(range(SUB // group)):  # pass 3: rows of `group` tokens, last first
          row = _RotRow(interp) if rot else _WarpRow(interp)
          for q in reversed(range(group)):
            r = i * group + q
            ht = h_end if r == SUB - 1 else tuple(vec(hist.at[r, j]) for j in range(N))
            carry = back_token(s, r, q, row, ht, carry)
          row.store(part.at[:, pl.ds((s * SUB + i * group) * width, _WARP)])
        return carry

      carry = lax.fori_loop(0, nsub, sub_back, carry)
      # The store sent from this half of `red` two tiles ago has read it (at most the other
      # half's, from the last tile, stays in flight); the barrier below orders it before the
      # writes. No wait per tile for the store just sent.
      plgpu.wait_smem_to_gmem(1, wait_read_only=True)
      plgpu.commit_smem()  # the slot is read and every warp's row sums are stored

      @pl.when(step + stages < per)
      def _():
        fetch(n - stages, slot, size=BWD_TILE)

      total = _pallas.load(part.at[0], red_line, interp)
      for w in range(1, _WARPS):
        total = total + _pallas.load(part.at[w], red_line, interp)
      half = red.at[lax.rem(step, 2)]
      half[...] = total
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(half, refs["dbc"].at[bi, di, pl.ds(n * red_len, red_len)])
      return carry

    g, (da, dd, db) = lax.fori_loop(0, per, tile, (g0, acc0))
    plgpu.wait_smem_to_gmem(0)
    for j in range(N):
      refs["dh0"][bi, sg, j, cols] = g[j]
      refs["da"][bi, sg, j, cols] = da[j]
    refs["ddskip"][bi, sg, cols] = dd
    refs["dbias"][bi, sg, cols] = db

  call = _pallas.kernel(body, interpret=interp, out_type=tuple(out_type),
                        grid=(dim // BLOCK_D, bsz, segments), grid_names=("d", "b", "s"),
                        scratch_types=scratch, compiler_params=params(),
                        kernel_name="selective_scan_bwd_v2")
  arrays.update(bias=bias, dskip=dskip, a2t=a2t, states=states, g_in=g_in)
  outs = list(call(*(arrays[k] for k in in_names)))
  ddskip, dbias, da, dh0 = outs[-4:]
  if rot:  # back to the real state order; dB/dC from (dC_j, dB_j) pairs to [dC, dB] per token
    inv = _rot_index(dim, N, inverse=True)[None, None]
    da, dh0 = (jnp.take_along_axis(x, inv, axis=2) for x in (da, dh0))
    dbc = outs[-5].reshape(bsz, dim // BLOCK_D, cfg.seq_len, N, 2)
    outs[-5] = jnp.swapaxes(dbc, -1, -2).reshape(bsz, dim // BLOCK_D, cfg.seq_len * width)
  return outs[:-4] + [ddskip.sum(axis=1), dbias.sum(axis=1), da.sum(axis=1), dh0[:, 0]]


def _ss_prepare(cfg: _SSCfg, seq_len, u, delta, z, B, C, bias, dskip, A, h0):
  """Kernel operands: padded in time with identity steps (dt = 0), B/C group-major."""
  Lp = cfg.seq_len
  if cfg.softplus:
    dt_p = pad_time(delta, Lp, _PAD_DELTA)
  else:  # delta + bias = 0 exactly on the padded tokens
    pad = Lp - seq_len
    tail = jnp.broadcast_to(-bias.astype(delta.dtype), (delta.shape[0], pad, delta.shape[2]))
    dt_p = jnp.concatenate([delta, tail], axis=1) if pad else delta
  u_p = pad_time(u, Lp)
  z_p = None if z is None else pad_time(z, Lp)
  bm = jnp.moveaxis(pad_time(B.astype(F32), Lp), 2, 1)  # (b, g, Lp, n)
  cm = jnp.moveaxis(pad_time(C.astype(F32), Lp), 2, 1)
  a2t = (A.astype(F32) * _LOG2E).T
  h0t = jnp.swapaxes(h0.astype(F32), 1, 2)
  return u_p, dt_p, z_p, bm, cm, bias.astype(F32), dskip.astype(F32), a2t, h0t


def _fwd_cfg(cfg: _SSCfg) -> _SSCfg:
  """The forward kernel's cfg: the backward's knobs cleared (one forward kernel for all)."""
  return dataclasses.replace(cfg, bwd_segments=1, bwd_variant=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ss(cfg: _SSCfg, seq_len: int, u, delta, A, B, C, D, z, bias, h0):
  ops = _ss_prepare(cfg, seq_len, u, delta, z, B, C, bias, D, A, h0)
  y, final = _ss_fwd_call(_fwd_cfg(cfg), *ops)[:2]
  return y[:, :seq_len], jnp.swapaxes(final, 1, 2)


def _ss_fwd(cfg, seq_len, u, delta, A, B, C, D, z, bias, h0):
  scfg = dataclasses.replace(_fwd_cfg(cfg), save_states=True)
  ops = _ss_prepare(scfg, seq_len, u, delta, z, B, C, bias, D, A, h0)
  y, final, states = _ss_fwd_call(scfg, *ops)
  out = (y[:, :seq_len], jnp.swapaxes(final, 1, 2))
  return out, (ops, states, u, delta, A, B, C, D, z, bias, h0)


def _ss_bwd(cfg, seq_len, res, cts):
  ops, states, u, delta, A, B, C, D, z, bias, h0 = res
  u_p, dt_p, z_p, bm, cm, bias_f, dskip_f, a2t, _ = ops
  dy, dfinal = cts
  dy_p = pad_time(dy.astype(u.dtype), cfg.seq_len)
  call = _ss_bwd_call if cfg.bwd_variant == 1 else _ss_bwd_call_v2
  outs = call(cfg, cfg.bwd_segments, u_p, dt_p, z_p, dy_p, bm, cm, bias_f, dskip_f, a2t, states,
              jnp.swapaxes(dfinal.astype(F32), 1, 2))
  du, ddt = outs[0], outs[1]
  dz = outs[2] if cfg.has_z else None
  dbc, ddskip, dbias, da, dh0 = outs[3:] if cfg.has_z else outs[2:]
  sl = slice(0, seq_len)
  bsz, N, G = cfg.batch, cfg.n_state, cfg.groups
  # (b, blocks, Lp * 2N) -> sum the channel blocks of each group -> (b, Lp, g, 2N)
  dbc = dbc.reshape(bsz, G, cfg.group_blocks, cfg.seq_len, 2 * N).sum(axis=2)
  dbc = jnp.moveaxis(dbc, 1, 2)[:, sl]
  dC, dB = dbc[..., :N], dbc[..., N:]
  ddt = ddt[:, sl]
  return (du[:, sl].astype(u.dtype), ddt.astype(delta.dtype),
          jnp.sum(da, axis=0).T.astype(A.dtype), dB.astype(B.dtype), dC.astype(C.dtype),
          jnp.sum(ddskip, axis=0).astype(D.dtype),
          None if z is None else dz[:, sl].astype(z.dtype),
          jnp.sum(dbias, axis=0).astype(bias.dtype), jnp.swapaxes(dh0, 1, 2).astype(h0.dtype))


_ss.defvjp(_ss_fwd, _ss_bwd)


def selective_scan_pallas(u, delta, A, B, C, D=None, *, z=None, delta_bias=None,
                          delta_softplus=False, h0=None, interpret: bool = False,
                          bwd_segments: int | None = None, bwd_variant: int | None = None):
  """Mamba-1 selective scan by the kernels; returns (y, last state (b, D, N) float32).

  B, C: (b, l, g, n) (the op's public wrapper reshapes (b, l, n)). Same semantics as
  ssm.ops.selective_scan. bwd_segments: parallel pieces per sequence in the backward
  (None: `bwd_segments` for the device's SM count on a GPU, 1 when interpreting); it must
  divide the number of BWD_TILE-token tiles. bwd_variant: 2 (`_ss_bwd_call_v2`) or 1 (the
  previous `_ss_bwd_call`, kept for A/B timing); None: the module's BWD_VARIANT.
  """
  check_supported(u, A, B)
  bsz, seq_len, dim = u.shape
  n_state = A.shape[1]
  if delta.dtype != u.dtype:
    delta = delta.astype(u.dtype)
  if z is not None and z.dtype != u.dtype:
    z = z.astype(u.dtype)
  D = jnp.zeros((dim,), F32) if D is None else D
  bias = jnp.zeros((dim,), F32) if delta_bias is None else delta_bias
  h0 = jnp.zeros((bsz, dim, n_state), F32) if h0 is None else h0
  n_tiles = pad_len(seq_len) // BWD_TILE
  if bwd_segments is None:
    sms = 0 if interpret else _impl.num_sms()
    bwd_segments = bwd_segments_for(bsz, dim, n_tiles, sms) if sms else 1
  bwd_variant = BWD_VARIANT if bwd_variant is None else bwd_variant
  if bwd_variant not in (1, 2, 3):
    raise ValueError(f"selective_scan (pallas): bwd_variant = {bwd_variant} (1, 2 or 3)")
  if bwd_segments < 1 or n_tiles % bwd_segments:
    raise ValueError(f"selective_scan (pallas): bwd_segments = {bwd_segments} must divide the "
                     f"{n_tiles} backward tiles of {BWD_TILE} tokens")
  cfg = _SSCfg(batch=bsz, seq_len=pad_len(seq_len), dim=dim, n_state=n_state,
               groups=B.shape[2], softplus=bool(delta_softplus), has_z=z is not None,
               save_states=False, interpret=interpret, bwd_segments=bwd_segments,
               bwd_variant=bwd_variant,
               true_len=seq_len)
  return _ss(cfg, seq_len, u, delta, A, B, C, D, z, bias, h0)
