"""Whole models (encoder -> backbone -> head) and `build_model(model_cfg, task, rngs=...)`.

    model(batch, deterministic=...) -> logits
      classification: batch["inputs"] (b, l) int ids or (b, l, c) pixels, batch["mask"]
                      (b, l) bool  ->  (b, num_classes)
      retrieval:      batch["inputs"] (b, 2, l), batch["mask"] (b, 2, l)  ->  (b, num_classes)
      lm:             batch["inputs"] (b, l) int ids  ->  (b, l, num_classes)

Padding: for classification and retrieval batch["mask"] marks the real positions
(missing: ids != 0 for tokens, all real for pixels). For lm batch["mask"] is the
*loss* mask (MQAR scores only some positions), so the padding mask is ids != 0.
Padded positions are zeroed after the encoder and held at zero through the
backbone; pooling and BatchNorm statistics ignore them.

config.model fields (all but `name` have defaults, see MODEL_DEFAULTS):
  name          a mixer kind of `models.MIXERS`, or "transformer" (= "attention")
  d_model, num_layers
  dropout       residual-branch dropout (a mixer's own dropout goes in `mixer`)
  norm          "layer" | "rms" | "batch";  prenorm (bool)
  ffn           "none" | "mlp" | "glu";  ffn_mult (hidden = ffn_mult * d_model);
                ffn_activation "gelu" (exact) | "gelu_tanh" (GPT-2's) | "silu" | "relu"
  pooling       "mean" | "last" | "first" | "none" (classification/retrieval need one of
                the first three; lm ignores it: it predicts at every position)
  bidirectional passed to the mixer only when True; refused for lm
  tie_embeddings  lm: logits = x @ E^T with E the token embedding (no separate head)
  retrieval_mlp_dim  hidden width of the retrieval head
  mixer         extra keyword options for `models.build_mixer` (validated there). A
                mixer whose factory takes `layer_idx` / `num_layers` gets them (per-layer
                settings, e.g. lightning attention's decay) unless set here.
  dtype         "float32" | "bfloat16": activations and matrix products (mixers, FFNs,
                heads). The residual stream, SSM parameters and their kernels, softplus
                of dt, recurrent states, norms' statistics, logits and the loss stay
                float32 (`ssm.mixer`, `models.blocks`, `models.heads` say where).
  param_dtype   "float32" | "bfloat16": the projections' and embedding's weights (norms
                and SSM parameters are float32 whatever it is); the optimizer state
                follows the parameters.
  remat         "none" | "block" | a jax.checkpoint_policies name (`models.blocks.REMATS`)
  scan_layers   run the blocks as one lax.scan (one block compiled, not num_layers;
                `models.blocks`); same parameters, outputs and gradients

Sequence parallelism (not a config field: a Mesh is no config value; the trainer builds
it from config.train.mesh): `build_model(..., seq_mesh=mesh)` with a mesh whose axis
`seq_axis` ("seq") splits the length. The mixers with a sequence-parallel path (mamba,
mamba2, linear_attention, lightning, and the LTI convolutions lssl, s4, s4d, sgconv:
`seq_mesh` among their options, and no memory_caching) get it: the first four run their
scan split over the axis (`ssm.ops.seq_parallel`), the LTI layers their FFT convolution
(`ssm.ops.fft_conv_seq_parallel`: a distributed FFT, or an all-gather of the length around
the convolution alone, by the mixer's seq_conv option, "auto" by the bytes each moves).
Every other layer runs correctly on a sequence-split input: attention and memory caching
have their input all-gathered over the length and their output split again
(`models.blocks.ResidualBlock`, gather_mesh), exactly the unsplit computation with no
memory saving in that layer; norms, FFNs, embedding, heads and the loss are pointwise
or reductions, partitioned by GSPMD. The length (task.seq_len) must be a multiple of the
axis size (ValueError naming it otherwise).
"""

import logging
from typing import Any, Mapping

import jax.numpy as jnp
from flax import nnx

from data.task import TaskSpec
from models.blocks import FFN_ACTIVATIONS, FFNS, NORMS, REMATS, Backbone
from ssm._checks import dtype_option
from ssm.ops.seq_parallel import check_seq_mesh
from models.heads import (POOLINGS, ClassificationHead, LMHead, PixelEncoder, RetrievalHead,
                          TokenEncoder, pool, tied_logits)
from models.registry import MIXERS, build_mixer, mixer_options

# The one place the model section's fields and defaults are written (configs/common.py's
# base_config builds config.model from it).
MODEL_DEFAULTS: dict[str, Any] = {
    "name": None,              # required: a mixer kind or an alias
    "d_model": 128,
    "num_layers": 4,
    "dropout": 0.0,
    "norm": "layer",           # "layer" | "rms" | "batch"
    "prenorm": True,
    "ffn": "none",             # "none" | "mlp" | "glu"
    "ffn_mult": 2,
    "ffn_activation": "gelu",  # models.blocks.FFN_ACTIVATIONS
    "pooling": "mean",         # "mean" | "last" | "first" | "none"
    "bidirectional": False,
    "tie_embeddings": False,
    "retrieval_mlp_dim": 256,
    "mixer": {},               # extra keyword options for models.build_mixer
    "dtype": "float32",        # "float32" | "bfloat16": activations and matrix products
    "param_dtype": "float32",  # the projections' weights
    "remat": "none",           # "none" | "block" | a jax.checkpoint_policies name
    "scan_layers": False,      # the blocks as one lax.scan (models.blocks)
}
ALIASES = {"transformer": "attention"}

log = logging.getLogger(__name__)


def model_names() -> list[str]:
  return sorted(set(MIXERS) | set(ALIASES))


def _as_dict(cfg) -> dict:
  if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict (resolves references)
    return cfg.to_dict()
  if isinstance(cfg, Mapping):
    return dict(cfg)
  raise ValueError(f"model config must be a ConfigDict or a mapping, got {type(cfg).__name__}")


def resolve_config(model_cfg) -> dict:
  """Validate config.model and fill in defaults; ValueError lists the valid keys/values."""
  cfg = _as_dict(model_cfg)
  unknown = sorted(set(cfg) - set(MODEL_DEFAULTS))
  if unknown:
    raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(MODEL_DEFAULTS)}")
  cfg = {**MODEL_DEFAULTS, **cfg}
  if cfg["name"] not in model_names():
    raise ValueError(f"unknown model name {cfg['name']!r}; valid names: {model_names()}")
  for key in ("dtype", "param_dtype"):
    cfg[key] = dtype_option("model", key, cfg[key]).name
  for key, valid in (("norm", NORMS), ("ffn", FFNS), ("ffn_activation", FFN_ACTIVATIONS),
                     ("pooling", POOLINGS), ("remat", REMATS)):
    if cfg[key] not in valid:
      raise ValueError(f"unknown model {key} {cfg[key]!r}; valid: {list(valid)}")
  for key in ("d_model", "num_layers", "ffn_mult", "retrieval_mlp_dim"):
    if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
      raise ValueError(f"model {key} must be a positive int, got {cfg[key]!r}")
  for key in ("prenorm", "bidirectional", "tie_embeddings", "scan_layers"):
    if not isinstance(cfg[key], bool):
      raise ValueError(f"model {key} must be a bool, got {cfg[key]!r}")
  if not isinstance(cfg["dropout"], (int, float)) or not 0.0 <= cfg["dropout"] < 1.0:
    raise ValueError(f"model dropout must be in [0, 1), got {cfg['dropout']!r}")
  cfg["mixer"] = _as_dict(cfg["mixer"] if cfg["mixer"] is not None else {})
  for key in ("bidirectional", "dtype", "param_dtype"):
    if key in cfg["mixer"]:
      raise ValueError(f"set model.{key}, not model.mixer.{key}")
  return cfg


# -- input handling -------------------------------------------------------------------

def _check_mask(mask, shape, what):
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.shape != shape:
    raise ValueError(f"{what} mask has shape {mask.shape}, expected {shape}")
  return mask.astype(bool)


class _Encoded(nnx.Module):
  """Shared part: input encoder + backbone."""

  def __init__(self, task: TaskSpec, backbone: Backbone, *, rngs: nnx.Rngs,
               init_std: float = 1.0, param_dtype=jnp.float32):
    d_model = backbone.d_model
    self.input_kind = task.input_kind
    if task.input_kind == "tokens":
      self.encoder = TokenEncoder(task.vocab_size, d_model, init_std=init_std,
                                  param_dtype=param_dtype, rngs=rngs)
    else:
      self.encoder = PixelEncoder(task.in_channels, d_model, rngs=rngs)
    self.backbone = backbone

  def _embed(self, inputs, mask, what):
    """inputs (b, l) ids or (b, l[, c]) pixels, mask (b, l) or None -> x (b, l, h), mask."""
    inputs = jnp.asarray(inputs)
    if self.input_kind == "tokens":
      if inputs.ndim != 2 or not jnp.issubdtype(inputs.dtype, jnp.integer):
        raise ValueError(f"{what}: token inputs must be (batch, length) integer ids, got "
                         f"shape {inputs.shape} dtype {inputs.dtype}")
      mask = _check_mask(mask, inputs.shape, what)
      if mask is None:
        mask = inputs != 0
    else:
      if inputs.ndim == 2 and self.encoder.in_channels == 1:
        inputs = inputs[..., None]  # (b, l) grey values: one channel, unambiguous
      if inputs.ndim != 3:
        raise ValueError(f"{what}: pixel inputs must be (batch, length, channels), got "
                         f"shape {inputs.shape}")
      mask = _check_mask(mask, inputs.shape[:2], what)
    return self.encoder(inputs), mask

  def features(self, inputs, mask, *, deterministic: bool, what: str = "model",
               segment_ids=None):
    """Backbone output (b, l, h) and the padding mask (b, l) (None: all real)."""
    x, mask = self._embed(inputs, mask, what)
    return self.backbone(x, mask=mask, deterministic=deterministic,
                         segment_ids=segment_ids), mask


def _get(batch, key, what):
  if key not in batch:
    raise ValueError(f"{what}: batch has no {key!r} (keys: {sorted(batch)})")
  return batch[key]


class Classifier(_Encoded):
  """One sequence -> one label: backbone, pooling, linear decoder."""

  def __init__(self, task: TaskSpec, backbone: Backbone, *, pooling: str, rngs: nnx.Rngs,
               **precision):
    super().__init__(task, backbone, rngs=rngs, param_dtype=precision["param_dtype"])
    self.head = ClassificationHead(backbone.d_model, task.num_classes, pooling=pooling,
                                   rngs=rngs, **precision)

  def __call__(self, batch, *, deterministic: bool):
    x, mask = self.features(_get(batch, "inputs", "classifier"), batch.get("mask"),
                            deterministic=deterministic, what="classifier")
    return self.head(x, mask)


class RetrievalModel(_Encoded):
  """LRA retrieval: both sequences through one shared backbone (as one batch of 2b),
  pooled to u, v, then `RetrievalHead` on [u, v, u * v, u - v]."""

  def __init__(self, task: TaskSpec, backbone: Backbone, *, pooling: str, mlp_dim: int,
               rngs: nnx.Rngs, **precision):
    if pooling not in POOLINGS or pooling == "none":
      raise ValueError(f"unknown pooling {pooling!r} for retrieval; valid: "
                       f"{[p for p in POOLINGS if p != 'none']}")
    super().__init__(task, backbone, rngs=rngs, param_dtype=precision["param_dtype"])
    self.pooling = pooling
    self.head = RetrievalHead(backbone.d_model, task.num_classes, mlp_dim=mlp_dim, rngs=rngs,
                              **precision)

  def __call__(self, batch, *, deterministic: bool):
    inputs = jnp.asarray(_get(batch, "inputs", "retrieval"))
    if inputs.ndim < 3 or inputs.shape[1] != 2:
      raise ValueError(f"retrieval: inputs must be (batch, 2, length[, channels]), got "
                       f"shape {inputs.shape}")
    b = inputs.shape[0]
    mask = _check_mask(batch.get("mask"), inputs.shape[:3], "retrieval")
    flat = inputs.reshape(2 * b, *inputs.shape[2:])
    flat_mask = None if mask is None else mask.reshape(2 * b, -1)
    x, flat_mask = self.features(flat, flat_mask, deterministic=deterministic, what="retrieval")
    pooled = pool(x, flat_mask, self.pooling).reshape(b, 2, -1)
    return self.head(pooled[:, 0], pooled[:, 1])


class LanguageModel(_Encoded):
  """Causal LM: logits for the next token at every position; recurrent `step` for
  generation. tie_embeddings: logits = x @ E^T with the input embedding E."""

  def __init__(self, task: TaskSpec, backbone: Backbone, *, tie_embeddings: bool,
               rngs: nnx.Rngs, **precision):
    if tie_embeddings and task.input_kind != "tokens":
      raise ValueError("tie_embeddings needs token inputs")
    if tie_embeddings and task.num_classes != task.vocab_size:
      raise ValueError(f"tie_embeddings needs num_classes == vocab_size, got "
                       f"{task.num_classes} and {task.vocab_size}")
    super().__init__(task, backbone, rngs=rngs,
                     init_std=backbone.d_model ** -0.5 if tie_embeddings else 1.0,
                     param_dtype=precision["param_dtype"])
    self.tie_embeddings = tie_embeddings
    self.num_classes = task.num_classes
    self.dtype = precision["dtype"]
    self.head = None if tie_embeddings else LMHead(backbone.d_model, task.num_classes,
                                                   rngs=rngs, **precision)

  def logits(self, x):
    """Backbone output x (..., h) -> float32 logits (..., num_classes). Public so that a
    loss needing a few positions only (MQAR's queries) can gather x first: at vocabulary
    8192 the head is most of a small model's FLOPs."""
    if self.tie_embeddings:
      return tied_logits(x, self.encoder.embedding[...], self.dtype)
    return self.head(x)

  def __call__(self, batch, *, deterministic: bool):
    # batch["mask"] is the loss mask here, not padding: padding is id 0. An optional
    # batch["segment_ids"] (b, l) marks packed documents for the recurrent mixers.
    x, _ = self.features(_get(batch, "inputs", "lm"), None, deterministic=deterministic,
                         what="lm", segment_ids=batch.get("segment_ids"))
    return self.logits(x)

  def init_state(self, batch_size: int, *, max_len: int | None = None) -> list:
    """Recurrent state for `step`; max_len sizes attention KV caches."""
    return self.backbone.init_state(batch_size, max_len=max_len)

  def step(self, state: list, tokens_t):
    """tokens_t (b,) int -> (state, logits_t (b, num_classes)). Evaluation mode."""
    tokens_t = jnp.asarray(tokens_t)
    if self.input_kind != "tokens" or tokens_t.ndim != 1:
      raise ValueError(f"lm.step: expects token ids of shape (batch,), got {tokens_t.shape}")
    x_t = self.encoder(tokens_t)
    state, y_t = self.backbone.step(state, x_t, mask_t=tokens_t != 0)
    return state, self.logits(y_t)


def seq_parallel_kind(kind: str, mixer_options_: Mapping) -> bool:
  """Whether mixers of this kind, with these options, run sequence-parallel themselves
  (take seq_mesh); the others are all-gathered over the length (module docstring)."""
  return ("seq_mesh" in mixer_options(ALIASES.get(kind, kind))
          and mixer_options_.get("memory_caching") is None)


def _check_seq_mesh(seq_mesh, seq_axis: str, task: TaskSpec) -> int:
  check_seq_mesh("build_model", seq_mesh, seq_axis)   # a Mesh with that axis
  n = seq_mesh.shape[seq_axis]
  if task.seq_len % n:
    raise ValueError(f"build_model: the length {task.seq_len} (data.seq_len) is not divisible "
                     f"by the {n} devices of mesh axis {seq_axis!r} (train.mesh.{seq_axis})")
  return n


def build_model(model_cfg, task: TaskSpec, *, rngs: nnx.Rngs, seq_mesh=None,
                seq_axis: str = "seq") -> nnx.Module:
  """Build the model config.model describes for the task (see the module docstring).

  seq_mesh, seq_axis: sequence parallelism over that mesh axis (module docstring); None
  (default), or a mesh whose seq_axis has size 1, builds the ordinary model.
  """
  if not isinstance(task, TaskSpec):
    raise ValueError(f"task must be a data.task.TaskSpec, got {type(task).__name__}")
  cfg = resolve_config(model_cfg)
  if task.kind == "lm" and cfg["bidirectional"]:
    raise ValueError("a language model must be causal: bidirectional=True is not allowed "
                     "for task kind 'lm'")
  kind = ALIASES.get(cfg["name"], cfg["name"])
  options = dict(cfg["mixer"])
  if cfg["bidirectional"]:
    options["bidirectional"] = True  # only when True: causal-only mixers lack the option
  accepted = mixer_options(kind)
  gather_mesh = None
  if seq_mesh is not None and _check_seq_mesh(seq_mesh, seq_axis, task) > 1:
    if seq_parallel_kind(kind, options):
      options.update(seq_mesh=seq_mesh, seq_axis=seq_axis)
    else:
      gather_mesh = seq_mesh
      log.info("mixer %r has no sequence-parallel path%s: each of its layers all-gathers "
               "the length over mesh axis %r", kind,
               " with memory_caching" if options.get("memory_caching") is not None else "",
               seq_axis)
  precision = dict(dtype=jnp.dtype(cfg["dtype"]), param_dtype=jnp.dtype(cfg["param_dtype"]))
  for key, value in precision.items():
    if key in accepted:
      options[key] = value
    elif value != jnp.float32:  # a registered mixer without the option computes in float32
      raise ValueError(f"mixer {kind!r} takes no {key} option: it cannot run "
                       f"model.{key}={cfg[key]!r}")
  mixers = []
  for i in range(cfg["num_layers"]):
    layer_opts = dict(options)
    if "layer_idx" in accepted:
      layer_opts.setdefault("layer_idx", i)
    if "num_layers" in accepted:
      layer_opts.setdefault("num_layers", cfg["num_layers"])
    mixers.append(build_mixer(kind, cfg["d_model"], rngs=rngs, **layer_opts))
  backbone = Backbone(mixers, cfg["d_model"], norm=cfg["norm"], prenorm=cfg["prenorm"],
                      ffn=cfg["ffn"], ffn_mult=cfg["ffn_mult"],
                      ffn_activation=cfg["ffn_activation"], dropout=float(cfg["dropout"]),
                      remat=cfg["remat"], scan_layers=cfg["scan_layers"],
                      gather_mesh=gather_mesh, seq_axis=seq_axis,
                      rngs=rngs, **precision)
  if task.kind == "classification":
    return Classifier(task, backbone, pooling=cfg["pooling"], rngs=rngs, **precision)
  if task.kind == "retrieval":
    return RetrievalModel(task, backbone, pooling=cfg["pooling"],
                          mlp_dim=cfg["retrieval_mlp_dim"], rngs=rngs, **precision)
  return LanguageModel(task, backbone, tie_embeddings=cfg["tie_embeddings"], rngs=rngs,
                       **precision)
