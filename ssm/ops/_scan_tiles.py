"""Pieces shared by the scan kernels (`linear_scan_pallas`, `selective_scan_pallas`).

Both recurrences are elementwise in the channel axis, so the kernels give each
thread of a warpgroup one channel and walk the sequence in time, the state in
registers (the layout of Mamba's CUDA kernel and of the public Mosaic GPU scan
kernels):

* grid (D / 128, batch): one CTA of 128 threads per block of `BLOCK_D` channels and
  batch row; thread i owns channel d0 + i (layout `LINE`).
* The sequence arrives in tiles of `CHUNK` tokens: TMA copies of (CHUNK, 128)
  slabs of the (batch, length, D) inputs into shared memory, a few stages deep (`stage_count`), each
  slot completing on its own barrier. A thread reads its column of the tile (one
  coalesced 512-byte row per token across the CTA) and writes its output element
  straight to device memory, so every input is read once and every output
  written once.

Lengths that are not a multiple of CHUNK are padded at the end with identity
steps (`pad_len`, `pad_time`), so padding never changes a state. Inputs are read
in their dtype (float32 or bfloat16) and all arithmetic is float32. (The chunked
matrix kernels, lightning attention and SSD, share `_tiles.py` instead.)
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

BLOCK_D = 128  # channels per CTA: one per thread of the warpgroup
CHUNK = 32  # tokens per TMA tile
LINE = plgpu.Layout.WG_STRIDED((BLOCK_D,), vec_size=1)  # thread i holds channel i
F32 = jnp.float32
_SMEM_BYTES = 200 * 1024  # shared memory we allow one CTA (227 KB on a Hopper SM, less bookkeeping)


@dataclasses.dataclass(frozen=True)
class ScanCfg:
  """The static facts of a scan kernel call (a jit static argument): batch, the length
  padded to whole CHUNK tiles, channels, and whether to interpret."""
  batch: int
  seq_len: int  # padded
  dim: int
  interpret: bool

  @property
  def n_tiles(self) -> int:
    return self.seq_len // CHUNK


def params():
  return plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=True)


def pad_len(seq_len: int) -> int:
  return -(-seq_len // CHUNK) * CHUNK


def pad_time(x, padded: int, value=0.0):
  pad = padded - x.shape[1]
  if pad == 0:
    return x
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def unrolled(n: int, step, carry, unroll: int = 4):
  """fori_loop over range(n) with `unroll` steps per iteration, unrolled by hand (Mosaic GPU
  lowers plain fori_loops; a full unroll only slows compilation)."""
  def group(k, carry):
    for r in range(unroll):
      carry = step(k * unroll + r, carry)
    return carry
  return lax.fori_loop(0, n // unroll, group, carry)


def stage_count(n_tiles: int, bytes_per_stage: int, fixed: int = 0, most: int = 3,
                budget: int = _SMEM_BYTES) -> int:
  """Prefetch depth: as deep as `most` while the stages fit `budget` bytes of shared memory."""
  s = most
  while s > 1 and fixed + s * bytes_per_stage > budget:
    s -= 1
  return max(1, min(s, n_tiles))
