"""One conformance suite over every registered mixer kind and every memory-caching variant:
the contract of `ssm.mixer.Mixer` (parallel == step, bad state refused, bad shape refused,
builds with defaults). Tiny shapes, one mixer per case built once, one compilation per case
(the parallel form and the step scan under one jit).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models.blocks import ResidualBlock
from ssm.memory_caching import VARIANTS
from ssm.mixer import Mixer
from _testing import parallel_and_steps, perturbed

B, L, D = 2, 7, 16
# Tiny settings for whichever of these options a kind takes.
TINY = dict(l_max=L, max_len=L, num_heads=2, headdim=8, d_state=4, chunk_size=4, kernel_dim=4)
KINDS = models.kinds()
CACHED = models.kinds(memory_caching=True)

# (kind, memory-caching variant or None): every kind plain, every recurrent kind with every
# variant (segments of 3 tokens: the sequence spans three, the last one partial).
CASES = [(kind, None) for kind in KINDS] + [(kind, v) for kind in CACHED for v in VARIANTS]


def _options(kind, variant):
  accepted = models.mixer_options(kind)
  opts = {k: v for k, v in TINY.items() if k in accepted}
  if variant is not None:
    opts["memory_caching"] = dict(segment_size=3, variant=variant,
                                  top_k=1 if variant == "sparse" else None)
  return opts


@functools.cache
def _mixer(kind, variant):
  """The case's mixer, its parameters moved off their init (built once per session)."""
  m = models.build_mixer(kind, D, rngs=nnx.Rngs(0), **_options(kind, variant))
  return perturbed(m, 1, scale=0.1)


def _ids(cases):
  return [f"{k}-{v}" if v else k for k, v in cases]


def _x(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_the_registry_knows_every_kind():
  """Given the registry, every kind names its family and the recurrent kinds take memory
  caching; the kinds a config ties to the sequence length say which option."""
  assert set(KINDS) == set(models.MIXERS)
  assert set(models.kinds(family="lti")) == {"lssl", "s4", "s4d", "sgconv"}
  assert set(CACHED) == {"mamba", "mamba2", "linear_attention", "lightning"}
  for kind in KINDS:
    spec = models.MIXERS[kind]
    assert (spec.length_option is not None) == (spec.length_option in models.mixer_options(kind))
    assert spec.memory_caching == ("memory_caching" in models.mixer_options(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_builds_with_defaults(kind):
  """When a kind is built with no options at all, then it is a Mixer that maps
  (b, l, d_model) to itself."""
  mixer = models.build_mixer(kind, 64, rngs=nnx.Rngs(0))
  assert isinstance(mixer, Mixer) and mixer.causal
  out = jax.eval_shape(lambda x: mixer(x), jax.ShapeDtypeStruct((1, 8, 64), jnp.float32))
  assert out.shape == (1, 8, 64) and out.dtype == jnp.float32


@pytest.mark.parametrize("kind,variant", CASES, ids=_ids(CASES))
def test_parallel_equals_step(kind, variant):
  """Given random parameters and inputs, the parallel form equals init_state + step token by
  token (max_len sizing the step state's buffers)."""
  y, y_steps = parallel_and_steps(_mixer(kind, variant), _x((B, L, D)), max_len=True)
  assert y.shape == y_steps.shape == (B, L, D)
  scale = float(jnp.abs(y).max())
  assert scale > 0
  np.testing.assert_allclose(y_steps, y, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("kind,variant", CASES, ids=_ids(CASES))
def test_bad_state_is_refused(kind, variant):
  """A state for another batch size, or not from init_state at all, is refused naming
  init_state."""
  mixer = _mixer(kind, variant)
  state = mixer.init_state(B + 1)
  with pytest.raises(ValueError, match=r"step state must come from init_state\(2\)"):
    mixer.step(state, _x((B, D)))
  with pytest.raises(ValueError, match="step state must come from init_state"):
    mixer.step((state, state), _x((B + 1, D)))


@pytest.mark.parametrize("kind", KINDS)
def test_bad_shapes_and_arguments_are_refused(kind):
  """Inputs of the wrong rank, width or dtype, bad batch sizes and segment_ids a mixer
  cannot take fail at the boundary with one clear line."""
  mixer = _mixer(kind, None)
  with pytest.raises(ValueError, match=f"x must have 3 dims ending in d_model={D}"):
    mixer(_x((B, L, D + 1)))
  with pytest.raises(ValueError, match="x must have 3 dims"):
    mixer(_x((B, D)))
  with pytest.raises(ValueError, match="empty sequence"):
    mixer(_x((B, 0, D)))
  with pytest.raises(TypeError, match="x must be a real floating-point array"):
    mixer(jnp.ones((B, L, D), jnp.int32))
  with pytest.raises(ValueError, match="x_t must have 2 dims"):
    mixer.step(mixer.init_state(B), _x((B, 1, D)))
  with pytest.raises(ValueError, match="batch_size"):
    mixer.init_state(0)
  with pytest.raises(ValueError, match="max_len"):
    mixer.init_state(B, max_len=0)
  if not mixer.takes_segments:
    with pytest.raises(ValueError, match="does not take segment_ids"):
      mixer(_x((B, L, D)), segment_ids=jnp.zeros((B, L), jnp.int32))


@pytest.mark.parametrize("kind", CACHED)
def test_memory_caching_refuses_segment_ids(kind):
  """A mixer that restarts its state at segment ids cannot with memory caching."""
  mixer = _mixer(kind, "gated")
  match = ("not supported with memory_caching" if mixer.takes_segments
           else "does not take segment_ids")
  with pytest.raises(ValueError, match=match):
    mixer(_x((B, L, D)), segment_ids=jnp.zeros((B, L), jnp.int32))


def test_blocks_take_only_mixers():
  with pytest.raises(TypeError, match="must be an ssm.mixer.Mixer"):
    ResidualBlock(nnx.Linear(D, D, rngs=nnx.Rngs(0)), D, rngs=nnx.Rngs(0))
