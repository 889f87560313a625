"""Float64 NumPy references for LTIMixer-based layers (shared by the LTI layer tests)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy.special import erf


def direct_causal_conv(x_blh, k_hl):
  """y[b, t, h] = sum_{s <= t} k[h, s] x[b, t - s, h], float64 loops over taps."""
  x = np.asarray(x_blh, np.float64)
  k = np.asarray(k_hl, np.float64)
  seq_len = x.shape[1]
  y = np.zeros_like(x)
  for s in range(min(k.shape[1], seq_len)):
    y[:, s:] += k[:, s] * x[:, : seq_len - s]
  return y


_ACTS = {
    "gelu": lambda v: 0.5 * v * (1 + erf(v / np.sqrt(2))),
    "silu": lambda v: v / (1 + np.exp(-v)),
    "relu": lambda v: np.maximum(v, 0),
    "tanh": np.tanh,
    "identity": lambda v: v,
}


def reference_mixer(mixer, x_blh):
  """The LTIMixer output written out directly (deterministic, float64).

  Causal: y_c = K_c * x.  Bidirectional: y_c = K_c * x + flip(K_{c+C} * flip(x)),
  each direction computed on its own. Then act(y + D x), projection, GLU.
  """
  x = np.asarray(x_blh, np.float64)
  c = mixer.channels
  k_chl = np.asarray(mixer.kernel(x.shape[1]), np.float64)
  ys = []
  for i in range(c):
    y = direct_causal_conv(x, k_chl[i])
    if mixer.bidirectional:
      y = y + direct_causal_conv(x[:, ::-1], k_chl[c + i])[:, ::-1]
    ys.append(y)
  y_blch = np.stack(ys, axis=2) + np.asarray(mixer.D[...], np.float64) * x[:, :, None]
  y_blch = _ACTS[mixer.activation](y_blch)
  y = y_blch.reshape(*x.shape[:2], -1)
  if mixer.postact == "none":
    return y
  y = y @ np.asarray(mixer.out_proj.kernel[...], np.float64) + np.asarray(
      mixer.out_proj.bias[...], np.float64)
  if mixer.postact == "glu":
    a, g = np.split(y, 2, axis=-1)
    y = a / (1 + np.exp(-g))
  return y


def direct_conv(x, k):
  """Causal convolution as a sum of shifted copies: x (b, l, h), k (c, h, l) -> (b, l, c, h)."""
  l = x.shape[1]
  shifted = lambda s: jnp.pad(x, ((0, 0), (s, 0), (0, 0)))[:, :l, None, :]
  return sum(k[None, None, :, :, s] * shifted(s) for s in range(l))


def bidirectional_and_reference(mixer, x):
  """A bidirectional LTIMixer's output and the same layer from its two directions computed
  apart (the first half of the kernel's channels forward, the second on the reversed
  sequence), under one jit."""
  graphdef, state = nnx.split(mixer)
  c = mixer.channels

  @jax.jit
  def run(state, x):
    m = nnx.merge(graphdef, state)
    k = m.kernel(x.shape[1])
    conv = direct_conv(x, k[:c]) + direct_conv(x[:, ::-1], k[c:])[:, ::-1]
    return m(x), m._tail(conv, x, True)

  return run(state, x)
