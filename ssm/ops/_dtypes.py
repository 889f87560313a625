"""The compute dtype of the ops and of memory caching, written once.

Activations may be bf16; scans, states, decays and accumulations are float32 (complex64
for complex inputs), or wider when an input is (float64 in tests under
jax.enable_x64).
"""

import jax.numpy as jnp


def compute_dtype(*xs):
  """float32, or the wider dtype of the given arrays or dtypes (None skipped)."""
  return jnp.result_type(jnp.float32, *[x for x in xs if x is not None])
