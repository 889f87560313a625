"""ssm.ops.seq_parallel: every recurrent primitive with its length split over a mesh axis
"seq" equals the unsharded op: outputs, final states and gradients wrt every float input,
with h0, with packed documents (a boundary exactly at a chunk start among them), on a
("seq",) and a ("data", "seq") mesh; and the errors at the boundary.

The checks need 8 devices: CPU devices faked by XLA_FLAGS, which must be set before JAX
starts its backend, and this pytest process has one device (setting the flag here would
give every other module of this worker 8). So, as tests/test_train.py does,
`test_on_eight_devices` runs this module again in a subprocess with 8 devices, where the
checks run and the driver skips; here the checks skip.
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from ssm import ops
from ssm.ops import seq_parallel as sp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = "SSMLAB_SEQ_PARALLEL_CHILD"
B, L = 2, 64


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
  # Every check ran there (only the driver skipped): "<n> passed, 1 skipped in ...".
  summary = proc.stdout.strip().splitlines()[-1]
  assert re.search(r"^\d+ passed, 1 skipped in ", summary), proc.stdout[-3000:]


@pytest.fixture(scope="module")
def meshes():
  """{"seq": 8 devices on "seq", "data_seq": (data=2, seq=4)}."""
  if not os.environ.get(CHILD) or jax.device_count() != 8:
    pytest.skip("runs in the 8-device subprocess (test_on_eight_devices)")
  devices = np.array(jax.devices())
  return {"seq": Mesh(devices, ("seq",)), "data_seq": Mesh(devices.reshape(2, 4), ("data", "seq"))}


# -- helpers ---------------------------------------------------------------------------------

def assert_close(got, want, rtol=2e-5):
  """Equal within float32 noise, relative to the array's scale."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(np.abs(want).max(), 1.0))


def loss(out):
  """A scalar that weights every output element differently (y and the final state)."""
  y, state = out
  w = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
  return jnp.sum(w * y) + jnp.sum(jnp.sin(state))


def check_op(sharded, unsharded, args, *, grads=True, rtol=2e-5):
  """sharded(*args) == unsharded(*args) (y and final state), and their gradients wrt every
  argument (all floats)."""
  got, want = jax.jit(sharded)(*args), jax.jit(unsharded)(*args)
  assert_close(got[0], want[0], rtol)
  assert_close(got[1], want[1], rtol)
  if grads:
    argnums = tuple(range(len(args)))
    g_got = jax.jit(jax.grad(lambda *a: loss(sharded(*a)), argnums))(*args)
    g_want = jax.jit(jax.grad(lambda *a: loss(unsharded(*a)), argnums))(*args)
    for i, (g, w) in enumerate(zip(g_got, g_want)):
      assert np.all(np.isfinite(np.asarray(g))), i
      assert_close(g, w, 10 * rtol)


def normal(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def packed_ids(rng, chunk):
  """(B, L) int32 runs of random lengths; row 0 also starts a run exactly at the chunk
  starts 1 and 2 (its previous chunk ending inside another run), row 1 has a run that
  crosses chunk boundaries."""
  ids = np.cumsum(rng.random((B, L)) < 0.08, axis=1)
  ids[0, chunk:] += 10
  ids[0, 2 * chunk:] += 10
  ids[1, chunk - 3: 2 * chunk + 5] = 100  # one run over the chunk 1 boundaries
  ids[1, 2 * chunk + 5:] = 101 + ids[1, 2 * chunk + 5:]
  return jnp.asarray(ids, jnp.int32)


# -- linear_scan -----------------------------------------------------------------------------

@pytest.mark.parametrize("reverse", [False, True])
def test_linear_scan(meshes, reverse):
  rng = np.random.default_rng(1 + reverse)
  a = jnp.asarray(rng.uniform(-1.0, 1.0, (B, L, 8)), jnp.float32)  # negative decays too
  b, h0 = normal(rng, B, L, 8), normal(rng, B, 8)
  kw = dict(reverse=reverse, return_state=True, impl="xla")
  check_op(lambda a, b, h0: sp.linear_scan_seq_parallel(a, b, h0, mesh=meshes["data_seq"], **kw),
           lambda a, b, h0: ops.linear_scan(a, b, h0, **kw), (a, b, h0))


def test_linear_scan_pallas_interpret(meshes):
  """The kernel (interpreted) inside shard_map, values and gradients (its custom VJP):
  8 devices of 8 steps each."""
  rng = np.random.default_rng(3)
  a = jnp.asarray(rng.uniform(0.5, 1.0, (1, L, 128)), jnp.float32)
  b, h0 = normal(rng, 1, L, 128), normal(rng, 1, 128)
  check_op(lambda a, b, h0: sp.linear_scan_seq_parallel(a, b, h0, mesh=meshes["seq"],
                                                        return_state=True, impl="pallas"),
           lambda a, b, h0: ops.linear_scan(a, b, h0, return_state=True, impl="xla"),
           (a, b, h0))


def test_selective_scan_pallas_interpret(meshes):
  rng = np.random.default_rng(14)
  u, delta = normal(rng, 1, L, 128), normal(rng, 1, L, 128)
  A, Bm, Cm = -jnp.exp(normal(rng, 128, 4)), normal(rng, 1, L, 4), normal(rng, 1, L, 4)
  kw = dict(delta_softplus=True, h0=normal(rng, 1, 128, 4), return_state=True)
  got = sp.selective_scan_seq_parallel(u, delta, A, Bm, Cm, mesh=meshes["seq"], impl="pallas",
                                       **kw)
  want = ops.selective_scan(u, delta, A, Bm, Cm, impl="xla", **kw)
  assert_close(got[0], want[0])
  assert_close(got[1], want[1])


# -- selective_scan ----------------------------------------------------------------------------

def test_selective_scan(meshes):
  """Every option at once: groups, D, z, delta_bias + softplus, h0; 8 steps per device."""
  rng = np.random.default_rng(4)
  d, n = 8, 4
  args = (normal(rng, B, L, d), normal(rng, B, L, d), -jnp.exp(normal(rng, d, n)),
          normal(rng, B, L, 2, n), normal(rng, B, L, 2, n), normal(rng, d),
          normal(rng, B, L, d), normal(rng, d), normal(rng, B, d, n))

  def call(op, **extra):
    def f(u, delta, A, Bm, Cm, D, z, bias, h0):
      return op(u, delta, A, Bm, Cm, D, z=z, delta_bias=bias, delta_softplus=True, h0=h0,
                return_state=True, chunk_size=4, impl="xla", **extra)
    return f

  check_op(call(sp.selective_scan_seq_parallel, mesh=meshes["seq"]),
           call(ops.selective_scan), args)


def test_selective_scan_data_seq_plain(meshes):
  """(data=2, seq=4), no D/z/h0, ungrouped B and C, no softplus."""
  rng = np.random.default_rng(5)
  u, delta = normal(rng, B, L, 8), jnp.abs(normal(rng, B, L, 8))
  A, Bm, Cm = -jnp.exp(normal(rng, 8, 4)), normal(rng, B, L, 4), normal(rng, B, L, 4)
  got = sp.selective_scan_seq_parallel(u, delta, A, Bm, Cm, return_state=True, impl="xla",
                                       mesh=meshes["data_seq"])
  want = ops.selective_scan(u, delta, A, Bm, Cm, return_state=True, impl="xla")
  assert_close(got[0], want[0])
  assert_close(got[1], want[1])


# -- ssd -----------------------------------------------------------------------------------------

def ssd_args(rng, h=4, p=3, g=2, n=5):
  return (normal(rng, B, L, h, p), normal(rng, B, L, h) - 1.0, -jnp.exp(normal(rng, h)),
          normal(rng, B, L, g, n), normal(rng, B, L, g, n), normal(rng, h),
          normal(rng, B, h, p, n), normal(rng, h))


def ssd_call(op, segment_ids=None, **extra):
  def f(x, dt, A, Bm, Cm, D, h0, dt_bias):
    return op(x, dt, A, Bm, Cm, D=D, h0=h0, dt_bias=dt_bias, dt_softplus=True,
              segment_ids=segment_ids, return_state=True, chunk_size=8, impl="xla", **extra)
  return f


def test_ssd_packed_documents(meshes):
  """(data=2, seq=4): 16 tokens per device in 2 SSD chunks; runs that start at chunk starts."""
  rng = np.random.default_rng(6)
  ids = packed_ids(rng, L // 4)
  check_op(ssd_call(sp.ssd_seq_parallel, ids, mesh=meshes["data_seq"]),
           ssd_call(ops.ssd, ids), ssd_args(rng))


def test_ssd_one_sequence(meshes):
  rng = np.random.default_rng(7)
  args = ssd_args(rng)
  got = jax.jit(ssd_call(sp.ssd_seq_parallel, mesh=meshes["seq"]))(*args)
  want = jax.jit(ssd_call(ops.ssd))(*args)
  assert_close(got[0], want[0])
  assert_close(got[1], want[1])


# -- lightning_attention ----------------------------------------------------------------------------

def lightning_args(rng, h=2, dk=4, dv=3):
  return (normal(rng, B, L, h, dk), normal(rng, B, L, h, dk), normal(rng, B, L, h, dv),
          -jnp.exp(normal(rng, h)) * 0.2, normal(rng, B, h, dk, dv))


def lightning_call(op, segment_ids=None, **extra):
  def f(q, k, v, log_decay, h0):
    return op(q, k, v, log_decay, h0=h0, segment_ids=segment_ids, return_state=True,
              chunk_size=8, impl="xla", **extra)
  return f


def test_lightning_packed_documents(meshes):
  rng = np.random.default_rng(8)
  ids = packed_ids(rng, L // 4)
  check_op(lightning_call(sp.lightning_attention_seq_parallel, ids, mesh=meshes["data_seq"]),
           lightning_call(ops.lightning_attention, ids), lightning_args(rng))


def test_lightning(meshes):
  rng = np.random.default_rng(9)
  check_op(lightning_call(sp.lightning_attention_seq_parallel, mesh=meshes["seq"]),
           lightning_call(ops.lightning_attention), lightning_args(rng))


def test_lightning_without_decay(meshes):
  rng = np.random.default_rng(10)
  q, k, v, _, h0 = lightning_args(rng)
  kw = dict(return_state=True, impl="xla", chunk_size=8)
  got = jax.jit(lambda q, k, v, h0: sp.lightning_attention_seq_parallel(
      q, k, v, h0=h0, mesh=meshes["data_seq"], **kw))(q, k, v, h0)
  want = jax.jit(lambda q, k, v, h0: ops.lightning_attention(q, k, v, h0=h0, **kw))(q, k, v, h0)
  assert_close(got[0], want[0])
  assert_close(got[1], want[1])


def test_fft_conv_under_a_sequence_sharded_input(meshes):
  """The LTI path has no seq-parallel variant: GSPMD all-gathers the length around the FFT
  (module docstring); the result is still the unsharded one."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  rng = np.random.default_rng(15)
  u, k = normal(rng, B, L, 8), normal(rng, 8, L)
  f = jax.jit(lambda u, k: ops.fft_conv(u, k, impl="xla"))
  u_sharded = jax.device_put(u, NamedSharding(meshes["data_seq"], P("data", "seq")))
  assert_close(f(u_sharded, k), f(u, k))


# -- errors at the boundary -------------------------------------------------------------------

def test_bad_inputs_raise_one_line_errors(meshes):
  rng = np.random.default_rng(11)
  a, b = normal(rng, B, 60, 8), normal(rng, B, 60, 8)
  cases = [
      (lambda: sp.linear_scan_seq_parallel(a, b, mesh=meshes["seq"]),
       "length 60 is not divisible by the 8 devices of mesh axis 'seq'"),
      (lambda: sp.linear_scan_seq_parallel(a[:, :32], b[:, :32], mesh=meshes["seq"],
                                           seq_axis="time"),
       "the mesh has no axis 'time'"),
      (lambda: sp.linear_scan_seq_parallel(a[:1, :32], b[:1, :32], mesh=meshes["data_seq"]),
       "batch 1 is not divisible by the 2 devices of mesh axes ('data',)"),
      (lambda: sp.ssd_seq_parallel(*ssd_args(rng)[:5], mesh=meshes["seq"], batch_axes="data"),
       "batch axis 'data' is not a mesh axis"),
      (lambda: sp.lightning_attention_seq_parallel(*lightning_args(rng)[:3], mesh=None),
       "mesh must be a jax.sharding.Mesh"),
      (lambda: sp.selective_scan_seq_parallel(a, b, -jnp.ones((8, 4)), normal(rng, B, 60, 4),
                                              normal(rng, B, 60, 4), mesh=meshes["seq"]),
       "selective_scan_seq_parallel: length 60 is not divisible by the 8 devices"),
  ]
  for fn, match in cases:
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")) as e:
      fn()
    assert "\n" not in str(e.value)
  # The op's own checks still apply first (a wrong h0 shape).
  with pytest.raises(ValueError, match="h0 must be"):
    sp.linear_scan_seq_parallel(a[:, :32], b[:, :32], jnp.zeros((B, 3)), mesh=meshes["seq"])


# -- the mixers' option ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mamba", "mamba2", "lightning", "linear_attention"])
def test_mixer_seq_mesh_matches(meshes, kind):
  """A mixer built with seq_mesh= (same parameters) gives the plain mixer's output, with
  packed documents where the mixer takes them, on a (data, seq)-sharded input."""
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P
  from ssm.lightning import Lightning
  from ssm.linear_attention import LinearAttention
  from ssm.mamba import Mamba
  from ssm.mamba2 import Mamba2
  cls, kw = {"mamba": (Mamba, dict(d_state=4)),
             "mamba2": (Mamba2, dict(d_state=8, headdim=8, chunk_size=8)),
             "lightning": (Lightning, dict(num_heads=2, chunk_size=8)),
             "linear_attention": (LinearAttention, dict(num_heads=2, chunk_size=8))}[kind]
  mesh = meshes["data_seq"]
  plain = cls(16, impl="xla", rngs=nnx.Rngs(0), **kw)
  sharded = cls(16, impl="xla", seq_mesh=mesh, rngs=nnx.Rngs(0), **kw)
  x = normal(np.random.default_rng(12), B, L, 16)
  ids = packed_ids(np.random.default_rng(13), L // 4) if cls.takes_segments else None
  run = nnx.jit(lambda m, x: m(x, segment_ids=ids))
  assert_close(run(sharded, jax.device_put(x, NamedSharding(mesh, P("data", "seq")))),
               run(plain, x))


def test_mixer_seq_mesh_errors(meshes):
  from flax import nnx
  from ssm.mamba2 import Mamba2
  with pytest.raises(ValueError, match="seq_mesh has no axis 'seq'"):
    Mamba2(16, d_state=8, headdim=8, seq_mesh=Mesh(np.array(jax.devices()), ("data",)),
           rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="does not apply with memory_caching"):
    Mamba2(16, d_state=8, headdim=8, seq_mesh=meshes["seq"], memory_caching=dict(segment_size=8),
           rngs=nnx.Rngs(0))


# -- the depthwise convolution's halo ------------------------------------------------------------

@pytest.mark.parametrize("packed", [False, True])
def test_depthwise_conv_halo(meshes, packed):
  """Values and gradients (x, w, bias) equal the unsplit convolution on seq 8 (8 tokens per
  device, window 4) and on (data 4, seq 2), with runs that start at chunk starts."""
  from ssm.mamba import causal_depthwise_conv
  rng = np.random.default_rng(16)
  x, w, bias = normal(rng, B, L, 6), normal(rng, 4, 6), normal(rng, 6)
  ids = packed_ids(rng, L // 4) if packed else None
  mesh22 = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "seq"))
  for mesh in (meshes["seq"], mesh22):
    f = lambda x, w, bias: sp.depthwise_conv_seq_parallel(causal_depthwise_conv, x, w, bias,
                                                          ids, mesh=mesh)
    g = lambda x, w, bias: causal_depthwise_conv(x, w, bias, ids)
    check_op(lambda *a: (f(*a), jnp.zeros(())), lambda *a: (g(*a), jnp.zeros(())),
             (x, w, bias))


def test_mixer_gradients_on_a_seq_axis_of_two(meshes):
  """Mamba-2 with packed documents on (data 4, seq 2): the input and parameter gradients
  equal the plain mixer's, under jit on a sharded input as in the trainer. (GSPMD's own partitioning of the convolution got the input
  gradient wrong here; the explicit halo does not.)"""
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P
  from ssm.mamba2 import Mamba2
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "seq"))
  rng = np.random.default_rng(17)
  x = normal(rng, 8, 32, 16)
  ids = np.zeros((8, 32), np.int32)
  ids[0, 7:], ids[5, 22:], ids[7, 31:] = 1, 1, 1
  w = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)

  def grads(model, x, ids):
    graphdef, state = nnx.split(model)
    f = lambda state, x: jnp.sum(w * nnx.merge(graphdef, state)(x, segment_ids=ids))
    return jax.jit(jax.grad(f, (0, 1)))(state, x)

  kw = dict(d_state=4, headdim=8, impl="xla")
  want = grads(Mamba2(16, rngs=nnx.Rngs(0), **kw), x, jnp.asarray(ids))
  split = NamedSharding(mesh, P("data", "seq"))
  got = grads(Mamba2(16, seq_mesh=mesh, rngs=nnx.Rngs(0), **kw), jax.device_put(x, split),
              jax.device_put(jnp.asarray(ids), split))
  for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert_close(g, v, 1e-4)
