"""Mosaic GPU lowering of the FFT-convolution, scan and causal-conv kernels for CUDA, on the CPU.

The interpreter that runs the kernels in the other tests ignores layouts, swizzles and
SMEM transforms; jax.export(platforms=["cuda"]) runs Mosaic GPU's own lowering without a
GPU, which rejects what the hardware cannot do (e.g. wgmma operands with different
swizzles, which broke every FFT size below 4096 until this test existed). Machine code is
still produced only on a GPU. scripts/export_pallas_cuda.py runs the full list.
"""
import jax
import pytest
from jax import export

from scripts import export_pallas_cuda


# forward+backward of every size class (tile widths c = 16, 32, 64; 3 stages in one CTA,
# the causal halves, the XLA outer step; bf16; circular; D and gate), and the forward
# alone where it is a different kernel (the 3-stage forward emits u's spectra only
# under differentiation).
_THREE_STAGE = ("L3000 ", "L8192 ", "L16384 ", "L10000 ", "L32768 ")
CASES = [c for c in export_pallas_cuda.fftconv_cases() if c[0].endswith("fwd+bwd")
         or any(t in c[0] for t in _THREE_STAGE)]
CASES += [c for c in export_pallas_cuda.scan_cases() if c[0].endswith("fwd+bwd")]
CASES += list(export_pallas_cuda.conv_cases())  # the forward is its own kernel


@pytest.mark.parametrize("name,fn,shapes", CASES, ids=[c[0] for c in CASES])
def test_lowers_for_cuda(name, fn, shapes):
  exported = export.export(jax.jit(fn), platforms=["cuda"])(*shapes)
  assert "mosaic_gpu" in exported.mlir_module()


CHUNKED = list(export_pallas_cuda.chunked_cases(force=True))


@pytest.mark.parametrize("name,fn,shapes", CHUNKED, ids=[c[0] for c in CHUNKED])
def test_chunked_kernels_lower_for_cuda(name, fn, shapes):
  """Lightning attention and SSD: their transposed swizzled tile loads lower only on
  jax >= 0.11 (the GPU machines' version); older JAX skips, naming why."""
  if export_pallas_cuda._jax_version() < (0, 11):
    pytest.skip(f"jax {jax.__version__}: Mosaic GPU cannot transpose a swizzled tile before 0.11")
  exported = export.export(jax.jit(fn), platforms=["cuda"])(*shapes)
  assert "mosaic_gpu" in exported.mlir_module()
