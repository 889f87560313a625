"""The linear_attention and lightning mixers: parallel == step, against explicit
formulas, memory caching wired in, decay schedule, argument checks."""

import math

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from models import build_mixer, mixer_options
from ssm.lightning import alibi_slopes, lightning_log_decay
from _testing import run_parallel, run_steps

D, H, L = 16, 2, 13


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  """On a GPU float32 matmuls default to TF32; compare at full float32 precision."""
  with jax.default_matmul_precision("highest"):
    yield


def x_input(seed=0, b=2, l=L, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((b, l, D)), dtype)


def close(a, b, rtol=2e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


MODES = [
    ("linear_attention", dict(feature_map="elu1", normalize=True)),
    ("linear_attention", dict(feature_map="relu", normalize="rmsnorm")),
    ("linear_attention", dict(feature_map="identity", normalize=False)),
    ("linear_attention", dict(memory_caching=dict(segment_size=4))),
    ("linear_attention", dict(feature_map="relu", memory_caching=dict(
        segment_size=3, variant="sparse", top_k=2, state_init="restart"))),
    ("lightning", dict(layer_idx=1, num_layers=4)),
    ("lightning", dict(memory_caching=dict(segment_size=5, variant="residual",
                                           state_init="restart"))),
    ("lightning", dict(memory_caching=dict(segment_size=3, variant="soup"))),
]


@pytest.mark.parametrize("kind,opts", MODES)
def test_parallel_equals_step(kind, opts):
  """Given a random sequence (13 tokens, chunk 4: a ragged last chunk), running the
  mixer token by token gives the parallel output."""
  mixer = build_mixer(kind, D, rngs=nnx.Rngs(0), num_heads=H, chunk_size=4, **opts)
  x = x_input(1)
  y = run_parallel(mixer, x)
  assert y.shape == x.shape and y.dtype == x.dtype
  assert np.all(np.isfinite(np.asarray(y)))
  close(run_steps(mixer, x), y)


def heads(x):
  return np.asarray(x, np.float64).reshape(x.shape[:-1] + (H, D // H))


def test_linear_attention_matches_the_formula():
  """elu+1 features, denominator: o_t = sum_{s<=t} (phi(q_t).phi(k_s)) v_s /
  sum_{s<=t} phi(q_t).phi(k_s), then the output projection (float64 NumPy)."""
  mixer = build_mixer("linear_attention", D, rngs=nnx.Rngs(1), num_heads=H, chunk_size=4)
  x = x_input(2)
  w_qkv = np.asarray(mixer.qkv_proj.kernel[...], np.float64)
  w_out = np.asarray(mixer.out_proj.kernel[...], np.float64)
  q, k, v = np.split(np.asarray(x, np.float64) @ w_qkv, 3, axis=-1)
  phi = lambda z: np.where(z > 0, z + 1.0, np.exp(z))
  q, k, v = phi(heads(q)), phi(heads(k)), heads(v)
  scores = np.einsum("bthd,bshd->bhts", q, k) * np.tril(np.ones((L, L)))
  o = np.einsum("bhts,bshv->bthv", scores, v) / (scores.sum(-1).transpose(0, 2, 1)[..., None]
                                                 + 1e-6)
  close(run_parallel(mixer, x), o.reshape(2, L, D) @ w_out)


def test_lightning_matches_the_formula():
  """q, k = silu(W x), v, u = W x; o = decayed causal linear attention per head;
  out = W_o (SRMSNorm over the full width (o) * u), float64 NumPy."""
  mixer = build_mixer("lightning", D, rngs=nnx.Rngs(2), num_heads=H, layer_idx=1,
                      num_layers=4, chunk_size=4)
  x = x_input(3)
  w = np.asarray(mixer.qkvu_proj.kernel[...], np.float64)
  w_out = np.asarray(mixer.out_proj.kernel[...], np.float64)
  q, k, v, u = np.split(np.asarray(x, np.float64) @ w, 4, axis=-1)
  silu = lambda z: z / (1.0 + np.exp(-z))
  q, k, v = heads(silu(q)), heads(silu(k)), heads(v)
  lam = np.exp(np.asarray(lightning_log_decay(H, 1, 4)))
  t = np.arange(L)
  decay = np.where(t[:, None] >= t[None, :], lam[:, None, None] ** (t[:, None] - t[None, :]), 0)
  o = np.einsum("bthd,bshd,hts,bshv->bthv", q, k, decay, v).reshape(2, L, D)
  o = o / np.sqrt(np.mean(o ** 2, axis=-1, keepdims=True) + 1e-6)
  close(run_parallel(mixer, x), (o * u) @ w_out)


def test_lightning_decay_schedule():
  """ALiBi slopes 2^(-8h/H) (h = 1..H), ALiBi's rule for other H, and the layer factor
  1 - l/(L-1) + 1e-5 (single layer: 1 + 1e-5)."""
  assert np.allclose(alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
  assert np.allclose(alibi_slopes(6), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])
  s4 = np.asarray(alibi_slopes(4))
  assert np.allclose(lightning_log_decay(4, 0, 1), -s4 * (1 + 1e-5))
  assert np.allclose(lightning_log_decay(4, 1, 5), -s4 * (1 - 0.25 + 1e-5))
  assert np.allclose(lightning_log_decay(4, 4, 5), -s4 * 1e-5)
  assert math.isclose(lightning_log_decay(4)[0], -2 ** -2 * (1 + 1e-5))


@pytest.mark.parametrize("kind", ["linear_attention", "lightning"])
def test_one_segment_memory_caching_equals_base_mixer(kind):
  """Memory caching with one segment covering the sequence (gated: the online gate is
  1) is the base mixer; the extra gate projection is the only new parameter."""
  x = x_input(4)
  base = build_mixer(kind, D, rngs=nnx.Rngs(5), num_heads=H, chunk_size=4)
  cached = build_mixer(kind, D, rngs=nnx.Rngs(5), num_heads=H, chunk_size=4,
                       memory_caching=dict(segment_size=L))
  assert cached.memory.gate is not None
  cached_params = nnx.state(cached, nnx.Param)
  nnx.update(cached, nnx.state(base, nnx.Param))  # same projections
  assert jax.tree.structure(cached_params) != jax.tree.structure(nnx.state(base, nnx.Param))
  close(run_parallel(cached, x), run_parallel(base, x), rtol=1e-5)


def test_bfloat16_input_keeps_dtype():
  mixer = build_mixer("lightning", D, rngs=nnx.Rngs(0), num_heads=H, chunk_size=4)
  x = x_input(6, dtype=jnp.bfloat16)
  y = run_parallel(mixer, x)
  assert y.dtype == jnp.bfloat16
  close(y.astype(jnp.float32), run_parallel(mixer, x.astype(jnp.float32)), rtol=5e-2)


def test_registry_options():
  assert mixer_options("linear_attention") == [
      "num_heads", "feature_map", "normalize", "memory_caching", "chunk_size", "impl",
      "dtype", "param_dtype", "seq_mesh", "seq_axis"]
  assert mixer_options("lightning") == [
      "num_heads", "layer_idx", "num_layers", "memory_caching", "chunk_size", "impl",
      "dtype", "param_dtype", "seq_mesh", "seq_axis"]
  with pytest.raises(ValueError, match="unknown options"):
    build_mixer("lightning", D, rngs=nnx.Rngs(0), decay=0.5)


@pytest.mark.parametrize("kind,opts,match", [
    ("linear_attention", dict(num_heads=3), "num_heads"),
    ("linear_attention", dict(feature_map="softmax"), "feature_map"),
    ("linear_attention", dict(normalize="layer"), "normalize"),
    ("linear_attention", dict(feature_map="identity", normalize=True), "non-negative"),
    ("linear_attention", dict(chunk_size=0), "chunk_size"),
    ("linear_attention", dict(memory_caching=dict(segment_size=0)), "segment_size"),
    ("linear_attention", dict(memory_caching=dict(segment_size=4, variant="avg")), "variant"),
    ("lightning", dict(memory_caching=dict(segment_size=4, variant="sparse", top_k=9,
                                           max_segments=8)), "top_k"),
    ("lightning", dict(memory_caching=dict(segment_size=4, window=2)), "unknown keys"),
    ("lightning", dict(layer_idx=2, num_layers=2), "layer_idx"),
    ("lightning", dict(num_layers=0), "num_layers"),
])
def test_bad_options_fail_clearly(kind, opts, match):
  with pytest.raises(ValueError, match=match):
    build_mixer(kind, D, rngs=nnx.Rngs(0), **opts)


@pytest.mark.parametrize("kind,mc", [("linear_attention", None), ("lightning", 4)])
def test_bad_inputs_fail_clearly(kind, mc):
  opts = {} if mc is None else dict(memory_caching=dict(segment_size=mc))
  mixer = build_mixer(kind, D, rngs=nnx.Rngs(0), num_heads=H, **opts)
  with pytest.raises(ValueError, match="x must have 3 dims"):
    mixer(jnp.zeros((2, 5, D + 1)))
  with pytest.raises(ValueError, match="x_t must have 2 dims"):
    mixer.step(mixer.init_state(2), jnp.zeros((2, 1, D)))
  with pytest.raises(ValueError, match="step state"):
    mixer.step(mixer.init_state(3), jnp.zeros((2, D)))
