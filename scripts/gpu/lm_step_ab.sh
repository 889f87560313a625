#!/usr/bin/env bash
# One device call: an A/B of LM train steps (issue 22). Each VARIANT is a string of extra
# benchmarks.train_step flags (--constant=..., --set=...); every one is timed on CONFIG in
# bf16 (DTYPES overrides) in this call, so its rows compare. With TRACE="FLAGS" a two-layer
# version of those flags is traced afterwards (each op with its HLO source line). Writes
# $OUT/lm_step_ab.txt.
#   usage: bash scripts/gpu/lm_step_ab.sh CONFIG "VARIANT" ["VARIANT" ...]
#   e.g.   bash scripts/gpu/lm_step_ab.sh configs/lm/imdb.py:transformer \
#            "--set=model.ffn_activation=gelu" "--set=model.ffn_activation=gelu_tanh"
set -u
config=$1
shift
source scripts/gpu/site.sh || exit 1
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
log=$OUT/lm_step_ab.txt
nvidia-smi -L | tee -a $log
for variant in "$@"; do
  echo "== $config $variant" | tee -a $log
  # shellcheck disable=SC2086  # a variant is several flags
  timeout ${ROW_TIMEOUT:-200} python3 -m benchmarks.train_step --config=$config \
    --dtypes=${DTYPES:-bfloat16} --steps=${STEPS:-10} $variant 2>&1 | grep -v -i warning \
    | tail -3 | tee -a $log
done
if [ -n "${TRACE:-}" ]; then
  echo "== trace, two layers: $config $TRACE" | tee -a $log
  export XLA_FLAGS="--xla_dump_to=/tmp/xd_ab --xla_dump_hlo_module_re=.*train_step.*"
  # shellcheck disable=SC2086
  timeout ${ROW_TIMEOUT:-200} python3 -m benchmarks.train_step --config=$config \
    --dtypes=${DTYPES:-bfloat16} --steps=5 --set=model.num_layers=2 $TRACE \
    --trace_dir=/tmp/tr_ab --hlo_dump=/tmp/xd_ab --top=30 2>&1 | grep -v -i warning \
    | tail -90 | tee -a $log
fi
