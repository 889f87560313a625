"""FFT convolution as a Monarch (FlashFFTConv-style) Pallas Mosaic GPU kernel.

    y[b, t, h] = (sum_s k[h, s] u[b, t - s, h] + D[h] u[b, t, h]) * gate[b, t, h]
                 causal (zero-padded) or circular; D, gate optional

Plan (FFT size n, a power of two; causal: n = 2 * next_pow2(L), circular: n = L):

* Real input, no doubled work: batch b and b + B/2 of the same channel share the
  kernel, so they ride as the real and imaginary parts of ONE complex sequence
  z = u[b] + i u[b + B/2] (a real-kernel convolution is linear over re/im). One
  complex n-point FFT serves two real sequences; an odd batch gets a zero row.
* Two-stage kernel, q = n <= 4096: a sequence of q points is a (r, c) row-major tile,
  x[q1 + c * q2] at [q2, q1], r = q // c rows, c = max(16, q // 64) columns.
  Cooley-Tukey with the slow index first:
      stage 1  F_r @ X           DFT over rows  (wgmma, M = 64, K = 64, N = c)
      twiddle  * w_q^(q1 k2)     elementwise, registers
      stage 2  . @ F_c           DFT over columns (wgmma, M = 64, K = N = c)
  giving the spectrum at k = r k1 + k2 in the transposed ("Monarch") order [k2, k1];
  the kernel's spectrum is precomputed in that order, so the pointwise product and the
  inverse (conj stages in reverse) never permute. Sequences with r < 64 (q = 256,
  512) are stacked G = 64 // r to a 64-row tile with a block-diagonal F_r.
* Three-stage kernel, q = A * 4096 with A = 2 or 4 slabs (q = 8192, 16384), every stage
  in one CTA: the whole sequence sits in SMEM as A (64, 64) f32 slabs (re, im: A x
  32 KiB), t = t_in + 4096 ta. Stage 0 is the A-point DFT over the slab index (radix 2
  or 4: adds only, CUDA cores, in place in row blocks), then slab ka is multiplied by
  w_q^(t_in ka) and goes through the two wgmma stages above (r = c = 64, one F_64 for
  both); the spectrum is K[ka + A k_in] at slab ka, [k2, k1]. Each spectrum slab
  streams from global memory (TMA) into the SMEM slab just read while the forward
  stages run; inverse stages in reverse, then the slab DFT back. Twiddles are computed
  in registers (iota, the int32 index masked to [-q/2, q/2), sin/cos on the MUFU unit,
  ~1e-6 absolute), not stored: SMEM holds the
  sequence (128 KiB at q = 16384) + F_64 and the bf16 operand tile (2 x 32 KiB at
  f32; 2 x 16 KiB at bf16; 1.5x that with Gauss's product) = 192 KiB of Hopper's 227 KiB
  at f32 16384 (176 KiB at most elsewhere). A zero-padded causal input
  loads only the slabs that hold data; only the slabs that reach L are stored.
* Causal n = 32768 (8192 < L <= 16384) needs no transform larger than 16384: its even
  bins are the 16384-point cyclic convolution, its odd bins the negacyclic one (the
  input twisted by th^t, th = exp(-i pi / 16384)), and the two halves' outputs add up
  to the causal result (each spectrum scaled 1/n). The twist costs nothing: it is the
  odd-bin version of the slab-DFT roots w_2A^(ta (2 ka + 1)) and of the pre-twiddle
  w_2q^(t (2 ka + 1)). Two 3-stage calls, no XLA outer step (du and dk likewise).
* Past that (n = 32768 circular .. 131072) the split is a few kernels: the outer p-point DFT
  (p = n / 16384 <= 8) and its twiddle w_n^(j kp) run in XLA as unrolled real-plane
  arithmetic that fuses with the layout transpose (one HBM round trip; it reads only
  the outer rows that hold data), each of the p rows goes through the 3-stage kernel,
  and XLA undoes the outer step for the output rows that are kept.
* Complex products as 4 real products ((A+iB)(X+iY)); every real product on the
  matrix units in bf16 with f32 accumulation. f32 inputs: bf16x3 (A_hi B_hi + A_hi B_lo
  + A_lo B_hi): ~5e-6 relative error (||err|| / ||ref||) of y, du, dk against a float64
  convolution (two-stage kernel on the H100: 5.2e-6 y/du, 8.2e-6 dk; 3-stage kernel in
  the CPU interpreter: 4e-6 .. 7e-6; tests hold 3e-5); bf16 inputs: one bf16 product per
  real product (~4e-3 measured, tests hold 3e-2). Each stage issues its 12 (or 4)
  wgmmas into three accumulators before one wait. Where SMEM allows (3-stage kernel:
  bf16, or f32 up to 2 slabs) Gauss's product takes 3 real products instead of 4
  (9 or 3 wgmmas a stage; F_64 as re, im, re + im; the operand as a, b, a + b): ~8e-6
  f32 and ~6e-3 bf16 in the interpreter.
  bf16 (not tf32) because Mosaic GPU's wgmma only transposes 16-bit operands and
  stage 1 contracts the slow (row) axis of the tile.
* D is folded into the kernel (k[:, 0] += D: no extra pass, dD = dk[:, 0]); the gate
  multiplies in the XLA fusion that unpacks the kernel's output (the unpack transpose).
* SMEM per CTA of the two-stage kernel at c = 64: DFT matrices 2 x (re, im) x (hi, lo)
  x 8 KiB = 64 KiB, twiddle and spectrum tiles (f32 re/im) 2 x 32 KiB, matmul operand
  tile (bf16 re/im hi/lo) 32 KiB, I/O staging (f32 re/im) 32 KiB: 192 KiB (correlate
  mode: no spectrum, two inputs, same total).

Kernels, grid over tiles of sequences (channels), loop over batch pairs:
  filter     y_p = IFFT(FFT(x_p) * S)          forward (S = spectrum of k) and du (conj S):
             two-stage kernel for n <= 4096, 3-stage kernel past it (two calls for the
             causal n = 32768 halves; the XLA outer step past that)
  correlate  c = IFFT(sum_p FFT(a_p) conj FFT(b_p))   dk = Re c[:Lk], a = dy, b = u:
             two-stage kernel for n <= 4096 (the inverse in the kernel). Past it no
             FFT is redone: the 3-stage filter emits the spectra it computes anyway
             (U_p in the forward, as residuals; DY_p in the du call), and XLA sums
             DY_p conj U_p over the pairs (one streaming pass) and inverts the small
             (H, n) result with jnp.fft. Residual memory: u's spectra, 2x u in f32.
The spectrum tile is loaded once per CTA and reused for every batch pair (two-stage),
or streamed per slab (3-stage).
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ssm.ops import _pallas
from ssm.ops._pallas import pl, plgpu

TILE_M = 64          # rows of a tile: the wgmma M (one warpgroup)
SLAB = 4096          # one (64, 64) tile: the largest two-stage (wgmma-only) transform
MAX_INNER = 16384    # largest transform done wholly in one CTA (3 stages: 4 slabs of 4096)
MIN_FFT, MAX_FFT = 256, 131072


# ----------------------------------------------------------------------------
# Static plan and constant matrices (NumPy, float64, then split to bf16).
# ----------------------------------------------------------------------------
def plan(n: int, max_inner: int = MAX_INNER) -> tuple[int, int, int, int, int]:
  """FFT size n -> (p outer, q inner, r rows per slab, c columns, G sequences per tile).

  q <= 4096: one (64, c) tile per sequence (r rows, G sequences stacked per tile);
  q > 4096: q / 4096 slabs of (64, 64) per sequence (r = c = 64, G = 1)."""
  if n & (n - 1) or not MIN_FFT <= n <= MAX_FFT:
    raise ValueError(f"fft_conv pallas: FFT size {n} must be a power of two in "
                     f"[{MIN_FFT}, {MAX_FFT}]")
  q = min(n, max_inner)
  s = min(q, SLAB)
  c = max(16, s // TILE_M)
  r = s // c
  return n // q, q, r, c, TILE_M // r


def _split(x: np.ndarray, nsplit: int) -> np.ndarray:
  """float64 -> (nsplit, ...) bf16 with sum ~= x (hi, lo)."""
  hi = jnp.asarray(x, jnp.float32).astype(jnp.bfloat16)
  if nsplit == 1:
    return hi[None]
  lo = (jnp.asarray(x, jnp.float32) - hi.astype(jnp.float32)).astype(jnp.bfloat16)
  return jnp.stack([hi, lo])


@functools.lru_cache(maxsize=None)
def _constants_np(q: int, r: int, c: int):
  g = TILE_M // r
  f_r = np.exp(-2j * np.pi * np.outer(np.arange(r), np.arange(r)) / r)
  left = np.kron(np.eye(g), f_r)                                          # (64, 64)
  right = np.exp(-2j * np.pi * np.outer(np.arange(c), np.arange(c)) / c)  # (c, c)
  k2 = np.tile(np.arange(r), g)[:, None]
  tw = np.exp(-2j * np.pi * k2 * np.arange(c)[None, :] / q)               # (64, c)
  return left, right, tw


def _constants(q: int, r: int, c: int, nsplit: int):
  """(left (2*ns, 64, 64) bf16, right (2*ns, c, c) bf16, twiddle (2, 64, c) f32).

  Index part * ns + split, part 0 = real, 1 = imaginary.
  """
  left, right, tw = _constants_np(q, r, c)
  mats = []
  for m in (left, right):
    mats.append(jnp.concatenate([_split(m.real, nsplit), _split(m.imag, nsplit)]))
  twid = jnp.asarray(np.stack([tw.real, tw.imag]), jnp.float32)
  return mats[0], mats[1], twid


def _swizzled(shape, dtype, swizzle: int):
  """SMEM operand of a wgmma: tiled and swizzled on the last (minor) dimension. Both
  operands of one wgmma need the same swizzle, so every operand of the kernel takes the
  data tile's (min(128, 2 c) bytes: 32 at c = 16, 64 at c = 32); with each operand's own
  widest swizzle, FFT sizes below 4096 do not lower for CUDA."""
  elems = swizzle // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(
      plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle)))


# ----------------------------------------------------------------------------
# The kernel body.
# ----------------------------------------------------------------------------
def _real_pairs(a, b, ns: int):
  """a, b: lists of split refs [hi, lo]; bf16x3 (or bf16x1) pairs of one real product.
  (lo * lo, ~2^-16 relative, is below the f32 accumulation's own error budget.)"""
  if ns == 1:
    return [(a[0], b[0])]
  return [(a[0], b[0]), (a[0], b[1]), (a[1], b[0])]


def _cmul_mm(fr, fi, xr, xi, *, ns: int, shape, conj: bool, const_left: bool):
  """Complex product of a constant DFT matrix F and the data tile X (split refs).

  const_left: F @ X, else X @ F. conj: use conj(F). Returns (re, im) f32 values. Three
  real products per complex one would need (Fr + Fi) split too; four keep the operands
  the DFT matrices already are. The three accumulators' wgmmas are all issued before the
  first is read (one wait per stage, the matrix unit's pipeline kept full)."""
  def p(f, x):
    return _real_pairs(f, x, ns) if const_left else _real_pairs(x, f, ns)
  if not conj:   # (Fr + iFi)(Xr + iXi)
    groups = [p(fr, xr), p(fi, xi), p(fr, xi) + p(fi, xr)]
    combine = lambda a, b, c: (a - b, c)
  else:          # (Fr - iFi)(Xr + iXi)
    groups = [p(fr, xr) + p(fi, xi), p(fr, xi), p(fi, xr)]
    combine = lambda a, b, c: (a, b - c)

  def body(*accs):
    for acc, pairs in zip(accs, groups):
      for a, b in pairs:
        plgpu.wgmma(acc, a, b)
    return tuple(acc[...] for acc in accs)
  return combine(*pl.run_scoped(body, *[plgpu.ACC(shape, jnp.float32)] * 3))


def _store_split(ops, re, im, ns: int):
  """Write f32 (re, im) values to the bf16 operand tile as hi (and lo) parts."""
  for part, v in enumerate((re, im)):
    hi = v.astype(jnp.bfloat16)
    ops[part * ns][...] = hi
    if ns == 2:
      ops[part * ns + 1][...] = (v - hi.astype(jnp.float32)).astype(jnp.bfloat16)
  plgpu.commit_smem()


def _gauss_mm(f, x, *, ns: int, shape, const_left: bool):
  """F X with three real products (Gauss) instead of four: f = [c, d, c + d] for F = c + id,
  x = [a, b, a + b] for X = a + ib (split refs): P1 = c a, P2 = d b, P3 = (c + d)(a + b),
  re = P1 - P2, im = P3 - P1 - P2. conj(F) X is conj(F conj(X)): the operand is stored
  conjugated (`_store_gauss`) and the result's imaginary part negated."""
  def p(fm, xm):
    return _real_pairs(fm, xm, ns) if const_left else _real_pairs(xm, fm, ns)
  groups = [p(f[0], x[0]), p(f[1], x[1]), p(f[2], x[2])]

  def body(*accs):
    for acc, pairs in zip(accs, groups):
      for a, b in pairs:
        plgpu.wgmma(acc, a, b)
    return tuple(acc[...] for acc in accs)
  p1, p2, p3 = pl.run_scoped(body, *[plgpu.ACC(shape, jnp.float32)] * 3)
  return p1 - p2, p3 - p1 - p2


def _store_gauss(ops, re, im, ns: int, conj: bool):
  """The operand planes [a, b, a + b] of X (or of conj(X)), each as hi (and lo) bf16."""
  if conj:
    im = -im
  for part, v in enumerate((re, im, re + im)):
    hi = v.astype(jnp.bfloat16)
    ops[part * ns][...] = hi
    if ns == 2:
      ops[part * ns + 1][...] = (v - hi.astype(jnp.float32)).astype(jnp.bfloat16)
  plgpu.commit_smem()


def _gauss_constants(nsplit: int):
  """F_64 as [re, im, re + im] split parts: (3 ns, 64, 64) bf16 (`_gauss_mm`)."""
  f = _constants_np(SLAB, TILE_M, TILE_M)[0]
  return jnp.concatenate([_split(m, nsplit) for m in (f.real, f.imag, f.real + f.imag)])


def _gauss_fits(slabs: int, nsplit: int) -> bool:
  """Gauss's product needs a third constant and operand plane (+ 16 KiB each at bf16x3):
  taken where SMEM keeps <= 176 KiB (every bf16 case; f32 up to 2 slabs), not at f32
  16384 (224 KiB: too close to Hopper's 227)."""
  return nsplit == 1 or slabs <= 2


def _cmul(ar, ai, br, bi, conj_b=False):
  if conj_b:
    return ar * br + ai * bi, ai * br - ar * bi
  return ar * br - ai * bi, ar * bi + ai * br


def _make_kernel(mode: str, *, n_pairs: int, n_tiles: int, q: int, r: int, c: int,
                 nsplit: int, interpret: bool):
  """Build the two-stage (one tile per sequence, q <= 4096) kernel; mode "filter" or
  "correlate".

  filter:    (x_re, x_im (P, T, 64, c), s_re, s_im (T, 64, c), left, right, tw)
             -> y_re, y_im (P, T, 64, c)
  correlate: (a_re, a_im, b_re, b_im (P, T, 64, c), left, right, tw)
             -> c_re, c_im (T, 64, c)
  """
  ns = nsplit
  wg = plgpu.Layout.WGMMA
  shape = (TILE_M, c)
  f32 = jnp.float32
  n_io = 2 if mode == "filter" else 4
  inv_q = 1.0 / q
  cmul = _cmul

  def cmul_mm(fr, fi, xr, xi, *, conj: bool, const_left: bool):
    return _cmul_mm(fr, fi, xr, xi, ns=ns, shape=shape, conj=conj, const_left=const_left)

  def store_split(ops, re, im):
    _store_split(ops, re, im, ns)

  def kernel(*refs):
    if mode == "filter":
      x_re, x_im, s_re, s_im, left_h, right_h, tw_h, y_re, y_im = refs[:9]
      scratch = refs[9:]
      in_refs = (x_re, x_im)
    else:
      a_re, a_im, b_re, b_im, left_h, right_h, tw_h, c_re, c_im = refs[:9]
      scratch = refs[9:]
      in_refs = (a_re, a_im, b_re, b_im)
    left_s, right_s, tw_s, spec_s, ops_s, io_s, const_bar, io_bar = scratch
    tile = lax.axis_index("tile")

    # Constants (and this tile's spectrum) once per CTA.
    plgpu.copy_gmem_to_smem(left_h, left_s, const_bar.at[0])
    plgpu.copy_gmem_to_smem(right_h, right_s, const_bar.at[1])
    plgpu.copy_gmem_to_smem(tw_h, tw_s, const_bar.at[2])
    if mode == "filter":
      plgpu.copy_gmem_to_smem(s_re.at[tile], spec_s.at[0], const_bar.at[3])
      plgpu.copy_gmem_to_smem(s_im.at[tile], spec_s.at[1], const_bar.at[4])
    for i in range(5 if mode == "filter" else 3):
      plgpu.barrier_wait(const_bar.at[i])

    lft = [[left_s.at[part * ns + s] for s in range(ns)] for part in range(2)]
    rgt = [[right_s.at[part * ns + s] for s in range(ns)] for part in range(2)]
    ops = [ops_s.at[i] for i in range(2 * ns)]
    opr, opi = ops[:ns], ops[ns:]

    def forward(re, im):
      """(re, im) f32 tile in natural order -> spectrum in [k2, k1] order."""
      store_split(ops, re, im)
      re, im = cmul_mm(lft[0], lft[1], opr, opi, conj=False, const_left=True)
      twr = _pallas.load(tw_s.at[0], wg, interpret)
      twi = _pallas.load(tw_s.at[1], wg, interpret)
      re, im = cmul(re, im, twr, twi)
      store_split(ops, re, im)
      return cmul_mm(rgt[0], rgt[1], opr, opi, conj=False, const_left=False)

    def inverse(re, im):
      """Spectrum [k2, k1] -> sequence (unnormalised: the 1/q is in the spectrum)."""
      store_split(ops, re, im)
      re, im = cmul_mm(rgt[0], rgt[1], opr, opi, conj=True, const_left=False)
      twr = _pallas.load(tw_s.at[0], wg, interpret)
      twi = _pallas.load(tw_s.at[1], wg, interpret)
      re, im = cmul(re, im, twr, twi, conj_b=True)
      store_split(ops, re, im)
      return cmul_mm(lft[0], lft[1], opr, opi, conj=True, const_left=True)

    def load_inputs(pair):
      for j, src in enumerate(in_refs):
        plgpu.copy_gmem_to_smem(src.at[pair, tile], io_s.at[j], io_bar.at[j])
      vals = []
      for j in range(len(in_refs)):
        plgpu.barrier_wait(io_bar.at[j])
        vals.append(_pallas.load(io_s.at[j], wg, interpret))
      return vals

    if mode == "filter":
      def body(pair, carry):
        xr, xi = load_inputs(pair)
        re, im = forward(xr, xi)
        sr = _pallas.load(spec_s.at[0], wg, interpret)
        si = _pallas.load(spec_s.at[1], wg, interpret)
        re, im = cmul(re, im, sr, si)
        re, im = inverse(re, im)
        io_s[0] = re
        io_s[1] = im
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(io_s.at[0], y_re.at[pair, tile])
        plgpu.copy_smem_to_gmem(io_s.at[1], y_im.at[pair, tile])
        plgpu.wait_smem_to_gmem(0)   # io_s is reloaded by the next pair
        return carry
      lax.fori_loop(0, n_pairs, body, 0)
    else:
      def body(pair, acc):
        acc_r, acc_i = acc
        ar, ai, br, bi = load_inputs(pair)
        ar, ai = forward(ar, ai)
        br, bi = forward(br, bi)
        pr, pi = cmul(ar, ai, br, bi, conj_b=True)
        return acc_r + pr, acc_i + pi
      zero = _pallas.cast(jnp.zeros(shape, f32), wg, interpret)
      acc_r, acc_i = lax.fori_loop(0, n_pairs, body, (zero, zero))
      re, im = inverse(acc_r * inv_q, acc_i * inv_q)
      io_s[0] = re
      io_s[1] = im
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(io_s.at[0], c_re.at[tile])
      plgpu.copy_smem_to_gmem(io_s.at[1], c_im.at[tile])
      plgpu.wait_smem_to_gmem(0)

  sw = min(128, 2 * c)
  scratch = [
      _swizzled((2 * ns, TILE_M, TILE_M), jnp.bfloat16, sw),   # left DFT (block-diag F_r)
      _swizzled((2 * ns, c, c), jnp.bfloat16, sw),             # right DFT F_c
      plgpu.SMEM((2, TILE_M, c), f32),                         # twiddle
      plgpu.SMEM((2, TILE_M, c), f32),                         # spectrum tile (filter)
      _swizzled((2 * ns, TILE_M, c), jnp.bfloat16, sw),        # matmul operand tile
      plgpu.SMEM((n_io, TILE_M, c), f32),                  # I/O staging
      plgpu.Barrier(num_barriers=5),
      plgpu.Barrier(num_barriers=n_io),
  ]
  if mode == "filter":
    out = jax.ShapeDtypeStruct((n_pairs, n_tiles, TILE_M, c), f32)
  else:
    scratch[3] = plgpu.SMEM((1, 8, 8), f32)  # unused placeholder
    out = jax.ShapeDtypeStruct((n_tiles, TILE_M, c), f32)
  return _pallas.kernel(
      kernel, out_type=(out, out), grid=(n_tiles,), grid_names=("tile",),
      scratch_types=scratch, interpret=interpret)


def _root(a: int, j: int, conj: bool) -> tuple[float, float]:
  """w_a^j = exp(-2 pi i j / a) (conjugated on request), quarter turns exact."""
  w = np.exp((2j if conj else -2j) * np.pi * (j % a) / a)
  snap = lambda v: float(np.round(v)) if abs(v - np.round(v)) < 1e-12 else float(v)
  return snap(w.real), snap(w.imag)


def _cscale(xr, xi, cr: float, ci: float):
  """(xr + i xi) * (cr + i ci) for a constant: exact 0 and +-1 parts cost nothing (the
  radix-2 and radix-4 butterflies of the cross-slab stage are adds only)."""
  def term(x, c):
    if c == 0:
      return None
    return x if c == 1 else (-x if c == -1 else c * x)

  def add(a, b):
    return b if a is None else (a if b is None else a + b)
  return add(term(xr, cr), term(xi, -ci)), add(term(xi, cr), term(xr, ci))


def _twiddle(index, size: int, conj: bool, layout, interpret: bool):
  """exp(-+2 pi i index(row, col) / size) on a (64, 64) tile, computed in registers (no
  SMEM table: the 3-stage kernel's SMEM holds the sequence). The index (>= 0) is reduced
  to [-size/2, size/2) in int32 first (size is a power of two: masks, no division), so
  the f32 angle is in [-pi, pi), where the kernels' approximate sin/cos (approx_math:
  the MUFU unit, ~1e-6 absolute) stay well inside the bf16x3 products' ~5e-6."""
  iota = lambda d: _pallas.cast(lax.broadcasted_iota(jnp.int32, (TILE_M, TILE_M), d),
                                layout, interpret)
  half = size // 2
  idx = ((index(iota(0), iota(1)) + half) & (size - 1)) - half
  ang = idx.astype(jnp.float32) * np.float32(2 * np.pi / size)
  s = jnp.sin(ang)
  return jnp.cos(ang), (s if conj else -s)


def _approx_kernel(body, **kwargs):
  """_pallas.kernel with approx_math (the 3-stage kernels' twiddle sin/cos on the MUFU
  unit); exact math where this JAX's Mosaic GPU has no such option."""
  try:
    params = plgpu.CompilerParams(approx_math=True)
  except (TypeError, AttributeError):  # pragma: no cover - depends on the JAX version
    return _pallas.kernel(body, **kwargs)
  return _pallas.kernel(body, compiler_params=params, **kwargs)


def _make_slab_filter(*, n_pairs: int, n_tiles: int, slabs: int, in_slabs: int,
                      out_slabs: int, nsplit: int, interpret: bool, odd: int = 0,
                      emit: bool = False, gauss: bool = False):
  """The 3-stage filter kernel: y = IFFT_q(FFT_q(x) * S) for q = slabs * 4096 <= 16384,
  every stage in one CTA (module docstring, "three stages"). odd = 1: the odd bins of
  the 2q-point DFT instead, y = th^-t IFFT_q(FFT_q(x th^t) * S), th = exp(-i pi / q)
  (the negacyclic half of a causal 2q-point convolution; the twist rides in the
  slab-DFT roots and the pre-twiddle, so it costs nothing).

  (x_re, x_im (P, T, in_slabs, 64, 64), s_re, s_im (T, slabs, 64, 64), f64 (2 ns, 64, 64))
  -> y_re, y_im (P, T, out_slabs, 64, 64). Input slabs >= in_slabs are zero (a
  zero-padded causal input is never read or stored), output slabs >= out_slabs are not
  computed. emit: also x's spectrum (unnormalised, Monarch order) as (P, T, slabs, 64,
  64) re/im planes (the backward's dk = sum over pairs of DY conj U, with no FFT redone).
  gauss: three real products per complex one (`_gauss_mm`; f64 is then (3 ns, 64, 64)).
  """
  ns = nsplit
  wg = plgpu.Layout.WGMMA
  shape = (TILE_M, TILE_M)
  f32 = jnp.float32
  q = slabs * SLAB
  chunk = 16    # rows per register block of the cross-slab stage (2 slabs x 8 regs each)

  def kernel(*refs):
    x_re, x_im, s_re, s_im, f_h, y_re, y_im = refs[:7]
    refs = refs[7:]
    if emit:
      (e_re, e_im), refs = refs[:2], refs[2:]
    f_s, ops_s, data_s, f_bar, in_bar, spec_bar = refs
    tile = lax.axis_index("tile")
    plgpu.copy_gmem_to_smem(f_h, f_s, f_bar.at[0])
    plgpu.barrier_wait(f_bar.at[0])
    n_parts = 3 if gauss else 2
    fm = [[f_s.at[part * ns + s] for s in range(ns)] for part in range(n_parts)]
    ops = [ops_s.at[i] for i in range(n_parts * ns)]
    opx = [ops[part * ns:(part + 1) * ns] for part in range(n_parts)]

    def stage(re, im, *, conj, const_left):
      """One complex DFT stage F X (conj(F) X) of the f32 tile (re, im)."""
      if gauss:
        _store_gauss(ops, re, im, ns, conj)
        re, im = _gauss_mm(fm, opx, ns=ns, shape=shape, const_left=const_left)
        return (re, -im) if conj else (re, im)
      _store_split(ops, re, im, ns)
      return _cmul_mm(fm[0], fm[1], opx[0], opx[1], ns=ns, shape=shape, conj=conj,
                      const_left=const_left)

    # inner (4096-point) twiddle w_4096^(q1 k2) at [k2, q1]; pre-twiddle of slab ka
    # w_q^(t ka), t = q1 + 64 q2 at [q2, q1]
    inner_tw = lambda conj: _twiddle(lambda r, c: r * c, SLAB, conj, wg, interpret)
    # (w_2q^(t (2 ka + odd)): w_q^(t ka) for the even bins)
    pre_tw = lambda ka, conj: _twiddle(lambda r, c: (c + TILE_M * r) * (2 * ka + odd), 2 * q,
                                       conj, wg, interpret)

    def forward(re, im):
      re, im = stage(re, im, conj=False, const_left=True)
      re, im = _cmul(re, im, *inner_tw(False))
      return stage(re, im, conj=False, const_left=False)

    def inverse(re, im):
      re, im = stage(re, im, conj=True, const_left=False)
      re, im = _cmul(re, im, *inner_tw(True))
      return stage(re, im, conj=True, const_left=True)

    def cross(inverse_step: bool):
      """The slab-index DFT (radix 2 or 4: adds only), in place, in row blocks."""
      n_src = slabs if inverse_step else in_slabs
      n_dst = out_slabs if inverse_step else slabs
      for r0 in range(0, TILE_M, chunk):
        rows = pl.ds(r0, chunk)
        src = [(data_s[j, 0, rows, :], data_s[j, 1, rows, :]) for j in range(n_src)]
        outs = []
        for d in range(n_dst):
          acc_r = acc_i = None
          for j in range(n_src):
            ta, ka = (d, j) if inverse_step else (j, d)
            tr, ti = _cscale(*src[j], *_root(2 * slabs, ta * (2 * ka + odd), inverse_step))
            acc_r = tr if acc_r is None else acc_r + tr
            acc_i = ti if acc_i is None else acc_i + ti
          outs.append((acc_r, acc_i))
        for d, (vr, vi) in enumerate(outs):
          data_s[d, 0, rows, :] = vr
          data_s[d, 1, rows, :] = vi

    def body(pair, carry):
      for j in range(in_slabs):
        plgpu.copy_gmem_to_smem(x_re.at[pair, tile, j], data_s.at[j, 0], in_bar.at[2 * j])
        plgpu.copy_gmem_to_smem(x_im.at[pair, tile, j], data_s.at[j, 1], in_bar.at[2 * j + 1])
      for j in range(2 * in_slabs):
        plgpu.barrier_wait(in_bar.at[j])
      cross(False)
      plgpu.commit_smem()
      for ka in range(slabs):
        re = _pallas.load(data_s.at[ka, 0], wg, interpret)
        im = _pallas.load(data_s.at[ka, 1], wg, interpret)
        plgpu.commit_smem()   # every thread has read the slab before the TMA overwrites it
        # the spectrum slab streams in (over the slab just read) while the forward runs
        plgpu.copy_gmem_to_smem(s_re.at[tile, ka], data_s.at[ka, 0], spec_bar.at[0])
        plgpu.copy_gmem_to_smem(s_im.at[tile, ka], data_s.at[ka, 1], spec_bar.at[1])
        if 2 * ka + odd:
          re, im = _cmul(re, im, *pre_tw(ka, False))
        re, im = forward(re, im)
        plgpu.barrier_wait(spec_bar.at[0])
        plgpu.barrier_wait(spec_bar.at[1])
        sr = _pallas.load(data_s.at[ka, 0], wg, interpret)
        si = _pallas.load(data_s.at[ka, 1], wg, interpret)
        if emit:   # the spectrum out through the slab just read (stored while inverting)
          plgpu.commit_smem()
          data_s[ka, 0] = re
          data_s[ka, 1] = im
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(data_s.at[ka, 0], e_re.at[pair, tile, ka])
          plgpu.copy_smem_to_gmem(data_s.at[ka, 1], e_im.at[pair, tile, ka])
        re, im = _cmul(re, im, sr, si)
        re, im = inverse(re, im)
        if 2 * ka + odd:
          re, im = _cmul(re, im, *pre_tw(ka, True))
        if emit:
          plgpu.wait_smem_to_gmem(0)   # the slab is read out before it is overwritten
        data_s[ka, 0] = re
        data_s[ka, 1] = im
      plgpu.commit_smem()
      cross(True)
      plgpu.commit_smem()
      for j in range(out_slabs):
        plgpu.copy_smem_to_gmem(data_s.at[j, 0], y_re.at[pair, tile, j])
        plgpu.copy_smem_to_gmem(data_s.at[j, 1], y_im.at[pair, tile, j])
      plgpu.wait_smem_to_gmem(0)   # data_s is reloaded by the next pair
      return carry

    lax.fori_loop(0, n_pairs, body, 0)

  n_parts = 3 if gauss else 2
  scratch = [
      _swizzled((n_parts * ns, TILE_M, TILE_M), jnp.bfloat16, 128),   # F_64 (both stages)
      _swizzled((n_parts * ns, TILE_M, TILE_M), jnp.bfloat16, 128),   # matmul operand tile
      plgpu.SMEM((slabs, 2, TILE_M, TILE_M), f32),              # the whole sequence
      plgpu.Barrier(num_barriers=1),
      plgpu.Barrier(num_barriers=2 * in_slabs),
      plgpu.Barrier(num_barriers=2),
  ]
  out = jax.ShapeDtypeStruct((n_pairs, n_tiles, out_slabs, TILE_M, TILE_M), f32)
  outs = (out, out)
  if emit:
    spec = jax.ShapeDtypeStruct((n_pairs, n_tiles, slabs, TILE_M, TILE_M), f32)
    outs += (spec, spec)
  return _approx_kernel(
      kernel, out_type=outs, grid=(n_tiles,), grid_names=("tile",),
      scratch_types=scratch, interpret=interpret)


# ----------------------------------------------------------------------------
# XLA glue: packing, the outer (order-3) step, the spectrum.
# ----------------------------------------------------------------------------
def fft_size(seq_len: int, circular: bool) -> int:
  if circular:
    return seq_len
  return max(MIN_FFT, 2 * (1 << max(0, (seq_len - 1).bit_length())))


def check_supported(u_shape, k_shape, circular: bool) -> None:
  """ValueError when the kernel cannot take this call (fft_conv's "auto" then uses XLA)."""
  seq_len = u_shape[1]
  if circular and (seq_len & (seq_len - 1) or seq_len < MIN_FFT):
    raise ValueError(f"fft_conv pallas: circular needs a power-of-two length >= {MIN_FFT}, "
                     f"got {seq_len}")
  n = fft_size(seq_len, circular)
  if n > MAX_FFT:
    raise ValueError(f"fft_conv pallas: length {seq_len} needs FFT size {n} > {MAX_FFT}, "
                     f"the largest the kernel takes ({'' if circular else 'causal '}length "
                     f"<= {MAX_FFT if circular else MAX_FFT // 2})")
  plan(n)


AUTO_TABLE = os.path.join(os.path.dirname(__file__), "fft_conv_auto.json")


@functools.cache
def auto_table() -> dict:
  """{device kind: {dtype name: [FFT sizes]}}: where the kernel measured faster than
  jnp.fft forward+backward (ssm/ops/fft_conv_auto.json; remeasure with
  scripts/gpu/fftconv_issue21.sh, which writes a new one)."""
  with open(AUTO_TABLE) as f:
    table = json.load(f)
  return {kind: entry for kind, entry in table.items() if not kind.startswith("_")}


def _device_kind() -> str:
  try:
    return jax.devices()[0].device_kind
  except RuntimeError:  # pragma: no cover - no backend
    return ""


def check_preferred(u_shape, circular: bool, dtype=jnp.float32) -> None:
  """ValueError unless the measured table (`auto_table`) has this device kind, dtype and
  FFT size (fft_conv's "auto" then takes the XLA path: never an unmeasured kernel;
  `ssm.ops._impl.choose_impl`'s prefer)."""
  n = fft_size(u_shape[1], circular)
  kind = _device_kind()
  # Past 4096 a circular call runs other kernels than the causal one of the same FFT
  # size (every slab loaded; the outer step at 32768): it needs its own entry.
  key = jnp.dtype(dtype).name + ("-circular" if circular and n > SLAB else "")
  sizes = auto_table().get(kind, {}).get(key, [])
  if n not in sizes:
    raise ValueError(f"fft_conv pallas: no measurement on {kind!r} where the kernel beats "
                     f"jnp.fft at FFT size {n} ({key}: {sizes})")


def _outer_factors(p: int, q: int, n: int, rows: int, inverse: bool):
  """Outer DFT step as real planes (float32 NumPy):
  forward  W[kp, j] = w_p^(j kp) (j < rows) and twiddle T[kp, i] = w_n^(i kp);
  inverse  W[j, kp] = conj(w_p^(j kp)) / p (j < rows) and T = conj(twiddle) (p, q)."""
  kp = np.arange(p)[:, None]
  w = np.exp(-2j * np.pi * kp * np.arange(rows)[None, :] / p)          # (p, rows)
  t = np.exp(-2j * np.pi * kp * np.arange(q)[None, :] / n)             # (p, q)
  if inverse:
    w, t = np.conj(w).T / p, np.conj(t)                                # (rows, p), (p, q)
  f = lambda x: (np.real(x).astype(np.float32), np.imag(x).astype(np.float32))
  return f(w), f(t)


def _small_cmatmul(wr, wi, xr, xi, post=None, pre=None):
  """sum_j W[a, j] x[..., j, :] for a small constant complex W (a few rows), unrolled so
  that XLA fuses it with its neighbours instead of calling a GEMM (or cuFFT with
  transposes, as jnp.fft over a middle axis does). x (..., J, q) -> (..., A, q).
  post (re, im) (A, q): multiply output row a by post[a]; pre (re, im) (J, q): multiply
  input row j by pre[j] first. Both inside the same fusion as the sums and the stack.
  """
  rows_r = [xr[..., j, :] for j in range(xr.shape[-2])]
  rows_i = [xi[..., j, :] for j in range(xi.shape[-2])]
  if pre is not None:
    pr, pi = pre
    rows_r, rows_i = ([r * pr[j] - i * pi[j] for j, (r, i) in enumerate(zip(rows_r, rows_i))],
                      [r * pi[j] + i * pr[j] for j, (r, i) in enumerate(zip(rows_r, rows_i))])
  out_r, out_i = [], []
  for a in range(wr.shape[0]):
    acc_r = acc_i = 0.0
    for j in range(wr.shape[1]):
      if wr[a, j] == 0 and wi[a, j] == 0:
        continue
      acc_r = acc_r + float(wr[a, j]) * rows_r[j] - float(wi[a, j]) * rows_i[j]
      acc_i = acc_i + float(wr[a, j]) * rows_i[j] + float(wi[a, j]) * rows_r[j]
    if post is not None:
      tr, ti = post[0][a], post[1][a]
      acc_r, acc_i = acc_r * tr - acc_i * ti, acc_r * ti + acc_i * tr
    out_r.append(acc_r)
    out_i.append(acc_i)
  return jnp.stack(out_r, axis=-2), jnp.stack(out_i, axis=-2)


def _to_rows(xr, xi, n: int, h_pad: int, max_inner: int = MAX_INNER):
  """Complex sequences as planes xr, xi (P, H, m), m <= n, zero beyond m -> kernel tiles
  (re, im) (P, T, 64, c), natural order inside each inner sequence, after the outer DFT
  step when n > 4096 (which reads only the outer rows that hold data: half of them for a
  zero-padded causal input)."""
  p, q, r, c, g = plan(n, max_inner)
  pairs, h, m = xr.shape
  rows = -(-m // q)
  pad = lambda x, to: jnp.pad(x, ((0, 0), (0, h_pad - h), (0, to - m)))
  if p > 1:
    xr, xi = (pad(x, rows * q).reshape(pairs, h_pad, rows, q) for x in (xr, xi))
    (wr, wi), tw = _outer_factors(p, q, n, rows, inverse=False)
    xr, xi = _small_cmatmul(wr, wi, xr, xi, post=tw)                   # (P, Hp, p, q)
  else:
    xr, xi = pad(xr, n), pad(xi, n)
  shape = (pairs, h_pad * p * q // (TILE_M * c), TILE_M, c)
  return xr.reshape(shape), xi.reshape(shape)


def _from_rows(re, im, n: int, h: int, length: int, max_inner: int = MAX_INNER):
  """Inverse of _to_rows: tiles (..., T, 64, c) -> planes (re, im) (..., H, length), the
  outer step undone for the outer rows that reach `length` only."""
  p, q, r, c, g = plan(n, max_inner)
  lead = re.shape[:-3]
  re, im = (x.reshape(*lead, -1, p, q)[..., :h, :, :] for x in (re, im))
  if p > 1:
    rows = -(-length // q)
    (wr, wi), tw = _outer_factors(p, q, n, rows, inverse=True)
    re, im = _small_cmatmul(wr, wi, re, im, pre=tw)                    # (..., H, rows, q)
  re, im = (x.reshape(*lead, h, -1)[..., :length] for x in (re, im))
  return re, im


def _spectrum(k, n: int, h_pad: int, conj: bool, max_inner: int = SLAB):
  """Kernel spectrum (H, Lk) -> tiles (re, im) (T, 64, c) in the kernel's Monarch order,
  scaled by 1/q (the inner inverse is unnormalised). Two-stage kernel (q <= 4096)."""
  p, q, r, c, g = plan(n, max_inner)
  h = k.shape[0]
  kf = jnp.fft.fft(k.astype(jnp.float32), n=n, axis=1)            # (H, n)
  if conj:
    kf = jnp.conj(kf)
  kf = kf.reshape(h, q, p).transpose(0, 2, 1)                      # [h, kp, kq] = K[p kq + kp]
  kf = kf.reshape(h, p, c, r).transpose(0, 1, 3, 2) / q            # [k2, k1] = K_q[r k1 + k2]
  kf = kf.reshape(h, p * q)
  if h_pad != h:
    kf = jnp.pad(kf, ((0, h_pad - h), (0, 0)))
  kf = kf.reshape(-1, TILE_M, c)
  return jnp.real(kf).astype(jnp.float32), jnp.imag(kf).astype(jnp.float32)


def _pack(u):
  """u (B, L, H) real -> planes (P, H, L): batch b is the real part, b + P the imaginary."""
  x = jnp.transpose(u.astype(jnp.float32), (0, 2, 1))              # (B, H, L)
  if x.shape[0] % 2:
    x = jnp.pad(x, ((0, 1), (0, 0), (0, 0)))
  pairs = x.shape[0] // 2
  return x[:pairs], x[pairs:]


def _unpack(re, im, batch: int, dtype):
  """planes (P, H, L) -> real (B, L, H)."""
  x = jnp.concatenate([re, im], axis=0)[:batch]
  return jnp.transpose(x, (0, 2, 1)).astype(dtype)


def _h_pad(h: int, n: int, max_inner: int = MAX_INNER) -> int:
  g = plan(n, max_inner)[4]
  return -(-h // g) * g


def _slab_spectrum(k, n: int, conj: bool, odd: int | None = None):
  """Kernel spectrum (H, Lk) -> (re, im) (H p, slabs, 64, 64) in the 3-stage kernel's
  order: inner row kp (of the XLA outer step), slab ka, [k2, k1] holds K_q[ka + A (k2 +
  64 k1)] for A = q / 4096 slabs; scaled by 1/q (the kernel's inverse is unnormalised).
  odd = 0 or 1: the even or odd bins of K_n, q = n / 2, scaled by 1 / n (the causal
  split: the two halves' outputs add up to the n-point result)."""
  h = k.shape[0]
  kf = jnp.fft.fft(k.astype(jnp.float32), n=n, axis=1)            # (H, n)
  if odd is None:
    p, q = plan(n)[:2]
    scale = 1.0 / q
  else:
    p, q, scale = 1, n // 2, 1.0 / n
    kf = kf[:, odd::2]
  a = q // SLAB
  if conj:
    kf = jnp.conj(kf)
  kf = kf.reshape(h, q, p).transpose(0, 2, 1)                      # [h, kp, kq] = K[p kq + kp]
  kf = kf.reshape(h, p, TILE_M, TILE_M, a).transpose(0, 1, 4, 3, 2) * scale  # [kp, ka, k2, k1]
  kf = kf.reshape(h * p, a, TILE_M, TILE_M)
  return jnp.real(kf).astype(jnp.float32), jnp.imag(kf).astype(jnp.float32)


# Causal FFT sizes from which the two-halves form is taken (below: one n-point call).
# 32768 is the size that needs it (no XLA outer step); 16384 trades a second pass over
# the input for Gauss's product at f32 (two 2-slab calls instead of one 4-slab call):
# SSM_FFT_CONV_HALVES_FROM=16384 measures that (scripts/gpu/fftconv_issue21.sh).
HALVES_FROM = int(os.environ.get("SSM_FFT_CONV_HALVES_FROM", 2 * MAX_INNER))


def causal_split(n: int, circular: bool) -> bool:
  """A causal FFT size of 2 * 16384 runs as two 16384-point halves (even and odd bins of
  the n-point DFT: cyclic plus negacyclic convolution) in the 3-stage kernel, with no
  XLA outer step: the n-point transform of a length <= n/2 zero-padded input (from
  HALVES_FROM on; the halves need at least 2 slabs)."""
  return not circular and max(HALVES_FROM, 4 * SLAB) <= n <= 2 * MAX_INNER


def _filter(zr, zi, k, n: int, length: int, *, conj: bool, nsplit: int, interpret: bool,
            split: bool = False):
  """IFFT_n(FFT_n(z) * K (or conj K))[:length] for complex rows z as planes (P, H, m)."""
  p, q, r, c, g = plan(n)
  if q > SLAB:
    return _slab_filter(zr, zi, k, n, length, conj=conj, nsplit=nsplit, interpret=interpret,
                        split=split)
  h = zr.shape[1]
  hp = _h_pad(h, n)
  xr, xi = _to_rows(zr, zi, n, hp)
  sr, si = _spectrum(k, n, hp, conj)
  left, right, tw = _constants(q, r, c, nsplit)
  call = _make_kernel("filter", n_pairs=xr.shape[0], n_tiles=xr.shape[1], q=q, r=r, c=c,
                      nsplit=nsplit, interpret=interpret)
  yr, yi = call(xr, xi, sr, si, left, right, tw)
  return _from_rows(yr, yi, n, h, length)


def _slab_inputs(xs, n: int, split: bool):
  """Planes (P, H, m) -> (P, T, in_slabs, 64, 64) slabs of the 3-stage kernels, after the
  XLA outer step when p > 1; returns (slabs, in_slabs, p, odd modes, inputs)."""
  pairs, h, m = xs[0].shape
  p, q = (1, n // 2) if split else plan(n)[:2]
  slabs = q // SLAB
  modes = (0, 1) if split else (None,)
  if p == 1:   # only the slabs that hold data go in
    in_slabs = -(-m // SLAB)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, in_slabs * SLAB - m)))
    return slabs, in_slabs, p, modes, [
        pad(x).reshape(pairs, h, in_slabs, TILE_M, TILE_M) for x in xs]
  rows = []
  for i in range(0, len(xs), 2):
    rows += _to_rows(xs[i], xs[i + 1], n, h)
  return slabs, slabs, p, modes, [x.reshape(pairs, h * p, slabs, TILE_M, TILE_M) for x in rows]


def _slab_filter(zr, zi, k, n: int, length: int, *, conj: bool, nsplit: int,
                 interpret: bool, split: bool, emit: bool = False):
  """_filter for q = min(n, 16384) > 4096: the 3-stage kernel over (64, 64) slabs, after
  the XLA outer step when n > 16384, or twice (even and odd bins) when split. emit: also
  return z's spectra, one complex (P, T, slabs, 64, 64) array per half (see
  _dk_from_spectra)."""
  pairs, h, _ = zr.shape
  slabs, in_slabs, p, modes, (xr, xi) = _slab_inputs((zr, zi), n, split)
  out_slabs = -(-length // SLAB) if p == 1 else slabs   # only the slabs that reach `length`
  gauss = _gauss_fits(slabs, nsplit)
  f64 = _gauss_constants(nsplit) if gauss else _constants(SLAB, TILE_M, TILE_M, nsplit)[0]
  yr = yi = 0.0
  spectra = []
  for odd in modes:
    call = _make_slab_filter(n_pairs=pairs, n_tiles=xr.shape[1], slabs=slabs,
                             in_slabs=in_slabs, out_slabs=out_slabs, nsplit=nsplit,
                             interpret=interpret, odd=odd or 0, emit=emit, gauss=gauss)
    y = call(xr, xi, *_slab_spectrum(k, n, conj, odd), f64)
    yr, yi = yr + y[0], yi + y[1]   # split: even + odd halves (each scaled 1/n)
    if emit:
      spectra.append((y[2], y[3]))   # planes: no complex array to materialise
  if p == 1:
    out = tuple(y.reshape(pairs, h, -1)[..., :length] for y in (yr, yi))
  else:
    yr, yi = (y.reshape(pairs, -1, TILE_M, TILE_M) for y in (yr, yi))
    out = _from_rows(yr, yi, n, h, length)
  return (*out, spectra) if emit else out


def _dk_from_spectra(dy_spectra, u_spectra, n: int, h: int, length: int, split: bool):
  """dk (H, length) = Re IFFT_n(sum_p DY_p conj U_p)[:length] from the 3-stage kernels'
  emitted spectra ((re, im) planes (P, T, slabs, 64, 64) per half): one XLA product-sum
  over the pairs, then the small (H, n) inverse with the halves' odd bins untwisted."""
  p, q = (1, n // 2) if split else plan(n)[:2]
  slabs = q // SLAB
  out = 0.0
  for odd, dys, us in zip((0, 1) if split else (None,), dy_spectra, u_spectra):
    (dr, di), (ur, ui) = dys, us
    spec = jax.lax.complex(jnp.sum(dr * ur + di * ui, axis=0),        # (H p, A, k2, k1)
                           jnp.sum(di * ur - dr * ui, axis=0))
    spec = spec.reshape(h, p, slabs, TILE_M, TILE_M)                  # [kp, ka, k2, k1]
    spec = spec.transpose(0, 4, 3, 2, 1).reshape(h, p * q)  # k = kp + p (ka + A (k2 + 64 k1))
    c = jnp.fft.ifft(spec, axis=-1)[:, :length]
    if odd:   # the odd bins' correlation carries th^s: untwist, then halves add
      s = np.arange(length)
      c = c * jnp.asarray(np.exp(1j * np.pi * s / q), jnp.complex64)
    out = out + (jnp.real(c) if odd is None else 0.5 * jnp.real(c))
  return out.astype(jnp.float32)


def _correlate(a, b, n: int, length: int, *, nsplit: int, interpret: bool):
  """Re IFFT_n(sum_p FFT_n(a_p) conj FFT_n(b_p))[:length] for planes a, b (P, H, m)
  -> (H, length): the two-stage correlation kernel (n <= 4096; past it dk comes from the
  3-stage kernels' emitted spectra, _dk_from_spectra)."""
  p, q, r, c, g = plan(n)
  if q > SLAB:
    raise ValueError(f"fft_conv pallas: the correlation kernel takes n <= {SLAB}, got {n}")
  h = a[0].shape[1]
  hp = _h_pad(h, n)
  ar, ai = _to_rows(*a, n, hp)
  br, bi = _to_rows(*b, n, hp)
  left, right, tw = _constants(q, r, c, nsplit)
  call = _make_kernel("correlate", n_pairs=ar.shape[0], n_tiles=ar.shape[1], q=q, r=r, c=c,
                      nsplit=nsplit, interpret=interpret)
  cr, ci = call(ar, ai, br, bi, left, right, tw)
  return _from_rows(cr, ci, n, h, length)[0]


# ----------------------------------------------------------------------------
# Public entry with the custom VJP.
# ----------------------------------------------------------------------------
def _nsplit(dtype) -> int:
  return 1 if jnp.dtype(dtype) == jnp.bfloat16 else 2


def _three_stage(n: int) -> bool:
  return plan(n)[1] > SLAB


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(u, k, circular: bool, interpret: bool):
  batch, seq_len, _ = u.shape
  n = fft_size(seq_len, circular)
  yr, yi = _filter(*_pack(u), k, n, seq_len, conj=False, nsplit=_nsplit(u.dtype),
                   interpret=interpret, split=causal_split(n, circular))
  return _unpack(yr, yi, batch, u.dtype)


def _conv_fwd(u, k, circular, interpret):
  """Under differentiation the 3-stage forward also emits u's spectra (residuals: the
  backward's dk needs no FFT of u); the two-stage kernel's correlation redoes it."""
  batch, seq_len, _ = u.shape
  n = fft_size(seq_len, circular)
  if not _three_stage(n):
    return _conv(u, k, circular, interpret), (u, k, None)
  yr, yi, spectra = _slab_filter(*_pack(u), k, n, seq_len, conj=False,
                                 nsplit=_nsplit(u.dtype), interpret=interpret,
                                 split=causal_split(n, circular), emit=True)
  return _unpack(yr, yi, batch, u.dtype), (u, k, spectra)


def _conv_bwd(circular, interpret, res, dy):
  u, k, u_spectra = res
  batch, seq_len, _ = u.shape
  n = fft_size(seq_len, circular)
  ns = _nsplit(u.dtype)
  zdy = _pack(dy)
  split = causal_split(n, circular)
  if u_spectra is None:
    du = _unpack(*_filter(*zdy, k, n, seq_len, conj=True, nsplit=ns, interpret=interpret),
                 batch, u.dtype)
    dk = _correlate(zdy, _pack(u), n, k.shape[1], nsplit=ns, interpret=interpret)
    return du, dk.astype(k.dtype)
  dur, dui, dy_spectra = _slab_filter(*zdy, k, n, seq_len, conj=True, nsplit=ns,
                                      interpret=interpret, split=split, emit=True)
  dk = _dk_from_spectra(dy_spectra, u_spectra, n, k.shape[0], k.shape[1], split)
  return _unpack(dur, dui, batch, u.dtype), dk.astype(k.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def fft_conv_pallas(u, k, *, D=None, gate=None, circular: bool = False,
                    interpret: bool | None = None):
  """Monarch-FFT convolution kernel. u (B, L, H), k (H, Lk), D (H,) or None, gate
  (B, L, H) or None:  y = (conv(u, k) + D u) * gate.

  Causal: conv[t] = sum_{s <= t} k[s] u[t - s]; circular: indices mod L (L a power of
  two). The skip is folded into the kernel (k[:, 0] += D: one convolution, dD = dk[:, 0]
  by autodiff through the fold); the gate multiplies in the XLA fusion that unpacks the
  kernel's output (and dy * gate in the one that packs dy). Output dtype of u. Shapes are
  checked by ssm.ops.fft_conv.
  """
  interpret = _pallas.interpret_mode(interpret)
  check_supported(u.shape, k.shape, circular)
  if D is not None:
    k = k.astype(jnp.float32).at[:, 0].add(D.astype(jnp.float32))
  y = _conv(u, k, circular, interpret)
  if gate is not None:
    y = (y.astype(jnp.float32) * gate.astype(jnp.float32)).astype(u.dtype)
  return y
