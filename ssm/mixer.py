"""The sequence-mixer contract: every kind `models.build_mixer` builds is a `Mixer`.

    mixer(x, *, mask=None, deterministic=True, segment_ids=None) -> y
        x, y (b, l, d_model). mask (b, l) bool, True at real positions: padded rows of x
        are zero already, so only a mixer that mixes over keys (attention) reads it.
        deterministic=False turns dropout on (training). segment_ids (b, l) int: packed
        documents, taken by the mixers that can restart their state there
        (`takes_segments`) and refused by the others.
    mixer.init_state(batch_size, *, max_len=None) -> state
        a pytree (float32 arrays): the recurrent state before the first token. max_len,
        the longest sequence step mode will see, sizes buffers that grow with it (a KV
        cache, memory caching's cached segments); other mixers ignore it.
    mixer.step(state, x_t) -> (state, y_t)
        one token, x_t, y_t (b, d_model), deterministic; a causal mixer's step over a
        sequence equals its parallel form (tests/test_mixer_contract.py holds every
        registered kind to it). A bidirectional mixer (`causal` False) has no step.

The checks are written here once: a subclass implements `forward`, `_init_state` and
`_step` and gets, at the public boundary, the input check (a float array of the right
rank ending in d_model, a non-empty sequence), the state check (the structure and
shapes `init_state` gives; the axis of a growing buffer, `capacity_fields`, is free),
the batch-size and max_len checks, and the refusal of segment_ids it cannot take. The
memory-caching hook of the recurrent mixers is `ssm.memory_caching.CachedMemory`,
held as `self.memory` (None without memory caching).

Precision (every kind takes `dtype` and `param_dtype`, the model's config.model.dtype /
param_dtype): `dtype` is the compute dtype of the mixer's projections and activations
(None: the input's), `param_dtype` that of the projections' weights. The rest stays
float32 whatever they are: the SSM parameters (A, D, dt, the LTI kernels' parameters),
their discretisation and kernel generation, softplus of dt, the recurrent states and
every norm's statistics; the ops (`ssm.ops`) take 16-bit operands and accumulate in
float32. A mixer returns its input's dtype. `self.dense` builds a projection with the
mixer's dtypes, `self.compute(x)` casts an activation to the compute dtype.

FLOPs: `flops_per_token(seq_len)` is the mixer's forward FLOPs per token beyond its
projections' 2 x parameters (the sequence terms: attention's scores, a scan's state
updates); `train.flops` adds it to 6 x parameters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ssm import memory_caching as mcache
from ssm._checks import check_float, dtype_option, optional_positive_int, positive_int


def _describe(tree) -> str:
  """A short structural description of a state: type names, fields and shapes."""
  if tree is None:
    return "None"
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    fields = ", ".join(f"{f}={_describe(getattr(tree, f))}" for f in tree._fields)
    return f"{type(tree).__name__}({fields})"
  if isinstance(tree, dict):
    return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in tree.items()) + "}"
  if isinstance(tree, (list, tuple)):
    return f"{type(tree).__name__}[{', '.join(_describe(v) for v in tree)}]"
  shape = getattr(tree, "shape", None)
  return f"array{tuple(shape)}" if shape is not None else type(tree).__name__


def _path_name(path) -> str:
  """A key path as written in Python: .conv, ['kv'], [0]."""
  out = ""
  for key in path:
    if isinstance(key, jax.tree_util.GetAttrKey):
      out += f".{key.name}"
    elif isinstance(key, jax.tree_util.DictKey):
      out += f"[{key.key!r}]"
    else:
      out += f"[{getattr(key, 'idx', key)}]"
  return out


def _last_name(path) -> str | None:
  key = path[-1] if path else None
  return getattr(key, "name", getattr(key, "key", None))


def check_state(who: str, state, like, *, batch_size: int, capacity_fields=()) -> None:
  """ValueError unless `state` has the structure and leaf shapes of `like` (shapes of
  init_state(batch_size)); leaves named in capacity_fields may differ in axis 1 (a
  buffer sized by max_len)."""
  if jax.tree.structure(state) != jax.tree.structure(like):
    raise ValueError(f"{who}: the step state must come from init_state({batch_size}): "
                     f"expected {_describe(like)}, got {_describe(state)}")
  got = jax.tree_util.tree_flatten_with_path(state)[0]
  for (path, leaf), want in zip(got, jax.tree.leaves(like)):
    shape, want = tuple(jnp.shape(leaf)), tuple(want.shape)
    free = _last_name(path) in capacity_fields and len(shape) == len(want) > 1
    if shape != want and not (free and shape[:1] + shape[2:] == want[:1] + want[2:]):
      raise ValueError(f"{who}: the step state must come from init_state({batch_size}): "
                       f"state{_path_name(path)} must have shape {want}, got {shape}")


class Mixer(nnx.Module):
  """Base of every sequence mixer (the contract is the module docstring).

  Subclasses set `d_model` (and `bidirectional` where they have it) and implement:

    forward(x, *, mask, deterministic, segment_ids) -> y     checked inputs
    _init_state(batch_size, max_len) -> state
    _step(state, x_t) -> (state, y_t)                         checked state and input
  """

  name = "mixer"              # how messages name the mixer
  takes_segments = False      # whether forward restarts its state at segment_ids
  capacity_fields: tuple[str, ...] = ("cached", "summaries")  # memory caching's buffers
  bidirectional = False
  memory = None               # the memory-caching hook (ssm.memory_caching.CachedMemory)
  dtype = None                # compute dtype of projections and activations (None: input's)
  param_dtype = jnp.dtype(jnp.float32)  # the projections' weights (SSM parameters: float32)

  @property
  def causal(self) -> bool:
    return not self.bidirectional

  # -- the checks --------------------------------------------------------------------
  def check_input(self, x, ndim: int, what: str) -> None:
    """A real float array of `ndim` dims ending in d_model; a non-empty sequence."""
    check_float(self.name, **{what: x})
    if x.ndim != ndim or x.shape[-1] != self.d_model:
      raise ValueError(f"{self.name}: {what} must have {ndim} dims ending in "
                       f"d_model={self.d_model}, got shape {x.shape}")
    if ndim == 3 and x.shape[1] < 1:
      raise ValueError(f"{self.name}: empty sequence ({what} {x.shape})")

  def _require_causal(self) -> None:
    if not self.causal:
      raise ValueError(f"{self.name}: a bidirectional mixer has no recurrent step (it is not "
                       "causal)")

  # -- precision (module docstring) ----------------------------------------------------
  def _precision(self, dtype, param_dtype) -> None:
    """Checks and stores the dtype options; call before building projections."""
    self.dtype = dtype_option(self.name, "dtype", dtype, none_ok=True)
    self.param_dtype = dtype_option(self.name, "param_dtype", param_dtype)

  def dense(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, **kwargs) -> nnx.Linear:
    """A projection computing in the mixer's dtype with param_dtype weights."""
    return nnx.Linear(d_in, d_out, dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs,
                      **kwargs)

  def compute(self, x):
    """x in the compute dtype (unchanged when dtype is None)."""
    return x if self.dtype is None else x.astype(self.dtype)

  def flops_per_token(self, seq_len: int) -> float:
    """Forward FLOPs per token beyond 2 x the projections' parameters (module docstring);
    0 for a mixer that is all projections."""
    del seq_len
    return 0.0

  # -- the contract ------------------------------------------------------------------
  def __call__(self, x, *, mask=None, deterministic: bool = True, segment_ids=None):
    """x (b, l, d_model) -> (b, l, d_model); see the module docstring."""
    self.check_input(x, 3, "x")
    if segment_ids is not None:
      if not self.takes_segments:
        raise ValueError(f"mixer {self.name} does not take segment_ids (packed documents)")
      if self.memory is not None:
        raise ValueError(f"{self.name}: segment_ids (packed documents) are not supported "
                         "with memory_caching")
    return self.forward(x, mask=mask, deterministic=deterministic, segment_ids=segment_ids)

  def init_state(self, batch_size: int, *, max_len: int | None = None) -> Any:
    """The state before the first token, for a batch of batch_size."""
    self._require_causal()
    batch_size = positive_int(f"{self.name}.init_state", "batch_size", batch_size)
    max_len = optional_positive_int(f"{self.name}.init_state", "max_len", max_len)
    return self._init_state(batch_size, max_len)

  def step(self, state, x_t):
    """One token: x_t (b, d_model) -> (state, y_t (b, d_model))."""
    self._require_causal()
    self.check_input(x_t, 2, "x_t")
    b = x_t.shape[0]
    check_state(f"{self.name}.step", state, jax.eval_shape(lambda: self._init_state(b, None)),
                batch_size=b, capacity_fields=self.capacity_fields)
    return self._step(state, x_t)

  # -- what a mixer writes ---------------------------------------------------------
  def forward(self, x, *, mask, deterministic, segment_ids):
    raise NotImplementedError

  def _init_state(self, batch_size: int, max_len: int | None):
    raise NotImplementedError

  def _step(self, state, x_t):
    raise NotImplementedError


class CachedMemory(nnx.Module):
  """The memory-caching hook of a recurrent mixer read as a linear memory (q, k, v, log a;
  `ssm.memory_caching`): the validated options and the learned gate tokens
  u_t = W_u x_t (d_model -> gate_heads x gate_dim, the paper's projection; computed in
  float32; the "residual" variant has none). The gate keys are the keys.

    hook.read(x, q, k, v, log_a)          -> y (b, l, h, dv)       parallel form
    hook.init_state(b, h, dk, dv, ...)    -> MemoryCacheState
    hook.step(state, x_t, q, k, v, log_a) -> (state, y_t (b, h, dv))
  """

  def __init__(self, options, d_model: int, *, gate_heads: int, gate_dim: int,
               rngs: nnx.Rngs):
    self.config = mcache.memory_caching_config(options)
    self.gate_heads, self.gate_dim = gate_heads, gate_dim
    self.gate = (nnx.Linear(d_model, gate_heads * gate_dim, use_bias=False, rngs=rngs)
                 if self.config.gated else None)

  def gate_tokens(self, x):
    """x (..., d_model) -> u (..., gate_heads, gate_dim) float32, or None (ungated)."""
    if self.gate is None:
      return None
    u = self.gate(x.astype(jnp.float32))
    return u.reshape(*u.shape[:-1], self.gate_heads, self.gate_dim)

  def read(self, x, q, k, v, log_a=None, *, chunk_size: int = 64, online=None):
    """`cached_memory_read` of the memory (q, k, v, log_a) with x's gate tokens."""
    return mcache.cached_memory_read(q, k, v, log_a, gate_u=self.gate_tokens(x),
                                     chunk_size=chunk_size, online=online,
                                     **self.config.read_kwargs())

  def init_state(self, batch_size: int, heads: int, key_dim: int, value_dim: int, *,
                 key_heads: int | None = None, max_len: int | None = None):
    """The empty cache, with room for max_len tokens (default: max_segments segments);
    key_heads: the keys' head count (1 when shared by all heads; default heads)."""
    return mcache.init_cache_state(batch_size, heads, key_dim, value_dim, gate_heads=key_heads,
                                   gate_dim=key_dim,
                                   max_segments=self.config.capacity(max_len))

  def step(self, state, x_t, q, k, v, log_a=None):
    """`cached_memory_step` of one token with x_t's gate tokens."""
    return mcache.cached_memory_step(state, q, k, v, log_a, gate_u_t=self.gate_tokens(x_t),
                                     **self.config.read_kwargs())


def cached_memory(options, d_model: int, *, gate_heads: int, gate_dim: int,
                  rngs: nnx.Rngs) -> CachedMemory | None:
  """The hook for a mixer's `memory_caching` option (None: no memory caching)."""
  if options is None:
    return None
  return CachedMemory(options, d_model, gate_heads=gate_heads, gate_dim=gate_dim, rngs=rngs)
