r"""Which form of the bank's dk batch sum (sum_b g_f conj(u_f), ssm/ops/fft_conv.py
`_batch_sum_conj_product`) XLA compiles fastest: the bank's forward + backward at the LRA
ListOps and Text S4D shapes (bidirectional, f32), each form patched in before tracing.

    python scripts/gpu/bank_dk_probe.py        # a GPU; prints one table

Forms: "complex" (one complex reduction over b), "real" (two real reductions),
"unrolled" (a chain of b slice products added, no reduce op). "real" is the default.
"""

import functools
import importlib
import os
import sys

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax
import jax.numpy as jnp

from benchmarks.common import device_name, print_table, time_fn
# the module: ssm.ops re-exports the function fft_conv under the same name
fc = importlib.import_module("ssm.ops.fft_conv")

_default = fc._batch_sum_conj_product  # pylint: disable=protected-access
FORMS = {
    "complex": lambda g_f, u_f: jnp.sum(g_f * jnp.conj(u_f)[:, None], axis=0),
    "real": _default,  # the default
    "unrolled": lambda g_f, u_f: functools.reduce(
        jnp.add, [g_f[i] * jnp.conj(u_f[i])[None] for i in range(g_f.shape[0])]),
}
SHAPES = {"ListOps B50 L2000 H128": (50, 2000, 128), "Text B16 L4096 H256": (16, 4096, 256)}


def main():
  rows = []
  for name, (b, l, h) in SHAPES.items():
    keys = jax.random.split(jax.random.key(0), 4)
    u = jax.random.normal(keys[0], (b, l, h), jnp.float32)
    kc, ka = (jax.random.normal(k, (1, h, l), jnp.float32) / l for k in keys[1:3])
    w = jax.random.normal(keys[3], (b, l, 1, h), jnp.float32)
    ref = None
    for form, fn in FORMS.items():
      fc._batch_sum_conj_product = fn  # pylint: disable=protected-access
      loss = lambda u, kc, ka, w: jnp.sum(w * fc.fft_conv_bank_xla(u, kc, ka, method="fft"))
      grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      out = grad(u, kc, ka, w)
      ref = out if ref is None else ref
      err = max(float(jnp.max(jnp.abs(a - r)) / jnp.max(jnp.abs(r))) for a, r in zip(out, ref))
      rows.append({"shape": name, "dk sum": form, "fwd+bwd ms": 1e3 * time_fn(grad, u, kc, ka, w),
                   "rel. diff to complex": err, "device": device_name()})
  fc._batch_sum_conj_product = _default  # pylint: disable=protected-access
  print_table(rows, ["shape", "dk sum", "fwd+bwd ms", "rel. diff to complex", "device"])


if __name__ == "__main__":
  main()
