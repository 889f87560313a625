"""The Pallas scan kernels against the XLA path and the fastest public JAX kernel.

    python -m benchmarks.scan             # on a Hopper GPU: checks, then the tables
    python -m benchmarks.scan --quick     # tiny shapes, CPU smoke run (kernels interpreted)

1. Correctness at the benchmark sizes: the kernel against the XLA path on fresh
   random inputs, relative error ||x - ref|| / ||ref|| of the output, the final
   state and every gradient (a NaN fails the run).
2. Timings (median ms of the forward and of forward + backward, i.e. the VJP with a
   random cotangent and the gradients of every input; each call waited for, and
   pipelined: ms per call of back-to-back calls, which hides the host's launch cost), achieved GB/s against the
   bytes a fused kernel must move (each input read once and each output written
   once; the backward reads the inputs and the cotangent again and writes one
   gradient per input), the speed-up over XLA, and the ratio to the peer:
   jax-linear-attention 0.1.0's Mosaic GPU `mamba1` kernel (when `jla` imports).
   Shapes: selective_scan B=4 L=2048 D=1536 N=16 (f32, bf16; D skip, z gate,
   delta_bias, softplus); linear_scan B=8 L=4096 D=2048 (f32, bf16).
3. Long sequences: the selective scan forward and forward + backward at L=65536,
   B=1, D=1536 (peak device memory where the backend reports it).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import device_name, print_table, time_fn, time_fn_pipelined
from ssm.ops import linear_scan, selective_scan

WARMUP, ITERS = 3, 20


def nbytes(*arrays):
  return sum(a.size * a.dtype.itemsize for a in arrays)


def rel(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


def vjp_fn(f):
  def run(ct, *args):
    y, pull = jax.vjp(f, *args)
    return pull(ct)
  return run


def ss_inputs(b, l, d, n, dtype, key=0):
  k = jax.random.split(jax.random.key(key), 8)
  u = jax.random.normal(k[0], (b, l, d), dtype)
  delta = (0.5 * jax.random.normal(k[1], (b, l, d)) - 2.0).astype(dtype)
  z = jax.random.normal(k[2], (b, l, d), dtype)
  B = jax.random.normal(k[3], (b, l, n), jnp.float32)
  C = jax.random.normal(k[4], (b, l, n), jnp.float32)
  A = -jnp.exp(0.5 * jax.random.normal(k[5], (d, n)))
  D = jax.random.normal(k[6], (d,), jnp.float32)
  bias = 0.5 * jax.random.normal(k[7], (d,), jnp.float32)
  return (u, delta, A, B, C, D, z, bias)


def ss_fn(impl):
  return lambda u, delta, A, B, C, D, z, bias: selective_scan(
      u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True, impl=impl)


def jla_fn():
  try:
    import jla  # pylint: disable=import-outside-toplevel
    import jla.ops  # pylint: disable=import-outside-toplevel,unused-import
  except Exception:  # pylint: disable=broad-except
    return None

  def f(u, delta, A, B, C, D, z, bias):
    o, _ = jla.ops.linear_attention("mamba1", C, B, u, dt=delta, a=A, d=D, z=z, dt_bias=bias,
                                    dt_softplus=True, impl="mosaic_gpu")
    return o
  return f


def lin_inputs(b, l, d, dtype, key=1):
  k = jax.random.split(jax.random.key(key), 3)
  a = jax.random.uniform(k[0], (b, l, d), jnp.float32, 0.9, 1.0).astype(dtype)
  x = jax.random.normal(k[1], (b, l, d), jnp.float32).astype(dtype)
  h0 = jax.random.normal(k[2], (b, d), jnp.float32)
  return a, x, h0


def lin_fn(impl):
  return lambda a, x, h0: linear_scan(a, x, h0, impl=impl)


_JITTED = {}


def jitted(f):
  """(jit(f), jit(vjp of f)), built once per function so that the check and the timing
  share one compilation (the Mosaic GPU kernels take tens of seconds to lower)."""
  if f not in _JITTED:
    _JITTED[f] = (jax.jit(f), jax.jit(vjp_fn(f)))
  return _JITTED[f]


def check(name, f, ref, args, ct):
  """Relative errors of the output and the gradients of every input."""
  (fj, gj), (rj, rgj) = jitted(f), jitted(ref)
  t0 = time.perf_counter()
  y = jax.block_until_ready(fj(*args))
  t1 = time.perf_counter()
  g = jax.block_until_ready(gj(ct, *args))
  t2 = time.perf_counter()
  print(f"{name}: first call (compile) fwd {t1 - t0:.1f} s, fwd+bwd {t2 - t1:.1f} s", flush=True)
  y_ref, g_ref = rj(*args), rgj(ct, *args)
  errs = [rel(y, y_ref)] + [rel(a, b) for a, b in zip(g, g_ref)]
  if not np.all(np.isfinite(errs)):
    raise FloatingPointError(f"{name}: non-finite error {errs}")
  return dict(check=name, out=errs[0], grads=" ".join(f"{e:.1e}" for e in errs[1:]),
              worst=max(errs))


def timings(f, args, ct, pipelined=True):
  """ms: (fwd, fwd+bwd) each waited for, then (with `pipelined`) the same pipelined (launch
  cost hidden)."""
  fj, gj = jitted(f)
  pipe = dict(calls=ITERS, repeats=3, warmup=1)
  out = (1e3 * time_fn(fj, *args, warmup=WARMUP, iters=ITERS),
         1e3 * time_fn(gj, ct, *args, warmup=WARMUP, iters=ITERS))
  if pipelined:
    out += (1e3 * time_fn_pipelined(fj, *args, **pipe),
            1e3 * time_fn_pipelined(gj, ct, *args, **pipe))
  return out


def bench_rows(op, shape, dtype, impls, args, ct, fwd_bytes, bwd_bytes):
  rows, base = [], {}
  for name, f in impls:
    if f is None:
      rows.append(dict(op=op, impl=name, shape=shape, dtype=dtype, fwd_ms="n/a"))
      continue
    try:
      t_f, t_b, p_f, p_b = timings(f, args, ct)
    except Exception as e:  # pylint: disable=broad-except  (a peer that cannot run this call)
      rows.append(dict(op=op, impl=name, shape=shape, dtype=dtype,
                       fwd_ms=f"error: {type(e).__name__}"))
      print(f"{op} {name} {dtype}: {type(e).__name__}: {str(e)[:300]}")
      continue
    base[name] = (t_f, t_b)
    rows.append(dict(op=op, impl=name, shape=shape, dtype=dtype, fwd_ms=t_f, fwdbwd_ms=t_b,
                     pipe_fwd=p_f, pipe_fwdbwd=p_b,
                     fwd_GBs=fwd_bytes / t_f / 1e6, fwdbwd_GBs=(fwd_bytes + bwd_bytes) / t_b / 1e6))
  for r in rows:
    if "fwdbwd_ms" in r:
      if "xla" in base:
        r["x_vs_xla"] = f"{base['xla'][0] / r['fwd_ms']:.2f} / {base['xla'][1] / r['fwdbwd_ms']:.2f}"
      if "jla" in base:
        r["x_vs_jla"] = f"{base['jla'][0] / r['fwd_ms']:.2f} / {base['jla'][1] / r['fwdbwd_ms']:.2f}"
  return rows


def main():
  global WARMUP, ITERS  # pylint: disable=global-statement
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--skip-long", action="store_true")
  parser.add_argument("--skip-peer", action="store_true", help="do not time jla")
  parser.add_argument("--only", choices=("selective", "linear", "long"), default=None)
  opts = parser.parse_args()
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {device_name()}",
        flush=True)
  if opts.quick:
    WARMUP, ITERS = 1, 2
    ss_shape, lin_shape = (1, 64, 128, 16), (1, 64, 128)
  else:
    ss_shape, lin_shape = (4, 2048, 1536, 16), (8, 4096, 2048)
  peer = None if opts.skip_peer else jla_fn()
  checks, rows = [], []
  dtypes = (jnp.float32, jnp.bfloat16)
  if opts.only in (None, "selective"):
    b, l, d, n = ss_shape
    for dtype in dtypes:
      args = ss_inputs(b, l, d, n, dtype)
      u = args[0]
      ct = jax.random.normal(jax.random.key(9), u.shape, jnp.float32).astype(dtype)
      dn = jnp.dtype(dtype).name
      kern, ref = ss_fn("pallas"), ss_fn("xla")
      checks.append(check(f"selective_scan {dn}", kern, ref, args, ct))
      print(checks[-1], flush=True)
      u, delta, A, B, C, D, z, bias = args
      fwd = nbytes(u, delta, z, B, C) + nbytes(u)
      bwd = nbytes(u, delta, z, B, C, u) + nbytes(u, delta, z, B, C)
      rows += bench_rows("selective_scan", f"B{b} L{l} D{d} N{n}", dn,
                         [("xla", ref), ("pallas", kern),
                          ("jla", None if opts.quick else peer)], args, ct, fwd, bwd)
  if opts.only in (None, "linear"):
    b, l, d = lin_shape
    for dtype in dtypes:
      args = lin_inputs(b, l, d, dtype)
      a, x, _ = args
      ct = jax.random.normal(jax.random.key(8), a.shape, jnp.float32).astype(dtype)
      dn = jnp.dtype(dtype).name
      kern, ref = lin_fn("pallas"), lin_fn("xla")
      checks.append(check(f"linear_scan {dn}", kern, ref, args, ct))
      print(checks[-1], flush=True)
      fwd = nbytes(a, x, x)
      bwd = nbytes(a, x, x) + nbytes(a, x)  # read a, h, g; write da, db
      rows += bench_rows("linear_scan", f"B{b} L{l} D{d}", dn,
                         [("xla", ref), ("pallas", kern)],
                         args, ct, fwd, bwd)
  long_rows = []
  if not opts.quick and not opts.skip_long and opts.only in (None, "selective", "long"):
    for impl in ("pallas", "xla"):
      args = ss_inputs(1, 65536, 1536, 16, jnp.float32)
      ct = jax.random.normal(jax.random.key(9), args[0].shape, jnp.float32)
      try:
        t_f, t_b = timings(ss_fn(impl), args, ct, pipelined=False)
        stats = jax.devices()[0].memory_stats() or {}
        long_rows.append(dict(impl=impl, shape="B1 L65536 D1536 N16 f32", fwd_ms=t_f,
                              fwdbwd_ms=t_b, peak_GiB=stats.get("peak_bytes_in_use", 0) / 2**30))
      except Exception as e:  # pylint: disable=broad-except
        long_rows.append(dict(impl=impl, shape="B1 L65536 D1536 N16 f32",
                              fwd_ms=f"error: {type(e).__name__}"))
  print_table(checks, ["check", "out", "grads", "worst"],
              title="kernel vs XLA at the benchmark sizes (relative error; grads in argument order)")
  print_table(rows, ["op", "impl", "shape", "dtype", "fwd_ms", "fwdbwd_ms", "pipe_fwd",
                     "pipe_fwdbwd", "fwd_GBs", "fwdbwd_GBs", "x_vs_xla", "x_vs_jla"],
              title=f"scans on {device_name()} (ms per call waited for; pipe_*: ms per call of "
                    f"{ITERS} queued calls; x_vs_*: speed-up fwd / fwd+bwd; GB/s vs the minimum "
                    "bytes)")
  if long_rows:
    print_table(long_rows, ["impl", "shape", "fwd_ms", "fwdbwd_ms", "peak_GiB"],
                title="long sequence")


if __name__ == "__main__":
  main()
