"""S4 (DPLR): Cauchy/Woodbury kernel against the dense system, parallel == recurrent, gradients."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from models.registry import build_mixer, mixer_factory, mixer_options
from ssm import hippo, s4
from ssm.lti_mixer import LTIMixer
from ssm.params import SSMParam
from _lti_testing import bidirectional_and_reference
from _testing import assert_steps_match


def bilinear_np(A, B, dt):
  """Ab = (I - dt/2 A)^-1 (I + dt/2 A), Bb = (I - dt/2 A)^-1 dt B; A (h, N, N), dt (h,)."""
  eye = np.eye(A.shape[-1])
  inv = np.linalg.inv(eye - dt[:, None, None] / 2 * A)
  return inv @ (eye + dt[:, None, None] / 2 * A), np.einsum("hnm,hm->hn", inv, dt[:, None] * B)


def naive_kernel(Ab, Bb, C, L):
  """K[c, h, j] = Re(C[c, h] Ab[h]^j Bb[h]) by explicit matrix powers."""
  return np.stack([np.einsum("chn,hnm,hm->ch", C, np.linalg.matrix_power(Ab, j), Bb).real
                   for j in range(L)], -1)


def random_dplr(rng, h, n, c, r):
  cn = lambda *s: rng.standard_normal(s) + 1j * rng.standard_normal(s)
  lam = -np.exp(rng.standard_normal((h, n))) - 1j * np.exp(rng.standard_normal((h, n)))
  dt = np.exp(rng.uniform(np.log(1e-2), np.log(0.5), h))
  return lam, cn(r, h, n), cn(h, n), cn(c, h, n), dt


def test_kernel_and_step_match_the_dense_system(rank=2, L=15):
  # Given a random DPLR system and C, when C~ = C (I - Ab^L), then the Cauchy/Woodbury kernel,
  # the O(N) step's impulse response and the recovered C all match the dense system (float64).
  # (Rank 1, the other Woodbury branch, and an even L: the next test.)
  rng = np.random.default_rng(rank)
  lam, P, B, C, dt = random_dplr(rng, h=2, n=3, c=2, r=rank)
  conj = lambda x: np.concatenate([x, x.conj()], -1)
  Ab, Bb = bilinear_np(hippo.dplr_dense(lam, P), conj(B), dt)
  C_t = conj(C) - np.einsum("chn,hnm->chm", conj(C), np.linalg.matrix_power(Ab, L))
  C_t = C_t[..., :3]
  ref = naive_kernel(Ab, Bb, conj(C), L)
  with jax.enable_x64(True):
    args = [jnp.asarray(a) for a in (lam, P, B, C_t, dt)]
    K = s4.s4_kernel(*args, L)
    params = s4.step_params(*args, L)
    x, ys = jnp.zeros((1, 2, 3), jnp.complex128), []
    for j in range(L):
      x, y = s4.s4_step(params, x, jnp.full((1, 2), 1.0 if j == 0 else 0.0))
      ys.append(y[0])
  assert K.shape == (2, 2, L) and K.dtype == jnp.float64
  np.testing.assert_allclose(K, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
  np.testing.assert_allclose(params.C, C, rtol=1e-10)
  np.testing.assert_allclose(np.stack(ys, -1), ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())


def test_nplr_init_is_exactly_the_hippo_system():
  # The DPLR half of HiPPO-LegS, with C = C_real V_full, has the kernel of the dense real
  # HiPPO system (A, B, C_real) discretised the same way.
  N, L = 8, 12
  rng = np.random.default_rng(7)
  lam, P, B, V = hippo.nplr("legs", N)
  c_real = rng.standard_normal((1, 1, N))
  dt = np.array([0.1])
  A_h, B_h = hippo.transition("legs", N)
  ref = naive_kernel(*bilinear_np(A_h[None], B_h[None], dt), c_real, L)
  C = c_real @ V  # first half of C_real V_full
  Ab, _ = bilinear_np(hippo.dplr_dense(lam[None], P[:, None]), np.concatenate([B, B.conj()])[None], dt)
  C_f = np.concatenate([C, C.conj()], -1)
  C_t = (C_f - C_f @ np.linalg.matrix_power(Ab, L))[..., :N // 2]
  with jax.enable_x64(True):
    K = s4.s4_kernel(jnp.asarray(lam[None]), jnp.asarray(P[:, None]), jnp.asarray(B[None]),
                     jnp.asarray(C_t), jnp.asarray(dt), L)
  np.testing.assert_allclose(K, ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max())


def test_module_parameters_and_truncation():
  kernel = s4.S4Kernel(3, d_state=8, channels=2, l_max=32, rngs=nnx.Rngs(0))
  for name in ("log_dt", "a_re", "a_im", "P", "B"):
    assert isinstance(getattr(kernel, name), SSMParam), name
  assert type(kernel.C) is nnx.Param and kernel.C.shape == (2, 3, 4, 2)
  assert kernel.P.shape == (1, 3, 4, 2) and kernel.B.shape == (3, 4, 2)
  np.testing.assert_allclose(np.exp(kernel.a_re[...]), 0.5, rtol=1e-6)  # LegS: Re Lambda = -1/2
  assert np.all(kernel.a_im[...] > 0)
  dt = np.exp(np.asarray(kernel.log_dt[...]))
  assert np.all((dt >= 1e-3) & (dt <= 1e-1))
  K32, K20 = kernel(32), kernel(20)
  assert K20.shape == (2, 3, 20) and K20.dtype == jnp.float32
  np.testing.assert_array_equal(K20, K32[..., :20])  # shorter sequences: first taps of l_max
  assert np.abs(K32).max() > 0


def test_parallel_equals_recurrent():
  mixer = s4.make_mixer(3, rngs=nnx.Rngs(1), d_state=8, channels=2, l_max=32, dt_min=0.01,
                        dt_max=0.3)
  assert isinstance(mixer, LTIMixer)
  x = jax.random.normal(jax.random.key(2), (2, 24, 3))
  assert_steps_match(mixer, x, tol=1e-4)


def test_bidirectional_is_sum_of_two_directions():
  mixer = s4.make_mixer(3, rngs=nnx.Rngs(3), d_state=4, channels=2, bidirectional=True, l_max=16)
  assert mixer.kernel.channels == 4
  y, ref = bidirectional_and_reference(mixer, jax.random.normal(jax.random.key(4), (2, 10, 3)))
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


def test_kernel_gradients_match_finite_differences():
  kernel = s4.S4Kernel(2, d_state=4, channels=2, l_max=8, rank=2, measure="legt",
                       rngs=nnx.Rngs(5))
  rng = np.random.default_rng(5)
  names = ("a_re", "a_im", "P", "B", "C", "log_dt")
  params = [np.asarray(getattr(kernel, k)[...], np.float64) for k in names]
  params[0] = params[0] + 0.5  # move off the clamp value of legt's Re Lambda = 0
  W = rng.standard_normal((2, 2, 8))
  with jax.enable_x64(True):
    def loss(*p):
      return jnp.sum(W * s4.s4_kernel(*s4.dplr_from_params(*p), 8))
    f = jax.jit(loss)
    grads = jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*params)
    for _ in range(3):
      dirs = [rng.standard_normal(p.shape) for p in params]
      eps = 1e-6
      fd = (f(*[p + eps * d for p, d in zip(params, dirs)])
            - f(*[p - eps * d for p, d in zip(params, dirs)])) / (2 * eps)
      an = sum(np.sum(np.asarray(g) * d) for g, d in zip(grads, dirs))
      np.testing.assert_allclose(an, fd, rtol=1e-6)


def test_registry_knows_the_options():
  assert {"measure", "rank", "l_max", "dt_min", "dt_max"} <= set(mixer_options("s4"))
  assert {"measure", "learn", "disc"} <= set(mixer_options("lssl"))
  assert mixer_factory("s4") is s4.make_mixer
  with pytest.raises(ValueError, match="unknown options"):
    build_mixer("s4", 4, rngs=nnx.Rngs(0), d_state=4, kernel_size=3)


def test_bad_input_fails_clearly():
  rngs = nnx.Rngs(0)
  with pytest.raises(ValueError, match="even"):
    s4.S4Kernel(2, d_state=5, rngs=rngs)
  with pytest.raises(ValueError, match="valid measures"):
    s4.S4Kernel(2, d_state=4, measure="legx", rngs=rngs)
  with pytest.raises(ValueError, match="rank >= 2"):
    s4.S4Kernel(2, d_state=4, measure="legt", rank=1, rngs=rngs)
  kernel = s4.S4Kernel(2, d_state=4, l_max=8, rngs=rngs)
  with pytest.raises(ValueError, match="exceeds l_max=8"):
    kernel(9)
  good = kernel.init_state(3)
  with pytest.raises(ValueError, match=r"\(3, 2, 2\)"):
    kernel.step(good._replace(x=jnp.zeros((3, 2, 4), jnp.complex64)), jnp.zeros((3, 2)))
  with pytest.raises(ValueError, match="complex"):
    kernel.step(good._replace(x=jnp.zeros((3, 2, 2), jnp.float32)), jnp.zeros((3, 2)))
  with pytest.raises(ValueError, match="S4State"):
    kernel.step(jnp.zeros((3, 2, 2), jnp.complex64), jnp.zeros((3, 2)))
  with pytest.raises(ValueError, match="u_t"):
    kernel.step(kernel.init_state(3), jnp.zeros((3,)))
