"""Benchmark of the time-invariant SSM layers: LSSL, S4, S4D, SGConv.

    python -m benchmarks.lti_layers              # full sizes (a GPU; via the device tool)
    python -m benchmarks.lti_layers --quick      # tiny sizes, a CPU smoke run
    python -m benchmarks.lti_layers --layers s4d,sgconv --batch 8
    python -m benchmarks.lti_layers --layers s4d --s4d_vandermonde plain   # the old kernel

For each layer and (H, N, L), all jit-compiled with the parameters passed as
arguments (never closed over, so XLA cannot constant-fold the kernel), on the
default device:

    kernel ms        the layer's convolution kernel K (c, H, L) alone
    kernel+conv ms   K and the causal FFT convolution of a (batch, L, H) input
    fwd+bwd ms       the whole mixer (conv, D, GELU, output projection), forward and
                     the gradient of a scalar loss w.r.t. every parameter and the input

LSSL's kernel costs O(H N^2 L) (dense Krylov doublings) against O(H N L) for S4D and
O(H N L + H L log L) for S4; it runs at L <= 4096 only. SGConv has no state size (N
is "-"); its kernel length is fixed at construction (l_max = L). A layer whose module
is missing or fails to build is reported as skipped and the others still run.
"""

import argparse
import os
import sys
import traceback

if __package__ in (None, ""):  # run as a file: make the repo root importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import device_name, print_table, time_fn

LAYERS = ("lssl", "s4", "s4d", "sgconv")
COLUMNS = ["layer", "H", "N", "L", "kernel ms", "kernel+conv ms", "fwd+bwd ms", "device"]


def configs(quick: bool, layers) -> list[tuple[str, int, int | None, int]]:
  """(layer, H, N, L) to run."""
  if quick:
    h, n, lengths, lssl_lengths = 16, 8, (64, 256), (64, 256)
  else:
    h, n, lengths, lssl_lengths = 256, 64, (1024, 4096, 16384), (1024, 4096)
  out = []
  for layer in layers:
    for seq_len in (lssl_lengths if layer == "lssl" else lengths):
      out.append((layer, h, None if layer == "sgconv" else n, seq_len))
  return out


def build(layer: str, h: int, n: int | None, seq_len: int):
  """The mixer through the registry, with d_state / l_max where the layer takes them."""
  from models import build_mixer, mixer_options  # imported here: a broken layer is one row
  accepted = mixer_options(layer)
  opts = {}
  if "d_state" in accepted and n is not None:
    opts["d_state"] = n
  if "l_max" in accepted:
    opts["l_max"] = seq_len
  return build_mixer(layer, h, rngs=nnx.Rngs(0), **opts)


def bench_one(layer, h, n, seq_len, batch, warmup, iters) -> dict:
  from ssm.lti_mixer import lti_conv

  mixer = build(layer, h, n, seq_len)
  graphdef, params, rest = nnx.split(mixer, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(1), (batch, seq_len, h), jnp.float32)

  @jax.jit
  def kernel(params):
    return nnx.merge(graphdef, params, rest).kernel(seq_len)

  @jax.jit
  def kernel_conv(params, x):
    k = nnx.merge(graphdef, params, rest).kernel(seq_len)
    return lti_conv(x, k, bidirectional=False)

  @jax.jit
  def fwd_bwd(params, x):
    def loss(params, x):
      y = nnx.merge(graphdef, params, rest)(x, deterministic=True)
      return jnp.mean(y.astype(jnp.float32) ** 2)
    return jax.grad(loss, argnums=(0, 1))(params, x)

  ms = lambda fn, *a: 1e3 * time_fn(fn, *a, warmup=warmup, iters=iters)
  return {"layer": layer, "H": h, "N": n, "L": seq_len, "kernel ms": ms(kernel, params),
          "kernel+conv ms": ms(kernel_conv, params, x), "fwd+bwd ms": ms(fwd_bwd, params, x),
          "device": device_name()}


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
  parser.add_argument("--layers", default=",".join(LAYERS), help="comma-separated subset")
  parser.add_argument("--batch", type=int, default=None, help="batch size (8; 2 with --quick)")
  parser.add_argument("--iters", type=int, default=None, help="timed calls (20; 3 with --quick)")
  parser.add_argument("--s4d_vandermonde", choices=("blocked", "plain"), default=None,
                      help="how S4D generates its kernel (ssm.s4d.VANDERMONDE)")
  args = parser.parse_args(argv)
  if args.s4d_vandermonde:
    from ssm import s4d  # noqa: PLC0415
    s4d.VANDERMONDE = args.s4d_vandermonde
  layers = [s.strip() for s in args.layers.split(",") if s.strip()]
  unknown = sorted(set(layers) - set(LAYERS))
  if unknown:
    parser.error(f"unknown layers {unknown}; choose from {list(LAYERS)}")
  batch = args.batch or (2 if args.quick else 8)
  iters = args.iters or (3 if args.quick else 20)
  warmup = 1 if args.quick else 3

  vander = f"; S4D kernel {args.s4d_vandermonde}" if args.s4d_vandermonde else ""
  print(f"jax {jax.__version__} on {device_name()}; batch {batch}, median of {iters} calls{vander}")
  rows, notes, broken = [], [], {}
  for layer, h, n, seq_len in configs(args.quick, layers):
    if layer in broken:
      continue
    try:
      row = bench_one(layer, h, n, seq_len, batch, warmup, iters)
    except (ImportError, AttributeError) as e:  # the layer's module is missing or incomplete
      broken[layer] = True
      notes.append(f"{layer}: skipped ({type(e).__name__}: {e})")
      rows.append({"layer": layer, "H": h, "N": n, "L": seq_len, "device": "skipped"})
      continue
    except Exception as e:  # noqa: BLE001 -- e.g. out of memory: report and go on
      traceback.print_exc(limit=3)
      notes.append(f"{layer} L={seq_len}: failed ({type(e).__name__}: {str(e)[:200]})")
      rows.append({"layer": layer, "H": h, "N": n, "L": seq_len, "device": "failed"})
      continue
    rows.append(row)
    print(f"  done {layer} H={h} N={n if n is not None else '-'} L={seq_len}", flush=True)
  print()
  print_table(rows, COLUMNS)
  notes.append("LSSL runs at L <= 4096 only: its dense Krylov kernel costs O(H N^2 L).")
  for note in notes:
    print("note:", note)
  return rows


if __name__ == "__main__":
  main()
