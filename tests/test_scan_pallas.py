"""The Pallas scan kernels (ssm/ops/linear_scan_pallas.py, selective_scan_pallas.py) against
the XLA paths, in Mosaic GPU interpret mode on the CPU: outputs, final states and every gradient, odd lengths
(not multiples of the 32-token tile, and more tiles than prefetch stages), h0,
reverse, complex, groups, with and without softplus / z / D.

The XLA paths are themselves tested against naive loops in float64
(test_linear_scan.py, test_selective_scan.py). Interpreting a kernel costs seconds
per CTA-tile, so the shapes are one or two channel blocks and a few tiles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm.ops import linear_scan, selective_scan
from ssm.ops import linear_scan_pallas, selective_scan_pallas
from _testing import grads, rel


def _lin_inputs(rng, shape, complex_=False):
  a = rng.uniform(0.5, 1.0, shape).astype(np.float32)
  b = rng.standard_normal(shape).astype(np.float32)
  h0 = rng.standard_normal((shape[0], shape[2])).astype(np.float32)
  if complex_:
    a = (a * np.exp(1j * rng.uniform(-1, 1, shape))).astype(np.complex64)
    b = (b + 1j * rng.standard_normal(shape)).astype(np.complex64)
    h0 = (h0 + 1j * rng.standard_normal(h0.shape)).astype(np.complex64)
  return jnp.asarray(a), jnp.asarray(b), jnp.asarray(h0)


@pytest.mark.parametrize("seq_len,reverse,complex_", [
    (45, False, False),   # two tiles, the second padded
    (100, True, False),   # four tiles: more than the 3 prefetch stages (slots are refilled)
    (45, True, True),     # complex as re/im planes
])
def test_linear_scan_kernel_matches_xla(seq_len, reverse, complex_):
  rng = np.random.default_rng(seq_len + 7 * reverse + 13 * complex_)
  a, b, h0 = _lin_inputs(rng, (2, seq_len, 128), complex_)
  kern = lambda a, b, h0: linear_scan(a, b, h0, reverse=reverse, return_state=True,
                                      impl="pallas")
  ref = lambda a, b, h0: linear_scan(a, b, h0, reverse=reverse, return_state=True, impl="xla")
  (h, last), (h_ref, last_ref) = kern(a, b, h0), ref(a, b, h0)
  assert h.shape == h_ref.shape and h.dtype == h_ref.dtype
  assert rel(h, h_ref) < 1e-6 and rel(last, last_ref) < 1e-6
  g = rng.standard_normal(h.shape) + (1j * rng.standard_normal(h.shape) if complex_ else 0)
  g_last = rng.standard_normal(last.shape)
  cts = (jnp.asarray(g, h.dtype), jnp.asarray(g_last, last.dtype))
  for d, d_ref in zip(grads(kern, (a, b, h0), cts), grads(ref, (a, b, h0), cts, jit=True)):
    assert d.dtype == d_ref.dtype
    assert rel(d, d_ref) < 1e-6


def test_linear_scan_kernel_bf16_inputs_accumulate_in_f32():
  rng = np.random.default_rng(3)
  a, b, _ = _lin_inputs(rng, (1, 70, 128))
  a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  h, last = linear_scan_pallas.linear_scan_pallas(a, b, interpret=True)
  assert h.dtype == jnp.bfloat16 and last.dtype == jnp.float32
  # Same bf16 inputs through the float32 XLA path: only the output rounding differs.
  h_ref, last_ref = linear_scan(a.astype(jnp.float32), b.astype(jnp.float32), return_state=True,
                                impl="xla")
  assert rel(last, last_ref) < 1e-6
  assert rel(h.astype(jnp.float32), h_ref) < 4e-3


def _ss_inputs(rng, bsz, seq_len, dim, n, groups):
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return dict(u=f(bsz, seq_len, dim), delta=0.5 * f(bsz, seq_len, dim),
              A=-jnp.exp(0.5 * f(dim, n)), B=f(bsz, seq_len, groups, n),
              C=f(bsz, seq_len, groups, n), D=f(dim), z=f(bsz, seq_len, dim),
              delta_bias=0.3 * f(dim), h0=f(bsz, dim, n))


def _ss_check(x, softplus, use_z, use_h0, bwd_segments=None, bwd_variant=None):
  names = ["u", "delta", "A", "B", "C", "D", "delta_bias"] + (["z"] if use_z else []) + (
      ["h0"] if use_h0 else [])
  if not softplus:  # dt = delta + bias must stay >= 0 (else exp(dt A) > 1 and the state explodes)
    x["delta"], x["delta_bias"] = jnp.abs(x["delta"]), jnp.abs(x["delta_bias"])

  def run(impl):
    def fn(*args):
      kw = dict(zip(names, args))
      if impl == "pallas" and (bwd_segments or bwd_variant):
        return selective_scan_pallas.selective_scan_pallas(
            kw.pop("u"), kw.pop("delta"), kw.pop("A"), kw.pop("B"), kw.pop("C"), kw.pop("D"),
            delta_softplus=softplus, interpret=True, bwd_segments=bwd_segments,
            bwd_variant=bwd_variant, **kw)
      return selective_scan(kw.pop("u"), kw.pop("delta"), kw.pop("A"), kw.pop("B"), kw.pop("C"),
                            kw.pop("D"), delta_softplus=softplus, return_state=True,
                            chunk_size=16, impl=impl, **kw)
    return fn

  args = tuple(x[k] for k in names)
  (y, last), (y_ref, last_ref) = run("pallas")(*args), run("xla")(*args)
  assert y.dtype == y_ref.dtype and last.shape == last_ref.shape
  assert rel(y, y_ref) < 1e-5 and rel(last, last_ref) < 1e-5
  rng = np.random.default_rng(11)
  cts = (jnp.asarray(rng.standard_normal(y.shape), jnp.float32),
         jnp.asarray(rng.standard_normal(last.shape), jnp.float32))
  got = grads(run("pallas"), args, cts)
  want = grads(run("xla"), args, cts, jit=True)
  for name, d, d_ref in zip(names, got, want):
    assert d.shape == d_ref.shape, name
    assert rel(d, d_ref) < 1e-5, (name, rel(d, d_ref))


@pytest.mark.parametrize("bwd_variant", [1, 2])
def test_selective_scan_kernel_matches_xla(bwd_variant):
  """Three tiles (odd length), softplus, z gate, D skip, bias, h0, N = 4; the
  backward kernels v1 (the default) and v2 (fewer instructions; selectable)."""
  x = _ss_inputs(np.random.default_rng(5), 1, 70, 128, 4, 1)
  _ss_check(x, softplus=True, use_z=True, use_h0=True, bwd_variant=bwd_variant)


@pytest.mark.parametrize("bwd_variant", [1, 2])
def test_selective_scan_kernel_backward_in_segments(bwd_variant):
  """The backward split into 3 parallel pieces per sequence (96 tokens, N = 8: two tokens per
  row of warp sums) equals the XLA gradients: the pre-pass adjoints chain exactly."""
  x = _ss_inputs(np.random.default_rng(7), 2, 96, 128, 8, 1)
  _ss_check(x, softplus=True, use_z=True, use_h0=True, bwd_segments=3, bwd_variant=bwd_variant)


@pytest.mark.slow
@pytest.mark.parametrize("bwd_variant", [2, 3])
def test_selective_scan_kernel_groups_n16_no_softplus(bwd_variant):
  """Two groups of 128 channels, N = 16 (Mamba's), delta + bias without softplus,
  no z, no h0; 40 tokens (a padded second tile)."""
  x = _ss_inputs(np.random.default_rng(6), 1, 40, 256, 16, 2)
  _ss_check(x, softplus=False, use_z=False, use_h0=False, bwd_variant=bwd_variant)


@pytest.mark.parametrize("bwd_variant", [2, 3])
def test_selective_scan_kernel_n16_segments(bwd_variant):
  """N = 16 with softplus, z, h0 and two segments: v2 and v3 (v3's rotated state order and
  select-free dB/dC sums exist only at N = 16)."""
  x = _ss_inputs(np.random.default_rng(13), 1, 64, 128, 16, 1)
  _ss_check(x, softplus=True, use_z=True, use_h0=True, bwd_segments=2, bwd_variant=bwd_variant)


def test_selective_scan_kernel_bf16():
  x = _ss_inputs(np.random.default_rng(8), 1, 33, 128, 8, 1)
  xb = {k: (v.astype(jnp.bfloat16) if k in ("u", "delta", "z") else v) for k, v in x.items()}
  y, last = selective_scan_pallas.selective_scan_pallas(xb["u"], xb["delta"], xb["A"], xb["B"], xb["C"], xb["D"],
                                     z=xb["z"], delta_bias=xb["delta_bias"], delta_softplus=True,
                                     h0=xb["h0"], interpret=True)
  assert y.dtype == jnp.bfloat16 and last.dtype == jnp.float32
  xf = {k: v.astype(jnp.float32) for k, v in xb.items()}
  y_ref, last_ref = selective_scan(xf["u"], xf["delta"], xf["A"], xf["B"], xf["C"], xf["D"],
                                   z=xf["z"], delta_bias=xf["delta_bias"], delta_softplus=True,
                                   h0=xf["h0"], return_state=True, impl="xla")
  assert rel(last, last_ref) < 1e-5
  assert rel(y.astype(jnp.float32), y_ref) < 4e-3


@pytest.mark.parametrize("bwd_variant", [3, 2, 1])
def test_selective_scan_kernel_bf16_gradients(bwd_variant):
  """bf16 u, delta, z and cotangent (Mamba's mixed-precision call), N = 16, two segments:
  every gradient against the float32 XLA path on the same rounded inputs. du, ddelta and dz
  come back in bf16 (one rounding: ~2e-3), the rest in float32."""
  x = _ss_inputs(np.random.default_rng(9), 1, 64, 128, 16, 1)
  names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0"]
  low = ("u", "delta", "z")
  xb = {k: (v.astype(jnp.bfloat16) if k in low else v) for k, v in x.items()}

  def kernel(u, delta, A, B, C, D, z, bias, h0):
    return selective_scan_pallas.selective_scan_pallas(
        u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True, h0=h0,
        interpret=True, bwd_segments=2, bwd_variant=bwd_variant)

  def ref(u, delta, A, B, C, D, z, bias, h0):
    return selective_scan(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True,
                          h0=h0, return_state=True, chunk_size=16, impl="xla")

  rng = np.random.default_rng(12)
  ct_y = jnp.asarray(rng.standard_normal((1, 64, 128)), jnp.bfloat16)
  ct_h = jnp.asarray(rng.standard_normal((1, 128, 16)), jnp.float32)
  got = grads(kernel, tuple(xb[k] for k in names), (ct_y, ct_h))
  want = grads(ref, tuple(xb[k].astype(jnp.float32) for k in names),
               (ct_y.astype(jnp.float32), ct_h), jit=True)
  for name, d, d_ref in zip(names, got, want):
    assert d.dtype == xb[name].dtype, name
    tol = 8e-3 if name in low else 1e-4
    assert rel(d.astype(jnp.float32), d_ref) < tol, (name, rel(d.astype(jnp.float32), d_ref))


@pytest.mark.parametrize("kw,match", [
    (dict(n=32), "N = 32"),
    (dict(dim=192), "multiple of 128"),
    (dict(dim=256, groups=4), "multiple of 128"),
    (dict(bwd_segments=3), "must divide"),
])
def test_selective_scan_kernel_rejects_unsupported_shapes(kw, match):
  dim, n, groups = kw.get("dim", 128), kw.get("n", 4), kw.get("groups", 1)
  x = _ss_inputs(np.random.default_rng(0), 1, 8, dim, n, groups)
  with pytest.raises(ValueError, match=match):
    if "bwd_segments" in kw:  # two backward tiles of 16 tokens cannot be split in three
      selective_scan_pallas.selective_scan_pallas(x["u"], x["delta"], x["A"], x["B"], x["C"], interpret=True,
                               bwd_segments=kw["bwd_segments"])
    selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], impl="pallas")
  # "auto" takes the XLA path for them (and everywhere off a Hopper GPU).
  y = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], impl="auto")
  assert y.shape == x["u"].shape
