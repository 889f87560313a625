"""Causal linear attention (Katharopoulos et al. 2020), optionally memory-cached.

Per head, with a feature map phi applied to queries and keys:

    S_t = S_{t-1} + phi(k_t) v_t^T,   z_t = z_{t-1} + phi(k_t)
    o_t = phi(q_t)^T S_t                             normalize=False
    o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps)    normalize=True / "denominator"
    o_t = SRMSNorm(phi(q_t)^T S_t)                   normalize="rmsnorm" (per head)

feature_map: "elu1" (elu(x) + 1 > 0, the paper's choice), "relu" or "identity".
The denominator needs phi >= 0 (a sign-indefinite "identity" map can divide by
zero, so that pairing is refused). SRMSNorm(x) = x / sqrt(mean(x^2) + 1e-6), no
weight (TransNormer's normalisation of the unnormalised form).

Layer: [q, k, v] = W x; per-head attention; out = W_o merge_heads(o). The parallel
form is `ssm.ops.lightning_attention` without decay; the denominator rides along as
one extra value column (v' = [v, 1], so S' = [S, z]).

Memory caching (`memory_caching=dict(segment_size=..., ...)`, see
`ssm.memory_caching`): the memory is the pair (S, z), cached per segment, and the
gates mix numerators and denominators alike, y = sum_i g_i S_i' q / sum_i g_i z_i' q
(the normalised read of the mixed memory). Gate tokens u_t = W_u x_t (the paper's
learned projection, one per head); the gate keys are phi(k_t).

Recurrent state: without memory caching a dict {"kv": (b, h, dk, dv), "z": (b, h, dk)}
("z" only with the denominator); with it a `MemoryCacheState` whose values carry
the extra denominator column. States are float32.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ssm._checks import check_float, positive_int
from ssm.memory_caching import (MemoryCachingConfig, cached_memory_read, cached_memory_step,
                                init_cache_state, memory_caching_config)
from ssm.ops import lightning_attention

FEATURE_MAPS = ("elu1", "relu", "identity")
NORMALIZE = ("denominator", "rmsnorm", "none")
DENOM_EPS = 1e-6
SRMS_EPS = 1e-6


def feature_map(name: str, x):
  return {"elu1": lambda x: jax.nn.elu(x) + 1.0, "relu": jax.nn.relu,
          "identity": lambda x: x}[name](x)


def srms_norm(x, eps: float = SRMS_EPS):
  """Simple RMSNorm without weight over the last axis: x / sqrt(mean(x^2) + eps)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def default_num_heads(d_model: int) -> int:
  """Head dim 64 where d_model allows, else one head."""
  return d_model // 64 if d_model % 64 == 0 and d_model >= 64 else 1


def check_heads(d_model: int, num_heads, kind: str) -> int:
  d_model = positive_int(kind, "d_model", d_model)
  num_heads = default_num_heads(d_model) if num_heads is None else num_heads
  if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or (
      d_model % num_heads):
    raise ValueError(f"{kind}: num_heads must be a positive int dividing d_model={d_model}, "
                     f"got {num_heads!r}")
  return num_heads


def check_chunk(chunk_size, kind):
  positive_int(kind, "chunk_size", chunk_size)


def split_heads(x, h):
  """(..., h * d) -> (..., h, d)."""
  return x.reshape(x.shape[:-1] + (h, x.shape[-1] // h))


def check_input(x, d_model, ndim, what, kind):
  check_float(kind, **{what: x})
  if x.ndim != ndim or x.shape[-1] != d_model:
    raise ValueError(f"{kind}: {what} must have {ndim} dims ending in d_model={d_model}, "
                     f"got {x.shape}")


class LinearAttention(nnx.Module):
  """Causal linear attention mixer (b, l, d_model) -> (b, l, d_model).

  Args:
    d_model: model width; num_heads must divide it (default: head dim 64).
    feature_map: "elu1" | "relu" | "identity".
    normalize: True / "denominator", "rmsnorm", or False / "none" (module docstring).
    memory_caching: None or dict(segment_size=..., variant="gated", top_k=None,
      state_init="checkpoint", max_segments=64).
    chunk_size: block length of the parallel form.
    impl: passed to `ssm.ops.lightning_attention`.
  """

  def __init__(self, d_model: int, *, num_heads: int | None = None, feature_map: str = "elu1",
               normalize: bool | str = True, memory_caching=None, chunk_size: int = 64,
               impl: str = "auto", rngs: nnx.Rngs):
    kind = "linear_attention"
    h = check_heads(d_model, num_heads, kind)
    if feature_map not in FEATURE_MAPS:
      raise ValueError(f"{kind}: feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
    norm = {True: "denominator", False: "none", None: "none"}.get(normalize, normalize)
    if norm not in NORMALIZE:
      raise ValueError(f"{kind}: normalize must be True, False or one of {NORMALIZE}, "
                       f"got {normalize!r}")
    if norm == "denominator" and feature_map == "identity":
      raise ValueError(f"{kind}: normalize='denominator' needs a non-negative feature map "
                       f"('elu1' or 'relu'); 'identity' can divide by zero")
    check_chunk(chunk_size, kind)
    self.mc: MemoryCachingConfig | None = memory_caching_config(memory_caching)
    self.d_model, self.num_heads, self.head_dim = d_model, h, d_model // h
    self.feature_map, self.normalize = feature_map, norm
    self.chunk_size, self.impl = chunk_size, impl
    self.qkv_proj = nnx.Linear(d_model, 3 * d_model, use_bias=False, rngs=rngs)
    self.out_proj = nnx.Linear(d_model, d_model, use_bias=False, rngs=rngs)
    self.gate_proj = (nnx.Linear(d_model, d_model, use_bias=False, rngs=rngs)
                      if self.mc is not None and self.mc.gated else None)

  # -- shared pieces ------------------------------------------------------------
  def _project(self, x):
    """x (..., d) -> phi(q), phi(k), v' (..., h, dh[+1]) float32 and gate tokens or None."""
    x32 = x.astype(jnp.float32)
    q, k, v = jnp.split(self.qkv_proj(x32), 3, axis=-1)
    q, k, v = (split_heads(t, self.num_heads) for t in (q, k, v))
    q, k = feature_map(self.feature_map, q), feature_map(self.feature_map, k)
    if self.normalize == "denominator":
      v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
    u = None if self.gate_proj is None else split_heads(self.gate_proj(x32), self.num_heads)
    return q, k, v, u

  def _finish(self, o, x):
    """o (..., h, dh[+1]) -> (..., d_model) in x's dtype."""
    if self.normalize == "denominator":
      o = o[..., :-1] / (o[..., -1:] + DENOM_EPS)
    elif self.normalize == "rmsnorm":
      o = srms_norm(o)
    o = o.reshape(o.shape[:-2] + (self.d_model,))
    return self.out_proj(o).astype(x.dtype)

  # -- parallel mode --------------------------------------------------------------
  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    """x (b, l, d_model) -> (b, l, d_model); segment_ids (b, l) int: packed documents (the
    state restarts where the id changes; not with memory caching)."""
    check_input(x, self.d_model, 3, "x", "linear_attention")
    if segment_ids is not None and self.mc is not None:
      raise ValueError("linear_attention: segment_ids (packed documents) are not supported with "
                       "memory_caching")
    q, k, v, u = self._project(x)
    if self.mc is None:
      o = lightning_attention(q, k, v, None, segment_ids=segment_ids, chunk_size=self.chunk_size,
                              impl=self.impl)
    else:
      o = cached_memory_read(q, k, v, None, gate_u=u, chunk_size=self.chunk_size,
                             **self.mc.read_kwargs())
    return self._finish(o, x)

  # -- recurrent mode -------------------------------------------------------------
  def init_state(self, batch_size: int) -> Any:
    batch_size = positive_int("linear_attention", "batch_size", batch_size)
    h, dh = self.num_heads, self.head_dim
    dv = dh + (self.normalize == "denominator")
    if self.mc is not None:
      return init_cache_state(batch_size, h, dh, dv, max_segments=self.mc.max_segments)
    state = {"kv": jnp.zeros((batch_size, h, dh, dh), jnp.float32)}
    if self.normalize == "denominator":
      state["z"] = jnp.zeros((batch_size, h, dh), jnp.float32)
    return state

  def step(self, state: Any, x_t: jax.Array) -> tuple[Any, jax.Array]:
    """One token: x_t (b, d_model) -> (state, y_t (b, d_model))."""
    check_input(x_t, self.d_model, 2, "x_t", "linear_attention")
    q, k, v, u = self._project(x_t)
    check_state(state, jax.eval_shape(lambda: self.init_state(x_t.shape[0])), "linear_attention")
    if self.mc is not None:
      state, o = cached_memory_step(state, q, k, v, gate_u_t=u, **self.mc.read_kwargs())
      return state, self._finish(o, x_t)
    if self.normalize == "denominator":
      v = v[..., :-1]
      z = state["z"] + k
      kv = state["kv"] + k[..., :, None] * v[..., None, :]
      num = jnp.einsum("bhk,bhkv->bhv", q, kv)
      den = jnp.einsum("bhk,bhk->bh", q, z)[..., None]
      o = jnp.concatenate([num, den], axis=-1)
      return {"kv": kv, "z": z}, self._finish(o, x_t)
    kv = state["kv"] + k[..., :, None] * v[..., None, :]
    return {"kv": kv}, self._finish(jnp.einsum("bhk,bhkv->bhv", q, kv), x_t)


def check_state(state, like, kind):
  """A step state must have the structure and shapes `init_state` gives."""
  shapes = lambda t: jax.tree.map(lambda a: tuple(jnp.shape(a)), t)
  if (jax.tree.structure(state) != jax.tree.structure(like)
      or shapes(state) != shapes(like)):
    raise ValueError(f"{kind}: step state must look like init_state's {shapes(like)}, "
                     f"got {shapes(state)}")


def make_mixer(d_model: int, *, rngs: nnx.Rngs, num_heads: int | None = None,
               feature_map: str = "elu1", normalize: bool | str = True, memory_caching=None,
               chunk_size: int = 64, impl: str = "auto") -> LinearAttention:
  """Registry factory for kind "linear_attention"."""
  return LinearAttention(d_model, num_heads=num_heads, feature_map=feature_map,
                         normalize=normalize, memory_caching=memory_caching,
                         chunk_size=chunk_size, impl=impl, rngs=rngs)
