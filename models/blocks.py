"""Residual blocks, norms, position-wise FFNs and the backbone that stacks them.

Every sequence module here maps x (b, l, h) -> (b, l, h) and takes

    mask (b, l) bool, True at real positions (None: all real). Padded positions
      are held at zero in the residual stream after every block, BatchNorm
      statistics ignore them and every mixer is told about them (attention reads
      the mask; the others see zeros there), so padding never leaks into real
      positions through a causal mixer, and only as zeros through a bidirectional
      convolution. Mixers follow `ssm.mixer.Mixer`'s contract.
    deterministic: True turns dropout off and makes BatchNorm use its running
      statistics (evaluation); False is training.

Block layout (`prenorm` picks):

    prenorm:   x = x + drop(mixer(norm(x)));   x = x + drop(ffn(norm_ffn(x)))
    postnorm:  x = norm(x + drop(mixer(x)));   x = norm_ffn(x + drop(ffn(x)))

A prenorm backbone ends with a final norm (the residual stream is otherwise
never normalised); a postnorm one does not need it.

Precision: the residual stream is float32 (as Mamba's residual_in_fp32); the norms keep
float32 parameters and statistics; the mixers and FFNs compute in the model's `dtype`
(their projections cast the normalised input) and return float32 to the stream.

Rematerialisation (`remat`): "none" keeps every activation for the backward pass;
"block" keeps only each block's input and recomputes the block; the name of a
`jax.checkpoint_policies` policy (REMAT_POLICIES, e.g. "dots_with_no_batch_dims_saveable":
keep the matmul outputs, recompute the elementwise work) remats each block with it.

Scanned layers (`scan_layers`): the backbone runs its blocks as one `jax.lax.scan` over
their states stacked along a new leading axis, so XLA compiles (and a Pallas kernel lowers)
one block instead of num_layers; the outputs and gradients equal the unrolled loop's
(tested), and the parameters keep their per-layer layout (checkpoints are the same). It
needs blocks of one structure (same mixer kind and options: `nnx.graphdef` equal), which
the registry's mixers give; lightning's per-layer decay is an array, so it scans too.
Dropout streams are per block (nnx forks them), BatchNorm statistics come back per block;
a block that updated any other variable in training is refused while tracing (it would be
lost), so nothing is dropped silently. It trades step time for compile time: the bf16
GPT-2-small LM step (12 layers, 16 x 2048 tokens) on an H100 took 105.6 ms scanned against
70.6 ms unrolled and compiled in 9.8 s against 34-41 s (2026-12-06,
results/lm_step_ab_h100.txt), so it stays off by default: for deep models and quick
iteration, not for throughput.

Recurrent mode (causal mixers only): `init_state(batch_size)` and
`step(state, x_t) -> (state, y_t)` on one position x_t (b, h); dropout is off and
BatchNorm uses running statistics, so step mode equals the parallel forward with
deterministic=True.
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ssm._activations import ACTIVATIONS as _ACT_FNS
from ssm._checks import check_float, optional_positive_int, positive_int
from ssm.mixer import Mixer

NORMS = ("layer", "rms", "batch")
FFNS = ("none", "mlp", "glu")
# The FFN's nonlinearity (the table in ssm._activations: "gelu" exact, "gelu_tanh" GPT-2's).
FFN_ACTIVATIONS = {name: _ACT_FNS[name] for name in ("gelu", "gelu_tanh", "silu", "relu")}
REMAT_POLICIES = ("dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable",
                  "everything_saveable")
REMATS = ("none", "block") + REMAT_POLICIES


def remat_policy(name: str):
  """A `remat` option -> (whether to remat, the jax.checkpoint policy or None)."""
  if name not in REMATS:
    raise ValueError(f"unknown remat {name!r}; valid: {list(REMATS)}")
  if name in ("none", "block"):
    return name == "block", None
  return True, getattr(jax.checkpoint_policies, name)


def _residual(x):
  """x in the residual stream's dtype: float32 (float64 when x is, in tests)."""
  return x.astype(jnp.result_type(jnp.float32, x))


def zero_padding(x, mask):
  """x (b, l, h) or (b, h) with mask (b, l) or (b,) -> x with padded rows set to 0."""
  if mask is None:
    return x
  return jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))


# -- norms ------------------------------------------------------------------------
# All three take (..., h) and the keyword arguments mask/deterministic, so blocks
# treat them alike; statistics are computed in float32, the output keeps x's dtype.

class LayerNorm(nnx.Module):
  """(x - mean) / sqrt(var + eps) * scale + bias over the feature axis."""

  def __init__(self, d_model: int, *, epsilon: float = 1e-5, rngs: nnx.Rngs):
    del rngs
    self.epsilon = epsilon
    self.scale = nnx.Param(jnp.ones((d_model,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((d_model,), jnp.float32))

  def __call__(self, x, *, mask=None, deterministic: bool = False):
    del mask, deterministic
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class RMSNorm(nnx.Module):
  """x / sqrt(mean(x^2) + eps) * scale over the feature axis (no centring, no bias)."""

  def __init__(self, d_model: int, *, epsilon: float = 1e-6, rngs: nnx.Rngs):
    del rngs
    self.epsilon = epsilon
    self.scale = nnx.Param(jnp.ones((d_model,), jnp.float32))

  def __call__(self, x, *, mask=None, deterministic: bool = False):
    del mask, deterministic
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.epsilon)
    return (y * self.scale[...]).astype(x.dtype)


def masked_moments(x, mask):
  """Per-feature mean and (biased) variance of x (..., h) over the positions where mask
  (...) is True, in float32. An all-False mask gives mean 0, variance 0 (not NaN)."""
  x32 = x.astype(jnp.float32).reshape(-1, x.shape[-1])
  if mask is None:
    w = jnp.ones((x32.shape[0], 1), jnp.float32)
  else:
    w = mask.reshape(-1, 1).astype(jnp.float32)
  count = jnp.maximum(w.sum(), 1.0)
  mean = (w * x32).sum(0) / count
  var = (w * jnp.square(x32 - mean)).sum(0) / count  # two-pass: no cancellation
  return mean, var


class BatchNorm(nnx.Module):
  """Batch norm per feature over (batch, length), as S4's LRA models use it
  (PyTorch BatchNorm1d over channels): statistics over the real positions only.

  Training (deterministic=False): normalise by the masked batch statistics and
  update the running ones, r <- momentum r + (1 - momentum) batch, with momentum
  0.9 (PyTorch's default 0.1 in its convention). Evaluation and step mode use the
  running statistics. Running variance stores the biased batch variance, as Flax.
  Under jit with a data-parallel sharded batch the mean is global across devices.
  """

  def __init__(self, d_model: int, *, momentum: float = 0.9, epsilon: float = 1e-5,
               rngs: nnx.Rngs):
    del rngs
    self.momentum, self.epsilon = momentum, epsilon
    self.scale = nnx.Param(jnp.ones((d_model,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((d_model,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((d_model,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((d_model,), jnp.float32))

  def __call__(self, x, *, mask=None, deterministic: bool = False):
    if deterministic:
      mean, var = self.mean[...], self.var[...]
    else:
      mean, var = masked_moments(x, mask)
      m = self.momentum
      self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean)
      self.var[...] = jax.lax.stop_gradient(m * self.var[...] + (1 - m) * var)
    y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def make_norm(kind: str, d_model: int, *, rngs: nnx.Rngs) -> nnx.Module:
  if kind == "layer":
    return LayerNorm(d_model, rngs=rngs)
  if kind == "rms":
    return RMSNorm(d_model, rngs=rngs)
  if kind == "batch":
    return BatchNorm(d_model, rngs=rngs)
  raise ValueError(f"unknown norm {kind!r}; valid norms: {list(NORMS)}")


# -- position-wise feed-forward -----------------------------------------------------

class FFN(nnx.Module):
  """Position-wise feed-forward, hidden width mult * d_model.

  "mlp": fc2(act(fc1(x)));  "glu": fc2(act(gate(x)) * fc1(x)) (GEGLU with act = gelu,
  Shazeer 2020); act one of FFN_ACTIVATIONS (default the exact GELU).
  Works on (..., h), so the same module serves the parallel and the step mode.
  """

  def __init__(self, d_model: int, *, kind: str, mult: int, activation: str = "gelu",
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if kind not in ("mlp", "glu"):
      raise ValueError(f"unknown ffn {kind!r}; valid ffn kinds: {list(FFNS)}")
    if activation not in FFN_ACTIVATIONS:
      raise ValueError(f"unknown ffn activation {activation!r}; valid: {list(FFN_ACTIVATIONS)}")
    if not isinstance(mult, int) or mult < 1:
      raise ValueError(f"ffn_mult must be a positive int, got {mult!r}")
    hidden = mult * d_model
    self.kind = kind
    self.act = FFN_ACTIVATIONS[activation]
    dense = lambda i, o: nnx.Linear(i, o, dtype=dtype, param_dtype=param_dtype, rngs=rngs)  # noqa: E731
    self.fc1 = dense(d_model, hidden)
    self.gate = dense(d_model, hidden) if kind == "glu" else None
    self.fc2 = dense(hidden, d_model)

  def __call__(self, x):
    """x (..., h) -> (..., h) in x's dtype (computed in the dtype given at build)."""
    if self.kind == "glu":
      y = self.fc2(self.act(self.gate(x)) * self.fc1(x))
    else:
      y = self.fc2(self.act(self.fc1(x)))
    return y.astype(x.dtype)


# -- residual block -----------------------------------------------------------------

class ResidualBlock(nnx.Module):
  """A mixer sub-block and an optional FFN sub-block, each with norm, dropout and a
  residual connection (layout in the module docstring).

  Args:
    mixer: a sequence mixer (b, l, h) -> (b, l, h) from `models.build_mixer`: an
      `ssm.mixer.Mixer`, which takes mask, deterministic and segment_ids.
    norm: "layer" | "rms" | "batch".
    prenorm: True for x + f(norm(x)), False for norm(x + f(x)).
    ffn: "none" | "mlp" | "glu"; ffn_mult its hidden width in units of d_model;
      ffn_activation its nonlinearity (FFN_ACTIVATIONS).
    dropout: rate on each residual branch's output.
    dtype, param_dtype: the FFN's compute and weight dtypes (the mixer has its own).
    gather_mesh, seq_axis: a jax.sharding.Mesh whose axis seq_axis splits the length, for a
      mixer without a sequence-parallel path of its own (attention, memory caching; an LTI
      mixer built without seq_mesh): its input is constrained to the whole length on every
      device (an all-gather over seq_axis, batch still split over the other axes) and its
      output split over seq_axis again, so the layer computes exactly as unsplit and the
      rest of the block stays split. None (default): no constraint.
  """

  def __init__(self, mixer: nnx.Module, d_model: int, *, norm: str = "layer",
               prenorm: bool = True, ffn: str = "none", ffn_mult: int = 2,
               ffn_activation: str = "gelu", dropout: float = 0.0, dtype=None,
               param_dtype=jnp.float32, gather_mesh=None,
               seq_axis: str = "seq", rngs: nnx.Rngs):
    if not isinstance(mixer, Mixer):
      raise TypeError(f"ResidualBlock: mixer must be an ssm.mixer.Mixer (the mixer contract), "
                      f"got {type(mixer).__name__}")
    if ffn not in FFNS:
      raise ValueError(f"unknown ffn {ffn!r}; valid ffn kinds: {list(FFNS)}")
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    d_model = positive_int("ResidualBlock", "d_model", d_model)
    positive_int("ResidualBlock", "ffn_mult", ffn_mult)
    self.mixer = mixer
    self.gather_mesh, self.seq_axis = gather_mesh, seq_axis
    self.prenorm = bool(prenorm)
    self.norm = make_norm(norm, d_model, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    if ffn == "none":
      self.ffn, self.ffn_norm = None, None
    else:
      self.ffn = FFN(d_model, kind=ffn, mult=ffn_mult, activation=ffn_activation, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)
      self.ffn_norm = make_norm(norm, d_model, rngs=rngs)

  def _sublayer(self, x, f, norm, mask, deterministic):
    """One residual sub-block: prenorm x + drop(f(norm(x))) or postnorm norm(x + drop(f(x)))."""
    if self.prenorm:
      # Re-zero padding after the norm (a norm's bias would make it nonzero), so
      # the mixer always sees zeros there.
      u = zero_padding(norm(x, mask=mask, deterministic=deterministic), mask)
      return x + self.dropout(f(u), deterministic=deterministic)
    y = x + self.dropout(f(x), deterministic=deterministic)
    return norm(y, mask=mask, deterministic=deterministic)

  def __call__(self, x, *, mask=None, deterministic: bool = False, segment_ids=None):
    """x (b, l, h), mask (b, l) bool or None -> (b, l, h). segment_ids (b, l) int or None:
    packed documents, passed to mixers that take them (the recurrent ones restart their
    state where the id changes); a mixer that cannot take them refuses them."""
    mix = lambda u: self.mixer(u, mask=mask, deterministic=deterministic,
                               segment_ids=segment_ids)
    if self.gather_mesh is not None:
      mix = self._gathered(mix)
    x = self._sublayer(x, mix, self.norm, mask, deterministic)
    if self.ffn is not None:
      x = self._sublayer(x, self.ffn, self.ffn_norm, mask, deterministic)
    return zero_padding(x, mask)

  def _gathered(self, mix):
    """mix with its input whole over the length and its output split over seq_axis."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh, seq = self.gather_mesh, self.seq_axis
    batch = tuple(a for a in mesh.axis_names if a != seq) or None
    whole = NamedSharding(mesh, P(batch, None, None))
    split = NamedSharding(mesh, P(batch, seq, None))

    def run(u):
      y = mix(jax.lax.with_sharding_constraint(u, whole))
      return jax.lax.with_sharding_constraint(y, split)
    return run

  def init_state(self, batch_size: int, *, max_len: int | None = None) -> Any:
    batch_size = positive_int("ResidualBlock", "batch_size", batch_size)
    max_len = optional_positive_int("ResidualBlock", "max_len", max_len)
    return self.mixer.init_state(batch_size, max_len=max_len)

  def step(self, state, x_t, *, mask_t=None):
    """x_t (b, h), mask_t (b,) bool or None -> (state, y_t (b, h)). Evaluation mode."""
    box = {}

    def mix(u):
      box["state"], y = self.mixer.step(state, u)
      return y

    x_t = self._sublayer(x_t, mix, self.norm, mask_t, True)
    if self.ffn is not None:
      x_t = self._sublayer(x_t, self.ffn, self.ffn_norm, mask_t, True)
    return box["state"], zero_padding(x_t, mask_t)


def _leaves_by_path(state) -> dict:
  """{path string: leaf} of an nnx.State."""
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def _updated_in_training(block) -> list[type]:
  """The variable types a training-mode forward pass of block changes: dropout streams'
  counts when a dropout rate is nonzero, BatchNorm running statistics when it has them."""
  kinds = []
  modules = [m for _, m in nnx.iter_graph(block) if isinstance(m, nnx.Module)]
  if any(isinstance(m, nnx.Dropout) and m.rate > 0 for m in modules):
    kinds.append(nnx.RngCount)
  if nnx.state(block, nnx.BatchStat):
    kinds.append(nnx.BatchStat)
  return kinds


class Backbone(nnx.Module):
  """num_layers residual blocks (one per mixer), plus a final norm when prenorm.

  Args:
    mixers: one sequence mixer per layer (distinct modules).
    d_model, norm, prenorm, ffn, ffn_mult, ffn_activation, dropout, dtype, param_dtype: as
      `ResidualBlock`.
    remat: "none" | "block" | a REMAT_POLICIES name (module docstring).
    scan_layers: run the blocks as one lax.scan (module docstring); ValueError at build
      when the blocks differ in structure.
    gather_mesh, seq_axis: as `ResidualBlock`, for the blocks whose mixer has no
      seq_mesh of its own (a mixer built with seq_mesh runs sequence-parallel itself).
  """

  def __init__(self, mixers: Sequence[nnx.Module], d_model: int, *, norm: str = "layer",
               prenorm: bool = True, ffn: str = "none", ffn_mult: int = 2,
               ffn_activation: str = "gelu", dropout: float = 0.0, dtype=None,
               param_dtype=jnp.float32, remat: str = "none", scan_layers: bool = False,
               gather_mesh=None, seq_axis: str = "seq", rngs: nnx.Rngs):
    if not mixers:
      raise ValueError("Backbone needs at least one mixer (num_layers >= 1)")
    if len({id(m) for m in mixers}) != len(mixers):
      raise ValueError("Backbone mixers must be distinct modules (one per layer)")
    self.d_model = positive_int("Backbone", "d_model", d_model)
    self.remat, self.remat_policy = remat_policy(remat)
    self.blocks = nnx.List([
        ResidualBlock(m, d_model, norm=norm, prenorm=prenorm, ffn=ffn, ffn_mult=ffn_mult,
                      ffn_activation=ffn_activation, dropout=dropout, dtype=dtype,
                      param_dtype=param_dtype,
                      gather_mesh=(None if getattr(m, "seq_mesh", None) is not None
                                   else gather_mesh), seq_axis=seq_axis, rngs=rngs)
        for m in mixers])
    self.final_norm = make_norm(norm, d_model, rngs=rngs) if prenorm else None
    self.scan_layers = bool(scan_layers)
    if self.scan_layers:
      first = nnx.graphdef(self.blocks[0])
      for i, block in enumerate(self.blocks[1:], 1):
        if nnx.graphdef(block) != first:
          raise ValueError(f"Backbone: scan_layers needs blocks of one structure; block {i} "
                           f"({type(block.mixer).__name__}) differs from block 0 "
                           f"({type(self.blocks[0].mixer).__name__}): set scan_layers=False")

  def _check(self, x, ndim, what):
    check_float("Backbone", **{what: x})
    if x.ndim != ndim or x.shape[-1] != self.d_model:
      raise ValueError(f"Backbone: {what} must have {ndim} dims ending in "
                       f"d_model={self.d_model}, got shape {x.shape}")

  def __call__(self, x, *, mask=None, deterministic: bool = False, segment_ids=None):
    """x (b, l, h), mask (b, l) bool or None, segment_ids (b, l) int or None (packed
    documents, see Block) -> (b, l, h)."""
    self._check(x, 3, "x")
    if mask is not None and mask.shape != x.shape[:2]:
      raise ValueError(f"Backbone: mask shape {mask.shape} != (batch, length) {x.shape[:2]}")
    if segment_ids is not None and jnp.shape(segment_ids) != x.shape[:2]:
      raise ValueError(f"Backbone: segment_ids shape {jnp.shape(segment_ids)} != (batch, "
                       f"length) {x.shape[:2]}")
    x = zero_padding(_residual(x), mask)

    def apply(block, x, mask, segment_ids):
      return block(x, mask=mask, deterministic=deterministic, segment_ids=segment_ids)

    if self.scan_layers:
      x = self._scanned(apply, x, mask, segment_ids, deterministic)
    else:
      if self.remat:
        apply = nnx.remat(apply, policy=self.remat_policy)
      for block in self.blocks:
        x = apply(block, x, mask, segment_ids)
    if self.final_norm is not None:
      x = zero_padding(self.final_norm(x, mask=mask, deterministic=deterministic), mask)
    return x

  def _scanned(self, apply, x, mask, segment_ids, deterministic):
    """The blocks as one lax.scan: each block's parameters and other state stacked on a
    leading layer axis; the body rebuilds block i from slice i. What a forward pass updates
    (in training only: dropout streams' counts where a rate is nonzero, BatchNorm running
    statistics) comes back stacked and is written to each block, as the loop would."""
    graphdef = nnx.graphdef(self.blocks[0])
    params, rest = zip(*(nnx.state(b, nnx.Param, ...) for b in self.blocks))
    stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)  # noqa: E731
    mutated = [] if deterministic else _updated_in_training(self.blocks[0])

    def body(x, layer):
      block = nnx.merge(graphdef, *layer)
      before = _leaves_by_path(nnx.state(block, nnx.Not(nnx.Param)))
      x = apply(block, x, mask, segment_ids)
      after = _leaves_by_path(nnx.state(block, nnx.Not(nnx.Param)))
      kept = _leaves_by_path(nnx.state(block, nnx.Any(*mutated))) if mutated else {}
      # Checked while tracing: any other variable the block changed would be lost here.
      lost = [p for p, v in after.items() if v is not before[p] and p not in kept]
      if lost:
        raise ValueError(f"Backbone: scan_layers cannot carry what block updates in {lost}; "
                         f"set scan_layers=False")
      return x, nnx.state(block, nnx.Any(*mutated)) if mutated else None

    if self.remat:
      body = jax.checkpoint(body, policy=self.remat_policy, prevent_cse=False)
    x, new = jax.lax.scan(body, x, (stack(params), stack(rest)))
    if mutated:
      for i, block in enumerate(self.blocks):
        nnx.update(block, jax.tree.map(lambda a, i=i: a[i], new))
    return x

  def init_state(self, batch_size: int, *, max_len: int | None = None) -> list:
    """Per-layer recurrent states. max_len sizes the KV cache of attention mixers
    (their state grows O(max_len), unlike an SSM's); others ignore it."""
    batch_size = positive_int("Backbone", "batch_size", batch_size)
    return [block.init_state(batch_size, max_len=max_len) for block in self.blocks]

  def step(self, state: list, x_t, *, mask_t=None):
    """One position: x_t (b, h), mask_t (b,) bool or None -> (state, y_t (b, h))."""
    self._check(x_t, 2, "x_t")
    if not isinstance(state, (list, tuple)) or len(state) != len(self.blocks):
      raise ValueError(f"Backbone.step: state must be a list of {len(self.blocks)} "
                       "per-layer states (from init_state)")
    x_t = zero_padding(_residual(x_t), mask_t)
    new_state = []
    for block, s in zip(self.blocks, state):
      s, x_t = block.step(s, x_t, mask_t=mask_t)
      new_state.append(s)
    if self.final_norm is not None:
      x_t = zero_padding(self.final_norm(x_t, mask=mask_t, deterministic=True), mask_t)
    return new_state, x_t
