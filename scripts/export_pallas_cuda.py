"""Lower the Pallas Mosaic GPU kernels for CUDA on a machine without a GPU (jax.export with
platforms=["cuda"]): Mosaic GPU's lowering runs, so layout, transform and shape errors that
the CPU interpreter cannot see show up before a GPU call. Compilation to machine code
still happens only on the GPU.

    python scripts/export_pallas_cuda.py [--lightning]

Cases: the FFT convolution (every size class, f32/bf16, causal/circular), the linear
and selective scans and the depthwise causal convolution, forward and forward+backward;
lightning attention and SSD (Mamba-2) come with --lightning or on jax >= 0.11 (see
chunked_cases).
"""
import sys

import jax
import jax.numpy as jnp
from jax import export

from ssm.ops import causal_conv_pallas
from ssm.ops import fft_conv_pallas as fcp
from ssm.ops import lightning_pallas, linear_scan_pallas, selective_scan_pallas, ssd_pallas


def fftconv_cases():
  """(name, fn, arg shapes): forward and forward+backward for each size class and dtype."""
  for b, l, h, dtype, circular, skip in [
      (4, 100, 8, jnp.float32, False, False),     # n 256, stacked tiles
      (2, 200, 8, jnp.float32, False, False),     # n 512, stacked tiles
      (2, 300, 8, jnp.float32, False, False),     # n 1024
      (4, 1024, 8, jnp.float32, False, False),    # n 2048
      (4, 2048, 8, jnp.float32, False, True),     # n 4096, D and gate
      (4, 2048, 8, jnp.bfloat16, False, False),
      (4, 4096, 8, jnp.float32, True, False),     # circular n 4096
      (2, 3000, 4, jnp.float32, False, False),    # n 8192: 3 stages, 2 slabs (1 loaded)
      (2, 8192, 4, jnp.float32, False, True),     # n 16384: 4 slabs (2 loaded), D and gate
      (2, 8192, 4, jnp.bfloat16, False, False),
      (2, 16384, 4, jnp.float32, True, False),    # circular n 16384: 4 slabs loaded
      (3, 10000, 2, jnp.float32, False, False),   # causal n 32768: even + odd halves, odd pairs
      (2, 32768, 2, jnp.float32, True, False)]:   # circular n 32768: XLA outer 2 + 3 stages
    def conv(u, k, d, g, c=circular, skip=skip):
      return fcp.fft_conv_pallas(u, k, D=d if skip else None, gate=g if skip else None,
                                 circular=c, interpret=False)
    grad = jax.grad(lambda *a, conv=conv: jnp.sum(conv(*a).astype(jnp.float32) ** 2),
                    argnums=(0, 1, 2, 3) if skip else (0, 1))
    shapes = (jax.ShapeDtypeStruct((b, l, h), dtype), jax.ShapeDtypeStruct((h, l), jnp.float32),
              jax.ShapeDtypeStruct((h,), jnp.float32), jax.ShapeDtypeStruct((b, l, h), dtype))
    tag = (f"B{b} L{l} H{h} {jnp.dtype(dtype).name}{' circular' if circular else ''}"
           f"{' D gate' if skip else ''}")
    yield f"fft_conv {tag} fwd", conv, shapes
    yield f"fft_conv {tag} fwd+bwd", grad, shapes


def _loss_grad(fn, argnums):
  return jax.grad(lambda *a: sum(jnp.sum(o.astype(jnp.float32) ** 2) for o in
                                 jax.tree_util.tree_leaves(fn(*a))), argnums=argnums)


def scan_cases():
  """The scan kernels, forward and forward+backward (small shapes)."""
  f32, bf16 = jnp.float32, jnp.bfloat16
  s = jax.ShapeDtypeStruct
  lin = lambda a, b: linear_scan_pallas.linear_scan_pallas(a, b, interpret=False)
  yield "linear_scan f32 fwd", lin, (s((2, 256, 128), f32), s((2, 256, 128), f32))
  yield "linear_scan f32 fwd+bwd", _loss_grad(lin, (0, 1)), (s((2, 256, 128), f32),
                                                           s((2, 256, 128), f32))
  sel = lambda u, dt, a, b, c: selective_scan_pallas.selective_scan_pallas(
      u, dt, a, b, c, delta_softplus=True, interpret=False, bwd_segments=2)
  shapes = (s((2, 256, 128), f32), s((2, 256, 128), f32), s((128, 16), f32),
            s((2, 256, 1, 16), f32), s((2, 256, 1, 16), f32))
  yield "selective_scan f32 fwd", sel, shapes
  yield "selective_scan f32 fwd+bwd", _loss_grad(sel, (0, 1, 2, 3, 4)), shapes
  # Mamba's call in bf16 (z gate, D, delta_bias), every backward variant (v1 kept for A/B).
  for variant in (3, 2, 1):
    def mamba(u, dt, a, b, c, d, z, bias, variant=variant):
      return selective_scan_pallas.selective_scan_pallas(
          u, dt, a, b, c, d, z=z, delta_bias=bias, delta_softplus=True, interpret=False,
          bwd_segments=2, bwd_variant=variant)
    mshapes = (s((2, 256, 128), bf16), s((2, 256, 128), bf16), s((128, 16), f32),
               s((2, 256, 1, 16), f32), s((2, 256, 1, 16), f32), s((128,), f32),
               s((2, 256, 128), bf16), s((128,), f32))
    yield (f"selective_scan bf16 z bwd v{variant} fwd+bwd",
           _loss_grad(mamba, tuple(range(8))), mshapes)


def conv_cases():
  """The depthwise causal convolution (silu), forward and forward+backward: f32 with whole
  tiles and several tiles per CTA; bf16 packed, the length not a multiple of the tile; 256
  channels per CTA (two a thread)."""
  s = jax.ShapeDtypeStruct
  for l, dtype, packed, block in ((256, jnp.float32, False, 128), (200, jnp.bfloat16, True, 128),
                                  (200, jnp.float32, True, 256)):
    def conv(x, w, b, l=l, packed=packed, block=block):
      ids = jnp.broadcast_to(jnp.arange(l) // 70, (2, l)) if packed else None
      return causal_conv_pallas.causal_conv1d_pallas(
          x, w, b, segment_ids=ids, activation="silu", interpret=False,
          tuning=causal_conv_pallas.ConvTuning(tiles_per_cta=4, block_c=block))
    shapes = (s((2, l, 256), dtype), s((4, 256), jnp.float32), s((256,), jnp.float32))
    tag = (f"causal_conv L{l} {jnp.dtype(dtype).name}{' packed' if packed else ''}"
           f"{' block 256' if block == 256 else ''}")
    yield f"{tag} fwd", conv, shapes
    yield f"{tag} fwd+bwd", _loss_grad(conv, (0, 1, 2)), shapes


def _jax_version():
  return tuple(int(p) for p in jax.__version__.split(".")[:2])


def chunked_cases(force: bool = False):
  """Lightning attention and SSD, forward and forward+backward (small shapes). jax 0.10's
  Mosaic GPU cannot load a transposed swizzled tile ("Can't transpose the swizzled
  dimension"), which these kernels do; jax 0.11 (the GPU machine) can: without `force`
  they come only on jax >= 0.11."""
  if not force and _jax_version() < (0, 11):
    return
  f32, bf16 = jnp.float32, jnp.bfloat16
  s = jax.ShapeDtypeStruct
  light = lambda q, k, v, ld: lightning_pallas.lightning_attention_pallas(
      q, k, v, ld, interpret=False, segments=2)
  shapes = (s((1, 256, 2, 64), bf16),) * 3 + (s((2,), f32),)
  yield "lightning bf16 fwd", light, shapes
  yield "lightning bf16 fwd+bwd", _loss_grad(light, (0, 1, 2, 3)), shapes
  for p, n, dtype in ((64, 128, bf16), (128, 64, f32)):
    ssd = lambda x, dt, a, b, c, d, h0: ssd_pallas.ssd_pallas(
        x, dt, a, b, c, D=d, h0=h0, segment_ids=jnp.arange(200)[None] // 70, interpret=False)
    shapes = (s((1, 200, 4, p), dtype), s((1, 200, 4), f32), s((4,), f32),
              s((1, 200, 2, n), dtype), s((1, 200, 2, n), dtype), s((4,), f32),
              s((1, 4, p, n), f32))
    name = f"ssd P{p} N{n} {jnp.dtype(dtype).name} packed"
    yield f"{name} fwd", ssd, shapes
    yield f"{name} fwd+bwd", _loss_grad(ssd, tuple(range(7))), shapes


def main(argv):
  failed = 0
  cases = (list(fftconv_cases()) + list(scan_cases()) + list(conv_cases())
           + list(chunked_cases(force="--lightning" in argv)))
  for name, fn, shapes in cases:
    try:
      export.export(jax.jit(fn), platforms=["cuda"])(*shapes)
      print(f"ok    {name}", flush=True)
    except Exception as e:  # noqa: BLE001 -- report every case
      failed += 1
      print(f"FAIL  {name}: {type(e).__name__}: {str(e)[:1500]}", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
