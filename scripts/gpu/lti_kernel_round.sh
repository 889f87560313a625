#!/usr/bin/env bash
# One device call: S4D's kernel generated blocked (ssm/s4d.py: vandermonde_kernel, the
# default) against the plain Vandermonde product (the (h, N/2, L) matrix materialised),
# in the LRA S4D recipes' train steps (f32; the blocked one in bf16 too; a trace with each
# op's HLO source line for the blocked f32 step) and as a layer (benchmarks.lti_layers).
# Carry .whl and .lra_data ({aclImdb,cifar10-jpeg}.tar.gz, copies of ../shared/data).
# Writes $OUT/*.txt.
#   usage: bash scripts/gpu/lti_kernel_round.sh [TASKS]   (default "text listops image")
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
source scripts/gpu/lra_task_args.sh
export PYTHONUNBUFFERED=1 SSMLAB_CACHE=/tmp/ssmlab_cache JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
for task in ${1:-text listops image}; do
  extra=$(lra_task_args $task)
  runs=("plain float32" "blocked float32 trace" "blocked bfloat16")
  [ $task = image ] && runs=("plain float32" "blocked float32")
  for run in "${runs[@]}"; do  # ~40 s each
    set -- $run
    tr=""
    if [ "${3:-}" = trace ]; then
      tr="--trace_dir=/tmp/tr_$task --hlo_dump=/tmp/xd_$task --top=30"
      export XLA_FLAGS="--xla_dump_to=/tmp/xd_$task --xla_dump_hlo_module_re=.*train_step.*"
    fi
    echo "== $task s4d kernel $1 dtype $2" | tee -a $OUT/steps.txt
    python3 scripts/gpu/profile_train_step.py --config=configs/lra/$task.py:s4d $extra \
      --s4d_vandermonde=$1 --config.model.dtype=$2 $tr 2>&1 | grep -v -i warning | tail -70 \
      | tee -a $OUT/steps.txt
    unset XLA_FLAGS
  done
  [ $task = text ] && for m in plain blocked; do
    python3 -m benchmarks.lti_layers --layers s4d --s4d_vandermonde $m 2>&1 | tail -6 \
      | tee -a $OUT/layers.txt
  done
done
