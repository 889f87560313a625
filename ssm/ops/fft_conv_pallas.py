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
  do not fit on chip.) Data between XLA and the kernel stays as float32 re/im planes.
* Complex products as 4 real products ((A+iB)(X+iY)); every real product on the
  matrix units in bf16 with f32 accumulation. f32 inputs: bf16x3 (A_hi B_hi + A_hi B_lo
  + A_lo B_hi, about 1e-5 relative error); bf16 inputs: one bf16 product (about 1e-2).
  bf16 (not tf32) because Mosaic GPU's wgmma only transposes 16-bit operands and
  stage 1 contracts the slow (row) axis of the tile.
* SMEM per CTA at c = 64: DFT matrices 2 x (re, im) x (hi, lo) x 8 KiB = 64 KiB, twiddle
  and spectrum tiles (f32 re/im) 2 x 32 KiB, matmul operand tile (bf16 re/im hi/lo)
  32 KiB, I/O staging (f32 re/im) 32 KiB: 192 KiB (correlate mode: no spectrum, two
  inputs, same total).

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
def _make_kernel(mode: str, *, n_pairs: int, n_tiles: int, q: int, r: int, c: int,
                 nsplit: int, interpret: bool):
  """Build the plgpu kernel; mode "filter" or "correlate".

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

  def mm(pairs):
    """Sum of real matrix products a @ b over (a_ref, b_ref) pairs, f32 accumulation."""
    def body(acc_ref):
      for a, b in pairs:
        plgpu.wgmma(acc_ref, a, b)
      return acc_ref[...]
    return pl.run_scoped(body, plgpu.ACC(shape, f32))

  def real_pairs(a, b):
    """a, b: lists of split refs [hi, lo]; bf16x3 (or bf16x1) pairs of one real product."""
    if ns == 1:
      return [(a[0], b[0])]
    return [(a[0], b[0]), (a[0], b[1]), (a[1], b[0])]

  def cmul_mm(fr, fi, xr, xi, *, conj: bool, const_left: bool):
    """Complex product of a constant DFT matrix F and the data tile X (split refs).

    const_left: F @ X, else X @ F. conj: use conj(F). Returns (re, im) f32 values.
    """
    def p(f, x):
      return real_pairs(f, x) if const_left else real_pairs(x, f)
    if not conj:   # (Fr + iFi)(Xr + iXi)
      re = mm(p(fr, xr)) - mm(p(fi, xi))
      im = mm(p(fr, xi) + p(fi, xr))
    else:          # (Fr - iFi)(Xr + iXi)
      re = mm(p(fr, xr) + p(fi, xi))
      im = mm(p(fr, xi)) - mm(p(fi, xr))
    return re, im

  def store_split(ops, re, im):
    """Write f32 (re, im) values to the bf16 operand tile as hi (and lo) parts."""
    for part, v in enumerate((re, im)):
      hi = v.astype(jnp.bfloat16)
      ops[part * ns][...] = hi
      if ns == 2:
        ops[part * ns + 1][...] = (v - hi.astype(f32)).astype(jnp.bfloat16)
    plgpu.commit_smem()

  def cmul(ar, ai, br, bi, conj_b=False):
    if conj_b:
      return ar * br + ai * bi, ai * br - ar * bi
    return ar * br - ai * bi, ar * bi + ai * br

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


# FFT sizes at which "auto" takes the kernel: where it measured faster than jnp.fft both
# forward and forward+backward (results/README.md, results/pallas_fftconv_h100.txt).
AUTO_FFT_SIZES = (2048, 4096)


def check_preferred(u_shape, circular: bool) -> None:
  """ValueError where the kernel measured slower than jnp.fft (fft_conv's "auto" then
  takes the XLA path; `ssm.ops._impl.choose_impl`'s prefer)."""
  n = fft_size(u_shape[1], circular)
  if n not in AUTO_FFT_SIZES:
    raise ValueError(f"fft_conv pallas: FFT size {n} is not one where the kernel beats "
                     f"jnp.fft ({AUTO_FFT_SIZES})")


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


def _filter(zr, zi, k, n: int, length: int, *, conj: bool, nsplit: int, interpret: bool):
  """IFFT_n(FFT_n(z) * K (or conj K))[:length] for complex rows z as planes (P, H, m)."""
  p, q, r, c, g = plan(n)
  h = zr.shape[1]
  hp = _h_pad(h, n)
  xr, xi = _to_rows(zr, zi, n, hp)
  sr, si = _spectrum(k, n, hp, conj)
  left, right, tw = _constants(q, r, c, nsplit)
  call = _make_kernel("filter", n_pairs=xr.shape[0], n_tiles=xr.shape[1], q=q, r=r, c=c,
                      nsplit=nsplit, interpret=interpret)
  yr, yi = call(xr, xi, sr, si, left, right, tw)
  return _from_rows(yr, yi, n, h, length)


def _correlate(a, b, n: int, length: int, *, nsplit: int, interpret: bool):
  """Re IFFT_n(sum_p FFT_n(a_p) conj FFT_n(b_p))[:length] for planes a, b (P, H, m)
  -> (H, length)."""
  p, q, r, c, g = plan(n)
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(u, k, circular: bool, interpret: bool):
  return _conv_fwd(u, k, circular, interpret)[0]


def _conv_fwd(u, k, circular, interpret):
  batch, seq_len, _ = u.shape
  n = fft_size(seq_len, circular)
  yr, yi = _filter(*_pack(u), k, n, seq_len, conj=False, nsplit=_nsplit(u.dtype),
                   interpret=interpret)
  return _unpack(yr, yi, batch, u.dtype), (u, k)


def _conv_bwd(circular, interpret, res, dy):
  u, k = res
  batch, seq_len, _ = u.shape
  n = fft_size(seq_len, circular)
  ns = _nsplit(u.dtype)
  zdy = _pack(dy)
  du = _unpack(*_filter(*zdy, k, n, seq_len, conj=True, nsplit=ns, interpret=interpret),
               batch, u.dtype)
  dk = _correlate(zdy, _pack(u), n, k.shape[1], nsplit=ns, interpret=interpret)  # (H, Lk)
  return du, dk.astype(k.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def fft_conv_pallas(u, k, *, gate=None, circular: bool = False, interpret: bool | None = None):
  """Monarch-FFT convolution kernel. u (B, L, H), k (H, Lk), gate (B, L, H) or None.

  Causal: y[t] = sum_{s <= t} k[s] u[t - s]; circular: indices mod L (L a power of two).
  Output dtype of u; y * gate when gate is given (the product is fused by XLA into the
  transpose that unpacks the kernel's output). Shapes are checked by ssm.ops.fft_conv.
  """
  interpret = _pallas.interpret_mode(interpret)
  check_supported(u.shape, k.shape, circular)
  y = _conv(u, k, circular, interpret)
  if gate is not None:
    y = (y.astype(jnp.float32) * gate.astype(jnp.float32)).astype(u.dtype)
  return y
