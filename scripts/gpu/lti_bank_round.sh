#!/usr/bin/env bash
# One device call: the LTI bank's two methods (ssm/ops/fft_conv.py: "fft" = forward
# transforms only, "irfft" = the previous path) as an op and inside the LRA S4D recipes'
# train steps, f32 and bf16, with a trace of the new default. Carry .whl and .lra_data
# ({aclImdb,cifar10-jpeg}.tar.gz, copies of ../shared/data). Writes $OUT/*.txt.
#   usage: bash scripts/gpu/lti_bank_round.sh [TASKS]   (default "listops text image")
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
source scripts/gpu/lra_task_args.sh
export PYTHONUNBUFFERED=1 SSMLAB_CACHE=/tmp/ssmlab_cache JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
python3 -m benchmarks.fftconv --bank only --no-torch 2>&1 | tee $OUT/bank.txt
for task in ${1:-listops text image}; do
  extra=$(lra_task_args $task)
  for run in "irfft float32" "fft float32 trace" "fft bfloat16"; do  # ~40 s each
    set -- $run
    tr=""; [ "${3:-}" = trace ] && tr="--trace_dir=/tmp/tr_${task}"
    echo "== $task s4d bank $1 dtype $2" | tee -a $OUT/steps.txt
    python3 scripts/gpu/profile_train_step.py --config=configs/lra/$task.py:s4d $extra \
      --bank_method=$1 --config.model.dtype=$2 $tr 2>&1 | grep -v -i warning | tail -40 \
      | tee -a $OUT/steps.txt
  done
done
