r"""Multi-query associative recall (MQAR, Zoology: Arora et al. 2023) for any causal mixer.

  python -m train --config=configs/mqar.py:mamba --workdir=/tmp/mqar_mamba
  python -m train --config=configs/mqar.py:s4d --workdir=/tmp/mqar_s4d --config.data.num_kv_pairs=32

The argument is "model[,size]": any model name of configs/lra/listops.py (all run causal
here); size "tiny" is a seconds-long setting for tests, "zoology" Zoology's task size
(vocabulary 8192, 2 layers, 100k training sequences; length, pairs and width are set per
cell by the sweep, scripts/mqar_suite.py sweep, over the grid `SWEEP`).

The setting is Zoology's recall task at a CPU-friendly size: vocabulary 512, sequences of
128 tokens holding 16 key-value pairs then queries, 2 layers of width 64 (Zoology sweeps
d_model 64..512 at 2 layers; its vocabulary is 8192). Targets are the values at the query
positions only (data/mqar.py); accuracy is per query. Optimizer as Zoology: AdamW with
weight decay 0.1 and a cosine schedule; lr 3e-3 is our choice from its sweep range.
Body: prenorm LayerNorm blocks with an MLP channel mixer (Zoology's default block);
Mamba blocks have none (Mamba's own design).

Measured (H100, 3000 steps, ~30 s each): transformer 1.00 query accuracy; mamba 0.07 and
s4d 0.05 at this width, in line with Zoology's finding that recall needs attention or
much wider recurrent states.
"""

import ml_collections

from configs import common
from configs.lra.listops import MODELS

# Mixer options per model (causal use).
MIXERS = {
    "s4": dict(d_state=64), "s4d": dict(d_state=64), "lssl": dict(d_state=16),
    "sgconv": dict(kernel_dim=16), "mamba": dict(d_state=16), "mamba2": dict(d_state=16, headdim=16),
    "lightning": dict(num_heads=2), "linear_attention": dict(num_heads=2),
    "transformer": dict(num_heads=2),
}


# Zoology's protocol as issue 27 states it (Arora et al. 2023: vocabulary 8192, lr swept from
# 1e-4 to 1e-2, d_model 64..512, best lr per cell reported), on the grid. A cell is
# (mixer, caching, segment size, d_model, seq_len, num_kv_pairs); every lr of a cell trains
# at once (vmapped) through one compiled step per (mixer, caching, segment, d_model, seq_len).
# Training: num_steps x batch_size = 16 passes over the 100k sequences (our choice; Zoology
# trains many epochs over a fixed training set). "caching": none | grm (gated residual memory)
# | ssc (sparse selective caching, top_k cached memories); attention takes none only.
SWEEP = dict(
    mixers=("transformer", "mamba", "mamba2", "lightning", "linear_attention"),
    caching=("none", "grm", "ssc"), segment_sizes=(32, 64), top_k=2,
    d_models=(64, 128, 256), seq_lens=(256, 512), num_kv_pairs=(16, 32, 64),
    lrs=(1e-4, 4.6e-4, 2.2e-3, 1e-2), seeds=(0,),
    vocab_size=8192, num_train=100_000, num_test=3_000, num_layers=2,
    num_steps=6_250, batch_size=256, eval_batch_size=250, warmup_steps=300, dtype="float32")

# A seconds-long CPU smoke test of the same code path (scripts/mqar_suite.py sweep --quick).
SWEEP_QUICK = dict(
    SWEEP, mixers=("transformer", "lightning"), segment_sizes=(8,), d_models=(16,),
    seq_lens=(32,), num_kv_pairs=(4,), lrs=(1e-3, 1e-2), vocab_size=32, num_train=64,
    num_test=32, num_layers=1, num_steps=4, batch_size=8, eval_batch_size=16, warmup_steps=1)


def get_config(arg: str = "mamba") -> ml_collections.ConfigDict:
  model, size = common.parse_arg(arg, models=MODELS, sizes=("", "tiny", "zoology"))
  config = common.base_config()
  config.name = f"mqar:{model}" + (f",{size}" if size else "")
  seq_len = ml_collections.FieldReference(128)
  config.data = ml_collections.ConfigDict(dict(
      task="mqar", vocab_size=512, seq_len=seq_len, num_kv_pairs=16, num_train=20_000,
      num_test=1_000, seed=0, power_a=0.01, random_non_queries=True))
  config.model.update(dict(
      name=model, d_model=64, num_layers=2, dropout=0.0, norm="layer", prenorm=True,
      ffn="none" if model in ("mamba", "mamba2") else "mlp", ffn_mult=2, pooling="none",
      bidirectional=False, tie_embeddings=False))
  config.optim.update(dict(lr=3e-3, ssm_lr=1e-3, weight_decay=0.1, warmup_steps=150,
                           schedule="cosine", grad_clip=1.0))
  config.train.update(dict(num_steps=3_000, batch_size=64, eval_batch_size=250,
                           eval_every=500, checkpoint_every=500, log_every=50))
  mixer = dict(MIXERS[model])
  if size == "zoology":
    seq_len.set(256)
    config.data.update(dict(vocab_size=8192, num_kv_pairs=16, num_train=100_000,
                            num_test=3_000))
    config.train.update(dict(num_steps=6_250, batch_size=256, eval_batch_size=500))
    config.optim.warmup_steps = 300
  if size == "tiny":
    seq_len.set(32)
    config.data.update(dict(vocab_size=32, num_kv_pairs=4, num_train=64, num_test=32))
    config.model.update(dict(d_model=16, num_layers=1))
    config.train.update(dict(num_steps=6, batch_size=8, eval_batch_size=16, eval_every=3,
                             checkpoint_every=3, log_every=1))
    config.optim.warmup_steps = 1
    if "d_state" in mixer and model != "mamba2":
      mixer["d_state"] = min(mixer["d_state"], 8)
  common.set_mixer(config, model, mixer, seq_len)
  return common.lock(config)
