"""Lightning attention as Pallas Mosaic GPU kernels (Hopper): forward and backward.

Same math as `ssm/ops/lightning_attention.py` (per-head decay lambda = exp(log_decay)):

    S_t = lambda S_{t-1} + k_t v_t^T,  o_t = q_t^T S_t,  S_{-1} = h0.

One CTA (one warpgroup) per (batch, head, 64 value columns) walks the sequence in
blocks of C = 64 tokens; the (Dk, 64) float32 state stays in registers across
blocks; block n + 1's tiles arrive by TMA (double-buffered) while block n
computes. With i, j positions in a block of nv valid tokens,
M[i, j] = lambda^(i-j) (i >= j, else 0), qdec_i = lambda^(i+1),
kdec_j = lambda^(nv-1-j) (0 past nv) and sdec = lambda^nv:

  forward (per block, four wgmma):
    P = (Q K^T) o M                                 (C, C)   K = Dk
    O = qdec o (Q S) + P V                          (C, 64)  K = Dk, K = C
    S <- sdec S + K^T (kdec o V)                    (Dk, 64) K = C
  backward, dq (forward sweep, the state recomputed as above):
    dQ = qdec o (dO S^T) + ((dO V^T) o M) K
  backward, dk and dv (reverse sweep over the state gradient E, from E = dht):
    dV = ((K Q^T) o M^T) dO + kdec o (K E)
    dK = ((V dO^T) o M^T) Q + kdec o (V E^T)
    E <- sdec E + (qdec o Q)^T dO;   dh0 = E after block 0.
  d log_decay (XLA, from the kernels' gradients): with per-token log gates the
  gradient of the cumulative gate at t is q_t.dq_t - k_t.dk_t (+ <dht, S_final> at
  the last token); a constant per-head gate sums these with weight t + 1.

Nothing per block is stored between the passes: the backward recomputes the
states (one extra forward-sized sweep) instead of writing B H (L/64) Dk Dv floats.

Numerics: matmul operands are bf16 with float32 accumulation; float32 inputs are
rounded to bf16 first (wgmma's tf32 mode takes no transposed operands, which
three of the products need), so float32 calls carry bf16 rounding (about 3e-3
relative). Masks, decays and the carried states are float32; the state is rounded
to bf16 only as an operand of Q S / dO S^T / K E / V E^T.

Lengths that are not a multiple of 64 are zero-padded at the end; the last block
uses its true length nv in kdec and sdec, so padding never reaches the state.
With Dv = 128 two CTAs share a (batch, head): dq and dk are partial sums over the
value tiles (float32, summed in XLA); dv, dh0 and the state are exact per tile.

Cost per CTA and block (Dk = Dv = 64): 5 products of 64x64x64 forward, 5 (dq) + 7
(dk, dv) backward; HBM traffic = reading q, k, v (+ do) once per pass plus writing
the outputs, no intermediates. SMEM (bf16, Dk = 64): 2 x (q, k, v) 48 KiB + 4
scratch tiles 32 KiB + output staging 8-16 KiB.

In interpret mode (CPU tests) products with a transposed operand run as jnp.dot on
the SMEM contents (the interpreter's wgmma has no transposes); the rest (TMA,
barriers, plain wgmma) is simulated as written.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ssm.ops import _impl, _pallas
from ssm.ops._impl import interpret_mode
from ssm.ops._tiles import (BV, C, F32, MM, ROWS, SMEM_BUDGET, WGMMA, drain as _drain,
                            feed as _feed,
                            finish_together as _finish_together, load_t as _load_t,
                            mm as _mm, mm_init as _mm_init, pipeline as _pipeline,
                            publish as _publish, rows as _rows, send as _send,
                            send_async as _send_async, smem as _smem, stage as _stage,
                            store as _store)

HEAD_DIMS = (64, 128)
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def check_supported(q, k, v) -> None:
  """ValueError naming why the kernel cannot take this call; shapes already checked."""
  dk, dv = q.shape[3], v.shape[3]
  if dk not in HEAD_DIMS or dv not in HEAD_DIMS:
    raise ValueError(f"lightning_attention(impl='pallas'): head dims dk={dk}, dv={dv} must be "
                     f"in {HEAD_DIMS}")
  dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
  if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPES:
    raise ValueError(f"lightning_attention(impl='pallas'): q, k, v must share a dtype in "
                     f"(float32, bfloat16), got {q.dtype}, {k.dtype}, {v.dtype}")


# ----------------------------------------------------------------------------- helpers

class _Decays:
  """Per-block decays from the head's log decay `ld` and the block's valid length `nv`."""

  def __init__(self, ld, nv, interpret):
    pos = _pallas.cast(lax.broadcasted_iota(jnp.int32, (C,), 0), ROWS, interpret)
    self.valid = pos < nv
    posf = pos.astype(F32)
    nvf = nv.astype(F32)
    self.q = jnp.exp(ld * (posf + 1.0))                                   # lambda^(i+1)
    self.k = jnp.where(self.valid, jnp.exp(ld * jnp.maximum(nvf - 1.0 - posf, 0.0)), 0.0)
    self.s = jnp.exp(ld * nvf)                                            # lambda^nv
    r = _pallas.cast(lax.broadcasted_iota(jnp.int32, (C, C), 0), WGMMA, interpret)
    c = _pallas.cast(lax.broadcasted_iota(jnp.int32, (C, C), 1), WGMMA, interpret)
    self._rc = (r, c)
    self._ld = ld

  def mask(self, transposed=False):
    """M[i, j] = lambda^(i-j) on i >= j (transposed: M^T[j, i]), zero elsewhere."""
    r, c = self._rc
    diff = (c - r) if transposed else (r - c)
    keep = diff >= 0
    return jnp.where(keep, jnp.exp(self._ld * jnp.where(keep, diff, 0).astype(F32)), 0.0)


@dataclasses.dataclass(frozen=True)
class _Cfg:
  seq_len: int        # true length L
  out_dtype: jnp.dtype
  has_h0: bool
  interpret: bool


def _kernel(body, cfg, out_type, scratch, grid, name):
  return _pallas.kernel(
      body, interpret=cfg.interpret, out_type=out_type, scratch_types=scratch, grid=grid,
      grid_names=("b", "h", "v"), compiler_params=plgpu.CompilerParams(approx_math=True))


# ----------------------------------------------------------------------------- forward

def _head_start(ld_ref, h0_ref, ld_s, st_f32, bar, bi, hi, cols, dk, interpret):
  """The head's log-decay (a scalar) and the state entering the sweep, (dk, BV) float32 in
  the WGMMA layout: h0's value columns when h0_ref is given, else zeros. Shared by the
  forward and the dq kernel, which both sweep forward from h0."""
  plgpu.copy_gmem_to_smem(ld_ref.at[hi], ld_s, bar)
  if h0_ref is not None:
    plgpu.copy_gmem_to_smem(h0_ref.at[bi, hi, :, cols], st_f32, bar)
  plgpu.barrier_wait(bar)
  if h0_ref is not None:
    s0 = _pallas.load(st_f32, WGMMA, interpret)
  else:
    s0 = _pallas.cast(jnp.zeros((dk, BV), F32), WGMMA, interpret)
  return ld_s[0], s0


def _fwd_stages(dk, out_dtype):
  """Input pipeline depth (2 to 4 blocks in flight) that fits SMEM_BUDGET."""
  per_stage = 2 * (2 * C * dk + C * BV)                       # q, k, v tiles, bf16
  fixed = 2 * 2 * BV * dk + 2 * C * BV * jnp.dtype(out_dtype).itemsize + 4 * BV * dk + 1024
  for stages in (4, 3, 2):
    if stages * per_stage + fixed <= SMEM_BUDGET:
      return stages
  raise ValueError(f"lightning forward: {2 * per_stage + fixed} bytes of SMEM do not fit")


def _forward(q, k, v, ld, h0t, cfg: _Cfg):
  """Warp-specialised forward. q, k: (B, Lp, H, Dk) bf16; v: (B, Lp, H, Dv) bf16; ld: (H, C)
  float32 (log decay repeated); h0t: the initial state transposed, (B, H, Dv, Dk) float32,
  or None. Returns o (B, Lp, H, Dv) out_dtype and the final state transposed,
  (B, H, Dv, Dk) float32.

  Three warpgroups per CTA, so that the serial state chain never waits on the output:
    WG0 (state)  keeps S^T (64 value columns x Dk, float32) in registers; per block it
                 publishes S^T in bf16 to a double-buffered SMEM tile, then runs
                 S^T <- sdec S^T + (kdec o V)^T K as one wgmma with the A operand in
                 registers and the accumulator seeded with sdec S^T;
    WG1 (output) P = (Q K^T) o M while WG0 works, then O = qdec o (Q S) + P V from the
                 published tile (again one seeded wgmma for the sum) and its TMA store;
    WG2 (memory) streams the q, k, v tiles into `stages` SMEM slots by TMA.
  Barriers: in_bar[slot] (tiles landed), in_free[slot] (WG0 and WG1 done with them),
  s_ready[half] / s_free[half] (the published state tile of block n, n mod 2).
  """
  b, lp, h, dk = q.shape
  dv = v.shape[3]
  n_blocks, nvt = lp // C, dv // BV
  seq_len, interpret, has_h0 = cfg.seq_len, cfg.interpret, cfg.has_h0
  stages = _fwd_stages(dk, cfg.out_dtype)
  cols_l = plgpu.Layout.WGMMA.reduce(0)  # one value per column of a WGMMA tile

  def body(*refs, q_s, k_s, v_s, s_pub, o_out, st_f32, ld_s, in_bar, in_free, s_ready, s_free,
           misc_bar, done):
    q_ref, k_ref, v_ref, ld_ref = refs[:4]
    h0_ref = refs[4] if has_h0 else None
    o_ref, ht_ref = refs[-2:]
    bi, hi, vi = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
    cols = pl.ds(vi * BV, BV)
    wg = lax.axis_index("wg")

    @pl.when(wg == 2)
    def _memory():
      if not interpret:
        plgpu.set_max_registers(40, action="decrease")

      def issue(n, slot):
        rows = pl.ds(n * C, C)
        plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi], q_s.at[slot], in_bar.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, hi], k_s.at[slot], in_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, hi, cols], v_s.at[slot], in_bar.at[slot])

      _feed(issue, n_blocks, stages, in_free)

    @pl.when(wg == 0)
    def _state():
      if not interpret:
        plgpu.set_max_registers(232, action="increase")
      plgpu.copy_gmem_to_smem(ld_ref.at[hi], ld_s, misc_bar)
      if has_h0:
        plgpu.copy_gmem_to_smem(h0_ref.at[bi, hi, cols], st_f32, misc_bar)
      plgpu.barrier_wait(misc_bar)
      ld = ld_s[0]
      if has_h0:
        s0 = _pallas.load(st_f32, WGMMA, interpret)
      else:
        s0 = _pallas.cast(jnp.zeros((BV, dk), F32), WGMMA, interpret)
      pos = _pallas.cast(lax.broadcasted_iota(jnp.int32, (C,), 0), cols_l, interpret)

      def step(n, st):
        slot = lax.rem(n, stages)
        nv = jnp.minimum(C, seq_len - n * C)
        _publish(s_pub, st, n, slot, in_bar=in_bar, ready=s_ready, free=s_free)
        kdec = jnp.where(pos < nv, jnp.exp(ld * jnp.maximum(nv - 1 - pos, 0).astype(F32)), 0.0)
        vt = _load_t(v_s.at[slot], WGMMA, interpret).astype(F32)               # (BV, C)
        vd = (vt * lax.broadcast_in_dim(kdec, (BV, C), [1])).astype(MM)
        st = _mm_init(vd, k_s.at[slot], (BV, dk), init=st * jnp.exp(ld * nv.astype(F32)),
                      interpret=interpret)
        plgpu.barrier_arrive(in_free.at[slot])
        return st

      st = lax.fori_loop(0, n_blocks, step, s0)
      _drain(s_free, n_blocks)
      _send(st_f32, st, ht_ref.at[bi, hi, cols])

    @pl.when(wg == 1)
    def _output():
      if not interpret:
        plgpu.set_max_registers(232, action="increase")
      plgpu.barrier_wait(misc_bar)  # ld_s, loaded by WG0
      ld = ld_s[0]

      def step(n, carry):
        slot, half = lax.rem(n, stages), lax.rem(n, 2)
        rows = pl.ds(n * C, C)
        plgpu.barrier_wait(in_bar.at[slot])
        dec = _Decays(ld, jnp.minimum(C, seq_len - n * C), interpret)
        scores = _mm_init(q_s.at[slot], k_s.at[slot], (C, C), tb=True, interpret=interpret)
        p = (scores * dec.mask()).astype(MM)
        plgpu.barrier_wait(s_ready.at[half])
        inter = _mm_init(q_s.at[slot], s_pub.at[half], (C, BV), tb=True, interpret=interpret)
        o = _mm_init(p, v_s.at[slot], (C, BV), init=inter * _rows(dec.q, (C, BV)),
                     interpret=interpret)
        plgpu.barrier_arrive(s_free.at[half])
        plgpu.barrier_arrive(in_free.at[slot])
        _send_async(o_out.at[half], o, o_ref.at[bi, rows, hi, cols])
        return carry

      lax.fori_loop(0, n_blocks, step, None)
      plgpu.wait_smem_to_gmem(0)

    _finish_together(done)

  scratch = dict(
      q_s=_smem((stages, C, dk)), k_s=_smem((stages, C, dk)), v_s=_smem((stages, C, BV)),
      s_pub=_smem((2, BV, dk)), o_out=_stage((2, C, BV), cfg.out_dtype),
      st_f32=plgpu.SMEM((BV, dk), F32), ld_s=plgpu.SMEM((C,), F32),
      in_bar=plgpu.Barrier(num_arrivals=3, num_barriers=stages),
      in_free=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      s_ready=plgpu.Barrier(num_barriers=2), s_free=plgpu.Barrier(num_barriers=2),
      misc_bar=plgpu.Barrier(num_arrivals=1 + has_h0), done=plgpu.Barrier(num_arrivals=3))
  out_type = (jax.ShapeDtypeStruct((b, lp, h, dv), cfg.out_dtype),
              jax.ShapeDtypeStruct((b, h, dv, dk), F32))
  args = (q, k, v, ld) + ((h0t,) if has_h0 else ())
  return _pallas.kernel(
      body, interpret=interpret, out_type=out_type, scratch_types=scratch, grid=(b, h, nvt),
      grid_names=("b", "h", "v"), num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True))(*args)


# ----------------------------------------------------------------------------- backward

def _bwd_sources(q_ref, k_ref, v_ref, do_ref, bi, hi, cols):
  """What both backward pipelines read per 64-token block n: q and k of the head (all of
  dk), v and do of this CTA's value columns."""
  rows = lambda n: pl.ds(n * C, C)
  return [lambda n: q_ref.at[bi, rows(n), hi], lambda n: k_ref.at[bi, rows(n), hi],
          lambda n: v_ref.at[bi, rows(n), hi, cols], lambda n: do_ref.at[bi, rows(n), hi, cols]]


def _backward_dq(q, k, v, do, ld, h0, cfg: _Cfg):
  """dq (nvt, B, Lp, H, Dk): one partial per value tile (float32 when nvt > 1), and the
  float32 row sums q_t . dq_t (nvt, B, H, Lp) for d log_decay."""
  b, lp, h, dk = k.shape
  dv = v.shape[3]
  n_blocks, nvt = lp // C, dv // BV
  dq_dtype = F32 if nvt > 1 else cfg.out_dtype
  seq_len, interpret, has_h0 = cfg.seq_len, cfg.interpret, cfg.has_h0

  def body(*refs, q_s, k_s, v_s, do_s, vd_s, ds_s, st_lo, st_f32, dq_stage, dg_stage, ld_s,
           in_bar, misc_bar):
    q_ref, k_ref, v_ref, do_ref, ld_ref = refs[:5]
    h0_ref = refs[5] if has_h0 else None
    dq_ref, dg_ref = refs[-2:]
    bi, hi, vi = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
    cols = pl.ds(vi * BV, BV)
    ld, s0 = _head_start(ld_ref, h0_ref, ld_s, st_f32, misc_bar, bi, hi, cols, dk, interpret)

    def step(n, slot, s):
      rows = pl.ds(n * C, C)
      dec = _Decays(ld, jnp.minimum(C, seq_len - n * C), interpret)
      kt, vt, dot = k_s.at[slot], v_s.at[slot], do_s.at[slot]
      vv = _pallas.load(vt, WGMMA, interpret).astype(F32)
      vd_s[...] = (vv * _rows(dec.k, (C, BV))).astype(MM)
      st_lo[...] = s.astype(MM)
      plgpu.commit_smem()
      dp = _mm(dot, vt, (C, C), tb=True, interpret=interpret)          # do_i . v_j
      ds_s[...] = (dp * dec.mask()).astype(MM)
      plgpu.commit_smem()
      inter = _mm(dot, st_lo, (C, dk), tb=True, interpret=interpret)   # do S^T
      intra = _mm(ds_s, kt, (C, dk), interpret=interpret)
      dq = inter * _rows(dec.q, (C, dk)) + intra
      qq = _pallas.load(q_s.at[slot], WGMMA, interpret).astype(F32)
      _store([(dq_stage, dq, dq_ref.at[vi, bi, rows, hi]),
              (dg_stage, (dq * qq).sum(axis=1), dg_ref.at[vi, bi, hi, rows])])
      return s * dec.s + _mm(kt, vd_s, (dk, BV), ta=True, interpret=interpret)

    _pipeline(
        n_blocks, reverse=False,
        sources=_bwd_sources(q_ref, k_ref, v_ref, do_ref, bi, hi, cols),
        buffers=[q_s, k_s, v_s, do_s], barrier=in_bar, step=step, init=s0)
    plgpu.wait_smem_to_gmem(0)

  scratch = dict(
      q_s=_smem((2, C, dk)), k_s=_smem((2, C, dk)), v_s=_smem((2, C, BV)),
      do_s=_smem((2, C, BV)), vd_s=_smem((C, BV)), ds_s=_smem((C, C)), st_lo=_smem((dk, BV)),
      st_f32=plgpu.SMEM((dk, BV), F32), dq_stage=_stage((C, dk), dq_dtype),
      dg_stage=plgpu.SMEM((C,), F32), ld_s=plgpu.SMEM((C,), F32),
      in_bar=plgpu.Barrier(num_arrivals=4, num_barriers=2),
      misc_bar=plgpu.Barrier(num_arrivals=1 + has_h0))
  out_type = (jax.ShapeDtypeStruct((nvt, b, lp, h, dk), dq_dtype),
              jax.ShapeDtypeStruct((nvt, b, h, lp), F32))
  args = (q, k, v, do, ld) + ((h0,) if has_h0 else ())
  return _kernel(body, cfg, out_type, scratch, (b, h, nvt), "lightning_bwd_dq")(*args)


def _backward_dkv(q, k, v, do, ld, dht, cfg: _Cfg):
  """Reverse sweep: dk (nvt, B, Lp, H, Dk) partials, dv (B, Lp, H, Dv), dh0 (B, H, Dk, Dv)
  and the float32 row sums k_t . dk_t (nvt, B, H, Lp) for d log_decay."""
  b, lp, h, dk = q.shape
  dv = v.shape[3]
  n_blocks, nvt = lp // C, dv // BV
  dk_dtype = F32 if nvt > 1 else cfg.out_dtype
  seq_len, interpret = cfg.seq_len, cfg.interpret

  def body(q_ref, k_ref, v_ref, do_ref, ld_ref, dht_ref, dk_ref, dv_ref, dh0_ref, dg_ref, *,
           q_s, k_s, v_s, do_s, qd_s, pm_s, dpm_s, e_lo, e_f32, dk_stage, dv_stage, dg_stage,
           ld_s, in_bar, misc_bar):
    bi, hi, vi = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
    cols = pl.ds(vi * BV, BV)
    plgpu.copy_gmem_to_smem(ld_ref.at[hi], ld_s, misc_bar)
    plgpu.copy_gmem_to_smem(dht_ref.at[bi, hi, :, cols], e_f32, misc_bar)
    plgpu.barrier_wait(misc_bar)
    ld = ld_s[0]
    e0 = _pallas.load(e_f32, WGMMA, interpret)

    def step(n, slot, e):
      rows = pl.ds(n * C, C)
      dec = _Decays(ld, jnp.minimum(C, seq_len - n * C), interpret)
      qt, kt, vt, dot = q_s.at[slot], k_s.at[slot], v_s.at[slot], do_s.at[slot]
      qq = _pallas.load(qt, WGMMA, interpret).astype(F32)
      qd_s[...] = (qq * _rows(dec.q, (C, dk))).astype(MM)
      e_lo[...] = e.astype(MM)
      plgpu.commit_smem()
      mt = dec.mask(transposed=True)
      pt = _mm(kt, qt, (C, C), tb=True, interpret=interpret)          # k_j . q_i
      pm_s[...] = (pt * mt).astype(MM)
      dpt = _mm(vt, dot, (C, C), tb=True, interpret=interpret)        # v_j . do_i
      dpm_s[...] = (dpt * mt).astype(MM)
      plgpu.commit_smem()
      dv_t = (_mm(pm_s, dot, (C, BV), interpret=interpret)
              + _rows(dec.k, (C, BV)) * _mm(kt, e_lo, (C, BV), interpret=interpret))
      dk_t = (_mm(dpm_s, qt, (C, dk), interpret=interpret)
              + _rows(dec.k, (C, dk)) * _mm(vt, e_lo, (C, dk), tb=True, interpret=interpret))
      kk = _pallas.load(kt, WGMMA, interpret).astype(F32)
      _store([(dk_stage, dk_t, dk_ref.at[vi, bi, rows, hi]),
              (dv_stage, dv_t, dv_ref.at[bi, rows, hi, cols]),
              (dg_stage, (dk_t * kk).sum(axis=1), dg_ref.at[vi, bi, hi, rows])])
      return e * dec.s + _mm(qd_s, dot, (dk, BV), ta=True, interpret=interpret)

    e = _pipeline(
        n_blocks, reverse=True,
        sources=_bwd_sources(q_ref, k_ref, v_ref, do_ref, bi, hi, cols),
        buffers=[q_s, k_s, v_s, do_s], barrier=in_bar, step=step, init=e0)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    e_f32[...] = e
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(e_f32, dh0_ref.at[bi, hi, :, cols])
    plgpu.wait_smem_to_gmem(0)

  scratch = dict(
      q_s=_smem((2, C, dk)), k_s=_smem((2, C, dk)), v_s=_smem((2, C, BV)), do_s=_smem((2, C, BV)),
      qd_s=_smem((C, dk)), pm_s=_smem((C, C)), dpm_s=_smem((C, C)), e_lo=_smem((dk, BV)),
      e_f32=plgpu.SMEM((dk, BV), F32), dk_stage=_stage((C, dk), dk_dtype),
      dv_stage=_stage((C, BV), cfg.out_dtype), dg_stage=plgpu.SMEM((C,), F32),
      ld_s=plgpu.SMEM((C,), F32),
      in_bar=plgpu.Barrier(num_arrivals=4, num_barriers=2),
      misc_bar=plgpu.Barrier(num_arrivals=2))
  out_type = (jax.ShapeDtypeStruct((nvt, b, lp, h, dk), dk_dtype),
              jax.ShapeDtypeStruct((b, lp, h, dv), cfg.out_dtype),
              jax.ShapeDtypeStruct((b, h, dk, dv), F32),
              jax.ShapeDtypeStruct((nvt, b, h, lp), F32))
  return _kernel(body, cfg, out_type, scratch, (b, h, nvt), "lightning_bwd_dkv")(
      q, k, v, do, ld, dht)


# ----------------------------------------------------------------------------- custom_vjp

def _prep(q, k, v, log_decay):
  """bf16 operands padded to a multiple of C, and the (H, C) log-decay table."""
  l = q.shape[1]
  pad = (-l) % C
  padt = lambda x: jnp.pad(x.astype(MM), [(0, 0), (0, pad), (0, 0), (0, 0)])
  ld = jnp.broadcast_to(log_decay.astype(F32)[:, None], (q.shape[2], C))
  return padt(q), padt(k), padt(v), ld


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _core(q, k, v, log_decay, h0, cfg: _Cfg):
  (o, state), _ = _core_fwd(q, k, v, log_decay, h0, cfg)
  return o, state


def _core_fwd(q, k, v, log_decay, h0, cfg: _Cfg):
  qp, kp, vp, ld = _prep(q, k, v, log_decay)
  h0t = None if h0 is None else jnp.swapaxes(h0, 2, 3)
  o, state_t = _forward(qp, kp, vp, ld, h0t, cfg)
  state = jnp.swapaxes(state_t, 2, 3)
  o = o[:, :cfg.seq_len]
  res = (qp, kp, vp, ld, log_decay, h0, state)
  return (o, state), res


def _core_bwd(cfg: _Cfg, res, cts):
  qp, kp, vp, ld, log_decay, h0, state = res
  q_dtype = v_dtype = cfg.out_dtype  # q, k, v share a dtype (check_supported)
  do, dht = cts
  l = cfg.seq_len
  do = jnp.pad(do.astype(MM), [(0, 0), (0, qp.shape[1] - l), (0, 0), (0, 0)])
  dht = jnp.zeros_like(state) if dht is None else dht.astype(F32)
  dq, dgq = _backward_dq(qp, kp, vp, do, ld, h0, cfg)
  dk, dv, dh0, dgk = _backward_dkv(qp, kp, vp, do, ld, dht, cfg)
  dq = (dq[0] if dq.shape[0] == 1 else dq.sum(0, dtype=F32))[:, :l]
  dk = (dk[0] if dk.shape[0] == 1 else dk.sum(0, dtype=F32))[:, :l]
  dv = dv[:, :l]
  # d log_decay: sum over t of (t + 1) (q_t.dq_t - k_t.dk_t), plus L <dht, S_final>
  # (module docstring), from the kernels' float32 row sums: rounding dq, dk to bf16
  # first would cost ~9% relative error at L = 4096 (the terms cancel).
  w = jnp.arange(1, l + 1, dtype=F32)
  dg = (dgq.sum(0) - dgk.sum(0))[:, :, :l]
  dld = jnp.einsum("bhl,l->h", dg, w) + l * jnp.einsum("bhkv,bhkv->h", dht, state)
  dh0 = None if h0 is None else dh0.astype(h0.dtype)
  return (dq.astype(q_dtype), dk.astype(q_dtype), dv.astype(v_dtype),
          dld.astype(log_decay.dtype), dh0)


_core.defvjp(_core_fwd, _core_bwd)


SPLIT_MAX_CTAS = 32  # split only at or below this many CTAs (results/README.md)
MIN_SEGMENT = 1024  # shorter segments spend more on the pre-pass than they save


def num_segments(b, l, h, dv, *, num_sms: int) -> int:
  """Sequence segments that run as separate CTAs: 1 while B * H * Dv / 64 > SPLIT_MAX_CTAS
  (the warp-specialised forward then fills the GPU well enough that the pre-pass costs
  more than it saves), else the smallest power of two that brings the CTAs to about
  num_sms (the device's, `ssm.ops._impl.num_sms`; 0 never splits), keeping whole 64-token
  blocks of at least MIN_SEGMENT tokens. Measurements: results/README.md ("Lightning
  kernel: segments")."""
  ctas = b * h * max(1, dv // 64)
  s = 1
  if ctas > SPLIT_MAX_CTAS:
    return s
  while (ctas * s * 2 <= num_sms and l % (2 * s * 64) == 0 and l // (2 * s) >= MIN_SEGMENT):
    s *= 2
  return s


def segment_starts_xla(k, v, log_decay, h0, segments: int):
  """States entering each of `segments` equal segments, and the final state (XLA reference;
  its VJP is the backward of `segment_starts`).

  Each segment's own contribution, sum_j lambda^(n-1-j) k_j v_j^T over its n tokens, is
  one batched matrix product (bf16 operands as in the kernel, float32 accumulation);
  a sequential scan over the few segments chains them from h0. Differentiable.
  k (B, L, H, Dk), v (B, L, H, Dv), log_decay (H,), h0 (B, H, Dk, Dv) float32
  -> starts (B, S, H, Dk, Dv), final (B, H, Dk, Dv), float32.
  """
  b, l, h, dk = k.shape
  dv = v.shape[-1]
  n = l // segments
  w = jnp.exp(log_decay[None, :] * (n - 1 - jnp.arange(n, dtype=F32))[:, None])  # (n, h)
  kw = (k.reshape(b, segments, n, h, dk).astype(F32) * w[None, None, :, :, None]).astype(MM)
  vs = v.reshape(b, segments, n, h, dv).astype(MM)
  local = jnp.einsum("bsnhk,bsnhv->sbhkv", kw, vs, preferred_element_type=F32)
  seg_decay = jnp.exp(log_decay * n)[None, :, None, None]

  def step(state, contribution):
    return seg_decay * state + contribution, state

  final, starts = lax.scan(step, h0, local)
  return jnp.moveaxis(starts, 0, 1), final


def _piece_sums(k, v, ld, pieces: int, used: int, interpret: bool):
  """Each piece's own state contribution, transposed: for the m tokens of piece p,
  sum_j lambda^(m-1-j) v_j k_j^T, (B, used, H, Dv, Dk) float32 for the first `used` of
  `pieces` equal pieces. k (B, L, H, Dk) and v (B, L, H, Dv) bf16 with L a multiple of
  pieces * 64; ld (H, C) float32.

  One warpgroup per (batch, piece, head, 64 value columns). The weights are absolute
  within the piece (lambda^(m-1-j) <= 1, underflowing to 0 far back, as the terms do),
  so there is no serial chain: every block's product adds into one accumulator (A
  operand (w o V)^T in registers, K from SMEM), and the kernel streams k and v once.
  """
  b, l, h, dk = k.shape
  dv = v.shape[3]
  nvt, m = dv // BV, l // pieces
  n_blocks = m // C
  cols_l = plgpu.Layout.WGMMA.reduce(0)

  def body(k_ref, v_ref, ld_ref, out_ref, k_s, v_s, acc_s, ld_s, in_bar, misc_bar):
    bp, hi, vi = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
    bi, pi = lax.div(bp, used), lax.rem(bp, used)
    cols = pl.ds(vi * BV, BV)
    plgpu.copy_gmem_to_smem(ld_ref.at[hi], ld_s, misc_bar)
    plgpu.barrier_wait(misc_bar)
    ld = ld_s[0]
    pos = _pallas.cast(lax.broadcasted_iota(jnp.int32, (C,), 0), cols_l, interpret)
    t0 = pi * m

    def step(n, slot, acc):
      w = jnp.exp(ld * (m - 1 - n * C - pos).astype(F32))
      vt = _load_t(v_s.at[slot], WGMMA, interpret).astype(F32)                 # (BV, C)
      vw = (vt * lax.broadcast_in_dim(w, (BV, C), [1])).astype(MM)
      return _mm_init(vw, k_s.at[slot], (BV, dk), init=acc, interpret=interpret)

    acc = _pipeline(
        n_blocks, reverse=False,
        sources=[lambda n: k_ref.at[bi, pl.ds(t0 + n * C, C), hi],
                 lambda n: v_ref.at[bi, pl.ds(t0 + n * C, C), hi, cols]],
        buffers=[k_s, v_s], barrier=in_bar, step=step,
        init=_pallas.cast(jnp.zeros((BV, dk), F32), WGMMA, interpret))
    acc_s[...] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(acc_s, out_ref.at[bi, pi, hi, cols])
    plgpu.wait_smem_to_gmem(0)

  stages = max(2, min(PIECE_STAGES, n_blocks))  # the ring needs two slots
  scratch = dict(k_s=_smem((stages, C, dk)), v_s=_smem((stages, C, BV)),
                 acc_s=plgpu.SMEM((BV, dk), F32), ld_s=plgpu.SMEM((C,), F32),
                 in_bar=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
                 misc_bar=plgpu.Barrier())
  out_type = jax.ShapeDtypeStruct((b, used, h, dv, dk), F32)
  return _pallas.kernel(
      body, interpret=interpret, out_type=out_type, scratch_types=scratch,
      grid=(b * used, h, nvt), grid_names=("b", "h", "v"),
      compiler_params=plgpu.CompilerParams(approx_math=True))(k, v, ld)


def _combine_pieces(sums_t, log_decay, h0, segments: int, piece_len: int):
  """Segment entering states from the pieces' contributions: the state before token t0 =
  lambda^t0 h0 + sum over pieces p ending at e_p <= t0 of lambda^(t0 - e_p) c_p, as one
  float32 product per head. sums_t (B, P, H, Dv, Dk) holds the pieces of the first
  S - 1 segments (the last segment's pieces enter no start) -> (B, S, H, Dk, Dv)."""
  p_count = sums_t.shape[1]
  per_seg = p_count // (segments - 1)
  ends = piece_len * (jnp.arange(p_count) + 1)                                  # (P,)
  starts = piece_len * per_seg * jnp.arange(segments)                           # (S,)
  dist = starts[:, None] - ends[None, :]                                        # (S, P)
  keep = dist >= 0
  wts = jnp.where(keep[None], jnp.exp(log_decay[:, None, None]
                                      * jnp.where(keep, dist, 0)[None].astype(F32)), 0.0)
  states = jnp.einsum("hsp,bphvk->bshkv", wts, sums_t, precision=lax.Precision.HIGHEST)
  return states + jnp.exp(log_decay[None, None, :, None, None]
                          * starts[None, :, None, None, None].astype(F32)) * h0[:, None]


PIECE_BLOCKS = 16  # 64-token blocks per pre-pass piece: about one wave of CTAs at 32k, H=16
PIECE_STAGES = 4   # TMA ring depth of the pre-pass (3 blocks in flight)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def segment_starts(k, v, log_decay, h0, segments: int, interpret: bool = False):
  """States entering each of `segments` (> 1) equal segments, (B, S, H, Dk, Dv) float32.

  Forward: `_piece_sums` (a Pallas pass that reads the k and v of the first S - 1
  segments once, split into pieces of PIECE_BLOCKS blocks for parallelism) and
  `_combine_pieces`; backward: the VJP of `segment_starts_xla`, the same function in XLA.
  Argument shapes as `segment_starts_xla`.
  """
  return _segment_starts_fwd(k, v, log_decay, h0, segments, interpret)[0]


def _segment_starts_fwd(k, v, log_decay, h0, segments, interpret):
  _, l, h, _ = k.shape
  blocks = l // C
  pieces = segments
  while pieces * 2 * PIECE_BLOCKS <= blocks and blocks % (pieces * 2) == 0:
    pieces *= 2
  used = pieces // segments * (segments - 1)
  ld = jnp.broadcast_to(log_decay.astype(F32)[:, None], (h, C))
  sums = _piece_sums(k.astype(MM), v.astype(MM), ld, pieces, used, interpret)
  return _combine_pieces(sums, log_decay.astype(F32), h0, segments, l // pieces), (
      k, v, log_decay, h0)


def _segment_starts_bwd(segments, interpret, res, ct):
  del interpret
  k, v, log_decay, h0 = res
  _, vjp = jax.vjp(lambda *a: segment_starts_xla(*a, segments)[0], k, v, log_decay, h0)
  return vjp(ct)


segment_starts.defvjp(_segment_starts_fwd, _segment_starts_bwd)


def lightning_attention_pallas(q, k, v, log_decay=None, h0=None, *, interpret=None,
                               segments: int | None = None):
  """The Pallas kernel path (arguments checked by `lightning_attention`).

  Args:
    q, k: (B, L, H, Dk); v: (B, L, H, Dv); float32 or bf16, Dk, Dv in {64, 128}.
    log_decay: (H,) <= 0 or None; h0: (B, H, Dk, Dv) or None.
    interpret: run the Mosaic GPU interpreter (default: off the GPU).
    segments: split the sequence into this many segments run as separate CTAs, their
      entering states from `segment_starts` (None: `num_segments`, which splits only
      when B * H * Dv / 64 leaves SMs idle; it must divide L into 64-token blocks).

  Returns:
    o (B, L, H, Dv) in q's dtype and the final state (B, H, Dk, Dv) float32.
  """
  check_supported(q, k, v)
  interpret = interpret_mode(interpret)
  b, l, h, dk = q.shape
  dv = v.shape[-1]
  log_decay = jnp.zeros((h,), F32) if log_decay is None else jnp.asarray(log_decay, F32)
  if h0 is not None:
    h0 = h0.astype(F32)
  if segments is None:
    segments = num_segments(b, l, h, dv, num_sms=0 if interpret else _impl.num_sms())
  if segments < 1 or (segments > 1 and l % (segments * 64)):
    raise ValueError(f"lightning_attention(impl='pallas'): {segments} segments must divide "
                     f"the length {l} into whole 64-token blocks")
  if segments > 1:
    h0_full = jnp.zeros((b, h, dk, dv), F32) if h0 is None else h0
    starts = segment_starts(k, v, log_decay, h0_full, segments, bool(interpret))
    n = l // segments
    split = lambda x: x.reshape(b * segments, n, *x.shape[2:])
    cfg = _Cfg(seq_len=n, out_dtype=jnp.dtype(q.dtype), has_h0=True, interpret=bool(interpret))
    o, ends = _core(split(q), split(k), split(v), log_decay,
                    starts.reshape(b * segments, h, dk, dv), cfg)
    # The last segment's end state, from its entering state, is the final state.
    return o.reshape(b, l, h, dv), ends.reshape(b, segments, h, dk, dv)[:, -1]
  cfg = _Cfg(seq_len=l, out_dtype=jnp.dtype(q.dtype), has_h0=h0 is not None,
             interpret=bool(interpret))
  return _core(q, k, v, log_decay, h0, cfg)
