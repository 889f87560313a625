"""Checks at the public boundary of the ops and mixers: input dtypes and size arguments.

Without them an int or bool input flows through silently (an int32 output of an SSM, an
FFT convolution of ints off by up to one), a complex input loses its imaginary part, and
`init_state(-1)` or `d_model=True` fail deep inside JAX, or not at all. Every message
names the op (or module) and the argument.

    check_float("fft_conv", u=u, k=k)                   # real floating point only
    check_float("linear_scan", complex_ok=True, a=a)    # real or complex
    d_model = positive_int("Mamba", "d_model", d_model) # an int >= 1, never a bool
    check_integer("ssd", segment_ids=segment_ids)       # integer ids, not floats or bools
    check_nonpositive("ssd", "A", A)                     # a decay's log, when concrete
    dtype = dtype_option("Mamba", "dtype", "bfloat16")  # a precision option -> jnp dtype
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np


def check_float(who: str, *, complex_ok: bool = False, **arrays) -> None:
  """TypeError unless every given array (None skipped) has a floating dtype
  (or a complex one, with complex_ok)."""
  for name, x in arrays.items():
    if x is None:
      continue
    dtype = jnp.result_type(x)
    if jnp.issubdtype(dtype, jnp.floating) or (
        complex_ok and jnp.issubdtype(dtype, jnp.complexfloating)):
      continue
    want = "a real or complex floating-point" if complex_ok else "a real floating-point"
    hint = (" (it has no imaginary part to keep: pass its real and imaginary parts "
            "separately, or a real array)" if jnp.issubdtype(dtype, jnp.complexfloating)
            else "; cast it first, e.g. x.astype(jnp.float32)")
    raise TypeError(f"{who}: {name} must be {want} array, got dtype {dtype}{hint}")


def check_integer(who: str, **arrays) -> None:
  """TypeError unless every given array (None skipped) has an integer dtype (not bool):
  ids and positions, such as the segment ids of packed sequences."""
  for name, x in arrays.items():
    if x is not None and (not jnp.issubdtype(jnp.result_type(x), jnp.integer)
                          or jnp.result_type(x) == jnp.bool_):
      raise TypeError(f"{who}: {name} must be an integer array, got dtype {jnp.result_type(x)}")


def check_nonpositive(who: str, name: str, x) -> None:
  """ValueError if a concrete array x has a positive entry (a log-decay or decay rate must be
  <= 0); under jit the values are unknown and the caller is trusted."""
  if x is None:
    return
  try:
    positive = bool(np.any(np.asarray(x) > 0))
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return
  if positive:
    raise ValueError(f"{who}: {name} must be <= 0, got {x}")


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def positive_int(who: str, name: str, value) -> int:
  """value as an int, if it is an integer >= 1 (a bool is not); else ValueError."""
  if not _is_int(value) or value < 1:
    raise ValueError(f"{who}: {name} must be a positive int, got {value!r}")
  return int(value)


def nonnegative_int(who: str, name: str, value) -> int:
  """value as an int, if it is an integer >= 0 (a bool is not); else ValueError."""
  if not _is_int(value) or value < 0:
    raise ValueError(f"{who}: {name} must be a non-negative int, got {value!r}")
  return int(value)


def optional_positive_int(who: str, name: str, value) -> int | None:
  """None, or positive_int(value)."""
  return None if value is None else positive_int(who, name, value)


# The precisions a model may compute or keep parameters in (config.model.dtype / param_dtype).
DTYPES = ("float32", "bfloat16")


def dtype_option(who: str, name: str, value, *, none_ok: bool = False):
  """A precision option ("float32" | "bfloat16", or the dtype itself) -> a numpy dtype;
  None passes through when none_ok (the mixers' dtype=None: compute in the input's dtype)."""
  if value is None and none_ok:
    return None
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or dtype.name not in DTYPES:
    raise ValueError(f"{who}: {name} must be one of {DTYPES}"
                     f"{' or None' if none_ok else ''}, got {value!r}")
  return dtype
