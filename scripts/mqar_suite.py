"""Train several mixers on MQAR (configs/mqar.py) and print their recall accuracy.

  python scripts/mqar_suite.py --workdir=runs/mqar --variants=lightning,lightning+mc,mamba,transformer

A variant is a model name of configs/mqar.py, optionally with "+mc" for memory caching
(gated residual memory, segments of --segment_size tokens, each segment's memory continuing
from the previous one) or "+mcr" (the same with a fresh memory per segment). Writes
WORKDIR/summary.json and prints a table (variant, params, query accuracy, steps, s).

Sweep (Zoology's protocol, issue 27; the grid is configs/mqar.py SWEEP):

  python scripts/mqar_suite.py sweep --workdir=runs/mqar_sweep            # the whole grid
  python scripts/mqar_suite.py sweep --workdir=/tmp/sw --quick            # CPU smoke test
  python scripts/mqar_suite.py sweep --workdir=W --mixers=mamba2 --caching=none,ssc \
      --d_models=64,128 --seq_lens=256 --plan                              # count, run nothing

A cell is (mixer, caching, segment size, d_model, seq_len, num_kv_pairs). All learning rates
(x seeds) of a cell train at once: the parameters and optimizer states of R = lrs x seeds
replicas are stacked and one `jax.vmap`ped step updates them all on the same batch, each
with its own lr (the optimizer is built with peak lr 1 and every replica's update is
scaled by its lr, exact for AdamW with decoupled decay and any schedule shape). The step is
compiled once per program (mixer, caching, segment, d_model, seq_len): num_kv_pairs does
not change shapes (the query slots are padded to the grid's largest count, below), so the
cells of one program share it (tested). Training data live on the device
and batches are gathered there (a step's batch is a function of the step number). Each
finished cell writes WORKDIR/cells/<cell>.json (accuracy and losses per lr, best lr, step
time, parameters, recurrent-state bytes for one sequence); a rerun skips finished cells.
A cell under way checkpoints its stacked state every 500 steps and when --max_seconds
runs out (WORKDIR/cells/<cell>.ckpt.npz), and a rerun continues it from there: keep
--max_seconds under the device's per-command limit and call again until every cell is
done. WORKDIR/sweep.json holds the protocol; a rerun with another protocol is refused (use
a new workdir). WORKDIR/results.jsonl (one row per cell) and results.md (best-lr table) are
rewritten at the end of every call; `plot_sweep(load_rows(workdir))` draws accuracy vs
d_model per length and vs state bytes.

The loss applies the LM head at the query positions only (`query_loss_sums`; equal to
the full-logit loss, tested): at vocabulary 8192 the head is most of a small model's work.
Every cell gathers the grid's largest pair count of slots (64; the unused ones carry no
weight), so that the pair counts of a program keep sharing one compiled step. XLA's cost
analysis of one replica's train step at d_model 64, L 256, 16 pairs, batch 256: mamba
249.9 -> 92.1 GFLOP, transformer 265.2 -> 107.4 (52.6 and 67.9 with 16 slots, at the price
of a compilation per pair count). The first GPU cells (results/mqar_sweep,
2026-12-04) ran with the full head.

--pack_pairs trains the cells of a program (its pair counts, 3 at each length) together:
their K x R replicas in one vmapped step, each group on its own cell's data and all on the
same rows per step, so every replica computes what it would alone (tested equal). It pays
where one cell's R replicas leave the GPU idle (scripts/gpu/mqar_probe.py measures the step
at R = 4, 8, 12); a group checkpoints and resumes as one (WORKDIR/cells/<cells>.ckpt.npz).

Cost model: time = one compile (tens of seconds on a GPU; 22-32 s measured) + sum over
cells of num_steps x t_step(program, R) + evaluation (num_test / eval_batch_size forward
passes). The other programs' compiles overlap training: while a program's first cell
trains, a worker thread builds the next program and compiles its step ahead of time
(--no_compile_ahead turns it off; not started with under COMPILE_AHEAD_MIN_S left of
--max_seconds). Whether the overlap is complete on a GPU is not measured yet: the
worker's tracing needs the GIL that the training loop's dispatch also takes. For these
small models t_step grows sub-linearly in R until the GPU is busy, so vmapping the lrs
costs much less than R separate runs. --plan prints the number of cells,
programs and steps and, from cells already done, the measured step times extrapolated to
the remaining cells of the same program.
"""

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import models
from configs import mqar
from data import load_task
from models import registry
from train import metrics as metrics_lib
from train import optim as optim_lib
from train import trainer


def variant_config(variant: str, segment_size: int, steps: int | None):
  model, _, extra = variant.partition("+")
  config = mqar.get_config(model)
  with config.unlocked():
    if extra in ("mc", "mcr"):
      config.model.mixer.memory_caching = dict(
          segment_size=segment_size, variant="gated",
          state_init="restart" if extra == "mcr" else "checkpoint")
    elif extra:
      raise ValueError(f"unknown variant suffix {extra!r} in {variant!r} ('+mc' or '+mcr')")
    if steps:
      config.train.num_steps = steps
      config.optim.warmup_steps = min(config.optim.warmup_steps, steps)
      config.train.eval_every = config.train.checkpoint_every = steps
    config.name = f"mqar:{variant}"
  return config


def count_params(config) -> int:
  task, _ = load_task(config.data)
  model = models.build_model(config.model, task, rngs=nnx.Rngs(0))
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# -- the sweep ----------------------------------------------------------------------------

CACHING = ("none", "grm", "ssc")


@dataclasses.dataclass(frozen=True)
class Cell:
  """One point of the sweep grid; caching "none" has segment_size None."""

  mixer: str
  caching: str
  segment_size: int | None
  d_model: int
  seq_len: int
  num_kv_pairs: int

  @property
  def variant(self) -> str:
    return self.mixer if self.caching == "none" else f"{self.mixer}+{self.caching}{self.segment_size}"

  @property
  def program(self) -> tuple:
    """What fixes the compiled step's shapes: cells of one program share it."""
    return (self.variant, self.d_model, self.seq_len)

  @property
  def name(self) -> str:
    return f"{self.variant.replace('+', '_')}_d{self.d_model}_L{self.seq_len}_kv{self.num_kv_pairs}"


def sweep_cells(grid: dict) -> list[Cell]:
  """Every cell of the grid (configs/mqar.py SWEEP's keys), grouped by program."""
  for c in grid["caching"]:
    if c not in CACHING:
      raise ValueError(f"caching must be among {CACHING}, got {c!r}")
  mc_kinds = set(registry.kinds(memory_caching=True))
  cells = []
  for mixer in grid["mixers"]:
    if mixer not in mqar.MIXERS:
      raise ValueError(f"unknown mixer {mixer!r}; valid: {sorted(mqar.MIXERS)}")
    options = [("none", None)]
    if mixer in mc_kinds:
      options += [(c, seg) for c in grid["caching"] if c != "none"
                  for seg in grid["segment_sizes"]]
    options = [o for o in options if o[0] in grid["caching"]]
    for caching, seg in options:
      for d in grid["d_models"]:
        for length in grid["seq_lens"]:
          for kv in grid["num_kv_pairs"]:
            if length >= 4 * kv:
              cells.append(Cell(mixer, caching, seg, d, length, kv))
  return cells


def cell_config(cell: Cell, grid: dict):
  """The configs/mqar.py config of a cell (optimizer peak lr 1: replicas scale it)."""
  config = mqar.get_config(f"{cell.mixer},zoology")
  with config.unlocked():
    config.data.update(dict(vocab_size=grid["vocab_size"], seq_len=cell.seq_len,
                            num_kv_pairs=cell.num_kv_pairs, num_train=grid["num_train"],
                            num_test=grid["num_test"]))
    config.model.update(dict(d_model=cell.d_model, num_layers=grid["num_layers"],
                             dtype=grid["dtype"]))
    if cell.caching != "none":
      config.model.mixer.memory_caching = dict(
          segment_size=cell.segment_size,
          variant="gated" if cell.caching == "grm" else "sparse",
          top_k=grid["top_k"] if cell.caching == "ssc" else None)
    config.optim.update(dict(lr=1.0, ssm_lr=1.0, warmup_steps=min(
        grid["warmup_steps"], max(grid["num_steps"] // 10, 1))))
    config.train.update(dict(num_steps=grid["num_steps"], batch_size=grid["batch_size"],
                             eval_batch_size=grid["eval_batch_size"]))
    config.name = f"mqar_sweep:{cell.name}"
  return config


def _nbytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def state_bytes(model, seq_len: int) -> int:
  """Bytes of the recurrent state for one sequence of seq_len tokens (KV cache for
  attention, the cached memories' buffer for memory caching)."""
  shapes = jax.eval_shape(lambda: model.init_state(1, max_len=seq_len))
  return _nbytes(shapes)


class _Program:
  """The compiled vmapped train / eval steps of one program (see the module docstring)."""

  def __init__(self, config, task):
    self.config, self.task = config, task
    self.tx, _ = optim_lib.make_optimizer(config.optim, num_steps=config.train.num_steps)
    model = models.build_model(config.model, task, rngs=nnx.Rngs(params=0, dropout=1))
    self.graphdef, _, self.rest = nnx.split(model, nnx.Param, ...)
    self.state_bytes = state_bytes(model, task.seq_len)
    tx, graphdef = self.tx, self.graphdef

    def loss_fn(params, rest, batch):
      sums = query_loss_sums(nnx.merge(graphdef, params, rest), batch)
      return sums["loss_sum"] / jnp.maximum(sums["weight"], 1e-9)

    def one(params, opt_state, lr, rest, batch):
      loss, grads = jax.value_and_grad(loss_fn)(params, rest, batch)
      updates, new_opt = tx.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, jax.tree.map(lambda u: lr * u, updates))
      # A non-finite step (a too-large lr) is discarded and counted.
      finite = jnp.isfinite(loss) & trainer.all_finite((new_params, new_opt))
      keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
      return (jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt, opt_state),
              loss, ~finite)

    def train_step(params, opt_state, lrs, rest, data, idx, group):
      # data (K, n, ...): the training sets of the K cells trained together (K = 1 unless
      # pair counts are packed); replica r trains on set group[r], every set on rows idx.
      batch = {k: v[:, idx][group] for k, v in data.items()}
      return jax.vmap(one, in_axes=(0, 0, 0, None, 0))(params, opt_state, lrs, rest, batch)

    def eval_step(params, rest, batch):
      return jax.vmap(lambda p: query_loss_sums(nnx.merge(graphdef, p, rest), batch))(params)

    self.train_step = jax.jit(train_step, donate_argnums=(0, 1))
    self.eval_step = jax.jit(eval_step)
    self._compiled: dict = {}  # train_step_shapes(...) -> AOT-compiled train step
    self.compile_s: float | None = None  # seconds of the last `compile`

  def compile(self, config, grid: dict, packed: int = 1) -> float:
    """Compiles the train step ahead of time for the shapes of config's cells (run_cells'
    arguments, abstract), so that `step_fn` finds it; returns the seconds it took. The
    sweep calls it for the next program in a worker thread while the current one trains:
    the compilation is host work that would otherwise leave the GPU idle (tens of seconds
    per program on an H200)."""
    t = time.time()
    key = train_step_shapes(config, grid, packed)
    n, length, slots, bs = key[:4]
    seeds = [int(s) for _ in range(packed) for _ in grid["lrs"] for s in grid["seeds"]]
    params, opt_state = jax.eval_shape(lambda: self.init(seeds))
    spec = jax.ShapeDtypeStruct
    k = packed
    data = dict(inputs=spec((k, n, length), jnp.int32),
                targets=spec((k, n, length), jnp.int32),
                mask=spec((k, n, length), jnp.bool_), weights=spec((k, n), jnp.float32),
                query_pos=spec((k, n, slots), jnp.int32),
                query_mask=spec((k, n, slots), jnp.bool_))
    lrs = spec((len(seeds),), jnp.float32)
    self._compiled[key] = self.train_step.lower(
        params, opt_state, lrs, self.rest, data, spec((bs,), jnp.int32),
        spec((len(seeds),), jnp.int32)).compile()
    self.compile_s = time.time() - t
    return self.compile_s

  def step_fn(self, config, grid: dict, packed: int = 1):
    """The train step for config's cells (`packed` of them trained together): the
    ahead-of-time compiled one if `compile` ran for these shapes, else the jitted one
    (compiled at its first call)."""
    return self._compiled.get(train_step_shapes(config, grid, packed), self.train_step)

  def init(self, seeds: list[int]):
    """Stacked (params, opt_state) of one replica per seed."""
    by_seed = {}
    for seed in sorted(set(seeds)):
      model = models.build_model(self.config.model, self.task,
                                 rngs=nnx.Rngs(params=seed, dropout=seed + 1))
      by_seed[seed] = nnx.split(model, nnx.Param, ...)[1]
    params = jax.tree.map(lambda *xs: jnp.stack(xs), *[by_seed[s] for s in seeds])
    return params, jax.vmap(self.tx.init)(params)


def query_positions(mask: np.ndarray, slots: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """mask (n, l) bool -> (positions (n, q) int32, valid (n, q) bool): each row's True
  positions in order, padded with invalid slots. q = slots (at least a row's count;
  the sweep passes its largest num_kv_pairs, so that every cell of a program has the same
  shapes and shares its compiled step), else the most True entries of a row."""
  mask = np.asarray(mask, bool)
  most = int(mask.sum(axis=1).max(initial=0))
  if slots is not None and slots < most:
    raise ValueError(f"query_positions: {slots} slots < {most} queries in a row")
  q = max(most, 1) if slots is None else slots
  if q > mask.shape[1]:
    raise ValueError(f"query_positions: {q} slots > sequence length {mask.shape[1]}")
  pos = np.argsort(~mask, axis=1, kind="stable")[:, :q]
  return pos.astype(np.int32), np.take_along_axis(mask, pos, axis=1)


def query_loss_sums(model, batch: dict) -> dict:
  """`metrics.loss_sums` of an MQAR batch with the LM head applied at the query positions
  only (batch "query_pos", "query_mask": `query_positions` of its loss mask). Equal to the
  full logits' loss (only masked positions count), at 1 / (l / q) of the head's cost, which
  at vocabulary 8192 is most of a small model's step."""
  x, _ = model.features(batch["inputs"], None, deterministic=True, what="lm")
  pos = batch["query_pos"]
  logits = model.logits(jnp.take_along_axis(x, pos[..., None], axis=1))
  query = dict(targets=jnp.take_along_axis(batch["targets"], pos, axis=1),
               weights=batch["weights"], mask=batch["query_mask"])
  return metrics_lib.loss_sums(logits, query, "lm")


def train_step_shapes(config, grid: dict, packed: int = 1) -> tuple:
  """What fixes the train step's argument shapes besides the program: (num_train,
  seq_len, query slots, batch size, replicas per cell, cells trained together)."""
  return (int(config.data.num_train), int(config.data.seq_len), query_slots(grid),
          int(config.train.batch_size), len(grid["lrs"]) * len(grid["seeds"]), packed)


def query_slots(grid: dict) -> int:
  """Query positions the sweep's loss gathers per sequence: its largest num_kv_pairs."""
  return max(grid["num_kv_pairs"])


def _mqar_arrays(config, split: str, slots: int | None = None) -> dict:
  """One split of a cell's MQAR set (numpy arrays; read-only, shared between calls)."""
  d = config.data
  return dict(_generated(d.num_train if split == "train" else d.num_test, int(d.seed),
                         0 if split == "train" else 1, int(d.vocab_size), int(d.seq_len),
                         int(d.num_kv_pairs), float(d.power_a), bool(d.random_non_queries),
                         slots))


# The data depend on (length, pairs) and not on the mixer or width, and the grid cycles
# through its 6 (length, pairs) sets in every program group: keep them all (about 0.3-0.5 GB
# of host memory each at the sweep's 100k sequences) rather than regenerate 2-3 s per cell.
@functools.lru_cache(maxsize=12)
def _generated(n, seed, split_seed, vocab_size, seq_len, num_kv_pairs, power_a,
               random_non_queries, slots):
  from data import mqar as mqar_data
  arrays = mqar_data.generate(n, seed=[seed, split_seed], vocab_size=vocab_size,
                              seq_len=seq_len, num_kv_pairs=num_kv_pairs, power_a=power_a,
                              random_non_queries=random_non_queries)
  arrays["weights"] = np.ones(len(arrays["inputs"]), np.float32)
  arrays["query_pos"], arrays["query_mask"] = query_positions(arrays["mask"], slots)
  for a in arrays.values():
    a.flags.writeable = False
  return arrays


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
  """Training rows of a step: epoch e = step // (n // batch_size) walks the permutation
  seeded by (seed, 2, e); a function of the step alone, so a resumed cell sees the same
  batches."""
  per_epoch = n // batch_size
  if per_epoch < 1:
    raise ValueError(f"num_train={n} is smaller than batch_size={batch_size}")
  epoch, i = divmod(step, per_epoch)
  return _epoch_order(n, seed, epoch)[i * batch_size:(i + 1) * batch_size]


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
  """One epoch's permutation, drawn once per epoch, not per step (0.86 ms of host time
  for n = 100k on this repo's CPU, against device steps of a few ms)."""
  order = np.random.default_rng([seed, 2, epoch]).permutation(n)
  order.flags.writeable = False
  return order


def _save_checkpoint(path: str, step: int, tree) -> None:
  leaves = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]
  tmp = path + ".tmp.npz"
  np.savez(tmp, step=np.int64(step), *leaves)
  os.replace(tmp, path)


def _load_checkpoint(path: str, like):
  with np.load(path) as f:
    leaves = [f[f"arr_{i}"] for i in range(len(jax.tree.leaves(like)))]
    step = int(f["step"])
  return step, jax.tree.unflatten(jax.tree.structure(like), [jnp.asarray(x) for x in leaves])


def run_cells(program: _Program, configs: list, grid: dict, *, checkpoint: str | None = None,
              deadline: float | None = None, halt_at_step: int | None = None,
              checkpoint_every: int = 500, log=None) -> list[dict] | None:
  """Train every replica (lrs x seeds) of the cells `configs` (of one program: their
  pair counts differ, nothing else) together, K = len(configs) groups of replicas in one
  vmapped step, each group on its cell's data and all on the same rows per step, so a
  replica computes what it would alone. Returns one result row per cell, or None when
  stopped early (time past `deadline`, or `halt_at_step` reached) with the state saved to
  `checkpoint` (every checkpoint_every steps too), from which a rerun continues; then
  `log` (when given) gets the step reached and the time the rest would take."""
  packed = len(configs)
  base_lrs = [float(lr) for lr in grid["lrs"] for _ in grid["seeds"]]
  base_seeds = [int(s) for _ in grid["lrs"] for s in grid["seeds"]]
  per = len(base_lrs)
  lrs, seeds = base_lrs * packed, base_seeds * packed
  params, opt_state = program.init(seeds)
  n_params = _nbytes(jax.tree.map(lambda x: x[0], params)) // 4
  sets = [_mqar_arrays(c, "train", query_slots(grid)) for c in configs]
  data = jax.device_put({k: np.stack([d[k] for d in sets]) for k in sets[0]})
  config = configs[0]
  n, bs, steps = sets[0]["inputs"].shape[0], config.train.batch_size, config.train.num_steps
  lr_arr = jnp.asarray(lrs, jnp.float32)
  group = jnp.repeat(jnp.arange(packed, dtype=jnp.int32), per)
  bad = jnp.zeros(len(lrs), jnp.int32)
  loss = jnp.full(len(lrs), jnp.nan, jnp.float32)
  first = 0
  if checkpoint and os.path.exists(checkpoint):
    first, (params, opt_state, bad, loss) = _load_checkpoint(
        checkpoint, (params, opt_state, bad, loss))
  train_step = program.step_fn(config, grid, packed)
  precompiled = train_step is not program.train_step
  t0 = time.time()
  t_first = t0
  for step in range(first, steps):
    if (halt_at_step is not None and step >= halt_at_step) or (
        deadline is not None and time.time() > deadline):
      if checkpoint:
        _save_checkpoint(checkpoint, step, (params, opt_state, bad, loss))
      if log is not None:
        per_step = (time.time() - t_first) / max(step - first - 1, 1)
        log(f"at step {step} of {steps}, {1e3 * per_step:.1f} ms/step after the first: "
            f"~{per_step * (steps - step):.0f} s more (first step {t_first - t0:.1f} s)")
      return None
    idx = jnp.asarray(batch_indices(step, n, bs, config.data.seed), jnp.int32)
    params, opt_state, loss, nonfinite = train_step(params, opt_state, lr_arr, program.rest,
                                                    data, idx, group)
    bad = bad + nonfinite
    if step == first:
      jax.block_until_ready(loss)
      t_first = time.time()
    if checkpoint and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
      _save_checkpoint(checkpoint, step + 1, (params, opt_state, bad, loss))
  jax.block_until_ready(params)
  t_end = time.time()
  # Steady-state time of one (vmapped) step: this invocation's steps after its first.
  step_time = (t_end - t_first) / max(steps - first - 1, 1)
  rows = []
  for k, cfg in enumerate(configs):
    part = slice(k * per, (k + 1) * per)
    acc, test_loss = _evaluate(program, jax.tree.map(lambda x: x[part], params), cfg, grid)
    # Best lr by mean accuracy over seeds.
    by_lr = {}
    for lr, a in zip(base_lrs, acc):
      by_lr.setdefault(lr, []).append(a)
    best_lr = max(by_lr, key=lambda lr: (np.mean(by_lr[lr]), -lr))
    rows.append(dict(
        lrs=base_lrs, seeds=base_seeds, accuracy=acc, test_loss=test_loss,
        final_train_loss=[float(x) for x in jax.device_get(loss[part])],
        nonfinite_steps=[int(x) for x in jax.device_get(bad[part])],
        best_lr=best_lr, best_accuracy=float(np.mean(by_lr[best_lr])),
        steps=steps, batch_size=bs, replicas=per, packed=packed, resumed_at_step=first,
        step_time_s=step_time, first_step_s=t_first - t0, train_s=t_end - t0,
        precompiled=precompiled, compile_s=program.compile_s if precompiled else None,
        params=int(n_params), state_bytes=program.state_bytes,
        device=jax.devices()[0].device_kind))
  return rows


def _evaluate(program: _Program, params, config, grid: dict) -> tuple[list, list]:
  """Test accuracy and loss per replica of params on config's test set."""
  test = _mqar_arrays(config, "test", query_slots(grid))
  totals = None
  ebs = config.train.eval_batch_size
  for i in range(0, len(test["inputs"]), ebs):
    batch = {k: jnp.asarray(v[i:i + ebs]) for k, v in test.items()}
    sums = program.eval_step(params, program.rest, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  acc = [float(x) for x in totals["correct"] / np.maximum(totals["weight"], 1e-9)]
  test_loss = [float(x) for x in totals["loss_sum"] / np.maximum(totals["weight"], 1e-9)]
  return acc, test_loss


PROTOCOL_KEYS = ("lrs", "seeds", "vocab_size", "num_train", "num_test", "num_layers",
                 "num_steps", "batch_size", "warmup_steps", "top_k", "dtype")


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _check_protocol(workdir: str, grid: dict) -> None:
  protocol = {k: list(grid[k]) if isinstance(grid[k], (list, tuple)) else grid[k]
              for k in PROTOCOL_KEYS}
  path = os.path.join(workdir, "sweep.json")
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved != protocol:
      diff = {k: (saved.get(k), protocol[k]) for k in protocol if saved.get(k) != protocol[k]}
      raise ValueError(f"{workdir} holds a sweep with another protocol (saved, asked): {diff}; "
                       f"use a new workdir")
  else:
    _write_json(path, protocol)


def load_rows(workdir: str) -> list[dict]:
  """Every finished cell's row (WORKDIR/cells/*.json), sorted by cell name."""
  folder = os.path.join(workdir, "cells")
  if not os.path.isdir(folder):
    return []
  rows = []
  for fname in sorted(os.listdir(folder)):
    if fname.endswith(".json"):
      with open(os.path.join(folder, fname)) as f:
        rows.append(json.load(f))
  return rows


_LIVE_PROGRAM: dict = {}  # the program in use: key -> _Program
_NEXT_PROGRAM: dict = {}  # the next one, being built and compiled: key -> Future[_Program]
_COMPILER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mqar-compile")
# Compile the next program ahead only with this much time left before the deadline: a
# compilation under way when the sweep stops holds the process until it ends.
COMPILE_AHEAD_MIN_S = 120.0


def _program_key(cell: Cell, grid: dict) -> tuple:
  return (cell.program, json.dumps({k: v for k, v in grid.items() if k not in ("lrs", "seeds")},
                                   sort_keys=True, default=str))


def _prepared_program(config, grid: dict, packed: int = 1) -> _Program:
  """A program with its train step compiled for config's cells, `packed` trained together
  (run in the worker)."""
  program = _Program(config, load_task_spec(config)[0])
  program.compile(config, grid, packed)
  return program


def _program(cell: Cell, grid: dict, config) -> _Program:
  """The cell's program, reused while consecutive cells (of this or a later sweep in the
  same process) share it; one is kept alive at a time (cells come grouped by program),
  besides the next one while it compiles. The lrs and seeds only set the replica axis,
  which jit specialises on by itself."""
  key = _program_key(cell, grid)
  if key not in _LIVE_PROGRAM:
    ahead = _NEXT_PROGRAM.pop(key, None)
    _LIVE_PROGRAM.clear()
    program = None
    if ahead is not None:
      try:
        program = ahead.result()
      except Exception as e:  # noqa: BLE001 -- the step compiles again below, in this thread
        print(f"compiling {cell.program} ahead failed ({type(e).__name__}: {e}); "
              f"compiling at its first step", file=sys.stderr)
    _LIVE_PROGRAM[key] = program or _Program(config, load_task_spec(config)[0])
  return _LIVE_PROGRAM[key]


def _compile_ahead(cell: Cell, todo: list[Cell], grid: dict) -> None:
  """Start building and compiling the first program after cell's among todo (for as many
  of its cells trained together as `_groups` will pack)."""
  key = _program_key(cell, grid)
  for nxt in todo:
    nxt_key = _program_key(nxt, grid)
    if nxt_key != key:
      if nxt_key not in _NEXT_PROGRAM and nxt_key not in _LIVE_PROGRAM:
        _NEXT_PROGRAM.clear()  # a stale one (another grid) is dropped
        packed = len(_groups([c for c in todo if _program_key(c, grid) == nxt_key],
                             grid)[0])
        _NEXT_PROGRAM[nxt_key] = _COMPILER.submit(_prepared_program,
                                                  cell_config(nxt, grid), grid, packed)
      return


def _groups(cells: list[Cell], grid: dict) -> list[list[Cell]]:
  """The cells trained together: with grid["pack_pairs"], the consecutive cells of one
  program (its pair counts); else one cell each."""
  groups: list[list[Cell]] = []
  for cell in cells:
    if grid.get("pack_pairs") and groups and groups[-1][0].program == cell.program:
      groups[-1].append(cell)
    else:
      groups.append([cell])
  return groups


def run_sweep(grid: dict, workdir: str, *, log=print, max_seconds: float | None = None,
              halt_at_step: int | None = None, compile_ahead: bool = True) -> dict:
  """Run the grid's unfinished cells; rewrite results.jsonl and results.md.

  grid["pack_pairs"] (optional): train each program's cells together (module docstring).
  max_seconds: stop (checkpointing the cell under way) once this much time has passed;
  halt_at_step: stop each cell there (tests). compile_ahead: while a program's first cell
  trains, build and compile the next program in a worker thread (rows say "precompiled"
  and its "compile_s"). Returns {"ran", "skipped", "stopped", "rows"}: cell names finished
  now, skipped as done, stopped with a checkpoint; every finished row.
  """
  deadline = None if max_seconds is None else time.time() + max_seconds
  os.makedirs(os.path.join(workdir, "cells"), exist_ok=True)
  _check_protocol(workdir, grid)
  cells = sweep_cells(grid)
  done = {c.name for c in cells
          if os.path.exists(os.path.join(workdir, "cells", c.name + ".json"))}
  skipped = [c.name for c in cells if c.name in done]
  todo = [c for c in cells if c.name not in done]
  ran, stopped = [], []
  groups = _groups(todo, grid)
  for i, group in enumerate(groups):
    if stopped:
      break
    cell = group[0]
    configs = [cell_config(c, grid) for c in group]
    program = _program(cell, grid, configs[0])
    if compile_ahead and (deadline is None or deadline - time.time() > COMPILE_AHEAD_MIN_S):
      _compile_ahead(cell, [c for g in groups[i + 1:] for c in g], grid)
    start = time.time()
    # a group's checkpoint names its cells' pair counts, so a rerun packs it alike
    tag = cell.name if len(group) == 1 else (
        cell.name.rsplit("_kv", 1)[0] + "_kv" + "-".join(str(c.num_kv_pairs) for c in group))
    ckpt = os.path.join(workdir, "cells", tag + ".ckpt.npz")
    progress = []
    results = run_cells(program, configs, grid, checkpoint=ckpt,
                        deadline=deadline, halt_at_step=halt_at_step, log=progress.append)
    if results is None:
      stopped.extend(c.name for c in group)
      log(f"{tag}: stopped {progress[0] if progress else ''}, state saved to {ckpt}")
      continue
    if os.path.exists(ckpt):
      os.remove(ckpt)
    seconds = round(time.time() - start, 2)
    for c, result in zip(group, results):
      row = dict(dataclasses.asdict(c), cell=c.name, variant=c.variant, **result,
                 seconds=seconds)
      _write_json(os.path.join(workdir, "cells", c.name + ".json"), row)
      ran.append(c.name)
      log(f"{c.name}: best lr {row['best_lr']:.2g} acc {row['best_accuracy']:.3f} "
          f"({row['step_time_s'] * 1e3:.1f} ms/step x {row['steps']}"
          f"{f', {len(group)} cells packed' if len(group) > 1 else ''}, {seconds} s)")
  rows = load_rows(workdir)
  with open(os.path.join(workdir, "results.jsonl"), "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(best_table(rows) + "\n")
  return dict(ran=ran, skipped=skipped, stopped=stopped, rows=rows)


def load_task_spec(config):
  """The MQAR TaskSpec of a config, without generating its data."""
  from data.task import TaskSpec
  d = config.data
  return TaskSpec(name="mqar", kind="lm", input_kind="tokens", seq_len=d.seq_len,
                  num_classes=d.vocab_size, vocab_size=d.vocab_size), None


def plan(grid: dict, workdir: str | None = None) -> dict:
  """Counts of the sweep and, from finished cells, an estimate of the remaining time."""
  cells = sweep_cells(grid)
  done = {r["cell"]: r for r in (load_rows(workdir) if workdir else [])}
  per_program = {}
  for r in done.values():  # seconds of steps per cell (a packed step serves several cells)
    per_program.setdefault((r["variant"], r["d_model"], r["seq_len"]), []).append(
        r["step_time_s"] / r.get("packed", 1))
  todo = [c for c in cells if c.name not in done]
  known = [c for c in todo if c.program in per_program]
  est = sum(np.median(per_program[c.program]) * grid["num_steps"] for c in known)
  return dict(cells=len(cells), programs=len({c.program for c in cells}), done=len(done),
              todo=len(todo), replicas=len(grid["lrs"]) * len(grid["seeds"]),
              steps_per_cell=grid["num_steps"], estimated_s_known=round(float(est), 1),
              todo_without_estimate=len(todo) - len(known))


def best_table(rows: list[dict]) -> str:
  """Markdown table: one line per cell, its best lr and accuracy."""
  lines = ["| variant | d_model | L | pairs | best lr | acc | ms/step | state KiB |",
           "|---|---|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: (r["variant"], r["seq_len"], r["num_kv_pairs"], r["d_model"])):
    lines.append(f"| {r['variant']} | {r['d_model']} | {r['seq_len']} | {r['num_kv_pairs']} | "
                 f"{r['best_lr']:.2g} | {r['best_accuracy']:.3f} | {r['step_time_s'] * 1e3:.1f} | "
                 f"{r['state_bytes'] / 1024:.1f} |")
  return "\n".join(lines)


def _variant_parts(variant: str) -> tuple[str, str, int | None]:
  """(mixer, caching, segment size) of a variant name: "mamba" -> ("mamba", "none", None),
  "mamba+grm32" -> ("mamba", "grm", 32)."""
  mixer, _, extra = variant.partition("+")
  caching = extra.rstrip("0123456789") or "none"
  digits = extra[len(caching):] if extra else ""
  return mixer, caching, int(digits) if digits else None


def _variant_order(variant: str) -> tuple:
  """Sort key: the mixers in SWEEP's order (then configs/mqar.py's other mixers, then any
  other name), each base model first and its caching variants after it."""
  mixer, caching, seg = _variant_parts(variant)
  known = list(dict.fromkeys(list(mqar.SWEEP["mixers"]) + list(mqar.MIXERS)))
  return (known.index(mixer) if mixer in known else len(known), mixer,
          CACHING.index(caching) if caching in CACHING else len(CACHING), caching,
          -1 if seg is None else seg)


def _variant_style(variant: str, segment_sizes: list[int]) -> dict:
  """Line style of a variant: the color is its mixer's (the same in every panel and figure),
  the line dash its caching kind, the marker its segment size."""
  import matplotlib.pyplot as plt
  mixer, caching, seg = _variant_parts(variant)
  known = list(dict.fromkeys(list(mqar.SWEEP["mixers"]) + list(mqar.MIXERS)))
  colors = plt.get_cmap("tab10").colors
  color = colors[known.index(mixer) % 9] if mixer in known else colors[9]
  dash = {"none": "-", "grm": "--", "ssc": ":"}.get(caching, "-.")
  markers = "s^Dvp*"
  marker = "o" if seg is None else markers[sorted(segment_sizes).index(seg) % len(markers)]
  return dict(color=color, linestyle=dash, marker=marker)


def plot_sweep(rows: list[dict], *, num_kv_pairs: int | None = None):
  """Figure of best accuracy: one column per seq_len, top row vs d_model, bottom row vs
  state bytes (log x), one line per variant. num_kv_pairs: keep those cells only (default
  the largest in rows). A variant keeps its style in every panel (color: mixer, dash:
  caching kind, marker: segment size); one legend for the figure, on its right, lists the
  variants with each base model before its caching variants. Returns the matplotlib Figure."""
  import matplotlib
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt
  from matplotlib import ticker
  if not rows:
    raise ValueError("plot_sweep: no rows")
  kv = num_kv_pairs or max(r["num_kv_pairs"] for r in rows)
  rows = [r for r in rows if r["num_kv_pairs"] == kv]
  if not rows:
    raise ValueError(f"plot_sweep: no rows with num_kv_pairs={kv}")
  lengths = sorted({r["seq_len"] for r in rows})
  variants = sorted({r["variant"] for r in rows}, key=_variant_order)
  segments = sorted({s for v in variants if (s := _variant_parts(v)[2]) is not None})
  d_models = sorted({r["d_model"] for r in rows})
  # State axis: whole powers of 2 around every point of the figure, the same in each panel.
  lo = 2.0 ** np.floor(np.log2(min(r["state_bytes"] for r in rows)) + 1e-3)
  hi = 2.0 ** np.ceil(np.log2(max(r["state_bytes"] for r in rows)) - 1e-3)
  lo, hi = (lo / 2, hi * 2) if lo == hi else (lo, hi)
  fig, axes = plt.subplots(2, len(lengths), figsize=(4.5 * len(lengths) + 1.8, 7),
                           squeeze=False, layout="constrained")
  handles = {}
  for j, length in enumerate(lengths):
    sub = [r for r in rows if r["seq_len"] == length]
    for variant in [v for v in variants if any(r["variant"] == v for r in sub)]:
      pts = sorted((r["d_model"], r["state_bytes"], r["best_accuracy"]) for r in sub
                   if r["variant"] == variant)
      d, sb, acc = zip(*pts)
      style = _variant_style(variant, segments)
      handles[variant], = axes[0, j].plot(d, acc, label=variant, **style)
      axes[1, j].plot(sb, acc, label=variant, **style)
    top, bottom = axes[0, j], axes[1, j]
    top.set(title=f"L={length}, {kv} pairs", xlabel="d_model", ylabel="accuracy",
            ylim=(-0.02, 1.02), xlim=(d_models[0] / 1.3, d_models[-1] * 1.3))
    top.set_xscale("log", base=2)
    top.xaxis.set_major_locator(ticker.FixedLocator(d_models))
    top.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    top.xaxis.set_minor_locator(ticker.NullLocator())
    bottom.set(xlabel="recurrent state per sequence", ylabel="accuracy", ylim=(-0.02, 1.02),
               xlim=(lo / 1.15, hi * 1.15))
    bottom.set_xscale("log", base=2)
    bottom.xaxis.set_major_locator(ticker.LogLocator(base=2, numticks=6))
    bottom.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: _bytes_label(x)))
    bottom.xaxis.set_minor_locator(ticker.NullLocator())
    for ax in (top, bottom):
      ax.grid(alpha=0.3)
  fig.legend([handles[v] for v in variants], variants, loc="outside right upper", fontsize=8)
  return fig


def _bytes_label(x: float) -> str:
  for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if x >= size:
      return f"{x / size:g} {unit}"
  return f"{x:g} B"


def sweep_main(argv=None):
  parser = argparse.ArgumentParser(prog="mqar_suite.py sweep")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--quick", action="store_true", help="configs/mqar.py SWEEP_QUICK")
  parser.add_argument("--plan", action="store_true", help="print counts and estimates only")
  parser.add_argument("--max_seconds", type=float, default=None,
                      help="stop after this long, checkpointing the cell under way")
  parser.add_argument("--no_compile_ahead", action="store_true",
                      help="do not compile the next program while the current one trains")
  parser.add_argument("--pack_pairs", action="store_true",
                      help="train the pair counts of a program together (one vmapped step "
                           "over all their replicas; pays where the GPU is idle at one "
                           "cell's replicas: scripts/gpu/mqar_probe.py says)")
  ints = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
  strs = lambda s: tuple(s.split(","))  # noqa: E731
  for name, conv in (("mixers", strs), ("caching", strs), ("segment_sizes", ints),
                     ("d_models", ints), ("seq_lens", ints), ("num_kv_pairs", ints),
                     ("lrs", lambda s: tuple(float(x) for x in s.split(","))), ("seeds", ints),
                     ("num_steps", int), ("batch_size", int), ("top_k", int), ("dtype", str),
                     ("num_train", int), ("num_test", int), ("eval_batch_size", int),
                     ("vocab_size", int)):
    parser.add_argument(f"--{name}", type=conv, default=None)
  args = parser.parse_args(argv)
  grid = dict(mqar.SWEEP_QUICK if args.quick else mqar.SWEEP)
  for k, v in vars(args).items():
    if v is not None and k in grid:
      grid[k] = v
  if args.pack_pairs:
    grid["pack_pairs"] = True
  if args.plan:
    print(json.dumps(plan(grid, args.workdir), indent=1))
    return None
  out = run_sweep(grid, args.workdir, max_seconds=args.max_seconds,
                  compile_ahead=not args.no_compile_ahead)
  print(f"ran {len(out['ran'])} cells, skipped {len(out['skipped'])} done, "
        f"stopped {len(out['stopped'])} (checkpointed)")
  print(best_table(out["rows"]))
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--variants", default="lightning,lightning+mc,mamba,transformer")
  parser.add_argument("--segment_size", type=int, default=32)
  parser.add_argument("--steps", type=int, default=None)
  args = parser.parse_args()
  rows = []
  for variant in args.variants.split(","):
    config = variant_config(variant, args.segment_size, args.steps)
    start = time.time()
    result = trainer.run(config, os.path.join(args.workdir, variant.replace("+", "_")))
    rows.append(dict(variant=variant, params=count_params(config),
                     test_accuracy=result["test_accuracy"], steps=result["steps"],
                     seconds=round(time.time() - start, 1), device=jax.devices()[0].device_kind,
                     d_model=config.model.d_model, num_kv_pairs=config.data.num_kv_pairs,
                     seq_len=config.data.seq_len))
  with open(os.path.join(args.workdir, "summary.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print(f"{'variant':<16}{'params':>9}{'query acc':>11}{'steps':>7}{'s':>7}")
  for r in rows:
    print(f"{r['variant']:<16}{r['params']:>9}{r['test_accuracy']:>11.3f}{r['steps']:>7}{r['seconds']:>7}")


if __name__ == "__main__":
  if sys.argv[1:2] == ["sweep"]:
    sweep_main(sys.argv[2:])
  else:
    main()
