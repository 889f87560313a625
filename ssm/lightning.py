"""The TransNormerLLM token mixer: lightning attention with per-head decay, SRMSNorm, gate.

Qin et al. 2023/2024 (OpenNLPLab/TransnormerLLM, lightning-attention):

    q, k = silu(W_q x), silu(W_k x);   v, u = W_v x, W_u x          (one fused projection)
    o = lightning_attention(q, k, v, log lambda)                       per head
    out = W_o (SRMSNorm(merge_heads(o)) * u)

SRMSNorm(x) = x / sqrt(mean(x^2) + 1e-6), no weight, over the full width after the
heads are merged (as OpenNLPLab's NormLinearAttention applies its SimpleRMSNorm to
`b n (h d)`). No softmax, no denominator.

Decay: lambda_h = exp(-s_h * r_l), s_h = 2^(-8h/H) for h = 1..H (ALiBi slopes;
for H not a power of two ALiBi's interleaving rule) and r_l = 1 - l/(L-1) + 1e-5
for layer l of L (the last layer nearly decay-free); a single layer (L = 1) uses
r = 1 + 1e-5. Fixed, not trained (a `FixedDecay` variable, not an nnx.Param).

Memory caching (`memory_caching=dict(...)`, see `ssm.memory_caching`) caches the
decayed state per segment; gate tokens u^mc_t = W_mc x_t per head (separate from
the output gate u), gate keys are the silu keys.

Recurrent state: (b, h, dk, dv) float32, or a `MemoryCacheState` with caching.
"""

import math
import jax
import jax.numpy as jnp
from flax import nnx

from ssm.linear_attention import LinearMemoryMixer, chunked_flops, split_heads, srms_norm


class FixedDecay(nnx.Variable):
  """The per-head log-decay: fixed, never trained (not an nnx.Param). A variable
  rather than a Python constant, so jit sees an input and XLA does not constant-fold
  the decay cumsums of memory caching at compile time."""


def alibi_slopes(num_heads: int) -> list[float]:
  """ALiBi's head slopes: 2^(-8h/H), h = 1..H for H a power of two; otherwise the slopes
  of the next lower power of two followed by every other slope of the one above."""
  def power_of_two(n):
    return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
  if math.log2(num_heads).is_integer():
    return power_of_two(num_heads)
  lower = 2 ** math.floor(math.log2(num_heads))
  return power_of_two(lower) + alibi_slopes(2 * lower)[0::2][:num_heads - lower]


def lightning_log_decay(num_heads: int, layer_idx: int = 0, num_layers: int = 1) -> list[float]:
  """log lambda_h = -s_h * (1 - l / (L - 1) + 1e-5) per head (module docstring)."""
  ratio = 1.0 - (layer_idx / (num_layers - 1) if num_layers > 1 else 0.0) + 1e-5
  return [-s * ratio for s in alibi_slopes(num_heads)]


class Lightning(LinearMemoryMixer):
  """TransNormerLLM's lightning-attention mixer (b, l, d_model) -> (b, l, d_model).

  Args:
    d_model: model width; num_heads must divide it (default: head dim 64).
    layer_idx, num_layers: position of the layer in the stack (sets the decay).
    memory_caching: None or dict(segment_size=..., variant="gated", top_k=None,
      state_init="checkpoint", max_segments=64).
    chunk_size: block length of `ssm.ops.lightning_attention`.
    impl: "auto" | "xla" | "pallas", passed to the op.
    seq_mesh, seq_axis: a jax.sharding.Mesh and its axis splitting the length of the
      parallel form (`ssm.ops.seq_parallel`; the rest of the layer is left to GSPMD), or None.
  """

  name = "lightning"

  def __init__(self, d_model: int, *, num_heads: int | None = None, layer_idx: int = 0,
               num_layers: int = 1, memory_caching=None, chunk_size: int = 64,
               impl: str = "auto", dtype: str | None = None, param_dtype: str = "float32",
               seq_mesh=None, seq_axis: str = "seq", rngs: nnx.Rngs):
    kind = self.name
    config = self._setup(d_model, num_heads, chunk_size, impl, memory_caching, dtype,
                         param_dtype, seq_mesh, seq_axis)
    if not isinstance(num_layers, int) or num_layers < 1:
      raise ValueError(f"{kind}: num_layers must be a positive int, got {num_layers!r}")
    if not isinstance(layer_idx, int) or not 0 <= layer_idx < num_layers:
      raise ValueError(f"{kind}: layer_idx must be an int in [0, num_layers={num_layers}), "
                       f"got {layer_idx!r}")
    h = self.num_heads
    self.value_dim = self.head_dim
    # layer_idx and num_layers live on only in the decay (an array, not a static attribute),
    # so that the layers of a stack share one structure (models.blocks: scan_layers).
    self.log_decay = FixedDecay(jnp.asarray(lightning_log_decay(h, layer_idx, num_layers),
                                            jnp.float32))
    self.qkvu_proj = self.dense(d_model, 4 * d_model, use_bias=False, rngs=rngs)
    self.out_proj = self.dense(d_model, d_model, use_bias=False, rngs=rngs)
    self._add_memory(config, rngs)

  def flops_per_token(self, seq_len: int) -> float:
    return chunked_flops(self.num_heads, self.head_dim, self.value_dim,
                         min(self.chunk_size, seq_len))

  def _log_decay(self):
    return self.log_decay[...]

  def _project(self, x):
    """x (..., d) -> silu(q), silu(k), v (..., h, dh) and the output gate u (..., d)."""
    q, k, v, u = jnp.split(self.qkvu_proj(x), 4, axis=-1)
    q, k = jax.nn.silu(q), jax.nn.silu(k)
    q, k, v = (split_heads(t, self.num_heads) for t in (q, k, v))
    return q, k, v, u

  def _finish(self, o, u, x):
    o = srms_norm(o.reshape(o.shape[:-2] + (self.d_model,)))  # statistics in float32
    return self.out_proj(self.compute(o * u)).astype(x.dtype)

  def _plain_state(self, batch_size):
    h, dh = self.num_heads, self.head_dim
    return jnp.zeros((batch_size, h, dh, dh), jnp.float32)

  def _plain_step(self, state, q, k, v):
    state = jnp.exp(self._log_decay())[None, :, None, None] * state + (
        k[..., :, None] * v[..., None, :])
    return state, jnp.einsum("bhk,bhkv->bhv", q, state)


# Registry factory for kind "lightning": the class itself (one source of defaults).
make_mixer = Lightning
