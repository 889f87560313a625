#!/bin/bash
# The Pallas kernels on a GPU: compile, check at full size, time (one device call).
source scripts/gpu/site.sh || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/.jax_cache
python3 -c "import jax; print(jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
timeout ${T_SCAN:-280} python3 -m benchmarks.scan --skip-long ${SCAN_ARGS} 2>&1 | tee $OUT/scan.log | grep -v "^  warnings"
timeout ${T_LIGHT:-140} python3 -m benchmarks.lightning --lengths 4096 ${LIGHT_ARGS} 2>&1 | tee $OUT/lightning.log | tail -60
timeout ${T_FFT:-140} python3 -m benchmarks.fftconv --lengths 8192 --dtypes float32 ${FFT_ARGS} 2>&1 | tee $OUT/fftconv.log | tail -60
