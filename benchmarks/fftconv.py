"""Benchmark of the long FFT convolution: Monarch Pallas kernel vs jnp.fft vs torch.fft.

    python -m benchmarks.fftconv                  # GPU: checks, sweep, S4D layer, tables
    python -m benchmarks.fftconv --quick          # tiny CPU smoke run (interpreted kernel)
    python -m benchmarks.fftconv --lengths 8192 --dtypes float32

First correctness at benchmark size: relative error ||x - ref|| / ||ref|| of y, du, dk
for the Pallas path against the XLA path (f32 reference; bf16 inputs are compared with
the f32 convolution of the same bf16 values); NaN fails loudly. Then, for each L (B * H
= 8192 channels: B = 8, H = 1024), forward and forward+backward (du, dk from one vjp)
device times (calls queued back to back, waited for once: time_fn_pipelined), with the
achieved bandwidth against the bytes that must move:

    fwd       read u, write y                  2 B L H itemsize
    fwd+bwd   fwd + read dy, u, write du       5 B L H itemsize   (k, dk are H L: ignored)

torch.fft.rfft/irfft (autograd for the backward) runs where PyTorch with CUDA imports;
bf16 inputs go through float32 there (torch's FFT has no bf16). Last, S4D layers
(models.build_mixer("s4d", ...)) forward+backward with impl "xla" vs "pallas": a causal
B16 L4096 H256 one and the ListOps recipe's bidirectional B50 L2000 H128 N64 one.
Targets on an H100 at B=8, H=1024, L=8192 f32: fwd <= 1.0 ms, fwd+bwd <= 2.0 ms.
"""

import argparse
import functools
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a file: make the repo root importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import device_name, print_table, time_fn_pipelined
from ssm.ops import fft_conv

COLUMNS = ["L", "dtype", "impl", "fwd ms", "fwd GB/s", "fwd+bwd ms", "fwd+bwd GB/s",
           "err y", "err du", "err dk"]


def _torch():
  try:
    import torch
    if not torch.cuda.is_available():
      return None
    return torch
  except Exception:  # noqa: BLE001 -- not installed or broken: the column prints n/a
    return None


def rel(a, b) -> float:
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  if not np.all(np.isfinite(a)):
    raise FloatingPointError("non-finite values in the Pallas output")
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@functools.cache
def make_fns(impl):
  fwd = jax.jit(lambda u, k: fft_conv(u, k, impl=impl))

  @jax.jit
  def fwd_bwd(u, k, dy):
    y, vjp = jax.vjp(lambda u, k: fft_conv(u, k, impl=impl), u, k)
    return (y,) + vjp(dy)
  return fwd, fwd_bwd


def inputs(b, seq_len, h, dtype, seed=0):
  ku, kk, kd = jax.random.split(jax.random.key(seed), 3)
  u = jax.random.normal(ku, (b, seq_len, h), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (h, seq_len), jnp.float32) * jnp.exp(
      -jnp.arange(seq_len) / (seq_len / 8)) / 8   # a decaying SSM-like kernel
  dy = jax.random.normal(kd, (b, seq_len, h), jnp.float32).astype(dtype)
  return u, k, dy


def bench_jax(b, seq_len, h, dtype, warmup, iters, impls=("pallas", "xla")) -> list[dict]:
  u, k, dy = inputs(b, seq_len, h, dtype)
  itemsize = jnp.dtype(dtype).itemsize
  bytes_fwd, bytes_fb = 2 * b * seq_len * h * itemsize, 5 * b * seq_len * h * itemsize
  # the f32 XLA result of the same (rounded) inputs is the reference for every impl
  _, ref_fb = make_fns("xla")
  ref = ref_fb(u.astype(jnp.float32), k, dy.astype(jnp.float32))
  rows = []
  for impl in impls:
    fwd, fwd_bwd = make_fns(impl)
    out = fwd_bwd(u, k, dy)
    errs = [rel(o, r) for o, r in zip(out, ref)]
    t_f = time_fn_pipelined(fwd, u, k, calls=iters, repeats=3, warmup=warmup)
    t_fb = time_fn_pipelined(fwd_bwd, u, k, dy, calls=iters, repeats=3, warmup=warmup)
    rows.append({"L": seq_len, "dtype": jnp.dtype(dtype).name, "impl": impl,
                 "fwd ms": 1e3 * t_f, "fwd GB/s": bytes_fwd / t_f / 1e9,
                 "fwd+bwd ms": 1e3 * t_fb, "fwd+bwd GB/s": bytes_fb / t_fb / 1e9,
                 "err y": errs[0], "err du": errs[1], "err dk": errs[2]})
  return rows


def bench_torch(torch, b, seq_len, h, dtype, warmup, iters) -> dict:
  row = {"L": seq_len, "dtype": jnp.dtype(dtype).name, "impl": "torch.fft"}
  itemsize = jnp.dtype(dtype).itemsize
  dev = "cuda"
  u = torch.randn(b, seq_len, h, device=dev)
  k = torch.randn(h, seq_len, device=dev)
  dy = torch.randn(b, seq_len, h, device=dev)
  n = 2 * seq_len

  def conv(u, k):
    uf = torch.fft.rfft(u, n=n, dim=1)
    kf = torch.fft.rfft(k, n=n, dim=1)
    return torch.fft.irfft(uf * kf.T[None], n=n, dim=1)[:, :seq_len]

  def fwd():
    with torch.no_grad():
      return conv(u, k)

  def fwd_bwd():
    uu = u.detach().requires_grad_(True)
    kk = k.detach().requires_grad_(True)
    return torch.autograd.grad(conv(uu, kk), (uu, kk), dy)

  def timed(fn):  # as time_fn_pipelined: `iters` calls queued, waited for once
    for _ in range(warmup):
      fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
      t0 = time.perf_counter()
      for _ in range(iters):
        fn()
      torch.cuda.synchronize()
      times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)

  t_f, t_fb = timed(fwd), timed(fwd_bwd)
  row.update({"fwd ms": 1e3 * t_f, "fwd GB/s": 2 * b * seq_len * h * itemsize / t_f / 1e9,
              "fwd+bwd ms": 1e3 * t_fb,
              "fwd+bwd GB/s": 5 * b * seq_len * h * itemsize / t_fb / 1e9})
  del u, k, dy
  torch.cuda.empty_cache()
  return row


def bench_layer(b, seq_len, d_model, warmup, iters, **options) -> list[dict]:
  """S4D layer (models.build_mixer) forward+backward, impl xla vs pallas (device time)."""
  from flax import nnx
  from models import build_mixer
  x = jax.random.normal(jax.random.key(3), (b, seq_len, d_model), jnp.float32)
  rows, outs = [], {}
  for impl in ("xla", "pallas"):
    mixer = build_mixer("s4d", d_model, rngs=nnx.Rngs(0), impl=impl, **options)
    graphdef, params, rest = nnx.split(mixer, nnx.Param, ...)

    @jax.jit
    def fwd_bwd(params, x, graphdef=graphdef, rest=rest):
      def loss(params, x):
        y = nnx.merge(graphdef, params, rest)(x, deterministic=True)
        return jnp.mean(y.astype(jnp.float32) ** 2)
      return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

    outs[impl] = fwd_bwd(params, x)
    ms = 1e3 * time_fn_pipelined(fwd_bwd, params, x, calls=iters, repeats=3, warmup=warmup)
    rows.append({"layer": "s4d" + ("-bidir" if options.get("bidirectional") else ""),
                 "B": b, "L": seq_len, "H": d_model, "impl": impl, "fwd+bwd ms": ms})
  rows[-1]["err dx"] = rel(outs["pallas"][1][1], outs["xla"][1][1])
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
  parser.add_argument("--lengths", default=None, help="comma-separated L (default sweep)")
  parser.add_argument("--dtypes", default=None, help="default float32,bfloat16 (--quick: float32)")
  parser.add_argument("--iters", type=int, default=None)
  parser.add_argument("--layers", choices=("on", "off", "only"), default="on",
                      help="the S4D layer comparison (split a GPU session across calls)")
  parser.add_argument("--check-len", type=int, default=None,
                      help="length of the full-size correctness check (0: skip; default 8192)")
  args = parser.parse_args(argv)

  quick = args.quick
  b, h = (2, 8) if quick else (8, 1024)
  iters = args.iters or (1 if quick else 20)
  warmup = 0 if quick else 3
  dtype_arg = args.dtypes or ("float32" if quick else "float32,bfloat16")
  dtypes = [jnp.dtype(d) for d in dtype_arg.split(",") if d]
  if args.lengths:
    lengths = {d: [int(x) for x in args.lengths.split(",")] for d in dtypes}
  elif quick:
    lengths = {d: [256] for d in dtypes}
  else:  # every distinct kernel configuration compiles (20 s - 2 min): a sparse sweep
    lengths = {jnp.dtype(jnp.float32): [256, 1024, 4096, 8192, 16384, 65536],
               jnp.dtype(jnp.bfloat16): [1024, 8192]}
  torch = None if quick else _torch()
  print(f"jax {jax.__version__} on {device_name()}; B={b}, H={h}; torch "
        f"{'n/a' if torch is None else torch.__version__}", flush=True)

  if args.layers == "only":
    lengths, dtypes = {}, []
  # 1. correctness at benchmark size (the headline shape), loud on NaN
  check_len = args.check_len if args.check_len is not None else (256 if quick else 8192)
  if check_len:
    print(f"correctness at B={b}, L={check_len}, H={h} (Pallas vs XLA f32):")
  for dtype in (dtypes if check_len else []):
    row = bench_jax(b, check_len, h, dtype, warmup=0, iters=1, impls=("pallas",))[0]
    print(f"  {dtype.name}: rel err y {row['err y']:.2e}  du {row['err du']:.2e}  "
          f"dk {row['err dk']:.2e}", flush=True)

  # 2. the sweep
  rows = []
  for dtype in dtypes:
    for seq_len in lengths.get(dtype, []):
      try:
        rows += bench_jax(b, seq_len, h, dtype, warmup, iters)
      except Exception as e:  # noqa: BLE001 -- e.g. out of memory: report and go on
        if isinstance(e, FloatingPointError):
          raise
        print(f"  L={seq_len} {dtype.name}: failed ({type(e).__name__}: {str(e)[:300]})")
        continue
      if torch is not None:
        try:
          rows.append(bench_torch(torch, b, seq_len, h, dtype, warmup, iters))
        except Exception as e:  # noqa: BLE001
          rows.append({"L": seq_len, "dtype": dtype.name, "impl": f"torch.fft failed: {e}"[:60]})
      else:
        rows.append({"L": seq_len, "dtype": dtype.name, "impl": "torch.fft n/a"})
      for r in rows[-3:]:   # each row as it lands: a timeout loses nothing
        if r["L"] == seq_len and "fwd ms" in r:
          print(f"  L={seq_len} {dtype.name} {r['impl']}: fwd {r['fwd ms']:.3f} ms, "
                f"fwd+bwd {r['fwd+bwd ms']:.3f} ms", flush=True)

  # 3. an LRA-size layer before / after
  layer_rows = []
  if args.layers != "off":
    layer_rows = bench_layer(2 if quick else 16, 128 if quick else 4096, 8 if quick else 256,
                             warmup, iters)
    # the ListOps S4D recipe's layer (configs/lra/listops.py): batch 50, L 2000, H 128, N 64,
    # bidirectional (one circular convolution of size 4096 per channel on the Pallas path)
    layer_rows += bench_layer(2 if quick else 50, 100 if quick else 2000, 8 if quick else 128,
                              warmup, iters, d_state=64, bidirectional=True)

  if rows:
    print()
    print_table(rows, COLUMNS, title=f"fft_conv, B={b}, H={h}, {device_name()}")
  if layer_rows:
    print()
    print_table(layer_rows, ["layer", "B", "L", "H", "impl", "fwd+bwd ms", "err dx"],
                title="S4D mixer (build_mixer('s4d', H, impl=...)), forward+backward")
  head = [r for r in rows if r["L"] == 8192 and r["dtype"] == "float32" and r["impl"] == "pallas"]
  if head:
    print(f"\nheadline B=8 H=1024 L=8192 f32: fwd {head[0]['fwd ms']:.3f} ms (target <= 1.0), "
          f"fwd+bwd {head[0]['fwd+bwd ms']:.3f} ms (target <= 2.0)")
  return rows, layer_rows


if __name__ == "__main__":
  main()
