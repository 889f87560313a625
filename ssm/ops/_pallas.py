"""Plumbing shared by the Pallas Mosaic GPU kernels in ssm/ops.

Every kernel is written once for Mosaic GPU (`plgpu.kernel`: a grid of CTAs,
one warpgroup each, TMA copies into shared memory completing on barriers,
warpgroup arrays with explicit layouts, wgmma for matrix products) and runs in
two places:

* on a Hopper GPU, compiled by Mosaic GPU;
* on the CPU in Mosaic GPU *interpret mode* (JAX's GPU interpreter, which
  simulates shared memory, barriers, TMA copies and wgmma), used by the tests.

The interpreter has no rule for register-layout casts (`plgpu.layout_cast`) or
for `plgpu.load` with a layout, and layouts mean nothing on the CPU, so kernels
go through `cast` and `load` below, which drop the layout when interpreting.
Which path a call takes (kernel or XLA) is decided in `ssm.ops._impl.choose_impl`.
The interpreter lives under `jax._src` in jax 0.10 (the local/CI version); the
import is guarded so that a JAX without it fails only when a test asks for it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.experimental.pallas as pl  # noqa: F401  (re-exported for kernels)
from jax.experimental.pallas import mosaic_gpu as plgpu

from ssm.ops._impl import interpret_mode


@functools.cache
def _interpret_params():
  try:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  except ImportError as e:  # pragma: no cover - depends on the JAX version
    raise NotImplementedError(
        "this JAX has no Mosaic GPU interpret mode; the Pallas kernels need a Hopper GPU "
        f"here (jax {jax.__version__})") from e
  return InterpretGPUParams()


def kernel(body, *, interpret: bool | None = None, **kwargs):
  """plgpu.kernel, interpreted on the CPU (interpret=None: off the GPU)."""
  if interpret is None:
    interpret = interpret_mode()
  if interpret:
    kwargs["interpret"] = _interpret_params()
  return plgpu.kernel(body, **kwargs)


def cast(x, layout, interpret: bool):
  """plgpu.layout_cast on the GPU, identity in interpret mode."""
  return x if interpret else plgpu.layout_cast(x, layout)


def load(ref, layout, interpret: bool) -> Any:
  """Load a whole ref into registers with `layout` (plain ref[...] when interpreting)."""
  if interpret:
    return ref[...]
  return plgpu.load(ref, (), layout=layout, optimized=False)
