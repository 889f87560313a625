r"""LRA Text: IMDB reviews as bytes (257 ids), length 4096, 2 classes (data/text.py).

  python -m train --config=configs/lra/text.py:s4d --workdir=runs/text_s4d
  python -m train --config=configs/lra/text.py:s4,tiny --workdir=/tmp/x \
      --config.data.data_dir=/path/to/aclImdb

The argument is "model[,size]" with the models of configs/lra/listops.py. Data: the
project's ../shared/data/imdb/aclImdb.tar.gz unless data.data_dir is set; the test set
doubles as validation (LRA) unless data.val_fraction > 0. size: "" = the published
recipe (GPU scale), "local" = a CPU demo (reviews cut to 512 bytes, a small model,
a 10% validation split of train), "tiny" = a few steps for tests (set data.data_dir
to a tiny aclImdb folder; the full set would be read otherwise).

Published recipes (sources; numbers copied into RECIPES below):
  s4      S4 v3 / SPECS.md table (state-spaces/s4 configs/experiment/lra/s4-imdb.yaml):
          6 layers, H 256, N 4, BatchNorm prenorm, bidirectional, GLU, batch 16, lr 0.01
          (SSM 1e-3, no decay), wd 0.05, cosine, warmup 5k of 50k steps (32 epochs).
          Published 86.82 (S4 v2).
  s4d     state-spaces/s4 configs/experiment/lra/s4-lra-imdb.yaml (the S4D paper's
          runs): the same body with N 64, S4D-LegS init, warmup 1000 (cosine_warmup's
          default), batch 16, 50k steps.
  sgconv  ctlllll/SGConv configs/experiment/lra/gconv-lra-imdb.yaml: the S4 body above
          (6 x 256, BatchNorm prenorm, bidirectional, GLU), kernel_dim 2, decay 2, kernel
          lr 1e-3, lr 0.01, wd 0.05, cosine_warmup (warmup 1000) over 50k steps, batch 16.
          Published 89.20. The kernels are decayed at wd 0.05 like the reference's
          (common.sgconv_kernel_decay); our first full run (87.76, 2026-12-04) predates
          that and trained them without decay.
  lssl    no published Text recipe: the S4 body and budget above (our choice).
  transformer  google-research/long-range-arena lra_benchmarks/text_classification/
          configs/base_tc_config.py: 4 layers, width 256, 4 heads, MLP 1024, batch 32,
          20k steps, CLS pooling, wd 0.1, 0.05 * linear_warmup(8000) * rsqrt_decay
          (our "rsqrt" at 0.05 / sqrt(8000)). Published 64.27.
  mamba, mamba2, lightning, linear_attention: no published recipe; listops.py's
          causal bodies and LM-style optimizer with this task's budget (batch 16, 50k
          steps, warmup 5k). Unverified at full scale.
"""

import ml_collections
from ml_collections import config_dict

from configs import common
from configs.lra import listops

MODELS = listops.MODELS

_S4_BODY = dict(norm="batch", prenorm=True, ffn="none", pooling="mean", bidirectional=True,
                dropout=0.0, num_layers=6, d_model=256)
_S4_OPTIM = dict(lr=0.01, ssm_lr=1e-3, weight_decay=0.05, warmup_steps=5_000, schedule="cosine")
_BUDGET = dict(batch_size=16, num_steps=50_000)

# model -> (model fields, mixer options, optim fields, train fields)
RECIPES = {
    "s4": (_S4_BODY, dict(d_state=4, dt_min=1e-3, dt_max=1e-1), _S4_OPTIM, _BUDGET),
    "s4d": (_S4_BODY, dict(d_state=64, init="legs", dt_min=1e-3, dt_max=1e-1),
            dict(_S4_OPTIM, warmup_steps=1_000), _BUDGET),
    "lssl": (_S4_BODY, dict(d_state=4, postact="glu"), _S4_OPTIM, _BUDGET),
    "sgconv": (_S4_BODY, dict(kernel_dim=2, decay=2.0), dict(_S4_OPTIM, warmup_steps=1_000),
               _BUDGET),
    "transformer": (dict(listops.RECIPES["transformer"][0], num_layers=4, d_model=256),
                    dict(num_heads=4),
                    dict(listops.RECIPES["transformer"][2], lr=0.05 / 8000**0.5,
                         ssm_lr=0.05 / 8000**0.5, warmup_steps=8_000),
                    dict(batch_size=32, num_steps=20_000)),
}
for _m in ("mamba", "mamba2", "lightning", "linear_attention"):
  _body, _mixer, _optim, _ = listops.RECIPES[_m]
  RECIPES[_m] = (_body, _mixer, dict(_optim, warmup_steps=5_000), _BUDGET)


def text_data(seq_len=4096) -> dict:
  """The Text fields of config.data (data/text.py)."""
  return dict(
      task="text",
      data_dir=config_dict.placeholder(str),   # aclImdb folder or tar.gz; None: ../shared/data
      cache_dir=config_dict.placeholder(str),  # None: $SSMLAB_CACHE or ~/.cache/ssmlab
      seq_len=seq_len,
      val_fraction=0.0,                        # 0: validation = test, as LRA
      seed=0,
  )


def build(task: str, arg: str, *, recipes: dict, data_fields, default_len: int, local: dict,
          eval_every: int) -> ml_collections.ConfigDict:
  """A config from a recipe table; shared with configs/lra/retrieval.py.

  data_fields(seq_len) -> the config.data dict; local: data fields of the "local" size.
  """
  model, size = common.parse_arg(arg, models=MODELS)
  model_fields, mixer, optim, train = recipes[model]
  config = common.recipe_config(task, model, size, model_fields=model_fields, optim=optim,
                                train=train, eval_every=eval_every)
  seq_len = ml_collections.FieldReference(default_len)  # mixer l_max follows data.seq_len
  config.data = ml_collections.ConfigDict(data_fields(seq_len))
  mixer = dict(mixer)
  if size == "local":
    seq_len.set(512)
    config.data.update(local)
    mixer = common.local_size(config, model, mixer, num_layers=4, d_model=64, num_steps=1_000,
                              eval_every=250, eval_batch_size=128, log_every=50,
                              warmup_steps=100, kernel_dim=8)
  elif size == "tiny":
    seq_len.set(64)
    mixer = common.tiny_size(config, model, mixer, num_steps=4, batch_size=4, kernel_dim=8,
                             retrieval_mlp_dim=16)
  common.set_mixer(config, model, mixer, seq_len)
  return common.lock(config)


def get_config(arg: str = "s4d") -> ml_collections.ConfigDict:
  return build("text", arg, recipes=RECIPES, data_fields=text_data, default_len=4096,
               local=dict(val_fraction=0.1), eval_every=2_500)
