"""A/B of the selective-scan backward kernels (issue 22) in one process: v1 (`_ss_bwd_call`,
the previous kernel), v2 (`_ss_bwd_call_v2`: delta cached, post-token history, pass 3
unrolled, double-buffered dB/dC store, reciprocals by rsqrt in it and its pre-pass) and v3
(v2 with the rotated state order and select-free dB/dC warp sums, N = 16 only). The forward
kernel is the same for all three (bwd = fwd+bwd - fwd).

    python3 scripts/gpu/ss_bwd_ab.py                      # B8 L2048 D1536 N16, bf16 and f32
    python3 scripts/gpu/ss_bwd_ab.py --variants=1,3       # fewer compiles
    python3 scripts/gpu/ss_bwd_ab.py --dtypes=bf16 --segments=4,8,16
    python3 scripts/gpu/ss_bwd_ab.py --quick              # CPU smoke run (interpreted, tiny)

Mamba-1's call (softplus, D skip, z gate, delta_bias; B and C (b, l, 1, n) float32 as the
layer gives them after the kernel's own cast). For each dtype: the forward alone, then
forward + backward (the VJP with a fixed random cotangent, every input's gradient) for each
variant and segment count; pipelined ms per call (benchmarks.common.time_fn_pipelined: 20
queued calls waited for once, median of 3), bwd = fwd+bwd - fwd. Before timing, the two
variants' gradients are compared with the first's (relative difference of every gradient:
all are kernels on this device, so this is rounding only; ~1e-6 in f32). Compiles: one forward
and one backward program per dtype and variant (the first call of each is timed and printed);
the first two variants run at every dtype before the third, and a row that would end past
--budget seconds (judged by the longest row so far) is skipped and named, so the run ends in
time.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import print_table, time_fn_pipelined
from benchmarks.scan import ss_inputs, vjp_fn
from ssm.ops import _impl
from ssm.ops import selective_scan_pallas as sp

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "bias")


def rel(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


def scan_fn(variant, segments, interpret):
  def f(u, delta, A, B, C, D, z, bias):
    return sp.selective_scan_pallas(u, delta, A, B[:, :, None], C[:, :, None], D, z=z,
                                    delta_bias=bias, delta_softplus=True, interpret=interpret,
                                    bwd_segments=segments, bwd_variant=variant)[0]
  return f


def first_call(fn, *args):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - t0


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--dtypes", default="bf16,f32")
  p.add_argument("--segments", default="auto", help="comma list of bwd_segments, or auto")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=2048)
  p.add_argument("--dim", type=int, default=1536)
  p.add_argument("--variants", default="1,3,2", help="backward variants, the first the baseline")
  p.add_argument("--quick", action="store_true", help="tiny shapes (a CPU smoke run)")
  p.add_argument("--budget", type=float, default=110.0,
                 help="rows that would end past this many seconds are skipped")
  args = p.parse_args()
  b, l, d, n = args.batch, args.length, args.dim, 16
  calls, repeats = 20, 3
  if args.quick:
    b, l, d, calls, repeats = 1, 64, 128, 1, 1
  interpret = _impl.interpret_mode()
  sms = _impl.num_sms()
  n_tiles = sp.pad_len(l) // sp.BWD_TILE
  auto = sp.bwd_segments_for(b, d, n_tiles, sms) if sms else 1
  segs = [auto] if args.segments == "auto" else [int(s) for s in args.segments.split(",")]
  variants = [int(v) for v in args.variants.split(",")]
  dtypes = {"bf16": jnp.bfloat16, "f32": jnp.float32}
  t_start = time.perf_counter()
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {sms} SMs; B{b} L{l} D{d} N{n}; "
        f"auto segments {auto}", flush=True)
  rows, state, longest, setup = [], {}, 0.0, 0.0

  def dtype_state(dname):  # inputs, cotangent and the forward's time, once per dtype
    if dname not in state:
      dtype = dtypes[dname]
      x = ss_inputs(b, l, d, n, dtype)
      ct = jax.random.normal(jax.random.key(9), x[0].shape, jnp.float32).astype(dtype)
      fwd = jax.jit(scan_fn(2, segs[0], interpret))
      _, c_fwd = first_call(fwd, *x)
      fwd_ms = 1e3 * time_fn_pipelined(fwd, *x, calls=calls, repeats=repeats)
      print(f"{dname} fwd {fwd_ms:.3f} ms (compile {c_fwd:.1f} s)", flush=True)
      state[dname] = dict(x=x, ct=ct, fwd_ms=fwd_ms, ref={})
    return state[dname]

  # The first two variants at every dtype first (the A/B the budget must cover), then the rest.
  jobs = [(dname, v, s_) for group in (variants[:2], variants[2:])
          for dname in args.dtypes.split(",") for s_ in segs for v in group]
  for dname, v, s in jobs:
    elapsed = time.perf_counter() - t_start
    need = longest + (0.0 if dname in state else setup)
    if elapsed + need > args.budget:
      print(f"skipped (--budget {args.budget:.0f} s: {elapsed:.0f} s gone, this row would take "
            f"~{need:.0f} s): {dname} v{v} segments {s}", flush=True)
      continue
    t_job = time.perf_counter()
    if dname not in state:
      dtype_state(dname)
      setup = max(setup, time.perf_counter() - t_job)
      t_job = time.perf_counter()
    st = dtype_state(dname)
    x, ct, fwd_ms = st["x"], st["ct"], st["fwd_ms"]
    g = jax.jit(vjp_fn(scan_fn(v, s, interpret)))
    grads_v, c_bwd = first_call(g, ct, *x)
    diff = ""
    if s not in st["ref"]:
      st["ref"][s] = grads_v
    else:  # against the first variant's gradients
      diff = " ".join(f"{k}:{rel(a.astype(jnp.float32), r.astype(jnp.float32)):.1e}"
                      for k, a, r in zip(NAMES, grads_v, st["ref"][s]))
    ms = 1e3 * time_fn_pipelined(g, ct, *x, calls=calls, repeats=repeats)
    rows.append(dict(dtype=dname, variant=f"v{v}", segments=s, fwd_ms=fwd_ms,
                     fwdbwd_ms=ms, bwd_ms=ms - fwd_ms, compile_s=c_bwd,
                     grad_rel_vs_first=diff or "-"))
    print(rows[-1], flush=True)
    longest = max(longest, time.perf_counter() - t_job)
  # speed-up of each row's backward over the first variant's at the same dtype and segments
  base = {(r["dtype"], r["segments"]): r["bwd_ms"] for r in rows if r["variant"] == f"v{variants[0]}"}
  for r in rows:
    b0 = base.get((r["dtype"], r["segments"]), float("nan"))
    r["bwd_x"] = b0 / r["bwd_ms"] if r["bwd_ms"] > 0 else float("nan")
  print_table(rows, ["dtype", "variant", "segments", "fwd_ms", "fwdbwd_ms", "bwd_ms", "bwd_x",
                     "compile_s"],
              title=f"selective scan B{b} L{l} D{d} N{n} (pipelined ms per call; bwd_x: "
                    f"v{variants[0]}'s bwd / this bwd); {time.perf_counter() - t_start:.0f} s in all")
  for r in rows:
    if r["grad_rel_vs_first"] != "-":
      print(f"{r['dtype']} {r['variant']} segments {r['segments']} grads vs v{variants[0]}: "
            f"{r['grad_rel_vs_first']}")


if __name__ == "__main__":
  main()
