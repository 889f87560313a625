"""The LTI layers' FFT convolution bank with the length split over a mesh axis.

`fft_conv_bank_seq_parallel(u, k_causal, k_anticausal, mesh=...)` computes what
`ssm.ops.fft_conv.fft_conv_bank_xla` computes,

    y[b, t, i, h] = sum_{s < lk} k_causal[i, h, s] u[b, t - s, h]
                  + sum_{s < lk} k_anticausal[i, h, s] u[b, t + s, h]

u (b, l, h), kernels (c, h, lk) with lk <= l, y (b, l, c, h) in float32 (float64 for
float64 inputs), with u and y split over the length on mesh axis `seq_axis` (device p
holds the contiguous chunk t in [p lc, (p + 1) lc), lc = l / P) and the batch over
`batch_axes`; the kernels are replicated (each step generates them from small
parameters). It is a distributed FFT convolution: every device transforms its own chunk,
and two all-to-alls (one per direction of the transform) carry the spectrum across the
devices; no device ever holds the whole length. `fft_conv_bank_seq_gather` is the
alternative it is measured against: all-gather u over the length, run the bank on every
device (the whole convolution, redundantly) and keep the own chunk of the output.

The index algebra (one (b, h) map; P devices, chunk lc, t = i lc + s, i the device):

    y[j lc + r] = sum_{i, s} kern[(j - i) lc + (r - s)] u[i lc + s],   kern = k_causal at
    taps tau >= 0, k_anticausal at -tau <= 0 (two_sided_kernel), zero beyond lk.

  With d = j - i in (-P, P) and e = r - s in (-lc, lc) this is a 2-D linear convolution
  of u[i, s] with kappa[d, e] = kern[d lc + e], so a 2-D circular one on the grid
  Z_2P x Z_2lc computes it without wrap-around (the 1-D to 2-D mapping of a long
  convolution; no twiddles, at the price of a 2 x 2 zero padding, 4 l grid points
  against the 1-D FFT's 2 l):

    u_hat[a, f]   = sum_{i < P, s < lc} u[i, s] w_2P^{i a} w_2lc^{s f}    (w_n = e^{-2 pi i/n})
    y[i, r]       = 1/(4 l) sum_{a, f} u_hat[a, f] kappa_hat[a, f] w_2P^{-i a} w_2lc^{-r f}

  forward: device i pads its chunk to 2 lc and takes its FFT over s (no data moved
    first); the frequencies f = g P + q (g < G = 2 lc / P) go to device q (all-to-all #1),
    which then holds u_hat[i, q + P g] for every block i: the FFT over the block index i
    padded to 2 P is local. The spectrum stays in this permuted order: device q holds
    (a < 2P, f = q + P g).
  product: kappa_hat[a, q + P g]; device q computes only its slice: on the circular grid
    kappa's row d holds the kernel's blocks d and d - 1 side by side (column e mod 2 lc;
    the row d = P and the column e = lc never reach an output), and
    kappa_hat[a, q + P g] = FFT2( sum_m w_2lc^{(x + m G) q} kappa[d, x + m G] )[a, g]
    (x < G): a twiddle, a fold of the 2 lc columns to G (`_kernel_slice` does it from the
    kernel's 2 l taps) and FFTs of sizes 2P and G.
  inverse: the same steps reversed: the inverse FFT over a (keeping blocks i < P),
    all-to-all #2 sends block i back to device i, where the residues q arrive as the
    minor digit of f = g P + q, so the inverse FFT over f (keeping r < lc) is in natural
    order: the frequency order is never undone.

  Why 2-D and not the 1-D mixed-radix map t = hdigit l + i lc + s of one length-2l FFT:
  Cooley-Tukey transforms the coarse digits of t first and the in-chunk digit s last, but
  the all-to-all that makes the device digit i local splits s, so each direction of that
  transform takes two all-to-alls (four a convolution: 8 (P - 1) / P |u| for c = 1, even
  with the all-gather only at P = 8). Here the in-chunk transform comes first and the
  kernel is re-blocked instead, so one all-to-all per direction suffices.

  Two real sequences of the batch ride in one complex transform (the bank's "pairs"
  packing: sequence p and p + b/2 as real and imaginary parts; every kernel is real, so
  the two convolutions come back apart); an odd local batch gets a zero sequence. The
  1/(4 l) rides on the kernel's spectrum, and each inverse is a forward FFT of the
  conjugate. Gradients are JAX's autodiff of all this (the all-to-alls transpose to
  all-to-alls; the replicated kernels' cotangents are summed over the mesh by
  shard_map's transpose).

Communication per device, per call, with |u| = b_loc lc h x 4 bytes (float32) the local
input: all-to-all #1 moves the padded complex spectrum of the local pairs, 2 |u|, and #2
the c output maps, 2 c |u|, each (P - 1) / P of it off the device:

    distributed FFT:  2 (1 + c) (P - 1) / P |u|        all-gather:  (P - 1) |u|

forward, and the same again for the backward pass (the all-to-alls' transposes against
the all-gather's reduce-scatter of du); both psum the kernels' cotangents (c, h, lk)
over the mesh. (An odd local batch sends its padding sequence too.) So the all-to-alls
move less than the all-gather from P > 2 (1 + c) on (c = 1, the S4/S4D default: P > 4,
half at P = 8) and as much at P = 2 (1 + c); and each device transforms 4 l / P grid
points against the all-gather's whole 2 l, with activations of O(l / P) instead of O(l).
When it should win: P >= 4 (c = 1), and the more so the larger b h l / P is, since the
all-gather path repeats the whole convolution on every device; when it should lose: P = 2,
twice the all-gather's bytes for the same FFT work. Both paths read the whole (c, h, lk)
kernel on every device (here one twiddled pass, there its FFT of size 2 l). The length
must be a multiple of P and each chunk hold 2 lc = a multiple of P frequencies (P / 2
tokens at least, for powers of two); both are ValueErrors at the boundary.
benchmarks/seq_conv.py measures the paths (results/seq_conv_cpu8.txt).

    mesh = jax.make_mesh((2, 4), ("data", "seq"))
    y = fft_conv_bank_seq_parallel(u, k_causal, k_anticausal, mesh=mesh)  # (b, l, c, h)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from ssm._checks import check_float
from ssm.ops.fft_conv import _pack, _unpack_conj, fft_conv_bank_xla, two_sided_kernel
from ssm.ops.seq_parallel import _axes, _shard, _spec

__all__ = ["fft_conv_bank_seq_gather", "fft_conv_bank_seq_parallel", "fft_moves_fewer_bytes",
           "seq_conv_bytes"]


def seq_conv_bytes(path: str, local_bytes: float, n: int, channels: int = 1) -> float:
  """Bytes one device sends in one forward call (the backward sends as many again):
  path "fft" (the two all-to-alls) or "gather" (the all-gather), for a local input of
  `local_bytes` (float32 b_loc x lc x h x 4), n devices on the seq axis, c = channels."""
  if path == "fft":
    return 2.0 * (1 + channels) * (n - 1) / n * local_bytes
  if path == "gather":
    return float(n - 1) * local_bytes
  raise ValueError(f"seq_conv_bytes: path must be 'fft' or 'gather', got {path!r}")


def fft_moves_fewer_bytes(n: int, channels: int = 1) -> bool:
  """Whether the distributed FFT's all-to-alls move no more bytes than the all-gather's,
  n >= 2 (1 + c) (module docstring); at n = 2 (1 + c) they tie and it still does 2 / n of
  the FFT work per device."""
  return n >= 2 * (1 + channels)


def _check(fn, u, k_causal, k_anticausal):
  check_float(fn, u=u, k_causal=k_causal, k_anticausal=k_anticausal)
  if u.ndim != 3 or k_causal.ndim != 3 or k_causal.shape[1] != u.shape[2]:
    raise ValueError(f"{fn}: u (b, l, h) and kernels (c, h, lk) expected, got {u.shape} and "
                     f"{k_causal.shape}")
  if k_anticausal is not None and k_anticausal.shape != k_causal.shape:
    raise ValueError(f"{fn}: anti-causal kernels {k_anticausal.shape} must match the causal "
                     f"ones {k_causal.shape}")
  if not 1 <= k_causal.shape[2] <= u.shape[1]:
    raise ValueError(f"{fn}: kernel length {k_causal.shape[2]} must be in [1, {u.shape[1]}]")


def _dtype(u, k_causal, k_anticausal):
  kernels = (k_causal,) if k_anticausal is None else (k_causal, k_anticausal)
  return jnp.promote_types(jnp.result_type(u, *kernels), jnp.float32)  # f32, or f64


# -- the distributed FFT --------------------------------------------------------------------

def fft_conv_bank_seq_parallel(u, k_causal, k_anticausal=None, *, mesh: Mesh,
                               seq_axis: str = "seq", batch_axes="auto"):
  """`fft_conv_bank_xla` with u and the output split over the length on `seq_axis`, by a
  distributed FFT (module docstring).

  Args:
    u: (b, l, h), split over the length on seq_axis (any sharding: shard_map moves it).
    k_causal, k_anticausal: (c, h, lk), lk <= l, replicated; k_anticausal may be None.
    mesh: a jax.sharding.Mesh with axis seq_axis.
    batch_axes: "auto" (every other mesh axis, as the trainer splits its batch), a name, a
      tuple of names or None (the batch whole on every device).

  Returns:
    (b, l, c, h) float32 (float64 for float64 inputs), split as u.
  """
  fn = "fft_conv_bank_seq_parallel"
  _check(fn, u, k_causal, k_anticausal)
  n, bax = _axes(fn, mesh, seq_axis, batch_axes, *u.shape[:2])
  lc = u.shape[1] // n
  if (2 * lc) % n:
    raise ValueError(f"{fn}: a chunk of {lc} tokens per device of mesh axis {seq_axis!r} is "
                     f"too short for the decomposition: its 2 x {lc} frequencies must split "
                     f"into the {n} devices' slices")
  return _fft_sp(u, k_causal, k_anticausal, mesh=mesh, seq_axis=seq_axis, bax=bax, n=n,
                 dtype=_dtype(u, k_causal, k_anticausal))


def _kernel_slice(kern, q, n: int, lc: int):
  """This device's slice of the kernel's 2-D spectrum, with the 1/(4 l).

  kern: (c, h, 2l) two-sided circular kernel (tap tau at tau mod 2l); q: this device's
  index (traced). Returns (c, h, G, 2n) complex: [g, a] = kappa_hat[a, q + n g] / (4 l).

  Row d of kappa's grid is [block d, block d - 1] (columns x < lc, then lc + x), so its
  twiddled fold sum_m w_2lc^{(x + m G) q} kappa[d, x + m G] is F(block d)[x] + (-1)^q
  F(block d - 1)[(x - lc) mod G], F(beta)[x] = sum_{x' < lc, x' = x mod G} w_2lc^{x' q}
  beta[x'] (w_2lc^{lc q} = (-1)^q): one pass over the kernel's 2 l taps, never the 4 l grid.
  """
  c, h, two_l = kern.shape
  g_len = 2 * lc // n
  rows = -(-lc // g_len)                                          # ceil(lc / G)
  cdtype = jnp.result_type(kern.dtype, jnp.complex64)
  blocks = kern.reshape(c, h, 2 * n, lc)                          # block d: taps [d lc, d lc + lc)
  blocks = jnp.pad(blocks, [(0, 0)] * 3 + [(0, rows * g_len - lc)])
  # angles from exact integer residues (no large arguments to cos and sin)
  phase = (jnp.arange(rows * g_len) * q) % (2 * lc)
  twiddle = jnp.exp(-2j * np.pi * phase.astype(kern.dtype) / (2 * lc)).astype(cdtype)
  fold = jnp.sum((blocks * twiddle).reshape(c, h, 2 * n, rows, g_len), axis=3)   # F(block d)
  sign = (1 - 2 * (q % 2)).astype(kern.dtype)                     # (-1)^q
  folded = fold + sign * jnp.roll(jnp.roll(fold, 1, axis=2), lc % g_len, axis=3)
  spec = jnp.fft.fft(jnp.fft.fft(folded, axis=3), axis=2) / (2 * two_l)          # 1 / (4 l)
  return jnp.swapaxes(spec, 2, 3)


@functools.partial(jax.jit, static_argnames=("mesh", "seq_axis", "bax", "n", "dtype"))
def _fft_sp(u, k_causal, k_anticausal, *, mesh, seq_axis, bax, n, dtype):
  def body(u, k_causal, k_anticausal):
    b, lc, h = u.shape
    c = k_causal.shape[0]
    g_len = 2 * lc // n
    q = lax.axis_index(seq_axis)
    kern = two_sided_kernel(k_causal, k_anticausal, 2 * n * lc, dtype)   # (c, h, 2l)
    k_hat = _kernel_slice(kern, q, n, lc)                               # (c, h, G, 2n)
    u_t = jnp.swapaxes(u.astype(dtype), 1, 2)                           # (b, h, lc)
    if b % 2:  # a zero sequence completes the last pair
      u_t = jnp.concatenate([u_t, jnp.zeros_like(u_t[:1])], axis=0)
    pairs = u_t.shape[0] // 2
    z = jnp.fft.fft(_pack(u_t), n=2 * lc, axis=-1)                      # (b2, h, 2lc): f
    z = z.reshape(pairs, h, g_len, n)                                   # f = g n + q'
    z = lax.all_to_all(z, seq_axis, 3, 3, tiled=True)                   # [..., g, i]: f = q + n g
    u_hat = jnp.fft.fft(z, n=2 * n, axis=-1)                            # (b2, h, G, 2n): a
    v = jnp.fft.fft(jnp.conj(u_hat[:, None] * k_hat[None]), axis=-1)[..., :n]   # block i < n
    v = lax.all_to_all(v, seq_axis, 4, 4, tiled=True)                   # [..., g, q']: f = g n + q'
    y = jnp.fft.fft(v.reshape(pairs, c, h, 2 * lc), axis=-1)[..., :lc]  # conj(y) of the pairs
    return jnp.moveaxis(_unpack_conj(y)[:b], 3, 1)                      # (b, lc, c, h)

  x3, x4 = _spec(bax, seq_axis, 3), _spec(bax, seq_axis, 4)
  return _shard(body, mesh, (x3, P(), None if k_anticausal is None else P()), x4)(
      u, k_causal, k_anticausal)


# -- the all-gather alternative -------------------------------------------------------------

def fft_conv_bank_seq_gather(u, k_causal, k_anticausal=None, *, mesh: Mesh,
                             seq_axis: str = "seq", batch_axes="auto", conv=None):
  """The same result by an all-gather of u over the length: every device runs
  conv(u_whole, k_causal, k_anticausal) -> (b, l, c, h) (default `fft_conv_bank_xla`; a
  Pallas kernel may be passed, it sees the whole length) and keeps its own chunk of the
  output. The backward pass reduce-scatters du. Arguments and result as
  `fft_conv_bank_seq_parallel` (any length divisible by the seq axis)."""
  fn = "fft_conv_bank_seq_gather"
  _check(fn, u, k_causal, k_anticausal)
  n, bax = _axes(fn, mesh, seq_axis, batch_axes, *u.shape[:2])
  conv = fft_conv_bank_xla if conv is None else conv

  def body(u, k_causal, k_anticausal):
    lc = u.shape[1]
    whole = lax.all_gather(u, seq_axis, axis=1, tiled=True)             # (b, l, h)
    y = conv(whole, k_causal, k_anticausal)                             # (b, l, c, h)
    return lax.dynamic_slice_in_dim(y, lax.axis_index(seq_axis) * lc, lc, axis=1)

  x3, x4 = _spec(bax, seq_axis, 3), _spec(bax, seq_axis, 4)
  return _shard(body, mesh, (x3, P(), None if k_anticausal is None else P()), x4)(
      u, k_causal, k_anticausal)
