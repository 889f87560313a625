"""The Monarch-FFT Pallas kernel (interpret mode on the CPU) against a direct float64
convolution: outputs and the gradients for u, k, gate and D, every size class."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from ssm.ops import fft_conv
from ssm.ops import fft_conv_pallas as fcp
from _testing import rel


def direct(u, k, gate=None, circular=False, D=None):
  """float64 y[b, t, h] = gate * (sum_s k[h, s] u[b, t - s, h] + D[h] u[b, t, h])
  (t - s mod L if circular)."""
  u, k = np.asarray(u, np.float64), np.asarray(k, np.float64)
  y = np.zeros_like(u)
  for s in range(k.shape[1]):
    shifted = np.roll(u, s, axis=1)
    if not circular:
      shifted[:, :s] = 0
    y += k[:, s][None, None] * shifted
  if D is not None:
    y += np.asarray(D, np.float64) * u
  return y if gate is None else y * np.asarray(gate, np.float64)


def direct_grads(u, k, w, gate=None, circular=False, D=None):
  """Gradients of sum(w * y) in float64: (du, dk, dgate, dD)."""
  u, k, w = (np.asarray(a, np.float64) for a in (u, k, w))
  pre_gate = direct(u, k, circular=circular, D=D)
  dgate = None if gate is None else w * pre_gate
  dy = w if gate is None else w * np.asarray(gate, np.float64)
  du = np.zeros_like(u) if D is None else np.asarray(D, np.float64) * dy
  dk = np.zeros(k.shape)
  for s in range(k.shape[1]):
    # y[t] += k[s] u[t - s]  =>  du[t - s] += k[s] dy[t],  dk[s] += sum dy[t] u[t - s]
    back = np.roll(dy, -s, axis=1)
    shifted = np.roll(u, s, axis=1)
    if not circular:
      back[:, u.shape[1] - s:] = 0
      shifted[:, :s] = 0
    du += k[:, s][None, None] * back
    dk[:, s] = np.sum(dy * shifted, axis=(0, 1))
  dD = None if D is None else np.sum(dy * u, axis=(0, 1))
  return du, dk, dgate, dD


def run(u, k, w, gate=None, circular=False, D=None):
  """Forward and the gradients of sum(w * y) through fft_conv(impl="pallas") for u, k
  and whichever of gate, D are given (in that order)."""
  extra = {name: x for name, x in (("gate", gate), ("D", D)) if x is not None}
  names = list(extra)

  def f(u, k, *rest):
    return fft_conv(u, k, impl="pallas", circular=circular, **dict(zip(names, rest)))
  y, vjp = jax.vjp(f, u, k, *extra.values())
  return y, vjp(w.astype(y.dtype))


def inputs(seed, b, seq_len, h, k_len, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  u = jnp.asarray(rng.standard_normal((b, seq_len, h)), dtype)
  k = jnp.asarray(rng.standard_normal((h, k_len)) / np.sqrt(k_len), jnp.float32)
  w = jnp.asarray(rng.standard_normal((b, seq_len, h)), jnp.float32)
  return u, k, w


def test_plan_covers_every_size_class():
  # (p outer, q in the kernel, rows, cols, sequences per tile)
  assert fcp.plan(256) == (1, 256, 16, 16, 4)
  assert fcp.plan(512) == (1, 512, 32, 16, 2)
  assert fcp.plan(2048) == (1, 2048, 64, 32, 1)
  assert fcp.plan(4096) == (1, 4096, 64, 64, 1)
  assert fcp.plan(8192) == (1, 8192, 64, 64, 1)        # 3 stages: 2 slabs of 64 x 64
  assert fcp.plan(16384) == (1, 16384, 64, 64, 1)      # 3 stages: 4 slabs
  assert fcp.plan(131072) == (8, 16384, 64, 64, 1)     # XLA outer factor 8
  assert fcp.plan(131072, fcp.SLAB) == (32, 4096, 64, 64, 1)     # a 2-stage split
  assert fcp.fft_size(100, False) == 256 and fcp.fft_size(3000, False) == 8192
  with pytest.raises(ValueError, match="power of two"):
    fcp.plan(3000)


# Tolerances keyed by input dtype: bf16x3 products (float32 inputs) give ~5e-6 relative;
# one bf16 product per stage (bfloat16 inputs, bf16 output) ~1e-2.
TOL = {jnp.dtype(jnp.float32): 3e-5, jnp.dtype(jnp.bfloat16): 3e-2}


def check_all(u, k, w, gate=None, circular=False, D=None):
  y, grads = run(u, k, w, gate=gate, circular=circular, D=D)
  assert y.shape == u.shape and y.dtype == u.dtype
  tol = TOL[jnp.dtype(u.dtype)]
  assert rel(y, direct(u, k, gate, circular, D)) < tol
  du_ref, dk_ref, dgate_ref, dD_ref = direct_grads(u, k, w, gate, circular, D)
  refs = [du_ref, dk_ref] + [r for r in (dgate_ref, dD_ref) if r is not None]
  assert len(grads) == len(refs)
  for name, g, r in zip(("du", "dk", "dgate", "dD"), grads, refs):
    assert rel(g, r) < tol, name


# Causal, one test per code path: stacked tiles (n = 256, odd batch, channels padded to
# the 4-per-tile stack), one tile per sequence (n = 2048), and the 3-stage kernel
# (n = 8192: 2 slabs, the zero-padded half never loaded).
@pytest.mark.parametrize("b,seq_len,h,k_len", [(3, 100, 5, 33), (2, 1024, 1, 1000),
                                               (2, 3000, 1, 300)])
def test_causal_forward_and_gradients(b, seq_len, h, k_len):
  check_all(*inputs(seq_len, b, seq_len, h, k_len))


def test_halves_at_fft_size_16384(monkeypatch):
  """SSM_FFT_CONV_HALVES_FROM=16384: causal n = 16384 as two 8192-point halves (2 slabs
  each, Gauss's product at f32) gives the same convolution and gradients."""
  monkeypatch.setattr(fcp, "HALVES_FROM", 16384)
  assert fcp.causal_split(16384, False) and not fcp.causal_split(8192, False)
  check_all(*inputs(13, 2, 5000, 1, 700))


@pytest.mark.parametrize("seq_len", [200, 3000])   # two-stage and 3-stage kernels
def test_skip_and_gate_forward_and_gradients(seq_len):
  u, k, w = inputs(7, 2, seq_len, 3, 50)
  rng = np.random.default_rng(8)
  gate = jnp.asarray(rng.standard_normal(u.shape), jnp.float32)
  D = jnp.asarray(rng.standard_normal(u.shape[2]), jnp.float32)
  check_all(u, k, w, gate=gate, D=D)


def test_circular_forward_and_gradients():
  u, k, w = inputs(9, 2, 512, 2, 40)
  rng = np.random.default_rng(10)
  gate = jnp.asarray(rng.standard_normal(u.shape), jnp.float32)
  D = jnp.asarray(rng.standard_normal(u.shape[2]), jnp.float32)
  check_all(u, k, w, circular=True)
  check_all(u, k, w, gate=gate, circular=True, D=D)


@pytest.mark.slow
@pytest.mark.parametrize("seq_len,k_len,circular", [
    (5000, 5000, False),     # n 16384: 4 slabs, 2 loaded
    (16384, 700, True),      # n 16384 circular: 4 slabs loaded
    (10000, 1000, False),    # causal n 32768: two 16384-point halves (even, odd bins)
    (32768, 300, True),      # circular n 32768: XLA outer factor 2 + the 3-stage kernel
])
def test_three_stage_sizes(seq_len, k_len, circular):
  check_all(*inputs(seq_len, 1, seq_len, 1, k_len), circular=circular)


# two-stage, 3-stage (2 slabs), 3-stage (4 slabs, Gauss's product at bf16 only)
@pytest.mark.parametrize("seq_len", [100, 3000, pytest.param(5000, marks=pytest.mark.slow)])
def test_bfloat16_input(seq_len):
  u, k, w = inputs(11, 2, seq_len, 2, 100, dtype=jnp.bfloat16)
  rng = np.random.default_rng(12)
  D = jnp.asarray(rng.standard_normal(u.shape[2]), jnp.float32)
  check_all(u, k, w, D=D)


def test_unsupported_shapes():
  u = jnp.zeros((1, 300, 2))
  k = jnp.zeros((2, 4))
  with pytest.raises(ValueError, match="circular"):
    fft_conv(u, k, impl="pallas", circular=True)
  with pytest.raises(ValueError, match="needs FFT size 262144"):
    fft_conv(jnp.zeros((1, 70000, 1)), jnp.zeros((1, 4)), impl="pallas")
  with pytest.raises(ValueError, match="needs FFT size 262144"):
    fft_conv(jnp.zeros((1, 262144, 1)), jnp.zeros((1, 4)), impl="pallas", circular=True)
  # "auto" falls back to XLA where the kernel cannot take the call
  y = fft_conv(u + 1.0, k + 1.0, impl="auto")
  np.testing.assert_allclose(y, direct(u + 1.0, k + 1.0), rtol=1e-5)
  with pytest.raises(ValueError, match="gate"):
    fft_conv(u, k, gate=jnp.zeros((1, 300, 3)))
  with pytest.raises(ValueError, match="D must be"):
    fft_conv(u, k, D=jnp.zeros((3,)), impl="pallas")
  with pytest.raises(TypeError, match="D must be"):
    fft_conv(u, k, D=jnp.zeros((2,), jnp.int32))
  # "auto" off the GPU is the XLA path, circular included
  y = fft_conv(u + 1.0, k + 1.0, impl="auto", circular=True)
  np.testing.assert_allclose(y, direct(u + 1.0, k + 1.0, circular=True), rtol=1e-5)


def test_bidirectional_mixer_conv_is_one_circular_kernel_call():
  """lti_conv(impl="pallas") runs both directions of a bidirectional layer as one circular
  convolution with the two-sided kernel; it equals the XLA bank, values and gradients."""
  from ssm.lti_mixer import lti_conv  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((2, 100, 4)), jnp.float32)
  kern = jnp.asarray(rng.standard_normal((2, 4, 100)) / 10, jnp.float32)  # (2c, h, l), c = 1
  w = jnp.asarray(rng.standard_normal((2, 100, 1, 4)), jnp.float32)
  loss = lambda impl: lambda x, k: jnp.sum(w * lti_conv(x, k, bidirectional=True, impl=impl))
  y, y_ref = (lti_conv(x, kern, bidirectional=True, impl=i) for i in ("pallas", "xla"))
  assert y.shape == (2, 100, 1, 4)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4 * float(jnp.abs(y_ref).max()))
  g = jax.grad(loss("pallas"), argnums=(0, 1))(x, kern)
  g_ref = jax.grad(loss("xla"), argnums=(0, 1))(x, kern)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("n,m", [(32768, 16384), (32768, 32768), (131072, 65536)])
def test_outer_step_is_the_first_fft_factor(n, m):
  """The XLA side of order 3 (no kernel): _to_rows' outer DFT and twiddles followed by a
  q-point FFT of each row is the n-point FFT of the zero-padded input, and _from_rows
  inverts it (float64 NumPy reference)."""
  crel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)  # complex-aware
  p, q = fcp.plan(n)[:2]
  rng = np.random.default_rng(n + m)
  x = rng.standard_normal((2, 1, 2, m))                          # planes (re/im, P, H, m)
  xr, xi = fcp._to_rows(jnp.asarray(x[0], jnp.float32), jnp.asarray(x[1], jnp.float32), n, 2)
  rows = (np.asarray(xr, np.float64) + 1j * np.asarray(xi, np.float64)).reshape(1, 2, p, q)
  spec = np.fft.fft(rows, axis=-1)                               # [kp, kq] = X[kp + p kq]
  ref = np.fft.fft(x[0] + 1j * x[1], n=n, axis=-1)
  got = np.swapaxes(spec, -1, -2).reshape(1, 2, n)
  assert crel(got, ref) < 1e-5
  back = np.fft.ifft(spec, axis=-1).reshape(1, -1, 64, q // 64)
  length = m // 2 + 3
  yr, yi = fcp._from_rows(jnp.asarray(back.real, jnp.float32), jnp.asarray(back.imag, jnp.float32),
                          n, 2, length)
  assert yr.shape == (1, 2, length)
  assert crel(np.asarray(yr) + 1j * np.asarray(yi), (x[0] + 1j * x[1])[..., :length]) < 1e-5


H100 = "NVIDIA H100 80GB HBM3"


@pytest.mark.parametrize("kind,seq_len,circular,dtype,kernel", [
    (H100, 300, False, jnp.float32, False),     # n 1024: not in the table (slower there)
    (H100, 1000, False, jnp.float32, True),     # n 2048: measured faster
    (H100, 2048, False, jnp.float32, True),     # n 4096
    (H100, 4096, True, jnp.float32, True),      # circular n 4096: the causal kernel
    ("G", 8192, True, jnp.float32, False),      # circular past 4096 needs its own entry
    ("G", 4096, False, jnp.float32, True),      # causal n 8192
    (H100, 3000, False, jnp.float32, False),    # n 8192: not measured faster
    (H100, 1000, False, jnp.bfloat16, False),   # bf16 never measured on this device
    (H100, 300, True, jnp.float32, False),      # circular needs a power of two: unsupported
    ("NVIDIA H999", 1000, False, jnp.float32, False),   # an unmeasured device: XLA
])
def test_auto_takes_the_kernel_only_where_it_measured_faster(monkeypatch, kind, seq_len,
                                                             circular, dtype, kernel):
  """On a Hopper GPU (simulated) fft_conv(impl="auto") calls the kernel only at the
  (device kind, dtype, FFT size) of ssm/ops/fft_conv_auto.json and the XLA path elsewhere;
  off Hopper always XLA."""
  from ssm.ops import _impl
  calls = []
  monkeypatch.setattr(fcp, "fft_conv_pallas", lambda u, k, **kw: calls.append(kw) or u)
  monkeypatch.setattr(fcp, "_device_kind", lambda: kind)
  table = {**fcp.auto_table(), "G": {"float32": [8192, 16384]}}
  monkeypatch.setattr(fcp, "auto_table", lambda: table)
  u, k = jnp.ones((1, seq_len, 1), dtype), jnp.ones((1, 8))
  fft_conv(u, k, impl="auto", circular=circular)
  assert calls == []                                        # the CPU is not Hopper
  monkeypatch.setattr(_impl, "on_gpu", lambda: True)
  monkeypatch.setattr(_impl, "on_hopper", lambda: True)
  fft_conv(u, k, impl="auto", circular=circular)
  assert len(calls) == int(kernel)
  if kernel:
    assert calls[0]["circular"] == circular


def test_auto_table_is_well_formed():
  """Every entry of the measured table names dtypes and FFT sizes the kernel takes."""
  table = fcp.auto_table()
  assert table, "the table lists at least one measured device"
  for kind, entry in table.items():
    for dtype, sizes in entry.items():
      assert jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)), kind
      for n in sizes:
        fcp.plan(n)


def test_lti_conv_auto_keeps_the_bank_on_hopper(monkeypatch):
  """The mixers' "auto" stays on the XLA bank on Hopper too (measured no faster end to end,
  ssm/lti_mixer.py), even at the ListOps layer's size where fft_conv's "auto" would take
  the kernel; impl="pallas" calls it."""
  from ssm import lti_mixer
  from ssm.ops import _impl
  calls = []
  monkeypatch.setattr(fcp, "fft_conv_pallas", lambda u, k, **kw: calls.append(kw) or u)
  monkeypatch.setattr(_impl, "on_gpu", lambda: True)
  monkeypatch.setattr(_impl, "on_hopper", lambda: True)
  x, kern = jnp.ones((1, 2000, 2)), jnp.ones((2, 2, 2000))
  y = lti_mixer.lti_conv(x, kern, bidirectional=True, impl="auto")
  assert calls == [] and y.shape == (1, 2000, 1, 2)
  lti_mixer.lti_conv(x, kern, bidirectional=True, impl="pallas")
  assert len(calls) == 1 and calls[0]["circular"]


def test_benchmark_auto_table_takes_only_sizes_faster_both_ways():
  """benchmarks/fftconv.py --make-auto: a size enters the table only where the kernel beat
  jnp.fft forward and forward+backward on that device."""
  from benchmarks.fftconv import auto_from_rows
  row = lambda seq_len, impl, f, fb, dtype="float32": {
      "L": seq_len, "dtype": dtype, "impl": impl, "fwd ms": f, "fwd+bwd ms": fb, "device": "G"}
  rows = [row(1024, "pallas", 1.0, 2.0), row(1024, "xla", 1.5, 3.0),     # faster: n 2048
          row(2048, "pallas", 1.0, 4.0), row(2048, "xla", 1.5, 3.0),     # bwd slower
          row(4096, "pallas", 1.0, 2.0), row(4096, "torch.fft", 9.0, 9.0),   # no xla row
          row(1024, "pallas", 2.0, 2.0, "bfloat16"), row(1024, "xla", 1.0, 3.0, "bfloat16")]
  assert auto_from_rows(rows) == {"G": {"float32": [2048]}}


def test_benchmark_skips_the_kernel_where_the_check_failed_or_hung(tmp_path):
  """benchmarks/fftconv.py --skip-from: the sweep leaves out the kernel at an FFT size
  whose --check-classes case failed, was bad, or started and never ended."""
  import json
  from benchmarks.fftconv import read_status, skip_pallas
  path = tmp_path / "status.jsonl"
  lines = [(2048, "a", "started"), (2048, "a", "ok"), (8192, "b", "started"),
           (16384, "c", "started"), (16384, "c", "bad"), (16384, "d", "started"),
           (16384, "d", "ok")]
  path.write_text("".join(json.dumps({"n": n, "dtype": "float32", "case": c, "status": s}) + "\n"
                          for n, c, s in lines))
  status = read_status(str(path))
  assert not skip_pallas(status, 1024, "float32")          # n 2048 ok
  assert skip_pallas(status, 4096, "float32")              # n 8192 hung
  assert skip_pallas(status, 8192, "float32")              # n 16384: one case bad
  assert not skip_pallas(status, 256, "float32")           # never checked: run it
  assert not skip_pallas(status, 1024, "bfloat16")
