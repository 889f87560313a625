"""ssm.ops.ssd (Mamba-2's SSD), XLA path: the chunked form against the token-by-token
reference (values and float64 gradients), packed documents, the selective-scan special
case, dt_bias / dt_softplus, and the errors at the boundary."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from ssm.ops import selective_scan, ssd
from ssm.ops.ssd import segsum, ssd_chunked, ssd_reference
from _testing import rel


def ssd_inputs(rng, b=2, l=19, h=4, p=3, g=2, n=5, dtype=np.float32):
  cast = lambda x: jnp.asarray(x, dtype)
  return dict(x=cast(rng.standard_normal((b, l, h, p))),
              dt=cast(np.log1p(np.exp(rng.standard_normal((b, l, h)) - 1))),
              A=cast(-np.exp(rng.standard_normal(h))),
              B=cast(rng.standard_normal((b, l, g, n))), C=cast(rng.standard_normal((b, l, g, n))),
              D=cast(rng.standard_normal(h)), h0=cast(rng.standard_normal((b, h, p, n))))


def packed_ids(rng, b, l, docs=4):
  """Sorted random document ids: runs of random lengths, some of one token."""
  return jnp.asarray(np.sort(rng.integers(0, docs, (b, l)), axis=1), jnp.int32)


def args_of(a, *names):
  return tuple(a[k] for k in names)


def test_segsum_is_stable_and_exact():
  x = jnp.asarray(np.random.default_rng(0).standard_normal(6), jnp.float32)
  s = np.asarray(segsum(x))
  for i in range(6):
    for j in range(6):
      want = float(np.sum(np.asarray(x)[j + 1:i + 1])) if i >= j else -np.inf
      np.testing.assert_allclose(s[i, j], want, rtol=1e-6, atol=1e-6)
  # Large decays: a difference of cumsums would lose the small terms; masked sums do not.
  big = jnp.asarray([-1e4, -1e-3, -1e-3, -1e-3], jnp.float32)
  np.testing.assert_allclose(np.exp(segsum(big))[3, 1], np.exp(-2e-3), rtol=1e-6)


@pytest.mark.parametrize("chunk_size,use_h0,use_seg", [(4, True, False), (8, False, True),
                                                       (32, True, True)])
def test_chunked_equals_reference(chunk_size, use_h0, use_seg):
  """Given random inputs (groups, D, an odd length), the chunked form equals the
  token-by-token recurrence, with and without h0 and packed documents."""
  rng = np.random.default_rng(chunk_size)
  a = ssd_inputs(rng)
  kw = dict(D=a["D"], h0=a["h0"] if use_h0 else None,
            segment_ids=packed_ids(rng, 2, 19) if use_seg else None)
  y, s = ssd_chunked(*args_of(a, "x", "dt", "A", "B", "C"), chunk_size=chunk_size, **kw)
  y_ref, s_ref = ssd_reference(*args_of(a, "x", "dt", "A", "B", "C"), **kw)
  assert rel(y, y_ref) < 1e-5 and rel(s, s_ref) < 1e-5


def test_chunked_gradients_equal_reference_float64():
  """Gradients of x, dt, A, B, C, D and h0 through the chunked form equal those through
  the recurrence in float64, with packed documents."""
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    a = ssd_inputs(rng, l=13, dtype=np.float64)
    seg = packed_ids(rng, 2, 13)
    w = jnp.asarray(rng.standard_normal((2, 13, 4, 3)))
    names = ("x", "dt", "A", "B", "C", "D", "h0")

    def loss(fn, **kw):
      def f(*args):
        y, s = fn(*args[:5], D=args[5], h0=args[6], segment_ids=seg, **kw)
        return jnp.sum(w * y) + jnp.sum(s ** 2)
      return f

    args = args_of(a, *names)
    g = jax.jit(jax.grad(loss(ssd_chunked, chunk_size=4), range(7)))(*args)
    g_ref = jax.jit(jax.grad(loss(ssd_reference), range(7)))(*args)
    for name, u, v in zip(names, g, g_ref):
      np.testing.assert_allclose(u, v, rtol=1e-9, atol=1e-10, err_msg=name)


def test_packed_documents_equal_each_document_alone():
  """A row of packed documents gives, on every document, what the document gives alone
  (from zero state; the first document from h0), and the final state is the last one's."""
  rng = np.random.default_rng(2)
  a = ssd_inputs(rng, b=1, l=23)
  bounds = [0, 1, 9, 10, 23]                       # documents of 1, 8, 1 and 13 tokens
  seg = jnp.asarray(np.repeat(np.arange(4) * 7 + 3, np.diff(bounds))[None], jnp.int32)
  names = ("x", "dt", "A", "B", "C")
  y, s = ssd(*args_of(a, *names), D=a["D"], h0=a["h0"][:1], segment_ids=seg,
             return_state=True, chunk_size=4, impl="xla")
  for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
    piece = {k: a[k][:, lo:hi] for k in ("x", "dt", "B", "C")}
    y_doc, s_doc = ssd_reference(piece["x"], piece["dt"], a["A"], piece["B"], piece["C"],
                                 D=a["D"], h0=a["h0"][:1] if i == 0 else None)
    assert rel(y[:, lo:hi], y_doc) < 1e-5, i
  assert rel(s, s_doc) < 1e-5


def test_ssd_is_a_selective_scan_with_scalar_A_per_head():
  """Mamba-2's SSM = Mamba-1's with A, dt shared by a head's channels (groups map alike)."""
  rng = np.random.default_rng(2)
  a = ssd_inputs(rng)
  b, l, h, p = a["x"].shape
  y, s = ssd(*args_of(a, "x", "dt", "A", "B", "C"), h0=a["h0"], return_state=True,
             chunk_size=8, impl="xla")
  y1, s1 = selective_scan(a["x"].reshape(b, l, h * p), jnp.repeat(a["dt"], p, axis=2),
                          jnp.broadcast_to(jnp.repeat(a["A"], p)[:, None], (h * p, 5)),
                          a["B"], a["C"], h0=a["h0"].reshape(b, h * p, 5), return_state=True,
                          chunk_size=8)
  np.testing.assert_allclose(y.reshape(b, l, h * p), y1, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(s.reshape(b, h * p, 5), s1, rtol=1e-4, atol=1e-4)


def test_dt_bias_and_softplus_apply_before_the_recurrence():
  rng = np.random.default_rng(3)
  a = ssd_inputs(rng)
  raw = jnp.asarray(rng.standard_normal(a["dt"].shape), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(4), jnp.float32)
  y = ssd(a["x"], raw, a["A"], a["B"], a["C"], dt_bias=bias, dt_softplus=True, impl="xla")
  y_ref, _ = ssd_reference(a["x"], jax.nn.softplus(raw + bias), a["A"], a["B"], a["C"])
  assert rel(y, y_ref) < 1e-5


def test_bf16_inputs_give_bf16_outputs_and_float32_state():
  a = ssd_inputs(np.random.default_rng(4), dtype=jnp.bfloat16)
  y, s = ssd(*args_of(a, "x", "dt", "A", "B", "C"), return_state=True, impl="xla")
  assert y.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  y_ref, _ = ssd_reference(*(v.astype(jnp.float32) for v in args_of(a, "x", "dt", "A", "B",
                                                                      "C")))
  assert rel(y, y_ref) < 1e-2


def test_bad_input_fails_clearly():
  a = ssd_inputs(np.random.default_rng(0), l=5)
  x, dt, A, B, C = args_of(a, "x", "dt", "A", "B", "C")
  cases = [
      (dict(B=B[:, :, :1].repeat(3, 2), C=C[:, :, :1].repeat(3, 2)), "groups of B/C must divide"),
      (dict(dt=dt[..., :2]), "dt must be"),
      (dict(B=B[:, :4]), "B and C must both be"),
      (dict(A=A[:2]), "A must be"),
      (dict(h0=a["h0"][..., :2]), "h0 must be"),
      (dict(D=a["D"][:3]), "D must be"),
      (dict(segment_ids=jnp.zeros((2, 4), jnp.int32)), "segment_ids must be"),
      (dict(segment_ids=jnp.zeros((2, 5), jnp.float32)), "segment_ids must be an integer"),
      (dict(segment_ids=jnp.zeros((2, 5), bool)), "segment_ids must be an integer"),
      (dict(chunk_size=0), "chunk_size must be a positive int"),
      (dict(chunk_size=True), "chunk_size must be a positive int"),
      (dict(x=x.astype(jnp.int32)), "x must be a real floating-point"),
      (dict(A=-A), "A must be <= 0"),
      (dict(x=x[:, :0], dt=dt[:, :0], B=B[:, :0], C=C[:, :0]), "empty sequence"),
      (dict(impl="cuda"), "impl must be one of"),
  ]
  for change, message in cases:
    kw = dict(x=x, dt=dt, A=A, B=B, C=C) | change
    with pytest.raises((TypeError, ValueError), match=message):
      ssd(kw.pop("x"), kw.pop("dt"), kw.pop("A"), kw.pop("B"), kw.pop("C"), **kw)
  # Shapes the kernel cannot take: a clear error under "pallas"; "auto" runs XLA.
  with pytest.raises(ValueError, match="headdim 3 must be in"):
    ssd(x, dt, A, B, C, impl="pallas")
  assert ssd(x, dt, A, B, C, impl="auto").shape == x.shape
