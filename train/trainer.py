"""The trainer: `run(config, workdir) -> dict` of final metrics.

  python -m train --config=configs/lra/listops.py:s4d --workdir=runs/listops_s4d

What a run does:
  1. Validates the config (bad values -> ValueError naming the field; a warmup longer
     than num_steps is cut to it, with a warning) and sets up the device mesh
     (train/sharding.py).
  2. Locks the workdir and compares its saved config with this one (train/workdir.py:
     a second trainer, or a changed model/optimizer/data, stops here and nothing in the
     workdir changes; config.train.resume says what to do instead).
  3. Loads the task (data.load_task) and builds the model (models.build_model) inside a
     jax.jit with the parameters' shardings as out_shardings, so large parameters are
     created already split over the mesh.
  4. Resumes from the newest readable checkpoint in workdir (logging "resumed from step
     N") or starts fresh; the data loader's state is part of the checkpoint. A workdir
     whose checkpoints are all corrupt stops (train/checkpoint.py). Then writes
     workdir/config.json and config.py. Metrics a killed process logged past step N
     move to metrics_superseded.jsonl, so metrics.jsonl holds one record per step and
     split.
  5. Trains config.train.num_steps steps with a pure, jitted train step (donated state,
     explicit shardings); evaluates on validation every eval_every steps and at the end,
     on test at the end, exactly over all examples (padding rows have weight 0).
     SIGINT/SIGTERM: the step in progress ends, a checkpoint is saved, and run returns
     {"stopped_at_step", "num_steps", "signal"} (train/signals.py; every process of a
     multi-host job stops at the same step).
  6. Writes workdir/results.json and returns its content: steps, final validation and
     test loss/accuracy, the best validation accuracy and its step, wall_time_s (this
     process), train_time_s and runs (the step loops' time summed over every resume, and
     how many processes that took: carried in the checkpoint meta), device, mesh, date.

Mesh (train/sharding.py): config.train.mesh = {data, fsdp, seq} sizes (-1: the remaining
devices; seq may be left out: 1). The batch is split over data x fsdp and parameters
larger than fsdp_min_size over fsdp. Sequence parallelism, seq > 1: every batch array
with a length (inputs, targets, mask, segment_ids; retrieval's (b, 2, l) on its axis 2)
is split along it over "seq" (Trainer.global_batch, and as a constraint inside the
steps), and the model is built with `seq_mesh=mesh` (models.build_model): the mamba,
mamba2, linear_attention and lightning mixers (without memory_caching) run their scans
sequence-parallel (ssm.ops.seq_parallel), the LTI convolutions (lssl, s4, s4d, sgconv)
their FFT convolution (ssm.ops.fft_conv_seq_parallel: a distributed FFT, or an all-gather
around the convolution alone, by the mixer's seq_conv option); the others -- attention and
memory caching -- run correctly under the split input with their input all-gathered over
the length and their output split again (no memory saved in those layers); norms, FFNs,
embedding, head and the loss are partitioned by GSPMD. So losses and metrics equal the
one-device run's within float32 noise (tests/test_train_seq.py), checkpoints hold the
same arrays (parameters are replicated over seq), and a run resumes under another mesh.
config.data.seq_len must be a multiple of seq (ValueError naming the field, before any
data is loaded); on several hosts seq must divide each host's device count (a host loads
whole sequences). Generation and the step mode are unaffected (one token at a time).

Gradient accumulation, config.train.accum_steps = k > 1: each update takes the same global
batch as k micro-batches of batch_size / k in a lax.scan inside the step (the gradient
of the batch's mean loss: the micro-batches' gradient sums over the batch's weight; the
metrics are the batch's), so a batch that does not fit in memory trains with the update
of one step. BatchNorm sees each micro-batch's statistics. The micro-batches must split
over the data x fsdp devices; accum_steps may change on resume.

Train state: `TrainState(step, params, rest, opt_state)`, where params is the
nnx.State of every nnx.Param, rest every other variable except RNG state (BatchNorm
statistics, buffers; updated by the forward pass, never by the optimizer), opt_state a
plain optax state over params. The model's graph is split once (`nnx.split`) and merged
inside the jitted functions, so no nnx transform runs in the hot loop.

Determinism: dropout keys are derived from (config.train.seed, step) inside the step,
and the loader's batch order from its seed and grain's saved iterator state, so a run
resumed from a checkpoint reproduces the uninterrupted run exactly (same devices, mesh
and config.train.data_workers).

Non-finite loss, gradients or updated state (parameters, optimizer moments, BatchNorm
statistics, checked on device in the step): the step keeps the previous state (the
update is discarded), and the host stops with NonFiniteLossError naming the step and
what to do (nonfinite_message). Checkpoints are only written after the host has seen
that every step up to them was finite, so the last good checkpoint stays the newest one
and holds finite values only.
"""

import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from train import checkpoint as checkpoint_lib
from train import chrono as chrono_lib
from train import flops as flops_lib
from train import metrics as metrics_lib
from train import optim as optim_lib
from train import sharding as sharding_lib
from train import signals as signals_lib
from train import workdir as workdir_lib

log = logging.getLogger(__name__)


_FLOAT32_MAX = float(np.finfo(np.float32).max)

_NOT_TRACEABLE = (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError,
                  jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError)


# optax.tree.norm replaces optax.global_norm (deprecated) in newer optax.
_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def all_finite(tree) -> jax.Array:
  """() bool: every float (or complex) leaf of `tree` is free of NaN and inf."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


class NonFiniteLossError(FloatingPointError):
  """The loss, gradients or updated state became NaN/Inf; the message names the step and
  what to do (nonfinite_message)."""


class TrainState(NamedTuple):
  step: jax.Array        # () int32: updates applied so far
  params: Any            # nnx.State of nnx.Param (incl. SSMParam, NoDecayParam)
  rest: Any              # nnx.State of other non-RNG variables (BatchNorm stats, ...)
  opt_state: Any         # optax state over params


# -- config validation ------------------------------------------------------------------

def _check(cond: bool, field: str, value, requirement: str) -> None:
  if not cond:
    raise ValueError(f"config.{field}={value!r}: {requirement}")


# Keys a config may leave out (configs written before they existed), with what their
# absence means: workdir.ADDED_KEYS, by section.
OPTIONAL_KEYS: dict = {}
for _key, _default in workdir_lib.ADDED_KEYS.items():
  _section, _name = _key.split(".")
  OPTIONAL_KEYS.setdefault(_section, {})[_name] = _default


def accum_steps(config) -> int:
  """config.train.accum_steps, 1 where a config predates the key."""
  return config.train.get("accum_steps", OPTIONAL_KEYS["train"]["accum_steps"])


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails early, naming the field, on unknown keys and bad values of optim and train.

  The model and data sections are validated by models.build_model and data.load_task.
  """
  from configs import common  # the base config lists every known key

  base = common.base_config()
  for section in ("model", "data", "optim", "train"):
    if section not in config:
      raise ValueError(f"config has no {section!r} section")
  for section in ("optim", "train"):
    unknown = sorted(set(config[section].keys()) - set(base[section].keys()))
    if unknown:
      raise ValueError(f"unknown config.{section} keys {unknown}; valid: "
                       f"{sorted(base[section].keys())}")
    missing = sorted(set(base[section].keys()) - set(config[section].keys())
                     - set(OPTIONAL_KEYS.get(section, {})))
    if missing:
      raise ValueError(f"config.{section} lacks keys {missing}")
  o, t = config.optim, config.train
  _check(o.optimizer in optim_lib.OPTIMIZERS, "optim.optimizer", o.optimizer,
         f"must be one of {optim_lib.OPTIMIZERS}")
  _check(o.schedule in optim_lib.SCHEDULES, "optim.schedule", o.schedule,
         f"must be one of {optim_lib.SCHEDULES}")
  for name in ("lr", "ssm_lr", "weight_decay", "ssm_weight_decay", "grad_clip", "eps"):
    v = o.get(name, OPTIONAL_KEYS["optim"].get(name))
    # The optimizer computes in float32: a value past its range would train with inf.
    _check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
           and 0 <= v <= _FLOAT32_MAX, f"optim.{name}", v,
           f"must be a number in [0, {_FLOAT32_MAX:.4g}] (finite in float32)")
  _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
  for name in ("b1", "b2"):
    _check(0 <= o[name] < 1, f"optim.{name}", o[name], "must be in [0, 1)")
  for name in ("num_steps", "batch_size", "eval_batch_size", "eval_every", "log_every",
               "keep_checkpoints"):
    _check(isinstance(t[name], int) and t[name] >= 1, f"train.{name}", t[name],
           "must be an int >= 1")
  for name in ("checkpoint_every", "halt_at_step", "prefetch", "data_workers", "fsdp_min_size",
               "seed"):
    _check(isinstance(t[name], int) and t[name] >= 0, f"train.{name}", t[name],
           "must be an int >= 0")
  accum = accum_steps(config)
  _check(isinstance(accum, int) and not isinstance(accum, bool) and accum >= 1,
         "train.accum_steps", accum, "must be an int >= 1")
  _check(t.batch_size % accum == 0, "train.accum_steps", accum,
         f"must divide train.batch_size={t.batch_size} (each micro-batch is batch_size / "
         f"accum_steps examples)")
  _check(t.resume in workdir_lib.RESUME_MODES, "train.resume", t.resume,
         f"must be one of {workdir_lib.RESUME_MODES} (see train/workdir.py)")
  _check(isinstance(o.warmup_steps, int) and 0 <= o.warmup_steps <= t.num_steps,
         "optim.warmup_steps", o.warmup_steps, f"must be an int in [0, num_steps={t.num_steps}]")
  for axis in sharding_lib.AXES:
    if axis in sharding_lib.OPTIONAL_AXES and axis not in t.mesh:
      continue  # a config written before the axis existed: its default size
    _check(axis in t.mesh and isinstance(t.mesh[axis], int), f"train.mesh.{axis}",
           t.mesh.get(axis), "must be an int (-1 = the remaining devices)")
  unknown = sorted(set(t.mesh.keys()) - set(sharding_lib.AXES))
  _check(not unknown, "train.mesh", t.mesh.to_dict(), f"unknown axes {unknown}; valid "
         f"{sharding_lib.AXES}")


def fit_warmup(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config, or a copy whose warmup is cut to num_steps (with a warning): a recipe's
  warmup_steps would otherwise fail validation on a run shortened from the command line."""
  warmup, num_steps = config.optim.warmup_steps, config.train.num_steps
  if not (isinstance(warmup, int) and isinstance(num_steps, int) and 0 < num_steps < warmup):
    return config
  log.warning("config.optim.warmup_steps=%d is longer than config.train.num_steps=%d: "
              "warming up over all %d steps instead", warmup, num_steps, num_steps)
  config = config.copy_and_resolve_references()
  config.optim.warmup_steps = num_steps  # an existing key: allowed in a locked config
  return config


# -- workdir files ----------------------------------------------------------------------

def _tokens_per_example(batch: dict, task) -> int:
  x = batch["inputs"]
  shape = x.shape[1:-1] if task.input_kind == "pixels" else x.shape[1:]
  return int(np.prod(shape))


# -- the trainer --------------------------------------------------------------------------

def seq_layers(model) -> dict:
  """How the model's mixer layers treat a length split over "seq": {"parallel": layers
  whose mixer takes the split itself (built with seq_mesh: a split scan, or an LTI
  convolution by either seq_conv path), "gathered": layers that all-gather the length
  (models.blocks.ResidualBlock's gather_mesh), "plain": the rest (no seq mesh)}."""
  out = dict(parallel=0, gathered=0, plain=0)
  for block in getattr(getattr(model, "backbone", None), "blocks", ()):
    if getattr(block.mixer, "seq_mesh", None) is not None:
      out["parallel"] += 1
    elif getattr(block, "gather_mesh", None) is not None:
      out["gathered"] += 1
    else:
      out["plain"] += 1
  return out


class Trainer:
  """Model graph, optimizer and the jitted step functions of one config and task."""

  def __init__(self, config, task, mesh):
    import models  # heavy imports on use

    self.config, self.task, self.mesh = config, task, mesh
    self.kind = task.kind
    seed = config.train.seed
    self.tx, self.schedules = optim_lib.make_optimizer(config.optim,
                                                       num_steps=config.train.num_steps)
    holder = {}

    def init():
      model = models.build_model(config.model, task,
                                 rngs=nnx.Rngs(params=seed, dropout=seed + 1),
                                 seq_mesh=mesh, seq_axis=sharding_lib.SEQ_AXIS)
      graphdef, params, rngs, rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
      holder["graphdef"] = graphdef
      holder["sequence_flops"] = flops_lib.sequence_flops(model, task.seq_len)
      holder["seq_layers"] = seq_layers(model)
      state = TrainState(jnp.zeros((), jnp.int32), params, rest, self.tx.init(params))
      return state, rngs

    self._init = init
    self._eager = None
    with sharding_lib.mesh_context(mesh):
      try:
        abstract_state, abstract_rngs = jax.eval_shape(init)
      except _NOT_TRACEABLE as e:
        # Some layers compute their init with NumPy on random draws (S4's C~); build
        # those models eagerly on one device, then shard (fine up to a device's memory).
        log.info("model init is not traceable (%s); initialising eagerly", type(e).__name__)
        self._eager = init()
        abstract_state, abstract_rngs = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self._eager)
    self.graphdef = holder["graphdef"]
    self.seq_layers = holder["seq_layers"]
    # Model FLOPs per trained token (train/flops.py): 6 N + 3 x the mixers' sequence terms.
    self.flops_per_token = 6.0 * flops_lib.matmul_params(
        abstract_state.params, tied=bool(config.model.get("tie_embeddings", False))) + (
            3.0 * holder["sequence_flops"])
    min_size = config.train.fsdp_min_size
    self.state_sharding = sharding_lib.state_shardings(abstract_state, mesh, min_size)
    self.rng_sharding = sharding_lib.state_shardings(abstract_rngs, mesh, min_size)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_state, self.state_sharding)
    self.group_sizes = optim_lib.group_sizes(abstract_state.params)

    # The batch's arrays carry their shardings from global_batch (split over the batch
    # axes, and over "seq" along the length when the mesh has seq > 1; their keys vary by
    # task), and the steps constrain them to the same (sharding_lib.constrain_batch).
    self.length_axis = sharding_lib.length_axis(task.kind)
    flags_sh = sharding_lib.batch_sharding(mesh)
    repl = sharding_lib.replicated(mesh)
    self._train_step_jit = jax.jit(
        self._train_step, donate_argnums=(0,),
        in_shardings=(self.state_sharding, self.rng_sharding, None, flags_sh),
        out_shardings=(self.state_sharding, repl))
    self._stop_flags = {}
    self.eval_step = jax.jit(
        self._eval_step,
        in_shardings=(self.state_sharding.params, self.state_sharding.rest,
                      self.rng_sharding, None),
        out_shardings=repl)

  def global_batch(self, local: dict) -> dict:
    """A host's NumPy batch -> the global, sharded batch the steps take."""
    return sharding_lib.global_batch(local, self.mesh, self.length_axis)

  # -- state ---------------------------------------------------------------------------
  def init_state(self):
    """(TrainState, rngs) freshly initialised, created sharded."""
    if self._eager is not None:
      state, rngs = self._eager
      self._eager = (None, rngs)  # the train step donates the state: keep no reference
      return jax.device_put((state, rngs), (self.state_sharding, self.rng_sharding))
    with sharding_lib.mesh_context(self.mesh):
      return jax.jit(self._init, out_shardings=(self.state_sharding, self.rng_sharding))()

  def init_rngs(self):
    """Only the RNG state (XLA drops the parameter initialisers)."""
    if self._eager is not None:
      return jax.device_put(self._eager[1], self.rng_sharding)
    with sharding_lib.mesh_context(self.mesh):
      return jax.jit(lambda: self._init()[1], out_shardings=self.rng_sharding)()

  def _step_rngs(self, rngs, step):
    """Fresh RNG state for this step: every stream's key from (seed, step, stream index)."""
    base = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.train.seed), 1),
                              step)
    leaves, treedef = jax.tree.flatten(rngs)
    new = [jax.random.fold_in(base, i) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
           else jnp.zeros_like(x) for i, x in enumerate(leaves)]
    return jax.tree.unflatten(treedef, new)

  @staticmethod
  def _fold_rngs(rngs, i):
    """Micro-batch i's RNG state: every key of the step's folded with i."""
    return jax.tree.map(lambda x: jax.random.fold_in(x, i)
                        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, rngs)

  def stop_flags(self, requested: bool) -> jax.Array:
    """This process's vote to stop, as the train step takes it (sharding.process_flags)."""
    if requested not in self._stop_flags:
      self._stop_flags[requested] = sharding_lib.process_flags(int(requested), self.mesh)
    return self._stop_flags[requested]

  def train_step(self, state: TrainState, rngs, batch: dict, stop: jax.Array | None = None):
    """One update (jitted, `state` donated) -> (new state, replicated metrics).

    stop: stop_flags(...) of this process; the metrics' "stop" is true on every process
    when any process voted to stop.
    """
    return self._train_step_jit(state, rngs, batch,
                                self.stop_flags(False) if stop is None else stop)

  # -- steps (pure) ----------------------------------------------------------------------
  def _loss_sums(self, params, rest, rngs, batch):
    """The forward pass on one (micro-)batch -> (loss sums, updated non-Param state)."""
    # Fresh Variable objects at this trace level, so the forward pass may update them.
    fresh = jax.tree.map(lambda x: x, (rngs, rest))
    model = nnx.merge(self.graphdef, params, *fresh)
    logits = model(batch, deterministic=False)
    sums = metrics_lib.loss_sums(logits, batch, self.kind)
    _, _, _, rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
    return sums, rest

  def _accumulated_grads(self, state: TrainState, rngs, batch: dict, accum: int):
    """Gradients of the whole batch's mean loss from `accum` micro-batches in a lax.scan
    (config.train.accum_steps) -> (loss, sums, rest, grads).

    Micro-batch i is rows i, i + accum, i + 2 accum, ... of the batch: every device's rows
    stay on it (the batch is split over the devices in contiguous blocks), so slicing moves
    no data. The gradients of the micro-batches' loss SUMS are added and divided once by the
    whole batch's weight, so the update is the one-batch update (up to summation order):
    the mean is over tokens (weights), not over micro-batches. Each micro-batch gets its own
    dropout keys (the step's, folded with i) and runs the forward in training mode in turn
    on the state the previous one left: BatchNorm normalises each micro-batch by its own
    statistics and updates its running averages `accum` times a step, as any micro-batched
    trainer does."""
    b = jax.tree.leaves(batch)[0].shape[0]
    micro = {k: jnp.swapaxes(v.reshape((b // accum, accum) + v.shape[1:]), 0, 1)
             for k, v in batch.items()}

    def loss_sum(params, rest, rngs, mb):
      sums, rest = self._loss_sums(params, rest, rngs, mb)
      return sums["loss_sum"], (sums, rest)

    grad_fn = jax.grad(loss_sum, has_aux=True)

    def one(carry, xs):
      grads, sums, rest = carry
      i, mb = xs
      mb = sharding_lib.constrain_batch(mb, self.mesh, self.length_axis)
      g, (s, rest) = grad_fn(state.params, rest, self._fold_rngs(rngs, i), mb)
      return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s), rest), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    sums0 = dict(loss_sum=jnp.float32(0), correct=jnp.float32(0), weight=jnp.float32(0))
    (grads, sums, rest), _ = jax.lax.scan(one, (zeros, sums0, state.rest),
                                          (jnp.arange(accum), micro))
    weight = jnp.maximum(sums["weight"], 1e-9)
    grads = jax.tree.map(lambda g: g / weight.astype(g.dtype), grads)
    return sums["loss_sum"] / weight, sums, rest, grads

  def _train_step(self, state: TrainState, rngs, batch: dict, stop: jax.Array):
    rngs = self._step_rngs(rngs, state.step)
    batch = sharding_lib.constrain_batch(batch, self.mesh, self.length_axis)
    accum = accum_steps(self.config)
    if accum > 1:
      loss, sums, rest, grads = self._accumulated_grads(state, rngs, batch, accum)
    else:
      def loss_fn(params):
        sums, rest = self._loss_sums(params, state.rest, rngs, batch)
        return sums["loss_sum"] / jnp.maximum(sums["weight"], 1e-9), (sums, rest)

      (loss, (sums, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = _tree_norm(grads)
    finite_loss = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # The updated state too: a finite gradient can still overflow Adam's moments or the
    # weights, and a checkpoint of such a state could never be resumed.
    finite = finite_loss & all_finite((params, rest, opt_state))
    # A non-finite step is discarded; the host then stops (see the module docstring).
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    new_state = TrainState(
        step=state.step + 1,
        params=jax.tree.map(keep, params, state.params),
        rest=jax.tree.map(keep, rest, state.rest),
        opt_state=jax.tree.map(keep, opt_state, state.opt_state))
    out = dict(loss=loss, accuracy=sums["correct"] / jnp.maximum(sums["weight"], 1e-9),
               grad_norm=grad_norm, lr=self.schedules["decay"](state.step), finite=finite,
               finite_loss=finite_loss, stop=jnp.max(stop) > 0)
    return new_state, out

  def _eval_step(self, params, rest, rngs, batch: dict):
    batch = sharding_lib.constrain_batch(batch, self.mesh, self.length_axis)
    model = nnx.merge(self.graphdef, params, rngs, rest)
    logits = model(batch, deterministic=True)
    return metrics_lib.loss_sums(logits, batch, self.kind)

  def evaluate(self, state: TrainState, rngs, dataset, batch_size: int) -> dict:
    """Exact loss/accuracy over every example of `dataset` (this host's shard)."""
    from data.pipeline import make_loader

    loader = make_loader(dataset, batch_size=batch_size, shuffle=False, seed=0,
                         drop_remainder=False, shard_index=jax.process_index(),
                         shard_count=jax.process_count(),
                         prefetch=self.config.train.prefetch)
    totals = None
    with sharding_lib.mesh_context(self.mesh):
      for local in loader:
        batch = self.global_batch(local)
        sums = self.eval_step(state.params, state.rest, rngs, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
      raise ValueError("evaluation split is empty")
    out = metrics_lib.summarize(jax.device_get(totals))
    info = getattr(dataset, "info", None) or {}
    if info.get("num_bytes"):  # LM corpora (data/lm.py): report bits per byte of text
      from data.lm import bits_per_byte
      out["bits_per_byte"] = bits_per_byte(out["loss"], out["weight"], info["num_bytes"])
    return out


# -- the run ------------------------------------------------------------------------------

def _bpb(summary: dict) -> dict:
  """{"bits_per_byte": x} when the evaluated split is a text corpus, else {}."""
  return {"bits_per_byte": summary["bits_per_byte"]} if "bits_per_byte" in summary else {}


@dataclasses.dataclass
class _Window:
  """Host-side sums of the train metrics between two log lines."""
  steps: int = 0
  loss: float = 0.0
  accuracy: float = 0.0
  grad_norm: float = 0.0

  def add(self, m: dict) -> None:
    self.steps += 1
    self.loss += float(m["loss"])
    self.accuracy += float(m["accuracy"])
    self.grad_norm += float(m["grad_norm"])

  def means(self) -> dict:
    return dict(loss=self.loss / self.steps, accuracy=self.accuracy / self.steps,
                grad_norm=self.grad_norm / self.steps)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains and evaluates per `config`, resuming from `workdir` (see the module docstring)."""
  t_start = time.time()
  given = config
  config = fit_warmup(config)
  validate_config(config)
  sharding_lib.maybe_initialize_distributed()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  tc = config.train
  mesh = sharding_lib.make_mesh(tc.mesh)
  seq = sharding_lib.seq_size(mesh)
  _check(config.data.seq_len % seq == 0, "data.seq_len", config.data.seq_len,
         f"must be divisible by the {seq} devices of mesh axis 'seq' (train.mesh.seq)")
  train_bs = sharding_lib.per_host_batch(tc.batch_size, mesh)
  accum, shards = accum_steps(config), mesh.shape["data"] * mesh.shape["fsdp"]
  _check((tc.batch_size // accum) % shards == 0, "train.accum_steps", accum,
         f"its micro-batches of batch_size / accum_steps = {tc.batch_size // accum} examples "
         f"must split over the {shards} devices of the data/fsdp mesh")
  eval_bs = sharding_lib.per_host_batch(tc.eval_batch_size, mesh, "config.train.eval_batch_size")
  with contextlib.ExitStack() as stack:
    stack.enter_context(workdir_lib.WorkdirLock(workdir))
    changes = workdir_lib.check_resume(workdir, given)  # before anything in the workdir changes
    task, splits, trainer, loader = _setup(config, mesh, train_bs)
    stack.callback(getattr(loader, "close", lambda: None))
    ckpt = checkpoint_lib.Checkpointer(workdir, keep=tc.keep_checkpoints)
    stack.callback(ckpt.close)
    restored = ckpt.restore_latest(trainer.abstract_state)
    # Once the state fits; as given, not as fitted, so a rerun fits its warmup again.
    workdir_lib.write_config(given, workdir, changes)
    writer = stack.enter_context(contextlib.closing(metrics_lib.MetricWriter(workdir)))
    return _run(config, workdir, task, splits, trainer, loader, ckpt, writer, eval_bs, t_start,
                restored)


def _setup(config, mesh, train_bs):
  """(task, splits, Trainer, train loader) of a config."""
  import data
  from data.pipeline import make_loader

  # Hosts of a multi-process job share the data cache: process 0 prepares a missing set
  # and the others read it after, rather than racing to write the same directory.
  if jax.process_index() != 0:
    sharding_lib.sync_processes("data prepared")
  task, splits = data.load_task(config.data)
  if jax.process_index() == 0:
    sharding_lib.sync_processes("data prepared")
  for split in ("train", "validation", "test"):
    if split not in splits:
      raise ValueError(f"data.load_task returned no {split!r} split")
  trainer = Trainer(config, task, mesh)
  log.info("task %s (%s, seq_len %d, %d classes); mesh %s on %d %s device(s); parameters "
           "per optimizer group %s", task.name, task.kind, task.seq_len, task.num_classes,
           dict(mesh.shape), jax.device_count(), jax.devices()[0].device_kind,
           trainer.group_sizes)
  if sharding_lib.seq_size(mesh) > 1:
    log.info("sequence parallelism over %d devices: %s mixer layers", sharding_lib.seq_size(mesh),
             trainer.seq_layers)
  import grain  # noqa: PLC0415
  loader = make_loader(splits["train"], batch_size=train_bs, shuffle=True,
                       seed=config.train.seed, drop_remainder=True,
                       shard_options=grain.sharding.ShardByJaxProcess(),
                       prefetch=config.train.prefetch, worker_count=config.train.data_workers)
  return task, splits, trainer, loader


def nonfinite_message(step: int, m: dict, last_saved: int | None, workdir: str) -> str:
  """What NonFiniteLossError says: the step, the values, what is kept and what to do.

  The loss and gradient of step `step` come from the state of step - 1, so when they are
  non-finite and that state is the last checkpoint, resuming it fails the same way
  whatever the learning rate: only starting over helps. A finite loss with an update that
  overflowed, or an older checkpoint, can be continued with gentler settings.
  """
  kept = (f"the last good checkpoint (step {last_saved}) is kept in "
          f"{os.path.join(workdir, 'checkpoints')}" if last_saved is not None
          else "no checkpoint had been written yet")
  what = ("loss or gradient" if not bool(m["finite_loss"])
          else "updated parameters or optimizer state")
  advice = ("Lower config.optim.lr or set config.optim.grad_clip, and start over with "
            "--config.train.resume=restart (this run moves to previous/) or a new --workdir")
  if last_saved is not None and (bool(m["finite_loss"]) or last_saved < step - 1):
    advice += (f"; or continue from step {last_saved} with the new values: "
               f"--config.train.resume=allow_changes")
  return (f"non-finite {what} at step {step} (loss={float(m['loss'])}, "
          f"grad_norm={float(m['grad_norm'])}, lr={float(m['lr']):.3g}); training stopped, "
          f"{kept}. {advice}.")


class _Loop:
  """One process's step loop over a restored or fresh state: steps, the one-step-late
  finiteness check and logging, evaluation, best and periodic checkpoints, and stops on
  signals; `run` returns whether a signal stopped it."""

  def __init__(self, config, workdir, task, splits, trainer, loader, ckpt, writer, eval_bs,
               restored):
    self.tc, self.workdir, self.task, self.splits = config.train, workdir, task, splits
    self.trainer, self.loader, self.ckpt, self.writer = trainer, loader, ckpt, writer
    self.eval_bs = eval_bs
    self.best = dict(accuracy=None, step=None)
    if restored is None:
      self.state, self.rngs = trainer.init_state()
      self.start, meta = 0, None
      moved = writer.resume_at(0)  # records of a process killed before its first checkpoint
      if moved:
        log.info("%d metrics records of an earlier start moved to metrics_superseded.jsonl",
                 moved)
    else:
      self.start, self.state, loader_state, meta = restored
      self.rngs = trainer.init_rngs()
      loader.set_state(loader_state)
      self.best = dict(accuracy=meta.get("best_val_accuracy"), step=meta.get("best_val_step"))
      log.info("resumed from step %d", self.start)
      moved = writer.resume_at(self.start)
      if moved:
        log.info("%d metrics records past step %d (work lost with the last process) moved "
                 "to metrics_superseded.jsonl", moved, self.start)
    held = int(jax.device_get(self.state.step))
    if held != self.start:
      raise RuntimeError(f"checkpoint step {self.start} holds a train state at step {held}")
    tc = self.tc
    self.end = tc.num_steps if not 0 < tc.halt_at_step < tc.num_steps else tc.halt_at_step
    self.progress = metrics_lib.Progress(tc.num_steps, initial=self.start)
    self.last_saved = self.start if restored is not None else None
    self.val = None
    self.chrono = chrono_lib.Chrono(meta)
    self.window = _Window()
    self.tokens_per_example = None

  def meta(self) -> dict:
    return dict(best_val_accuracy=self.best["accuracy"], best_val_step=self.best["step"],
                **self.chrono.meta())

  def flush(self, step: int, dev_m: dict, examples: int) -> bool:
    """Checks and logs step `step`'s metrics (stopping on a non-finite loss or state);
    returns whether some process asked to stop."""
    m = jax.device_get(dev_m)
    if not bool(m["finite"]):
      self.ckpt.wait()
      raise NonFiniteLossError(nonfinite_message(step, m, self.last_saved, self.workdir))
    self.window.add(m)
    self.chrono.step(examples)
    if step == self.start + 1:  # the first step includes compilation: not in throughput
      log.info("first train step (with compilation) took %.1f s; %.4g model FLOPs per token",
               self.chrono.first_step_done(), self.trainer.flops_per_token)
    self.progress.live(step, dict(loss=float(m["loss"]), lr=float(m["lr"])))
    if step % self.tc.log_every == 0 or step == self.end:
      out = dict(self.window.means(), lr=float(m["lr"]))
      rates = self.chrono.rates()
      if rates:
        out.update(examples_per_s=rates["examples_per_s"],
                   tokens_per_s=rates["examples_per_s"] * self.tokens_per_example,
                   step_time_s=rates["step_time_s"])
        out.update(self.utilisation(out["tokens_per_s"]))
      self.writer.write(step, "train", out)
      shown = dict(loss=out["loss"], acc=out["accuracy"], lr=out["lr"])
      if rates:
        shown["ex_per_s"] = round(out["examples_per_s"], 1)
        shown["tok_per_s"] = round(out["tokens_per_s"])
        if "mfu" in out:
          shown["mfu"] = round(out["mfu"], 3)
      self.progress.line(step, shown, prefix="train")
      self.window = _Window()
    return bool(m["stop"])

  def utilisation(self, tokens_per_s: float) -> dict:
    """Model TFLOP/s and, on a device whose peak is known, MFU (train/flops.py)."""
    fpt = self.trainer.flops_per_token
    out = dict(model_tflops_per_s=tokens_per_s * fpt / 1e12)
    mfu = flops_lib.mfu(tokens_per_s, fpt, dtype=str(self.trainer.config.model.get("dtype", "float32")))
    if mfu is not None:
      out["mfu"] = mfu
    return out

  def validate(self, done: int) -> None:
    t0 = time.perf_counter()
    self.val = val = self.trainer.evaluate(self.state, self.rngs, self.splits["validation"],
                                           self.eval_bs)
    self.writer.write(done, "val", dict(loss=val["loss"], accuracy=val["accuracy"],
                                        eval_time_s=time.perf_counter() - t0, **_bpb(val)))
    self.progress.line(done, dict(loss=val["loss"], acc=val["accuracy"]), prefix="val")
    if self.best["accuracy"] is None or val["accuracy"] > self.best["accuracy"]:
      self.best = dict(accuracy=val["accuracy"], step=done)
      self.ckpt.save_best(done, self.state, self.loader.get_state(), self.meta())

  def save(self, done: int) -> None:
    self.ckpt.save(done, self.state, self.loader.get_state(), self.meta())
    self.last_saved = done

  def run(self, signals) -> bool:
    """Steps from `start` to `end`. Every process sees a stop request in the same step's
    metrics (Trainer.train_step), and the flushes happen at the same steps everywhere, so
    all stop at the same step."""
    tc, stopping = self.tc, False
    pending = None  # (step, device metrics, examples) of the last step, checked one late
    for step in range(self.start, self.end):
      local = next(self.loader)
      if self.tokens_per_example is None:
        self.tokens_per_example = _tokens_per_example(local, self.task)
      batch = self.trainer.global_batch(local)
      self.state, dev_m = self.trainer.train_step(
          self.state, self.rngs, batch, self.trainer.stop_flags(signals.requested))
      if pending is not None:
        stopping |= self.flush(*pending)
      pending = (step + 1, dev_m, tc.batch_size)
      done = step + 1
      evaluate_now = done % tc.eval_every == 0 or done == tc.num_steps
      save_now = ((tc.checkpoint_every and done % tc.checkpoint_every == 0)
                  or done == self.end or stopping)
      if evaluate_now or save_now:
        stopping |= self.flush(*pending)  # every step up to `done` is known finite first
        pending = None
        save_now = save_now or stopping
      with self.chrono.paused():  # evaluation and saving are not step time
        if evaluate_now:
          self.validate(done)
        if save_now:
          self.save(done)
      if stopping:
        break
    if pending is not None:
      self.flush(*pending)
    return stopping


def _run(config, workdir, task, splits, trainer, loader, ckpt, writer, eval_bs, t_start,
         restored):
  tc, mesh = config.train, trainer.mesh
  loop = _Loop(config, workdir, task, splits, trainer, loader, ckpt, writer, eval_bs,
               restored)
  with sharding_lib.mesh_context(mesh), signals_lib.StopOnSignal() as signals:
    stopping = loop.run(signals)
  loop.progress.close()
  state, val, best = loop.state, loop.val, loop.best
  final_step = int(jax.device_get(state.step))
  if stopping:
    ckpt.wait()
    name = signals.name or "a signal to another process"
    log.warning("stopped by %s at step %d of %d; checkpoint saved, rerun to continue",
                name, final_step, tc.num_steps)
    return dict(stopped_at_step=final_step, num_steps=tc.num_steps, signal=name)
  if final_step < tc.num_steps:
    ckpt.wait()
    log.info("halted at step %d of %d (config.train.halt_at_step); rerun to continue",
             final_step, tc.num_steps)
    return dict(halted_at_step=final_step, num_steps=tc.num_steps)

  with sharding_lib.mesh_context(mesh):
    if val is None:  # resumed after the end: evaluate the final state again
      val = trainer.evaluate(state, loop.rngs, splits["validation"], eval_bs)
    test = trainer.evaluate(state, loop.rngs, splits["test"], eval_bs)
  writer.write(final_step, "test", dict(loss=test["loss"], accuracy=test["accuracy"],
                                        **_bpb(test)))
  loop.progress.line(final_step, dict(loss=test["loss"], acc=test["accuracy"]), prefix="test")
  ckpt.wait()
  results = dict(
      config_name=config.get("name", ""),
      steps=final_step,
      val_loss=val["loss"], val_accuracy=val["accuracy"], val_examples=val["weight"],
      test_loss=test["loss"], test_accuracy=test["accuracy"], test_examples=test["weight"],
      best_val_accuracy=best["accuracy"], best_val_step=best["step"],
      wall_time_s=round(time.time() - t_start, 2),  # this process only
      **loop.chrono.meta(),
      # train_time_s: the step loops over every resume; runs: processes behind the state
      device_kind=jax.devices()[0].device_kind, device_count=jax.device_count(),
      process_count=jax.process_count(), mesh=dict(mesh.shape),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      jax_version=jax.__version__,
      **{f"val_{k}": v for k, v in _bpb(val).items()},
      **{f"test_{k}": v for k, v in _bpb(test).items()},
  )
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
  return results
