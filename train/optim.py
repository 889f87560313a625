"""Optimizer: parameter groups by variable type, warmup + decay schedules, clipping.

Groups (one label per parameter, chosen by its nnx.Variable type and shape):

  "ssm"       ssm.params.SSMParam (A, B, dt, SSM kernels): peak lr config.optim.ssm_lr,
              weight decay config.optim.ssm_weight_decay, 0 by default -- the papers'
              recipe (state-spaces/s4 registers them with lr=min(lr, 1e-3),
              weight_decay=0). SGConv's recipes decay their kernels (configs/common.py
              sgconv_kernel_decay). A config without the key (older runs) gets 0, as
              train/workdir.py ADDED_KEYS says.
  "no_decay"  ssm.params.NoDecayParam (Mamba's A_log, D) and every other parameter with
              fewer than 2 dimensions (biases, norm scales): lr, no weight decay. This is
              the S4 repo's default grouping (no decay on biases and normalization).
  "decay"     every other nnx.Param (weight matrices, embeddings, conv filters): lr and
              decoupled weight decay (AdamW: p -= lr * wd * p). Embeddings are decayed,
              as in the S4 and LRA code.

All groups share one schedule shape (linear warmup then "cosine" | "linear" | "constant" |
"rsqrt" decay), scaled to their peak, and gradients are clipped by their global norm over
all parameters first. The optimizer works on `nnx.State` trees of parameters (the
trainer keeps a plain optax state, no nnx.Optimizer), so the train step is a pure
function under jax.jit.
"""

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ssm.params import NoDecayParam, SSMParam

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "linear", "constant", "rsqrt")
GROUPS = ("ssm", "no_decay", "decay")


def make_schedule(peak: float, *, schedule: str, warmup_steps: int,
                  total_steps: int) -> optax.Schedule:
  """Learning rate at step s (0-based; the update that produces step s+1).

  Warmup: peak * (s+1) / warmup_steps for s < warmup_steps (no wasted zero-lr step).
  Then, with t = (s - warmup) / (total - warmup) in [0, 1]:
    cosine: peak * (1 + cos(pi t)) / 2      linear: peak * (1 - t)
    constant: peak                          rsqrt: peak * sqrt(warmup / (s+1))
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"config.optim.schedule must be one of {SCHEDULES}, got {schedule!r}")
  warmup = int(warmup_steps)
  decay_steps = max(int(total_steps) - warmup, 1)

  def fn(step):
    s = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, (s + 1.0) / max(warmup, 1))
    if schedule == "constant":  # independent of total_steps: same program for any run length
      return peak * jnp.where(s < warmup, warm, 1.0)
    t = jnp.clip((s - warmup) / decay_steps, 0.0, 1.0)
    if schedule == "cosine":
      decay = 0.5 * (1.0 + jnp.cos(math.pi * t))
    elif schedule == "linear":
      decay = 1.0 - t
    else:
      decay = jnp.sqrt(max(warmup, 1) / jnp.maximum(s + 1.0, max(warmup, 1)))
    return peak * jnp.where(s < warmup, warm, decay)

  return fn


def group_of(variable: nnx.Variable) -> str:
  """The optimizer group of one parameter (see the module docstring)."""
  if isinstance(variable, SSMParam):
    return "ssm"
  if isinstance(variable, NoDecayParam) or len(getattr(variable.get_value(), "shape", ())) < 2:
    return "no_decay"
  return "decay"


def param_labels(params):
  """Tree of group names with the structure of `params` (an nnx.State of Params)."""
  return jax.tree.map(group_of, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def group_sizes(params) -> dict[str, int]:
  """Number of scalar parameters in each group (for the start-of-run log)."""
  sizes = dict.fromkeys(GROUPS, 0)
  labels = jax.tree.leaves(param_labels(params))
  for label, leaf in zip(labels, jax.tree.leaves(params)):
    sizes[label] += int(math.prod(leaf.shape))
  return sizes


def _base(optimizer: str, cfg, lr: optax.Schedule, weight_decay: float):
  if optimizer == "adamw":
    parts = [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)]
  else:
    parts = [optax.trace(decay=cfg.b1)] if cfg.b1 else []
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(optax.scale_by_learning_rate(lr))
  return optax.chain(*parts)


def make_optimizer(optim_cfg, *, num_steps: int):
  """Builds the optax transformation of config.optim.

  Returns:
    (tx, schedules): tx an optax.GradientTransformation over an nnx.State of params;
    schedules a dict group -> schedule (lr of the "decay" group = the main lr).
  """
  cfg = optim_cfg
  if cfg.optimizer not in OPTIMIZERS:
    raise ValueError(f"config.optim.optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}")
  kw = dict(schedule=cfg.schedule, warmup_steps=cfg.warmup_steps, total_steps=num_steps)
  main = make_schedule(cfg.lr, **kw)
  schedules = {"ssm": make_schedule(cfg.ssm_lr, **kw), "no_decay": main, "decay": main}
  transforms = {
      "ssm": _base(cfg.optimizer, cfg, schedules["ssm"], cfg.get("ssm_weight_decay", 0.0)),
      "no_decay": _base(cfg.optimizer, cfg, main, 0.0),
      "decay": _base(cfg.optimizer, cfg, main, cfg.weight_decay),
  }
  tx = optax.multi_transform(transforms, param_labels)
  if cfg.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
  return tx, schedules
