"""Sequence models composed from ssm/ layers."""

from models.model import build_model
from models.registry import MIXERS, MixerSpec, build_mixer, kinds, mixer_options, register_mixer

__all__ = ["MIXERS", "MixerSpec", "build_mixer", "build_model", "kinds", "mixer_options",
           "register_mixer"]
