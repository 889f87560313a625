"""Mamba-2's SSD: the Pallas Mosaic GPU kernel against the XLA chunked path and the public
kernels (jax-linear-attention's simple_gla, mamba_ssm's Triton mamba_chunk_scan_combined).

    python -m benchmarks.ssd              # checks + tables (run on a Hopper GPU)
    python -m benchmarks.ssd --quick      # tiny shapes, interpreted kernel (CPU smoke run)

1. Correctness at benchmark size: relative errors ||x - ref|| / ||ref|| of the output, the
   final state and the gradients of x, dt, A, B, C, D, h0 of impl="pallas" against the
   XLA path in float32 with full-precision products, on fresh random inputs (one check
   with packed documents); a NaN or an error above 3e-2 stops the run.
2. B=4, L=2048, 64 heads of P=64, N=128, one group of B/C (a Mamba-2 1.3B layer), bf16
   and float32: forward and forward + backward ms.
3. The 32k-token sweep, L = 2k .. 64k with B = max(1, 32k / L), bf16 (flat is the goal).
4. The Mamba-2 mixer (d_model 768, L 2048, B 8; float32, and bf16 compute with float32
   parameters) on the XLA path and on the kernel, forward and forward + backward (all
   parameters).
5. Lightning attention (B=8, H=16, L=4096, D=64, bf16) on its own kernel and on the SSD
   kernel (dt = 1, A = log_decay, B = k, C = q, one group per head).

JAX rows are timed pipelined (`benchmarks.common.time_fn_pipelined`); the torch peer with
triton's do_bench. fwd+bwd differentiates a sum of the output with respect to every input
(ours: x, dt, A, B, C; jla: q, k, v, g with v = dt x and g = dt A formed in the timed
function). "x ours" is a row's time over ours (above 1: ours is faster).
"""

import argparse
import functools
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# --quick on the CPU interprets the warp-specialised kernel: see tests/conftest.py.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_cpu_enable_concurrency_optimized_scheduler=false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import device_name, print_table, time_fn_pipelined  # noqa: E402
from ssm.lightning import lightning_log_decay  # noqa: E402
from ssm.ops import lightning_attention, ssd  # noqa: E402

F32, BF16 = jnp.float32, jnp.bfloat16


def _try_import(name):
  try:
    return __import__(name, fromlist=["_"])
  except Exception as err:  # pylint: disable=broad-except
    return f"n/a ({type(err).__name__}: {str(err)[:120]})"


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def inputs(b, l, h, g, p, n, dtype, seed=0):
  """Fresh random SSD inputs: x, dt (softplus of N(-1, 1)), A = -exp(N(0, 1)) as in a
  trained layer, B and C scaled so that C . B is O(1)."""
  k = jax.random.split(jax.random.key(seed), 7)
  x = jax.random.normal(k[0], (b, l, h, p), F32).astype(dtype)
  dt = jax.nn.softplus(jax.random.normal(k[1], (b, l, h), F32) - 1.0)
  A = -jnp.exp(jax.random.normal(k[2], (h,), F32))
  Bm = (jax.random.normal(k[3], (b, l, g, n), F32) / n ** 0.5).astype(dtype)
  Cm = (jax.random.normal(k[4], (b, l, g, n), F32) / n ** 0.5).astype(dtype)
  D = jax.random.normal(k[5], (h,), F32)
  h0 = jax.random.normal(k[6], (b, h, p, n), F32) / 4
  return x, dt, A, Bm, Cm, D, h0


def check(b, l, h, g, p, n, dtype, packed):
  """Relative errors of the kernel against the float32 XLA path (output, state, grads)."""
  x, dt, A, Bm, Cm, D, h0 = inputs(b, l, h, g, p, n, dtype, seed=l + h)
  seg = None
  if packed:  # random document lengths (mean 300 tokens), boundaries anywhere
    rng = np.random.default_rng(l)
    cuts = np.cumsum(rng.integers(1, 600, l // 100 + 2))
    seg = jnp.asarray(np.searchsorted(cuts, np.arange(l), side="right")[None].repeat(b, 0),
                      jnp.int32)
  keys = jax.random.split(jax.random.key(1), 2)
  wy = jax.random.normal(keys[0], x.shape, F32)
  ws = jax.random.normal(keys[1], h0.shape, F32)

  def loss(impl):
    def f(x, dt, A, Bm, Cm, D, h0):
      if impl == "xla":
        x, Bm, Cm = (v.astype(F32) for v in (x, Bm, Cm))
      y, s = ssd(x, dt, A, Bm, Cm, D=D, h0=h0, segment_ids=seg, return_state=True, impl=impl)
      return jnp.sum(wy * y.astype(F32)) + jnp.sum(ws * s), (y, s)
    return jax.jit(jax.value_and_grad(f, argnums=range(7), has_aux=True))

  args = (x, dt, A, Bm, Cm, D, h0)
  with jax.default_matmul_precision("highest"):
    (_, (y_r, s_r)), g_r = loss("xla")(*args)
  (_, (y_p, s_p)), g_p = loss("pallas")(*args)
  row = {"check": f"B{b} L{l} H{h} G{g} P{p} N{n} {jnp.dtype(dtype).name}"
                  + (" packed" if packed else ""),
         "y": rel(y_p, y_r), "state": rel(s_p, s_r)}
  for name, u, v in zip(("dx", "ddt", "dA", "dB", "dC", "dD", "dh0"), g_p, g_r):
    row[name] = rel(u, v)
  finite = all(bool(jnp.all(jnp.isfinite(v))) for v in (y_p, s_p, *g_p))
  bad = (not finite) or any(v > 3e-2 for k, v in row.items() if k != "check")
  return row, bad


def jax_pair(f, args, argnums, iters, warmup):
  """fwd ms and fwd+bwd ms of f(*args) -> y (pipelined device time)."""
  fwd = jax.jit(f)
  bwd = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(F32)), argnums=argnums))
  row = {}
  for key, fn in (("fwd ms", fwd), ("fwd+bwd ms", bwd)):
    try:
      row[key] = 1e3 * time_fn_pipelined(fn, *args, calls=iters, warmup=warmup)
    except Exception as err:  # pylint: disable=broad-except
      text = str(err)
      row[key] = "OOM" if "RESOURCE_EXHAUSTED" in text else f"failed: {type(err).__name__}"
      print(f"  {key}: {type(err).__name__}: {text[:400]}", flush=True)
  return row


def mamba_ssm_pair(mod, x, dt, A, Bm, Cm, chunk):
  """mamba_ssm's mamba_chunk_scan_combined forward / forward + backward ms (do_bench)."""
  import torch  # pylint: disable=import-outside-toplevel
  import triton.testing  # pylint: disable=import-outside-toplevel
  tt = lambda a, dtype: torch.from_numpy(np.asarray(a.astype(F32))).to("cuda", dtype)
  tdt = torch.bfloat16 if x.dtype == BF16 else torch.float32
  tx, tB, tC = (tt(a, tdt).requires_grad_() for a in (x, Bm, Cm))
  tdt_, tA = tt(dt, torch.float32).requires_grad_(), tt(A, torch.float32).requires_grad_()
  fn = functools.partial(mod.mamba_chunk_scan_combined, chunk_size=chunk)

  def fwd():
    with torch.no_grad():
      return fn(tx, tdt_, tA, tB, tC)

  def fwd_bwd():
    y = fn(tx, tdt_, tA, tB, tC)
    y.float().sum().backward()

  try:
    return {"fwd ms": triton.testing.do_bench(fwd, return_mode="median"),
            "fwd+bwd ms": triton.testing.do_bench(fwd_bwd, return_mode="median")}
  except Exception as err:  # pylint: disable=broad-except
    print(f"  mamba_ssm: {type(err).__name__}: {str(err)[:400]}", flush=True)
    return {"fwd ms": "OOM" if "out of memory" in str(err).lower() else "failed"}


def ssd_rows(b, l, h, g, p, n, dtype, iters, warmup, peers, on_gpu, xla=True):
  x, dt, A, Bm, Cm, _, _ = inputs(b, l, h, g, p, n, dtype)
  rows = []

  def add(name, row):
    rows.append(dict(op=name, B=b, L=l) | row)
    print(f"  {jnp.dtype(dtype).name} {rows[-1]}", flush=True)

  ours = lambda impl: lambda x, dt, A, Bm, Cm: ssd(x, dt, A, Bm, Cm, impl=impl)
  add("ssd pallas", jax_pair(ours("pallas"), (x, dt, A, Bm, Cm), range(5), iters, warmup))
  if xla:
    add("ssd xla (chunk 64)", jax_pair(ours("xla"), (x, dt, A, Bm, Cm), range(5), iters,
                                       warmup))
  jla = peers.get("jla")
  if on_gpu and not isinstance(jla, str) and dtype == BF16:
    def jla_fn(x, dt, A, Bm, Cm):
      v = (x.astype(F32) * dt[..., None]).astype(x.dtype)
      q, k = Cm, Bm
      if not GROUPED_JLA:
        q, k = (jnp.repeat(a, h // g, axis=2) for a in (Cm, Bm))
      return jla.linear_attention("simple_gla", q, k, v, g=dt * A, scale=1.0,
                                  impl="mosaic_gpu")[0]
    add("jla simple_gla" + (" (grouped q/k)" if GROUPED_JLA else ""),
        jax_pair(jla_fn, (x, dt, A, Bm, Cm), range(5), iters, warmup))
  else:
    add("jla simple_gla", {"fwd ms": "n/a" if on_gpu and dtype == BF16 else "-"})
  mss = peers.get("mamba_ssm")
  if on_gpu and not isinstance(mss, str):
    add("mamba_ssm triton (chunk 256)", mamba_ssm_pair(mss, x, dt, A, Bm, Cm, 256))
  else:
    add("mamba_ssm triton", {"fwd ms": "n/a"})
  base = rows[0]
  for row in rows:
    for key, ratio in (("fwd ms", "x ours fwd"), ("fwd+bwd ms", "x ours f+b")):
      if isinstance(row.get(key), float) and isinstance(base.get(key), float):
        row[ratio] = row[key] / base[key]
    if isinstance(row.get("fwd ms"), float):
      row["Mtok/s"] = b * l / row["fwd ms"] / 1e3
  return rows


GROUPED_JLA = True  # jla's Mosaic simple_gla takes q, k with fewer heads than v


def mixer_rows(b, l, d_model, iters, warmup):
  """The Mamba-2 mixer on the XLA path and on the kernel, float32 and bf16 compute
  (model.dtype: bf16 activations and matmuls, float32 parameters, states and norms)."""
  from models import build_mixer  # pylint: disable=import-outside-toplevel
  rows = []
  for dtype in ("float32", "bfloat16"):
    x = jax.random.normal(jax.random.key(3), (b, l, d_model), F32).astype(dtype)
    group = []
    for impl in ("xla", "pallas"):
      graphdef, params = nnx.split(build_mixer("mamba2", d_model, rngs=nnx.Rngs(0), impl=impl,
                                               dtype=dtype))

      def f(params, x, graphdef=graphdef):
        return nnx.merge(graphdef, params)(x)
      row = jax_pair(f, (params, x), (0, 1), iters, warmup)
      group.append(dict(op=f"mamba2 mixer {impl}", dtype=dtype, B=b, L=l) | row)
      print(f"  {group[-1]}", flush=True)
    for row in group:
      for key, ratio in (("fwd ms", "x ours fwd"), ("fwd+bwd ms", "x ours f+b")):
        if isinstance(row.get(key), float) and isinstance(group[-1].get(key), float):
          row[ratio] = row[key] / group[-1][key]
    rows += group
  return rows


def lightning_rows(b, l, h, d, iters, warmup):
  k = jax.random.split(jax.random.key(4), 3)
  q, kk, v = ((jax.random.normal(k[i], (b, l, h, d), F32) / d ** 0.5).astype(BF16)
              for i in range(3))
  ld = jnp.asarray(lightning_log_decay(h), F32)
  ones = jnp.ones((b, l, h), F32)
  # dt = 1 and the decays are arguments, not closed-over constants: XLA would fold the
  # SSD path's gate vectors at compile time (and take seconds to), which no model gets.
  own = lambda q, kk, v, ones, ld: lightning_attention(q, kk, v, ld, impl="pallas")
  via_ssd = lambda q, kk, v, ones, ld: ssd(v, ones, ld, kk, q, impl="pallas")
  rows = []
  outs = {}
  for name, f in (("lightning own kernel", own), ("lightning on the ssd kernel", via_ssd)):
    outs[name] = jax.jit(f)(q, kk, v, ones, ld)
    rows.append(dict(op=name, B=b, L=l)
                | jax_pair(f, (q, kk, v, ones, ld), (0, 1, 2), iters, warmup))
    print(f"  {rows[-1]}", flush=True)
  rows[1]["err vs own"] = rel(*outs.values())
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
  parser.add_argument("--iters", type=int, default=None)
  parser.add_argument("--skip-checks", action="store_true")
  parser.add_argument("--sections", type=str, default="main,sweep,mixer,lightning",
                      help="comma-separated: main, sweep, mixer, lightning")
  parser.add_argument("--lengths", type=str, default=None,
                      help="comma-separated sweep lengths (default 2048..65536)")
  args = parser.parse_args(argv)
  quick, sections = args.quick, set(args.sections.split(","))
  on_gpu = jax.default_backend() == "gpu"
  iters = args.iters or (1 if quick else 20)
  warmup = 1 if quick else 3
  print(f"device: {device_name()}  jax {jax.__version__}", flush=True)
  peers = {"jla": _try_import("jla.ops"),
           "mamba_ssm": _try_import("mamba_ssm.ops.triton.ssd_combined")}
  for name, mod in peers.items():
    print(f"{name}: {mod if isinstance(mod, str) else 'ok'}", flush=True)

  # 1. correctness
  checks = ([(1, 100, 2, 1, 64, 64, BF16, True)] if quick else
            [(4, 2048, 64, 1, 64, 128, BF16, False), (4, 2048, 64, 1, 64, 128, F32, False),
             (2, 1000, 8, 2, 128, 64, BF16, True), (1, 8192, 16, 1, 64, 128, BF16, True)])
  rows, failed = [], False
  for cfg in [] if args.skip_checks else checks:
    row, bad = check(*cfg)
    print(f"  {row}", flush=True)
    rows.append(row)
    failed |= bad
  cols = ["check", "y", "state", "dx", "ddt", "dA", "dB", "dC", "dD", "dh0"]
  if rows:
    print_table(rows, cols, title="\nrelative error vs the float32 XLA path")
  if failed:
    raise SystemExit("ssd pallas: correctness check FAILED (see the table above)")

  cols = ["op", "B", "L", "fwd ms", "fwd+bwd ms", "x ours fwd", "x ours f+b", "Mtok/s"]
  tables = []
  h, g, p, n = (2, 1, 64, 64) if quick else (64, 1, 64, 128)
  if "main" in sections:
    b, l = (1, 256) if quick else (4, 2048)
    for dtype in (BF16,) if quick else (BF16, F32):
      tables.append((f"\nB={b} L={l} H={h} P={p} N={n} G={g} {jnp.dtype(dtype).name}",
                     ssd_rows(b, l, h, g, p, n, dtype, iters, warmup, peers, on_gpu)))
  if "sweep" in sections:
    total = 512 if quick else 32768
    lengths = [128, 256] if quick else [2048, 4096, 8192, 16384, 32768, 65536]
    if args.lengths:
      lengths = [int(v) for v in args.lengths.split(",")]
    sweep = []
    for l in lengths:
      sweep += ssd_rows(max(1, total // l), l, h, g, p, n, BF16, iters, warmup, peers, on_gpu,
                        xla=False)
    ours = [r["fwd ms"] * total / (r["B"] * r["L"]) for r in sweep
            if r["op"] == "ssd pallas" and isinstance(r["fwd ms"], float)]
    ours_fb = [r["fwd+bwd ms"] * total / (r["B"] * r["L"]) for r in sweep
               if r["op"] == "ssd pallas" and isinstance(r.get("fwd+bwd ms"), float)]
    flat = (f"  (ours per {total} tokens, max/min: fwd {max(ours) / min(ours):.2f}, fwd+bwd "
            f"{max(ours_fb) / min(ours_fb):.2f})" if ours and ours_fb else "")
    tables.append((f"\n{total}-token sweep (B = {total} / L), H={h} P={p} N={n}, bf16{flat}",
                   sweep))
  if "mixer" in sections:
    tables.append(("\nMamba-2 mixer, float32 and bf16 compute (x ours: over the kernel path)",
                   mixer_rows(*((1, 128, 64) if quick else (8, 2048, 768)), iters, warmup)))
  if "lightning" in sections and not quick:
    tables.append(("\nlightning attention B=8 H=16 L=4096 D=64 bf16",
                   lightning_rows(8, 4096, 16, 64, iters, warmup)))
  for title, rows in tables:
    extra = (["err vs own"] if "lightning" in title else []) + (["dtype"] if "mixer" in title else [])
    print_table(rows, cols + extra, title=title)


if __name__ == "__main__":
  main()
