"""S4D: initialisations, the Vandermonde kernel against explicit matrix powers (float64),
gradients against finite differences, parallel vs recurrent, bidirectional, bad input."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import scipy.linalg
from flax import nnx
from jax.test_util import check_grads

from models import build_mixer
from ssm import s4d
from ssm.params import SSMParam
from _lti_testing import reference_mixer
from _testing import max_rel, run_steps

try:
  import ssm.hippo  # noqa: F401  (written by another helper; needed for init="legs")
  HAVE_HIPPO = True
except ImportError:
  HAVE_HIPPO = False
needs_hippo = pytest.mark.skipif(not HAVE_HIPPO, reason="ssm.hippo not available yet")
INITS = ["lin", "inv", "real", pytest.param("legs", marks=needs_hippo)]


def legs_normal_eigs(n_state):
  """Eigenvalues of A + P P^T for HiPPO-LegS and |V* B|, one of each conjugate pair,
  sorted by |Im|: computed here from the HiPPO formulas, independently of ssm.hippo."""
  q = np.sqrt(2 * np.arange(n_state) + 1.0)
  a = -np.tril(np.outer(q, q), -1) - np.diag(np.arange(n_state) + 1.0)
  p = np.sqrt(np.arange(n_state) + 0.5)
  normal = a + np.outer(p, p)
  np.testing.assert_allclose(normal + normal.T, -np.eye(n_state), atol=1e-12)  # -1/2 I + skew
  w, v = np.linalg.eigh(-1j * (normal - normal.T) / 2)  # skew part = i * Hermitian
  lam = -0.5 + 1j * w
  b = np.abs(v.conj().T @ q)
  keep = w > 0
  order = np.argsort(w[keep])
  return lam[keep][order], b[keep][order]


# -- initialisations -----------------------------------------------------------

@pytest.mark.parametrize("init", INITS)
def test_init_matches_formulas(init):
  n_state = 16
  a, b = s4d.init_diag(init, n_state)
  n = np.arange(n_state // 2)
  assert a.shape == b.shape == (n_state // 2,)
  if init == "lin":
    np.testing.assert_allclose(a, -0.5 + 1j * np.pi * n)
  elif init == "inv":
    np.testing.assert_allclose(a, -0.5 + 1j * n_state / np.pi * (n_state / (2 * n + 1) - 1))
  elif init == "real":
    np.testing.assert_allclose(a, -(n + 1.0))
  if init != "legs":
    np.testing.assert_allclose(b, np.ones(n_state // 2))
  else:
    lam, b_abs = legs_normal_eigs(n_state)
    order = np.argsort(np.abs(a.imag))
    np.testing.assert_allclose(a.real, -0.5, atol=1e-8)
    np.testing.assert_allclose(np.abs(a.imag)[order], lam.imag, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(np.abs(b)[order], b_abs, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("init,real_transform", [("inv", "exp"), ("real", "relu"), ("lin", "relu")])
def test_module_parameters_reproduce_init(init, real_transform):
  k = s4d.S4DKernel(5, d_state=8, channels=2, init=init, real_transform=real_transform,
                    rngs=nnx.Rngs(0))
  a, b = s4d.init_diag(init, 8)
  np.testing.assert_allclose(k.eigenvalues(), np.broadcast_to(a, (5, 4)), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(k.B[...][..., 0] + 1j * k.B[...][..., 1], np.broadcast_to(b, (5, 4)))
  dt = np.exp(np.asarray(k.log_dt[...]))
  assert np.all((dt >= 1e-3 * (1 - 1e-6)) & (dt <= 1e-1 * (1 + 1e-6)))
  # Optimizer groups: A, B, dt are SSM parameters (own lr, no wd); C is an ordinary Param.
  for name in ("a_re", "a_im", "log_dt", "B"):
    assert isinstance(getattr(k, name), SSMParam), name
  assert isinstance(k.C, nnx.Param) and not isinstance(k.C, SSMParam)
  assert k.C[...].shape == (2, 5, 4, 2) and k.C[...].dtype == jnp.float32


# -- kernel: Vandermonde vs explicit powers ------------------------------------

def naive_kernel(a_hn, b_hn, c_chn, dt_h, seq_len, disc):
  """K[c, h, j] = C Ab^j Bb of the full 2n-dim system (modes and their conjugates),
  discretised as dense matrices (scipy expm / solve) and powered step by step."""
  c_out, h_dim, _ = c_chn.shape
  k = np.zeros((c_out, h_dim, seq_len))
  for h in range(h_dim):
    a = np.diag(np.concatenate([a_hn[h], a_hn[h].conj()]))
    bvec = np.concatenate([b_hn[h], b_hn[h].conj()])
    eye = np.eye(len(bvec))
    if disc == "zoh":
      ab = scipy.linalg.expm(dt_h[h] * a)
      bb = np.linalg.solve(a, (ab - eye) @ bvec)
    else:
      back = eye - dt_h[h] / 2 * a
      ab = np.linalg.solve(back, eye + dt_h[h] / 2 * a)
      bb = np.linalg.solve(back, dt_h[h] * bvec)
    for c in range(c_out):
      cvec = np.concatenate([c_chn[c, h], c_chn[c, h].conj()])
      v = bb
      for j in range(seq_len):
        k[c, h, j] = (cvec @ v).real
        v = ab @ v
  return k


@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
@pytest.mark.parametrize("init", INITS)
def test_vandermonde_kernel_matches_matrix_powers(init, disc):
  rng = np.random.default_rng(hash((init, disc)) % 2**32)
  n_state, h_dim, c_out, seq_len = 8, 3, 2, 40
  a, b = s4d.init_diag(init, n_state)
  a_hn = np.broadcast_to(a, (h_dim, n_state // 2))
  b_hn = np.broadcast_to(b, (h_dim, n_state // 2))
  c_chn = rng.standard_normal((c_out, h_dim, n_state // 2, 2)) @ np.array([1, 1j])
  dt_h = np.exp(rng.uniform(np.log(1e-3), np.log(2e-1), h_dim))
  with jax.enable_x64(True):
    k = s4d.s4d_kernel(jnp.asarray(s4d.real_param_from_re(a_hn.real, "exp")),
                       jnp.asarray(a_hn.imag), jnp.asarray(np.log(dt_h)), jnp.asarray(b_hn),
                       jnp.asarray(c_chn), seq_len, disc=disc)
    assert k.dtype == jnp.float64 and k.shape == (c_out, h_dim, seq_len)
    k = np.asarray(k)
  ref = naive_kernel(a_hn, b_hn, c_chn, dt_h, seq_len, disc)
  np.testing.assert_allclose(k, ref, rtol=1e-9, atol=1e-11 * np.abs(ref).max())


def _random_modes(rng, c_out, h_dim, n, dtype=np.complex128):
  """CB (c, h, n) and log Ab (h, n) = dt A with S4D-Lin eigenvalues and random step sizes."""
  a, _ = s4d.init_diag("lin", 2 * n)
  dt_h = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), h_dim))
  log_ab = dt_h[:, None] * a[None]
  cb = rng.standard_normal((c_out, h_dim, n)) + 1j * rng.standard_normal((c_out, h_dim, n))
  return cb.astype(dtype), log_ab.astype(dtype)


# Lengths around the block: 1, shorter than one block, not a multiple, a multiple, an
# explicit block of 1 (every power from the coarse table) and one block covering all.
@pytest.mark.parametrize("seq_len,block", [(1, None), (7, None), (40, None), (64, None),
                                           (23, 1), (23, 32)])
def test_blocked_vandermonde_equals_plain_product(seq_len, block):
  rng = np.random.default_rng(seq_len * 31 + (block or 0))
  cb, log_ab = _random_modes(rng, 2, 3, 4)
  ones = np.ones_like(log_ab)
  w = rng.standard_normal((2, 3, seq_len))
  with jax.enable_x64(True):
    cb, log_ab, ones, w = (jnp.asarray(v) for v in (cb, log_ab, ones, w))
    fast = lambda cb, la: s4d.vandermonde_kernel(cb, ones, la, seq_len, block=block)
    plain = lambda cb, la: s4d.vandermonde_kernel_reference(cb, ones, la, seq_len)
    k, ref = fast(cb, log_ab), plain(cb, log_ab)
    assert k.dtype == jnp.float64 and k.shape == (2, 3, seq_len)
    np.testing.assert_allclose(k, ref, rtol=1e-12, atol=1e-13 * np.abs(ref).max())
    loss = lambda f: lambda cb, la: jnp.sum(w * f(cb, la))
    g = jax.grad(loss(fast), argnums=(0, 1))(cb, log_ab)
    g_ref = jax.grad(loss(plain), argnums=(0, 1))(cb, log_ab)
    for a, b in zip(g, g_ref):
      np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12 * np.abs(b).max())
    check_grads(fast, (cb, log_ab), order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)


def test_blocked_vandermonde_bad_block():
  cb, log_ab = (jnp.asarray(v) for v in _random_modes(np.random.default_rng(0), 1, 2, 2,
                                                       np.complex64))
  with pytest.raises(ValueError, match="block must be a positive int"):
    s4d.vandermonde_kernel(cb, jnp.ones_like(log_ab), log_ab, 8, block=0)


def test_blocked_vandermonde_float32_as_accurate_as_plain_product():
  rng = np.random.default_rng(5)
  cb, log_ab = _random_modes(rng, 2, 4, 16)
  ones = np.ones_like(log_ab)
  with jax.enable_x64(True):
    exact = np.asarray(s4d.vandermonde_kernel_reference(
        *(jnp.asarray(v) for v in (cb, ones, log_ab)), 1000))
  f32 = [jnp.asarray(v, jnp.complex64) for v in (cb, ones, log_ab)]
  k = s4d.vandermonde_kernel(*f32, 1000)
  assert k.dtype == jnp.float32
  err = np.abs(np.asarray(k, np.float64) - exact).max() / np.abs(exact).max()
  err_plain = np.abs(np.asarray(s4d.vandermonde_kernel_reference(*f32, 1000), np.float64)
                     - exact).max() / np.abs(exact).max()
  assert err < max(2 * err_plain, 1e-6), (err, err_plain)


def test_blocked_vandermonde_forms_no_length_by_state_array():
  """Forward and backward: no intermediate as large as the (h, n, L) Vandermonde matrix."""
  c_out, h_dim, n, seq_len = 1, 4, 8, 1024
  cb, log_ab = (jnp.asarray(v) for v in
                 _random_modes(np.random.default_rng(0), c_out, h_dim, n, np.complex64))
  ones = jnp.ones(log_ab.shape, log_ab.dtype)
  loss = lambda cb, la: jnp.sum(s4d.vandermonde_kernel(cb, ones, la, seq_len) ** 2)
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(cb, log_ab).jaxpr
  sizes = [int(np.prod(v.aval.shape)) for e in jaxpr.eqns for v in e.outvars]
  assert max(sizes) < h_dim * n * seq_len // 4, max(sizes)


def test_kernel_any_length_and_prefix_consistent():
  k = s4d.S4DKernel(4, d_state=8, channels=2, init="inv", rngs=nnx.Rngs(3))
  long = k(300)
  assert long.shape == (2, 4, 300) and long.dtype == jnp.float32
  np.testing.assert_allclose(k(7), long[..., :7], rtol=1e-5, atol=1e-6)
  assert k(1).shape == (2, 4, 1)


def test_module_kernel_same_on_both_generators(monkeypatch):
  k = s4d.S4DKernel(4, d_state=8, channels=2, init="inv", rngs=nnx.Rngs(3))
  blocked = k(300)
  monkeypatch.setattr(s4d, "VANDERMONDE", "plain")
  np.testing.assert_allclose(k(300), blocked, rtol=1e-5, atol=1e-6 * np.abs(blocked).max())
  monkeypatch.setattr(s4d, "VANDERMONDE", "fast")
  with pytest.raises(ValueError, match="VANDERMONDE must be one of"):
    k(300)


@pytest.mark.parametrize("disc,real_transform", [("zoh", "exp"), ("bilinear", "relu")])
def test_kernel_gradients_match_finite_differences(disc, real_transform):
  rng = np.random.default_rng(7)
  h_dim, n, c_out, seq_len = 2, 3, 2, 12
  with jax.enable_x64(True):
    a_re = jnp.asarray(rng.uniform(-1.0, 0.5, (h_dim, n)) + (1.0 if real_transform == "relu" else 0))
    a_im = jnp.asarray(rng.uniform(0, 3, (h_dim, n)))
    log_dt = jnp.asarray(np.log(rng.uniform(0.05, 0.3, h_dim)))
    b_pairs = jnp.asarray(rng.standard_normal((h_dim, n, 2)))
    c_pairs = jnp.asarray(rng.standard_normal((c_out, h_dim, n, 2)))
    w = jnp.asarray(rng.standard_normal((c_out, h_dim, seq_len)))

    def loss(a_re, a_im, log_dt, b_pairs, c_pairs):
      cplx = lambda p: p[..., 0] + 1j * p[..., 1]
      k = s4d.s4d_kernel(a_re, a_im, log_dt, cplx(b_pairs), cplx(c_pairs), seq_len, disc=disc,
                         real_transform=real_transform)
      return jnp.sum(w * k)

    check_grads(jax.jit(loss), (a_re, a_im, log_dt, b_pairs, c_pairs), order=1, modes=("rev",),
                atol=1e-6, rtol=1e-6)


# -- the mixer: parallel vs recurrent, bidirectional ----------------------------

@pytest.mark.parametrize("opts", [
    dict(init="lin", disc="zoh", channels=1),
    dict(init="inv", disc="bilinear", channels=2, real_transform="relu"),
    dict(init="real", disc="zoh", channels=1, postact="linear", activation="silu"),
])
def test_parallel_equals_recurrent(opts):
  mixer = build_mixer("s4d", 4, rngs=nnx.Rngs(0), d_state=8, dt_min=0.01, dt_max=0.2, **opts)
  x = jax.random.normal(jax.random.key(1), (2, 48, 4), jnp.float32)
  y = mixer(x)
  assert y.shape == x.shape
  np.testing.assert_array_less(max_rel(run_steps(mixer, x), y), 1e-4)
  np.testing.assert_array_less(max_rel(y, reference_mixer(mixer, x)), 1e-5)


def test_bidirectional_equals_sum_of_directions():
  mixer = build_mixer("s4d", 4, rngs=nnx.Rngs(2), d_state=8, init="lin", bidirectional=True,
                      channels=2)
  assert mixer.kernel.channels == 4 and mixer.kernel.C[...].shape[0] == 4
  x = jax.random.normal(jax.random.key(3), (2, 32, 4), jnp.float32)
  np.testing.assert_array_less(max_rel(mixer(x), reference_mixer(mixer, x)), 1e-5)


def test_grad_through_mixer_is_finite():
  mixer = build_mixer("s4d", 4, rngs=nnx.Rngs(0), d_state=8, init="lin")
  x = jax.random.normal(jax.random.key(1), (2, 16, 4), jnp.float32)
  graphdef, params, rest = nnx.split(mixer, nnx.Param, ...)
  loss = lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x) ** 2)
  grads = jax.jit(jax.grad(loss))(params)
  leaves = jax.tree.leaves(grads)
  assert len(leaves) == 8  # a_re, a_im, log_dt, B, C, D, out_proj kernel and bias
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert float(jnp.abs(grads["kernel"]["a_im"][...]).sum()) > 0


# -- bad input --------------------------------------------------------------

@pytest.mark.parametrize("opts,match", [
    (dict(init="legt"), "init"),
    (dict(disc="foh"), "disc"),
    (dict(real_transform="softplus"), "real_transform"),
    (dict(d_state=7), "even"),
    (dict(d_state=0), "even"),
    (dict(dt_min=0.2, dt_max=0.1), "dt_min"),
    (dict(channels=0), "channels"),
    (dict(activation="swish"), "activation"),
    (dict(impl="cuda"), "impl"),
])
def test_bad_options(opts, match):
  with pytest.raises(ValueError, match=match):
    build_mixer("s4d", 4, rngs=nnx.Rngs(0), **{"init": "lin", **opts})


def test_bad_inputs():
  mixer = build_mixer("s4d", 4, rngs=nnx.Rngs(0), d_state=8, init="lin")
  with pytest.raises(ValueError, match="3 dims"):
    mixer(jnp.zeros((16, 4)))
  with pytest.raises(ValueError, match="state must have shape"):
    mixer.step(jnp.zeros((2, 4, 8), jnp.complex64), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="state must have shape"):
    mixer.step(mixer.init_state(3), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="unknown options"):
    build_mixer("s4d", 4, rngs=nnx.Rngs(0), l_max=16)
  with pytest.raises(ValueError, match="seq_len"):
    mixer.kernel(0)
