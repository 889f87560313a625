"""State-space layers as pure functions over arrays, plus thin Flax NNX modules.

Axis legend used in names, einsum strings and docstrings across the package:

    b  batch            l  sequence length      h  features / channels (d_model)
    n  state size       c  kernel channels      g  groups of B/C (Mamba)
    k  key dim (Dk)     v  value dim (Dv)       s  segments (memory caching)

Sequences are channels-last: (batch, length, features). SSM parameters and
recurrent states are float32 (complex64 for diagonal complex SSMs). Every layer
module is a sequence mixer under the one contract of `ssm/mixer.py`.
"""
