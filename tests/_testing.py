"""Shared test helpers: relative errors, tolerances keyed by dtype, random inputs."""

import numpy as np
import jax.numpy as jnp

# Relative-norm tolerances of a fast path against a float32 reference, by input dtype:
# float32 products are exact-ish on the CPU; kernels that feed bf16 to the matrix units
# (or bf16 inputs) sit near bf16's 2^-8.
TOLERANCE = {jnp.dtype(jnp.float64): 1e-9, jnp.dtype(jnp.float32): 1e-5,
             jnp.dtype(jnp.bfloat16): 1e-2}


def tolerance(dtype) -> float:
  return TOLERANCE[jnp.dtype(dtype)]


def rel(a, b) -> float:
  """||a - b|| / ||b|| in float64; fails on non-finite values of a."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.all(np.isfinite(a)), "non-finite values"
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def bf16_exact(x, dtype=jnp.float32):
  """x rounded to bf16 and held in `dtype`: inputs a bf16 kernel sees without rounding."""
  return jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(dtype)
