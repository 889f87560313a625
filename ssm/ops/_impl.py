"""The one dispatch of every op in ssm/ops: impl="auto" | "xla" | "pallas".

Each op has an XLA path and a Pallas kernel; the kernel module says whether it takes a
call through two checks that raise ValueError with the reason:

    check()    the kernel cannot take these inputs (shapes, dtypes)
    prefer()   it can, but "auto" should not give it the call (measured slower there, or
               more precision asked for than its bf16 matrix products give)

    path = choose_impl(impl, op="ssd", check=lambda: ssd_pallas.check_supported(x, B, C),
                       prefer=...)

"xla" is the reference path. "pallas" runs the kernel, raising check()'s error (never a
silent fallback); off a GPU it runs in the Mosaic GPU interpreter (`interpret_mode`).
"auto" takes the kernel on a Hopper GPU when check() and prefer() pass, else XLA.

Device facts the kernels tune by (`num_sms`) are queried here, not written down:
measurements live in results/README.md.
"""

import jax

IMPLS = ("auto", "xla", "pallas")


def check_impl(who: str, impl) -> str:
  """impl if it is one of IMPLS, else ValueError naming `who` (a mixer's constructor)."""
  if impl not in IMPLS:
    raise ValueError(f"{who}: impl must be one of {IMPLS}, got {impl!r}")
  return impl


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def on_hopper() -> bool:
  """True on an sm_90 GPU (the kernels use Hopper-only TMA and wgmma)."""
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return False
  return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def num_sms() -> int:
  """Streaming multiprocessors of the first device (0 off a GPU): the kernels size their
  grids by it."""
  dev = jax.devices()[0]
  return int(getattr(dev, "core_count", 0) or 0) if dev.platform == "gpu" else 0


def interpret_mode(interpret: bool | None = None) -> bool:
  """Pallas kernels run with interpret=True off the GPU (slow, exact); an explicit
  `interpret` wins."""
  return (not on_gpu()) if interpret is None else bool(interpret)


def _passes(check) -> bool:
  try:
    check()
  except ValueError:
    return False
  return True


def choose_impl(impl: str, *, op: str, check, prefer=None) -> str:
  """The path ("xla" or "pallas") that runs this call of `op` (module docstring)."""
  check_impl(op, impl)
  if impl == "xla":
    return "xla"
  if impl == "pallas":
    check()
    return "pallas"
  take = on_hopper() and _passes(check) and (prefer is None or _passes(prefer))
  return "pallas" if take else "xla"
