#!/usr/bin/env bash
# One device-tool call for the FFT-convolution kernel: benchmarks/fftconv.py with the
# given arguments (rows print as they land, so a timeout loses nothing), and with
# PROFILE=1 first the per-op profile at L = 2048 and 8192 (scripts/gpu/profile_fftconv.py).
#   usage (GPU machine, repo root): [PROFILE=1] bash scripts/gpu/fftconv_round.sh [BENCH_ARGS...]
#   e.g. bash scripts/gpu/fftconv_round.sh --lengths 256,512,1024,2048,4096 --check-len 0
set -u
source scripts/gpu/site.sh || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
if [ "${PROFILE:-0}" = 1 ]; then
  timeout ${T_PROFILE:-200} python3 scripts/gpu/profile_fftconv.py --lengths 2048,8192 \
    > $OUT/fftconv_profile.log 2>&1; echo "profile exit $?"
  grep -E "pipelined|error|Error" $OUT/fftconv_profile.log
fi
timeout ${T_BENCH:-560} python3 -m benchmarks.fftconv "$@" > $OUT/fftconv_bench.log 2>&1
echo "bench exit $?"; tail -60 $OUT/fftconv_bench.log
