"""Pallas Mosaic GPU kernels of `ssm.ops.causal_conv1d` (depthwise causal conv + silu).

    x (b, l, c), w (K, c), bias (c,), keep (b, Lp + TAIL, 4) -> y (b, l, c)

Layout: grid (c / 128, b, segments); a CTA (one warpgroup, thread i owns channel
c0 + i, layout `LINE`; with ConvTuning(block_c=256), 256 channels and two a thread) walks `tiles_per_cta` tiles of `chunk` tokens of one sequence,
TMA copies of (chunk, 128) slabs into a ring of shared-memory slots (`stages` deep),
channels contiguous. The K - 1 previous inputs of a token ride along in registers (a
sliding window); at a CTA's first token they are read straight from device memory (the
K - 1 rows before its segment, clamped at the sequence start). Outputs are written
straight to device memory, one coalesced row per token. So the forward reads x once and
writes y once; the backward reads x and dy once (plus K - 1 rows per CTA) and writes dx
once.

Masks: `keep` (b, Lp + TAIL, 4) float32, built in XLA from the segment ids (tiny: 16
bytes per token): column 0 is 1 for a real token (t < l), column j in 1..K-1 is 1 when
tap "lag j" of token t (x[t - j]) lies in the sequence and in t's document. A tap is
multiplied by it, so a tap into another document or before the start reads zero, exactly
as `causal_depthwise_conv` with segment_ids. (A non-finite x can then leak through a
masked tap as NaN; the XLA path selects instead.)

Backward (custom_vjp), also a kernel, recomputing the pre-activation:
    g[u]   = dy[u] act'(pre[u]),  e_j[u] = keep_j[u] g[u]
    dx[s]  = sum_j w[K-1-j] e_j[s + j]
    dw[K-1-j] = sum_u x[u - j] e_j[u],   dbias = sum_u g[u]
A CTA walks u over its segment and then K - 1 tokens past it (the "lookahead", read
from device memory; their masks come from a TAIL-row TMA copy of `keep`), scattering
each e_j[u] into K - 1 running dx accumulators and emitting dx[u - K + 1] once it is
complete. dw and dbias come out per CTA (b, segments, .) and XLA sums them.

Lengths: any l >= 1. The tile is 32 tokens, or 16 or 8 where that divides l and 32 does
not (`default_tuning`); when l is not a multiple of the tile the inputs are padded to whole
tiles in XLA (a copy; the hot shapes are multiples) and the kernel's stores stop at l.
Constraints (else `check_supported` raises ValueError; impl="auto" then takes XLA):
x float32 or bfloat16, c a multiple of 128, 2 <= K <= 4.
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
from ssm.ops._scan_tiles import BLOCK_D, F32, LINE, params, unrolled

MIN_TAPS, MAX_TAPS = 2, 4
KEEP = 4  # columns of the keep table: valid, lag 1, lag 2, lag 3
TAIL = 8  # rows of `keep` past a CTA's segment read by the backward's lookahead


@dataclasses.dataclass(frozen=True)
class ConvTuning:
  """Kernel knobs: tokens per TMA tile, tiles of one sequence per CTA, ring depth, and
  channels per CTA (block_c = 128 v: each thread holds v adjacent channels; a TMA copy
  takes at most 256 elements a dimension). Defaults: 128 channels as the scan kernels, 256
  tokens per CTA, three stages; block_c = 256 is the knob to time on the GPU."""
  chunk: int = 32
  tiles_per_cta: int = 8
  stages: int = 3
  block_c: int = BLOCK_D

  def __post_init__(self):
    if self.block_c not in (BLOCK_D, 2 * BLOCK_D):
      raise ValueError(f"ConvTuning: block_c = {self.block_c} must be 128 or 256")
    if self.chunk < 8 or self.chunk % 8:
      raise ValueError(f"ConvTuning: chunk = {self.chunk} must be a multiple of 8")
    if self.tiles_per_cta < 1 or self.stages < 1:
      raise ValueError(f"ConvTuning: tiles_per_cta and stages must be >= 1, got {self}")


@dataclasses.dataclass(frozen=True)
class _Cfg:
  batch: int
  seq_len: int  # true length
  dim: int
  taps: int
  silu: bool
  interpret: bool
  tuning: ConvTuning

  @property
  def padded_len(self) -> int:
    c = self.tuning.chunk
    return -(-self.seq_len // c) * c

  @property
  def n_tiles(self) -> int:
    return self.padded_len // self.tuning.chunk

  @property
  def segments(self) -> int:
    return -(-self.n_tiles // self.tuning.tiles_per_cta)

  @property
  def stages(self) -> int:
    return max(1, min(self.tuning.stages, self.tuning.tiles_per_cta, self.n_tiles))

  @property
  def block(self) -> int:
    return self.tuning.block_c

  @property
  def layout(self):
    """Thread i holds channels [v i, v i + v) of the CTA's block (v = block / 128)."""
    if self.block == BLOCK_D:
      return LINE
    return plgpu.Layout.WG_STRIDED((self.block,), vec_size=self.block // BLOCK_D)

  @property
  def grid(self):
    return (self.dim // self.block, self.batch, self.segments)


def default_tuning(seq_len: int) -> ConvTuning:
  """32-token tiles, or 16 / 8 where they divide the length and 32 does not (no padding
  copy); about 256 tokens per CTA."""
  chunk = next((c for c in (32, 16, 8) if seq_len % c == 0), 32)
  return ConvTuning(chunk=chunk, tiles_per_cta=256 // chunk)


def check_supported(x, w) -> None:
  """ValueError naming why the kernel cannot take these inputs."""
  taps, chans = w.shape
  if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"causal_conv1d (pallas): dtype {x.dtype} (float32 or bfloat16)")
  if chans % BLOCK_D:
    raise ValueError(f"causal_conv1d (pallas): channels = {chans} must be a multiple of {BLOCK_D}")
  if not MIN_TAPS <= taps <= MAX_TAPS:
    raise ValueError(f"causal_conv1d (pallas): K = {taps} taps (the kernel takes "
                     f"{MIN_TAPS}..{MAX_TAPS})")


def keep_table(segment_ids, bsz: int, seq_len: int, rows: int, taps: int):
  """(b, rows, KEEP) float32: column 0 = token t < seq_len, column j (1 <= j < taps) =
  x[t - j] is in the sequence and in t's document; 0 elsewhere (module docstring)."""
  t = jnp.arange(rows)
  valid = jnp.broadcast_to(t < seq_len, (bsz, rows))
  if segment_ids is not None:
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, rows - seq_len)))
  cols = [valid]
  for j in range(1, KEEP):
    if j >= taps:
      cols.append(jnp.zeros_like(valid))
      continue
    ok = valid & (t >= j)
    if segment_ids is not None:
      prev = jnp.pad(seg[:, :rows - j], ((0, 0), (j, 0)), constant_values=-1)
      ok = ok & (prev == seg)
    cols.append(ok)
  return jnp.stack(cols, axis=-1).astype(F32)


def _pad_time(x, rows):
  pad = rows - x.shape[1]
  return x if pad == 0 else jnp.pad(x, ((0, 0), (0, pad), (0, 0)))


def _silu_grad(pre):
  s = jax.nn.sigmoid(pre)
  return pre * s, s * (1.0 + pre * (1.0 - s))


def _setup(cfg: _Cfg, x_ref, w_ref, b_ref):
  """This CTA's indices, tile count, weights, bias and the window of the K - 1 inputs before
  its first token (win[j - 1] = x[s0 - j], row clamped at 0: its taps are masked)."""
  interp, T, K = cfg.interpret, cfg.tuning.chunk, cfg.taps
  ci, bi, si = lax.axis_index("c"), lax.axis_index("b"), lax.axis_index("s")
  cols = pl.ds(ci * cfg.block, cfg.block)
  n0 = si * cfg.tuning.tiles_per_cta
  count = jnp.minimum(cfg.tuning.tiles_per_cta, cfg.n_tiles - n0)
  layout = cfg.layout
  vec = lambda r: _pallas.load(r, layout, interp)
  wv = [vec(w_ref.at[k, cols]) for k in range(K)]
  bv = vec(b_ref.at[cols])
  s0 = n0 * T
  win = tuple(vec(x_ref.at[bi, jnp.maximum(s0 - j, 0), cols]).astype(F32) for j in range(1, K))
  return bi, cols, n0, count, s0, vec, wv, bv, win


def _ring(cfg: _Cfg, sources, buffers, bars, bi, cols, n0, count, step, carry):
  """fori_loop over this CTA's tiles, each slot's TMA copies issued `stages` tiles ahead.
  sources: GMEM refs (b, Lp, c) (the CTA's channels copied) or keep (b, Lp + TAIL, KEEP)
  (copied whole); step(slot, base, carry) -> carry."""
  T, stages = cfg.tuning.chunk, cfg.stages

  def fetch(i, slot):
    rows = pl.ds((n0 + i) * T, T)
    for src, buf in zip(sources, buffers):
      view = src.at[bi, rows] if buf.shape[-1] == KEEP else src.at[bi, rows, cols]
      plgpu.copy_gmem_to_smem(view, buf.at[slot], bars.at[slot])

  for i in range(stages):
    @pl.when(i < count)
    def _(i=i):
      fetch(i, i)

  def tile(i, carry):
    slot = lax.rem(i, stages)
    plgpu.barrier_wait(bars.at[slot])
    carry = step(slot, (n0 + i) * T, carry)
    plgpu.commit_smem()  # every thread is done with this slot: refill it

    @pl.when(i + stages < count)
    def _():
      fetch(i + stages, slot)

    return carry

  return lax.fori_loop(0, count, tile, carry)


@functools.partial(jax.jit, static_argnums=0)
def _fwd_call(cfg: _Cfg, x, w, bias, keep):
  """x (b, Lp, c) x.dtype, w (K, c) f32, bias (c,) f32, keep (b, Lp + TAIL, KEEP) f32 ->
  y (b, l, c) x.dtype."""
  T, K, stages, interp = cfg.tuning.chunk, cfg.taps, cfg.stages, cfg.interpret
  padded = cfg.padded_len != cfg.seq_len
  scratch = [plgpu.SMEM((stages, T, cfg.block), x.dtype), plgpu.SMEM((stages, T, KEEP), F32),
             plgpu.Barrier(num_arrivals=2, num_barriers=stages)]

  def body(x_ref, w_ref, b_ref, keep_ref, y_ref, xs, ks, bars):
    bi, cols, n0, count, _, vec, wv, bv, win = _setup(cfg, x_ref, w_ref, b_ref)

    def step(slot, base, win):
      def token(r, win):
        xt = vec(xs.at[slot, r]).astype(F32)
        pre = wv[K - 1] * xt + bv
        for j in range(1, K):
          pre = pre + wv[K - 1 - j] * (win[j - 1] * ks[slot, r, j])
        y = _silu_grad(pre)[0] if cfg.silu else pre
        pos = base + r

        def put():
          y_ref[bi, pos, cols] = y.astype(y_ref.dtype)

        if padded:
          pl.when(pos < cfg.seq_len)(put)
        else:
          put()
        return (xt,) + win[:-1]

      return unrolled(T, token, win, unroll=8)

    _ring(cfg, (x_ref, keep_ref), (xs, ks), bars, bi, cols, n0, count, step, win)

  call = _pallas.kernel(body, interpret=interp,
                        out_type=jax.ShapeDtypeStruct((cfg.batch, cfg.seq_len, cfg.dim), x.dtype),
                        grid=cfg.grid, grid_names=("c", "b", "s"), scratch_types=scratch,
                        compiler_params=params(), kernel_name="causal_conv_fwd")
  return call(x, w, bias, keep)


@functools.partial(jax.jit, static_argnums=0)
def _bwd_call(cfg: _Cfg, x, dy, w, bias, keep):
  """x, dy (b, Lp, c) x.dtype (zero-padded), w, bias, keep as `_fwd_call` ->
  dx (b, l, c) x.dtype, dw (b, segments, K, c) f32, dbias (b, segments, c) f32."""
  T, K, stages, interp = cfg.tuning.chunk, cfg.taps, cfg.stages, cfg.interpret
  Lp, L = cfg.padded_len, cfg.seq_len
  padded = Lp != L
  bsz, nseg, dim = cfg.batch, cfg.segments, cfg.dim
  out_type = (jax.ShapeDtypeStruct((bsz, L, dim), x.dtype),
              jax.ShapeDtypeStruct((bsz, nseg, K, dim), F32),
              jax.ShapeDtypeStruct((bsz, nseg, dim), F32))
  scratch = [plgpu.SMEM((stages, T, cfg.block), x.dtype),
             plgpu.SMEM((stages, T, cfg.block), dy.dtype),
             plgpu.SMEM((stages, T, KEEP), F32), plgpu.SMEM((TAIL, KEEP), F32),
             plgpu.Barrier(num_arrivals=3, num_barriers=stages),
             plgpu.Barrier(num_arrivals=1, num_barriers=1)]

  def body(x_ref, dy_ref, w_ref, b_ref, keep_ref, dx_ref, dw_ref, db_ref, xs, gs, ks, kt, bars,
           tbar):
    bi, cols, n0, count, s0, vec, wv, bv, win = _setup(cfg, x_ref, w_ref, b_ref)
    si = lax.axis_index("s")
    s1 = (n0 + count) * T  # the segment's end
    plgpu.copy_gmem_to_smem(keep_ref.at[bi, pl.ds(s1, TAIL)], kt, tbar.at[0])
    zero = 0.0 * bv

    def token(u, xt, dyt, kval, carry, main):
      """Lead token u: g[u] scattered into the dx accumulators, dx[u - K + 1] emitted; with
      `main` (u in this CTA's segment) also dw += x[u - j] e_j[u], dbias += g[u]."""
      win, acc, dws, db = carry
      xw = (xt,) + win  # xw[j] = x[u - j]
      pre = wv[K - 1] * xt + bv
      for j in range(1, K):
        pre = pre + wv[K - 1 - j] * (xw[j] * kval(j))
      g = (dyt * _silu_grad(pre)[1] if cfg.silu else dyt) * kval(0)
      e = [g] + [g * kval(j) for j in range(1, K)]  # e[j]: the cotangent of tap lag j
      full = [zero] + list(acc)  # full[j]: partial dx of token u - j
      full = [full[j] + wv[K - 1 - j] * e[j] for j in range(K)]
      s = u - (K - 1)
      emit = s >= s0
      if padded:
        emit = jnp.logical_and(emit, s < L)
      done = full[K - 1]

      @pl.when(emit)
      def _():
        dx_ref[bi, s, cols] = done.astype(dx_ref.dtype)

      if main:
        dws = tuple(dws[k] + xw[K - 1 - k] * e[K - 1 - k] for k in range(K))
        db = db + g
      return (xt,) + win[:-1], tuple(full[:K - 1]), dws, db

    def step(slot, base, carry):
      def run(r, carry):
        xt = vec(xs.at[slot, r]).astype(F32)
        dyt = vec(gs.at[slot, r]).astype(F32)
        return token(base + r, xt, dyt, lambda j: ks[slot, r, j], carry, main=True)

      return unrolled(T, run, carry, unroll=8)

    carry = (win, (zero,) * (K - 1), (zero,) * K, zero)
    carry = _ring(cfg, (x_ref, dy_ref, keep_ref), (xs, gs, ks), bars, bi, cols, n0, count, step,
                  carry)
    # The lookahead: the K - 1 tokens after the segment complete its last dx rows (past the
    # sequence's padded end, for the last CTA, their rows are clamped and their keep rows 0).
    plgpu.barrier_wait(tbar.at[0])
    for q in range(K - 1):
      row = jnp.minimum(s1 + q, Lp - 1)
      xt = vec(x_ref.at[bi, row, cols]).astype(F32)
      dyt = vec(dy_ref.at[bi, row, cols]).astype(F32)
      carry = token(s1 + q, xt, dyt, lambda j, q=q: kt[q, j], carry, main=False)
    _, _, dws, db = carry
    for k in range(K):
      dw_ref[bi, si, k, cols] = dws[k]
    db_ref[bi, si, cols] = db

  call = _pallas.kernel(body, interpret=interp, out_type=out_type, grid=cfg.grid,
                        grid_names=("c", "b", "s"), scratch_types=scratch,
                        compiler_params=params(), kernel_name="causal_conv_bwd")
  return call(x, dy, w, bias, keep)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv(cfg: _Cfg, x, w, bias, keep):
  return _fwd_call(cfg, _pad_time(x, cfg.padded_len), w, bias, keep)


def _conv_fwd(cfg, x, w, bias, keep):
  xp = _pad_time(x, cfg.padded_len)
  return _fwd_call(cfg, xp, w, bias, keep), (xp, w, bias, keep)


def _conv_bwd(cfg, res, dy):
  xp, w, bias, keep = res
  dyp = _pad_time(dy.astype(xp.dtype), cfg.padded_len)
  dx, dw, db = _bwd_call(cfg, xp, dyp, w, bias, keep)
  return dx, dw.sum(axis=(0, 1)), db.sum(axis=(0, 1)), jnp.zeros_like(keep)


_conv.defvjp(_conv_fwd, _conv_bwd)


def causal_conv1d_pallas(x, w, bias=None, *, segment_ids=None, activation=None,
                         interpret: bool = False, tuning: ConvTuning | None = None):
  """`ssm.ops.causal_conv1d` by the kernels: x (b, l, c) float32/bfloat16, w (K, c),
  bias (c,) or None, segment_ids (b, l) int or None -> y (b, l, c) in x's dtype.
  Gradients: dx in x's dtype, dw and dbias in their own dtypes (summed in float32)."""
  check_supported(x, w)
  tuning = tuning or default_tuning(x.shape[1])
  if x.shape[2] % tuning.block_c:
    raise ValueError(f"causal_conv1d (pallas): channels = {x.shape[2]} must be a multiple of "
                     f"block_c = {tuning.block_c}")
  if activation not in (None, "silu"):
    raise ValueError(f"causal_conv1d (pallas): activation {activation!r} (None or 'silu')")
  bsz, seq_len, dim = x.shape
  cfg = _Cfg(batch=bsz, seq_len=seq_len, dim=dim, taps=w.shape[0], silu=activation == "silu",
             interpret=bool(interpret), tuning=tuning)
  keep = keep_table(segment_ids, bsz, seq_len, cfg.padded_len + TAIL, cfg.taps)
  w32 = w.astype(F32)
  b32 = jnp.zeros((dim,), F32) if bias is None else bias.astype(F32)
  return _conv(cfg, x, w32, b32, keep)
