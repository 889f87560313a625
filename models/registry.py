"""Registry of sequence mixers: `build_mixer(kind, d_model, rngs=..., **options)`.

Each kind has a `MixerSpec`: its factory `f(d_model, *, rngs, **options) -> Mixer` (the
mixer class itself, or `ssm.lti_mixer.lti_factory` for the LTI layers; the options and
their defaults are read off its signature, so they are written once) named by
"module:attribute" and imported on first use, so that importing `models` stays cheap and
a mixer whose module fails to import does not break the others; and what the rest of
the code needs to know about the kind:

    family          "lti" (S4-like convolution layers, SSM learning rate in the configs),
                    "selective" (Mamba-1/2), "linear_attention" (linear, lightning) or
                    "attention"
    length_option   the option a config ties to data.seq_len: "l_max" for the layers built
                    for a maximum length, "max_len" for attention's KV cache, or None
    memory_caching  whether it takes the `memory_caching` option (the recurrent kinds)

Every mixer follows the contract of `ssm.mixer.Mixer`: (b, l, d_model) -> (b, l, d_model),
`init_state(batch_size, *, max_len=None)` and `step(state, x_t) -> (state, y_t)`.
"""

import dataclasses
import importlib
import inspect

from flax import nnx

from ssm._checks import positive_int

FAMILIES = ("lti", "selective", "linear_attention", "attention", "other")


@dataclasses.dataclass(frozen=True)
class MixerSpec:
  """What the registry knows about a mixer kind (module docstring)."""

  target: str
  family: str = "other"
  length_option: str | None = None
  memory_caching: bool = False

  def __post_init__(self):
    if ":" not in self.target:
      raise ValueError(f"mixer target must be 'module:factory', got {self.target!r}")
    if self.family not in FAMILIES:
      raise ValueError(f"mixer family must be one of {FAMILIES}, got {self.family!r}")
    if self.length_option not in (None, "l_max", "max_len"):
      raise ValueError(f"mixer length_option must be None, 'l_max' or 'max_len', got "
                       f"{self.length_option!r}")


MIXERS: dict[str, MixerSpec] = {
    "lssl": MixerSpec("ssm.lssl:make_mixer", "lti", "l_max"),
    "s4": MixerSpec("ssm.s4:make_mixer", "lti", "l_max"),
    "s4d": MixerSpec("ssm.s4d:make_mixer", "lti"),
    "sgconv": MixerSpec("ssm.sgconv:make_mixer", "lti", "l_max"),
    "mamba": MixerSpec("ssm.mamba:make_mixer", "selective", memory_caching=True),
    "mamba2": MixerSpec("ssm.mamba2:make_mixer", "selective", memory_caching=True),
    "linear_attention": MixerSpec("ssm.linear_attention:make_mixer", "linear_attention",
                                  memory_caching=True),
    "lightning": MixerSpec("ssm.lightning:make_mixer", "linear_attention", memory_caching=True),
    "attention": MixerSpec("models.attention:make_mixer", "attention", "max_len"),
}


def register_mixer(kind: str, target: str, **spec) -> None:
  """Add a mixer kind; target is "module:factory", spec the other `MixerSpec` fields."""
  MIXERS[kind] = MixerSpec(target, **spec)


def mixer_spec(kind: str) -> MixerSpec:
  if kind not in MIXERS:
    raise ValueError(f"unknown mixer kind {kind!r}; valid kinds: {sorted(MIXERS)}")
  return MIXERS[kind]


def kinds(*, family: str | None = None, memory_caching: bool | None = None) -> tuple[str, ...]:
  """The registered kinds (sorted), optionally of one family or by memory caching."""
  return tuple(sorted(k for k, s in MIXERS.items()
                      if (family is None or s.family == family)
                      and (memory_caching is None or s.memory_caching == memory_caching)))


def mixer_factory(kind: str):
  module_name, attr = mixer_spec(kind).target.split(":")
  return getattr(importlib.import_module(module_name), attr)


def mixer_options(kind: str) -> list[str]:
  """The keyword options a mixer kind accepts."""
  factory = mixer_factory(kind)
  # A factory may be the module class itself (one source of defaults): read its __init__.
  sig = inspect.signature(factory.__init__ if inspect.isclass(factory) else factory)
  return [p.name for p in sig.parameters.values()
          if p.kind == p.KEYWORD_ONLY and p.name != "rngs"]


def build_mixer(kind: str, d_model: int, *, rngs: nnx.Rngs, **options) -> nnx.Module:
  """Build a sequence mixer of the given kind (an `ssm.mixer.Mixer`).

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
