"""Pipelined forward (and forward+backward) times of the lightning kernel over the
32k-token sweep for several sequence-segment counts, with jla's simple_gla beside it
(run on an H100; used to set `num_segments`).

    python scripts/gpu/lightning_segments.py [--segments 1,2,4,8] [--bwd] [--prepass]
"""
import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import time_fn_pipelined
from benchmarks.lightning_xla import qkv
from ssm.lightning import lightning_log_decay
from ssm.ops import lightning_pallas as lp
from ssm.ops.lightning_attention import lightning_attention_xla


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--segments", default="1,2,4,8,16")
  ap.add_argument("--lengths", default="2048,4096,8192,16384,32768,65536")
  ap.add_argument("--bwd", action="store_true")
  ap.add_argument("--prepass", action="store_true", help="also time the segment pre-pass alone")
  args = ap.parse_args()
  h, d = 16, 64
  ld = jnp.asarray(lightning_log_decay(h), jnp.float32)
  try:
    import jla.ops as jla  # pylint: disable=import-outside-toplevel
  except Exception:  # pylint: disable=broad-except
    jla = None
  for l in map(int, args.lengths.split(",")):
    b = max(1, 32768 // l)
    q, k, v = qkv(b, l, h, d, jnp.bfloat16)
    ref = None
    line = [f"B={b:2d} L={l:6d}"]
    for s in map(int, args.segments.split(",")):
      if l % (s * 64) or (s > 1 and l // s < 256):
        continue
      f = jax.jit(functools.partial(lp.lightning_attention_pallas, log_decay=ld, segments=s))
      o = f(q, k, v)[0]
      if ref is None:
        ref = lightning_attention_xla(*(x.astype(jnp.float32) for x in (q, k, v)), ld)[0]
      err = float(jnp.linalg.norm(o.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
      t = 1e3 * time_fn_pipelined(f, q, k, v)
      cell = f"s{s}: {t:.3f}"
      if args.bwd:
        g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)[0].astype(jnp.float32) ** 2),
                             argnums=(0, 1, 2)))
        cell += f"/{1e3 * time_fn_pipelined(g, q, k, v):.3f}"
      if args.prepass and s > 1:
        h0 = jnp.zeros((b, h, d, d), jnp.float32)
        pre = jax.jit(lambda k, v, s=s, h0=h0: lp.segment_starts(k, v, ld, h0, s))
        cell += f" [pre {1e3 * time_fn_pipelined(pre, k, v):.3f}]"
      line.append(cell + f" (err {err:.1e})")
    if jla is not None:
      gg = jnp.broadcast_to(ld, (b, l, h))
      jf = jax.jit(lambda q, k, v, g: jla.linear_attention("simple_gla", q, k, v, g=g,
                                                           scale=1.0, impl="mosaic_gpu")[0])
      cell = f"jla: {1e3 * time_fn_pipelined(jf, q, k, v, gg):.3f}"
      if args.bwd:
        jg = jax.jit(jax.grad(lambda *a: jnp.sum(jf(*a).astype(jnp.float32) ** 2),
                              argnums=(0, 1, 2)))
        cell += f"/{1e3 * time_fn_pipelined(jg, q, k, v, gg):.3f}"
      line.append(cell)
    print("  ".join(line), flush=True)
    del q, k, v, ref


if __name__ == "__main__":
  main()
