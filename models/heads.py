"""Input encoders and output heads.

Encoders: token ids (b, l) -> (b, l, h) by an embedding table (id 0 is padding),
pixels (b, l, c) -> (b, l, h) by a linear map. Heads: pooling + linear decoder
for classification, the LRA retrieval dual-encoder MLP, and the language-model
head (optionally tied to the token embedding).

Precision: encoders return float32 (the residual stream's dtype); the heads' matrix
products run in the model's dtype with float32 accumulation and return float32 logits
(the loss is float32). dtype=None computes in the input's dtype.
"""

import jax
import jax.numpy as jnp
from flax import nnx

POOLINGS = ("mean", "last", "first", "none")

# Up to this vocabulary the embedding's backward is a one-hot matrix product instead of
# XLA's scatter-add: with 257 byte ids and 65,536 tokens (LRA Text) the scatter's atomics
# collide on few rows and it took 0.23-0.48 ms of an H200 train step
# (results/lti_pairs_h200.txt); the product moves (tokens x vocab) bf16 one-hots once.
ONE_HOT_GRAD_MAX_VOCAB = 1024


def _split_bf16(x):
  """float32 x -> (3, ...) bf16 pieces summing to x to float32 rounding (8 + 8 + 8 bits)."""
  hi = x.astype(jnp.bfloat16)
  rest = x - hi.astype(x.dtype)
  mid = rest.astype(jnp.bfloat16)
  return jnp.stack([hi, mid, (rest - mid.astype(x.dtype)).astype(jnp.bfloat16)])


@jax.custom_vjp
def embedding_lookup(table, ids):
  """table (V, h), ids (...) int -> table[ids] (..., h); differentiable in table.

  The gradient sum_{t: ids[t] = v} g[t] is one_hot(ids)^T g for V <= ONE_HOT_GRAD_MAX_VOCAB
  (a one-hot is exact in bf16; float32 g rides as three bf16 pieces in one product with
  float32 accumulation, so the sum is float32-accurate; float64 stays float64) and XLA's
  scatter-add above it.
  """
  return jnp.take(table, ids, axis=0)


def _lookup_fwd(table, ids):
  return jnp.take(table, ids, axis=0), (ids, table)  # the table: a parameter, alive anyway


def _lookup_bwd(res, g):
  ids, table = res
  shape, dtype = table.shape, table.dtype
  vocab, h = shape
  ids, g = ids.reshape(-1), g.reshape(-1, h)
  if vocab > ONE_HOT_GRAD_MAX_VOCAB:
    d_table = jnp.zeros(shape, g.dtype).at[ids].add(g)
  elif g.dtype == jnp.float64:
    d_table = jnp.einsum("nv,nh->vh", jax.nn.one_hot(ids, vocab, dtype=g.dtype), g,
                         precision=jax.lax.Precision.HIGHEST)
  else:
    pieces = _split_bf16(g.astype(jnp.float32))                    # (3, n, h)
    d_table = jnp.einsum("nv,pnh->vh", jax.nn.one_hot(ids, vocab, dtype=jnp.bfloat16),
                         pieces, preferred_element_type=jnp.float32)
  return d_table.astype(dtype), None


embedding_lookup.defvjp(_lookup_fwd, _lookup_bwd)


class TokenEncoder(nnx.Module):
  """Embedding table E (vocab_size, h): ids (...) int -> E[ids] (..., h). Id 0 (padding)
  embeds to zero, so padding contributes nothing even where no mask is given.

  E ~ N(0, init_std^2): 1 as PyTorch's nn.Embedding (S4's LRA encoders); a tied LM
  uses h^-1/2 so that the logits x @ E^T start O(1).
  """

  def __init__(self, vocab_size: int, d_model: int, *, init_std: float = 1.0,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.vocab_size, self.d_model = vocab_size, d_model
    self.embedding = nnx.Param((init_std * jax.random.normal(
        rngs.params(), (vocab_size, d_model), jnp.float32)).astype(param_dtype))

  def __call__(self, ids):
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"token inputs must be integer ids, got dtype {ids.dtype}")
    x = embedding_lookup(self.embedding[...], ids)
    x = x.astype(jnp.result_type(jnp.float32, x))
    return jnp.where((ids != 0)[..., None], x, 0.0)


class PixelEncoder(nnx.Module):
  """Linear map of per-position values: (b, l, c) float -> (b, l, h)."""

  def __init__(self, in_channels: int, d_model: int, *, rngs: nnx.Rngs):
    self.in_channels = in_channels
    self.proj = nnx.Linear(in_channels, d_model, rngs=rngs)

  def __call__(self, x):
    if x.ndim < 1 or x.shape[-1] != self.in_channels:
      raise ValueError(f"pixel inputs must end in in_channels={self.in_channels}, "
                       f"got shape {x.shape}")
    return self.proj(x.astype(jnp.float32))


def pool(x, mask, mode: str):
  """x (b, l, h), mask (b, l) bool or None -> (b, h).

  "mean": mean over real positions; "last": the last real position (for causal
  models: the one that has seen the whole sequence); "first": position 0.
  A row with no real position pools to x[:, 0] ("last") or 0 ("mean").
  """
  b, l, _ = x.shape
  if mode == "first":
    return x[:, 0]
  if mask is None:
    mask = jnp.ones((b, l), bool)
  if mode == "mean":
    w = mask.astype(jnp.float32)[..., None]
    return ((x.astype(jnp.float32) * w).sum(1) / jnp.maximum(w.sum(1), 1.0)).astype(x.dtype)
  if mode == "last":
    last = jnp.max(jnp.where(mask, jnp.arange(l), 0), axis=1)  # (b,)
    return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
  raise ValueError(f"unknown pooling {mode!r}; valid poolings for a sequence-level "
                   f"output: {[p for p in POOLINGS if p != 'none']}")


def head_linear(d_in: int, d_out: int, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
  """A head's projection: products in dtype, float32 accumulation and output."""
  return nnx.Linear(d_in, d_out, dtype=dtype, param_dtype=param_dtype,
                    preferred_element_type=None if dtype is None else jnp.float32, rngs=rngs)


class ClassificationHead(nnx.Module):
  """pool then Linear(h -> num_classes): (b, l, h), mask -> (b, num_classes)."""

  def __init__(self, d_model: int, num_classes: int, *, pooling: str = "mean", dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if pooling not in POOLINGS or pooling == "none":
      raise ValueError(f"unknown pooling {pooling!r} for classification; valid: "
                       f"{[p for p in POOLINGS if p != 'none']}")
    self.pooling = pooling
    self.decoder = head_linear(d_model, num_classes, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)

  def __call__(self, x, mask=None):
    return self.decoder(pool(x, mask, self.pooling))


class RetrievalHead(nnx.Module):
  """The LRA/S4 retrieval head on two pooled encodings u, v (b, h):

      logits = W2 gelu(W1 [u, v, u * v, u - v] + b1) + b2,   hidden mlp_dim.
  """

  def __init__(self, d_model: int, num_classes: int, *, mlp_dim: int, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if not isinstance(mlp_dim, int) or mlp_dim < 1:
      raise ValueError(f"retrieval_mlp_dim must be a positive int, got {mlp_dim!r}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = head_linear(4 * d_model, mlp_dim, **kw)
    self.fc2 = head_linear(mlp_dim, num_classes, **kw)

  def __call__(self, u, v):
    feats = jnp.concatenate([u, v, u * v, u - v], axis=-1)
    return self.fc2(jax.nn.gelu(self.fc1(feats), approximate=False))


class LMHead(nnx.Module):
  """Linear(h -> vocab): (..., h) -> (..., vocab). For tied embeddings the model
  computes x @ E^T itself (see `tied_logits`) and has no LMHead."""

  def __init__(self, d_model: int, num_classes: int, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.proj = head_linear(d_model, num_classes, dtype=dtype, param_dtype=param_dtype,
                            rngs=rngs)

  def __call__(self, x):
    return self.proj(x)


def tied_logits(x, embedding, dtype=None):
  """x (..., h), embedding E (vocab, h) -> x @ E^T (..., vocab): products in dtype (None:
  x's), accumulated and returned in float32 (or wider)."""
  dtype = x.dtype if dtype is None else dtype
  out = jnp.result_type(jnp.float32, x)
  return jnp.einsum("...h,vh->...v", x.astype(dtype), embedding.astype(dtype),
                    preferred_element_type=out)
