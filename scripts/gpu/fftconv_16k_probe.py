"""Probe the FFT-convolution kernel at causal L = 8192 (FFT size 16384) on a GPU: compile
time, error against jnp.fft, forward and forward+backward ms (pipelined), printed as each
lands, so that a hang or a slow compile shows where it happens.

    [SSM_FFT_CONV_HALVES_FROM=16384] python scripts/gpu/fftconv_16k_probe.py [--b 8] [--h 1024]
"""
import argparse
import os
import time

import jax
import jax.numpy as jnp

from benchmarks.common import time_fn_pipelined
from ssm.ops import fft_conv


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--b", type=int, default=8)
  ap.add_argument("--h", type=int, default=1024)
  ap.add_argument("--l", type=int, default=8192)
  args = ap.parse_args()
  mode = os.environ.get("SSM_FFT_CONV_HALVES_FROM", "default")
  u = jax.random.normal(jax.random.key(0), (args.b, args.l, args.h), jnp.float32)
  k = jax.random.normal(jax.random.key(1), (args.h, args.l), jnp.float32) / args.l ** 0.5
  for impl in ("pallas", "xla"):
    fwd = jax.jit(lambda u, k, impl=impl: fft_conv(u, k, impl=impl))
    fb = jax.jit(jax.grad(lambda u, k, impl=impl: jnp.sum(fft_conv(u, k, impl=impl) ** 2), (0, 1)))
    for name, fn in (("fwd", fwd), ("fwd+bwd", fb)):
      t = time.perf_counter()
      compiled = fn.lower(u, k).compile()
      print(f"[{mode}] {impl} {name}: compiled in {time.perf_counter() - t:.1f} s", flush=True)
      t = time.perf_counter()
      jax.block_until_ready(compiled(u, k))
      print(f"[{mode}] {impl} {name}: first call {time.perf_counter() - t:.2f} s", flush=True)
      ms = 1e3 * time_fn_pipelined(fn, u, k, calls=10, repeats=3)
      print(f"[{mode}] {impl} {name}: {ms:.3f} ms", flush=True)
    if impl == "pallas":
      y, y_ref = fwd(u, k), fft_conv(u, k, impl="xla")
      err = float(jnp.linalg.norm(y - y_ref) / jnp.linalg.norm(y_ref))
      print(f"[{mode}] pallas vs xla rel err {err:.2e}", flush=True)


if __name__ == "__main__":
  main()
