"""One forward + backward of each scan kernel at the benchmark sizes, for a profiler.

    ncu --clock-control none -k regex:scan_ --metrics ... python3 scripts/gpu/profile_scans.py

Runs every jitted function once to compile (and once more under the profiler's eye) so
that the captured launches are steady-state kernels, not compilation.
"""

import jax
import jax.numpy as jnp

from benchmarks.scan import lin_fn, lin_inputs, ss_fn, ss_inputs, vjp_fn


def main():
  ss_args = ss_inputs(4, 2048, 1536, 16, jnp.float32)
  lin_args = lin_inputs(8, 4096, 2048, jnp.float32)
  for f, args in ((ss_fn("pallas"), ss_args), (lin_fn("pallas"), lin_args)):
    g = jax.jit(vjp_fn(f))
    ct = jnp.ones(args[0].shape, args[0].dtype)
    for _ in range(2):
      jax.block_until_ready(g(ct, *args))


if __name__ == "__main__":
  main()
