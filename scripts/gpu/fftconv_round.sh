#!/usr/bin/env bash
# One device-tool call for the FFT-convolution kernel: the benchmark (checks at full size,
# the sweep against jnp.fft and torch.fft, the S4D layers) and the per-op profile at
# L = 2048 and 8192 with one and two warpgroups.
#   usage (GPU machine, repo root): bash scripts/gpu/fftconv_round.sh [BENCH_ARGS...]
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
timeout ${T_PROFILE:-200} python3 scripts/gpu/profile_fftconv.py --lengths 2048,8192 \
  > $OUT/fftconv_profile.log 2>&1; echo "profile exit $?"
grep -E "pipelined|error|Error" $OUT/fftconv_profile.log
timeout ${T_BENCH:-330} python3 -m benchmarks.fftconv "$@" > $OUT/fftconv_bench.log 2>&1
echo "bench exit $?"; tail -40 $OUT/fftconv_bench.log
