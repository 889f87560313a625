r"""Byte-level language models at GPT-2-small scale on the 50,000 IMDB reviews, bf16.

  python -m train --config=configs/lm/imdb.py:mamba --workdir=/tmp/imdb_mamba
  python -m train --config=configs/lm/imdb.py:transformer --config.model.dtype=float32 ...
  python -m train --config=configs/lm/imdb.py:mamba2 --config.data.path=/my/text/dir

The argument is "model[,size]"; models: mamba, mamba2, lightning, transformer. Sizes: ""
is the recipe; "tiny" a seconds-long CPU setting for tests (point data.path at a small
corpus).

Data: every review of ../shared/data/imdb/aclImdb.tar.gz (train and test, pos and neg;
about 65 MB of text) is a document (data.path="imdb", data/lm.py); held out by a seeded
document permutation: validation 1% (500 reviews), test 1% (500), the other 49,000 train.
Bytes, documents packed with a separator into windows of 2,048 (65.5M tokens, 31,374
training windows). The mixers that take them (mamba2, lightning) get segment ids, so
their state and (Mamba-2) convolution restart at each document; the others see the
separator only. data.path may name any directory or tar archive of text files instead.

Models (the published shapes at d_model 768; with a 258-byte vocabulary the embedding is
0.2M parameters, not GPT-2's 38.6M, so each model is its non-embedding size):

    mamba        Mamba-1 130M's shape: 24 layers, d_state 16, expand 2, no FFN   91M
    mamba2       Mamba-2 130M's shape: 24 layers, d_state 128, headdim 64,
                 chunk 256, no FFN                                                91M
    lightning    12 layers, GLU FFN x 2, 12 heads                                78M
    transformer  GPT-2 small with RoPE: 12 layers, MLP x 4 with GPT-2's tanh GELU,
                 12 heads                                                         85M

RMSNorm prenorm, tied embeddings, no dropout, bf16 compute (model.dtype; parameters,
optimizer state, SSM states and the loss float32; models/model.py). Optimizer: AdamW
(b2 0.95, weight decay 0.1, SSM A/D/dt without it), 1,000 warmup steps then cosine, grad
clip 1.0; lr 6e-4 for the transformer (GPT-2 small's), 2e-3 for the others (the Mamba
papers train the 130M models at about 3x GPT-3's lr; untuned here). 16 x 2048 tokens per
step, 10,000 steps: 328M tokens, about 5 passes over the training reviews.
"""

import ml_collections

from configs import common
from configs.lm.shakespeare import lm_data

MODELS = ("mamba", "mamba2", "lightning", "transformer")
SIZES = ("", "tiny")
SEQ_LEN = 2048

# model fields and mixer options per model (see the parameter counts above).
RECIPES = {
    "mamba": (dict(num_layers=24, ffn="none"), dict(d_state=16)),
    "mamba2": (dict(num_layers=24, ffn="none"), dict(d_state=128, headdim=64, chunk_size=256)),
    "lightning": (dict(num_layers=12, ffn="glu", ffn_mult=2), dict(num_heads=12)),
    "transformer": (dict(num_layers=12, ffn="mlp", ffn_mult=4, ffn_activation="gelu_tanh"),
                    dict(num_heads=12)),
}
TAKES_SEGMENTS = ("mamba2", "lightning")


def get_config(arg: str = "mamba") -> ml_collections.ConfigDict:
  model, size = common.parse_arg(arg, models=MODELS, sizes=SIZES)
  config = common.base_config()
  config.name = f"lm_imdb:{model}" + (f",{size}" if size else "")
  seq_len = ml_collections.FieldReference(SEQ_LEN)  # the attention KV cache follows it
  config.data = ml_collections.ConfigDict(lm_data(seq_len))
  config.data.update(dict(path="imdb", val_fraction=0.01, test_fraction=0.01,
                          segment_ids=model in TAKES_SEGMENTS))
  model_fields, mixer = RECIPES[model]
  config.model.update(dict(name=model, d_model=768, dropout=0.0, norm="rms", prenorm=True,
                           pooling="none", bidirectional=False, tie_embeddings=True,
                           dtype="bfloat16"))
  config.model.update(model_fields)
  lr = 6e-4 if model == "transformer" else 2e-3
  config.optim.update(dict(lr=lr, ssm_lr=lr, weight_decay=0.1, warmup_steps=1_000,
                           schedule="cosine", grad_clip=1.0, b2=0.95))
  config.train.update(dict(num_steps=10_000, batch_size=16, eval_batch_size=16,
                           eval_every=1_000, checkpoint_every=1_000, log_every=50))
  mixer = dict(mixer)
  if size == "tiny":
    seq_len.set(32)
    config.data.path = None  # tests point it at a small corpus
    config.model.update(dict(d_model=32, num_layers=2))
    config.train.update(dict(num_steps=4, batch_size=4, eval_batch_size=4, eval_every=2,
                             checkpoint_every=2, log_every=1, keep_checkpoints=1))
    config.optim.update(dict(lr=1e-2, ssm_lr=1e-2, warmup_steps=1))
    mixer = {k: {"d_state": 8, "headdim": 16, "chunk_size": 16, "num_heads": 2}.get(k, v)
             for k, v in mixer.items()}
  config.model.mixer = ml_collections.ConfigDict(mixer)
  if model == "transformer":
    config.model.mixer.max_len = seq_len
  return common.lock(config)
