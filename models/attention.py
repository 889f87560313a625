"""Softmax attention as a sequence mixer (kind "attention"; model name "transformer").

    q, k, v = split(x W_qkv)                 (b, l, heads, head_dim) each, no bias
    q, k = rotary(q), rotary(k)              optional rotary position embedding
    o = softmax(q k^T / sqrt(head_dim) + causal/key mask) v
    y = dropout(o) W_out + b_out             (b, l, d_model)

Positions: rotary embedding (RoPE, Su et al. 2021) on q and k, on by default.
It makes the logits depend only on relative offsets, so the layer works at any
length without a learned table, and gives a bidirectional encoder (where
attention alone is permutation-equivariant) a notion of order. rotary=False
leaves the layer position-free (then order comes only from causality).

Modes: the parallel forward calls `jax.nn.dot_product_attention`. impl="auto" takes
cuDNN's fused (flash) attention on a GPU for 16-bit q, k, v with head_dim a multiple of
8 up to 128, and XLA's otherwise ("xla", "cudnn" force one). cuDNN is given the padding
as key lengths, which is exact for a prefix mask (real positions first, padding after:
every loader's layout); a batch whose mask is not a prefix takes the XLA branch of a
`lax.cond`, so the result never depends on that assumption. The
recurrent mode keeps a KV cache of fixed length max_len (`init_state(batch_size,
max_len=...)`): unlike an SSM's constant-size state it grows O(max_len), and each
step costs O(max_len). Stepping past max_len cannot raise inside jit; the output
becomes NaN instead of silently wrong.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ssm._checks import positive_int
from ssm.mixer import Mixer

ROTARY_BASE = 10000.0
IMPLS = ("auto", "xla", "cudnn")


def rotary_angles(positions, head_dim: int):
  """positions (...) -> angles (..., head_dim // 2): pos * base^(-2i / head_dim)."""
  inv_freq = ROTARY_BASE ** (-jnp.arange(head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim)
  return positions.astype(jnp.float32)[..., None] * inv_freq


def apply_rotary(x, angles):
  """Rotate pairs (x[i], x[i + d/2]) of the last axis by angles (broadcast to x[..., :d/2]).

  x (..., d) with d even -> (..., d), x's dtype; computed in float32.
  """
  half = x.shape[-1] // 2
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


class Attention(Mixer):
  """Multi-head softmax attention, causal or bidirectional (the call, state and step
  contract is `ssm.mixer.Mixer`'s; the KV cache's length axis grows with max_len).

  Args:
    d_model: h, split into num_heads heads of head_dim = h // num_heads.
    num_heads: heads; None picks head_dim 64 (max(1, h // 64) heads).
    bidirectional: False (default) is causal: position t attends to s <= t.
    dropout: rate on the attention output, before the output projection.
    max_len: default KV-cache length for `init_state`.
    rotary: rotary position embedding on q and k (needs an even head_dim).
    impl: "auto" | "xla" | "cudnn" (module docstring).
    dtype, param_dtype: compute and projection-weight dtypes (`ssm.mixer.Mixer`); the
      KV cache stays float32.
  """

  name = "attention"
  capacity_fields = ("k", "v")  # the KV cache: its length axis is max_len

  def __init__(self, d_model: int, *, num_heads: int | None = None,
               bidirectional: bool = False, dropout: float = 0.0, max_len: int = 2048,
               rotary: bool = True, impl: str = "auto", dtype: str | None = None,
               param_dtype: str = "float32", rngs: nnx.Rngs):
    d_model = positive_int("attention", "d_model", d_model)
    if impl not in IMPLS:
      raise ValueError(f"attention: impl must be one of {IMPLS}, got {impl!r}")
    self._precision(dtype, param_dtype)
    self.impl = impl
    if num_heads is None:
      num_heads = max(1, d_model // 64)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or (
        d_model % num_heads):
      raise ValueError(f"attention: num_heads must be a positive int dividing "
                       f"d_model={d_model}, got {num_heads!r}")
    head_dim = d_model // num_heads
    if rotary and head_dim % 2:
      raise ValueError(f"attention: rotary needs an even head_dim, got {head_dim} "
                       f"(d_model={d_model}, num_heads={num_heads})")
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"attention: dropout must be in [0, 1), got {dropout}")
    positive_int("attention", "max_len", max_len)
    self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
    self.bidirectional, self.rotary, self.max_len = bool(bidirectional), bool(rotary), max_len
    self.qkv = self.dense(d_model, 3 * d_model, use_bias=False, rngs=rngs)
    self.out_proj = self.dense(d_model, d_model, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def flops_per_token(self, seq_len: int) -> float:
    """Scores q k^T and their product with v, 4 L d_model (PaLM's count: the causal mask's
    skipped half is not subtracted)."""
    return 4.0 * seq_len * self.d_model

  def _project(self, x, positions):
    """x (..., h), positions broadcastable to x[..., 0] -> q, k, v (..., heads, head_dim)."""
    qkv = self.qkv(x).reshape(*x.shape[:-1], 3, self.num_heads, self.head_dim)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    if self.rotary:
      angles = rotary_angles(positions, self.head_dim)[..., None, :]  # broadcast over heads
      q, k = apply_rotary(q, angles), apply_rotary(k, angles)
    return q, k, v

  def _output(self, o, deterministic):
    """o (..., heads, head_dim) -> (..., h)."""
    o = o.reshape(*o.shape[:-2], self.d_model)
    return self.out_proj(self.dropout(o, deterministic=deterministic))

  def forward(self, x, *, mask, deterministic, segment_ids):
    """x (b, l, h), mask (b, l) bool (False keys are ignored) or None -> (b, l, h)."""
    del segment_ids  # refused by Mixer.__call__
    b, l, _ = x.shape
    if mask is not None and mask.shape != (b, l):
      raise ValueError(f"attention: mask shape {mask.shape} != (batch, length) {(b, l)}")
    causal = not self.bidirectional
    positions = jnp.arange(l)

    def xla(q, k, v):
      key_mask = None if mask is None else mask[:, None, None, :]  # (b, 1, 1, l)
      return jax.nn.dot_product_attention(q, k, v, mask=key_mask, is_causal=causal,
                                          implementation="xla")

    if not self._cudnn(self._q_dtype(x)):
      return self._output(xla(*self._project(x, positions)), deterministic)
    if mask is None:
      o = jax.nn.dot_product_attention(*self._project(x, positions), is_causal=causal,
                                       implementation="cudnn")
      return self._output(o, deterministic)
    lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)
    prefix = jnp.all(mask == (jnp.arange(l) < lengths[:, None]))

    def cudnn(q, k, v):
      return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn",
                                          key_value_seq_lengths=lengths)

    # The XLA branch is rematerialised: differentiating a cond makes each branch return the
    # other's residuals, so the cuDNN branch (the one taken) would otherwise write zeros for
    # XLA's (b, heads, l, l) scores and probabilities, three times per layer (measured:
    # 34% of a bf16 transformer LM step on the H200).
    # The branches take x and project it themselves: q, k and v then never cross the cond's
    # boundary, whose fixed operand layouts made XLA transpose them into cuDNN's and back
    # (projecting before the cond: 70.6 ms against 63.3 for the bf16 GPT-2-small LM step on
    # an H100, 34.6% against 38.6% MFU, results/lm_step_ab_h100.txt).
    with_projection = lambda attend: lambda u: attend(*self._project(u, positions))  # noqa: E731
    o = jax.lax.cond(prefix, with_projection(cudnn), jax.checkpoint(with_projection(xla)), x)
    return self._output(o, deterministic)

  def _q_dtype(self, x):
    """The dtype the qkv projection gives for input x (nnx.Linear's rule)."""
    return self.dtype if self.dtype is not None else jnp.result_type(x.dtype, self.param_dtype)

  def _cudnn(self, q_dtype) -> bool:
    """Whether the parallel form runs cuDNN's fused attention (module docstring)."""
    if self.impl != "auto":
      return self.impl == "cudnn"
    return (jax.default_backend() == "gpu" and q_dtype in (jnp.bfloat16, jnp.float16)
            and self.head_dim % 8 == 0 and self.head_dim <= 128)

  # -- recurrent mode: KV cache ------------------------------------------------------
  def _init_state(self, batch_size: int, max_len: int | None) -> dict:
    """Empty cache {"k", "v": (b, max_len, heads, head_dim) float32, "pos": int32 ()}."""
    max_len = self.max_len if max_len is None else max_len
    shape = (batch_size, max_len, self.num_heads, self.head_dim)
    return {"k": jnp.zeros(shape, jnp.float32), "v": jnp.zeros(shape, jnp.float32),
            "pos": jnp.zeros((), jnp.int32)}

  def _step(self, state: dict, x_t) -> tuple[dict, Any]:
    """One token: x_t (b, h) -> (state, y_t (b, h)); attends to the cache and itself."""
    pos = state["pos"]
    cache_len = state["k"].shape[1]
    q, k, v = self._project(x_t, pos)  # (b, heads, head_dim)
    k_cache = jax.lax.dynamic_update_slice_in_dim(
        state["k"], k[:, None].astype(state["k"].dtype), pos, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(
        state["v"], v[:, None].astype(state["v"].dtype), pos, axis=1)
    valid = (jnp.arange(cache_len) <= pos)[None, None, None, :]  # (1, 1, 1, S)
    o = jax.nn.dot_product_attention(q[:, None].astype(k_cache.dtype), k_cache, v_cache,
                                     mask=valid, implementation=None)[:, 0]
    # Past the cache the write above was clamped: poison rather than mislead.
    o = jnp.where(pos < cache_len, o, jnp.nan).astype(x_t.dtype)
    new_state = {"k": k_cache, "v": v_cache, "pos": pos + 1}
    return new_state, self._output(o, deterministic=True)


# Registry factory for kind "attention": the class itself (one source of defaults).
make_mixer = Attention
