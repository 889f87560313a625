"""Whole models: every registered mixer with every head, padding, norms, block variants,
config errors, step mode == parallel, generation, tied embeddings."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

import models
from data.task import TaskSpec
from models.blocks import BatchNorm, LayerNorm, RMSNorm, ResidualBlock
from models.generate import generate
from models.heads import pool
from models.registry import MIXERS, MixerSpec, mixer_factory, mixer_options
from ssm.mixer import Mixer

B, L, D, V = 2, 8, 8, 11
C = V  # classes = vocabulary: heads share shapes, so fewer eager compilations
STANDIN = "causal_conv_standin"

TASKS = {
    "tokens": TaskSpec("toy", "classification", "tokens", L, C, vocab_size=V),
    "pixels": TaskSpec("toy_image", "classification", "pixels", L, C, in_channels=2),
    "retrieval": TaskSpec("toy_retrieval", "retrieval", "tokens", L, C, vocab_size=V),
    "lm": TaskSpec("toy_lm", "lm", "tokens", L, V, vocab_size=V),
}


# -- a causal stand-in mixer with a step mode, registered for these tests only -----------

class CausalConvMixer(Mixer):
  """y[t] = tanh(sum_j w[j] x[t - j] + bias): a depthwise causal conv of width 3, written
  to the Mixer contract with nothing but its own math (the base does the checks)."""

  name = "causal_conv_standin"

  def __init__(self, d_model, *, width, rngs):
    self.d_model = d_model
    self.w = nnx.Param(jax.random.normal(rngs.params(), (width, d_model)) / width)
    self.bias = nnx.Param(0.1 * jax.random.normal(rngs.params(), (d_model,)))

  def forward(self, x, *, mask, deterministic, segment_ids):
    l = x.shape[1]
    xp = jnp.pad(x, ((0, 0), (self.w.shape[0] - 1, 0), (0, 0)))
    y = sum(self.w[j] * xp[:, self.w.shape[0] - 1 - j:][:, :l] for j in range(self.w.shape[0]))
    return jnp.tanh(y + self.bias[...])

  def _init_state(self, batch_size, max_len):
    return jnp.zeros((batch_size, self.w.shape[0] - 1, self.w.shape[1]))  # past inputs

  def _step(self, state, x_t):
    window = jnp.concatenate([state, x_t[:, None]], axis=1)  # oldest first
    y = jnp.einsum("bjh,jh->bh", window, self.w[...][::-1])
    return window[:, 1:], jnp.tanh(y + self.bias[...])


def make_conv_mixer(d_model, *, rngs, width=3):
  return CausalConvMixer(d_model, width=width, rngs=rngs)


@pytest.fixture(autouse=True)
def standin_registered(monkeypatch):
  monkeypatch.setitem(MIXERS, STANDIN, MixerSpec(f"{__name__}:make_conv_mixer"))


def importable(kind):
  """Skip (with the reason) a mixer kind whose module does not import yet."""
  try:
    mixer_factory(kind)
  except Exception as e:  # noqa: BLE001 - any import failure is a reason to skip
    pytest.skip(f"mixer {kind!r} does not import: {type(e).__name__}: {e}")


# Tiny settings for whichever of these options a mixer kind accepts.
TINY_OPTIONS = dict(l_max=L, max_len=L, num_heads=2, headdim=4, head_dim=4, chunk_size=4,
                    d_state=4)


def build(name, task_key, *, mixer=None, num_layers=2, **cfg):
  mixer = dict(mixer or {})
  if name not in (STANDIN, "transformer"):
    accepted = mixer_options(name)
    mixer = {**{k: v for k, v in TINY_OPTIONS.items() if k in accepted}, **mixer}
  cfg = dict(name=name, d_model=D, num_layers=num_layers, mixer=mixer, **cfg)
  return models.build_model(cfg, TASKS[task_key], rngs=nnx.Rngs(0))


def make_batch(task_key, seed=0, lengths=(L, L - 3), seq_len=L):
  """A batch per the data contract; row i has lengths[i] real positions then padding."""
  rng = np.random.default_rng(seed)
  mask = np.arange(seq_len)[None] < np.asarray(lengths)[:, None]  # (b, l)
  if task_key == "pixels":
    inputs = rng.standard_normal((B, seq_len, 2)).astype(np.float32) * mask[..., None]
    return dict(inputs=inputs, mask=mask, targets=np.zeros(B, np.int32), weights=np.ones(B))
  ids = rng.integers(1, V, (B, seq_len)) * mask
  if task_key == "retrieval":  # B // 2 pairs: the backbone sees B sequences, as for the others
    pairs = ids.reshape(B // 2, 2, seq_len).astype(np.int32)
    return dict(inputs=pairs, mask=mask.reshape(B // 2, 2, seq_len),
                targets=np.zeros(B // 2, np.int32), weights=np.ones(B // 2))
  if task_key == "lm":
    return dict(inputs=ids.astype(np.int32), targets=ids.astype(np.int32), mask=mask,
                weights=np.ones(B))
  return dict(inputs=ids.astype(np.int32), mask=mask, targets=np.zeros(B, np.int32),
              weights=np.ones(B))


# -- every registered mixer, every head ----------------------------------------------------

@pytest.mark.parametrize("kind", sorted(MIXERS) + [STANDIN])
def test_every_registered_mixer_builds_a_model_for_each_head(kind):
  importable(kind)
  for task_key, shape in [("tokens", (B, C)), ("pixels", (B, C)), ("retrieval", (B // 2, C)),
                          ("lm", (B, L, V))]:
    model = build(kind, task_key)
    logits = model(make_batch(task_key), deterministic=False)
    assert logits.shape == shape, (kind, task_key)
    assert np.isfinite(logits).all(), (kind, task_key)


def test_transformer_is_the_attention_mixer():
  model = build("transformer", "tokens")
  assert type(model.backbone.blocks[0].mixer).__name__ == "Attention"


# -- padding ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,task_key,pooling,bidirectional", [
    ("attention", "tokens", "mean", True),
    ("attention", "pixels", "mean", True),
    (STANDIN, "tokens", "last", False),
])
def test_padding_does_not_change_logits(name, task_key, pooling, bidirectional):
  """Given a batch with padded rows, when the padded positions' values change and more
  padding is appended, then the logits (BatchNorm in training mode) stay the same."""
  model = build(name, task_key, pooling=pooling, bidirectional=bidirectional, norm="batch")
  batch = make_batch(task_key, seed=1)
  inputs, mask = batch["inputs"], batch["mask"]
  rng = np.random.default_rng(2)
  longer = (B, L + 4) + inputs.shape[2:]
  garbage = rng.standard_normal(longer) if task_key == "pixels" else rng.integers(1, V, longer)
  long_mask = np.pad(mask, ((0, 0), (0, 4)))
  widths = ((0, 0), (0, 4)) + ((0, 0),) * (inputs.ndim - 2)
  keep = long_mask.reshape(long_mask.shape + (1,) * (inputs.ndim - 2))
  other = dict(batch, inputs=np.where(keep, np.pad(inputs, widths), garbage).astype(inputs.dtype),
               mask=long_mask)
  a = model(batch, deterministic=False)
  b = model(other, deterministic=False)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_pooling_against_numpy():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 5, 4)).astype(np.float32)
  mask = np.array([[1, 1, 0, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0]], bool)
  mean = pool(jnp.asarray(x), jnp.asarray(mask), "mean")
  last = pool(jnp.asarray(x), jnp.asarray(mask), "last")
  for i in range(2):
    np.testing.assert_allclose(mean[i], x[i][mask[i]].mean(0), rtol=1e-6)
    np.testing.assert_allclose(last[i], x[i][np.nonzero(mask[i])[0][-1]])
  np.testing.assert_allclose(mean[2], 0.0)  # no real position: zero, not NaN
  np.testing.assert_allclose(pool(jnp.asarray(x), None, "first"), x[:, 0])
  with pytest.raises(ValueError, match="valid poolings"):
    pool(jnp.asarray(x), None, "max")


# -- norms ------------------------------------------------------------------------------------

def test_masked_batchnorm_statistics_ignore_padding():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 6, 4)).astype(np.float32) * 3 + 1
  mask = rng.random((3, 6)) < 0.6
  x_pad = np.where(mask[..., None], x, 1e3)  # huge padding would dominate unmasked stats
  bn = BatchNorm(4, rngs=nnx.Rngs(0))
  y = bn(jnp.asarray(x_pad), mask=jnp.asarray(mask), deterministic=False)
  real = x[mask]  # (n, 4)
  mu, var = real.mean(0), real.var(0)
  np.testing.assert_allclose(np.asarray(y)[mask], (real - mu) / np.sqrt(var + 1e-5), rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(bn.mean[...], 0.1 * mu, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * var, rtol=1e-5)
  # Evaluation and step mode use the running statistics.
  y_eval = bn(jnp.asarray(x[:, 0]), deterministic=True)
  np.testing.assert_allclose(y_eval, (x[:, 0] - 0.1 * mu) / np.sqrt(0.9 + 0.1 * var + 1e-5),
                             rtol=1e-4, atol=1e-5)
  # An all-padding batch leaves no NaN behind.
  y0 = bn(jnp.asarray(x), mask=jnp.zeros((3, 6), bool), deterministic=False)
  assert np.isfinite(y0).all() and np.isfinite(bn.var[...]).all()


def test_layer_and_rms_norm_against_numpy():
  x = np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32)
  ln = LayerNorm(5, rngs=nnx.Rngs(0))(jnp.asarray(x))
  ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(ln, ref, rtol=1e-5, atol=1e-5)
  rms = RMSNorm(5, rngs=nnx.Rngs(0))(jnp.asarray(x))
  np.testing.assert_allclose(rms, x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6), rtol=1e-5)


# -- block variants ------------------------------------------------------------------------------

@pytest.mark.parametrize("prenorm", [True, False])
@pytest.mark.parametrize("ffn,norm", [("none", "layer"), ("mlp", "rms"), ("glu", "batch")])
def test_block_variants_build_and_run(prenorm, ffn, norm):
  model = build(STANDIN, "tokens", prenorm=prenorm, ffn=ffn, norm=norm, ffn_mult=3)
  assert (model.backbone.final_norm is not None) == prenorm
  assert (model.backbone.blocks[0].ffn is not None) == (ffn != "none")
  logits = model(make_batch("tokens"), deterministic=False)
  assert logits.shape == (B, C) and np.isfinite(logits).all()


@pytest.mark.parametrize("prenorm", [True, False])
def test_residual_block_formula(prenorm):
  rngs = nnx.Rngs(0)
  block = ResidualBlock(make_conv_mixer(D, rngs=rngs), D, prenorm=prenorm, ffn="mlp",
                        norm="layer", rngs=rngs)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((B, L, D)), jnp.float32)
  f, n1, n2, g = block.mixer, block.norm, block.ffn_norm, block.ffn
  if prenorm:
    h = x + f(n1(x))
    ref = h + g(n2(h))
  else:
    h = n1(x + f(x))
    ref = n2(h + g(h))
  np.testing.assert_allclose(block(x, deterministic=True), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu", "relu"])
@pytest.mark.parametrize("kind", ["mlp", "glu"])
def test_ffn_formula_per_activation(kind, activation):
  """fc2(act(fc1 x)) and fc2(act(gate x) * fc1 x), act written out from its definition."""
  import math  # noqa: PLC0415
  from models.blocks import FFN  # noqa: PLC0415
  acts = {
      "gelu": lambda z: 0.5 * z * (1 + np.vectorize(math.erf)(z / np.sqrt(2))),
      "gelu_tanh": lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3))),
      "silu": lambda z: z / (1 + np.exp(-z)),
      "relu": lambda z: np.maximum(z, 0),
  }
  ffn = FFN(D, kind=kind, mult=2, activation=activation, rngs=nnx.Rngs(0))
  x = np.random.default_rng(1).standard_normal((3, D))
  lin = lambda layer, z: z @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])  # noqa: E731
  hidden = acts[activation](lin(ffn.gate if kind == "glu" else ffn.fc1, x))
  if kind == "glu":
    hidden = hidden * lin(ffn.fc1, x)
  np.testing.assert_allclose(ffn(jnp.asarray(x, jnp.float32)), lin(ffn.fc2, hidden),
                             rtol=1e-4, atol=1e-5)


# -- config errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("override,match", [
    (dict(colour="red"), r"unknown model config keys \['colour'\]; valid keys: .*d_model"),
    (dict(name="lstm"), r"unknown model name 'lstm'; valid names: .*'transformer'"),
    (dict(norm="group"), r"unknown model norm 'group'; valid: \['layer', 'rms', 'batch'\]"),
    (dict(pooling="max"), r"unknown model pooling 'max'; valid: .*'mean'"),
    (dict(ffn="moe"), r"unknown model ffn 'moe'; valid: \['none', 'mlp', 'glu'\]"),
    (dict(ffn_activation="swish"), r"unknown model ffn_activation 'swish'; valid: \['gelu', "),
    (dict(d_model=0), "d_model must be a positive int"),
    (dict(dropout=1.5), "dropout"),
    (dict(prenorm="yes"), "prenorm must be a bool"),
    (dict(mixer=dict(heads=4)), r"unknown options \['heads'\]; valid options"),
    (dict(mixer=dict(bidirectional=True)), "model.bidirectional"),
])
def test_bad_config_fails_listing_valid_values(override, match):
  cfg = dict(name="attention", d_model=D, num_layers=1, mixer=dict(num_heads=2))
  cfg.update(override)
  with pytest.raises(ValueError, match=match):
    models.build_model(cfg, TASKS["tokens"], rngs=nnx.Rngs(0))


def test_bad_task_combinations_fail():
  with pytest.raises(ValueError, match="must be causal"):
    build("attention", "lm", bidirectional=True)
  with pytest.raises(ValueError, match="pooling 'none' for classification"):
    build("attention", "tokens", pooling="none")
  task = TaskSpec("toy_lm", "lm", "tokens", L, V + 1, vocab_size=V)
  with pytest.raises(ValueError, match="num_classes == vocab_size"):
    models.build_model(dict(name=STANDIN, d_model=D, num_layers=1, tie_embeddings=True), task,
                       rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown model name None"):
    models.build_model(dict(d_model=D), TASKS["tokens"], rngs=nnx.Rngs(0))


def test_bad_batches_fail_clearly():
  model = build(STANDIN, "tokens")
  with pytest.raises(ValueError, match=r"\(batch, length\) integer ids"):
    model(dict(inputs=np.zeros((B, L, 1), np.int32)), deterministic=True)
  with pytest.raises(ValueError, match="mask has shape"):
    model(dict(inputs=np.ones((B, L), np.int32), mask=np.ones((B, L + 1), bool)),
          deterministic=True)
  with pytest.raises(ValueError, match="no 'inputs'"):
    model(dict(mask=np.ones((B, L), bool)), deterministic=True)
  retrieval = build(STANDIN, "retrieval")
  with pytest.raises(ValueError, match=r"\(batch, 2, length"):
    retrieval(dict(inputs=np.ones((B, L), np.int32)), deterministic=True)
  bi = build("attention", "tokens", bidirectional=True)
  with pytest.raises(ValueError, match="not causal"):
    bi.backbone.init_state(B)


# -- retrieval --------------------------------------------------------------------------------

def test_retrieval_encodes_both_sequences_with_the_shared_backbone():
  model = build(STANDIN, "retrieval", norm="layer")
  batch = make_batch("retrieval")
  logits = model(batch, deterministic=True)
  pooled = []
  for j in range(2):
    x, m = model.features(batch["inputs"][:, j], batch["mask"][:, j], deterministic=True)
    pooled.append(pool(x, m, "mean"))
  u, v = pooled
  np.testing.assert_allclose(logits, model.head(u, v), rtol=1e-5, atol=1e-6)


# -- language model: step mode, generation, tied embeddings ---------------------------------

LM_CASES = [
    (STANDIN, dict(norm="batch", ffn="glu", prenorm=True)),
    ("attention", dict(norm="layer", ffn="mlp", prenorm=False)),
    ("s4d", dict(norm="rms", ffn="none", prenorm=True)),
]


@pytest.mark.parametrize("name,cfg", LM_CASES, ids=[c[0] for c in LM_CASES])
def test_lm_step_mode_matches_parallel(name, cfg):
  importable(name)
  model = build(name, "lm", **cfg)
  batch = make_batch("lm", seed=3, lengths=(L, L))
  model(batch, deterministic=False)  # move BatchNorm running stats off their init
  parallel = model(batch, deterministic=True)
  state = model.init_state(B, max_len=L)
  steps = []
  for t in range(L):
    state, logits_t = model.step(state, jnp.asarray(batch["inputs"][:, t]))
    steps.append(logits_t)
  np.testing.assert_allclose(np.stack(steps, 1), parallel, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("name", [STANDIN, "attention"])
def test_generate(name):
  model = build(name, "lm", norm="layer", num_layers=1)
  prompt = jnp.asarray(make_batch("lm", seed=4, lengths=(3, 3))["inputs"][:, :3])
  out = generate(model, prompt, 4, rng=jax.random.key(0), temperature=2.0)
  assert out.shape == (B, 7) and out.dtype == jnp.int32
  np.testing.assert_array_equal(out[:, :3], prompt)
  assert ((out >= 0) & (out < V)).all()
  np.testing.assert_array_equal(out, generate(model, prompt, 4, rng=jax.random.key(0),
                                              temperature=2.0))
  others = [generate(model, prompt, 4, rng=jax.random.key(s), temperature=2.0) for s in (1, 2)]
  assert any(not np.array_equal(out, o) for o in others)
  # Greedy decoding: every sampled token is the argmax of the parallel forward's logits
  # at the position before it (the model is causal, so one forward checks them all).
  greedy = generate(model, prompt, 4, rng=jax.random.key(0), temperature=0.0)
  logits = model(dict(inputs=greedy), deterministic=True)
  np.testing.assert_array_equal(greedy[:, 3:], jnp.argmax(logits[:, 2:-1], -1))


def test_generate_rejects_bad_arguments():
  model = build(STANDIN, "lm")
  with pytest.raises(ValueError, match="prompt must be"):
    generate(model, jnp.ones((B,), jnp.int32), 2, rng=jax.random.key(0))
  with pytest.raises(ValueError, match="num_tokens"):
    generate(model, jnp.ones((B, 2), jnp.int32), 0, rng=jax.random.key(0))
  with pytest.raises(ValueError, match="LanguageModel"):
    generate(build(STANDIN, "tokens"), jnp.ones((B, 2), jnp.int32), 2, rng=jax.random.key(0))


def test_tied_embeddings_share_the_parameter():
  model = build(STANDIN, "lm", tie_embeddings=True)
  assert model.head is None
  shapes = [p.shape for p in jax.tree.leaves(nnx.state(model, nnx.Param))]
  assert shapes.count((V, D)) == 1  # one table: the embedding is the output matrix
  batch = make_batch("lm")
  x, _ = model.features(batch["inputs"], None, deterministic=True)
  np.testing.assert_allclose(model(batch, deterministic=True),
                             x @ model.encoder.embedding[...].T, rtol=1e-5, atol=1e-6)
  untied = build(STANDIN, "lm")
  assert [p.shape for p in jax.tree.leaves(nnx.state(untied, nnx.Param))].count((V, D)) == 1
  assert untied.head is not None


# -- training-mode behaviour -------------------------------------------------------------------

def test_dropout_only_in_training():
  model = build(STANDIN, "tokens", dropout=0.5, norm="layer")
  batch = make_batch("tokens")
  a, b = model(batch, deterministic=True), model(batch, deterministic=True)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(model(batch, deterministic=False), a)


def test_jitted_train_step_updates_batch_stats_and_gives_gradients():
  """Given a BatchNorm model, when a jitted loss-and-grad step runs in training mode
  (the trainer's pattern), then gradients reach the embedding and running stats move."""
  model = build(STANDIN, "tokens", norm="batch", dropout=0.1)
  batch = {k: jnp.asarray(v) for k, v in make_batch("tokens").items()}

  @nnx.jit
  def train_step(model, batch):
    def loss_fn(model):
      logits = model(batch, deterministic=False)
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(B), batch["targets"]])
    return nnx.value_and_grad(loss_fn)(model)

  before = np.array(model.backbone.blocks[0].norm.mean[...])
  loss, grads = train_step(model, batch)
  assert np.isfinite(loss)
  assert np.abs(grads["encoder"]["embedding"][...]).sum() > 0
  assert not np.allclose(model.backbone.blocks[0].norm.mean[...], before)


@pytest.mark.parametrize("name", ["mamba2", "lightning"])
def test_lm_segment_ids_reach_the_recurrent_mixers(name):
  """An LM batch with segment_ids: one document everywhere gives the unpacked logits, a
  boundary changes the logits after it and not before; a mixer without packed-document
  support refuses them."""
  importable(name)
  model = build(name, "lm", norm="layer", mixer=dict(headdim=4) if name == "mamba2" else {})
  batch = make_batch("lm", seed=4, lengths=(L, L))
  plain = model(batch, deterministic=True)
  one = model(batch | {"segment_ids": np.zeros((B, L), np.int32)}, deterministic=True)
  np.testing.assert_allclose(one, plain, rtol=1e-5, atol=1e-5)
  ids = np.zeros((B, L), np.int32)
  ids[:, 5:] = 1
  packed = model(batch | {"segment_ids": ids}, deterministic=True)
  np.testing.assert_allclose(packed[:, :5], plain[:, :5], rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(packed[:, 5:]) - np.asarray(plain[:, 5:])).max() > 1e-4
  with pytest.raises(ValueError, match="does not take segment_ids"):
    build("attention", "lm", norm="layer")(batch | {"segment_ids": ids}, deterministic=True)
