"""FFT convolution as a Monarch (FlashFFTConv-style) Pallas Mosaic GPU kernel.

    y[b, t, h] = sum_s k[h, s] u[b, t - s, h]      causal (zero-padded) or circular

Plan (FFT size n, a power of two; causal: n = 2 * next_pow2(L), circular: n = L):

* Real input, no doubled work: batch b and b + B/2 of the same channel share the
  kernel, so they ride as the real and imaginary parts of ONE complex sequence
  z = u[b] + i u[b + B/2] (a real-kernel convolution is linear over re/im). One
  complex n-point FFT serves two real sequences; an odd batch gets a zero row.
* Inner transform (in the kernel), size q = n (n <= 4096) or 4096: a sequence of q
  points is a (r, c) row-major tile, x[q1 + c * q2] at [q2, q1], r = q // c rows,
  c = max(16, q // 64) columns. Cooley-Tukey with the slow index first:
      stage 1  F_r @ X           DFT over rows  (wgmma, M = 64, K = 64, N = c)
      twiddle  * w_q^(q1 k2)     elementwise, registers
      stage 2  . @ F_c           DFT over columns (wgmma, M = 64, K = N = c)
  giving the spectrum at k = r k1 + k2 in the transposed ("Monarch") order [k2, k1];
  the kernel's spectrum is precomputed in that order, so the pointwise product and the
  inverse (conj stages in reverse) never permute. Sequences with r < 64 (q = 256,
  512) are stacked G = 64 // r to a 64-row tile with a block-diagonal F_r.
* Outer factor (order 3, n > 4096): n = p * 4096 with p = n / 4096 <= 32; the p-point
  DFT over the slow index and its twiddle w_n^(j kp) run in XLA as unrolled real-plane
  arithmetic that fuses with the layout transpose (one HBM round trip; it reads only
  the outer rows that hold data, half of them for a zero-padded causal input), each of
  the p rows then goes through the fused inner kernel, and XLA undoes the outer step for
  the output rows that are kept. (FlashFFTConv does the same split for sequences that
  do not fit on chip.)
* Complex products as 4 real products ((A+iB)(X+iY)), -Im(F) kept as a third constant so
  that all of them accumulate into two accumulators (re, im) issued back to back, with one
  wait per complex product. Every real product on the matrix units in bf16 with f32
  accumulation. f32 inputs: bf16x3 (A_hi B_hi + A_hi B_lo + A_lo B_hi, about 1e-5
  relative error); bf16 inputs: one bf16 product (about 1e-2). bf16 (not tf32) because
  Mosaic GPU's wgmma only transposes 16-bit operands and stage 1 contracts the slow (row)
  axis of the tile.
* I/O as bf16 planes: XLA writes each value as hi (+ lo for f32) bf16 planes, the bytes of
  f32, so TMA loads a pair straight into the matmul operand tile (no f32 staging and no
  split in the kernel); outputs leave the same way as hi + lo (~16 significant bits,
  below the bf16x3 products' error), recombined by XLA in the fusion that follows.
* Two warpgroups per CTA (when shared memory allows, `default_warpgroups`) share the
  DFT matrices, twiddles and spectrum and take alternate batch pairs, so one's matrix
  products overlap the other's loads and elementwise work (one warpgroup alone waits on
  every product). In correlate mode the second hands its partial sum to the first.
* SMEM per CTA at c = 64, two warpgroups, f32: DFT matrix (re, im, -im) x (hi, lo) 48 KiB
  (F_r = F_c = F_64 at q = 4096: one copy), twiddle and spectrum tiles (f32 re/im)
  2 x 32 KiB, operand tiles (re, im) x (hi, lo) 32 KiB per warpgroup and input: filter
  176 KiB, correlate (two inputs, no spectrum) 208 KiB (`smem_bytes`).

Kernels ("filter" and "correlate"), grid over tiles of sequences, loop over batch pairs:
  filter     y_p = IFFT(FFT(x_p) * S)          forward (S = spectrum of k) and du (conj S)
  correlate  c = IFFT(sum_p FFT(a_p) conj FFT(b_p))   dk = Re c[:Lk], a = dy, b = u
The spectrum tile is loaded once per CTA and reused for every batch pair.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ssm.ops import _pallas
from ssm.ops._pallas import pl, plgpu

TILE_M = 64          # rows of a tile: the wgmma M (one warpgroup)
MAX_INNER = 4096     # largest transform done wholly in the kernel (64 x 64)
MIN_FFT, MAX_FFT = 256, 131072


# ----------------------------------------------------------------------------
# Static plan and constant matrices (NumPy, float64, then split to bf16).
# ----------------------------------------------------------------------------
def plan(n: int) -> tuple[int, int, int, int, int]:
  """FFT size n -> (p outer, q inner, r rows per sequence, c columns, G sequences per tile)."""
  if n & (n - 1) or not MIN_FFT <= n <= MAX_FFT:
    raise ValueError(f"fft_conv pallas: FFT size {n} must be a power of two in "
                     f"[{MIN_FFT}, {MAX_FFT}]")
  q = min(n, MAX_INNER)
  c = max(16, q // TILE_M)
  r = q // c
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


def _shared_dft(q: int) -> bool:
  """The left and right DFT matrices are the same F_64 (q = 4096): one SMEM copy."""
  return q == TILE_M * TILE_M


def _constants(q: int, r: int, c: int, nsplit: int):
  """(left (3*ns, 64, 64) bf16, right (3*ns, c, c) bf16, twiddle (2, 64, c) f32).

  Index part * ns + split, part 0 = real, 1 = imaginary, 2 = minus the imaginary part (so
  that every complex product is a sum of real products into two accumulators).
  """
  left, right, tw = _constants_np(q, r, c)
  mats = []
  for m in (left, right):
    mats.append(jnp.concatenate([_split(m.real, nsplit), _split(m.imag, nsplit),
                                 _split(-m.imag, nsplit)]))
  twid = jnp.asarray(np.stack([tw.real, tw.imag]), jnp.float32)
  return mats[0], mats[1], twid


def _swizzled(shape, dtype, swizzle: int):
  """SMEM operand of a wgmma: tiled and swizzled on the last (minor) dimension. Both
  operands of one wgmma need the same swizzle, so every operand of the kernel takes the
  data tile's (min(128, 2 c) bytes: 32 at c = 16, 64 at c = 32)."""
  elems = swizzle // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(
      plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle)))


def smem_bytes(mode: str, q: int, c: int, nsplit: int, warpgroups: int) -> int:
  """Shared memory of one CTA (the kernel's scratch, barriers aside)."""
  bf, f4 = 2, 4
  left = 3 * nsplit * TILE_M * TILE_M * bf
  right = 0 if _shared_dft(q) else 3 * nsplit * c * c * bf
  tiles = TILE_M * c
  tw = 2 * tiles * f4
  spec = 2 * tiles * f4 if mode == "filter" else 0
  ops = (1 if mode == "filter" else 2) * 4 * tiles * bf    # per warpgroup
  return left + right + tw + spec + warpgroups * ops


SMEM_LIMIT = 227 * 1024   # an H100 CTA's dynamic shared memory


def default_warpgroups(mode: str, q: int, c: int, nsplit: int) -> int:
  """Two warpgroups (two batch pairs in flight on an SM, sharing the constants) when they
  fit in shared memory with room for barriers, else one."""
  return 2 if smem_bytes(mode, q, c, nsplit, 2) + 4096 <= SMEM_LIMIT else 1


# ----------------------------------------------------------------------------
# The kernel body.
# ----------------------------------------------------------------------------
def _make_kernel(mode: str, *, n_pairs: int, n_tiles: int, q: int, r: int, c: int,
                 nsplit: int, warpgroups: int, interpret: bool):
  """Build the plgpu kernel; mode "filter" or "correlate".

  Data tiles are bf16 planes: index part * ns + split of (re, im) x (hi[, lo]) on input,
  part * 2 + split of (re, im) x (hi, lo) on output (hi + lo keeps ~16 bits: f32 I/O at
  the bytes of f32, straight into and out of the matmul operand tile by TMA).

  filter:    (x (P, T, 2ns, 64, c), s_re, s_im (T, 64, c), left, right, tw)
             -> y (P, T, 4, 64, c)
  correlate: (a, b (P, T, 2ns, 64, c), left, right, tw) -> c (T, 4, 64, c)

  `warpgroups` (1 or 2) warpgroups per CTA share the constants (and the spectrum) and
  take alternate batch pairs, so that one's matrix products overlap the other's loads
  and elementwise work; in correlate mode the second one's sum joins the first's at the
  end.
  """
  ns, wgs = nsplit, warpgroups
  wg_layout = plgpu.Layout.WGMMA
  shape = (TILE_M, c)
  f32 = jnp.float32
  inv_q = 1.0 / q
  shared = _shared_dft(q)
  n_in = 2 if mode == "correlate" else 1   # operand tiles per warpgroup (a and b)
  iters = -(-n_pairs // wgs)

  def real_pairs(a, b):
    """a, b: lists of split refs [hi, lo]; bf16x3 (or bf16x1) pairs of one real product."""
    if ns == 1:
      return [(a[0], b[0])]
    return [(a[0], b[0]), (a[0], b[1]), (a[1], b[0])]

  def cmul_mm(f, x, *, conj: bool, const_left: bool):
    """Complex product of a constant DFT matrix F and the data tile X (split refs).

    f: [re, im, -im] lists of split refs; x: [re, im]. const_left: F @ X, else X @ F.
    conj: use conj(F). Every real product is issued into one of two accumulators before
    either is read (one wait per complex product). Returns (re, im) f32 values.
    """
    fr, fi, fn = f
    xr, xi = x
    def p(fm, xm):
      return real_pairs(fm, xm) if const_left else real_pairs(xm, fm)
    if not conj:   # (Fr + iFi)(Xr + iXi)
      re_pairs, im_pairs = p(fr, xr) + p(fn, xi), p(fr, xi) + p(fi, xr)
    else:          # (Fr - iFi)(Xr + iXi)
      re_pairs, im_pairs = p(fr, xr) + p(fi, xi), p(fr, xi) + p(fn, xr)

    def body(acc_re, acc_im):
      for acc, pairs in ((acc_re, re_pairs), (acc_im, im_pairs)):
        for a, b in pairs:
          plgpu.wgmma(acc, a, b)
      return acc_re[...], acc_im[...]
    return pl.run_scoped(body, plgpu.ACC(shape, f32), plgpu.ACC(shape, f32))

  def store_split(ops, re, im, nsplit_out):
    """f32 (re, im) -> the operand tile's planes part * 2 + split, hi (and lo)."""
    for part, v in enumerate((re, im)):
      hi = v.astype(jnp.bfloat16)
      ops.at[2 * part][...] = hi
      if nsplit_out == 2:
        ops.at[2 * part + 1][...] = (v - hi.astype(f32)).astype(jnp.bfloat16)
    plgpu.commit_smem()

  def cmul(ar, ai, br, bi, conj_b=False):
    if conj_b:
      return ar * br + ai * bi, ai * br - ar * bi
    return ar * br - ai * bi, ar * bi + ai * br

  def kernel(*refs):
    if mode == "filter":
      x_ref, s_re, s_im, left_h, right_h, tw_h, y_ref = refs[:7]
      in_refs = (x_ref,)
    else:
      a_ref, b_ref, left_h, right_h, tw_h, c_ref = refs[:6]
      in_refs = (a_ref, b_ref)
    left_s, right_s, tw_s, spec_s, ops_s, const_bar, io_bar, join_bar, done = refs[-9:]
    tile = lax.axis_index("tile")
    wg = lax.axis_index("wg") if wgs > 1 else 0
    n_const = (2 if shared else 3) + (2 if mode == "filter" else 0)

    # Constants (and this tile's spectrum) once per CTA, shared by the warpgroups.
    @pl.when(wg == 0)
    def _load_constants():
      plgpu.copy_gmem_to_smem(left_h, left_s, const_bar.at[0])
      plgpu.copy_gmem_to_smem(tw_h, tw_s, const_bar.at[1])
      if not shared:
        plgpu.copy_gmem_to_smem(right_h, right_s, const_bar.at[2])
      if mode == "filter":
        plgpu.copy_gmem_to_smem(s_re.at[tile], spec_s.at[0], const_bar.at[n_const - 2])
        plgpu.copy_gmem_to_smem(s_im.at[tile], spec_s.at[1], const_bar.at[n_const - 1])
    for i in range(n_const):
      plgpu.barrier_wait(const_bar.at[i])

    right_ref = left_s if shared else right_s
    lft = [[left_s.at[part * ns + j] for j in range(ns)] for part in range(3)]
    rgt = [[right_ref.at[part * ns + j] for j in range(ns)] for part in range(3)]
    mine = ops_s.at[wg]                                  # (n_in, 4, 64, c)

    def planes(t):  # operand tile t of this warpgroup as [re splits, im splits]
      return [[mine.at[t, 2 * part + j] for j in range(ns)] for part in range(2)]

    def forward(t):
      """Operand tile t (natural order) -> spectrum in [k2, k1] order (f32 values)."""
      re, im = cmul_mm(lft, planes(t), conj=False, const_left=True)
      twr = _pallas.load(tw_s.at[0], wg_layout, interpret)
      twi = _pallas.load(tw_s.at[1], wg_layout, interpret)
      re, im = cmul(re, im, twr, twi)
      store_split(mine.at[t], re, im, ns)
      return cmul_mm(rgt, planes(t), conj=False, const_left=False)

    def inverse(re, im, t):
      """Spectrum [k2, k1] -> sequence (unnormalised: the 1/q is in the spectrum), through
      operand tile t."""
      store_split(mine.at[t], re, im, ns)
      re, im = cmul_mm(rgt, planes(t), conj=True, const_left=False)
      twr = _pallas.load(tw_s.at[0], wg_layout, interpret)
      twi = _pallas.load(tw_s.at[1], wg_layout, interpret)
      re, im = cmul(re, im, twr, twi, conj_b=True)
      store_split(mine.at[t], re, im, ns)
      return cmul_mm(lft, planes(t), conj=True, const_left=True)

    def load_inputs(pair):
      """TMA the pair's data tiles into this warpgroup's operand tiles."""
      for t, src in enumerate(in_refs):
        bar = io_bar.at[wg * n_in + t]
        for part in range(2):
          for j in range(ns):
            plgpu.copy_gmem_to_smem(src.at[pair, tile, part * ns + j],
                                    mine.at[t, 2 * part + j], bar)
      for t in range(n_in):
        plgpu.barrier_wait(io_bar.at[wg * n_in + t])

    def store_tile(t, dst):
      """Operand tile t (hi/lo planes, already committed) -> dst (4, 64, c) in HBM."""
      for j in range(4):
        plgpu.copy_smem_to_gmem(mine.at[t, j], dst.at[j])
      plgpu.wait_smem_to_gmem(0)   # the tile is reloaded by the next pair

    if mode == "filter":
      def body(it, carry):
        pair = it * wgs + wg

        @pl.when(pair < n_pairs)
        def _():
          load_inputs(pair)
          re, im = forward(0)
          sr = _pallas.load(spec_s.at[0], wg_layout, interpret)
          si = _pallas.load(spec_s.at[1], wg_layout, interpret)
          re, im = cmul(re, im, sr, si)
          re, im = inverse(re, im, 0)
          store_split(mine.at[0], re, im, 2)
          store_tile(0, y_ref.at[pair, tile])
        return carry
      lax.fori_loop(0, iters, body, 0)
    else:
      def body(it, acc):
        pair = it * wgs + wg
        acc_r, acc_i = acc
        valid = pair < n_pairs
        load_inputs(jnp.minimum(pair, n_pairs - 1))   # a spare iteration adds zero
        ar, ai = forward(0)
        br, bi = forward(1)
        pr, pi = cmul(ar, ai, br, bi, conj_b=True)
        keep = jnp.where(valid, 1.0, 0.0).astype(f32)
        return acc_r + keep * pr, acc_i + keep * pi
      zero = _pallas.cast(jnp.zeros(shape, f32), wg_layout, interpret)
      acc_r, acc_i = lax.fori_loop(0, iters, body, (zero, zero))
      if wgs > 1:
        # The second warpgroup hands its sum to the first through its operand tile 1
        # (hi/lo, ~16 bits), which nobody reads any more.
        @pl.when(wg == 1)
        def _hand_over():
          store_split(mine.at[1], acc_r, acc_i, 2)
          plgpu.barrier_arrive(join_bar)

        @pl.when(wg == 0)
        def _finish():
          plgpu.barrier_wait(join_bar)
          other = ops_s.at[1, 1]
          part = [_pallas.load(other.at[j], wg_layout, interpret).astype(f32)
                  for j in range(4)]
          sum_r = acc_r + (part[0] + part[1])
          sum_i = acc_i + (part[2] + part[3])
          re, im = inverse(sum_r * inv_q, sum_i * inv_q, 0)
          store_split(mine.at[0], re, im, 2)
          store_tile(0, c_ref.at[tile])
      else:
        re, im = inverse(acc_r * inv_q, acc_i * inv_q, 0)
        store_split(mine.at[0], re, im, 2)
        store_tile(0, c_ref.at[tile])

    if wgs > 1:  # no warpgroup exits while the other still issues wgmma on shared tiles
      plgpu.barrier_arrive(done)
      plgpu.barrier_wait(done)

  sw = min(128, 2 * c)
  scratch = [
      _swizzled((3 * ns, TILE_M, TILE_M), jnp.bfloat16, sw),       # left DFT (block-diag F_r)
      _swizzled((3 * ns, c, c), jnp.bfloat16, sw) if not shared    # right DFT F_c
      else plgpu.SMEM((1, 8, 8), f32),                             # (shared: unused)
      plgpu.SMEM((2, TILE_M, c), f32),                             # twiddle
      plgpu.SMEM((2, TILE_M, c) if mode == "filter" else (1, 8, 8), f32),  # spectrum
      _swizzled((wgs, n_in, 4, TILE_M, c), jnp.bfloat16, sw),      # operand tiles
      plgpu.Barrier(num_barriers=5),
      plgpu.Barrier(num_arrivals=2 * ns, num_barriers=wgs * n_in),
      plgpu.Barrier(),                                             # correlate hand-over
      plgpu.Barrier(num_arrivals=wgs),                             # done
  ]
  if mode == "filter":
    out = jax.ShapeDtypeStruct((n_pairs, n_tiles, 4, TILE_M, c), jnp.bfloat16)
  else:
    out = jax.ShapeDtypeStruct((n_tiles, 4, TILE_M, c), jnp.bfloat16)
  extra = dict(num_threads=wgs, thread_name="wg") if wgs > 1 else {}
  return _pallas.kernel(
      kernel, out_type=out, grid=(n_tiles,), grid_names=("tile",),
      scratch_types=scratch, interpret=interpret, **extra)


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
  plan(fft_size(seq_len, circular))


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


def _to_rows(xr, xi, n: int, h_pad: int):
  """Complex sequences as planes xr, xi (P, H, m), m <= n, zero beyond m -> kernel tiles
  (re, im) (P, T, 64, c), natural order inside each inner sequence, after the outer DFT
  step when n > 4096 (which reads only the outer rows that hold data: half of them for a
  zero-padded causal input)."""
  p, q, r, c, g = plan(n)
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


def _from_rows(re, im, n: int, h: int, length: int):
  """Inverse of _to_rows: tiles (..., T, 64, c) -> planes (re, im) (..., H, length), the
  outer step undone for the outer rows that reach `length` only."""
  p, q, r, c, g = plan(n)
  lead = re.shape[:-3]
  re, im = (x.reshape(*lead, -1, p, q)[..., :h, :, :] for x in (re, im))
  if p > 1:
    rows = -(-length // q)
    (wr, wi), tw = _outer_factors(p, q, n, rows, inverse=True)
    re, im = _small_cmatmul(wr, wi, re, im, pre=tw)                    # (..., H, rows, q)
  re, im = (x.reshape(*lead, h, -1)[..., :length] for x in (re, im))
  return re, im


def _spectrum(k, n: int, h_pad: int, conj: bool):
  """Kernel spectrum (H, Lk) -> tiles (re, im) (T, 64, c) in the kernel's Monarch order,
  scaled by 1/q (the inner inverse is unnormalised)."""
  p, q, r, c, g = plan(n)
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


def _h_pad(h: int, n: int) -> int:
  g = plan(n)[4]
  return -(-h // g) * g


def _to_operands(xr, xi, nsplit: int):
  """f32 planes (..., T, 64, c) -> the kernel's bf16 input (..., T, 2 nsplit, 64, c):
  re hi[, re lo], im hi[, im lo] (hi + lo carries ~16 bits of each value)."""
  out = []
  for v in (xr, xi):
    hi = v.astype(jnp.bfloat16)
    out.append(hi)
    if nsplit == 2:
      out.append((v - hi.astype(jnp.float32)).astype(jnp.bfloat16))
  return jnp.stack(out, axis=-3)


def _from_operands(y):
  """The kernel's output (..., T, 4, 64, c) bf16 (re hi, re lo, im hi, im lo) -> f32
  planes (re, im) (..., T, 64, c)."""
  y = y.astype(jnp.float32)
  return y[..., 0, :, :] + y[..., 1, :, :], y[..., 2, :, :] + y[..., 3, :, :]


def _filter(zr, zi, k, n: int, length: int, *, conj: bool, nsplit: int, interpret: bool,
            warpgroups: int | None = None):
  """IFFT_n(FFT_n(z) * K (or conj K))[:length] for complex rows z as planes (P, H, m)."""
  p, q, r, c, g = plan(n)
  h = zr.shape[1]
  hp = _h_pad(h, n)
  x = _to_operands(*_to_rows(zr, zi, n, hp), nsplit)
  sr, si = _spectrum(k, n, hp, conj)
  left, right, tw = _constants(q, r, c, nsplit)
  wgs = warpgroups or default_warpgroups("filter", q, c, nsplit)
  call = _make_kernel("filter", n_pairs=x.shape[0], n_tiles=x.shape[1], q=q, r=r, c=c,
                      nsplit=nsplit, warpgroups=wgs, interpret=interpret)
  return _from_rows(*_from_operands(call(x, sr, si, left, right, tw)), n, h, length)


def _correlate(a, b, n: int, length: int, *, nsplit: int, interpret: bool,
               warpgroups: int | None = None):
  """Re IFFT_n(sum_p FFT_n(a_p) conj FFT_n(b_p))[:length] for planes a, b (P, H, m)
  -> (H, length)."""
  p, q, r, c, g = plan(n)
  h = a[0].shape[1]
  hp = _h_pad(h, n)
  xa = _to_operands(*_to_rows(*a, n, hp), nsplit)
  xb = _to_operands(*_to_rows(*b, n, hp), nsplit)
  left, right, tw = _constants(q, r, c, nsplit)
  wgs = warpgroups or default_warpgroups("correlate", q, c, nsplit)
  call = _make_kernel("correlate", n_pairs=xa.shape[0], n_tiles=xa.shape[1], q=q, r=r, c=c,
                      nsplit=nsplit, warpgroups=wgs, interpret=interpret)
  return _from_rows(*_from_operands(call(xa, xb, left, right, tw)), n, h, length)[0]


# ----------------------------------------------------------------------------
# Public entry with the custom VJP.
# ----------------------------------------------------------------------------
def _nsplit(dtype) -> int:
  return 1 if jnp.dtype(dtype) == jnp.bfloat16 else 2


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(u, k, circular: bool, interpret: bool, warpgroups: int | None):
  return _conv_fwd(u, k, circular, interpret, warpgroups)[0]


def _conv_fwd(u, k, circular, interpret, warpgroups):
  batch, seq_len, _ = u.shape
  n = fft_size(seq_len, circular)
  yr, yi = _filter(*_pack(u), k, n, seq_len, conj=False, nsplit=_nsplit(u.dtype),
                   interpret=interpret, warpgroups=warpgroups)
  return _unpack(yr, yi, batch, u.dtype), (u, k)


def _conv_bwd(circular, interpret, warpgroups, res, dy):
  u, k = res
  batch, seq_len, _ = u.shape
  n = fft_size(seq_len, circular)
  ns = _nsplit(u.dtype)
  zdy = _pack(dy)
  du = _unpack(*_filter(*zdy, k, n, seq_len, conj=True, nsplit=ns, interpret=interpret,
                        warpgroups=warpgroups), batch, u.dtype)
  dk = _correlate(zdy, _pack(u), n, k.shape[1], nsplit=ns, interpret=interpret,
                  warpgroups=warpgroups)                                # (H, Lk)
  return du, dk.astype(k.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def fft_conv_pallas(u, k, *, gate=None, circular: bool = False, interpret: bool | None = None,
                    warpgroups: int | None = None):
  """Monarch-FFT convolution kernel. u (B, L, H), k (H, Lk), gate (B, L, H) or None.

  Causal: y[t] = sum_{s <= t} k[s] u[t - s]; circular: indices mod L (L a power of two).
  Output dtype of u; y * gate when gate is given (the product is fused by XLA into the
  transpose that unpacks the kernel's output). Shapes are checked by ssm.ops.fft_conv.
  warpgroups: 1 or 2 per CTA (None: two where shared memory allows); for benchmarks.
  """
  if interpret is None:
    interpret = _pallas.interpret_mode()
  if warpgroups not in (None, 1, 2):
    raise ValueError(f"fft_conv pallas: warpgroups must be None, 1 or 2, got {warpgroups!r}")
  check_supported(u.shape, k.shape, circular)
  y = _conv(u, k, circular, interpret, warpgroups)
  if gate is not None:
    y = (y.astype(jnp.float32) * gate.astype(jnp.float32)).astype(u.dtype)
  return y
