"""SGConv: the Structured Global Convolution layer.

Li, Cai, Zhang, Chen, Dey 2022, "What Makes Convolutional Models Great on Long
Sequence Modeling?" (ctlllll/SGConv: gconv_standalone.py, mode "cat_randn").

The kernel is not an SSM but a sum of scales, each a small learned kernel stretched
to cover twice the span of the previous one and damped geometrically:

    S = 1 + ceil(log2(l_max / d))                      scales (at least 1)
    k_i ~ N(0, 1), shape (c, h, d)                     i = 0..S-1
    piece_i = upsample(alpha^i k_i, 2^max(i-1, 0))     lengths d, d, 2d, 4d, ...
    K = concat(piece_0, ..., piece_{S-1})[..., :l_max] / norm

`upsample` is linear interpolation with half-pixel centres (PyTorch's
F.interpolate(mode="linear", align_corners=False), which the reference uses).
`norm` is each (channel, feature) kernel's L2 norm at initialisation, computed once
when the module is built and stored as a non-trainable `KernelNorm` variable; every
later kernel is divided by it (the reference stores it on its first forward pass).
So the initial kernel has unit norm and the scale weights only matter relatively:
the reference's weights decay^(S-1-i) equal alpha^i up to that cancelled factor.

The kernel length is fixed at construction (l_max): a longer sequence is an error,
a shorter one uses the kernel's first L taps.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssm.lti_mixer import lti_factory
from ssm.params import SSMParam


class KernelNorm(nnx.Variable):
  """A fixed normaliser (not trained, not in nnx.Param)."""


def num_scales(l_max: int, kernel_dim: int) -> int:
  """S = 1 + ceil(log2(l_max / d)), at least 1: the fewest scales whose total length
  d * 2^(S-1) reaches l_max (integer arithmetic, no float log)."""
  s = 1
  while kernel_dim * 2 ** (s - 1) < l_max:
    s += 1
  return s


def linear_upsample_weights(size: int, factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Gather indices and weights of linear upsampling by an integer factor.

  Output j samples the input at x = (j + 1/2) / factor - 1/2 (half-pixel centres,
  clamped to [0, size-1]): out[j] = (1 - w[j]) in[i0[j]] + w[j] in[i1[j]].

  Returns:
    i0, i1: (size * factor,) int32; w: (size * factor,) float32.
  """
  x = (np.arange(size * factor) + 0.5) / factor - 0.5
  x = np.clip(x, 0, size - 1)
  i0 = np.floor(x).astype(np.int32)
  i1 = np.minimum(i0 + 1, size - 1)
  return i0, i1, (x - i0).astype(np.float32)


def _upsample(k_chd, factor: int):
  if factor == 1:
    return k_chd
  i0, i1, w = linear_upsample_weights(k_chd.shape[-1], factor)
  w = jnp.asarray(w, k_chd.dtype)
  return k_chd[..., i0] * (1 - w) + k_chd[..., i1] * w


def sgconv_kernel(kernels_schd, seq_len: int, *, decay: float = 2.0):
  """The multi-scale kernel, before normalisation.

  Args:
    kernels_schd: (S, c, h, d) sub-kernels, one per scale.
    seq_len: length of the returned kernel, at most d * 2^(S-1).
    decay: scale i is weighted by (1/decay)^i.

  Returns:
    (c, h, seq_len).
  """
  n_scales, _, _, dim = kernels_schd.shape
  full = dim * 2 ** (n_scales - 1)
  if not 1 <= seq_len <= full:
    raise ValueError(f"SGConv: kernel length {seq_len} must be in [1, {full}] "
                     f"(kernel_dim {dim}, {n_scales} scales)")
  pieces, length = [], 0
  for i in range(n_scales):
    if length >= seq_len:  # later scales only add taps past seq_len
      break
    piece = _upsample(kernels_schd[i] * decay ** (-i), 2 ** max(i - 1, 0))
    pieces.append(piece)
    length += piece.shape[-1]
  return jnp.concatenate(pieces, axis=-1)[..., :seq_len]


def conv_window_step(window_blh, u_bh, kernel_chl):
  """Step of a causal convolution with a length-l kernel, from a window of past inputs.

  The window holds the last l inputs, oldest first; y_t = sum_s K[s] u[t - s].

  Args:
    window_blh: (b, l, h). u_bh: (b, h). kernel_chl: (c, h, l).

  Returns:
    window (b, l, h) with u_t appended, y (b, c, h).
  """
  window_blh = jnp.concatenate([window_blh[:, 1:], u_bh[:, None]], axis=1)
  y_bch = jnp.einsum("blh,chl->bch", window_blh, kernel_chl[..., ::-1])
  return window_blh, y_bch


class SGConvKernel(nnx.Module):
  """SGConv kernel module (the LTIMixer kernel protocol, see ssm/lti_mixer.py).

  Args:
    d_model: h.
    l_max: the kernel length; sequences may be at most this long (default 1024, as S4's).
    channels: c, kernels per feature.
    kernel_dim: d, the length of each scale's sub-kernel (64 in the paper).
    decay: scale i is weighted by alpha^i, alpha = 1/decay (2 in the paper).
  """

  def __init__(self, d_model: int, *, l_max: int = 1024, channels: int = 1, kernel_dim: int = 64,
               decay: float = 2.0, rngs: nnx.Rngs):
    for name, v in (("d_model", d_model), ("l_max", l_max), ("channels", channels),
                    ("kernel_dim", kernel_dim)):
      if not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"SGConv: {name} must be a positive int, got {v!r}")
    if not decay > 0:
      raise ValueError(f"SGConv: decay must be > 0, got {decay!r}")
    self.d_model, self.channels, self.l_max = int(d_model), int(channels), int(l_max)
    self.kernel_dim, self.decay = int(kernel_dim), float(decay)
    self.num_scales = num_scales(self.l_max, self.kernel_dim)
    shape = (self.num_scales, self.channels, self.d_model, self.kernel_dim)
    # Drawn flat and reshaped: XLA:CPU compiles a rank-1 draw several times faster.
    self.kernels = SSMParam(
        jax.random.normal(rngs.params(), (int(np.prod(shape)),), jnp.float32).reshape(shape))
    # One compiled call instead of a few dozen op-by-op dispatches at build time.
    k0 = jax.jit(sgconv_kernel, static_argnums=1, static_argnames="decay")(
        self.kernels[...], self.l_max, decay=self.decay)
    self.kernel_norm = KernelNorm(jnp.linalg.norm(k0, axis=-1, keepdims=True))  # (c, h, 1)

  def __call__(self, seq_len: int) -> jax.Array:
    """The normalised kernel (c, h, seq_len) float32, seq_len <= l_max."""
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
      raise ValueError(f"SGConv: seq_len must be a positive int, got {seq_len!r}")
    if seq_len > self.l_max:
      raise ValueError(f"SGConv: sequence length {seq_len} exceeds l_max={self.l_max} the "
                       "kernel was built for; build the layer with a larger l_max")
    k = sgconv_kernel(self.kernels[...], int(seq_len), decay=self.decay)
    return (k / self.kernel_norm[...]).astype(jnp.float32)

  def init_state(self, batch_size: int) -> jax.Array:
    """The window of the last l_max inputs, zeros (batch_size, l_max, h) float32."""
    return jnp.zeros((batch_size, self.l_max, self.d_model), jnp.float32)

  def step(self, state: Any, u_t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """u_t (b, h) -> (window (b, l_max, h), y_t (b, c, h)).

    A convolution has no small state: each token costs O(c h l_max) (a dot product
    with the whole flipped kernel) plus rebuilding the kernel, and the state holds
    l_max past inputs. Past l_max tokens it keeps sliding: equal to a causal
    convolution with the length-l_max kernel.
    """
    expected = (u_t.shape[0], self.l_max, self.d_model)
    if not hasattr(state, "shape") or tuple(state.shape) != expected:
      raise ValueError(f"SGConv step: state must have shape {expected} (batch, l_max, "
                       f"d_model), got {getattr(state, 'shape', type(state))}")
    state, y = conv_window_step(state.astype(jnp.float32), u_t.astype(jnp.float32),
                                self(self.l_max))
    return state, y


# Registry factory: the kernel's and LTIMixer's options, their defaults written once in
# the two classes (`ssm.lti_mixer.lti_factory`).
make_mixer = lti_factory(
    SGConvKernel,
    """An SGConv layer: SGConvKernel inside LTIMixer (conv + D u, activation, dropout, GLU).

    With bidirectional=True the kernel has 2 * channels sub-kernel sets (the last `channels` run
    backwards in time) and the layer has no step mode.""")
