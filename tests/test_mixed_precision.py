"""Mixed precision (config.model.dtype / param_dtype), rematerialisation and model FLOPs.

bf16 is held to float32 on the same parameters: the logits of every mixer kind and every
head agree within bf16 rounding (about 2^-8 per product, a few 1e-3 relative over a
layer), and the recurrent step of a bf16 model equals its parallel form as closely. What
must stay float32 (parameters, SSM states, the optimizer state, logits) is checked to.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import models
from _testing import rel, write_word_corpus
from configs.lm import shakespeare
from data.task import TaskSpec
from models.registry import MIXERS
from train import flops, trainer

VOCAB, L = 24, 8
LM_TASK = TaskSpec(name="lm", kind="lm", input_kind="tokens", seq_len=L, num_classes=VOCAB,
                   vocab_size=VOCAB)
# Small shapes each kind takes (the SSD and lightning kernels' shapes are not needed on CPU).
MIXER_OPTIONS = {"mamba2": dict(headdim=16, d_state=8), "s4": dict(l_max=L),
                 "lssl": dict(l_max=L), "sgconv": dict(l_max=L), "attention": dict(max_len=L)}
BF16_TOL = 4e-2   # relative, bf16 against float32 over a one-layer model


def lm_config(kind, dtype="float32", **fields):
  cfg = dict(name=kind, d_model=32, num_layers=1, ffn="glu", pooling="none", dtype=dtype,
             mixer=MIXER_OPTIONS.get(kind, {}))
  return {**cfg, **fields}


@nnx.jit
def _logits(model, ids):
  return model({"inputs": ids}, deterministic=True)


def _step_logits(model, ids):
  """Logits of the recurrent mode over ids (b, l), one token at a time (one compiled step
  in a scan), and the final states."""
  return _steps(*nnx.split(model), ids)


@jax.jit
def _steps(graphdef, variables, ids):
  model = nnx.merge(graphdef, variables)
  state = model.init_state(ids.shape[0], max_len=ids.shape[1])
  state, logits = jax.lax.scan(model.step, state, ids.T)
  return jnp.swapaxes(logits, 0, 1), state


def _float_dtypes(tree) -> set:
  return {str(x.dtype) for x in jax.tree.leaves(tree)
          if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)}


@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_bf16_matches_float32_and_its_step_mode(kind):
  ids = jax.random.randint(jax.random.key(1), (2, L), 1, VOCAB)
  f32 = models.build_model(lm_config(kind), LM_TASK, rngs=nnx.Rngs(0))
  bf16 = models.build_model(lm_config(kind, "bfloat16"), LM_TASK, rngs=nnx.Rngs(0))
  p32, p16 = nnx.state(f32, nnx.Param), nnx.state(bf16, nnx.Param)
  assert _float_dtypes(p16) == {"float32"}
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p16)))
  want, got = _logits(f32, ids), _logits(bf16, ids)
  assert got.dtype == jnp.float32
  assert rel(got, want) < BF16_TOL, kind
  assert rel(got, want) > 1e-5, f"{kind}: bf16 computed nothing in bf16"
  steps, state = _step_logits(bf16, ids)
  assert _float_dtypes(state) <= {"float32", "complex64"}, kind
  assert rel(steps, got) < BF16_TOL, kind


@pytest.mark.parametrize("head", ["classification", "retrieval", "pixels", "lm_tied"])
def test_heads_in_bf16(head):
  rngs = lambda: nnx.Rngs(0)  # noqa: E731
  ids = jax.random.randint(jax.random.key(2), (2, L), 1, VOCAB)
  if head == "pixels":
    task = TaskSpec(name="img", kind="classification", input_kind="pixels", seq_len=L,
                    num_classes=5, in_channels=3)
    batch = {"inputs": jax.random.uniform(jax.random.key(3), (2, L, 3))}
  elif head == "retrieval":
    task = TaskSpec(name="ret", kind="retrieval", input_kind="tokens", seq_len=L, num_classes=2,
                    vocab_size=VOCAB)
    batch = {"inputs": jnp.stack([ids, ids[::-1]], axis=1)}
  elif head == "classification":
    task = TaskSpec(name="cls", kind="classification", input_kind="tokens", seq_len=L,
                    num_classes=5, vocab_size=VOCAB)
    batch = {"inputs": ids.at[1, 10:].set(0)}  # padding: mean pooling over real positions
  else:
    task, batch = LM_TASK, {"inputs": ids}
  fields = dict(pooling="mean", tie_embeddings=head == "lm_tied", retrieval_mlp_dim=16)
  if head == "lm_tied":
    fields["pooling"] = "none"
  out = {}
  for dtype in ("float32", "bfloat16"):
    model = models.build_model(lm_config("s4d", dtype, **fields), task, rngs=rngs())
    out[dtype] = nnx.jit(lambda m, b: m(b, deterministic=True))(model, batch)
  assert out["bfloat16"].dtype == jnp.float32
  assert rel(out["bfloat16"], out["float32"]) < BF16_TOL


def test_param_dtype_bfloat16_keeps_ssm_parameters_and_norms_float32():
  model = models.build_model(lm_config("mamba", "bfloat16", param_dtype="bfloat16"), LM_TASK,
                             rngs=nnx.Rngs(0))
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  by_name = {"/".join(map(str, path)): v.get_value().dtype for path, v in params}
  assert by_name["encoder/embedding"] == jnp.bfloat16
  assert by_name["backbone/blocks/0/mixer/in_proj/kernel"] == jnp.bfloat16
  for name in ("A_log", "D", "dt_proj/bias", "conv_w"):
    assert by_name[f"backbone/blocks/0/mixer/{name}"] == jnp.float32, name
  assert by_name["backbone/blocks/0/norm/scale"] == jnp.float32
  logits = _logits(model, jax.random.randint(jax.random.key(1), (2, L), 1, VOCAB))
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_remat_gives_the_same_gradients_with_dropout():
  ids = jax.random.randint(jax.random.key(4), (2, L), 1, VOCAB)
  batch = {"inputs": ids, "targets": jnp.roll(ids, -1, axis=1),
           "mask": jnp.ones((2, L), bool), "weights": jnp.ones((2,))}

  def grads(remat):
    model = models.build_model(lm_config("mamba2", remat=remat, dropout=0.2), LM_TASK,
                               rngs=nnx.Rngs(params=0, dropout=1))

    def loss(m):
      logits = m(batch, deterministic=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    return nnx.jit(nnx.grad(loss))(model)

  ref = jax.tree.leaves(grads("none"))
  for remat in ("block", "dots_with_no_batch_dims_saveable"):  # the two code paths
    for a, b in zip(jax.tree.leaves(grads(remat)), ref):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=remat)


@pytest.mark.parametrize("field,value,match", [
    ("dtype", "float16", r"model: dtype must be one of \('float32', 'bfloat16'\)"),
    ("param_dtype", "int8", r"model: param_dtype must be one of"),
    ("remat", "all", r"unknown model remat 'all'"),
    ("mixer", {"dtype": "bfloat16"}, r"set model.dtype, not model.mixer.dtype"),
])
def test_bad_precision_options_fail_in_one_line(field, value, match):
  with pytest.raises(ValueError, match=match) as err:
    models.build_model(lm_config("mamba", **{field: value}), LM_TASK, rngs=nnx.Rngs(0))
  assert "\n" not in str(err.value)


# -- training in bf16 -----------------------------------------------------------------------

def _lm_tiny(corpus_dir, workdir_name="run", **overrides):
  config = shakespeare.get_config("mamba2,tiny")
  config.data.path = str(corpus_dir)
  config.model.dtype = "bfloat16"
  config.train.update(dict(num_steps=8, eval_every=8, checkpoint_every=8, log_every=2))
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_word_corpus(tmp_path_factory.mktemp("corpus"), words_per_doc=40)


def test_bf16_training_decreases_the_loss_keeping_state_float32(corpus, tmp_path):
  from train import metrics as metrics_lib
  config = _lm_tiny(corpus, **{"optim.lr": 1e-2})
  trainer.run(config, str(tmp_path))
  train = [m for m in metrics_lib.read_metrics(str(tmp_path)) if m["split"] == "train"]
  assert all(math.isfinite(m["loss"]) for m in train)
  assert train[-1]["loss"] < train[0]["loss"]
  # Utilisation is reported from the second window on (the first holds compilation).
  assert "model_tflops_per_s" in train[-1] and "mfu" not in train[-1]  # a CPU has no peak
  t = trainer.Trainer(config, *_task_and_mesh(config))
  assert _float_dtypes(t.abstract_state.params) == {"float32"}
  assert _float_dtypes(t.abstract_state.opt_state) == {"float32"}


def _task_and_mesh(config):
  from data import registry
  from train import sharding
  task, _ = registry.load_task(config.data)
  return task, sharding.make_mesh(config.train.mesh)


def test_bf16_nan_stops_naming_the_step_and_keeps_last_good_checkpoint(corpus, tmp_path):
  # lr 1e30: step 1 is finite, its update blows the weights up, step 2 is not.
  config = _lm_tiny(corpus, **{"optim.lr": 1e30, "optim.warmup_steps": 0,
                               "train.checkpoint_every": 1, "train.num_steps": 4})
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r"at step 2 .*last good checkpoint \(step 1\)"):
    trainer.run(config, str(tmp_path))
  assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["1"]


# -- model FLOPs ----------------------------------------------------------------------------

def test_flops_per_token_is_six_n_plus_the_sequence_terms():
  seq = 64
  model = nnx.eval_shape(lambda: models.build_model(
      lm_config("attention", num_layers=3, mixer=dict(max_len=seq)),
      dataclasses.replace(LM_TASK, seq_len=seq), rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  n_all = sum(x.size for x in jax.tree.leaves(params))
  n = flops.matmul_params(params, tied=False)
  assert n == n_all - VOCAB * 32  # the embedding table is a lookup
  assert flops.matmul_params(params, tied=True) == n_all
  # attention: 4 L d per layer forward, times 3 for training
  assert flops.flops_per_token(model, params, seq) == 6 * n + 3 * 3 * 4 * seq * 32
  mamba = nnx.eval_shape(lambda: models.build_model(lm_config("mamba", num_layers=1), LM_TASK,
                                                    rngs=nnx.Rngs(0)))
  d_inner, n_state = 64, 16
  assert flops.sequence_flops(mamba, seq) == 2 * 4 * d_inner + 9 * d_inner * n_state


def test_peak_flops_by_device_kind():
  assert flops.peak_flops("NVIDIA H200", "bfloat16") == 989.4e12
  assert flops.peak_flops("NVIDIA H100 80GB HBM3", "float32") == 494.7e12
  assert flops.peak_flops("TPU v5 lite", "bfloat16") == 197e12
  assert flops.peak_flops("cpu", "bfloat16") is None
  assert flops.mfu(1e6, 5e8, dtype="bfloat16", devices=jax.devices()) is None  # CPU


def test_gpt2_small_recipes_build_in_bf16_at_their_documented_sizes():
  """configs/lm/imdb.py: each recipe builds (abstractly) with the docstring's parameter
  count, in bf16, with segment ids exactly for the mixers that take them."""
  from configs.lm import imdb
  task = dataclasses.replace(LM_TASK, seq_len=imdb.SEQ_LEN, num_classes=258, vocab_size=258)
  sizes = {"mamba": 90.7e6, "mamba2": 90.6e6, "lightning": 78.1e6, "transformer": 85.2e6}
  for name in imdb.MODELS:
    config = imdb.get_config(name)
    assert config.model.dtype == "bfloat16" and config.data.path == "imdb"
    assert config.data.segment_ids == MIXERS[name if name != "transformer" else "attention"
                                             ].target.startswith(("ssm.mamba2", "ssm.lightning"))
    model = nnx.eval_shape(lambda: models.build_model(config.model, task, rngs=nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert abs(count - sizes[name]) < 0.1e6, (name, count)
