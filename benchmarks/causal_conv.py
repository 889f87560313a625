"""The depthwise causal convolution + silu (ssm.ops.causal_conv1d): the Pallas kernel
against the XLA shifted sum, in the same call.

    python -m benchmarks.causal_conv            # on a Hopper GPU: checks, then the table
    python -m benchmarks.causal_conv --quick    # tiny shapes, CPU smoke run (kernel interpreted)

1. Correctness at the benchmark sizes: relative error ||x - ref|| / ||ref|| of y and of
   the gradients of x, w and bias, kernel against XLA (a NaN fails the run).
2. Timings: median ms of the forward and of forward + backward (the VJP with a random
   cotangent: dx, dw, dbias), each call waited for; achieved GB/s against the bytes a
   fused kernel must move (forward: read x, write y; backward: read x and dy, write dx),
   and the kernel's speed-up over XLA (fwd / fwd+bwd). Shapes: (16, 2048, 1792) (Mamba-2's
   xBC at d_model 768, packed documents as in the LM train step) and (8, 2048, 1536)
   (Mamba-1's x at d_model 768), float32 and bfloat16, K = 4, silu, a bias.
   `--block_c 256 [--tiles_per_cta N]` adds kernel rows with other ConvTuning knobs;
   `--chain` also times the convolution followed by a gated RMS norm and a reduction
   (the elementwise chain of the LM step whose layout XLA chose badly).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import device_name, print_table, time_fn
from ssm.ops import causal_conv1d
from ssm.ops import causal_conv_pallas

WARMUP, ITERS = 3, 20
TAPS = 4


def rel(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


def inputs(b, l, c, dtype, key=0):
  k = jax.random.split(jax.random.key(key), 4)
  x = jax.random.normal(k[0], (b, l, c), jnp.float32).astype(dtype)
  w = 0.5 * jax.random.normal(k[1], (TAPS, c), jnp.float32)
  bias = 0.1 * jax.random.normal(k[2], (c,), jnp.float32)
  ct = jax.random.normal(k[3], (b, l, c), jnp.float32).astype(dtype)
  return x, w, bias, ct


def packed_ids(b, l, doc=300):
  """Documents of about `doc` tokens, offset per row."""
  t = jnp.arange(l)[None, :] + 37 * jnp.arange(b)[:, None]
  return (t // doc).astype(jnp.int32)


def conv_fn(impl, chain=False, tuning=None):
  def f(x, w, bias, seg):
    if impl == "pallas" and tuning is not None:
      y = causal_conv_pallas.causal_conv1d_pallas(x, w, bias, segment_ids=seg, activation="silu",
                                                  interpret=jax.default_backend() != "gpu",
                                                  tuning=tuning)
    else:
      y = causal_conv1d(x, w, bias, segment_ids=seg, activation="silu", impl=impl)
    if not chain:
      return y
    yf = y.astype(jnp.float32)  # a gated RMS norm over the channels, as Mamba-2's tail
    yf = yf * jax.lax.rsqrt(jnp.mean(yf * yf, axis=-1, keepdims=True) + 1e-5)
    return (yf * jax.nn.silu(x.astype(jnp.float32))).astype(x.dtype)
  return f


_JITTED = {}


def jitted(f):
  """(jit(f), jit(vjp of f w.r.t. x, w, bias)), built once per function."""
  if f not in _JITTED:
    def grads(ct, x, w, bias, seg):
      _, pull = jax.vjp(lambda x, w, bias: f(x, w, bias, seg), x, w, bias)
      return pull(ct)
    _JITTED[f] = (jax.jit(f), jax.jit(grads))
  return _JITTED[f]


def check(name, kern, ref, args, ct):
  (fj, gj), (rj, rgj) = jitted(kern), jitted(ref)
  t0 = time.perf_counter()
  y = jax.block_until_ready(fj(*args))
  g = jax.block_until_ready(gj(ct, *args))
  print(f"{name}: first calls (compile) {time.perf_counter() - t0:.1f} s", flush=True)
  y_ref, g_ref = rj(*args), rgj(ct, *args)
  errs = [rel(y, y_ref)] + [rel(a, b) for a, b in zip(g, g_ref)]
  if not np.all(np.isfinite(errs)):
    raise FloatingPointError(f"{name}: non-finite error {errs}")
  return dict(check=name, y=errs[0], dx=errs[1], dw=errs[2], dbias=errs[3])


def bench(label, shape, dtype, impls, args, ct):
  b, l, c = shape
  size = b * l * c * jnp.dtype(dtype).itemsize
  fwd_bytes, bwd_bytes = 2 * size, 3 * size
  rows, base = [], {}
  for name, f in impls:
    fj, gj = jitted(f)
    t_f = 1e3 * time_fn(fj, *args, warmup=WARMUP, iters=ITERS)
    t_b = 1e3 * time_fn(gj, ct, *args, warmup=WARMUP, iters=ITERS)
    base.setdefault(name, (t_f, t_b))
    rows.append(dict(op=label, impl=name, shape=f"B{b} L{l} C{c}", dtype=jnp.dtype(dtype).name,
                     fwd_ms=t_f, fwdbwd_ms=t_b, fwd_GBs=fwd_bytes / t_f / 1e6,
                     fwdbwd_GBs=(fwd_bytes + bwd_bytes) / t_b / 1e6))
  if "xla" in base:
    for r in rows:
      xf, xb = base["xla"]
      r["x_vs_xla"] = f"{xf / r['fwd_ms']:.2f} / {xb / r['fwdbwd_ms']:.2f}"
  return rows


def main():
  global WARMUP, ITERS  # pylint: disable=global-statement
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--chain", action="store_true", help="also time conv + gated norm")
  parser.add_argument("--block_c", type=int, nargs="*", default=[],
                      help="also time the kernel with these ConvTuning.block_c (e.g. 256)")
  parser.add_argument("--tiles_per_cta", type=int, default=None,
                      help="ConvTuning.tiles_per_cta of the --block_c variants")
  opts = parser.parse_args()
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {device_name()}",
        flush=True)
  if opts.quick:
    WARMUP, ITERS = 1, 2
    cases = [((1, 64, 256), True), ((1, 48, 256), False)]
  else:
    cases = [((16, 2048, 1792), True), ((8, 2048, 1536), False)]
  checks, rows = [], []
  for shape, packed in cases:
    for dtype in (jnp.float32, jnp.bfloat16):
      x, w, bias, ct = inputs(*shape, dtype)
      seg = packed_ids(shape[0], shape[1]) if packed else None
      args = (x, w, bias, seg)
      label = "conv+silu" + (" packed" if packed else "")
      kern, ref = conv_fn("pallas"), conv_fn("xla")
      checks.append(check(f"{label} {shape} {jnp.dtype(dtype).name}", kern, ref, args, ct))
      print(checks[-1], flush=True)
      variants = [("xla", ref), ("pallas", kern)]
      for block in opts.block_c:
        tun = causal_conv_pallas.ConvTuning(block_c=block, **(
            {} if opts.tiles_per_cta is None else dict(tiles_per_cta=opts.tiles_per_cta)))
        variants.append((f"pallas c{block}", conv_fn("pallas", tuning=tun)))
      rows += bench(label, shape, dtype, variants, args, ct)
      if opts.chain:
        rows += bench(label + " +norm", shape, dtype,
                      [("xla", conv_fn("xla", True)), ("pallas", conv_fn("pallas", True))],
                      args, ct)
  print_table(checks, ["check", "y", "dx", "dw", "dbias"], title="\nkernel vs XLA (rel. error)")
  print_table(rows, ["op", "impl", "shape", "dtype", "fwd_ms", "fwdbwd_ms", "fwd_GBs",
                     "fwdbwd_GBs", "x_vs_xla"],
              title="\nms (median); GB/s of the bytes a fused kernel moves; x_vs_xla = speed-up "
                    "fwd / fwd+bwd")


if __name__ == "__main__":
  main()
