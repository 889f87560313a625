"""Where the SSD kernel path's time goes, on a GPU: each kernel alone and the whole op
(forward, forward + backward), at the Mamba-2 1.3B layer shape in bf16, and the Mamba-2
mixer's SSD call against the mixer around it.

    PYTHONPATH=. python scripts/gpu/profile_ssd.py

Times are pipelined device times (benchmarks.common.time_fn_pipelined). The backward's
XLA glue (padding, the per-token vectors, the group sums of dB and dC, the block-local
cumsum) is the whole backward minus the two kernels.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import device_name, print_table, time_fn_pipelined
from benchmarks.ssd import inputs
from models import build_mixer
from ssm.ops import ssd, ssd_pallas as sp

F32, BF16 = jnp.float32, jnp.bfloat16


def ms(fn, *args):
  quick = jax.default_backend() != "gpu"  # the CPU smoke run interprets the kernels
  return 1e3 * time_fn_pipelined(jax.jit(fn), *args, calls=1 if quick else 20,
                                 repeats=1 if quick else 5, warmup=0 if quick else 3)


def kernels(b, l, h, g, p, n, dtype):
  x, dt, A, Bm, Cm, _, _ = inputs(b, l, h, g, p, n, dtype)
  cfg = sp._Cfg(seq_len=l, out_dtype=jnp.dtype(dtype), b_dtype=jnp.dtype(dtype),
                c_dtype=jnp.dtype(dtype), has_h0=False, has_d=False, has_seg=False,
                interpret=jax.default_backend() != "gpu")
  q, k, v = (a.astype(BF16) for a in (Cm, Bm, x))
  do = jax.random.normal(jax.random.key(5), x.shape, F32).astype(BF16)
  vec = jax.jit(lambda dt, A: sp._vectors(dt, A, None, l))(dt, A)
  dht = jnp.zeros((b, h, p, n), F32)
  _, _, sb = jax.jit(lambda *a: sp._backward_dc(*a, cfg))(q, k, v, do, vec, None)
  op = lambda x, dt, A, Bm, Cm: ssd(x, dt, A, Bm, Cm, impl="pallas")
  grad = jax.grad(lambda *a: jnp.sum(op(*a).astype(F32)), argnums=range(5))
  rows = [
      dict(part="forward kernel", ms=ms(lambda *a: sp._forward(*a, None, None, cfg), q, k, v,
                                         vec)),
      dict(part="dC kernel (forward sweep)",
           ms=ms(lambda *a: sp._backward_dc(*a, None, cfg), q, k, v, do, vec)),
      dict(part="dB/dX kernel (reverse sweep)",
           ms=ms(lambda *a: sp._backward_dbx(*a, None, dht, cfg), q, k, v, do, sb, vec)),
      dict(part="per-token vectors (XLA)", ms=ms(lambda dt, A: sp._vectors(dt, A, None, l), dt, A)),
      dict(part="op forward", ms=ms(op, x, dt, A, Bm, Cm)),
      dict(part="op forward + backward", ms=ms(grad, x, dt, A, Bm, Cm)),
  ]
  rest = rows[-1]["ms"] - rows[-2]["ms"] - rows[1]["ms"] - rows[2]["ms"]
  rows.append(dict(part="backward glue (f+b - fwd - both kernels)", ms=rest))
  return rows


def mixer(b, l, d_model):
  m = build_mixer("mamba2", d_model, rngs=nnx.Rngs(0), impl="pallas")
  graphdef, params = nnx.split(m)
  xin = jax.random.normal(jax.random.key(3), (b, l, d_model), F32)
  f = lambda params, x: jnp.sum(nnx.merge(graphdef, params)(x))
  h, p, n = m.nheads, m.headdim, m.d_state
  x, dt, A, Bm, Cm, D, _ = inputs(b, l, h, m.ngroups, p, n, F32)
  op = lambda x, dt, A, Bm, Cm, D: jnp.sum(ssd(x, dt, A, Bm, Cm, D=D, impl="pallas"))
  return [dict(part=f"mixer fwd+bwd (d_model {d_model}, B{b} L{l}, H{h} P{p} N{n})",
               ms=ms(jax.grad(f, argnums=(0, 1)), params, xin)),
          dict(part="its ssd op fwd+bwd (f32 inputs)", ms=ms(jax.grad(op, argnums=range(6)),
                                                              x, dt, A, Bm, Cm, D))]


if __name__ == "__main__":
  print(f"device: {device_name()}  jax {jax.__version__}", flush=True)
  if jax.default_backend() != "gpu":  # a smoke run of the script itself (interpreted)
    print_table(kernels(1, 64, 2, 1, 64, 64, BF16), ["part", "ms"], title="\nCPU smoke")
    raise SystemExit
  rows = kernels(4, 2048, 64, 1, 64, 128, BF16)
  print_table(rows, ["part", "ms"], title="\nssd B4 L2048 H64 P64 N128 G1 bf16")
  rows = kernels(1, 32768, 64, 1, 64, 128, BF16)
  print_table(rows, ["part", "ms"], title="\nssd B1 L32768 H64 P64 N128 G1 bf16 (64 CTAs)")
  print_table(mixer(8, 2048, 768), ["part", "ms"], title="\nMamba-2 mixer")
