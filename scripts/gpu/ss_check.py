"""The selective-scan kernel against the XLA path ON THE GPU, for every backward variant.

    python3 scripts/gpu/ss_check.py            # B2 L1000 D256 N16 (length not a tile multiple)

Mamba-1's call (z gate, D skip, delta_bias + softplus, h0, the last state) in float32 and
bfloat16: the output, the last state and every input's gradient of
sum(y * ct) + sum(last * ct_last), relative norm errors of the kernel (variant v) against
ssm.ops.selective_scan(impl="xla") computed in float32 from the same inputs. The CPU tests
check the kernels in interpret mode; this checks the compiled kernels (and their fast
reciprocals) where they run.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from ssm.ops import selective_scan
from ssm.ops._impl import interpret_mode
from ssm.ops import selective_scan_pallas as sp

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "bias", "h0")


def rel(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


def inputs(b, l, d, n, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 11)
  f = lambda k, s, scale=1.0: scale * jax.random.normal(k, s, jnp.float32)  # noqa: E731
  x = dict(u=f(ks[0], (b, l, d)).astype(dtype), delta=f(ks[1], (b, l, d), 0.5).astype(dtype),
           A=-jnp.exp(f(ks[2], (d, n), 0.5)), B=f(ks[3], (b, l, n)), C=f(ks[4], (b, l, n)),
           D=f(ks[5], (d,)), z=f(ks[6], (b, l, d)).astype(dtype), bias=f(ks[7], (d,), 0.3),
           h0=f(ks[8], (b, d, n), 0.3))
  cts = (f(ks[9], (b, l, d)), f(ks[10], (b, d, n)))
  return x, cts


def loss(impl, variant, x, cts):
  def call(u, delta, A, B, C, D, z, bias, h0):
    if impl == "xla":
      y, last = selective_scan(u.astype(jnp.float32), delta.astype(jnp.float32), A, B, C, D,
                               z=z.astype(jnp.float32), delta_bias=bias, delta_softplus=True,
                               h0=h0, return_state=True, impl="xla")
    else:
      y, last = sp.selective_scan_pallas(u, delta, A, B[:, :, None], C[:, :, None], D, z=z,
                                         delta_bias=bias, delta_softplus=True, h0=h0,
                                         bwd_variant=variant, interpret=interpret_mode())
    return jnp.sum(y.astype(jnp.float32) * cts[0]) + jnp.sum(last * cts[1]), (y, last)
  return jax.jit(jax.value_and_grad(call, argnums=tuple(range(9)), has_aux=True))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--shape", default="2,1000,256,16")
  p.add_argument("--variants", default="1,2,3")
  args = p.parse_args()
  b, l, d, n = map(int, args.shape.split(","))
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; B{b} L{l} D{d} N{n}")
  for dtype in (jnp.float32, jnp.bfloat16):
    x, cts = inputs(b, l, d, n, dtype)
    args_ = [x[k] for k in NAMES]
    (_, (y_ref, last_ref)), g_ref = loss("xla", 0, x, cts)(*args_)
    for v in map(int, args.variants.split(",")):
      (_, (y, last)), g = loss("pallas", v, x, cts)(*args_)
      errs = [("y", rel(y, y_ref)), ("last", rel(last, last_ref))]
      errs += [(f"d{k}", rel(a, r)) for k, a, r in zip(NAMES, g, g_ref)]
      print(f"{jnp.dtype(dtype).name:9s} v{v}: " + "  ".join(f"{k} {e:.1e}" for k, e in errs))


if __name__ == "__main__":
  main()
