"""LSSL: Krylov kernel against explicit powers, parallel == recurrent, gradients, errors."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import scipy.linalg
from flax import nnx

from ssm import hippo, lssl
from ssm.lti_mixer import LTIMixer
from ssm.params import SSMParam
from _lti_testing import bidirectional_and_reference
from _testing import assert_steps_match


def naive_kernel(Ab, Bb, C, L):
  """K[c, h, j] = C[c, h] Ab[h]^j Bb[h] by explicit matrix powers (NumPy)."""
  c, h, _ = C.shape
  K = np.zeros((c, h, L), np.result_type(Ab, C))
  for i in range(h):
    for j in range(L):
      K[:, i, j] = C[:, i] @ np.linalg.matrix_power(Ab[i], j) @ Bb[i]
  return K


def test_krylov_matches_powers():
  rng = np.random.default_rng(0)
  Ab = rng.standard_normal((2, 4, 4)) / 3
  b = rng.standard_normal((2, 4))
  with jax.enable_x64(True):
    for L in (1, 8, 13):
      K = lssl.krylov(L, jnp.asarray(Ab), jnp.asarray(b))
      assert K.shape == (2, 4, L)
      ref = np.stack([np.einsum("hnm,hm->hn", np.linalg.matrix_power(Ab, j), b)
                      for j in range(L)], -1)
      np.testing.assert_allclose(K, ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("method", ["bilinear", "zoh"])
def test_kernel_matches_explicit_powers(method):
  rng = np.random.default_rng(1)
  A = rng.standard_normal((2, 4, 4)) - 2 * np.eye(4)
  B = rng.standard_normal((2, 4))
  C = rng.standard_normal((3, 2, 4))
  dt = np.array([0.05, 0.3])
  L = 11
  with jax.enable_x64(True):
    K = lssl.lssl_kernel(jnp.asarray(A), jnp.asarray(B), jnp.asarray(C), jnp.asarray(dt), L, method)
  if method == "zoh":
    Ab = np.stack([scipy.linalg.expm(dt[i] * A[i]) for i in range(2)])
    Bb = np.stack([np.linalg.solve(A[i], (Ab[i] - np.eye(4)) @ B[i]) for i in range(2)])
  else:
    inv = np.linalg.inv(np.eye(4) - dt[:, None, None] / 2 * A)
    Ab = inv @ (np.eye(4) + dt[:, None, None] / 2 * A)
    Bb = np.einsum("hnm,hm->hn", inv, dt[:, None] * B)
  np.testing.assert_allclose(K, naive_kernel(Ab, Bb, C, L), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("learn", lssl.LEARN)
def test_module_kernel_and_parameters(learn):
  kernel = lssl.LSSLKernel(3, d_state=6, channels=2, learn=learn, rngs=nnx.Rngs(0))
  dt = np.exp(np.asarray(kernel.log_dt[...]))
  assert np.all((dt >= 1e-3) & (dt <= 1e-1))
  assert isinstance(kernel.log_dt, SSMParam) and not isinstance(kernel.C, SSMParam)
  if learn == "none":
    assert not hasattr(kernel, "A")
  else:
    assert isinstance(kernel.A, SSMParam) and isinstance(kernel.B, SSMParam)
    assert kernel.A.shape == ((6, 6) if learn == "shared" else (3, 6, 6))
  A, B = hippo.transition("legs", 6)
  inv = np.linalg.inv(np.eye(6) - dt[:, None, None] / 2 * A)
  Ab = inv @ (np.eye(6) + dt[:, None, None] / 2 * A)
  Bb = np.einsum("hnm,m->hn", inv, B) * dt[:, None]
  K = kernel(9)
  assert K.shape == (2, 3, 9) and K.dtype == jnp.float32
  ref = naive_kernel(Ab, Bb, np.asarray(kernel.C[...], np.float64), 9)
  np.testing.assert_allclose(K, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_parallel_equals_recurrent():
  mixer = lssl.make_mixer(3, rngs=nnx.Rngs(1), d_state=8, channels=2, learn="per_feature",
                          dt_min=0.01, dt_max=0.5)
  assert isinstance(mixer, LTIMixer)
  x = jax.random.normal(jax.random.key(2), (2, 24, 3))
  assert_steps_match(mixer, x, tol=1e-4)


def test_bidirectional_is_sum_of_two_directions():
  mixer = lssl.make_mixer(3, rngs=nnx.Rngs(3), d_state=4, channels=2, bidirectional=True,
                          dt_min=0.05, dt_max=0.5)
  assert mixer.kernel.channels == 4
  y, ref = bidirectional_and_reference(mixer, jax.random.normal(jax.random.key(4), (2, 10, 3)))
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="bidirectional"):
    mixer.init_state(2)


def test_kernel_gradients_match_finite_differences():
  rng = np.random.default_rng(5)
  A0, B0 = hippo.transition("legs", 4)
  params = (A0, B0, rng.standard_normal((2, 3, 4)), np.log([0.02, 0.1, 0.3]))
  W = rng.standard_normal((2, 3, 7))
  with jax.enable_x64(True):
    def loss(A, B, C, log_dt):
      return jnp.sum(W * lssl.lssl_kernel(A, B, C, jnp.exp(log_dt), 7))
    f = jax.jit(loss)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*params)
    for _ in range(3):
      dirs = [rng.standard_normal(np.shape(p)) for p in params]
      eps = 1e-6
      plus = f(*[p + eps * d for p, d in zip(params, dirs)])
      minus = f(*[p - eps * d for p, d in zip(params, dirs)])
      fd = (plus - minus) / (2 * eps)
      an = sum(np.sum(np.asarray(g) * d) for g, d in zip(grads, dirs))
      np.testing.assert_allclose(an, fd, rtol=1e-6)


def test_bad_input_fails_clearly():
  rngs = nnx.Rngs(0)
  with pytest.raises(ValueError, match="valid measures"):
    lssl.LSSLKernel(2, d_state=4, measure="legx", rngs=rngs)
  with pytest.raises(ValueError, match="learn"):
    lssl.LSSLKernel(2, d_state=4, learn="yes", rngs=rngs)
  with pytest.raises(ValueError, match="dt_min"):
    lssl.LSSLKernel(2, d_state=4, dt_min=0.1, dt_max=0.01, rngs=rngs)
  kernel = lssl.LSSLKernel(2, d_state=4, l_max=8, rngs=rngs)
  with pytest.raises(ValueError, match="exceeds l_max=8"):
    kernel(9)
  good = kernel.init_state(3)
  with pytest.raises(ValueError, match=r"must have shape \(3, 2, 4\)"):
    kernel.step(good._replace(x=jnp.zeros((3, 2, 5))), jnp.zeros((3, 2)))
  with pytest.raises(ValueError, match="LSSLState"):
    kernel.step(jnp.zeros((3, 2, 4)), jnp.zeros((3, 2)))
  with pytest.raises(ValueError, match="u_t"):
    kernel.step(kernel.init_state(3), jnp.zeros((3, 5)))
