"""The sequence mixer shared by the time-invariant layers (LSSL, S4, S4D, SGConv).

Each of those layers is a *kernel module*: an NNX module that owns the SSM's
parameters and produces a convolution kernel and, for the causal recurrent mode,
a state and a step. `LTIMixer` wraps any kernel module into the layer the papers
use:

    y = act(K * x + D x)          K * x by FFT: all channels (and both directions) from
                                  one transform of x (`fft_conv_bank_xla`), or per channel
                                  by the Pallas kernel of `ssm.ops.fft_conv` (impl="pallas";
                                  "auto" keeps the bank: see `lti_conv`)
    y = dropout(y)
    out = output projection(y)    "glu": Linear(c*h -> 2h) then GLU, "linear": Linear(c*h -> h)

Kernel module protocol (duck-typed):

    kernel.d_model, kernel.channels           h and c
    kernel(seq_len) -> K                      (c, h, seq_len) float32
    kernel.init_state(batch_size) -> state    any pytree
    kernel.step(state, u_t) -> (state, y_t)   u_t (b, h), y_t (b, c, h); no D term

Bidirectional mode (non-causal use, e.g. LRA classification): the kernel module is
built with 2c channels; the first c run forward in time, the last c run on the
time-reversed sequence, and the two outputs are added (S4's `bidirectional=True`).
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ssm._checks import check_float, positive_int
from ssm.ops import fft_conv
from ssm.ops.fft_conv import fft_conv_bank_xla, two_sided_kernel
from ssm.ops._impl import IMPLS

ACTIVATIONS = ("gelu", "silu", "relu", "tanh", "identity")
POSTACTS = ("glu", "linear", "none")


def check_mixer_options(activation: str, postact: str, impl: str, d_model=1) -> None:
  """ValueError listing the valid choices (and for a d_model that is not a positive int);
  factories call it before building parameters."""
  positive_int("LTI mixer", "d_model", d_model)
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
  if postact not in POSTACTS:
    raise ValueError(f"postact must be one of {POSTACTS}, got {postact!r}")
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _activation(name: str):
  return {
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),
      "silu": jax.nn.silu,
      "relu": jax.nn.relu,
      "tanh": jnp.tanh,
      "identity": lambda x: x,
  }[name]


def lti_conv(x, kernel_chl, *, bidirectional: bool, impl: str = "auto"):
  """Channel-wise causal (or bidirectional) convolution of x with a kernel stack.

  Args:
    x: (b, l, h).
    kernel_chl: (c, h, l) for causal; (2c, h, l) for bidirectional, the last c
      applied to the time-reversed sequence.
    impl: "auto"/"xla": every channel and both directions from one FFT of x and one
      inverse (`fft_conv_bank_xla`); "pallas": one `fft_conv` kernel call per channel,
      both directions as one circular convolution with the two-sided kernel.
      "auto" stays on the bank even on Hopper, where `fft_conv` alone takes the kernel at
      FFT sizes 2048-4096: end to end the kernel made a ListOps S4 training step no faster
      and added compilation time (results/README.md).

  Returns:
    (b, l, c, h).
  """
  c = kernel_chl.shape[0] // 2 if bidirectional else kernel_chl.shape[0]
  if impl not in IMPLS:
    raise ValueError(f"lti_conv: impl must be one of {IMPLS}, got {impl!r}")
  if impl != "pallas":
    return fft_conv_bank_xla(x, kernel_chl[:c], kernel_chl[c:] if bidirectional else None)
  if not bidirectional:
    return jnp.stack([fft_conv(x, k, impl="pallas") for k in kernel_chl], axis=2)
  # Both directions in one kernel call: a circular convolution of x zero-padded to n with
  # the two-sided kernel (the kernel's circular mode needs a power-of-two n).
  l, lk = x.shape[1], kernel_chl.shape[-1]
  n = max(256, 1 << (l + lk - 2).bit_length())
  x_pad = jnp.pad(x, ((0, 0), (0, n - l), (0, 0)))
  kern = two_sided_kernel(kernel_chl[:c], kernel_chl[c:], n)               # (c, h, n)
  return jnp.stack([fft_conv(x_pad, kern[i], impl="pallas", circular=True)[:, :l]
                    for i in range(c)], axis=2)


class LTIMixer(nnx.Module):
  """A linear time-invariant SSM layer around a kernel module.

  Args:
    kernel: a kernel module (see the module docstring). For bidirectional=True it
      must have an even number of channels (forward half, backward half).
    bidirectional: add a second kernel run on the reversed sequence (not causal;
      no step mode).
    activation: applied after the convolution and D term.
    postact: output projection, "glu" (default, as S4/S4D), "linear" or "none"
      ("none" requires a single causal channel: the output is act(y) itself).
    dropout: rate after the activation.
    impl: "auto", "xla" or "pallas" for the convolution (`lti_conv`).
  """

  def __init__(self, kernel: nnx.Module, *, bidirectional: bool = False,
               activation: str = "gelu", postact: str = "glu", dropout: float = 0.0,
               impl: str = "auto", rngs: nnx.Rngs):
    check_mixer_options(activation, postact, impl)
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    who = f"{type(kernel).__name__} mixer"
    h = positive_int(who, "d_model", kernel.d_model)
    c_total = positive_int(who, "kernel channels", kernel.channels)
    if bidirectional and c_total % 2:
      raise ValueError(f"bidirectional needs an even number of kernel channels, got {c_total}")
    c = c_total // 2 if bidirectional else c_total
    if postact == "none" and c != 1:
      raise ValueError("postact='none' needs one channel per direction")
    self.kernel = kernel
    self.d_model, self.channels = h, c
    self.bidirectional = bidirectional
    self.activation, self.postact, self.impl = activation, postact, impl
    self.D = nnx.Param(jax.random.normal(rngs.params(), (c, h), jnp.float32))
    if postact == "glu":
      self.out_proj = nnx.Linear(c * h, 2 * h, rngs=rngs)
    elif postact == "linear":
      self.out_proj = nnx.Linear(c * h, h, rngs=rngs)
    else:
      self.out_proj = None
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  # -- shared tail -----------------------------------------------------------
  def _tail(self, y_clh_last, x, deterministic=None):
    """y (..., c, h) conv output, x (..., h) input -> (..., h) layer output."""
    y = y_clh_last + self.D[...] * x[..., None, :].astype(jnp.float32)
    y = _activation(self.activation)(y)
    y = y.reshape(*y.shape[:-2], self.channels * self.d_model)
    y = self.dropout(y, deterministic=deterministic)
    if self.postact == "glu":
      y = jax.nn.glu(self.out_proj(y), axis=-1)
    elif self.postact == "linear":
      y = self.out_proj(y)
    return y.astype(x.dtype)

  def _check_x(self, x, ndim, what):
    check_float(f"{type(self.kernel).__name__} mixer", **{what: x})
    if x.ndim != ndim or x.shape[-1] != self.d_model:
      raise ValueError(f"{type(self.kernel).__name__} mixer: {what} must have "
                       f"{ndim} dims ending in d_model={self.d_model}, got {x.shape}")

  # -- parallel (convolution) mode --------------------------------------------
  def __call__(self, x: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
    """x (b, l, h) -> (b, l, h)."""
    self._check_x(x, 3, "x")
    k = self.kernel(x.shape[1])
    y = lti_conv(x.astype(jnp.float32), k, bidirectional=self.bidirectional, impl=self.impl)
    return self._tail(y, x, deterministic)

  # -- recurrent mode ----------------------------------------------------------
  def init_state(self, batch_size: int) -> Any:
    if self.bidirectional:
      raise ValueError("a bidirectional mixer has no recurrent step (it is not causal)")
    return self.kernel.init_state(
        positive_int(f"{type(self.kernel).__name__} mixer", "batch_size", batch_size))

  def step(self, state: Any, x_t: jax.Array) -> tuple[Any, jax.Array]:
    """One token: x_t (b, h) -> (state, y_t (b, h)). Dropout is off in step mode."""
    if self.bidirectional:
      raise ValueError("a bidirectional mixer has no recurrent step (it is not causal)")
    self._check_x(x_t, 2, "x_t")
    state, y = self.kernel.step(state, x_t.astype(jnp.float32))
    return state, self._tail(y, x_t, deterministic=True)
