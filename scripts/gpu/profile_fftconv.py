"""Where the Pallas FFT convolution's time goes: a jax.profiler trace of its forward and
forward+backward, summed per device op, beside jnp.fft (run on a GPU).

    python scripts/gpu/profile_fftconv.py [--b 8] [--h 1024] [--lengths 2048,8192] [--dtype float32]
"""
import argparse
import functools

import jax
import jax.numpy as jnp

from benchmarks.common import summarise_trace, time_fn_pipelined
from ssm.ops import fft_conv


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--b", type=int, default=8)
  ap.add_argument("--h", type=int, default=1024)
  ap.add_argument("--lengths", default="2048,8192")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--top", type=int, default=12)
  args = ap.parse_args()
  for l in map(int, args.lengths.split(",")):
    ku, kk = jax.random.split(jax.random.key(l))
    u = jax.random.normal(ku, (args.b, l, args.h)).astype(args.dtype)
    k = jax.random.normal(kk, (args.h, l)) / l
    for impl in ("xla", "pallas"):
      f = jax.jit(functools.partial(fft_conv, impl=impl))
      g = jax.jit(jax.grad(lambda u, k, f=f: jnp.sum(f(u, k).astype(jnp.float32) ** 2),
                           argnums=(0, 1)))
      tf, tg = (1e3 * time_fn_pipelined(fn, u, k, calls=10) for fn in (f, g))
      print(f"\nB={args.b} H={args.h} L={l} {args.dtype} {impl}: fwd {tf:.3f} ms, "
            f"fwd+bwd {tg:.3f} ms (pipelined)", flush=True)
      for name, fn in (("fwd", f), ("fwd+bwd", g)):
        d = f"/tmp/trace_{impl}_{l}_{name}"
        with jax.profiler.trace(d, create_perfetto_trace=True):
          jax.block_until_ready([fn(u, k) for _ in range(3)])
        print(f"-- {name}")
        summarise_trace(d, 3, args.top)


if __name__ == "__main__":
  main()
