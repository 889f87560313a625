"""ssm.ops.causal_conv1d: the XLA path and the Pallas kernel (Mosaic GPU interpret mode on
the CPU, impl="pallas") against a float64 numpy reference written as plain loops over taps,
outputs and the gradients of x, w and bias; packed documents; odd lengths; bad input.

Interpreting the kernel costs seconds per CTA, so the shapes are one or two channel blocks
and a few tiles; small ConvTuning tiles give several CTAs per sequence (their halos and the
backward's lookahead cross CTA boundaries), ring refills and a padded last tile.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm.ops import causal_conv1d
from ssm.ops import causal_conv_pallas as ccp
from ssm.ops.causal_conv import causal_depthwise_conv
from _testing import rel, tolerance

SMALL = ccp.ConvTuning(chunk=8, tiles_per_cta=3, stages=2)  # 45 tokens: 6 tiles, 2 CTAs


def reference(x, w, bias, seg, silu, ct):
  """float64 loops: y = act(pre), pre[t] = bias + sum_k w[k] x[t - K + 1 + k] over the taps
  inside the sequence and t's document; and the VJP of sum(y * ct) w.r.t. x, w, bias."""
  x, w, ct = (np.asarray(a, np.float64) for a in (x, w, ct))
  bias = np.zeros(x.shape[2]) if bias is None else np.asarray(bias, np.float64)
  bsz, seq_len, _ = x.shape
  taps = w.shape[0]
  seg = np.zeros((bsz, seq_len), int) if seg is None else np.asarray(seg)

  def kept(b, t, k):
    s = t - taps + 1 + k
    return s >= 0 and seg[b, s] == seg[b, t], s

  pre = np.zeros_like(x)
  for b in range(bsz):
    for t in range(seq_len):
      pre[b, t] = bias
      for k in range(taps):
        ok, s = kept(b, t, k)
        if ok:
          pre[b, t] += w[k] * x[b, s]
  sig = 1.0 / (1.0 + np.exp(-pre))
  y = pre * sig if silu else pre
  g = ct * (sig * (1.0 + pre * (1.0 - sig)) if silu else 1.0)
  dx, dw = np.zeros_like(x), np.zeros_like(w)
  for b in range(bsz):
    for t in range(seq_len):
      for k in range(taps):
        ok, s = kept(b, t, k)
        if ok:
          dx[b, s] += w[k] * g[b, t]
          dw[k] += x[b, s] * g[b, t]
  return y, (dx, dw, g.sum(axis=(0, 1)))


def _inputs(rng, bsz, seq_len, chans, taps, dtype=jnp.float32):
  x = jnp.asarray(rng.standard_normal((bsz, seq_len, chans)), dtype)
  w = jnp.asarray(0.5 * rng.standard_normal((taps, chans)), jnp.float32)
  bias = jnp.asarray(0.3 * rng.standard_normal(chans), jnp.float32)
  ct = jnp.asarray(rng.standard_normal((bsz, seq_len, chans)), jnp.float32)
  return x, w, bias, ct


def _packed_ids(seq_len, *starts):
  """(len(starts), seq_len) ids: row i starts a new document at each position in starts[i]."""
  return jnp.asarray(np.stack([np.searchsorted(np.asarray(s), np.arange(seq_len), side="right")
                               for s in starts]), jnp.int32)


def _run(impl, x, w, bias, ct, seg, silu, tuning=None):
  """y and the gradients (dx, dw, dbias) of sum(y * ct)."""
  act = "silu" if silu else None
  if impl == "pallas" and tuning is not None:
    f = lambda x, w, b: ccp.causal_conv1d_pallas(x, w, b, segment_ids=seg, activation=act,
                                                 interpret=True, tuning=tuning)
  else:
    f = lambda x, w, b: causal_conv1d(x, w, b, segment_ids=seg, activation=act, impl=impl)
  if bias is None:
    y, pull = jax.vjp(lambda x, w: f(x, w, None), x, w)
    return y, pull(ct.astype(y.dtype)) + (None,)
  y, pull = jax.vjp(f, x, w, bias)
  return y, pull(ct.astype(y.dtype))


def _check(got, want, tol):
  (y, grads), (y_ref, grads_ref) = got, want
  assert rel(y, y_ref) < tol, ("y", rel(y, y_ref))
  for name, d, d_ref in zip(("dx", "dw", "dbias"), grads, grads_ref):
    if d is not None:
      assert rel(d, d_ref) < tol, (name, rel(d, d_ref))


# -- the XLA path ------------------------------------------------------------------------

@pytest.mark.parametrize("taps,silu,packed", [(4, True, True), (4, False, False), (3, True, False),
                                              (2, False, True)])
def test_xla_path_matches_reference(taps, silu, packed):
  rng = np.random.default_rng(taps + 2 * silu + 5 * packed)
  x, w, bias, ct = _inputs(rng, 2, 13, 5, taps)
  seg = _packed_ids(13, [4, 6], [1]) if packed else None
  got = _run("xla", x, w, bias, ct, seg, silu)
  y_ref, g_ref = reference(x, w, bias, seg, silu, ct)
  assert got[0].shape == x.shape and got[0].dtype == x.dtype
  _check(got, (y_ref, g_ref), 1e-5)


def test_mamba_conv_is_the_ops_xla_path():
  from ssm.mamba import causal_depthwise_conv as mamba_conv
  assert mamba_conv is causal_depthwise_conv


# -- the kernel (interpreted) --------------------------------------------------------------

def test_kernel_packed_silu_odd_length():
  """Given 45 tokens (a padded last tile) in two CTAs per sequence, documents starting inside
  a tile and at the CTA boundary (24), silu and a bias: the kernel equals the reference,
  values and gradients."""
  rng = np.random.default_rng(1)
  x, w, bias, ct = _inputs(rng, 2, 45, 128, 4)
  seg = _packed_ids(45, [10, 24], [2, 30])
  got = _run("pallas", x, w, bias, ct, seg, True, SMALL)
  assert got[0].dtype == jnp.float32 and got[0].shape == x.shape
  _check(got, reference(x, w, bias, seg, True, ct), tolerance(jnp.float32))


def test_kernel_packed_batch_equals_each_document_alone():
  """The kernel over a packed row equals the reference over each document alone."""
  rng = np.random.default_rng(2)
  x, w, bias, ct = _inputs(rng, 1, 40, 128, 4)
  starts = [0, 9, 16, 40]
  seg = _packed_ids(40, starts[1:-1])
  y, (dx, _, _) = _run("pallas", x, w, bias, ct, seg, True, SMALL)
  for a, b in zip(starts[:-1], starts[1:]):
    y_doc, (dx_doc, _, _) = reference(x[:, a:b], w, bias, None, True, ct[:, a:b])
    assert rel(y[:, a:b], y_doc) < 1e-5 and rel(dx[:, a:b], dx_doc) < 1e-5


def test_kernel_default_tiles_two_channel_blocks_no_activation():
  """Default tuning (32-token tiles: 70 tokens = 3 tiles, the last padded), 256 channels,
  K = 3, no activation, no bias, no segment ids."""
  rng = np.random.default_rng(3)
  x, w, _, ct = _inputs(rng, 1, 70, 256, 3)
  got = _run("pallas", x, w, None, ct, None, False)
  y_ref, (dx, dw, _) = reference(x, w, None, None, False, ct)
  _check(got, (y_ref, (dx, dw, None)), tolerance(jnp.float32))


def test_kernel_wide_blocks():
  """ConvTuning(block_c=256): one CTA over 256 channels (two a thread on the GPU)."""
  rng = np.random.default_rng(5)
  x, w, bias, ct = _inputs(rng, 1, 20, 256, 4)
  got = _run("pallas", x, w, bias, ct, None, True, ccp.ConvTuning(chunk=8, block_c=256))
  _check(got, reference(x, w, bias, None, True, ct), tolerance(jnp.float32))


def test_kernel_bf16():
  """bf16 x: y and dx come back in bf16, dw and dbias in float32; errors at bf16's rounding
  against the float64 reference of the same (bf16-exact) inputs."""
  rng = np.random.default_rng(4)
  x, w, bias, ct = _inputs(rng, 1, 45, 128, 4, jnp.bfloat16)
  seg = _packed_ids(45, [20])
  y, grads = _run("pallas", x, w, bias, ct, seg, True, SMALL)
  assert y.dtype == jnp.bfloat16 and grads[0].dtype == jnp.bfloat16
  assert grads[1].dtype == jnp.float32 and grads[2].dtype == jnp.float32
  ct_seen = ct.astype(jnp.bfloat16)  # the cotangent arrives in y's dtype
  _check((y, grads), reference(x, w, bias, seg, True, ct_seen), tolerance(jnp.bfloat16))


# -- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,err,match", [
    (dict(x=np.zeros((4, 128), np.float32)), ValueError, "batch, length, channels"),
    (dict(w=np.zeros((4, 64), np.float32)), ValueError, "taps, channels"),
    (dict(bias=np.zeros((64,), np.float32)), ValueError, "bias must be"),
    (dict(segment_ids=np.zeros((2, 7), np.int32)), ValueError, "segment_ids must be"),
    (dict(segment_ids=np.zeros((2, 8), np.float32)), TypeError, "integer"),
    (dict(x=np.zeros((2, 8, 128), np.int32)), TypeError, "floating"),
    (dict(activation="relu"), ValueError, "activation"),
    (dict(impl="triton"), ValueError, "impl must be one of"),
    (dict(x=np.zeros((2, 8, 96), np.float32), w=np.zeros((4, 96), np.float32),
          bias=None, impl="pallas"), ValueError, "multiple of 128"),
    (dict(w=np.zeros((5, 128), np.float32), impl="pallas"), ValueError, "K = 5"),
])
def test_bad_input_is_refused(kw, err, match):
  args = dict(x=np.zeros((2, 8, 128), np.float32), w=np.zeros((4, 128), np.float32),
              bias=np.zeros((128,), np.float32), segment_ids=None, activation="silu",
              impl="xla")
  args.update(kw)
  arr = lambda a: None if a is None else jnp.asarray(a)
  with pytest.raises(err, match=match):
    causal_conv1d(arr(args["x"]), arr(args["w"]), arr(args["bias"]),
                  segment_ids=arr(args["segment_ids"]), activation=args["activation"],
                  impl=args["impl"])


def test_auto_takes_xla_where_the_kernel_cannot():
  x, w = jnp.ones((1, 8, 96)), jnp.ones((4, 96))
  np.testing.assert_allclose(causal_conv1d(x, w, impl="auto"), causal_conv1d(x, w, impl="xla"))


def test_tuning_validates_itself():
  with pytest.raises(ValueError, match="multiple of 8"):
    ccp.ConvTuning(chunk=12)
  with pytest.raises(ValueError, match=">= 1"):
    ccp.ConvTuning(stages=0)
  assert ccp.default_tuning(2048) == ccp.ConvTuning(chunk=32, tiles_per_cta=8)
  assert ccp.default_tuning(200).chunk == 8 and ccp.default_tuning(45).chunk == 32
  with pytest.raises(ValueError, match="128 or 256"):
    ccp.ConvTuning(block_c=512)
  with pytest.raises(ValueError, match="block_c = 256"):
    ccp.causal_conv1d_pallas(jnp.ones((1, 8, 384)), jnp.ones((4, 384)),
                             tuning=ccp.ConvTuning(block_c=256))


# -- in the layers -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_layers_through_the_kernel_equal_xla(kind, monkeypatch):
  """Given a Mamba-1 / Mamba-2 layer whose conv has 128 channels and packed documents (Mamba-2),
  when the conv runs through the kernel (forced, interpreted), then the layer's output and
  the gradients of its input and conv parameters equal the XLA layer's."""
  from flax import nnx
  import ssm.mamba
  import ssm.mamba2
  if kind == "mamba":
    layer = ssm.mamba.Mamba(64, d_state=4, expand=2, impl="xla", rngs=nnx.Rngs(0))  # 128 ch
    kw = {}
  else:  # conv_dim = d_inner + 2 N = 64 + 64
    layer = ssm.mamba2.Mamba2(32, d_state=32, headdim=16, impl="xla", rngs=nnx.Rngs(0))
    kw = dict(segment_ids=_packed_ids(20, [7]))
  x = jax.random.normal(jax.random.key(1), (1, 20, layer.d_model))

  def run(module, path):
    monkeypatch.setattr(ssm.mamba, "conv_impl", lambda *a: path)
    monkeypatch.setattr(ssm.mamba2, "conv_impl", lambda *a: path)
    graphdef, params = nnx.split(module)
    def loss(params, x):
      return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x, **kw)))
    y = nnx.merge(graphdef, params)(x, **kw)
    return y, jax.grad(loss, argnums=(0, 1))(params, x)

  y, (gp, gx) = run(layer, "pallas")
  y_ref, (gp_ref, gx_ref) = run(layer, "xla")
  assert rel(y, y_ref) < 1e-5 and rel(gx, gx_ref) < 1e-5
  for name in ("conv_w", "conv_b"):
    assert rel(gp[name][...], gp_ref[name][...]) < 1e-5, name
