"""Packed documents: segment ids (b, l) int -> where the recurrent state restarts.

A run is a maximal stretch of equal ids; the state restarts from zero at the first token
of every run but the first, whose state continues from h0. Shared by the SSD and
lightning paths (XLA and Pallas).
"""

import jax.numpy as jnp


def resets(segment_ids):
  """(b, l) bool: True where a new run starts (the id differs from the previous token's);
  never at token 0, whose run continues h0."""
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros_like(change[:, :1]), change], axis=1)


def run_index(segment_ids):
  """(b, l) int32: how many runs started up to and including t (0 for h0's run)."""
  return jnp.cumsum(resets(segment_ids).astype(jnp.int32), axis=1)
