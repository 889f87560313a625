"""A/B of the SSD chain kernel's SMEM ring on a GPU: CHAIN_CTAS_PER_SM = 1 (4 blocks in
flight, one CTA per SM) against 2 (a shallower ring, two CTAs interleaving on an SM), timed
in one process at the shapes the sequence split serves (64 heads of P 64, N 128, bf16), with
B 4, L 8192 (no split) as the sweep's reference row. --splits times given segment counts
instead (B:L:S,...; the ring as CHAIN_CTAS_PER_SM is set).

    PYTHONPATH=. python scripts/gpu/ssd_chain_ab.py [--values 1,2] [--splits 1:32768:8,...]
"""
import argparse

import jax
import jax.numpy as jnp

import ssm.ops.ssd_pallas as sp
from benchmarks.common import device_name, print_table
from benchmarks.ssd import inputs, jax_pair
from ssm.ops import ssd


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--values", default="1,2")
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--splits", default=None)
  args = parser.parse_args()
  print(f"device: {device_name()}  jax {jax.__version__}", flush=True)
  if args.splits:
    return splits(args)
  rows = []
  for b, l in ((4, 8192), (2, 16384), (1, 32768), (1, 65536)):
    x, dt, A, Bm, Cm, _, _ = inputs(b, l, 64, 1, 64, 128, jnp.bfloat16)
    segs = sp.auto_segments(b, 64, 64, l, sp.num_sms())
    for v in (int(s) for s in args.values.split(",")):
      sp.CHAIN_CTAS_PER_SM = v  # read when the kernel is traced: a fresh jit per value
      f = lambda x, dt, A, Bm, Cm: ssd(x, dt, A, Bm, Cm, impl="pallas")
      row = dict(B=b, L=l, segments=segs, ctas_per_sm=v, stages=sp._chain_stages(128))
      row |= jax_pair(f, (x, dt, A, Bm, Cm), (0, 1, 2, 3, 4), args.iters, 3)
      row["fwd per 32k"] = row["fwd ms"] * 32768 / (b * l)
      row["f+b per 32k"] = row["fwd+bwd ms"] * 32768 / (b * l)
      print(f"  {row}", flush=True)
      rows.append(row)
  print_table(rows, list(rows[0]), title="\nSSD chain kernel ring (bf16, H64 P64 N128)")


def splits(args):
  rows = []
  for item in args.splits.split(","):
    b, l, segs = (int(v) for v in item.split(":"))
    x, dt, A, Bm, Cm, _, _ = inputs(b, l, 64, 1, 64, 128, jnp.bfloat16)
    f = lambda x, dt, A, Bm, Cm, s=segs: sp.ssd_pallas(x, dt, A, Bm, Cm, segments=s)[0]
    row = dict(B=b, L=l, segments=segs, auto=sp.auto_segments(b, 64, 64, l, sp.num_sms()))
    row |= jax_pair(f, (x, dt, A, Bm, Cm), (0, 1, 2, 3, 4), args.iters, 3)
    row["fwd per 32k"] = row["fwd ms"] * 32768 / (b * l)
    row["f+b per 32k"] = row["fwd+bwd ms"] * 32768 / (b * l)
    print(f"  {row}", flush=True)
    rows.append(row)
  print_table(rows, list(rows[0]), title="\nSSD sequence split: segments (bf16, H64 P64 N128)")


if __name__ == "__main__":
  main()
