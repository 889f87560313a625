"""selective_scan against a float64 per-token loop: outputs, states, gradients, groups, chunks."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from jax import lax

from ssm.ops import selective_scan


def softplus(x):
  return np.logaddexp(0.0, x)


def loop_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                        delta_softplus=False, h0=None):
  """Mamba-1's recurrence token by token in float64 NumPy. Returns (y, last state)."""
  u, delta, A, B, C = (np.asarray(x, np.float64) for x in (u, delta, A, B, C))
  bsz, seq_len, d = u.shape
  if B.ndim == 3:
    B = B[:, :, None]
  if C.ndim == 3:
    C = C[:, :, None]
  dt = delta + (0 if delta_bias is None else np.asarray(delta_bias, np.float64))
  if delta_softplus:
    dt = softplus(dt)
  h = np.zeros((bsz, d, A.shape[1])) if h0 is None else np.asarray(h0, np.float64).copy()
  y = np.zeros((bsz, seq_len, d))
  for t in range(seq_len):
    for c in range(d):
      b_n = B[:, t, c // (d // B.shape[2])]          # (bsz, n): the channel's group
      c_n = C[:, t, c // (d // C.shape[2])]
      h[:, c] = np.exp(dt[:, t, c, None] * A[c]) * h[:, c] + (dt[:, t, c] * u[:, t, c])[:, None] * b_n
      y[:, t, c] = np.sum(c_n * h[:, c], axis=-1)
  if D is not None:
    y = y + np.asarray(D, np.float64) * u
  if z is not None:
    z = np.asarray(z, np.float64)
    y = y * z / (1 + np.exp(-z))
  return y, h


def lax_scan_ref(u, delta, A, B, C, D, z, delta_bias, h0):
  """The same recurrence with lax.scan over time (differentiable, for gradients)."""
  d = u.shape[-1]
  dt = jax.nn.softplus(delta + delta_bias)
  Bx = jnp.repeat(B, d // B.shape[2], axis=2)
  Cx = jnp.repeat(C, d // C.shape[2], axis=2)

  def step(h, xs):
    u_t, dt_t, b_t, c_t = xs
    h = jnp.exp(dt_t[..., None] * A) * h + (dt_t * u_t)[..., None] * b_t
    return h, jnp.sum(h * c_t, -1)

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (u, dt, Bx, Cx))
  h, y = lax.scan(step, h0, xs)
  y = jnp.moveaxis(y, 0, 1) + D * u
  return y * jax.nn.silu(z), h


def make_inputs(rng, bsz=2, seq_len=19, d=6, n=4, groups=None, c_groups="same"):
  """Random inputs shaped like Mamba's (A negative, delta around softplus^-1 of 0.1)."""
  def bc(g):
    shape = (bsz, seq_len, n) if g is None else (bsz, seq_len, g, n)
    return rng.standard_normal(shape)
  return dict(
      u=rng.standard_normal((bsz, seq_len, d)),
      delta=rng.standard_normal((bsz, seq_len, d)) - 1.0,
      A=-np.exp(rng.standard_normal((d, n)) * 0.5),
      B=bc(groups), C=bc(groups if c_groups == "same" else c_groups),
      D=rng.standard_normal(d), z=rng.standard_normal((bsz, seq_len, d)),
      delta_bias=rng.standard_normal(d) * 0.5,
      h0=rng.standard_normal((bsz, d, n)))


def to_jnp(inputs, dtype=jnp.float32):
  return {k: jnp.asarray(v, dtype) for k, v in inputs.items()}


@pytest.mark.parametrize("seq_len,chunk_size,groups,c_groups,options", [
    (19, 128, None, "same", "all"),      # one chunk
    (19, 4, None, "same", "all"),        # 5 chunks, padded last chunk
    (19, 8, 3, "same", "all"),           # groups of B and C
    (19, 8, 2, None, "bare"),            # grouped B, shared C; no D, z, bias, softplus, h0
    (1, 4, 6, "same", "all"),            # one token; one group per channel
])
def test_matches_token_loop(seq_len, chunk_size, groups, c_groups, options):
  rng = np.random.default_rng(seq_len + 100 * chunk_size)
  x = make_inputs(rng, seq_len=seq_len, groups=groups, c_groups=c_groups)
  if options == "bare":
    for k in ("D", "z", "delta_bias", "h0"):
      x[k] = None
    x["delta"] = np.abs(x["delta"]) * 0.1
  j = {k: None if v is None else jnp.asarray(v, jnp.float32) for k, v in x.items()}
  softplus_ = options == "all"
  y, h = selective_scan(j["u"], j["delta"], j["A"], j["B"], j["C"], j["D"], z=j["z"],
                        delta_bias=j["delta_bias"], delta_softplus=softplus_, h0=j["h0"],
                        return_state=True, chunk_size=chunk_size, impl="xla")
  y_ref, h_ref = loop_selective_scan(**x, delta_softplus=softplus_)
  assert y.dtype == jnp.float32 and h.dtype == jnp.float32 and h.shape == h_ref.shape
  np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(h), h_ref, rtol=1e-4, atol=1e-5)


def test_chunked_equals_unchunked():
  rng = np.random.default_rng(7)
  x = to_jnp(make_inputs(rng, seq_len=50, groups=2))
  def run(cs):
    return selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], z=x["z"],
                          delta_bias=x["delta_bias"], delta_softplus=True, h0=x["h0"],
                          return_state=True, chunk_size=cs)
  y_full, h_full = run(64)
  y_ch, h_ch = run(16)
  np.testing.assert_allclose(y_ch, y_full, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(h_ch, h_full, rtol=1e-5, atol=1e-6)


def test_gradients_of_all_inputs_match_lax_scan_float64():
  rng = np.random.default_rng(8)
  names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0")
  with jax.enable_x64(True):
    x = to_jnp(make_inputs(rng, seq_len=11, groups=2), jnp.float64)
    w = jnp.asarray(rng.standard_normal((2, 11, 6)))
    w_h = jnp.asarray(rng.standard_normal((2, 6, 4)))

    def ours(*args):
      kw = dict(zip(names, args))
      y, h = selective_scan(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"],
                            z=kw["z"], delta_bias=kw["delta_bias"], delta_softplus=True,
                            h0=kw["h0"], return_state=True, chunk_size=4)
      return jnp.sum(w * y) + jnp.sum(w_h * h)

    def ref(*args):
      y, h = lax_scan_ref(*args)
      return jnp.sum(w * y) + jnp.sum(w_h * h)

    args = tuple(x[k] for k in names)
    argnums = tuple(range(len(names)))
    g = jax.jit(jax.grad(ours, argnums))(*args)
    g_ref = jax.jit(jax.grad(ref, argnums))(*args)
    for name, a, b in zip(names, g, g_ref):
      assert a.shape == b.shape, name
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-10,
                                 err_msg=name)


def test_bfloat16_inputs():
  rng = np.random.default_rng(9)
  x = make_inputs(rng, seq_len=16)
  xb = to_jnp(x, jnp.bfloat16)
  y = selective_scan(xb["u"], xb["delta"], xb["A"], xb["B"], xb["C"], xb["D"], z=xb["z"],
                     delta_bias=xb["delta_bias"], delta_softplus=True, chunk_size=8)
  assert y.dtype == jnp.bfloat16
  xr = {k: np.asarray(v, np.float32) for k, v in xb.items()}  # the rounded inputs
  xr["h0"] = None
  y_ref, _ = loop_selective_scan(**xr, delta_softplus=True)
  np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, rtol=2e-2, atol=2e-2)


def _bad(**changes):
  x = {k: jnp.zeros(s) for k, s in dict(u=(2, 8, 6), delta=(2, 8, 6), A=(6, 4), B=(2, 8, 4),
                                         C=(2, 8, 4)).items()}
  kw = {}
  for k, v in changes.items():
    if k in x:
      x[k] = jnp.zeros(v)
    elif isinstance(v, tuple):
      kw[k] = jnp.zeros(v)
    else:
      kw[k] = v
  return lambda: selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], **kw)


@pytest.mark.parametrize("changes,match", [
    (dict(u=(8, 6), delta=(8, 6)), "u must be"),
    (dict(delta=(2, 8, 5)), "delta must"),
    (dict(A=(5, 4)), "A must be"),
    (dict(B=(2, 8, 3)), "B must be"),
    (dict(C=(2, 7, 4)), "C must be"),
    (dict(B=(2, 8, 4, 4)), "groups"),          # 6 % 4 != 0
    (dict(D=(5,)), "D must be"),
    (dict(delta_bias=(6, 1)), "delta_bias must be"),
    (dict(z=(2, 8, 5)), "z must"),
    (dict(h0=(2, 6, 3)), "h0 must be"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(impl="cuda"), "impl"),
])
def test_bad_input_fails_clearly(changes, match):
  with pytest.raises(ValueError, match=match):
    _bad(**changes)()


def test_complex_A_and_pallas_rejected():
  with pytest.raises(ValueError, match="real"):
    selective_scan(jnp.zeros((1, 4, 2)), jnp.zeros((1, 4, 2)), jnp.zeros((2, 3), jnp.complex64),
                   jnp.zeros((1, 4, 3)), jnp.zeros((1, 4, 3)))
  with pytest.raises(ValueError, match="pallas"):  # N = 4 but 6 channels: not a multiple of 128
    _bad(impl="pallas")()
