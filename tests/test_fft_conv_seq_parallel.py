"""ssm.ops.fft_conv_seq_parallel: the LTI bank convolution with the length split over "seq".

Given fresh random inputs, when the distributed FFT (and the all-gather path) runs on a seq
axis of 2, 3, 4 or 8 devices or on (data 2, seq 4) with the batch split, then it equals
`fft_conv_bank_xla` -- causal and bidirectional, lk == l and lk < l, an odd batch per
device -- in float64 to ~1e-10 (values, and gradients wrt u and both kernels; one case also
against a direct float64 sum) and in float32 within float32 rounding; its compiled program
moves the spectrum by all-to-alls and never all-gathers u; an S4D mixer built with
seq_mesh equals the plain one (outputs, input and parameter gradients); the trainer's model
builder gives the LTI mixers the mesh; bad inputs fail in one line.

The checks need 8 devices: CPU devices faked by XLA_FLAGS, which must be set before JAX
starts its backend. As in tests/test_seq_parallel.py, `test_on_eight_devices` runs this
module again in a subprocess with 8 devices, where the checks run and the driver skips;
here the checks skip (the path choice, a pure function, runs in both).
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ssm.ops.fft_conv import fft_conv_bank_xla
from ssm.ops import fft_conv_seq_parallel as fsp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = "SSMLAB_FFT_CONV_SEQ_CHILD"


def test_on_eight_devices(tmp_path):
  if os.environ.get(CHILD):
    pytest.skip("this is the 8-device run")
  env = dict(os.environ, **{CHILD: "1", "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8"})
  env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                      + env.get("XLA_FLAGS", "")).strip()
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env.pop("PYTEST_XDIST_WORKER", None)
  proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "0", "-p", "no:cacheprovider",
                         f"--basetemp={tmp_path}", "-q", "-rs", __file__], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
  summary = proc.stdout.strip().splitlines()[-1]   # "<n> passed, 1 skipped in ..."
  assert re.search(r"^\d+ passed, 1 skipped in ", summary), proc.stdout[-3000:]


@pytest.fixture(scope="module")
def meshes():
  if not os.environ.get(CHILD) or jax.device_count() != 8:
    pytest.skip("runs in the 8-device subprocess (test_on_eight_devices)")
  devices = np.array(jax.devices())
  return {"seq8": Mesh(devices, ("seq",)), "seq4": Mesh(devices[:4], ("seq",)),
          "seq2": Mesh(devices[:2], ("seq",)), "seq3": Mesh(devices[:3], ("seq",)),
          "data2_seq4": Mesh(devices.reshape(2, 4), ("data", "seq"))}


# -- helpers -----------------------------------------------------------------------------------

def assert_close(got, want, rtol):
  """Equal within rtol of the array's largest magnitude."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  np.testing.assert_allclose(got, want, rtol=0, atol=rtol * max(np.abs(want).max(), 1e-30))


def inputs(rng, b, l, h, c, lk, bidirectional, dtype):
  u = jnp.asarray(rng.standard_normal((b, l, h)), dtype)
  kc = jnp.asarray(rng.standard_normal((c, h, lk)) / np.sqrt(lk), dtype)
  ka = jnp.asarray(rng.standard_normal((c, h, lk)) / np.sqrt(lk), dtype) if bidirectional else None
  w = jnp.asarray(rng.standard_normal((b, l, c, h)), dtype)      # the output's cotangent
  return u, kc, ka, w


def value_and_grads(op, u, kc, ka, w):
  """op(u, kc, ka) and the gradients of sum(w * op) wrt u, kc (and ka), in one jit."""
  args = (u, kc) if ka is None else (u, kc, ka)

  def run(w, *args):
    y, vjp = jax.vjp(lambda *a: op(*a) if ka is not None else op(*a, None), *args)
    return y, vjp(w)
  return jax.jit(run)(w, *args)


def direct_sum(u, kc, ka):
  """y[b, t, i, h] = sum_s kc[i, h, s] u[b, t - s, h] + ka[i, h, s] u[b, t + s, h], float64."""
  u, kc = np.asarray(u, np.float64), np.asarray(kc, np.float64)
  b, l, h = u.shape
  y = np.zeros((b, l, kc.shape[0], h))
  for s in range(kc.shape[2]):
    y[:, s:] += u[:, :l - s, None, :] * kc[None, None, :, :, s]
    if ka is not None:
      y[:, :l - s] += u[:, s:, None, :] * np.asarray(ka, np.float64)[None, None, :, :, s]
  return y


# -- against the bank ------------------------------------------------------------------------------

# (mesh, batch, length, h, c, lk, bidirectional, batch_axes): seq 8 (4 tokens a device: one
# frequency a slice), 4 and 2; seq 3 (an odd axis: the chunk of 24 is no multiple of the
# slice's 16 frequencies, the fold's other branch); (data 2, seq 4) with 3 sequences per
# device (odd: a zero sequence completes the pair).
F64_CASES = [
    ("seq8", 3, 32, 4, 1, 32, False, None),
    ("seq4", 2, 128, 4, 2, 40, True, None),
    ("seq2", 1, 64, 5, 1, 64, True, None),
    ("seq3", 2, 72, 3, 1, 72, True, None),
    ("data2_seq4", 6, 64, 4, 1, 23, True, "data"),
]


@pytest.mark.parametrize("case", F64_CASES, ids=[c[0] + ("_bidir" if c[6] else "_causal")
                                                 for c in F64_CASES])
def test_float64_values_and_gradients_match_the_bank(meshes, case):
  name, b, l, h, c, lk, bidirectional, batch_axes = case
  mesh = meshes[name]
  with jax.enable_x64(True):
    rng = np.random.default_rng(F64_CASES.index(case) + 1)
    u, kc, ka, w = inputs(rng, b, l, h, c, lk, bidirectional, jnp.float64)
    u_split = jax.device_put(u, NamedSharding(mesh, P(batch_axes, "seq")))
    got = value_and_grads(lambda u, kc, ka: fsp.fft_conv_bank_seq_parallel(
        u, kc, ka, mesh=mesh, batch_axes=batch_axes), u_split, kc, ka, w)
    want = value_and_grads(lambda u, kc, ka: fft_conv_bank_xla(u, kc, ka, method="irfft"),
                           u, kc, ka, w)
    assert got[0].dtype == jnp.float64 and got[0].shape == (b, l, c, h)
    assert_close(got[0], want[0], 1e-10)
    assert len(got[1]) == (3 if bidirectional else 2)
    for g, v in zip(got[1], want[1]):
      assert_close(g, v, 1e-10)
    if name == "seq8":
      assert_close(got[0], direct_sum(u, kc, ka), 1e-10)


def test_float32_within_rounding(meshes):
  """float32 on seq 8, causal, lk < l: values and gradients within float32 rounding."""
  rng = np.random.default_rng(21)
  u, kc, ka, w = inputs(rng, 2, 256, 8, 1, 100, False, jnp.float32)
  mesh = meshes["seq8"]
  got = value_and_grads(lambda u, kc, ka: fsp.fft_conv_bank_seq_parallel(u, kc, ka, mesh=mesh),
                        u, kc, ka, w)
  want = value_and_grads(fft_conv_bank_xla, u, kc, ka, w)
  assert got[0].dtype == jnp.float32
  assert_close(got[0], want[0], 2e-6)
  for g, v in zip(got[1], want[1]):
    assert g.dtype == jnp.float32
    assert_close(g, v, 2e-6)


def test_gather_path_matches_the_bank(meshes):
  """The all-gather alternative (the mixer's seq_conv="gather"), float32, (data 2, seq 4)."""
  rng = np.random.default_rng(22)
  u, kc, ka, w = inputs(rng, 4, 64, 4, 1, 64, True, jnp.float32)
  mesh = meshes["data2_seq4"]
  got = value_and_grads(lambda u, kc, ka: fsp.fft_conv_bank_seq_gather(u, kc, ka, mesh=mesh),
                        u, kc, ka, w)
  want = value_and_grads(fft_conv_bank_xla, u, kc, ka, w)
  for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert_close(g, v, 2e-6)


# -- the compiled program ------------------------------------------------------------------------

def test_compiled_program_moves_the_spectrum_by_all_to_all(meshes):
  """Forward: all-to-alls (the two of the transform) and no all-gather; forward and backward:
  still no all-gather (the kernels' cotangents are all-reduced). The gather path's program
  does hold one (the check can see it)."""
  mesh = meshes["data2_seq4"]
  rng = np.random.default_rng(23)
  u, kc, ka, w = inputs(rng, 4, 64, 4, 1, 64, True, jnp.float32)
  op = lambda u, kc, ka: fsp.fft_conv_bank_seq_parallel(u, kc, ka, mesh=mesh)  # noqa: E731
  forward = jax.jit(op).lower(u, kc, ka).compile().as_text()
  assert "all-to-all" in forward
  assert "all-gather" not in forward

  def both(w, u, kc, ka):
    y, vjp = jax.vjp(op, u, kc, ka)
    return y, vjp(w)
  assert "all-gather" not in jax.jit(both).lower(w, u, kc, ka).compile().as_text()
  gather = jax.jit(lambda u, kc, ka: fsp.fft_conv_bank_seq_gather(u, kc, ka, mesh=mesh))
  assert "all-gather" in gather.lower(u, kc, ka).compile().as_text()


# -- the mixer -------------------------------------------------------------------------------

@pytest.mark.parametrize("seq_conv,bidirectional", [("fft", False), ("gather", True)])
def test_s4d_mixer_with_seq_mesh_matches_the_plain_one(meshes, seq_conv, bidirectional):
  """An S4D mixer built with seq_mesh (same parameters) on a (data, seq)-split input: the
  output and the gradients wrt the input and every parameter equal the plain mixer's; with
  the distributed FFT its compiled step holds no all-gather at all (the layer's tail too)."""
  from flax import nnx
  import models
  mesh = meshes["data2_seq4"]
  x = jnp.asarray(np.random.default_rng(24).standard_normal((4, 64, 8)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(25).standard_normal(x.shape), jnp.float32)

  def run(mixer, x, no_all_gather=False):
    graphdef, params, rest = nnx.split(mixer, nnx.Param, ...)

    def loss(params, x):
      y = nnx.merge(graphdef, params, rest)(x)
      return jnp.sum(w * y), y
    step = jax.jit(jax.grad(loss, (0, 1), has_aux=True)).lower(params, x).compile()
    if no_all_gather:
      assert "all-gather" not in step.as_text()
    return step(params, x)

  kw = dict(d_state=4, bidirectional=bidirectional, impl="xla")
  plain = models.build_mixer("s4d", 8, rngs=nnx.Rngs(0), **kw)
  split = models.build_mixer("s4d", 8, rngs=nnx.Rngs(0), seq_mesh=mesh, seq_conv=seq_conv, **kw)
  assert split.seq_mesh is mesh and split.seq_conv == seq_conv
  got = run(split, jax.device_put(x, NamedSharding(mesh, P("data", "seq"))),
            no_all_gather=seq_conv == "fft")
  want = run(plain, x)
  leaves_got, leaves_want = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(leaves_got) == len(leaves_want) > 3
  for g, v in zip(leaves_got, leaves_want):
    assert_close(g, v, 2e-5)


def test_model_builder_gives_the_lti_mixers_the_mesh(meshes):
  """build_model(..., seq_mesh=mesh), as the trainer calls it: every S4D layer gets the mesh
  and no block all-gathers around it."""
  from flax import nnx
  import models
  from data.task import TaskSpec
  task = TaskSpec("toy_lm", "lm", "tokens", 64, 11, vocab_size=11)
  mesh = meshes["data2_seq4"]
  model = models.build_model(dict(name="s4d", d_model=8, num_layers=2, mixer=dict(d_state=4)),
                             task, rngs=nnx.Rngs(0), seq_mesh=mesh)
  for block in model.backbone.blocks:
    assert block.mixer.seq_mesh is mesh and block.gather_mesh is None


# -- the path "auto" takes (no devices needed) ----------------------------------------------------

def test_auto_takes_the_fft_where_it_moves_no_more_bytes():
  from ssm.lti_mixer import seq_conv_path
  def auto(n, c=1, chunk=64, impl="xla"):
    return seq_conv_path("auto", impl, n=n, channels=c, chunk=chunk)

  assert [auto(n) for n in (1, 2, 4, 8)] == ["gather", "gather", "fft", "fft"]
  assert auto(4, c=2) == "gather" and auto(8, c=2) == "fft"      # 2 (1 + c) <= P
  assert auto(8, chunk=2) == "gather"                             # 4 frequencies, 8 slices
  assert auto(8, impl="pallas") == "gather"
  assert seq_conv_path("fft", "xla", n=2, channels=1, chunk=64) == "fft"
  local = 1000.0
  assert fsp.seq_conv_bytes("fft", local, 8) == 0.5 * fsp.seq_conv_bytes("gather", local, 8)
  assert fsp.seq_conv_bytes("fft", local, 4) == fsp.seq_conv_bytes("gather", local, 4)


# -- errors at the boundary ------------------------------------------------------------------------

def test_bad_inputs_raise_one_line_errors(meshes):
  from flax import nnx
  import models
  rng = np.random.default_rng(26)
  u, kc, _, _ = inputs(rng, 2, 64, 4, 1, 64, False, jnp.float32)
  seq8, data_seq = meshes["seq8"], meshes["data2_seq4"]
  op = fsp.fft_conv_bank_seq_parallel
  cases = [
      (lambda: op(u[:, :60], kc[..., :60], mesh=seq8),
       "length 60 is not divisible by the 8 devices of mesh axis 'seq'"),
      (lambda: op(u[:, :8], kc[..., :8], mesh=seq8),
       "a chunk of 1 tokens per device of mesh axis 'seq' is too short for the decomposition"),
      (lambda: op(u[0], kc, mesh=seq8), "u (b, l, h) and kernels (c, h, lk) expected"),
      (lambda: op(u, kc[:, :3], mesh=seq8), "u (b, l, h) and kernels (c, h, lk) expected"),
      (lambda: op(u[:, :32], kc, mesh=seq8), "kernel length 64 must be in [1, 32]"),
      (lambda: op(u, kc, kc[..., :10], mesh=seq8), "anti-causal kernels (1, 4, 10) must match"),
      (lambda: op(u, kc, mesh=seq8, seq_axis="time"), "the mesh has no axis 'time'"),
      (lambda: op(u[:1], kc, mesh=data_seq), "batch 1 is not divisible by the 2 devices"),
      (lambda: op(u, kc, mesh=None), "mesh must be a jax.sharding.Mesh"),
      (lambda: fsp.fft_conv_bank_seq_gather(u[:, :60], kc[..., :60], mesh=seq8),
       "fft_conv_bank_seq_gather: length 60 is not divisible"),
      (lambda: models.build_mixer("s4d", 4, seq_mesh=seq8, seq_conv="ring", rngs=nnx.Rngs(0)),
       "seq_conv must be one of ('auto', 'fft', 'gather'), got 'ring'"),
      (lambda: models.build_mixer("s4d", 4, seq_mesh=seq8, seq_conv="fft", impl="pallas",
                                  rngs=nnx.Rngs(0)), "seq_conv='fft'"),
      (lambda: models.build_mixer("s4d", 4, seq_mesh=Mesh(np.array(jax.devices()), ("data",)),
                                  rngs=nnx.Rngs(0)), "seq_mesh has no axis 'seq'"),
  ]
  for fn, match in cases:
    with pytest.raises(ValueError, match=re.escape(match)) as e:
      fn()
    assert "\n" not in str(e.value)
  with pytest.raises(TypeError, match="u must be a real floating-point array"):
    op(u.astype(jnp.int32), kc, mesh=seq8)
