"""Tile-level building blocks of the chunked matrix kernels (lightning attention, SSD).

Both kernels walk a sequence in blocks of `C` = 64 tokens with bf16 tiles in shared
memory (TMA in, TMA out), float32 accumulators from wgmma, and per-token vectors in
the two reduced WGMMA layouts (`ROWS`: one value per row of a (C, .) tile, `COLS`:
one per column). Each helper runs on a Hopper GPU and, with `interpret=True`, in the
Mosaic GPU interpreter on the CPU, whose wgmma takes no transposed operands and no
register A operand: there the products are jnp.dot on the SMEM contents.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ssm.ops import _pallas

F32 = jnp.float32
MM = jnp.bfloat16  # matmul operand dtype
C = 64  # tokens per block
BV = 64  # value columns per CTA

WGMMA = plgpu.Layout.WGMMA
ROWS = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a WGMMA tile
COLS = plgpu.Layout.WGMMA.reduce(0)  # one value per column of a WGMMA tile

SMEM_BUDGET = 220 * 1024  # of the 227 KiB a Hopper CTA may use (barriers and slack aside)


def smem(shape, dtype=MM):
  """SMEM tile tiled and swizzled for TMA and wgmma (16-bit tiles: 128 B swizzle)."""
  dtype = jnp.dtype(dtype)
  swizzle = plgpu.find_swizzle(shape[-1] * dtype.itemsize * 8)
  return plgpu.SMEM(shape, dtype, transforms=(
      plgpu.TilingTransform((8, swizzle // dtype.itemsize)), plgpu.SwizzleTransform(swizzle)))


def stage(shape, dtype):
  """Output staging tile: swizzled for 16-bit dtypes, plain for float32."""
  return smem(shape, dtype) if jnp.dtype(dtype).itemsize == 2 else plgpu.SMEM(shape, dtype)


def mm(a, b, shape, *, interpret, ta=False, tb=False):
  """float32 (a^T if ta) @ (b^T if tb) from bf16 SMEM refs, on the tensor cores.

  The optimization barrier keeps the compiler from reading the accumulator before
  the wgmma wait (a known hazard of inline wgmma waits).
  """
  if interpret and (ta or tb):
    x, y = a[...], b[...]
    return jnp.dot(x.T if ta else x, y.T if tb else y, preferred_element_type=F32)
  if ta:
    a = plgpu.transpose_ref(a, (1, 0))
  if tb:
    b = plgpu.transpose_ref(b, (1, 0))

  def scoped(acc):
    plgpu.wgmma(acc, a, b)
    return acc[...]

  return lax.optimization_barrier(pl.run_scoped(scoped, plgpu.ACC(shape, F32)))


def mm_init(a, b, shape, *, init=None, tb=False, interpret):
  """float32 init + a @ (b^T if tb): `a` a bf16 register array or SMEM ref, `b` an SMEM ref.

  Register operands keep the A tile out of SMEM (no store, commit and reload on a
  serial chain); `init` seeds the accumulator, so the product and the sum finish in
  one wgmma wait.
  """
  if interpret:
    x = a[...] if hasattr(a, "at") else a
    y = b[...]
    out = jnp.dot(x, y.T if tb else y, preferred_element_type=F32)
    return out if init is None else out + init
  if tb:
    b = plgpu.transpose_ref(b, (1, 0))
  if init is None:
    def scoped(acc):
      plgpu.wgmma(acc, a, b)
      return acc[...]
    out = pl.run_scoped(scoped, plgpu.ACC(shape, F32))
  else:
    out = pl.run_state(lambda acc: plgpu.wgmma(acc, a, b))(plgpu.ACC.init(init))
  return lax.optimization_barrier(out)


def mm_group(groups, *, interpret):
  """Several float32 products issued together and awaited once: each group (terms, shape)
  is sum_i a_i @ (b_i^T if tb_i) over its terms [(a_i, b_i, tb_i)] in one accumulator (a a
  bf16 register array or SMEM ref, b an SMEM ref). Independent wgmmas then overlap on the
  tensor cores where a wait after each would serialise them. Returns one array per group.
  """
  if interpret:
    outs = []
    for terms, shape in groups:
      out = jnp.zeros(shape, F32)
      for a, b, tb in terms:
        x, y = (a[...] if hasattr(a, "at") else a), b[...]
        out = out + jnp.dot(x, y.T if tb else y, preferred_element_type=F32)
      outs.append(out)
    return tuple(outs)

  def scoped(*accs):
    for acc, (terms, _) in zip(accs, groups):
      for a, b, tb in terms:
        plgpu.wgmma(acc, a, plgpu.transpose_ref(b, (1, 0)) if tb else b)
    return tuple(acc[...] for acc in accs)  # the first read waits for every group

  accs = [plgpu.ACC(shape, F32) for _, shape in groups]
  return lax.optimization_barrier(pl.run_scoped(scoped, *accs))


def load_t(ref, layout, interpret):
  """ref^T (a 2-D SMEM tile) in registers."""
  if interpret:
    return ref[...].T
  return plgpu.load(ref.T, (), layout=layout, optimized=False)


def rows(vec, shape):
  """vec[i] along row i (vec in the ROWS layout)."""
  return lax.broadcast_in_dim(vec, shape, [0])


def cols(vec, shape):
  """vec[j] along column j (vec in the COLS layout)."""
  return lax.broadcast_in_dim(vec, shape, [1])


def iota(shape, dim, interpret):
  """Row (dim 0) or column (dim 1) indices of a WGMMA-layout tile."""
  return _pallas.cast(lax.broadcasted_iota(jnp.int32, shape, dim), WGMMA, interpret)


def pipeline(n_blocks, *, reverse, sources, buffers, barrier, step, init):
  """fori_loop over blocks with the next blocks' tiles prefetched by TMA.

  sources[i](n) is the GMEM view of block n's tile i, buffers[i] its (stages, ...) SMEM
  ring (barrier: `stages` barriers); step(n, slot, carry) -> carry runs once the slot's
  tiles have landed and must be done reading them when it returns. stages - 1 blocks are
  in flight while one is computed. n_blocks is a Python int.
  """
  stages = buffers[0].shape[0]  # >= 2
  order = (lambda i: n_blocks - 1 - i) if reverse else (lambda i: i)

  def issue(i, slot):
    n = order(i)
    for src, buf in zip(sources, buffers):
      plgpu.copy_gmem_to_smem(src(n), buf.at[slot], barrier.at[slot])

  for i in range(min(stages - 1, n_blocks)):
    issue(i, i)

  def body(i, carry):
    slot = lax.rem(i, stages)
    plgpu.barrier_wait(barrier.at[slot])

    @pl.when(i + stages - 1 < n_blocks)
    def _prefetch():  # the slot refilled was last read by block i - 1, finished in order
      plgpu.commit_smem()
      issue(i + stages - 1, lax.rem(i + stages - 1, stages))

    return step(order(i), slot, carry)

  return lax.fori_loop(0, n_blocks, body, init)


def feed(issue, n_blocks, stages, free):
  """The loads of a warp-specialised kernel's memory warpgroup: issue(n, slot) starts block
  n's TMA copies into ring slot `slot`; the first `stages` blocks go at once, every later
  one once the consumers have released its slot (`free`, one barrier per slot). Returns
  after observing the last releases, so no barrier is left mid-phase."""
  for n in range(min(stages, n_blocks)):
    issue(n, n)

  @pl.loop(stages, n_blocks)
  def _refill(n):
    slot = lax.rem(n, stages)
    plgpu.barrier_wait(free.at[slot])  # block n - stages is done with the slot
    issue(n, slot)

  for n in range(max(n_blocks - stages, 0), n_blocks):
    plgpu.barrier_wait(free.at[n % stages])


def consumer_registers(interpret):
  """A compute warpgroup of a warp-specialised kernel takes 232 registers a thread (the
  TMA warpgroup gives its own back down to 40: 2 x 232 + 40 fill the register file)."""
  if not interpret:
    plgpu.set_max_registers(232, action="increase")


def producer_registers(interpret):
  """The TMA warpgroup keeps 40 registers a thread (see consumer_registers)."""
  if not interpret:
    plgpu.set_max_registers(40, action="decrease")


def publish(pub, value, i, slot, *, in_bar, ready, free, flush_stores=False):
  """The state-chain warpgroup's hand-off of block i: once the block's inputs (ring slot
  `slot`) have landed and the consumer has read the tile published two blocks ago, write
  `value` into the double-buffered tile pub[i % 2] and signal `ready`. flush_stores: the
  tile also goes to GMEM by TMA, so first wait for the store sent from it two blocks ago
  (at most the other half's store stays in flight). Returns the tile written."""
  half = lax.rem(i, 2)
  plgpu.barrier_wait(in_bar.at[slot])

  @pl.when(i >= 2)
  def _():
    plgpu.barrier_wait(free.at[half])

  if flush_stores:
    plgpu.wait_smem_to_gmem(1, wait_read_only=True)
  pub.at[half][...] = value.astype(pub.dtype)
  plgpu.commit_smem()
  plgpu.barrier_arrive(ready.at[half])
  return pub.at[half]


def drain(free, n_blocks):
  """The state-chain warpgroup's last wait: the consumer has read the tiles published for
  the sweep's last two blocks (so no barrier of the pair is left mid-phase)."""
  for i in range(max(n_blocks - 2, 0), n_blocks):
    plgpu.barrier_wait(free.at[i % 2])


def store(pairs):
  """Write register tiles to SMEM staging and start their TMA stores to GMEM."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous block's stores read the staging
  for buf, value, _ in pairs:
    buf[...] = value.astype(buf.dtype)
  plgpu.commit_smem()
  for buf, _, dst in pairs:
    plgpu.copy_smem_to_gmem(buf, dst)


def send(buf, value, dst):
  """Write a register tile through the SMEM tile `buf` to GMEM `dst` and wait for it."""
  buf[...] = value
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(buf, dst)
  plgpu.wait_smem_to_gmem(0)


def send_async(buf, value, dst):
  """Start the TMA store of a register tile through `buf`, one half of a double-buffered
  staging pair: first wait until at most one store (the other half's) is in flight, so
  the store sent from `buf` two blocks ago has read it."""
  plgpu.wait_smem_to_gmem(1, wait_read_only=True)
  buf[...] = value.astype(buf.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(buf, dst)


def finish_together(done):
  """Every warpgroup arrives at `done` and waits for the others: no warpgroup of a
  warp-specialised kernel exits while another still issues wgmma."""
  plgpu.barrier_arrive(done)
  plgpu.barrier_wait(done)
