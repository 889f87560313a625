#!/usr/bin/env bash
# Issue 21, the FFT-convolution kernel on one GPU in ONE device call (<= 9 minutes),
# run from the repo root with the .whl/ wheels:
#   bash scripts/gpu/fftconv_issue21.sh
# Phases, each under `timeout`, rows printed (and kept under $OUT) as they land:
#   1. every kernel size class against jnp.fft on the GPU, f32 and bf16 (errors printed)
#   2. benchmarks/fftconv.py sweep L = 256 .. 65536, B=8, H=1024, float32, fwd and
#      fwd+bwd, kernel vs jnp.fft vs torch.fft (same process)
#   3. the same sweep in bfloat16
#   4. $OUT/fft_conv_auto.json: the committed table with this device's entry measured
#      (FFT sizes where the kernel beat jnp.fft fwd and fwd+bwd); copy it to ssm/ops/
#   5. a per-op profile at L = 8192 f32 if time remains
#   6. if time remains: L = 8192 (and 4097) f32 with causal n = 16384 as two halves
#      (SSM_FFT_CONV_HALVES_FROM=16384), to compare with the one-call rows
# $OUT: fftconv_check.log (+ .jsonl: each case's status; the sweeps skip the kernel at a
#       size whose check failed or hung), fftconv_h200.txt (the tables),
#       fftconv_rows.jsonl, fft_conv_auto.json, fftconv_profile.txt.
# Phase budgets (seconds) can be overridden: T_CHECK, T_F32, T_BF16, T_PROFILE.
set -u
source scripts/gpu/site.sh || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache   # phases share the f32 XLA compiles
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.total --format=csv
# the lengths most worth having come first (a timeout cuts the tail; the table sorts)
LENGTHS=${LENGTHS:-8192,2048,16384,4096,1024,32768,512,256,65536}

echo "== 1. size classes vs jnp.fft"
timeout ${T_CHECK:-150} python3 -m benchmarks.fftconv --check-classes \
  --dtypes float32,bfloat16 --status $OUT/fftconv_check.jsonl 2>&1 | tee $OUT/fftconv_check.log | grep -v "^  warnings"
echo "check exit ${PIPESTATUS[0]}"

echo "== 2. sweep float32" | tee $OUT/fftconv_h200.txt
timeout ${T_F32:-200} python3 -m benchmarks.fftconv --layers off --check-len 0 \
  --dtypes float32 --lengths $LENGTHS --skip-from $OUT/fftconv_check.jsonl --rows-jsonl $OUT/fftconv_rows.jsonl 2>&1 \
  | grep -v "^  warnings" | tee -a $OUT/fftconv_h200.txt
echo "f32 sweep exit ${PIPESTATUS[0]}"

echo "== 3. sweep bfloat16" | tee -a $OUT/fftconv_h200.txt
timeout ${T_BF16:-130} python3 -m benchmarks.fftconv --layers off --check-len 0 \
  --dtypes bfloat16 --lengths $LENGTHS --skip-from $OUT/fftconv_check.jsonl --rows-jsonl $OUT/fftconv_rows.jsonl 2>&1 \
  | grep -v "^  warnings" | tee -a $OUT/fftconv_h200.txt
echo "bf16 sweep exit ${PIPESTATUS[0]}"

echo "== 4. measured auto table"
[ -s $OUT/fftconv_rows.jsonl ] && timeout 60 python3 -m benchmarks.fftconv \
  --make-auto $OUT/fftconv_rows.jsonl $OUT/fft_conv_auto.json

left=$(( ${BUDGET:-530} - SECONDS ))
echo "== 5. profile at L=8192 (${left} s left)"
if [ $left -gt 40 ]; then
  timeout $(( left < ${T_PROFILE:-90} ? left : ${T_PROFILE:-90} )) python3 \
    scripts/gpu/profile_fftconv.py --lengths 8192 > $OUT/fftconv_profile.txt 2>&1
  echo "profile exit $?"; grep -E "pipelined|^--|ms" $OUT/fftconv_profile.txt | head -40
fi
left=$(( ${BUDGET:-530} - SECONDS ))
echo "== 6. causal FFT size 16384 as two 8192-point halves (${left} s left)"
if [ $left -gt 40 ]; then
  SSM_FFT_CONV_HALVES_FROM=16384 timeout $left python3 -m benchmarks.fftconv --layers off \
    --check-len 0 --dtypes float32 --lengths 8192,4097 --no-torch 2>&1 | grep "L=" \
    | sed 's/^/  halves: /' | tee -a $OUT/fftconv_h200.txt
fi
echo "total ${SECONDS} s"
