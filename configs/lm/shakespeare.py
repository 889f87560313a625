r"""Byte-level language modelling on Tiny Shakespeare (data/lm.py), five mixers at ~3.6M parameters.

  python -m train --config=configs/lm/shakespeare.py:mamba --workdir=/tmp/lm_mamba
  python -m train --config=configs/lm/shakespeare.py:s4d,long --workdir=/tmp/lm_s4d_512
  python -m train --config=configs/lm/shakespeare.py:transformer --config.data.path=/my/corpus

The argument is "model[,size]"; models: mamba, mamba2, lightning, s4d, transformer (the softmax
attention mixer with rotary positions). Sizes: "" trains on 256-byte windows, "long" on
512-byte windows (half the batch, so the same tokens per step), "tiny" is a seconds-long
setting for tests (point data.path at a small corpus).

Data: the 1.1 MB corpus split into paragraphs (blank lines), paragraphs assigned to
train/validation/test 90/5/5 by a seeded permutation, bytes packed with a separator
(data/lm.py); vocabulary 258 (256 bytes, padding, separator). data.path may also name a
tar archive of documents or "imdb" (the 50,000 IMDB reviews); data.segment_ids=True gives
the mixers that take them (mamba2, lightning) the document of each position.

Models: prenorm LayerNorm residual blocks, untied embedding and LM head, widths chosen
for about the same parameter count (measured with models.build_model):

    mamba        d_model 256, 8 layers, no FFN (Mamba's block), d_state 16   3,639,042
    mamba2       d_model 256, 8 layers, no FFN, d_state 64, 8 heads of 64     3,591,106
    lightning    d_model 232, 6 layers, GLU FFN x2, 4 heads                  3,685,346
    s4d          d_model 256, 6 layers, GLU FFN x2, d_state 64               3,593,474
    transformer  d_model 240, 6 layers, GLU FFN x2, 4 heads, rotary          3,594,978

Optimizer (our choice, nanoGPT's Shakespeare-char recipe in spirit): AdamW, weight decay
0.1, cosine schedule after 200 warmup steps, grad clip 1.0, lr 2e-3 (1e-3 for the
transformer), S4D's A/dt at 1e-3 without weight decay, b2 0.99; dropout 0.1; 5,000
steps of 32 x 256 bytes, about 41 passes over the ~1.0M training bytes (nanoGPT's
shakespeare_char runs 5,000 x 64 x 256). Untuned: a starting point, not a result.
Report validation loss per byte as bits per byte with data.lm.bits_per_byte and the
split's `info` (bytes per token is about 0.994: separators count no bytes).
"""

import ml_collections
from ml_collections import config_dict

from configs import common

MODELS = ("mamba", "mamba2", "lightning", "s4d", "transformer")
SIZES = ("", "long", "tiny")

# model fields and mixer options per model (see the parameter counts above).
RECIPES = {
    "mamba": (dict(d_model=256, num_layers=8, ffn="none"), dict(d_state=16)),
    # heads of 64 and N 64: shapes the SSD kernel takes (ssm/ops/ssd_pallas.py)
    "mamba2": (dict(d_model=256, num_layers=8, ffn="none"), dict(d_state=64, headdim=64)),
    "lightning": (dict(d_model=232, num_layers=6, ffn="glu"), dict(num_heads=4)),
    "s4d": (dict(d_model=256, num_layers=6, ffn="glu"), dict(d_state=64)),
    "transformer": (dict(d_model=240, num_layers=6, ffn="glu"), dict(num_heads=4)),
}


def lm_data(seq_len) -> dict:
  """config.data for data/lm.py (byte-level Tiny Shakespeare by default)."""
  return dict(
      task="lm",
      path=config_dict.placeholder(str),  # file, directory, tar archive, "imdb"; None: Shakespeare
      pattern="*.txt",
      document_split="paragraph",
      block_size=4096,
      tokenizer="byte",
      seq_len=seq_len,
      val_fraction=0.05,
      test_fraction=0.05,
      shuffle_documents=True,
      seed=0,
      segment_ids=False,  # True: batches carry "segment_ids" (mamba2, lightning, linear_attention)
  )


def get_config(arg: str = "mamba") -> ml_collections.ConfigDict:
  model, size = common.parse_arg(arg, models=MODELS, sizes=SIZES)
  config = common.base_config()
  config.name = f"lm_shakespeare:{model}" + (f",{size}" if size else "")
  seq_len = ml_collections.FieldReference(256)  # the attention KV cache follows data.seq_len
  config.data = ml_collections.ConfigDict(lm_data(seq_len))
  model_fields, mixer = RECIPES[model]
  config.model.update(dict(name=model, dropout=0.1, norm="layer", prenorm=True, ffn_mult=2,
                           pooling="none", bidirectional=False, tie_embeddings=False))
  config.model.update(model_fields)
  lr = 1e-3 if model == "transformer" else 2e-3
  config.optim.update(dict(lr=lr, ssm_lr=1e-3 if model == "s4d" else lr, weight_decay=0.1,
                           warmup_steps=200, schedule="cosine", grad_clip=1.0, b2=0.99))
  config.train.update(dict(num_steps=5_000, batch_size=32, eval_batch_size=64, eval_every=500,
                           checkpoint_every=1_000, log_every=50))
  mixer = dict(mixer)
  if size == "long":
    seq_len.set(512)
    config.train.update(dict(batch_size=16, eval_batch_size=32))
  elif size == "tiny":
    seq_len.set(32)
    config.model.update(dict(d_model=16, num_layers=1, dropout=0.0))
    config.train.update(dict(num_steps=4, batch_size=4, eval_batch_size=8, eval_every=2,
                             checkpoint_every=2, log_every=1, keep_checkpoints=1))
    config.optim.update(dict(lr=1e-2, ssm_lr=1e-2, warmup_steps=1))
    mixer = {k: min(v, 4) if k == "d_state" else (2 if k == "num_heads" else
                                                  8 if k == "headdim" else v)
             for k, v in mixer.items()}
  config.model.mixer = ml_collections.ConfigDict(mixer)
  if model == "transformer":
    config.model.mixer.max_len = seq_len
  return common.lock(config)
