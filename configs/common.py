"""Pieces shared by the config files: the base ConfigDict and "model,size" parsing.

Every config has four sections (field meanings below) plus `name`, the config's own
label ("listops:s4d", ...), which the trainer writes into results.json.

  model   what `models.build_model` reads: its fields and defaults are
          `models.model.MODEL_DEFAULTS`, the one place they are written.
  data    what `data.load_task` reads: task, seq_len, seed, plus the task's own fields,
          which each config file adds (e.g. `listops_data()`).
  optim   optimizer and learning-rate schedule (train/optim.py).
  train   steps, batch sizes, evaluation, checkpoints, logging, device mesh.

Config files call `base_config()`, fill in their recipe, then `lock(config)`: a locked
ConfigDict refuses new keys, so a typo on the command line
(`--config.train.num_step=3`) fails instead of being silently ignored.
"""

import ml_collections
from ml_collections import config_dict

from models.model import ALIASES, MODEL_DEFAULTS
from models.registry import kinds, mixer_spec

SIZES = ("", "local", "tiny")
# The time-invariant layers (S4-like): their SSM parameters train at their own rate.
LTI = kinds(family="lti")
TINY_OPTIM = dict(lr=1e-2, ssm_lr=1e-2, warmup_steps=1, schedule="cosine")


def parse_arg(arg: str | None, *, models, sizes=SIZES) -> tuple[str, str]:
  """Splits "model[,size]" and checks both against the valid values.

  >>> parse_arg("s4d,local", models=("s4d",))
  ('s4d', 'local')
  """
  parts = [p.strip() for p in (arg or "").split(",")]
  if len(parts) > 2 or not parts[0]:
    raise ValueError(f"config argument must be 'model[,size]', got {arg!r}; "
                     f"models: {sorted(models)}, sizes: {list(sizes)}")
  model = parts[0]
  size = parts[1] if len(parts) == 2 else ""
  if model not in models:
    raise ValueError(f"unknown model {model!r} in config argument {arg!r}; valid: {sorted(models)}")
  if size not in sizes:
    raise ValueError(f"unknown size {size!r} in config argument {arg!r}; valid: {list(sizes)}")
  return model, size


def base_config() -> ml_collections.ConfigDict:
  """All fields the trainer knows, with neutral defaults; config files override them."""
  config = ml_collections.ConfigDict()
  config.name = ""

  config.model = ml_collections.ConfigDict(
      dict(MODEL_DEFAULTS, name="s4d", mixer=ml_collections.ConfigDict()))

  # Only the keys every task has; each config file adds its task's own (data.load_task
  # rejects keys its task does not know).
  config.data = ml_collections.ConfigDict(dict(
      task="listops",
      seq_len=2000,
      seed=0,
      # Where the task's TFDS dataset is prepared and read (data/builders.py); None:
      # <cache>/tfds. Point it at datasets prepared elsewhere to read them there.
      tfds_dir=config_dict.placeholder(str),
  ))

  config.optim = ml_collections.ConfigDict(dict(
      optimizer="adamw",       # "adamw" | "sgd" (momentum b1)
      lr=1e-3,                 # peak learning rate of ordinary parameters
      ssm_lr=1e-3,             # peak learning rate of ssm.params.SSMParam
      weight_decay=0.0,        # decoupled (AdamW); matrices only, see train/optim.py
      ssm_weight_decay=0.0,    # decoupled decay of the SSMParam group (0: the S4 papers'
                               # recipe; SGConv's reference decays its kernels, see
                               # sgconv_kernel_decay)
      warmup_steps=0,
      schedule="cosine",       # "cosine" | "linear" | "constant" | "rsqrt" (after warmup)
      grad_clip=0.0,           # global-norm clipping; 0 = off
      b1=0.9,
      b2=0.999,
      eps=1e-8,
  ))

  config.train = ml_collections.ConfigDict(dict(
      num_steps=1000,
      batch_size=32,           # global, across all devices and hosts
      accum_steps=1,           # gradient accumulation: micro-batches of batch_size / accum_steps
                               # per update (train/trainer.py)
      eval_batch_size=64,      # global
      eval_every=500,          # steps between validation passes (and at the end)
      checkpoint_every=500,    # steps between checkpoints (and at the end); 0 = end only
      keep_checkpoints=3,      # the latest N are kept, plus the best by val accuracy
      log_every=50,
      seed=0,
      # Device mesh: axis sizes of ("data", "fsdp", "seq"); -1 takes the remaining devices.
      # seq > 1 splits every sequence's length over seq devices (sequence parallelism,
      # train/trainer.py); the batch is split over data x fsdp.
      mesh=ml_collections.ConfigDict(dict(data=-1, fsdp=1, seq=1)),
      fsdp_min_size=2**20,     # parameters with fewer elements stay replicated
      halt_at_step=0,          # stop this invocation at that step (checkpointed); 0 = never
      resume="auto",           # "auto" | "allow_changes" | "restart": a workdir whose saved
                               # config differs (see train/workdir.py)
      prefetch=2,              # batches the loader prepares ahead (per worker)
      data_workers=0,          # grain worker processes making train batches; 0: in process
  ))
  return config


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Refuses new keys from now on (command-line typos fail); values stay overridable."""
  config.lock()
  return config


def listops_data(seq_len=2000) -> dict:
  """The ListOps fields of config.data (data/listops.py), LRA's generator settings."""
  return dict(
      task="listops",
      data_dir=config_dict.placeholder(str),   # the three TSV files; None: generate
      cache_dir=config_dict.placeholder(str),  # None: $SSMLAB_CACHE or ~/.cache/ssmlab
      seq_len=seq_len,
      num_train=96_000,
      num_val=2_000,
      num_test=2_000,
      seed=0,
      min_length=500,          # LRA keeps trees with 500 < length < 2000
      max_length=2000,
      max_depth=10,
      max_args=10,
  )


def set_mixer(config: ml_collections.ConfigDict, model: str, mixer: dict, seq_len) -> None:
  """config.model.mixer = mixer, with the kind's length option (the registry's
  `length_option`: l_max of the kernels built for a maximum length, max_len of a KV cache)
  tied to seq_len.

  seq_len is the FieldReference behind config.data.seq_len, so overriding
  --config.data.seq_len moves l_max / max_len with it.
  """
  config.model.mixer = ml_collections.ConfigDict(mixer)
  option = mixer_spec(ALIASES.get(model, model)).length_option
  if option is not None:
    config.model.mixer[option] = seq_len


def sgconv_kernel_decay(config: ml_collections.ConfigDict) -> None:
  """An SGConv recipe decays the kernels with the main weight decay (their SSMParam group
  otherwise gets none). SGConv's reference (ctlllll/SGConv train.py) gives its kernels
  their own lr but keeps the optimizer's weight decay for them (each group is
  `{**optimizer, **kernel._optim}` with _optim = {"lr": ...}), where S4 registers its
  SSM parameters with weight_decay 0. Call it after the recipe's optim fields are set."""
  if config.model.name == "sgconv":
    config.optim.ssm_weight_decay = config.optim.weight_decay


def recipe_config(task: str, model: str, size: str, *, model_fields: dict, optim: dict,
                  train: dict, eval_every: int, eval_batch_size: int | None = None):
  """base_config with a published recipe's model, optim and train fields, named
  "task:model[,size]"; evaluation and checkpoints every eval_every steps."""
  config = base_config()
  config.name = f"{task}:{model}" + (f",{size}" if size else "")
  config.model.update(model_fields)
  config.model.name = model
  config.optim.update(optim)
  sgconv_kernel_decay(config)
  config.train.update(train)
  config.train.update(dict(eval_batch_size=eval_batch_size or 2 * config.train.batch_size,
                           eval_every=eval_every, checkpoint_every=eval_every, log_every=100))
  return config


def local_optim(model: str, lr: float, warmup_steps: int) -> dict:
  """The optim fields of a "local" CPU run: a cosine schedule from lr, the SSM parameters of
  the LTI layers at most 1e-3."""
  return dict(lr=lr, ssm_lr=min(lr, 1e-3) if model in LTI else lr, warmup_steps=warmup_steps,
              schedule="cosine")


def local_size(config: ml_collections.ConfigDict, model: str, mixer: dict, *,
               warmup_steps: int, num_steps: int, eval_every: int, eval_batch_size: int,
               log_every: int, kernel_dim: int, batch_size: int = 32, lr: float | None = None,
               **model_fields) -> dict:
  """Makes config the "local" size (a CPU demo of a few minutes): model_fields, a short
  training evaluated and checkpointed every eval_every steps, `local_optim` from lr (None:
  4e-3, 1e-3 for the transformer); returns the mixer shrunk (`shrink_mixer`, state 16,
  4 heads)."""
  if lr is None:
    lr = 1e-3 if model == "transformer" else 4e-3
  config.model.update(model_fields)
  config.train.update(dict(num_steps=num_steps, batch_size=batch_size, log_every=log_every,
                           eval_batch_size=eval_batch_size, eval_every=eval_every,
                           checkpoint_every=eval_every))
  config.optim.update(local_optim(model, lr, warmup_steps))
  return shrink_mixer(model, mixer, d_state=16, heads=4, kernel_dim=kernel_dim)


def tiny_size(config: ml_collections.ConfigDict, model: str, mixer: dict, *, num_steps: int,
              batch_size: int, kernel_dim: int, **model_fields) -> dict:
  """Makes config the "tiny" size (tests): 2 layers of 16, num_steps steps evaluated and
  checkpointed twice, `TINY_OPTIM`; returns the mixer shrunk (state 4, 2 heads)."""
  config.model.update(dict(num_layers=2, d_model=16, **model_fields))
  config.train.update(dict(num_steps=num_steps, batch_size=batch_size,
                           eval_batch_size=2 * batch_size, eval_every=num_steps // 2,
                           checkpoint_every=num_steps // 2, log_every=1, keep_checkpoints=2))
  config.optim.update(TINY_OPTIM)
  return shrink_mixer(model, mixer, d_state=4, heads=2, kernel_dim=kernel_dim)


def shrink_mixer(model: str, mixer: dict, *, d_state: int, heads: int, kernel_dim: int) -> dict:
  """Smaller state / fewer heads for the CPU sizes (sgconv: shorter sub-kernels, so that
  short sequences still have several scales)."""
  mixer = dict(mixer)
  if model in LTI and "d_state" in mixer:
    mixer["d_state"] = min(mixer["d_state"], d_state)
  elif model == "mamba2":
    mixer.update(d_state=16, headdim=16)
  elif model == "sgconv":
    mixer["kernel_dim"] = kernel_dim
  if "num_heads" in mixer:
    mixer["num_heads"] = heads
  return mixer
