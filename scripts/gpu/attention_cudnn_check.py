r"""The masked attention path on a GPU: cuDNN (impl="cudnn", its cond) against XLA.

    python scripts/gpu/attention_cudnn_check.py [--constant=MODULE.NAME=VALUE]

bf16 q, k, v at an LM-like shape (b 4, l 512, d_model 256, 4 heads); masks that are a
prefix (cuDNN's branch) and that have holes (XLA's branch); causal and bidirectional.
Prints the relative error of the output and of every gradient (parameters and x)
against impl="xla" with the same parameters; bf16 gives about 1e-2.
"""

from absl import app, flags

_CONSTANTS = flags.DEFINE_multi_string("constant", [], "MODULE.NAME=VALUE before building")


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from benchmarks.common import set_constants  # pylint: disable=import-outside-toplevel
  from models.attention import Attention  # pylint: disable=import-outside-toplevel
  set_constants(_CONSTANTS.value)
  b, l, d = 4, 512, 256
  x = jax.random.normal(jax.random.key(0), (b, l, d), jnp.float32)
  masks = {"prefix": jnp.arange(l)[None, :] < jnp.array([[300], [512], [17], [450]]),
           "holes": jax.random.bernoulli(jax.random.key(1), 0.8, (b, l)).at[:, 0].set(True)}
  worst = 0.0
  for bidirectional in (False, True):
    for name, mask in masks.items():
      out = []
      for impl in ("cudnn", "xla"):
        model = Attention(d, num_heads=4, impl=impl, bidirectional=bidirectional,
                          dtype="bfloat16", rngs=nnx.Rngs(0))
        graph, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params, x):
          y = nnx.merge(graph, params, rest)(x, mask=mask)
          return jnp.sum(jnp.where(mask[..., None], y.astype(jnp.float32), 0.0) ** 2), y
        (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
            params, x)
        out.append([y, *jax.tree.leaves(grads)])
      errs = [float(jnp.linalg.norm((a - r).astype(jnp.float32))
                    / jnp.linalg.norm(r.astype(jnp.float32))) for a, r in zip(*out)]
      worst = max(worst, *errs)
      print(f"{'bidirectional' if bidirectional else 'causal':13} {name:6} y {errs[0]:.2e}  "
            f"grads (params..., x) {' '.join(f'{e:.2e}' for e in errs[1:])}", flush=True)
  print(f"worst relative error {worst:.2e}: {'ok' if worst < 3e-2 else 'TOO LARGE'}")


if __name__ == "__main__":
  app.run(main)
