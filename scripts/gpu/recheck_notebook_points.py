"""Re-times the two points the notebooks' live GPU runs left out of line (results/README.md).

  python3 scripts/gpu/recheck_notebook_points.py           # GPU machine, repo root
  python3 scripts/gpu/recheck_notebook_points.py --shapes  # the scan at batch 1/2/4, chunks

Notebook 02 measured the XLA selective scan's forward + backward at 3.2 us/token at
L = 4096 against 1.6 and 1.7 at 1024 and 16384; notebook 03 measured the Pallas lightning
kernel's forward + backward at 1.34 ms at L = 4096 against 0.52 and 0.70 at 2048 and 8192.
Both numbers were single time_fn medians (each call waited for, host dispatch included).
This script takes the same shapes and a sweep around them, and times each point three
times with time_fn and once with time_fn_pipelined (20 calls queued, as a training step
sees it), so a one-off can be told from a property of the path.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import device_name, time_fn, time_fn_pipelined  # noqa: E402
from ssm.ops import lightning_attention, selective_scan  # noqa: E402

D, N = 1536, 16               # notebook 02's SMALL sizes
TOKENS, HEADS, HEAD_DIM = 32768, 16, 64  # notebook 03's


def scan_inputs(bsz, length):
  k = jax.random.split(jax.random.key(length), 7)
  return (jax.random.normal(k[0], (bsz, length, D)),
          0.5 * jax.random.normal(k[1], (bsz, length, D)) - 2.0,
          -jnp.exp(0.5 * jax.random.normal(k[2], (D, N))),
          jax.random.normal(k[3], (bsz, length, N)),
          jax.random.normal(k[4], (bsz, length, N)),
          jax.random.normal(k[5], (D,)),
          jax.random.normal(k[6], (bsz, length, D)))


def report(name, length, tokens, fn, args):
  waited = [1e3 * time_fn(fn, *args) for _ in range(3)]
  piped = 1e3 * time_fn_pipelined(fn, *args)
  print(f"{name:28s} L={length:6d} tokens={tokens:6d}  time_fn ms "
        + " ".join(f"{t:8.3f}" for t in waited)
        + f"  pipelined ms {piped:8.3f}  pipelined us/token {1e3 * piped / tokens:.4f}",
        flush=True)


def scan_grad(chunk_size=128):
  f = jax.jit(lambda u, dt, A, B, C, Dv, z: selective_scan(
      u, dt, A, B, C, Dv, z=z, delta_softplus=True, impl="xla", chunk_size=chunk_size))
  return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)), argnums=tuple(range(7))))


def shapes():
  """The XLA scan's backward around (B 2, L 4096): other batches and lengths, other chunks."""
  for bsz, length in ((2, 2048), (2, 4096), (2, 8192), (1, 4096), (4, 4096), (3, 4096)):
    report(f"scan xla f+b B={bsz} chunk 128", length, bsz * length, scan_grad(),
           scan_inputs(bsz, length))
  for chunk in (64, 256, 512):
    report(f"scan xla f+b B=2 chunk {chunk}", 4096, 8192, scan_grad(chunk),
           scan_inputs(2, 4096))


def main():
  print(f"# {device_name()}, jax {jax.__version__}")
  if "--shapes" in sys.argv[1:]:
    shapes()
    return
  for length in (1024, 2048, 4096, 8192, 16384):
    bsz = max(1, 8192 // length)
    args = scan_inputs(bsz, length)
    report("selective_scan xla fwd+bwd", length, bsz * length, scan_grad(), args)
  decay = -jnp.linspace(0.01, 0.1, HEADS)
  for length in (2048, 4096, 8192):
    keys = jax.random.split(jax.random.key(length), 3)
    qkv = [jax.random.normal(k, (TOKENS // length, length, HEADS, HEAD_DIM), jnp.bfloat16)
           for k in keys]
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(lightning_attention(
        q, k, v, decay, impl="pallas").astype(jnp.float32)), argnums=(0, 1, 2)))
    report("lightning pallas fwd+bwd", length, TOKENS, grad, qkv)


if __name__ == "__main__":
  main()
