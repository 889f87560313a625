"""Selective-scan backward time against the number of sequence segments (H100 tuning).

    python scripts/gpu/ss_segments.py 1 2 4 8

Times the kernel's forward+backward (pipelined ms per call, benchmarks.common) at the
benchmark shape B4 L2048 D1536 N16, f32 and bf16, for each segment count given, and prints
what `bwd_segments_for` picks on this device.
"""

import sys

import jax
import jax.numpy as jnp

from benchmarks.common import print_table, time_fn_pipelined
from benchmarks.scan import ss_inputs, vjp_fn
from ssm.ops import _impl
from ssm.ops import selective_scan_pallas as sp


def main(counts):
  b, l, d, n = 4, 2048, 1536, 16
  sms = _impl.num_sms()
  rows = []
  for dtype in (jnp.float32, jnp.bfloat16):
    u, delta, A, B, C, D, z, bias = ss_inputs(b, l, d, n, dtype)
    ct = jax.random.normal(jax.random.key(9), u.shape, jnp.float32).astype(dtype)
    for s in counts:
      f = lambda u, delta, A, B, C, D, z, bias, s=s: sp.selective_scan_pallas(
          u, delta, A, B[:, :, None], C[:, :, None], D, z=z, delta_bias=bias,
          delta_softplus=True, bwd_segments=s)[0]
      g = jax.jit(vjp_fn(f))
      ms = 1e3 * time_fn_pipelined(g, ct, u, delta, A, B, C, D, z, bias, calls=20, repeats=3)
      rows.append(dict(dtype=jnp.dtype(dtype).name, segments=s, fwdbwd_ms=ms))
      print(rows[-1], flush=True)
  print_table(rows, ["dtype", "segments", "fwdbwd_ms"],
              title=f"{jax.devices()[0].device_kind}: auto picks "
                    f"{sp.bwd_segments_for(b, d, l // sp.BWD_TILE, sms)} ({sms} SMs)")


if __name__ == "__main__":
  main([int(a) for a in sys.argv[1:]] or [1, 2, 4, 8])
