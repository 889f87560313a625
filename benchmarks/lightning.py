"""Lightning attention: the Pallas Mosaic GPU kernel against XLA, causal softmax
attention and the public kernels (jax-linear-attention's simple_gla, fla's Triton
chunk_lightning_attn).

    python -m benchmarks.lightning            # checks + tables (run on an H100)
    python -m benchmarks.lightning --quick    # tiny shapes, interpreted kernel (CPU smoke run)

1. Correctness at benchmark size: relative errors ||x - ref|| / ||ref|| of the output,
   final state and gradients (q, k, v, log_decay, h0) of impl="pallas" against the XLA
   path in float32 on the same inputs; any NaN or an error above 3e-2 stops the run.
2. B=8, H=16, L=4096, Dk=Dv=64, bf16 and float32: forward and forward + backward ms.
3. The 32k-token sweep, L = 2k .. 64k with B = 32k / L, bf16 (flat is the goal).

JAX rows are timed pipelined (`benchmarks.common.time_fn_pipelined`: `--iters` calls queued
back to back, waited for once, median of 5): device time per call, without the 0.1-0.2 ms of
host launch cost that a single waited Mosaic call shows. fla's rows use triton's do_bench.

Rows: ours ("pallas"), the XLA block form, jax.nn.dot_product_attention(is_causal=True)
(cuDNN on a GPU), jla simple_gla (impl "mosaic_gpu") with g = log_decay per token and
scale 1, fla chunk_lightning_attn (torch, timed with triton's do_bench; its decay comes
from layer_idx/num_layers, here 0 of 1, the same slopes as ours). Peers that do not
import print "n/a". "x ours" is a row's time over ours (above 1: ours is faster).
"""

import argparse
import functools
import os

# Leave GPU memory to torch (fla) as well: JAX would otherwise take 75% up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import device_name, print_table, time_fn_pipelined  # noqa: E402
from benchmarks.lightning_xla import fwd_and_grad, is_oom, qkv, temp_mb  # noqa: E402
from ssm.lightning import lightning_log_decay  # noqa: E402
from ssm.ops import lightning_attention  # noqa: E402
from ssm.ops.lightning_attention import lightning_attention_xla  # noqa: E402


def _try_import(name):
  try:
    return __import__(name, fromlist=["_"])
  except Exception as err:  # pylint: disable=broad-except  (missing wheel, no GPU, ...)
    return f"{type(err).__name__}: {err}"


# ----------------------------------------------------------------------------- checks

def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(b, l, h, dk, dv, dtype, with_h0, tol=3e-2):
  """Kernel vs the float32 XLA path: prints and returns the relative errors."""
  keys = jax.random.split(jax.random.key(l + dk), 5)
  q, k = (jax.random.normal(kk, (b, l, h, dk)).astype(dtype) / dk ** 0.5 for kk in keys[:2])
  v = jax.random.normal(keys[2], (b, l, h, dv)).astype(dtype)
  h0 = jax.random.normal(keys[3], (b, h, dk, dv)) / 4 if with_h0 else None
  log_decay = jnp.asarray(lightning_log_decay(h), jnp.float32)
  cot_o = jax.random.normal(keys[4], (b, l, h, dv))

  def loss(impl):
    def f(q, k, v, log_decay, h0):
      if impl == "pallas":
        o, s = lightning_attention(q, k, v, log_decay, h0=h0, return_state=True, impl="pallas")
      else:
        with jax.default_matmul_precision("highest"):
          o, s = lightning_attention_xla(q.astype(jnp.float32), k.astype(jnp.float32),
                                         v.astype(jnp.float32), log_decay, h0)
      return jnp.sum(o.astype(jnp.float32) * cot_o) + jnp.sum(s) / dv, (o, s)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4) if with_h0 else (0, 1, 2, 3),
                                      has_aux=True))

  args = (q, k, v, log_decay, h0)
  (_, (o, s)), g = loss("pallas")(*args)
  (_, (o_ref, s_ref)), g_ref = loss("xla")(*args)
  names = ["o", "state", "dq", "dk", "dv", "dlog_decay", "dh0"]
  errs = dict(zip(names, [rel(o, o_ref), rel(s, s_ref)] + [rel(x, y) for x, y in zip(g, g_ref)]))
  finite = all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in [o, s, *g])
  row = dict(check=f"B={b} L={l} H={h} Dk={dk} Dv={dv} {jnp.dtype(dtype).name}"
             f"{' h0' if with_h0 else ''}") | errs
  # d log_decay sums (t + 1)(q.dq - k.dk) over all tokens, terms that nearly cancel, so the
  # kernel's bf16 operands show up amplified there: a looser bound, still printed.
  bad = (not finite) or any(e > (10 * tol if n == "dlog_decay" else tol) for n, e in errs.items())
  return row, bad, finite


# ----------------------------------------------------------------------------- timing

_OUTPUTS = {}


def jax_pair(f, args, iters, warmup, keep_output=None):
  """(fwd ms, fwd+bwd ms) of a JAX function of (q, k, v) -> o; the forward's output is
  kept under `keep_output` (for the error column of the sweep)."""
  fwd, bwd = fwd_and_grad(f)
  row = {}
  if keep_output is not None:
    _OUTPUTS[keep_output] = fwd(*args)
  for key, fn in (("fwd ms", fwd), ("fwd+bwd ms", bwd)):
    try:
      row[key] = 1e3 * time_fn_pipelined(fn, *args, calls=iters, warmup=warmup)
    except Exception as err:  # pylint: disable=broad-except
      row[key] = "OOM" if is_oom(err) else f"failed: {type(err).__name__}"
      print(f"  {key}: {type(err).__name__}: {str(err)[:300]}")
  return row


def fla_pair(fla_mod, b, l, h, d, dtype_name):
  """fla chunk_lightning_attn forward / forward + backward ms (triton do_bench)."""
  import torch  # pylint: disable=import-outside-toplevel
  import triton.testing  # pylint: disable=import-outside-toplevel
  tdt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
  mk = lambda: (torch.randn(b, l, h, d, device="cuda", dtype=torch.float32) / d).to(tdt)
  q, k, v = (mk().requires_grad_() for _ in range(3))
  do = torch.randn_like(q)
  fn = functools.partial(fla_mod.chunk_lightning_attn, layer_idx=0, num_layers=1, scale=1.0)

  def fwd():
    with torch.no_grad():
      return fn(q, k, v)[0]

  def fwd_bwd():
    o = fn(q, k, v)[0]
    torch.autograd.grad(o, (q, k, v), do)

  try:
    return {"fwd ms": triton.testing.do_bench(fwd), "fwd+bwd ms": triton.testing.do_bench(fwd_bwd)}
  except Exception as err:  # pylint: disable=broad-except
    msg = "OOM" if "out of memory" in str(err).lower() else f"failed: {type(err).__name__}"
    return {"fwd ms": msg}


def rows_for(b, l, h, d, dtype, iters, warmup, peers, on_gpu):
  q, k, v = qkv(b, l, h, d, dtype)
  log_decay = jnp.asarray(lightning_log_decay(h), jnp.float32)
  rows = []

  def add(name, row):
    rows.append(dict(op=name, B=b, L=l) | row)
    print(f"  {jnp.dtype(dtype).name} {rows[-1]}", flush=True)

  add("lightning pallas", jax_pair(functools.partial(
      lightning_attention, log_decay=log_decay, impl="pallas"), (q, k, v), iters, warmup,
      keep_output="pallas"))
  add("lightning xla", jax_pair(functools.partial(
      lightning_attention, log_decay=log_decay, impl="xla"), (q, k, v), iters, warmup,
      keep_output="xla"))
  rows[0]["err o"] = rel(_OUTPUTS.pop("pallas"), _OUTPUTS.pop("xla"))
  if on_gpu:
    impl = "cudnn" if jnp.dtype(dtype).itemsize == 2 else "xla"
    add(f"dot_product_attention {impl}", jax_pair(functools.partial(
        jax.nn.dot_product_attention, is_causal=True, implementation=impl),
        (q, k, v), iters, warmup))
  jla = peers.get("jla")
  if isinstance(jla, str) or jla is None:
    add("jla simple_gla", {"fwd ms": "n/a"})
  else:
    # g is an argument, not a closure: a (B, L, H) constant takes XLA seconds to fold.
    g = jnp.broadcast_to(log_decay, (b, l, h))

    def jla_fn(q, k, v, g):
      return jla.linear_attention("simple_gla", q, k, v, g=g, scale=1.0,
                                  impl="mosaic_gpu" if on_gpu else "auto")[0]
    add("jla simple_gla", jax_pair(jla_fn, (q, k, v, g), iters, warmup))
  fla = peers.get("fla")
  if isinstance(fla, str) or fla is None or not on_gpu:
    add("fla chunk_lightning_attn", {"fwd ms": "n/a"})
  else:
    add("fla chunk_lightning_attn", fla_pair(fla, b, l, h, d, jnp.dtype(dtype).name))
  ours = rows[0]
  for row in rows:
    for key, ratio in (("fwd ms", "x ours fwd"), ("fwd+bwd ms", "x ours f+b")):
      if isinstance(row.get(key), float) and isinstance(ours.get(key), float):
        row[ratio] = row[key] / ours[key]
    if isinstance(row.get("fwd ms"), float):
      row["Mtok/s"] = b * l / row["fwd ms"] / 1e3
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
  parser.add_argument("--iters", type=int, default=None)
  parser.add_argument("--skip-checks", action="store_true",
                      help="no correctness pass (each check compiles three kernels)")
  parser.add_argument("--lengths", type=str, default=None,
                      help="comma-separated sweep lengths (default 2048..65536)")
  parser.add_argument("--sweep-only", action="store_true",
                      help="only the length sweep (no checks, no B=8 L=4096 tables)")
  args = parser.parse_args(argv)
  quick = args.quick
  on_gpu = jax.default_backend() == "gpu"
  iters = args.iters or (1 if quick else 20)
  warmup = 1 if quick else 3
  print(f"device: {device_name()}  jax {jax.__version__}")
  peers = {"jla": _try_import("jla.ops"), "fla": _try_import("fla.ops.lightning_attn")}
  for name, mod in peers.items():
    print(f"{name}: {mod if isinstance(mod, str) else 'ok'}")

  # 1. correctness
  if quick:
    checks = [(1, 100, 2, 64, 64, jnp.bfloat16, True)]
  else:
    checks = [(8, 4096, 16, 64, 64, jnp.bfloat16, False),
              (8, 4096, 16, 64, 64, jnp.float32, True),
              (2, 1000, 4, 128, 128, jnp.bfloat16, True),
              (1, 32768, 16, 64, 64, jnp.bfloat16, True)]   # the sequence split in 8 segments
  rows, failed = [], False
  for cfg in ([] if args.skip_checks or args.sweep_only else checks):
    row, bad, finite = check(*cfg)
    rows.append(row)
    failed |= bad
    if not finite:
      print(f"NaN/inf in {row['check']}")
  cols = ["check", "o", "state", "dq", "dk", "dv", "dlog_decay", "dh0"]
  if rows:
    print_table(rows, cols, title="\nrelative error vs the float32 XLA path")
  if failed:
    raise SystemExit("lightning pallas: correctness check FAILED (see the table above)")

  # 2. the shape, 3. the 32k-token sweep
  cols = ["op", "B", "L", "fwd ms", "fwd+bwd ms", "x ours fwd", "x ours f+b", "Mtok/s",
          "err o"]
  tables = []
  b, l, h, d = (1, 256, 2, 64) if quick else (8, 4096, 16, 64)
  for dtype in () if args.sweep_only else (jnp.bfloat16,) if quick else (jnp.bfloat16, jnp.float32):
    tables.append((f"\nB={b} H={h} L={l} Dk=Dv={d} {jnp.dtype(dtype).name}",
                   rows_for(b, l, h, d, dtype, iters, warmup, peers, on_gpu)))
  total = 512 if quick else 32768
  lengths = ([128, 256] if quick else [2048, 4096, 8192, 16384, 32768, 65536])
  if args.lengths:
    lengths = [int(x) for x in args.lengths.split(",")]
  sweep = []
  for l in lengths:
    sweep += rows_for(max(1, total // l), l, h, d, jnp.bfloat16, iters, warmup, peers, on_gpu)
  # Per `total` tokens: at L > total the batch of one holds more tokens than the others.
  ours = [r["fwd ms"] * total / (r["B"] * r["L"]) for r in sweep
          if r["op"] == "lightning pallas" and isinstance(r["fwd ms"], float)]
  flat = f"  (ours fwd per {total} tokens, max/min: {max(ours) / min(ours):.2f})" if ours else ""
  tables.append((f"\n{total}-token sweep (B = {total} / L), H={h}, D={d}, bf16{flat}", sweep))
  for title, rows in tables:
    print_table(rows, cols, title=title)


if __name__ == "__main__":
  main()
