"""The LTI bank convolution under a seq mesh: all-gather against the distributed FFT.

    python -m benchmarks.seq_conv                          # the devices there are (GPUs)
    python -m benchmarks.seq_conv --fake_cpu_devices 8 --quick   # 8 fake CPU devices

For each seq axis size P (2, 4, 8, up to the device count: the first P devices), shape
(b, l, h) with c = 1 kernel map, causal or bidirectional with lk = l, float32, u split over
the length (P("seq")), three paths to the same (b, l, c, h) output:

    gspmd    the old block-level path (models.blocks.ResidualBlock's gather_mesh): u
             constrained whole over the length, `fft_conv_bank_xla`, the output constrained
             split again; GSPMD partitions the rest
    gather   `fft_conv_bank_seq_gather`: an explicit all-gather inside shard_map, the bank
             on every device, the own chunk kept (the mixer's seq_conv="gather")
    fft      `fft_conv_bank_seq_parallel`: the distributed FFT (two all-to-alls)

Columns: median ms of the forward and of forward + backward (the VJP wrt u and the kernels
with a random cotangent), each call waited for; and from each compiled program's HLO the
bytes its collectives move per device (MB; all-gather (G-1) x operand, all-to-all and
reduce-scatter (G-1)/G x operand, all-reduce 2 (G-1)/G x operand, collective-permute
1 x operand, G the group size: what a bandwidth-optimal algorithm sends), the count of
each collective (fwd+bwd), and the model's prediction for the forward
(`ssm.ops.fft_conv_seq_parallel.seq_conv_bytes`). The backward's all-reduce of the kernels'
cotangents (c, h, lk) over the mesh is in both shard_map paths.

On fake CPU devices every "device" shares the host's cores and a collective is a memory
copy: those times are not GPU times (they mostly count the FLOPs all devices do between
them, which the gather paths multiply by P); the collective byte counts are what transfers.
"""

import argparse
import collections
import datetime
import os
import re
import sys

if __package__ in (None, ""):  # run as a file: make the repo root importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COLUMNS = ["P", "b", "l", "h", "dir", "path", "fwd ms", "fwd+bwd ms", "fwd MB/dev",
           "fwd+bwd MB/dev", "model fwd MB", "collectives (fwd+bwd)"]
QUICK_SHAPES = ((2, 2048, 32), (4, 8192, 32))
FULL_SHAPES = ((8, 4096, 256), (4, 16384, 256), (2, 65536, 256))
PATHS = ("gspmd", "gather", "fft")

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_COLLECTIVES = ("all-gather", "all-to-all", "reduce-scatter", "all-reduce", "collective-permute")


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string, e.g. "f32[2,8]{1,0}" or a tuple "(c64[4], c64[4])"."""
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape):
    if dtype in _BYTES:
      size = 1
      for d in filter(None, dims.split(",")):
        size *= int(d)
      total += _BYTES[dtype] * size
  return total


def _group_size(attrs: str, num_devices: int) -> int:
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]", attrs)   # iota form [groups, size]<=[...]
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", attrs)  # mesh[...] {axes}
  if m:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    size = 1
    for axis in re.findall(r"'(\w+)'", m.group(2)):
      size *= int(sizes[axis])
    return size
  return num_devices


def collective_bytes(hlo_text: str, num_devices: int) -> tuple[float, dict[str, int]]:
  """(bytes the collectives of a compiled program move per device, {kind: count}) from
  its optimized HLO text (module docstring's rule; async *-done halves are skipped)."""
  hlo_text = re.sub(r"/\*.*?\*/", "", hlo_text)             # /*index=5*/ in long tuples
  shapes = {}
  lines = []
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\([^=]*?\)|\S+) ([\w\-]+)\((.*)$",
                       hlo_text, re.M):
    name, shape, op, rest = m.groups()
    shapes[name] = shape
    lines.append((op, rest))
  total, counts = 0.0, collections.Counter()
  for op, rest in lines:
    kind = op[:-len("-start")] if op.endswith("-start") else op
    if kind not in _COLLECTIVES:
      continue
    args, _, attrs = rest.partition(")")
    names = re.findall(r"%([\w.\-]+)", args) or [a.strip() for a in args.split(",")]
    operand = sum(shape_bytes(shapes.get(a, "")) for a in names)
    g = _group_size(attrs, num_devices)
    factor = {"all-gather": g - 1, "all-to-all": (g - 1) / g, "reduce-scatter": (g - 1) / g,
              "all-reduce": 2 * (g - 1) / g, "collective-permute": 1.0}[kind]
    total += factor * operand
    counts[kind] += 1
  return total, dict(counts)


def _count_text(counts: dict[str, int]) -> str:
  short = {"all-gather": "ag", "all-to-all": "a2a", "reduce-scatter": "rs", "all-reduce": "ar",
           "collective-permute": "cp"}
  return " ".join(f"{short[k]} x{v}" for k, v in sorted(counts.items())) or "none"


def bench(path, mesh, b, l, h, bidirectional, warmup, iters) -> dict:
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from benchmarks.common import time_fn
  from ssm.ops.fft_conv import fft_conv_bank_xla
  from ssm.ops.fft_conv_seq_parallel import (fft_conv_bank_seq_gather,
                                             fft_conv_bank_seq_parallel, seq_conv_bytes)
  n = mesh.shape["seq"]
  keys = jax.random.split(jax.random.key(0), 4)
  u = jax.device_put(jax.random.normal(keys[0], (b, l, h), jnp.float32),
                     NamedSharding(mesh, P(None, "seq")))
  kc = jax.random.normal(keys[1], (1, h, l), jnp.float32) / l ** 0.5
  ka = jax.random.normal(keys[2], (1, h, l), jnp.float32) / l ** 0.5 if bidirectional else None
  w = jax.device_put(jax.random.normal(keys[3], (b, l, 1, h), jnp.float32),
                     NamedSharding(mesh, P(None, "seq")))

  if path == "fft":
    op = lambda u, kc, ka: fft_conv_bank_seq_parallel(u, kc, ka, mesh=mesh)  # noqa: E731
  elif path == "gather":
    op = lambda u, kc, ka: fft_conv_bank_seq_gather(u, kc, ka, mesh=mesh)  # noqa: E731
  else:
    whole = NamedSharding(mesh, P(None, None, None))
    split = NamedSharding(mesh, P(None, "seq", None, None))

    def op(u, kc, ka):
      y = fft_conv_bank_xla(jax.lax.with_sharding_constraint(u, whole), kc, ka)
      return jax.lax.with_sharding_constraint(y, split)

  def fwd_bwd(u, kc, ka, w):
    y, vjp = jax.vjp(op, u, kc, ka)
    return y, vjp(w)

  fwd, both = jax.jit(op), jax.jit(fwd_bwd)
  fwd_bytes, _ = collective_bytes(fwd.lower(u, kc, ka).compile().as_text(), n)
  both_bytes, counts = collective_bytes(both.lower(u, kc, ka, w).compile().as_text(), n)
  local = b * (l // n) * h * 4
  model = None if path == "gspmd" else seq_conv_bytes(path, local, n)
  return {"P": n, "b": b, "l": l, "h": h, "dir": "bidir" if bidirectional else "causal",
          "path": path, "fwd ms": 1e3 * time_fn(fwd, u, kc, ka, warmup=warmup, iters=iters),
          "fwd+bwd ms": 1e3 * time_fn(both, u, kc, ka, w, warmup=warmup, iters=iters),
          "fwd MB/dev": fwd_bytes / 2**20, "fwd+bwd MB/dev": both_bytes / 2**20,
          "model fwd MB": None if model is None else model / 2**20,
          "collectives (fwd+bwd)": _count_text(counts)}


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small shapes (a CPU run)")
  parser.add_argument("--fake_cpu_devices", type=int, default=0,
                      help="run on this many fake CPU devices (sets XLA_FLAGS before JAX starts)")
  parser.add_argument("--seq", type=int, nargs="*", default=[2, 4, 8], help="seq axis sizes")
  parser.add_argument("--iters", type=int, default=None)
  args = parser.parse_args(argv)
  if args.fake_cpu_devices:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={args.fake_cpu_devices} "
                               + os.environ.get("XLA_FLAGS", "")).strip()
  import jax
  import numpy as np
  from jax.sharding import Mesh

  from benchmarks.common import device_name, print_table
  devices = jax.devices()
  print(f"benchmarks/seq_conv.py{' --quick' if args.quick else ''} on {len(devices)} x "
        f"{device_name()} ({jax.default_backend()}), jax {jax.__version__}, "
        f"{datetime.date.today().isoformat()}")
  if jax.default_backend() == "cpu":
    print(f"fake CPU devices sharing {os.cpu_count()} cores: the times are not GPU times "
          f"(all devices' FLOPs run on the same cores, collectives are memory copies); the "
          f"collective bytes are what transfers")
  shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
  iters = args.iters or (5 if args.quick else 20)
  rows = []
  for n in [n for n in args.seq if n <= len(devices)]:
    mesh = Mesh(np.array(devices[:n]), ("seq",))
    for i, (b, l, h) in enumerate(shapes):
      for bidirectional in ((False, True) if i == 0 else (False,)):
        for path in PATHS:
          rows.append(bench(path, mesh, b, l, h, bidirectional, warmup=2, iters=iters))
          print(f"  {rows[-1]['path']} P{n} {b}x{l}x{h} done", file=sys.stderr, flush=True)
  print("c = 1 kernel map, float32, lk = l; MB per device (2^20 bytes), from the compiled HLO")
  print_table(rows, COLUMNS)
  return rows


if __name__ == "__main__":
  main()
