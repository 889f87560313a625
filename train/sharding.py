"""Device mesh, shardings of parameters and batches, multi-host setup.

One code path for 1 CPU, 1 GPU, N GPUs and N hosts:

- Mesh axes ("data", "fsdp", "seq") with sizes from config.train.mesh (-1 = the
  remaining devices; default all devices on "data"; "seq" may be left out: 1).
- Batches are split on their leading (batch) dimension over ("data", "fsdp"), so every
  group of `seq` devices gets batch_size / (data * fsdp) examples, and, when seq > 1, on
  their length dimension over "seq" (sequence parallelism, `batch_spec`): inputs, targets,
  mask and segment_ids of shape (b, l, ...) (retrieval's (b, 2, l, ...) on axis 2); arrays
  without a length (labels, weights) over the batch axes only. "seq" is the last mesh
  axis, so its devices are neighbours (one host, the fastest links).
- Parameters and optimizer moments are replicated, except arrays with at least
  config.train.fsdp_min_size elements, which are split over "fsdp" along their largest
  dimension divisible by the fsdp size (ZeRO-3 style: XLA all-gathers them for the
  forward pass and reduce-scatters their gradients). The rule depends only on shapes, so
  Adam's moments get the same sharding as their parameter.
- Multi-host: `maybe_initialize_distributed()` calls `jax.distributed.initialize()` when
  the environment describes a multi-process job (JAX_COORDINATOR_ADDRESS, or SLURM /
  Open MPI with more than one task, or SSMLAB_DISTRIBUTED=1); JAX then reads the cluster
  details from the same variables, and a job without a cluster manager gives
  JAX_NUM_PROCESSES and JAX_PROCESS_ID (on CPUs also JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo,
  for collectives across processes). Each host loads only its shard of the data
  (jax.process_index() of jax.process_count()) and `global_batch` assembles the global
  array with jax.make_array_from_process_local_data.
"""

import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "seq")
BATCH_AXES = ("data", "fsdp")
SEQ_AXIS = "seq"
OPTIONAL_AXES = {"seq": 1}  # an axis a config may leave out (configs written before it)


def _multiprocess_env() -> bool:
  env = os.environ
  if env.get("SSMLAB_DISTRIBUTED", "") == "1" or env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    try:
      if int(env.get(var, "1")) > 1:
        return True
    except ValueError:
      pass
  return False


def maybe_initialize_distributed() -> None:
  """Starts JAX's multi-process runtime when the environment asks for it (idempotent).

  Must run before anything touches the devices (the CLI calls it first thing).
  """
  if not _multiprocess_env() or jax.distributed.is_initialized():
    return
  env, kwargs = os.environ, {}
  # A hand-made job (several processes on one machine, or hosts without a cluster
  # manager) names itself with JAX_NUM_PROCESSES and JAX_PROCESS_ID beside
  # JAX_COORDINATOR_ADDRESS; SLURM and Open MPI jobs are detected by JAX itself.
  for var, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    if env.get(var):
      try:
        kwargs[key] = int(env[var])
      except ValueError:
        raise ValueError(f"{var} must be an integer, got {env[var]!r}") from None
  if env.get("JAX_COORDINATOR_ADDRESS"):
    kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
  jax.distributed.initialize(**kwargs)
  log.info("jax.distributed initialized: process %d of %d", jax.process_index(),
           jax.process_count())


def sync_processes(name: str) -> None:
  """A barrier across the processes of a multi-host job (nothing to wait for alone)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def from_process_0(value: int) -> int:
  """Process 0's `value` on every process (a decision one process takes for all)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def mesh_sizes(mesh_cfg) -> dict:
  """config.train.mesh as {axis: size} over every axis (a missing optional one: its default)."""
  return {a: int(mesh_cfg[a]) if a in mesh_cfg else OPTIONAL_AXES[a] for a in AXES}


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """(data, fsdp, seq) sizes from config.train.mesh; -1 takes what the others leave."""
  sizes = list(mesh_sizes(mesh_cfg).values())
  if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
    raise ValueError(f"config.train.mesh sizes must be positive or one -1, got "
                     f"{dict(zip(AXES, sizes))}")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise ValueError(f"config.train.mesh {dict(zip(AXES, sizes))}: {num_devices} devices "
                       f"are not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.train.mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} "
                     f"devices, but {num_devices} are available")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  seq = shape[AXES.index(SEQ_AXIS)]
  if jax.process_count() > 1 and jax.local_device_count() % seq:
    # Each host loads whole sequences of its batch rows: a seq group must lie in one host.
    raise ValueError(f"config.train.mesh.seq={seq} must divide the {jax.local_device_count()} "
                     f"devices of a host (each host loads whole sequences)")
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
                       devices=devices)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Leading dimension split over the batch axes, the rest replicated (over "seq" too)."""
  return NamedSharding(mesh, P(BATCH_AXES))


def seq_size(mesh) -> int:
  """The size of the mesh's "seq" axis (1 on a mesh without one)."""
  return dict(mesh.shape).get(SEQ_AXIS, 1)


def length_axis(kind: str) -> int:
  """The length dimension of a batch array of this task kind (retrieval: (b, 2, l, ...))."""
  return 2 if kind == "retrieval" else 1


def batch_spec(ndim: int, mesh, length: int | None = 1) -> P:
  """PartitionSpec of a batch array of rank ndim: batch axes on dim 0, and "seq" on dim
  `length` when the mesh splits the length (seq > 1) and the array has that dimension."""
  if length is None or seq_size(mesh) == 1 or ndim <= length:
    return P(BATCH_AXES)
  spec = [BATCH_AXES] + [None] * (ndim - 1)
  spec[length] = SEQ_AXIS
  return P(*spec)


def batch_shardings(batch: dict, mesh, length: int | None = 1) -> dict:
  """NamedSharding of every array of a batch dict (`batch_spec` by its rank)."""
  return {k: NamedSharding(mesh, batch_spec(np.ndim(v), mesh, length)) for k, v in batch.items()}


def constrain_batch(batch: dict, mesh, length: int | None = 1) -> dict:
  """The batch with its `batch_shardings` as sharding constraints (inside a jit)."""
  return {k: jax.lax.with_sharding_constraint(v, s)
          for (k, v), s in zip(batch.items(), batch_shardings(batch, mesh, length).values())}


def param_spec(shape, fsdp: int, min_size: int) -> P:
  """The PartitionSpec of an array of this shape (see the module docstring)."""
  if fsdp <= 1 or math.prod(shape) < min_size:
    return P()
  # Largest dimension divisible by fsdp; the later one on ties (usually the output dim).
  best = None
  for i, d in enumerate(shape):
    if d % fsdp == 0 and (best is None or d >= shape[best]):
      best = i
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = "fsdp"
  return P(*spec)


def state_shardings(tree, mesh, min_size: int):
  """NamedSharding for every array leaf of `tree` (arrays or ShapeDtypeStructs)."""
  fsdp = mesh.shape["fsdp"]

  def one(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) or not hasattr(x, "shape"):
      return replicated(mesh)
    return NamedSharding(mesh, param_spec(x.shape, fsdp, min_size))

  return jax.tree.map(one, tree)


def per_host_batch(global_batch: int, mesh, what: str = "config.train.batch_size") -> int:
  """Checks divisibility and returns the batch each host's loader must produce."""
  n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % n_shards:
    raise ValueError(f"{what}={global_batch} must be divisible by the {n_shards} devices "
                     f"of the data/fsdp mesh")
  if global_batch % jax.process_count():
    raise ValueError(f"{what}={global_batch} must be divisible by the "
                     f"{jax.process_count()} processes")
  return global_batch // jax.process_count()


def global_batch(local: dict, mesh, length: int | None = 1) -> dict:
  """Per-host NumPy batch -> global jax.Arrays split on the batch dimension and, when the
  mesh has seq > 1, on dimension `length` over "seq" (`batch_spec`; None: never)."""
  n = jax.process_count()

  def one(x):
    x = np.asarray(x)
    sharding = NamedSharding(mesh, batch_spec(x.ndim, mesh, length))
    return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * n,) + x.shape[1:])

  return {k: one(v) for k, v in local.items()}


def process_flags(value: int, mesh) -> jax.Array:
  """(mesh.size,) int32: this process's `value` on each of its devices' rows. A max
  over it inside a jitted step is the same on every process: a vote folded into the
  step, with no synchronisation of its own."""
  local = np.full((mesh.size // jax.process_count(),), value, np.int32)
  return global_batch({"flags": local}, mesh, None)["flags"]


def mesh_context(mesh):
  """Context manager that makes `mesh` the ambient mesh (jax.set_mesh where it exists)."""
  if hasattr(jax, "set_mesh"):
    return jax.set_mesh(mesh)
  return jax.sharding.use_mesh(mesh)
