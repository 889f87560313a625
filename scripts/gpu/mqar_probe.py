r"""Time the MQAR sweep's train step per program and replica count (run on a GPU).

    python scripts/gpu/mqar_probe.py [--mixers=transformer,mamba] [--d_models=64,128,256] \
        [--seq_len=256] [--replicas=4,8,12] [--steps=50] [--caching=none,grm,ssc] \
        [--segment_size=32] [--quick]

For each (mixer, caching, d_model) it builds the sweep's program for the first cell of that
program in configs/mqar.py SWEEP (--quick: SWEEP_QUICK, a CPU smoke test), compiles the step ahead of time (the compile time is
printed) and times `--steps` pipelined steps at each replica count R (the lrs repeated
R / 4 times, as more seeds would). What it decides: if ms per replica falls well as R
grows, the GPU is idle at the sweep's R = 4 and training a program's pair counts together
(K x 4 replicas: scripts/mqar_suite.py sweep --pack_pairs) would pay; if it stays flat,
the step is compute-bound and it would not. With --caching it also gives what each memory-
caching variant costs against its mixer alone (attention takes "none" only; other
pairings are skipped), in seconds rather than the sweep's 6,250-step cells.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import mqar
from scripts import mqar_suite


def probe(mixer: str, d_model: int, seq_len: int, replicas: int, steps: int, *,
          caching: str = "none", segment_size: int = 32, base: dict = mqar.SWEEP) -> dict | None:
  """The row of one (mixer, caching, d_model, seq_len, R), or None when the sweep has no
  such cell (attention with caching)."""
  reps = max(replicas // len(base["lrs"]), 1)
  grid = dict(base, mixers=(mixer,), caching=(caching,), segment_sizes=(segment_size,),
              d_models=(d_model,), seq_lens=(seq_len,), seeds=tuple(range(reps)))
  cells = mqar_suite.sweep_cells(grid)
  if not cells:
    return None
  cell = cells[0]
  config = mqar_suite.cell_config(cell, grid)
  program = mqar_suite._Program(config, mqar_suite.load_task_spec(config)[0])  # noqa: SLF001
  compile_s = program.compile(config, grid)
  step = program.step_fn(config, grid)
  seeds = [int(s) for _ in grid["lrs"] for s in grid["seeds"]]
  params, opt_state = program.init(seeds)
  one = mqar_suite._mqar_arrays(config, "train", mqar_suite.query_slots(grid))  # noqa: SLF001
  data = jax.device_put({k: v[None] for k, v in one.items()})  # one cell's set (K = 1)
  group = jnp.zeros(len(seeds), jnp.int32)
  lrs = jnp.asarray([float(lr) for lr in grid["lrs"] for _ in grid["seeds"]], jnp.float32)
  n, bs = data["inputs"].shape[1], config.train.batch_size
  idx = [jnp.asarray(mqar_suite.batch_indices(s, n, bs, 0), jnp.int32) for s in range(steps)]
  params, opt_state, loss, _ = step(params, opt_state, lrs, program.rest, data, idx[0], group)
  jax.block_until_ready(loss)
  best = np.inf
  for _ in range(3):
    t = time.perf_counter()
    for i in idx:
      params, opt_state, loss, _ = step(params, opt_state, lrs, program.rest, data, i, group)
    jax.block_until_ready(loss)
    best = min(best, (time.perf_counter() - t) / steps)
  return dict(variant=cell.variant, d_model=d_model, seq_len=seq_len, replicas=len(seeds),
              compile_s=compile_s, ms_per_step=best * 1e3,
              ms_per_replica=best * 1e3 / len(seeds))


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--mixers", default="transformer,mamba")
  p.add_argument("--d_models", default="64,128,256")
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--replicas", default="4,8,12")
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--caching", default="none", help="none,grm,ssc: each timed per mixer")
  p.add_argument("--segment_size", type=int, default=32)
  p.add_argument("--quick", action="store_true", help="configs/mqar.py SWEEP_QUICK (CPU)")
  args = p.parse_args(argv)
  base = mqar.SWEEP_QUICK if args.quick else mqar.SWEEP
  print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}")
  print(f"{'variant':<24}{'d':>5}{'L':>6}{'R':>4}{'compile s':>11}{'ms/step':>10}{'ms/replica':>12}")
  rows = []
  for mixer in args.mixers.split(","):
    for caching in args.caching.split(","):
      for d in (int(x) for x in args.d_models.split(",")):
        for r in (int(x) for x in args.replicas.split(",")):
          row = probe(mixer, d, args.seq_len, r, args.steps, caching=caching,
                      segment_size=args.segment_size, base=base)
          if row is None:
            print(f"{mixer}+{caching}: not in the sweep (skipped)", flush=True)
            break
          rows.append(row)
          print(f"{row['variant']:<24}{d:>5}{args.seq_len:>6}{row['replicas']:>4}"
                f"{row['compile_s']:>11.1f}{row['ms_per_step']:>10.2f}"
                f"{row['ms_per_replica']:>12.3f}", flush=True)
  return rows


if __name__ == "__main__":
  main()
