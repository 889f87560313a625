"""Registry of sequence mixers: `build_mixer(kind, d_model, rngs=..., **options)`.

Each entry names a factory `f(d_model, *, rngs, **options) -> nnx.Module` (or the module
class itself, whose __init__ then gives the options) by
"module:attribute", imported on first use so that importing `models` stays cheap
and a mixer whose module fails to import does not break the others.

A mixer maps (b, l, d_model) -> (b, l, d_model); causal ones also have
`init_state(batch_size)` and `step(state, x_t) -> (state, y_t)`.
"""

import importlib
import inspect

from flax import nnx

from ssm._checks import positive_int

MIXERS: dict[str, str] = {
    "lssl": "ssm.lssl:make_mixer",
    "s4": "ssm.s4:make_mixer",
    "s4d": "ssm.s4d:make_mixer",
    "sgconv": "ssm.sgconv:make_mixer",
    "mamba": "ssm.mamba:make_mixer",
    "mamba2": "ssm.mamba2:make_mixer",
    "linear_attention": "ssm.linear_attention:make_mixer",
    "lightning": "ssm.lightning:make_mixer",
    "attention": "models.attention:make_mixer",
}


def register_mixer(kind: str, target: str) -> None:
  """Add a mixer kind; target is "module:factory"."""
  MIXERS[kind] = target


def mixer_factory(kind: str):
  if kind not in MIXERS:
    raise ValueError(f"unknown mixer kind {kind!r}; valid kinds: {sorted(MIXERS)}")
  module_name, attr = MIXERS[kind].split(":")
  return getattr(importlib.import_module(module_name), attr)


def mixer_options(kind: str) -> list[str]:
  """The keyword options a mixer kind accepts."""
  factory = mixer_factory(kind)
  # A factory may be the module class itself (one source of defaults): read its __init__.
  sig = inspect.signature(factory.__init__ if inspect.isclass(factory) else factory)
  return [p.name for p in sig.parameters.values()
          if p.kind == p.KEYWORD_ONLY and p.name != "rngs"]


def build_mixer(kind: str, d_model: int, *, rngs: nnx.Rngs, **options) -> nnx.Module:
  """Build a sequence mixer of the given kind.

  Raises ValueError for an unknown kind or an option the kind does not accept,
  listing the valid ones.
  """
  factory = mixer_factory(kind)
  valid = mixer_options(kind)
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise ValueError(f"mixer {kind!r} got unknown options {unknown}; valid options: {valid}")
  positive_int("build_mixer", "d_model", d_model)
  return factory(d_model, rngs=rngs, **options)
