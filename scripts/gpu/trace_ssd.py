"""Device-op traces of the two places issue 20's targets are missed, on a GPU:

1. the Mamba-2 mixer's forward + backward (d_model 768, B 8, L 2048, N 64, bf16 compute
   with float32 parameters, impl="pallas"): which ops besides the SSD kernels take the time;
2. the SSD op's forward at B 1, L 32768 against B 4, L 8192 (64 heads of P 64, N 128,
   bf16): what the sequence split (chain kernel, carries, segment layout) costs.

    PYTHONPATH=. python scripts/gpu/trace_ssd.py --out DIR [--parts mixer,split]

Each part prints its pipelined time, then the device time per op name over 5 calls with the
op's shapes and source lines from the optimized HLO (benchmarks.common.summarise_trace).
"""
import argparse
import os

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import device_name, summarise_trace, time_fn_pipelined
from benchmarks.ssd import inputs
from models import build_mixer
from ssm.ops import ssd

F32, BF16 = jnp.float32, jnp.bfloat16


def trace(name, fn, args, out, top):
  fn = jax.jit(fn)
  hlo = fn.lower(*args).compile().as_text()
  ms = 1e3 * time_fn_pipelined(fn, *args, calls=20, repeats=5, warmup=3)
  print(f"\n== {name}: {ms:.3f} ms (pipelined)", flush=True)
  path = os.path.join(out, name.split()[0])
  with jax.profiler.trace(path, create_perfetto_trace=True):
    for _ in range(5):
      res = fn(*args)
    jax.block_until_ready(res)
  summarise_trace(path, 5, top, hlo_text=hlo)


def mixer_part(out, top, b=8, l=2048, d_model=768, dtype="bfloat16"):
  graphdef, params = nnx.split(build_mixer("mamba2", d_model, rngs=nnx.Rngs(0), impl="pallas",
                                           dtype=dtype))
  x = jax.random.normal(jax.random.key(3), (b, l, d_model), F32).astype(dtype)
  loss = lambda params, x: jnp.sum(nnx.merge(graphdef, params)(x).astype(F32))
  trace(f"mixer fwd+bwd B{b} L{l} d_model {d_model} {dtype}",
        jax.grad(loss, argnums=(0, 1)), (params, x), out, top)
  trace(f"mixer_fwd B{b} L{l} {dtype}", lambda p, x: nnx.merge(graphdef, p)(x), (params, x),
        out, top)


def split_part(out, top):
  for b, l in ((4, 8192), (1, 32768)):
    x, dt, A, Bm, Cm, _, _ = inputs(b, l, 64, 1, 64, 128, BF16)
    trace(f"ssd_fwd_L{l} B{b} H64 P64 N128 bf16",
          lambda x, dt, A, Bm, Cm: ssd(x, dt, A, Bm, Cm, impl="pallas"),
          (x, dt, A, Bm, Cm), out, top)


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--parts", default="mixer,split")
  parser.add_argument("--top", type=int, default=30)
  args = parser.parse_args()
  print(f"device: {device_name()}  jax {jax.__version__}", flush=True)
  parts = args.parts.split(",")
  if "mixer" in parts:
    mixer_part(args.out, args.top)
  if "split" in parts:
    split_part(args.out, args.top)
