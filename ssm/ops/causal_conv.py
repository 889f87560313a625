"""Depthwise causal 1-D convolution (Mamba's short conv), with an optional silu.

    x (b, l, c), w (K, c), bias (c,) -> y (b, l, c)
    pre[t] = sum_{k<K} w[k] x[t - K + 1 + k] + bias        (x[s] = 0 for s < 0)
    y      = silu(pre) when activation="silu", else pre

b = batch, l = length, c = channels (minor), K = taps. segment_ids (b, l) int: packed
documents; a tap reaching into another document reads zero (tap k of token t is kept iff
segment_ids[t - K + 1 + k] == segment_ids[t]), so each document is convolved as if it
started the sequence (the reference's causal_conv1d with seq_idx).

The taps are summed in float32 (float64 when an input is float64); y has x's dtype.

Paths (`impl`, see ssm/ops/_impl.py):
  "xla"     `causal_depthwise_conv` below, a shifted sum of K taps (the reference);
            differentiated by JAX.
  "pallas"  ssm/ops/causal_conv_pallas.py: a Mosaic GPU kernel, forward and backward
            (custom_vjp; the backward recomputes the pre-activation, returns dx in x's
            dtype and dw, dbias from per-CTA partial sums added in XLA). It takes float32
            or bfloat16 x, c a multiple of 128 and K <= 4; off a GPU it is interpreted.
  "auto"    the kernel on a Hopper GPU when it takes the call, else XLA.

Why a kernel: inside a train step XLA fuses the shifted sum, its silu and what follows
into one elementwise chain whose layout it picks from the weight-gradient reduction (a
sum over b and l), which made it choose l-minor layouts and transpose (b, l, c) arrays
around the chain; the kernel's custom call fixes row-major layouts at this boundary.

The step mode of the mixers (one token at a time) is `ssm.mamba.conv_step`, unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssm._checks import check_float, check_integer
from ssm.ops._dtypes import compute_dtype
from ssm.ops._impl import choose_impl, interpret_mode

ACTIVATIONS = (None, "silu")


def causal_depthwise_conv(x_blc, w_kc, bias_c=None, segment_ids=None):
  """pre[t] = sum_k w[k] x[t - K + 1 + k] + bias, zero before the start. (b, l, c) -> (b, l, c).

  The XLA path of `causal_conv1d` (no activation, no cast: the result has the promoted
  dtype of x, w and bias). segment_ids (b, l) int: a tap reaching into another document
  reads zero."""
  width, seq_len = w_kc.shape[0], x_blc.shape[1]
  xp = jnp.pad(x_blc, ((0, 0), (width - 1, 0), (0, 0)))
  taps = [xp[:, k:k + seq_len] for k in range(width)]
  if segment_ids is not None:
    sp = jnp.pad(segment_ids, ((0, 0), (width - 1, 0)), constant_values=-1)
    taps = [jnp.where((sp[:, k:k + seq_len] == segment_ids)[..., None], tap, 0)
            for k, tap in enumerate(taps)]
  out = sum(w_kc[k] * tap for k, tap in enumerate(taps))
  return out if bias_c is None else out + bias_c


def activate(pre, activation):
  return jax.nn.silu(pre) if activation == "silu" else pre


def check_causal_conv_args(x, w, bias, segment_ids, activation) -> None:
  """ValueError / TypeError naming the first bad argument."""
  if x.ndim != 3:
    raise ValueError(f"causal_conv1d: x must be (batch, length, channels), got shape {x.shape}")
  bsz, seq_len, chans = x.shape
  if seq_len < 1:
    raise ValueError(f"causal_conv1d: empty sequence (x {x.shape})")
  if w.ndim != 2 or w.shape[1] != chans or w.shape[0] < 1:
    raise ValueError(f"causal_conv1d: w must be (taps, channels) with channels = {chans}, "
                     f"got {w.shape}")
  if bias is not None and bias.shape != (chans,):
    raise ValueError(f"causal_conv1d: bias must be ({chans},), got {bias.shape}")
  check_float("causal_conv1d", x=x, w=w, bias=bias)
  if segment_ids is not None:
    check_integer("causal_conv1d", segment_ids=segment_ids)
    if segment_ids.shape != (bsz, seq_len):
      raise ValueError(f"causal_conv1d: segment_ids must be (batch, length) = {(bsz, seq_len)}, "
                       f"got {segment_ids.shape}")
  if activation not in ACTIVATIONS:
    raise ValueError(f"causal_conv1d: activation must be one of {ACTIVATIONS}, "
                     f"got {activation!r}")


def causal_conv1d(x: jax.Array, w: jax.Array, bias: jax.Array | None = None, *,
                  segment_ids: jax.Array | None = None, activation: str | None = None,
                  impl: str = "auto") -> jax.Array:
  """Depthwise causal convolution (module docstring).

  Args:
    x: (batch, length, channels) float32 or bfloat16 (float64 on the XLA path).
    w: (K, channels) taps, oldest first (tap K - 1 multiplies x[t]).
    bias: (channels,) or None.
    segment_ids: (batch, length) int, packed documents, or None.
    activation: None or "silu".
    impl: "auto", "xla" or "pallas" (ssm/ops/causal_conv_pallas.py: float32/bfloat16 x,
      channels a multiple of 128, K <= 4).

  Returns:
    y (batch, length, channels) in x's dtype.
  """
  check_causal_conv_args(x, w, bias, segment_ids, activation)
  from ssm.ops import causal_conv_pallas as kernel  # pylint: disable=import-outside-toplevel
  path = choose_impl(impl, op="causal_conv1d", check=lambda: kernel.check_supported(x, w))
  if path == "pallas":
    return kernel.causal_conv1d_pallas(x, w, bias, segment_ids=segment_ids,
                                       activation=activation, interpret=interpret_mode())
  return causal_conv1d_xla(x, w, bias, segment_ids=segment_ids, activation=activation)


def causal_conv1d_xla(x, w, bias=None, *, segment_ids=None, activation=None):
  """The XLA path: taps summed in float32 (or wider), y in x's dtype."""
  cdt = compute_dtype(x, w, bias)
  pre = causal_depthwise_conv(x.astype(cdt), w.astype(cdt),
                              None if bias is None else bias.astype(cdt), segment_ids)
  return activate(pre, activation).astype(x.dtype)
