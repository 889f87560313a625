"""SSD (Mamba-2) as Pallas Mosaic GPU kernels (Hopper): forward and backward.

Same recurrence as `ssm/ops/ssd.py`, per head h with state S (P, N):

    S_t = exp(a_t) S_{t-1} + w_t x_t B_t^T,   y_t = S_t C_t + D x_t,   a_t = dt_t A_h, w_t = dt_t.

In linear-attention terms q = C, k = B (the head's group), v = x, and a per-token log gate
a_t. One CTA per (batch, head, 64 value columns) walks the sequence in blocks of C = 64
tokens with the (64 x N) float32 state S (this head's rows of P) in registers. Within a
block, i, j positions, G the inclusive cumsum of a inside the block (XLA, float32):

    M[i, j] = exp(G_i - G_j) w_j  (i >= j, same run, else 0)         intra-block decay
    qd_i    = exp(G_i)            (0 unless i is in the run entering the block)
    kd_j    = exp(G_last - G_j) w_j  (0 unless j is in the block's last run)
    sd      = qd_last             (the state survives the block only without a reset)

  forward (three warpgroups, as the lightning kernel: WG0 the state chain, WG1 the
  outputs, WG2 the TMA loads):
    Y = qd o (C S^T) + ((C B^T) o M) X + D X                    (C, 64)
    S <- sd S + (kd o X)^T B                                     (64, N)
  backward, dC (forward sweep, the states recomputed):
    dC = qd o (dY S) + ((dY X^T) o M) B
  backward, dB and dX (reverse sweep over the state gradient E, from E = dS_final; three
  warpgroups as the forward: WG0 the E chain, WG1 dB and dX, WG2 the TMA loads):
    dX' = ((B C^T) o M'^T) dY + kn o (B E^T),  dX = w o dX' + D dY    (M' = M / w_j, kn = kd / w)
    dB  = ((X dY^T) o M^T) C + (kd o X) E
    E  <- sd E + dY^T (qd o C);   dh0 = E after block 0.
  The gate and step gradients follow in XLA from float32 sums the kernels write. The
  gradient of the block-local cumsum G is, at token t of a block,
    dG_t = C_t . dC_t - B_t . dB_t  (+ at the block's last token: sum_j B_j . dB^state_j
           + sd <E, S_before>, the terms of kd and sd; B_j . dB^state_j = kd_j x_j . (B E^T)_j)
  and da_t = sum of dG_s over the tokens s >= t of t's block; then d dt_t = A da_t +
  x_t . dX'_t, dA = sum_t dt_t da_t and dD = sum_t x_t . dy_t. The dC kernel writes the
  state entering every block (bf16) for the reverse sweep's <E, S_before>. (A global
  reverse cumsum of C . dC - B . dB, without the block-end terms, is the same function,
  but those terms cancel over whole runs: at L = 8192 in bf16 its dA was off by 170%,
  the block-local form is within 1%.)

Packed documents: run ids relative to the block and the masks qd / kd / sd above (as
in fla and jla's chunked kernels); a reset token's own a_t is never used, so its gradient
is set to zero exactly.

Sequence split (grids short of one wave of CTAs, e.g. one long sequence: `auto_segments`):
each sequence is cut into S segments run as sequences of their own, each entered with the
state it really gets. A state-only chain kernel (`_chain`) gives every segment's end state
from zero; XLA carries them across the segments (S_in[k+1] = decay[k] S_in[k] + end[k],
decay the segment's total, 0 across a reset), and the kernels run with h0 = S_in. The
backward does the same in reverse for the state gradient (the outputs' gradient to the
state entering each segment, carried back as dS_out[k-1] = decay[k] dS_out[k] + local[k]);
since every block then sees its exact state and state gradient, the block-local gradients
are the unsplit ones.

Nothing per block is stored between the passes: the backward recomputes the states.
dB, dC leave the kernels per head (float32 when a head has two value tiles) and XLA
sums a group's heads. Lengths that are not a multiple of 64 are padded with w = a = 0,
which neither adds to nor decays the state.

Numerics: matmul operands are bf16 with float32 accumulation (float32 inputs are rounded
to bf16 first, as in the lightning kernel); decays, masks and the carried states are
float32, the state rounded to bf16 only as an operand.

SMEM (N = 128, bf16): forward 3 stages x (C, B, X tiles + 9 vectors) 127 KiB, state tiles
and output staging 80 KiB; backward 2 stages, about 200 KiB each kernel; the chain 3
stages and its output staging, 105 KiB, so that two of its CTAs share an SM.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ssm.ops import _pallas
from ssm.ops import _tiles as t
from ssm.ops._segments import resets, run_index
from ssm.ops._impl import interpret_mode, num_sms
from ssm.ops._tiles import BV, C, COLS, F32, MM, ROWS, SMEM_BUDGET, WGMMA

HEAD_DIMS = (64, 128)    # P
STATE_DIMS = (64, 128)   # N
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def check_supported(x, B, Cm) -> None:
  """ValueError naming what the kernel cannot take (shapes already checked by ssd)."""
  p, n = x.shape[3], B.shape[3]
  if p not in HEAD_DIMS:
    raise ValueError(f"ssd(impl='pallas'): headdim {p} must be in {HEAD_DIMS}")
  if n not in STATE_DIMS:
    raise ValueError(f"ssd(impl='pallas'): state size N={n} must be in {STATE_DIMS}")
  for name, v in (("x", x), ("B", B), ("C", Cm)):
    if jnp.dtype(v.dtype) not in DTYPES:
      raise ValueError(f"ssd(impl='pallas'): {name} must be float32 or bfloat16, got {v.dtype}")


# ----------------------------------------------------------------------------- inputs

class _Vectors(NamedTuple):
  """Per-token float32 vectors (b, h, Lp) (run: (b, Lp), or None without segments)."""
  gc: jax.Array    # G: inclusive cumsum of a = dt A inside each block
  w: jax.Array     # dt (0 in the padding)
  qd: jax.Array    # exp(G) on the entering run
  kn: jax.Array    # exp(G_last - G) on the last run
  kd: jax.Array    # kn w
  run: jax.Array | None  # run index relative to the block's first token


def _vectors(dt, A, segment_ids, lp) -> _Vectors:
  b, l, h = dt.shape
  pad = lp - l
  a = jnp.pad((dt.astype(F32) * A.astype(F32)).swapaxes(1, 2), [(0, 0), (0, 0), (0, pad)])
  w = jnp.pad(dt.astype(F32).swapaxes(1, 2), [(0, 0), (0, 0), (0, pad)])
  blocks = lambda v: v.reshape(*v.shape[:-1], lp // C, C)
  gc = jnp.cumsum(blocks(a), axis=-1)                           # (b, h, nb, C)
  qd, kn = jnp.exp(gc), jnp.exp(gc[..., -1:] - gc)
  run = None
  if segment_ids is not None:
    runs = blocks(jnp.pad(run_index(segment_ids), [(0, 0), (0, pad)], mode="edge"))
    entering = jnp.concatenate([runs[:, :1, :1], runs[:, :-1, -1:]], axis=1)   # (b, nb, 1)
    qd = qd * (runs == entering).astype(F32)[:, None]
    kn = kn * (runs == runs[..., -1:]).astype(F32)[:, None]
    run = (runs - runs[..., :1]).astype(F32).reshape(b, lp)
  flat = lambda v: v.reshape(b, h, lp)
  return _Vectors(flat(gc), w, flat(qd), flat(kn), flat(kn) * w, run)


@dataclasses.dataclass(frozen=True)
class _Cfg:
  seq_len: int          # true length L
  out_dtype: jnp.dtype  # x's dtype
  b_dtype: jnp.dtype
  c_dtype: jnp.dtype
  has_h0: bool
  has_d: bool
  has_seg: bool
  interpret: bool
  segments: int = 1     # the sequence split into this many segments (module docstring)


def _kernel(body, cfg, out_type, scratch, grid, **threads):
  return _pallas.kernel(
      body, interpret=cfg.interpret, out_type=out_type, scratch_types=scratch, grid=grid,
      grid_names=("b", "h", "v"), compiler_params=plgpu.CompilerParams(approx_math=True),
      **threads)


def _decay(gc_r, gc_c, run_r, run_c, *, transposed, interpret):
  """exp(G_i - G_j) on i >= j within one run (i the row; transposed: i the column), else 0.
  gc_r / run_r: the block's vectors in the ROWS layout, gc_c / run_c in COLS."""
  shape = (C, C)
  r, c = t.iota(shape, 0, interpret), t.iota(shape, 1, interpret)
  if transposed:
    keep, expo = c >= r, t.cols(gc_c, shape) - t.rows(gc_r, shape)
  else:
    keep, expo = r >= c, t.rows(gc_r, shape) - t.cols(gc_c, shape)
  if run_r is not None:
    keep = keep & (t.rows(run_r, shape) == t.cols(run_c, shape))
  return jnp.exp(jnp.where(keep, expo, -jnp.inf))


def _dims(q, v, cfg: _Cfg):
  """Sizes of a kernel call on q (B, Lp, G, N) and v (B, Lp, H, P): B, Lp, G, N, H, P, heads
  per group, blocks, value tiles, and the dtype of per-head dB / dC partials (float32 when
  a head's value tiles are summed after)."""
  b, lp, g, n = q.shape
  h, p = v.shape[2:]
  nvt = p // BV
  return b, lp, g, n, h, p, h // g, lp // C, nvt, (F32 if nvt > 1 else cfg.out_dtype)


def _unpack(refs, n_tiles, vec_names, has_seg, *optional):
  """A kernel's refs in groups: its n_tiles tile inputs, its per-token vectors by name
  (and "run" with has_seg), one ref or None per optional input present or not, and the
  outputs."""
  refs = list(refs)
  tiles, refs = refs[:n_tiles], refs[n_tiles:]
  vrefs = dict(zip(vec_names, refs[:len(vec_names)]))
  refs = refs[len(vec_names):]
  if has_seg:
    vrefs["run"] = refs.pop(0)
  opts = [refs.pop(0) if present else None for present in optional]
  return tiles, vrefs, opts, refs


def _ids(heads_per_group):
  """This CTA's batch row, head, value tile, group, value columns and warpgroup."""
  bi, hi, vi = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
  return bi, hi, vi, hi // heads_per_group, pl.ds(vi * BV, BV), lax.axis_index("wg")


def _consumer(n_blocks, stages, in_bar, vbufs, step, *, order=lambda i: i, interpret):
  """A compute warpgroup's sweep: for the i-th block of the sweep (block nb = order(i),
  ring slot i % stages, published tile i % 2), wait until its inputs have landed, then
  step(nb, slot, half, rows, ld) with rows its tokens and ld(name, layout) loading its
  per-token vector `name`; at the end wait for the warpgroup's last stores."""
  t.consumer_registers(interpret)

  def body(i, carry):
    nb, slot = order(i), lax.rem(i, stages)
    plgpu.barrier_wait(in_bar.at[slot])
    ld = lambda name, layout: _vec(vbufs[name], slot, layout, interpret)
    step(nb, slot, lax.rem(i, 2), pl.ds(nb * C, C), ld)
    return carry

  lax.fori_loop(0, n_blocks, body, None)
  plgpu.wait_smem_to_gmem(0)


def _ws_scratch(stages, n, vec_bufs, *, tiles, pub="s", **extra):
  """SMEM of a warp-specialised sweep: the input rings (C and B tiles, the (C, 64) tiles
  named in `tiles`, one per per-token vector), their landed / released barriers, the
  double-buffered state tile `{pub}_pub` with its ready / free barriers, and `done`."""
  return dict(
      q_s=t.smem((stages, C, n)), k_s=t.smem((stages, C, n)),
      **{name: t.smem((stages, C, BV)) for name in tiles},
      **{f"{pub}_pub": t.smem((2, BV, n))},
      in_bar=plgpu.Barrier(num_arrivals=2 + len(tiles) + len(vec_bufs), num_barriers=stages),
      in_free=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      **{f"{pub}_ready": plgpu.Barrier(num_barriers=2),
         f"{pub}_free": plgpu.Barrier(num_barriers=2)},
      done=plgpu.Barrier(num_arrivals=3),
      **{name: plgpu.SMEM((stages, C), F32) for name in vec_bufs}, **extra)


def _d_scalar(d_ref, d_s, d_bar, hi):
  """D of head hi (through the SMEM vector d_s), or None without D (d_ref None)."""
  if d_ref is None:
    return None
  plgpu.copy_gmem_to_smem(d_ref.at[hi], d_s, d_bar)
  plgpu.barrier_wait(d_bar)
  return d_s[0]


def _block_m(vbufs, slot, has_seg, interpret):
  """M[i, j] = exp(G_i - G_j) w_j (i >= j, same run) of ring slot `slot`'s block, from the
  rings gc_r, gc_c, w_c (and run_r, run_c)."""
  ld = lambda name, layout: _vec(vbufs[name], slot, layout, interpret)
  runs = (ld("run_r", ROWS), ld("run_c", COLS)) if has_seg else (None, None)
  return _decay(ld("gc_r", ROWS), ld("gc_c", COLS), *runs, transposed=False,
                interpret=interpret) * t.cols(ld("w_c", COLS), (C, C))


def _state_in(h0_ref, buf, bar, bi, hi, cols, n, interpret):
  """The (64, N) float32 state rows entering a forward sweep, in registers: h0's (through
  the SMEM tile `buf`), or zeros without h0 (h0_ref None)."""
  if h0_ref is None:
    return _pallas.cast(jnp.zeros((BV, n), F32), WGMMA, interpret)
  plgpu.copy_gmem_to_smem(h0_ref.at[bi, hi, cols], buf, bar)
  plgpu.barrier_wait(bar)
  return _pallas.load(buf, WGMMA, interpret)


def _vec(ref, slot, layout, interpret):
  return _pallas.load(ref.at[slot], layout, interpret)


def _state_chain(s0, v_s, k_s, vbufs, s_pub, in_bar, in_free, s_ready, s_free, n_blocks,
                 stages, interpret, sb_dst=None):
  """WG0 of the forward sweeps (the forward and dC kernels): per block, publish the
  entering state (bf16) to WG1 through s_pub (and, with sb_dst(nb), to GMEM), then update
  it. Returns the final (64, N) float32 state once WG1 has read the last tiles."""
  t.consumer_registers(interpret)

  def step(nb, st):
    slot = lax.rem(nb, stages)
    tile = t.publish(s_pub, st, nb, slot, in_bar=in_bar, ready=s_ready, free=s_free,
                     flush_stores=sb_dst is not None)
    if sb_dst is not None:
      plgpu.copy_smem_to_gmem(tile, sb_dst(nb))
    st = _state_update(st, slot, v_s, k_s, vbufs, interpret)
    plgpu.barrier_arrive(in_free.at[slot])
    return st

  st = lax.fori_loop(0, n_blocks, step, s0)
  t.drain(s_free, n_blocks)
  return st


def _state_update(st, slot, v_s, k_s, vbufs, interpret):
  """S <- sd S + (kd o X)^T B over ring slot `slot`'s block: the state chain of the forward
  sweeps (st: the (64, N) float32 state rows; vbufs: the rings kd_c and qd_0)."""
  kd = _vec(vbufs["kd_c"], slot, COLS, interpret)
  sd = vbufs["qd_0"][slot, C - 1]
  xt = t.load_t(v_s.at[slot], WGMMA, interpret).astype(F32)                  # (BV, C)
  xd = (xt * t.cols(kd, (BV, C))).astype(MM)
  return t.mm_init(xd, k_s.at[slot], st.shape, init=st * sd, interpret=interpret)


# ----------------------------------------------------------------------------- forward

def _ring_depth(kernel, per_stage, fixed, depths, budget=SMEM_BUDGET):
  """The deepest input ring of `depths` whose SMEM (per_stage bytes a block in flight plus
  `fixed`) fits `budget`; ValueError naming the kernel when none does."""
  for stages in depths:
    if stages * per_stage + fixed <= budget:
      return stages
  raise ValueError(f"ssd {kernel}: {min(depths) * per_stage + fixed} bytes of SMEM do not fit")


def _fwd_stages(n, cfg: _Cfg):
  """Input pipeline depth of the forward (2 to 4 blocks in flight)."""
  per_stage = 2 * (2 * C * n + C * BV) + (7 + 2 * cfg.has_seg) * C * 4
  fixed = (2 * 2 * BV * n + 2 * C * BV * jnp.dtype(cfg.out_dtype).itemsize + 4 * BV * n
           + 4 * C + 1024)
  return _ring_depth("forward", per_stage, fixed, (4, 3, 2))


def _forward(q, k, v, vec: _Vectors, dtab, h0, cfg: _Cfg):
  """Warp-specialised forward. q, k: (B, Lp, G, N) bf16 (C and B); v: (B, Lp, H, P) bf16;
  vec: the per-token vectors; dtab: (H, C) float32 (D repeated) or None; h0: (B, H, P, N)
  float32 or None. Returns y (B, Lp, H, P) out_dtype and the final state (B, H, P, N)."""
  b, lp, g, n = q.shape
  h, p = v.shape[2:]
  r = h // g
  n_blocks, nvt = lp // C, p // BV
  interpret, has_h0, has_d, has_seg = cfg.interpret, cfg.has_h0, cfg.has_d, cfg.has_seg
  stages = _fwd_stages(n, cfg)
  # Per-token vectors, one SMEM ring per consumer and layout: WG0 reads kd (columns) and
  # the last qd; WG1 reads G (rows and columns), w (columns), qd (rows) and the runs.
  vec_bufs = ["kd_c", "qd_0", "gc_r", "gc_c", "w_c", "qd_r"] + (["run_r", "run_c"] * has_seg)
  vec_srcs = ["kd", "qd", "gc", "gc", "w", "qd"] + (["run", "run"] * has_seg)

  def body(*refs, q_s, k_s, v_s, s_pub, o_out, st_f32, d_s, in_bar, in_free, s_ready, s_free,
           h0_bar, d_bar, done, **vbufs):
    (q_ref, k_ref, v_ref), vrefs, (d_ref, h0_ref), (y_ref, ht_ref) = _unpack(
        refs, 3, ("gc", "w", "qd", "kd"), has_seg, has_d, has_h0)
    bi, hi, vi, gi, cols, wg = _ids(r)

    @pl.when(wg == 2)
    def _memory():
      sources = _sources(q_ref, k_ref, [v_ref], [vrefs[src] for src in vec_srcs], vec_srcs,
                         bi, hi, gi, cols)
      _memory_wg(sources, [q_s, k_s, v_s] + [vbufs[name] for name in vec_bufs], in_bar,
                 in_free, n_blocks, stages, lambda i: i, interpret)

    @pl.when(wg == 0)
    def _state():
      s0 = _state_in(h0_ref, st_f32, h0_bar, bi, hi, cols, n, interpret)
      st = _state_chain(s0, v_s, k_s, vbufs, s_pub, in_bar, in_free, s_ready, s_free,
                        n_blocks, stages, interpret)
      t.send(st_f32, st, ht_ref.at[bi, hi, cols])

    @pl.when(wg == 1)
    def _output():
      d_h = _d_scalar(d_ref, d_s, d_bar, hi)

      def step(nb, slot, half, rows, ld):
        m = _block_m(vbufs, slot, has_seg, interpret)
        scores = t.mm_init(q_s.at[slot], k_s.at[slot], (C, C), tb=True, interpret=interpret)
        pm = (scores * m).astype(MM)
        plgpu.barrier_wait(s_ready.at[half])
        inter = t.mm_init(q_s.at[slot], s_pub.at[half], (C, BV), tb=True, interpret=interpret)
        init = inter * t.rows(ld("qd_r", ROWS), (C, BV))
        if has_d:
          init = init + d_h * _pallas.load(v_s.at[slot], WGMMA, interpret).astype(F32)
        y = t.mm_init(pm, v_s.at[slot], (C, BV), init=init, interpret=interpret)
        plgpu.barrier_arrive(s_free.at[half])
        plgpu.barrier_arrive(in_free.at[slot])
        t.send_async(o_out.at[half], y, y_ref.at[bi, rows, hi, cols])

      _consumer(n_blocks, stages, in_bar, vbufs, step, interpret=interpret)

    t.finish_together(done)

  scratch = _ws_scratch(
      stages, n, vec_bufs, tiles=["v_s"], o_out=t.stage((2, C, BV), cfg.out_dtype),
      st_f32=plgpu.SMEM((BV, n), F32), d_s=plgpu.SMEM((C,), F32), h0_bar=plgpu.Barrier(),
      d_bar=plgpu.Barrier())
  out_type = (jax.ShapeDtypeStruct((b, lp, h, p), cfg.out_dtype),
              jax.ShapeDtypeStruct((b, h, p, n), F32))
  args = (q, k, v, vec.gc, vec.w, vec.qd, vec.kd)
  args += (vec.run,) * has_seg + (dtab,) * has_d + (h0,) * has_h0
  return _kernel(body, cfg, out_type, scratch, (b, h, nvt), num_threads=3,
                 thread_name="wg")(*args)


# ----------------------------------------------------------------------------- backward

def _sources(q_ref, k_ref, head_refs, vec_refs, vec_srcs, bi, hi, gi, cols):
  """Block n's GMEM views for a sweep's input rings: C and B of the head's group, the
  head's value columns of each of head_refs (x; x and dy in the backward), then the
  per-token vectors (run ids are per batch row)."""
  blk = lambda nb: pl.ds(nb * C, C)
  sources = [lambda nb: q_ref.at[bi, blk(nb), gi], lambda nb: k_ref.at[bi, blk(nb), gi]]
  for ref in head_refs:
    sources.append((lambda ref: lambda nb: ref.at[bi, blk(nb), hi, cols])(ref))
  for ref, src in zip(vec_refs, vec_srcs):
    sources.append((lambda ref: lambda nb: ref.at[bi, blk(nb)])(ref) if src == "run"
                   else (lambda ref: lambda nb: ref.at[bi, hi, blk(nb)])(ref))
  return sources


def _memory_wg(sources, rings, in_bar, in_free, n_blocks, stages, order, interpret):
  """The TMA warpgroup of a warp-specialised sweep: the i-th block of the sweep (block
  order(i)) goes into ring slot i % stages once the consumers released it."""
  t.producer_registers(interpret)

  def issue(i, slot):
    for src, ring in zip(sources, rings):
      plgpu.copy_gmem_to_smem(src(order(i)), ring.at[slot], in_bar.at[slot])

  t.feed(issue, n_blocks, stages, in_free)


def _dc_stages(n, cfg: _Cfg, dq_dtype):
  """Input ring depth of the dC sweep (2 or 3 blocks in flight)."""
  per_stage = 2 * (2 * C * n + 2 * C * BV) + (7 + 2 * cfg.has_seg) * C * 4
  fixed = (2 * 2 * BV * n + C * n * jnp.dtype(dq_dtype).itemsize + 4 * C + 1024
           + 4 * BV * n * cfg.has_h0)
  return _ring_depth("dC", per_stage, fixed, (3, 2))


def _backward_dc(q, k, v, do, vec: _Vectors, h0, cfg: _Cfg):
  """dC per head and value tile, (nvt, B, Lp, H, N) (float32 when nvt > 1), the float32
  row sums C_t . dC_t (nvt, B, H, Lp) and the state entering every block, (B, H, NB, P, N)
  bf16 (the reverse sweep pairs it with the state gradient). Warp-specialised forward
  sweep from h0 as the forward kernel: WG0 the state chain (publishing each block's
  entering state to WG1 and to GMEM), WG1 dC, WG2 the loads."""
  b, lp, g, n, h, p, r, n_blocks, nvt, dq_dtype = _dims(q, v, cfg)
  interpret, has_h0, has_seg = cfg.interpret, cfg.has_h0, cfg.has_seg
  stages = _dc_stages(n, cfg, dq_dtype)
  vec_bufs = ["kd_c", "qd_0", "gc_r", "gc_c", "w_c", "qd_r"] + (["run_r", "run_c"] * has_seg)
  vec_srcs = ["kd", "qd", "gc", "gc", "w", "qd"] + (["run", "run"] * has_seg)

  def body(*refs, q_s, k_s, v_s, do_s, s_pub, dq_stage, dg_stage, in_bar, in_free, s_ready,
           s_free, h0_bar, done, st_f32=None, **vbufs):
    (q_ref, k_ref, v_ref, do_ref), vrefs, (h0_ref,), (dq_ref, dg_ref, sb_ref) = _unpack(
        refs, 4, ("gc", "w", "qd", "kd"), has_seg, has_h0)
    bi, hi, vi, gi, cols, wg = _ids(r)

    @pl.when(wg == 2)
    def _memory():
      sources = _sources(q_ref, k_ref, [v_ref, do_ref], [vrefs[src] for src in vec_srcs],
                             vec_srcs, bi, hi, gi, cols)
      _memory_wg(sources, [q_s, k_s, v_s, do_s] + [vbufs[name] for name in vec_bufs],
                 in_bar, in_free, n_blocks, stages, lambda i: i, interpret)

    @pl.when(wg == 0)
    def _state():
      s0 = _state_in(h0_ref, st_f32, h0_bar, bi, hi, cols, n, interpret)
      _state_chain(s0, v_s, k_s, vbufs, s_pub, in_bar, in_free, s_ready, s_free, n_blocks,
                   stages, interpret, sb_dst=lambda nb: sb_ref.at[bi, hi, nb, cols])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _grads():
      def step(nb, slot, half, rows, ld):
        m = _block_m(vbufs, slot, has_seg, interpret)
        dot = do_s.at[slot]
        dp = t.mm(dot, v_s.at[slot], (C, C), tb=True, interpret=interpret)  # dy_i . x_j
        ds = (dp * m).astype(MM)
        qd = ld("qd_r", ROWS)
        plgpu.barrier_wait(s_ready.at[half])
        inter, intra = t.mm_group([([(dot, s_pub.at[half], False)], (C, n)),    # dY S
                                   ([(ds, k_s.at[slot], False)], (C, n))],
                                  interpret=interpret)
        plgpu.barrier_arrive(s_free.at[half])
        qq = _pallas.load(q_s.at[slot], WGMMA, interpret).astype(F32)
        plgpu.barrier_arrive(in_free.at[slot])
        dq = inter * t.rows(qd, (C, n)) + intra
        t.store([(dq_stage, dq, dq_ref.at[vi, bi, rows, hi]),
                 (dg_stage, (dq * qq).sum(axis=1), dg_ref.at[vi, bi, hi, rows])])

      _consumer(n_blocks, stages, in_bar, vbufs, step, interpret=interpret)

    t.finish_together(done)

  scratch = _ws_scratch(
      stages, n, vec_bufs, tiles=["v_s", "do_s"], dq_stage=t.stage((C, n), dq_dtype),
      dg_stage=plgpu.SMEM((C,), F32), h0_bar=plgpu.Barrier())
  if has_h0:
    scratch["st_f32"] = plgpu.SMEM((BV, n), F32)
  out_type = (jax.ShapeDtypeStruct((nvt, b, lp, h, n), dq_dtype),
              jax.ShapeDtypeStruct((nvt, b, h, lp), F32),
              jax.ShapeDtypeStruct((b, h, n_blocks, p, n), MM))
  args = (q, k, v, do, vec.gc, vec.w, vec.qd, vec.kd) + (vec.run,) * has_seg + (h0,) * has_h0
  return _kernel(body, cfg, out_type, scratch, (b, h, nvt), num_threads=3,
                 thread_name="wg")(*args)


def _dbx_stages(n, cfg: _Cfg, dk_dtype, share_e):
  """Input ring depth of the reverse sweep (two blocks in flight)."""
  per_stage = 2 * (2 * C * n + 2 * C * BV) + (5 + 2 * cfg.has_seg) * C * 4
  fixed = (2 * 2 * BV * n + 2 * BV * n + C * n * jnp.dtype(dk_dtype).itemsize
           + C * BV * jnp.dtype(cfg.out_dtype).itemsize + 4 * 5 * C + 1024
           + (0 if share_e else 4 * BV * n))
  return _ring_depth("dB/dX", per_stage, fixed, (2,))


def _backward_dbx(q, k, v, do, sb, vec: _Vectors, dtab, dht, cfg: _Cfg):
  """Warp-specialised reverse sweep; sb: the state entering every block (B, H, NB, P, N)
  bf16. WG0 carries the state gradient E (one wgmma per block) and publishes it, WG1
  computes dB and dX from the published E, WG2 feeds the inputs. Returns dB per head and
  value tile (nvt, B, Lp, H, N), dX (B, Lp, H, P), dh0 (B, H, P, N) float32 and float32
  sums (SUMS, nvt, B, H, Lp): the row sums B_t . dB_t, x_t . dX'_t and B_t . dB^state_t =
  kd_t x_t . (B E^T)_t (the part of dB through the block's end state), sd <E, S_before>
  partial sums over the state's rows (P of them, at the block's first P positions), and
  x_t . dy_t (with D). (<E, S_after> is the sum of the two block-end terms, but with the
  state after the block rounded to bf16 its dA was 4x further from the reference.)"""
  b, lp, g, n, h, p, r, n_blocks, nvt, dk_dtype = _dims(q, v, cfg)
  interpret, has_d, has_seg = cfg.interpret, cfg.has_d, cfg.has_seg
  # A float32 dB staging tile, when there is one, also stages E in and out (same shape:
  # C == BV); WG0 takes it back only once WG1's last stores have read it.
  share_e = jnp.dtype(dk_dtype) == jnp.dtype(F32)
  stages = _dbx_stages(n, cfg, dk_dtype, share_e)
  vec_bufs = ["gc_r", "gc_c", "w_r", "kn_r", "qd_c"] + (["run_r", "run_c"] * has_seg)
  vec_srcs = ["gc", "gc", "w", "kn", "qd"] + (["run", "run"] * has_seg)
  n_sums = 4 + has_d

  def body(*refs, q_s, k_s, v_s, do_s, sb_s, e_pub, dk_stage, dx_stage, sum_stage, es_stage,
           d_s, in_bar, in_free, e_ready, e_free, sb_bar, misc_bar, d_bar, stores_done, done,
           e_f32=None, **vbufs):
    (q_ref, k_ref, v_ref, do_ref, sb_ref), vrefs, (d_ref, dht_ref), outs = _unpack(
        refs, 5, ("gc", "w", "qd", "kn"), has_seg, has_d, True)
    dk_ref, dx_ref, dh0_ref, sums_ref = outs
    e_buf = dk_stage if share_e else e_f32
    bi, hi, vi, gi, cols, wg = _ids(r)
    order = lambda i: n_blocks - 1 - i   # the i-th block of the sweep
    sources = _sources(q_ref, k_ref, [v_ref, do_ref], [vrefs[src] for src in vec_srcs],
                           vec_srcs, bi, hi, gi, cols)
    rings = [q_s, k_s, v_s, do_s] + [vbufs[name] for name in vec_bufs]
    s_before_at = lambda i: sb_ref.at[bi, hi, order(i), cols]

    @pl.when(wg == 2)
    def _memory():
      _memory_wg(sources, rings, in_bar, in_free, n_blocks, stages, order, interpret)

    @pl.when(wg == 0)
    def _state_grad():
      t.consumer_registers(interpret)
      plgpu.copy_gmem_to_smem(dht_ref.at[bi, hi, cols], e_buf, misc_bar)
      # The states entering each block arrive one block ahead into a single buffer.
      plgpu.copy_gmem_to_smem(s_before_at(0), sb_s, sb_bar)
      plgpu.barrier_wait(misc_bar)
      e0 = _pallas.load(e_buf, WGMMA, interpret)

      def step(i, e):
        nb, slot = order(i), lax.rem(i, stages)
        t.publish(e_pub, e, i, slot, in_bar=in_bar, ready=e_ready, free=e_free)
        sd = vbufs["qd_c"][slot, C - 1]
        plgpu.barrier_wait(sb_bar)
        s_before = _pallas.load(sb_s, WGMMA, interpret).astype(F32)

        @pl.when(i + 1 < n_blocks)
        def _next():
          plgpu.commit_smem()
          plgpu.copy_gmem_to_smem(s_before_at(i + 1), sb_s, sb_bar)

        t.store([(es_stage, (e * s_before).sum(axis=1) * sd,
                  sums_ref.at[3, vi, bi, hi, pl.ds(nb * C, BV)])])
        qd = _vec(vbufs["qd_c"], slot, COLS, interpret)
        dod = (t.load_t(do_s.at[slot], WGMMA, interpret).astype(F32)
               * t.cols(qd, (BV, C))).astype(MM)                         # (BV, C)
        e = t.mm_init(dod, q_s.at[slot], (BV, n), init=e * sd, interpret=interpret)
        plgpu.barrier_arrive(in_free.at[slot])
        return e

      e = lax.fori_loop(0, n_blocks, step, e0)
      t.drain(e_free, n_blocks)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      if share_e:
        plgpu.barrier_wait(stores_done)
      t.send(e_buf, e, dh0_ref.at[bi, hi, cols])

    @pl.when(wg == 1)
    def _grads():
      d_h = _d_scalar(d_ref, d_s, d_bar, hi)

      def step(nb, slot, half, rows, ld):
        qt, kt, vt, dot = q_s.at[slot], k_s.at[slot], v_s.at[slot], do_s.at[slot]
        pt, dpt = t.mm_group([([(kt, qt, True)], (C, C)),                 # B_j . C_i
                              ([(vt, dot, True)], (C, C))],               # x_j . dy_i
                             interpret=interpret)
        w_r, kn = ld("w_r", ROWS), ld("kn_r", ROWS)
        runs = (ld("run_r", ROWS), ld("run_c", COLS)) if has_seg else (None, None)
        mt = _decay(ld("gc_r", ROWS), ld("gc_c", COLS), *runs, transposed=True,
                    interpret=interpret)                                  # M'^T[j, i]
        pm = (pt * mt).astype(MM)
        dpm = (dpt * mt * t.rows(w_r, (C, C))).astype(MM)
        xx = _pallas.load(vt, WGMMA, interpret).astype(F32)
        xkd = (xx * t.rows(kn * w_r, (C, BV))).astype(MM)                 # kd o X
        plgpu.barrier_wait(e_ready.at[half])
        e_t = e_pub.at[half]
        dxp_in, dxp_state, dk = t.mm_group(
            [([(pm, dot, False)], (C, BV)), ([(kt, e_t, True)], (C, BV)),
             ([(xkd, e_t, False), (dpm, qt, False)], (C, n))], interpret=interpret)
        plgpu.barrier_arrive(e_free.at[half])
        dxp = dxp_in + t.rows(kn, (C, BV)) * dxp_state
        kk = _pallas.load(kt, WGMMA, interpret).astype(F32)
        dd = _pallas.load(dot, WGMMA, interpret).astype(F32)
        plgpu.barrier_arrive(in_free.at[slot])
        dx = t.rows(w_r, (C, BV)) * dxp
        sums = [(0, (dk * kk).sum(axis=1)), (1, (dxp * xx).sum(axis=1)),
                (2, (dxp_state * xx).sum(axis=1) * kn * w_r)]
        if has_d:
          dx = dx + d_h * dd
          sums.append((4, (dd * xx).sum(axis=1)))
        t.store([(dk_stage, dk, dk_ref.at[vi, bi, rows, hi]),
                 (dx_stage, dx, dx_ref.at[bi, rows, hi, cols])]
                + [(sum_stage.at[j], s_j, sums_ref.at[plane, vi, bi, hi, rows])
                   for j, (plane, s_j) in enumerate(sums)])

      _consumer(n_blocks, stages, in_bar, vbufs, step, order=order, interpret=interpret)
      plgpu.barrier_arrive(stores_done)

    t.finish_together(done)

  scratch = _ws_scratch(
      stages, n, vec_bufs, tiles=["v_s", "do_s"], pub="e", sb_s=t.smem((BV, n)),
      dk_stage=t.stage((C, n), dk_dtype), dx_stage=t.stage((C, BV), cfg.out_dtype),
      sum_stage=plgpu.SMEM((n_sums - 1, C), F32), es_stage=plgpu.SMEM((BV,), F32),
      d_s=plgpu.SMEM((C,), F32), sb_bar=plgpu.Barrier(), misc_bar=plgpu.Barrier(),
      d_bar=plgpu.Barrier(), stores_done=plgpu.Barrier())
  if not share_e:
    scratch["e_f32"] = plgpu.SMEM((BV, n), F32)
  out_type = (jax.ShapeDtypeStruct((nvt, b, lp, h, n), dk_dtype),
              jax.ShapeDtypeStruct((b, lp, h, p), cfg.out_dtype),
              jax.ShapeDtypeStruct((b, h, p, n), F32),
              jax.ShapeDtypeStruct((n_sums, nvt, b, h, lp), F32))
  args = (q, k, v, do, sb, vec.gc, vec.w, vec.qd, vec.kn) + (vec.run,) * has_seg
  args += (dtab,) * has_d + (dht,)
  return _kernel(body, cfg, out_type, scratch, (b, h, nvt), num_threads=3,
                 thread_name="wg")(*args)


# ----------------------------------------------------------------------------- sequence split

def _chain(u, w, coef, qd, cfg: _Cfg, *, reverse):
  """The state chain alone, from zero, over each sequence: S <- sd S + (coef o U)^T W per
  block (in reverse block order with reverse=True), one warpgroup per (batch, head, value
  tile) with the next blocks' TMA loads in flight. u: (B, Lp, H, P) bf16, w: (B, Lp, G, N)
  bf16, coef and qd: (B, H, Lp) float32 (sd = qd at each block's last token). Forward,
  (U, W, coef) = (X, B, kd): the state a sequence ends in; reverse, (dY, C, qd): the
  gradient its outputs send to the state entering it. Returns (B, H, P, N) float32."""
  b, lp, g, n = w.shape
  h, p = u.shape[2:]
  r = h // g
  n_blocks, interpret = lp // C, cfg.interpret
  stages = _chain_stages(n)

  def body(u_ref, w_ref, coef_ref, qd_ref, out_ref, u_s, w_s, c_s, qd_s, out_s, in_bar):
    bi, hi, vi = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
    cols = pl.ds(vi * BV, BV)
    blk = lambda nb: pl.ds(nb * C, C)
    sources = [lambda nb: u_ref.at[bi, blk(nb), hi, cols],
               lambda nb: w_ref.at[bi, blk(nb), hi // r],
               lambda nb: coef_ref.at[bi, hi, blk(nb)], lambda nb: qd_ref.at[bi, hi, blk(nb)]]

    def step(nb, slot, st):
      cf = _vec(c_s, slot, COLS, interpret)
      ut = (t.load_t(u_s.at[slot], WGMMA, interpret).astype(F32)
            * t.cols(cf, (BV, C))).astype(MM)                                 # (BV, C)
      return t.mm_init(ut, w_s.at[slot], (BV, n), init=st * qd_s[slot, C - 1],
                       interpret=interpret)

    s0 = _pallas.cast(jnp.zeros((BV, n), F32), WGMMA, interpret)
    st = t.pipeline(n_blocks, reverse=reverse, sources=sources,
                    buffers=[u_s, w_s, c_s, qd_s], barrier=in_bar, step=step, init=s0)
    t.send(out_s, st, out_ref.at[bi, hi, cols])

  scratch = dict(u_s=t.smem((stages, C, BV)), w_s=t.smem((stages, C, n)),
                 c_s=plgpu.SMEM((stages, C), F32), qd_s=plgpu.SMEM((stages, C), F32),
                 out_s=plgpu.SMEM((BV, n), F32),
                 in_bar=plgpu.Barrier(num_arrivals=4, num_barriers=stages))
  out_type = jax.ShapeDtypeStruct((b, h, p, n), F32)
  return _kernel(body, cfg, out_type, scratch, (b, h, p // BV))(u, w, coef, qd)


# CTAs of the chain kernel that share an SM. Its blocks form one serial chain of wgmmas
# (each waits for the last), so a lone CTA leaves the SM idle between them; the SMEM ring
# is sized to let this many interleave. 1 restores the deepest ring.
CHAIN_CTAS_PER_SM = 2


def _chain_stages(n):
  """Input ring depth of the chain kernel (2 to 4 blocks in flight) within its share of SMEM."""
  per_stage = 2 * C * (BV + n) + 2 * C * 4
  fixed = 4 * BV * n + 1024
  return _ring_depth("chain", per_stage, fixed, (4, 3, 2),
                     budget=SMEM_BUDGET // CHAIN_CTAS_PER_SM)


def auto_segments(b, h, p, lp, sms):
  """Segments per sequence: doubled while the grid (b, h, p / 64) times the segments is
  short of one wave of `sms` CTAs and each segment keeps at least 16 blocks of 64 tokens."""
  s, ctas = 1, b * h * (p // BV)
  while ctas * s < sms and (lp // C) % (2 * s) == 0 and lp // (2 * s) >= 16 * C:
    s *= 2
  return s


def _seg_rows(a, s):
  """(B, Lp, ...) -> (B S, Lp / S, ...): each segment a sequence of its own."""
  return a.reshape(a.shape[0] * s, a.shape[1] // s, *a.shape[2:])


def _seg_vec(v, s):
  """(B, H, Lp) -> (B S, H, Lp / S)."""
  b, h, lp = v.shape
  return v.reshape(b, h, s, lp // s).swapaxes(1, 2).reshape(b * s, h, lp // s)


def _unseg_vec(v, s):
  """(..., B S, H, Ls) -> (..., B, H, S Ls): the inverse of _seg_vec."""
  *lead, bs, h, ls = v.shape
  v = v.reshape(*lead, bs // s, s, h, ls)
  return jnp.swapaxes(v, -3, -2).reshape(*lead, bs // s, h, s * ls)


def _seg_vectors(vec: _Vectors, s) -> _Vectors:
  run = None if vec.run is None else _seg_rows(vec.run, s)
  return _Vectors(*(_seg_vec(v, s) for v in vec[:5]), run)


def _seg_decays(vec: _Vectors, s):
  """Each segment's total decay (B, S, H): the product of its blocks' sd (0 across a reset)."""
  b, h, lp = vec.qd.shape
  sd = vec.qd.reshape(b, h, s, lp // (s * C), C)[..., -1]
  return sd.prod(-1).swapaxes(1, 2)


def _pass(local, decay, first, *, reverse):
  """Carry a state across the segments. Forward: out[0] = first, out[k + 1] = decay[k]
  out[k] + local[k] (the state entering each segment); reverse: out[S - 1] = first,
  out[k - 1] = decay[k] out[k] + local[k] (the gradient of the state leaving each).
  local: (B, S, H, P, N), decay (B, S, H), first (B, H, P, N); returns (B S, H, P, N)."""
  b, s = decay.shape[:2]
  out = [None] * s
  out[s - 1 if reverse else 0] = first
  for k in (range(s - 1, 0, -1) if reverse else range(s - 1)):
    nxt = k - 1 if reverse else k + 1
    out[nxt] = decay[:, k, :, None, None] * out[k] + local[:, k]
  return jnp.stack(out, axis=1).reshape(b * s, *first.shape[1:])


# ----------------------------------------------------------------------------- custom_vjp

def _pad_time(v, lp):
  return jnp.pad(v, [(0, 0), (0, lp - v.shape[1])] + [(0, 0)] * (v.ndim - 2))


def _group_sum(d, l, g, dtype):
  """Per-head (nvt, B, Lp, H, N) partials -> (B, L, G, N): sum the value tiles and a
  group's heads in float32."""
  nvt, b, _, h, n = d.shape
  d = d[:, :, :l].astype(F32).sum(0) if nvt > 1 else d[0, :, :l]
  if h != g:
    d = d.astype(F32).reshape(b, l, g, h // g, n).sum(3)
  return d.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _core(x, dt, A, B, Cm, D, h0, segment_ids, cfg: _Cfg):
  return _core_fwd(x, dt, A, B, Cm, D, h0, segment_ids, cfg)[0]


def _core_fwd(x, dt, A, B, Cm, D, h0, segment_ids, cfg: _Cfg):
  l = cfg.seq_len
  lp = -(-l // C) * C
  q, k, v = (_pad_time(a.astype(MM), lp) for a in (Cm, B, x))
  vec = _vectors(dt, A, segment_ids, lp)
  h = x.shape[2]
  dtab = None if D is None else jnp.broadcast_to(D.astype(F32)[:, None], (h, C))
  h0f = None if h0 is None else h0.astype(F32)
  sg = cfg.segments
  if sg > 1:  # each segment a sequence of its own, entered with the state it really gets
    kcfg = dataclasses.replace(cfg, has_h0=True)
    q, k, v = (_seg_rows(a, sg) for a in (q, k, v))
    vec_s = _seg_vectors(vec, sg)
    b, _, h, p = x.shape
    ends = _chain(v, k, vec_s.kd, vec_s.qd, kcfg, reverse=False)
    first = jnp.zeros((b, *ends.shape[1:]), F32) if h0f is None else h0f
    h0f = _pass(ends.reshape(b, sg, *ends.shape[1:]), _seg_decays(vec, sg), first,
                reverse=False)
    y, states = _forward(q, k, v, vec_s, dtab, h0f, kcfg)
    y, state = y.reshape(b, lp, h, p), states.reshape(b, sg, *states.shape[1:])[:, -1]
  else:
    y, state = _forward(q, k, v, vec, dtab, h0f, cfg)
  res = (q, k, v, vec, dtab, h0f, state, dt, A, D, h0, segment_ids)
  return (y[:, :l], state), res


def _core_bwd(cfg: _Cfg, res, cts):
  q, k, v, vec, dtab, h0f, state, dt, A, D, h0, segment_ids = res
  dy, dht = cts
  l, sg = cfg.seq_len, cfg.segments
  b, lp = dy.shape[0], -(-cfg.seq_len // C) * C
  g = q.shape[2]
  do = _pad_time(dy.astype(MM), lp)
  dht = jnp.zeros_like(state) if dht is None else dht.astype(F32)
  if sg > 1:  # q, k, v, h0f are per segment already
    kcfg = dataclasses.replace(cfg, has_h0=True)
    do, vec_s = _seg_rows(do, sg), _seg_vectors(vec, sg)
    local = _chain(do, q, vec_s.qd, vec_s.qd, kcfg, reverse=True)
    dhts = _pass(local.reshape(b, sg, *local.shape[1:]), _seg_decays(vec, sg), dht,
                 reverse=True)
    dq, dgq, sb = _backward_dc(q, k, v, do, vec_s, h0f, kcfg)
    dk, dx, dh0, sums = _backward_dbx(q, k, v, do, sb, vec_s, dtab, dhts, kcfg)
    whole = lambda a: a.reshape(*a.shape[:-4], b, lp, *a.shape[-2:])
    dq, dk, dx = whole(dq), whole(dk), whole(dx)
    dgq, sums = _unseg_vec(dgq, sg), _unseg_vec(sums, sg)
    dh0 = dh0.reshape(b, sg, *dh0.shape[1:])[:, 0]
  else:
    dq, dgq, sb = _backward_dc(q, k, v, do, vec, h0f, cfg)
    dk, dx, dh0, sums = _backward_dbx(q, k, v, do, sb, vec, dtab, dht, cfg)
  sums = sums.sum(1)                                             # (SUMS, B, H, Lp)
  # Gradient of the block-local cumsum G (module docstring): C.dC - B.dB at every token,
  # plus at each block's last token the terms of its end state; then a reverse cumsum
  # inside each block. (A global reverse cumsum of C.dC - B.dB is the same function,
  # but its error grows with the length: those terms cancel over whole runs.)
  nb = lp // C
  dg = (dgq.sum(0) - sums[0]).reshape(*sums.shape[1:3], nb, C)
  ends = (sums[2] + sums[3]).reshape(dg.shape).sum(-1)          # (B, H, NB)
  dg = dg.at[..., C - 1].add(ends)
  da = lax.cumsum(dg, axis=3, reverse=True).reshape(sums.shape[1:])[..., :l]   # (B, H, L)
  sums = sums[..., :l]
  if segment_ids is not None:  # a reset token's decay multiplies a zeroed state
    da = jnp.where(resets(segment_ids)[:, None, :], 0.0, da)
  d_dt = (A.astype(F32)[None, :, None] * da + sums[1]).swapaxes(1, 2)
  dA = jnp.einsum("blh,bhl->h", dt.astype(F32), da)
  dD = None if D is None else sums[4].sum((0, 2)).astype(D.dtype)
  dh0 = None if h0 is None else dh0.astype(h0.dtype)
  return (dx[:, :l], d_dt.astype(dt.dtype), dA.astype(A.dtype),
          _group_sum(dk, l, g, cfg.b_dtype), _group_sum(dq, l, g, cfg.c_dtype), dD, dh0, None)


_core.defvjp(_core_fwd, _core_bwd)


def ssd_pallas(x, dt, A, B, Cm, *, D=None, h0=None, segment_ids=None, segments=None,
               interpret=None):
  """The Pallas kernel path (arguments checked by `ssm.ops.ssd`; dt already positive).

  Args:
    x: (B, L, H, P); dt: (B, L, H); A: (H,); B, Cm: (B, L, G, N); D: (H,) or None;
    h0: (B, H, P, N) or None; segment_ids: (B, L) int or None. P, N in {64, 128};
    float32 or bf16.
    segments: split each sequence into this many segments, a power of two dividing its
      64-token blocks (None: `auto_segments` for the GPU's SMs; 1 on the interpreter).
    interpret: run the Mosaic GPU interpreter (default: off the GPU).

  Returns:
    y (B, L, H, P) in x's dtype and the final state (B, H, P, N) float32.
  """
  check_supported(x, B, Cm)
  interpret = interpret_mode(interpret)
  b, l, h, p = x.shape
  n_blocks = -(-l // C)
  if segments is None:
    sms = 0 if interpret else num_sms()
    segments = auto_segments(b, h, p, n_blocks * C, sms) if sms else 1
  if (isinstance(segments, bool) or not isinstance(segments, int) or segments < 1
      or n_blocks % segments):
    raise ValueError(f"ssd_pallas: segments={segments!r} must be a positive int dividing "
                     f"the {n_blocks} blocks of {C} tokens")
  cfg = _Cfg(seq_len=l, out_dtype=jnp.dtype(x.dtype), b_dtype=jnp.dtype(B.dtype),
             c_dtype=jnp.dtype(Cm.dtype), has_h0=h0 is not None,
             has_d=D is not None, has_seg=segment_ids is not None, interpret=bool(interpret),
             segments=segments)
  return _core(x, dt, A, B, Cm, D, h0, segment_ids, cfg)
