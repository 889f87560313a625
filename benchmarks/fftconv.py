"""Benchmark of the long FFT convolution: Monarch Pallas kernel vs jnp.fft vs torch.fft.

    python -m benchmarks.fftconv                  # GPU: checks, sweep, S4D layer, tables
    python -m benchmarks.fftconv --quick          # tiny CPU smoke run (interpreted kernel)
    python -m benchmarks.fftconv --lengths 8192 --dtypes float32
    python -m benchmarks.fftconv --check-classes  # every kernel size class vs jnp.fft
    python -m benchmarks.fftconv --layers off --rows-jsonl rows.jsonl   # rows as they land
    python -m benchmarks.fftconv --make-auto rows.jsonl fft_conv_auto.json

First correctness at benchmark size: relative error ||x - ref|| / ||ref|| of y, du, dk
for the Pallas path against the XLA path (f32 reference; bf16 inputs are compared with
the f32 convolution of the same bf16 values); NaN fails loudly. Then, for each L (B * H
= 8192 channels: B = 8, H = 1024; default sweep L = 256 .. 65536, f32 and bf16),
forward and forward+backward (du, dk from one vjp) device times (calls queued back to
back, waited for once: time_fn_pipelined), with the achieved bandwidth against the
bytes that must move:

    fwd       read u, write y                  2 B L H itemsize
    fwd+bwd   fwd + read dy, u, write du       5 B L H itemsize   (k, dk are H L: ignored)

torch.fft.rfft/irfft (autograd for the backward) runs where PyTorch with CUDA imports;
bf16 inputs go through float32 there (torch's FFT has no bf16). --rows-jsonl appends
each row as one JSON line when it lands (a timeout loses nothing); --make-auto turns
such rows into the table that fft_conv(impl="auto") reads (ssm/ops/fft_conv_auto.json:
the FFT sizes where the kernel beat jnp.fft forward AND forward+backward, per device
kind and dtype). --bank: the LTI layers' bank (fft_conv_bank_xla) at the ListOps and
Text S4D shapes, method "fft" (forward transforms only) against "irfft". Last, S4D
layers (models.build_mixer("s4d", ...)) forward+backward on the FFT bank ("xla"), the
Pallas kernel and the chunked recurrence (ssm/ops/diag_conv.py; full f32 and TF32):
a causal B16 L4096 H256 one and the ListOps recipe's bidirectional B50 L2000 H128 N64 one.
Targets on the H200 at B=8, H=1024: every L, fwd and fwd+bwd >= 1.5x faster than
jnp.fft; L=8192 f32: fwd <= 1.0 ms, fwd+bwd <= 2.0 ms.
"""

import argparse
import functools
import json
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
  """Rows for each impl (errors against the f32 XLA path, then times); an impl that fails
  or returns non-finite values gives a row "<impl> FAILED" and the others still run."""
  u, k, dy = inputs(b, seq_len, h, dtype)
  itemsize = jnp.dtype(dtype).itemsize
  bytes_fwd, bytes_fb = 2 * b * seq_len * h * itemsize, 5 * b * seq_len * h * itemsize
  # the f32 XLA result of the same (rounded) inputs is the reference for every impl
  _, ref_fb = make_fns("xla")
  ref = ref_fb(u.astype(jnp.float32), k, dy.astype(jnp.float32))
  rows = []
  for impl in impls:
    fwd, fwd_bwd = make_fns(impl)
    try:
      out = fwd_bwd(u, k, dy)
      errs = [rel(o, r) for o, r in zip(out, ref)]
    except Exception as e:  # noqa: BLE001 -- NaN, compile or launch failure: a row that says so
      print(f"  L={seq_len} {jnp.dtype(dtype).name} {impl}: FAILED {type(e).__name__}: "
            f"{str(e)[:300]}", flush=True)
      rows.append({"L": seq_len, "dtype": jnp.dtype(dtype).name, "impl": f"{impl} FAILED"})
      continue
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


# The LTI layers' bank (fft_conv_bank_xla) at the LRA recipes' shapes: (name, B, L, H),
# one two-sided kernel per channel (bidirectional S4D, kernel length L).
BANK_SHAPES = (("listops s4d", 50, 2000, 128), ("text s4d", 16, 4096, 256))


def bench_bank(name, b, seq_len, h, warmup, iters) -> list[dict]:
  """fft_conv_bank_xla forward and forward+backward (du, dk_causal, dk_anticausal) by each
  method ("irfft": jnp.fft.irfft and autodiff, the reference; "fft": real FFTs, the
  inverse by packing; "pairs": two sequences per complex FFT; both with custom VJPs);
  errors and speed-ups against "irfft"."""
  from ssm.ops.fft_conv import BANK_METHODS, fft_conv_bank_xla
  ks = jax.random.split(jax.random.key(5), 4)
  u = jax.random.normal(ks[0], (b, seq_len, h), jnp.float32)
  kc, ka = (jax.random.normal(k, (1, h, seq_len), jnp.float32) / seq_len ** 0.5 for k in ks[1:3])
  dy = jax.random.normal(ks[3], (b, seq_len, 1, h), jnp.float32)
  rows, ref = [], None
  for method in ("irfft",) + tuple(m for m in BANK_METHODS if m != "irfft"):
    f = functools.partial(fft_conv_bank_xla, method=method)
    fwd = jax.jit(f)

    @jax.jit
    def fwd_bwd(u, kc, ka, dy, f=f):  # the output too, as a training step needs it
      y, vjp = jax.vjp(f, u, kc, ka)
      return y, *vjp(dy)

    out = fwd_bwd(u, kc, ka, dy)
    ref = out if ref is None else ref
    t_f = time_fn_pipelined(fwd, u, kc, ka, calls=iters, repeats=3, warmup=warmup)
    t_fb = time_fn_pipelined(fwd_bwd, u, kc, ka, dy, calls=iters, repeats=3, warmup=warmup)
    errs = [rel(a, r) for a, r in zip(out, ref)]
    rows.append({"bank": name, "B": b, "L": seq_len, "H": h, "method": method,
                 "fwd ms": 1e3 * t_f, "fwd+bwd ms": 1e3 * t_fb,
                 "err y": errs[0], "err du": errs[1], "err dk": max(errs[2:]),
                 "speed-up": (f"x{rows[0]['fwd ms'] / (1e3 * t_f):.2f} / "
                              f"x{rows[0]['fwd+bwd ms'] / (1e3 * t_fb):.2f}") if rows else "x1"})
    del out
  return rows


# The S4D layer's convolution paths: (row name, LTIMixer impl). The chunked recurrence
# (ssm/ops/diag_conv.py) was a third: 2.2-2.4x slower than the bank in the LRA S4D train
# steps on an H100 (results/diag_conv_h100.txt), so the layer no longer offers it.
LAYER_PATHS = (("xla", "xla"), ("pallas", "pallas"))


def bench_layer(b, seq_len, d_model, warmup, iters, **options) -> list[dict]:
  """S4D layer (models.build_mixer) forward+backward on each of LAYER_PATHS (device time),
  with the relative error of dx against the FFT bank's ("xla")."""
  from flax import nnx
  from models import build_mixer
  x = jax.random.normal(jax.random.key(3), (b, seq_len, d_model), jnp.float32)
  rows, outs = [], {}
  for name, impl in LAYER_PATHS:
    mixer = build_mixer("s4d", d_model, rngs=nnx.Rngs(0), impl=impl, **options)
    graphdef, params, rest = nnx.split(mixer, nnx.Param, ...)

    @jax.jit
    def fwd_bwd(params, x, graphdef=graphdef, rest=rest):
      def loss(params, x):
        y = nnx.merge(graphdef, params, rest)(x, deterministic=True)
        return jnp.mean(y.astype(jnp.float32) ** 2)
      return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

    outs[name] = fwd_bwd(params, x)
    ms = 1e3 * time_fn_pipelined(fwd_bwd, params, x, calls=iters, repeats=3, warmup=warmup)
    rows.append({"layer": "s4d" + ("-bidir" if options.get("bidirectional") else ""),
                 "B": b, "L": seq_len, "H": d_model, "impl": name, "fwd+bwd ms": ms,
                 "err dx": (rel(outs[name][1][1], outs["xla"][1][1]) if name != "xla"
                            else 0.0)})
  return rows


# One case per kernel size class of the sweep (ssm/ops/fft_conv_pallas.py), small B, H:
# (dtype, B, L, H, Lk, circular, with D and gate). Causal L = 256 .. 65536 are FFT sizes
# 512 .. 131072: two-stage tiles (c = 16, 32, 64), 3 stages in one CTA (8192, 16384),
# the two 16384-point halves (32768) and the XLA outer step (65536, 131072); bf16 on
# one of each kernel; then circular and the fused skip and gate.
CHECK_CASES = ([("float32", 2, 256 << i, 16, 256 << i, False, False) for i in range(9)]
               + [("bfloat16", 2, seq_len, 16, seq_len, False, False)
                  for seq_len in (1024, 4096, 8192, 16384, 32768)]
               + [("float32", 3, 1000, 16, 1000, False, True),
                  ("bfloat16", 2, 3000, 16, 3000, False, True),
                  ("float32", 2, 4096, 16, 4096, True, False),
                  ("float32", 2, 16384, 8, 16384, True, True),
                  ("float32", 2, 32768, 4, 32768, True, False)])


def read_status(path) -> dict:
  """--status lines -> {(fft size, dtype): "ok" or not}: a size is ok when every case of it
  ended "ok" (a case whose last line is "started" never finished: a hang or a timeout)."""
  last = {}
  try:
    with open(path) as f:
      for line in f:
        if line.strip():
          r = json.loads(line)
          last[(r["n"], r["dtype"], r["case"])] = r["status"]
  except FileNotFoundError:
    pass
  out = {}
  for (n, dtype, _), s in last.items():
    if out.get((n, dtype), "ok") == "ok":
      out[(n, dtype)] = s
  return out


def skip_pallas(checked: dict, seq_len: int, dtype: str) -> bool:
  from ssm.ops.fft_conv_pallas import fft_size
  return checked.get((fft_size(seq_len, False), dtype), "ok") != "ok"


def check_classes(dtypes, cases=CHECK_CASES, status_path=None) -> bool:
  """Every size class of the kernel against jnp.fft (the f32 XLA path of the same rounded
  inputs): relative errors of y, du, dk (and dD, dgate) printed one line per case. False
  if any is non-finite or above 1e-4 (f32) / 3e-2 (bf16)."""
  ok = True
  wanted = {jnp.dtype(d).name for d in dtypes}
  for case in cases:
    if case[0] not in wanted:
      continue
    dtype, (b, seq_len, h, k_len, circular, skip) = jnp.dtype(case[0]), case[1:]
    ku, kk, kd, kg, kD = jax.random.split(jax.random.key(seq_len), 5)
    u = jax.random.normal(ku, (b, seq_len, h), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (h, k_len), jnp.float32) / np.sqrt(k_len)
    dy = jax.random.normal(kd, (b, seq_len, h), jnp.float32).astype(dtype)
    extra = {}
    if skip:
      extra = {"gate": jax.random.normal(kg, u.shape, jnp.float32).astype(dtype),
               "D": jax.random.normal(kD, (h,), jnp.float32)}
    names = list(extra)

    def run(impl, u, k, dy, *rest, names=names, circular=circular):
      f = lambda u, k, *r: fft_conv(u, k, circular=circular, impl=impl,
                                    **dict(zip(names, r)))
      y, vjp = jax.vjp(f, u, k, *rest)
      return (y,) + vjp(dy)
    tag = (f"B{b} L{seq_len} H{h} Lk{k_len} {jnp.dtype(dtype).name}"
           f"{' circular' if circular else ''}{' D gate' if skip else ''}")
    from ssm.ops.fft_conv_pallas import fft_size
    key = {"n": fft_size(seq_len, circular), "dtype": jnp.dtype(dtype).name, "case": tag}

    def status(s, key=key):
      if status_path:
        with open(status_path, "a") as f:
          f.write(json.dumps({**key, "status": s}) + "\n")
    status("started")
    try:
      got = jax.jit(functools.partial(run, "pallas"))(u, k, dy, *extra.values())
      f32 = lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x
      ref = jax.jit(functools.partial(run, "xla"))(
          f32(u), k, f32(dy), *(f32(x) for x in extra.values()))
      errs = [rel(g, r) for g, r in zip(got, ref)]
    except Exception as e:  # noqa: BLE001 -- report every case
      print(f"  FAIL {tag}: {type(e).__name__}: {str(e)[:400]}", flush=True)
      status("fail")
      ok = False
      continue
    tol = 3e-2 if jnp.dtype(dtype) == jnp.bfloat16 else 1e-4
    good = all(e < tol for e in errs)
    status("ok" if good else "bad")
    ok &= good
    names_out = ["y", "du", "dk"] + names
    print(f"  {'ok  ' if good else 'BAD '} {tag}: " +
          "  ".join(f"{n} {e:.2e}" for n, e in zip(names_out, errs)), flush=True)
  return ok


def auto_from_rows(rows) -> dict:
  """Rows (dicts of bench_jax: L, dtype, impl, fwd ms, fwd+bwd ms, device) -> the
  fft_conv_auto.json table: per device kind and dtype, the causal FFT sizes where the
  kernel beat jnp.fft both forward and forward+backward (never a slower path)."""
  from ssm.ops.fft_conv_pallas import fft_size
  by = {}
  for r in rows:
    if r.get("impl") in ("pallas", "xla") and "fwd+bwd ms" in r:
      by.setdefault((r.get("device", device_name()), r["dtype"], r["L"]), {})[r["impl"]] = r
  table = {}
  for (kind, dtype, seq_len), pair in sorted(by.items()):
    if len(pair) < 2:
      continue
    p, x = pair["pallas"], pair["xla"]
    if p["fwd ms"] < x["fwd ms"] and p["fwd+bwd ms"] < x["fwd+bwd ms"]:
      table.setdefault(kind, {}).setdefault(dtype, []).append(fft_size(seq_len, False))
  return table


def write_auto(rows_path: str, out_path: str) -> dict:
  """The committed table (ssm/ops/fft_conv_auto.json) with the measured device kinds'
  entries replaced by `auto_from_rows` of the rows in rows_path, written to out_path."""
  from ssm.ops import fft_conv_pallas
  with open(rows_path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  measured = {r["device"] for r in rows if "device" in r}
  table = auto_from_rows(rows)
  with open(fft_conv_pallas.AUTO_TABLE) as f:
    doc = json.load(f)
  sources = doc.setdefault("_sources", {})
  for kind in measured:
    doc[kind] = table.get(kind, {})
    sources[kind] = (f"benchmarks/fftconv.py --make-auto, {time.strftime('%Y-%m-%d')}, "
                     f"jax {jax.__version__}, B=8 H=1024 causal: sizes where the kernel beat "
                     "jnp.fft forward and forward+backward")
  with open(out_path, "w") as f:
    json.dump(doc, f, indent=2)
  print(f"wrote {out_path}: {json.dumps(table)}")
  return table


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
  parser.add_argument("--lengths", default=None, help="comma-separated L (default sweep)")
  parser.add_argument("--dtypes", default=None, help="default float32,bfloat16 (--quick: float32)")
  parser.add_argument("--iters", type=int, default=None)
  parser.add_argument("--layers", choices=("on", "off", "only"), default="on",
                      help="the S4D layer comparison (split a GPU session across calls)")
  parser.add_argument("--bank", choices=("on", "off", "only"), default="on",
                      help="the LTI layers' bank, forward FFTs only vs irfft")
  parser.add_argument("--check-len", type=int, default=None,
                      help="length of the full-size correctness check (0: skip; default 8192)")
  parser.add_argument("--check-classes", action="store_true",
                      help="only: every kernel size class against jnp.fft (small B, H)")
  parser.add_argument("--rows-jsonl", default=None, help="append each row as a JSON line")
  parser.add_argument("--make-auto", nargs=2, metavar=("ROWS_JSONL", "OUT_JSON"),
                      help="only: the fft_conv_auto.json table from measured rows")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--status", default=None,
                      help="--check-classes: append each case's status as a JSON line")
  parser.add_argument("--skip-from", default=None,
                      help="sweep: skip the kernel at FFT sizes whose --status line says "
                           "failed, bad or started-but-not-finished (a hang)")
  args = parser.parse_args(argv)
  if args.make_auto:
    return write_auto(*args.make_auto)

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
  else:
    lengths = {d: [256 << i for i in range(9)] for d in dtypes}   # 256 .. 65536
  torch = None if (quick or args.no_torch) else _torch()
  print(f"jax {jax.__version__} on {device_name()}; B={b}, H={h}; torch "
        f"{'n/a' if torch is None else torch.__version__}", flush=True)

  if args.check_classes:
    print("every kernel size class against jnp.fft (f32 XLA of the same inputs):", flush=True)
    ok = check_classes(dtypes, status_path=args.status)
    print("check-classes:", "all ok" if ok else "FAILURES", flush=True)
    return ok
  if "only" in (args.layers, args.bank):
    lengths, dtypes = {}, []
  bank_rows = []
  if args.bank != "off":
    shapes = [(n, 2, 100, 8) for n, *_ in BANK_SHAPES[:1]] if quick else BANK_SHAPES
    for shape in shapes:
      bank_rows += bench_bank(*shape, warmup, iters)
      print(f"  bank {shape}: {bank_rows[-1]['speed-up']} fwd / fwd+bwd", flush=True)
  bank_table = functools.partial(
      print_table, bank_rows, ["bank", "B", "L", "H", "method", "fwd ms", "fwd+bwd ms", "err y",
                               "err du", "err dk", "speed-up"],
      title=f"fft_conv_bank_xla (the LTI layers' convolution), f32, {device_name()}")
  if args.bank == "only":
    bank_table()
    return bank_rows
  # 1. correctness at benchmark size (the headline shape), loud on NaN
  check_len = args.check_len if args.check_len is not None else (256 if quick else 8192)
  if check_len:
    print(f"correctness at B={b}, L={check_len}, H={h} (Pallas vs XLA f32):")
  for dtype in (dtypes if check_len else []):
    row = bench_jax(b, check_len, h, dtype, warmup=0, iters=1, impls=("pallas",))[0]
    print(f"  {dtype.name}: rel err y {row['err y']:.2e}  du {row['err du']:.2e}  "
          f"dk {row['err dk']:.2e}", flush=True)

  # 2. the sweep
  checked = read_status(args.skip_from) if args.skip_from else {}
  rows = []
  for dtype in dtypes:
    for seq_len in lengths.get(dtype, []):
      impls = ("pallas", "xla")
      if skip_pallas(checked, seq_len, dtype.name):
        print(f"  L={seq_len} {dtype.name} pallas: skipped (its size class failed or hung in "
              f"--check-classes)", flush=True)
        impls = ("xla",)
      try:
        rows += bench_jax(b, seq_len, h, dtype, warmup, iters, impls=impls)
      except Exception as e:  # noqa: BLE001 -- e.g. out of memory: report and go on
        print(f"  L={seq_len} {dtype.name}: failed ({type(e).__name__}: {str(e)[:300]})")
        continue
      if torch is not None:
        try:
          rows.append(bench_torch(torch, b, seq_len, h, dtype, warmup, iters))
        except Exception as e:  # noqa: BLE001
          rows.append({"L": seq_len, "dtype": dtype.name, "impl": f"torch.fft failed: {e}"[:60]})
      else:
        rows.append({"L": seq_len, "dtype": dtype.name, "impl": "torch.fft n/a"})
      landed = [r for r in rows[-3:] if r["L"] == seq_len and r["dtype"] == dtype.name]
      xla = [r for r in landed if r["impl"] == "xla"]
      for r in landed:   # each row as it lands: a timeout loses nothing
        r["device"] = device_name()
        if args.rows_jsonl:
          with open(args.rows_jsonl, "a") as f:
            f.write(json.dumps(r) + "\n")
        if "fwd ms" in r:
          speed = ""
          if xla and r["impl"] != "xla":
            speed = (f"  (x{xla[0]['fwd ms'] / r['fwd ms']:.2f} / "
                     f"x{xla[0]['fwd+bwd ms'] / r['fwd+bwd ms']:.2f} vs jnp.fft)")
          print(f"  L={seq_len} {dtype.name} {r['impl']}: fwd {r['fwd ms']:.3f} ms, "
                f"fwd+bwd {r['fwd+bwd ms']:.3f} ms{speed}", flush=True)

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
    rows.sort(key=lambda r: (r["dtype"] != "float32", r["L"]))
    print_table(rows, COLUMNS, title=f"fft_conv, B={b}, H={h}, {device_name()}")
  if layer_rows:
    print()
    print_table(layer_rows, ["layer", "B", "L", "H", "impl", "fwd+bwd ms", "err dx"],
                title="S4D mixer (build_mixer('s4d', H, impl=...)), forward+backward")
  if bank_rows:
    print()
    bank_table()
  head = [r for r in rows if r["L"] == 8192 and r["dtype"] == "float32" and r["impl"] == "pallas"]
  if head:
    print(f"\nheadline B=8 H=1024 L=8192 f32: fwd {head[0]['fwd ms']:.3f} ms (target <= 1.0), "
          f"fwd+bwd {head[0]['fwd+bwd ms']:.3f} ms (target <= 2.0)")
  return rows, layer_rows


if __name__ == "__main__":
  main()
