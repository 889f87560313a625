"""Why the Mamba-2 train step spends half its time in transposes (results/train_step_h200.txt).

The two-layer trace shows the depthwise convolution, its silu and the gated norm running in
float32 on a (b, channels, l) physical layout. This probe times one bf16 Mamba-2 mixer
(d_model 768, B 16, L 2048, packed documents) forward and forward+backward with the
convolution written several ways, and counts the transposes XLA left in the optimized HLO:

  base      `ssm.mamba.causal_depthwise_conv` as the layers call it (autodiff of a shifted sum)
  no_dw     the same with the conv weights and bias under stop_gradient (diagnostic only: if the
            transposes vanish, the weight-gradient reduction over (b, l) chose the layout)
  vjp_sum   a custom_vjp whose backward recomputes silu' and sums dw over (b, l) per tap
  vjp_dot   the same with dw as a matrix product over the flattened (b l) axis

  usage (GPU machine, repo root): python3 scripts/gpu/conv_layout_probe.py
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
from flax import nnx

import ssm.mamba2
from benchmarks.ssd import jax_pair
from models import build_mixer
from ssm.mamba import causal_depthwise_conv

F32 = jnp.float32


def _no_dw(x, w, b, segment_ids=None):
  return causal_depthwise_conv(x, jax.lax.stop_gradient(w), jax.lax.stop_gradient(b), segment_ids)


def _taps(x, width, segment_ids):
  """The K shifted copies of x (b, l, c) the convolution reads, masked at document starts."""
  seq_len = x.shape[1]
  xp = jnp.pad(x, ((0, 0), (width - 1, 0), (0, 0)))
  taps = [xp[:, k:k + seq_len] for k in range(width)]
  if segment_ids is not None:
    sp = jnp.pad(segment_ids, ((0, 0), (width - 1, 0)), constant_values=-1)
    taps = [jnp.where((sp[:, k:k + seq_len] == segment_ids)[..., None], t, 0)
            for k, t in enumerate(taps)]
  return taps


def _anticausal(g, width, segment_ids):
  """dx[s] = sum_k g_k[s + K - 1 - k] with the same document mask (the transpose of _taps)."""
  seq_len = g[0].shape[1]
  out = 0
  for k, gk in enumerate(g):
    shift = width - 1 - k
    if segment_ids is not None:
      sp = jnp.pad(segment_ids, ((0, 0), (width - 1, 0)), constant_values=-1)
      gk = jnp.where((sp[:, k:k + seq_len] == segment_ids)[..., None], gk, 0)
    out = out + jnp.pad(gk, ((0, 0), (0, shift), (0, 0)))[:, shift:]
  return out


def _make_vjp(dw_mode):
  @functools.partial(jax.custom_vjp, nondiff_argnums=())
  def conv(x, w, b, segment_ids):
    return causal_depthwise_conv(x, w, b, segment_ids)

  def fwd(x, w, b, segment_ids):
    return conv(x, w, b, segment_ids), (x, w, segment_ids)

  def bwd(res, dy):
    x, w, segment_ids = res
    width, c = w.shape
    dy = dy.astype(F32)
    taps = _taps(x, width, segment_ids)
    if dw_mode == "sum":
      dw = jnp.stack([jnp.sum(t.astype(F32) * dy, axis=(0, 1)) for t in taps])
    else:
      flat = dy.reshape(-1, c)
      dw = jnp.stack([jnp.einsum("nc,nc->c", t.reshape(-1, c), flat,
                                 preferred_element_type=F32) for t in taps])
    dx = _anticausal([w[k] * dy for k in range(width)], width, segment_ids)
    ds = None if segment_ids is None else jnp.zeros(segment_ids.shape, jax.dtypes.float0)
    return dx.astype(x.dtype), dw, jnp.sum(dy, axis=(0, 1)), ds

  conv.defvjp(fwd, bwd)
  return lambda x, w, b, segment_ids=None: conv(x, w, b, segment_ids)


VARIANTS = {"base": causal_depthwise_conv, "no_dw": _no_dw,
            "vjp_sum": _make_vjp("sum"), "vjp_dot": _make_vjp("dot")}


def main():
  import sys
  b, l, d_model = (2, 64, 64) if "--small" in sys.argv else (16, 2048, 768)
  x = jax.random.normal(jax.random.key(3), (b, l, d_model), F32).astype(jnp.bfloat16)
  seg = jnp.cumsum(jax.random.bernoulli(jax.random.key(4), 1 / 700, (b, l)), axis=1).astype(jnp.int32)
  print(jax.devices()[0].device_kind, jax.__version__, flush=True)
  ref = None
  for name, fn in VARIANTS.items():
    ssm.mamba2.causal_depthwise_conv = fn
    graphdef, params = nnx.split(build_mixer("mamba2", d_model, rngs=nnx.Rngs(0),
                                             dtype="bfloat16"))

    def f(params, x, graphdef=graphdef):
      return nnx.merge(graphdef, params)(x, segment_ids=seg)
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(f(p, x).astype(F32)), argnums=(0, 1)))
    hlo = grad.lower(params, x).compile().as_text()
    n_t = len(re.findall(r"transpose", hlo))
    n_tf = len(set(re.findall(r"%([\w.]*transpose[\w.]*) = ", hlo)))
    g = jax.tree.leaves(grad(params, x))
    ref = g if name == "base" else ref
    err = max(float(jnp.max(jnp.abs(u.astype(F32) - v.astype(F32))) /
                    (float(jnp.max(jnp.abs(v.astype(F32)))) + 1e-30)) for u, v in zip(g, ref))
    row = jax_pair(f, (params, x), (0, 1), 20, 3)
    print(f"{name:8s} fwd {row['fwd ms']:.3f} ms  fwd+bwd {row['fwd+bwd ms']:.3f} ms  "
          f"'transpose' in bwd HLO: {n_t} mentions, {n_tf} named ops; grad err vs base {err:.1e}",
          flush=True)
  ssm.mamba2.causal_depthwise_conv = causal_depthwise_conv


if __name__ == "__main__":
  main()
