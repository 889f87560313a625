"""Lower the Pallas Mosaic GPU kernels for CUDA on a machine without a GPU (jax.export with
platforms=["cuda"]): Mosaic GPU's lowering runs, so layout, transform and shape errors that
the CPU interpreter cannot see show up before a GPU call. Compilation to machine code
still happens only on the GPU.

    python scripts/export_pallas_cuda.py [fftconv]
"""
import sys

import jax
import jax.numpy as jnp
from jax import export

from ssm.ops import fft_conv_pallas as fcp


def fftconv_cases():
  """(name, fn, arg shapes): forward and forward+backward for each size class and dtype."""
  for b, l, h, dtype, circular in [(4, 100, 8, jnp.float32, False),     # n 256, stacked tiles
                                   (2, 200, 8, jnp.float32, False),     # n 512, stacked tiles
                                   (2, 300, 8, jnp.float32, False),     # n 1024
                                   (4, 2048, 8, jnp.float32, False),    # n 4096
                                   (4, 1024, 8, jnp.float32, False),    # n 2048
                                   (3, 8192, 4, jnp.float32, False),    # order 3, odd pairs
                                   (4, 2048, 8, jnp.bfloat16, False),
                                   (4, 4096, 8, jnp.float32, True)]:
    for wgs in (1, 2):
      conv = lambda u, k, c=circular, w=wgs: fcp.fft_conv_pallas(u, k, circular=c,
                                                                interpret=False, warpgroups=w)
      grad = jax.grad(lambda u, k, conv=conv: jnp.sum(conv(u, k).astype(jnp.float32) ** 2),
                      argnums=(0, 1))
      shapes = (jax.ShapeDtypeStruct((b, l, h), dtype), jax.ShapeDtypeStruct((h, l), jnp.float32))
      tag = f"B{b} L{l} H{h} {jnp.dtype(dtype).name}{' circular' if circular else ''} wg{wgs}"
      yield f"fft_conv {tag} fwd", conv, shapes
      yield f"fft_conv {tag} fwd+bwd", grad, shapes


def main(argv):
  failed = 0
  for name, fn, shapes in fftconv_cases():
    try:
      export.export(jax.jit(fn), platforms=["cuda"])(*shapes)
      print(f"ok    {name}", flush=True)
    except Exception as e:  # noqa: BLE001 -- report every case
      failed += 1
      print(f"FAIL  {name}: {type(e).__name__}: {str(e)[:1500]}", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
