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

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ssm._checks import positive_int
from ssm.memory_caching import memory_caching_config
from ssm.mixer import Mixer, cached_memory
from ssm.ops import lightning_attention
from ssm.ops._impl import check_impl
from ssm.ops.seq_parallel import check_seq_mesh, lightning_attention_seq_parallel

FEATURE_MAPS = ("elu1", "relu", "identity")
NORMALIZE = ("denominator", "rmsnorm", "none")
DENOM_EPS = 1e-6
SRMS_EPS = 1e-6


def feature_map(name: str, x):
  return {"elu1": lambda x: jax.nn.elu(x) + 1.0, "relu": jax.nn.relu,
          "identity": lambda x: x}[name](x)


def srms_norm(x, eps: float = SRMS_EPS):
  """Simple RMSNorm without weight over the last axis: x / sqrt(mean(x^2) + eps)."""
  x = x.astype(jnp.result_type(jnp.float32, x))
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def chunked_flops(heads: int, dk: int, dv: int, chunk: int) -> float:
  """Forward FLOPs per token of the chunked linear-memory read (`Mixer.flops_per_token`):
  per head the scores within the chunk and their product with V (2 C (dk + dv)), the read
  of the carried state and its update (4 dk dv)."""
  return heads * (2.0 * chunk * (dk + dv) + 4.0 * dk * dv)


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


def split_heads(x, h):
  """(..., h * d) -> (..., h, d)."""
  return x.reshape(x.shape[:-1] + (h, x.shape[-1] // h))


class LinearMemoryMixer(Mixer):
  """What linear attention and lightning share: heads whose memory is a (dk, dv) state,
  S_t = lambda S_{t-1} + k_t v_t^T, read in parallel by `ssm.ops.lightning_attention`
  (packed documents restart it) or through memory caching (`self.memory`).

  A subclass builds its projections after `_setup` and writes
    _project(x) -> q, k (..., h, dk), v (..., h, dv), aux      compute dtype; aux: its own
    _finish(o, aux, x) -> (..., d_model)                        in x's dtype
    _log_decay() -> (h,) log lambda or None (no decay)
    _plain_state(batch_size), _plain_step(state, q, k, v) -> (state, o)   without caching
  and `value_dim` (dv).
  """

  takes_segments = True

  def _setup(self, d_model, num_heads, chunk_size, impl, memory_caching, dtype, param_dtype,
             seq_mesh=None, seq_axis="seq"):
    """Checks and stores the shared options; returns the memory-caching config (or None),
    validated before any parameter is built. seq_mesh: a Mesh whose axis seq_axis splits the
    length of the parallel form (`ssm.ops.seq_parallel`), or None."""
    h = check_heads(d_model, num_heads, self.name)
    positive_int(self.name, "chunk_size", chunk_size)
    check_impl(self.name, impl)
    self._precision(dtype, param_dtype)
    self.d_model, self.num_heads, self.head_dim = d_model, h, d_model // h
    self.chunk_size, self.impl = chunk_size, impl
    config = memory_caching_config(memory_caching)
    self.seq_mesh, self.seq_axis = check_seq_mesh(self.name, seq_mesh, seq_axis, config)
    return config

  def _add_memory(self, config, rngs):
    """The memory-caching hook: gate tokens u_t = W_u x_t, one per head (the paper's)."""
    self.memory = cached_memory(config, self.d_model, gate_heads=self.num_heads,
                                gate_dim=self.head_dim, rngs=rngs)

  def _log_a(self, lead):
    """log lambda broadcast to lead + (h,) for memory caching, or None."""
    log_decay = self._log_decay()
    return None if log_decay is None else jnp.broadcast_to(log_decay, lead + (self.num_heads,))

  def forward(self, x, *, mask, deterministic, segment_ids):
    """x (b, l, d_model) -> (b, l, d_model); segment_ids (b, l) int: packed documents (the
    state restarts where the id changes; not with memory caching)."""
    del mask, deterministic
    q, k, v, aux = self._project(x)
    if self.memory is None:
      attend = (lightning_attention if self.seq_mesh is None else functools.partial(
          lightning_attention_seq_parallel, mesh=self.seq_mesh, seq_axis=self.seq_axis))
      o = attend(q, k, v, self._log_decay(), segment_ids=segment_ids,
                 chunk_size=self.chunk_size, impl=self.impl)
    else:
      o = self.memory.read(x, q, k, v, self._log_a(x.shape[:2]), chunk_size=self.chunk_size)
    return self._finish(o, aux, x)

  def _init_state(self, batch_size, max_len):
    if self.memory is None:
      return self._plain_state(batch_size)
    return self.memory.init_state(batch_size, self.num_heads, self.head_dim, self.value_dim,
                                  max_len=max_len)

  def _step(self, state, x_t):
    q, k, v, aux = self._project(x_t)
    if self.memory is None:
      state, o = self._plain_step(state, q, k, v)
    else:
      state, o = self.memory.step(state, x_t, q, k, v, self._log_a(x_t.shape[:1]))
    return state, self._finish(o, aux, x_t)

  def _log_decay(self):
    return None


class LinearAttention(LinearMemoryMixer):
  """Causal linear attention mixer (b, l, d_model) -> (b, l, d_model).

  Args:
    d_model: model width; num_heads must divide it (default: head dim 64).
    feature_map: "elu1" | "relu" | "identity".
    normalize: True / "denominator", "rmsnorm", or False / "none" (module docstring).
    memory_caching: None or dict(segment_size=..., variant="gated", top_k=None,
      state_init="checkpoint", max_segments=64).
    chunk_size: block length of the parallel form.
    impl: passed to `ssm.ops.lightning_attention`.
    seq_mesh, seq_axis: a jax.sharding.Mesh and its axis splitting the length of the
      parallel form (`ssm.ops.seq_parallel`; the rest of the layer is left to GSPMD), or None.
  """

  name = "linear_attention"

  def __init__(self, d_model: int, *, num_heads: int | None = None, feature_map: str = "elu1",
               normalize: bool | str = True, memory_caching=None, chunk_size: int = 64,
               impl: str = "auto", dtype: str | None = None, param_dtype: str = "float32",
               seq_mesh=None, seq_axis: str = "seq", rngs: nnx.Rngs):
    kind = self.name
    config = self._setup(d_model, num_heads, chunk_size, impl, memory_caching, dtype,
                         param_dtype, seq_mesh, seq_axis)
    if feature_map not in FEATURE_MAPS:
      raise ValueError(f"{kind}: feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
    norm = {True: "denominator", False: "none", None: "none"}.get(normalize, normalize)
    if norm not in NORMALIZE:
      raise ValueError(f"{kind}: normalize must be True, False or one of {NORMALIZE}, "
                       f"got {normalize!r}")
    if norm == "denominator" and feature_map == "identity":
      raise ValueError(f"{kind}: normalize='denominator' needs a non-negative feature map "
                       f"('elu1' or 'relu'); 'identity' can divide by zero")
    self.feature_map, self.normalize = feature_map, norm
    self.value_dim = self.head_dim + (norm == "denominator")
    self.qkv_proj = self.dense(d_model, 3 * d_model, use_bias=False, rngs=rngs)
    self.out_proj = self.dense(d_model, d_model, use_bias=False, rngs=rngs)
    self._add_memory(config, rngs)

  def flops_per_token(self, seq_len: int) -> float:
    return chunked_flops(self.num_heads, self.head_dim, self.value_dim,
                         min(self.chunk_size, seq_len))

  def _project(self, x):
    """x (..., d) -> phi(q), phi(k), v' (..., h, dh[+1]) in the compute dtype (v' = [v, 1]
    with the denominator)."""
    q, k, v = jnp.split(self.qkv_proj(x), 3, axis=-1)
    q, k, v = (split_heads(t, self.num_heads) for t in (q, k, v))
    q, k = feature_map(self.feature_map, q), feature_map(self.feature_map, k)
    if self.normalize == "denominator":
      v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
    return q, k, v, None

  def _finish(self, o, aux, x):
    """o (..., h, dh[+1]) -> (..., d_model) in x's dtype."""
    del aux
    o = o.astype(jnp.result_type(jnp.float32, o))  # the division and norm in float32
    if self.normalize == "denominator":
      o = o[..., :-1] / (o[..., -1:] + DENOM_EPS)
    elif self.normalize == "rmsnorm":
      o = srms_norm(o)
    o = o.reshape(o.shape[:-2] + (self.d_model,))
    return self.out_proj(self.compute(o)).astype(x.dtype)

  def _plain_state(self, batch_size):
    h, dh = self.num_heads, self.head_dim
    state = {"kv": jnp.zeros((batch_size, h, dh, dh), jnp.float32)}
    if self.normalize == "denominator":
      state["z"] = jnp.zeros((batch_size, h, dh), jnp.float32)
    return state

  def _plain_step(self, state, q, k, v):
    if self.normalize == "denominator":
      v = v[..., :-1]
      z = state["z"] + k
      kv = state["kv"] + k[..., :, None] * v[..., None, :]
      num = jnp.einsum("bhk,bhkv->bhv", q, kv)
      den = jnp.einsum("bhk,bhk->bh", q, z)[..., None]
      return {"kv": kv, "z": z}, jnp.concatenate([num, den], axis=-1)
    kv = state["kv"] + k[..., :, None] * v[..., None, :]
    return {"kv": kv}, jnp.einsum("bhk,bhkv->bhv", q, kv)


# Registry factory for kind "linear_attention": the class itself (one source of defaults).
make_mixer = LinearAttention
