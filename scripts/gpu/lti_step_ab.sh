#!/usr/bin/env bash
# One device call: an A/B of one profile_train_step.py switch in the LRA S4D recipes'
# train steps. Each VALUE is timed in f32; the last one also with a trace (each op's HLO
# source line) and in bf16. With BANK=1 the bank op (benchmarks.fftconv --bank only, every
# method) is timed first. Carry .whl and the task's data: .lra_data/aclImdb*.tar.gz for
# text (TEXT_DATA picks the file, e.g. a subset; see scripts/gpu/lra_task_args.sh),
# .lra_data/cifar10-jpeg.tar.gz for image. Writes $OUT/*.txt.
#   usage: bash scripts/gpu/lti_step_ab.sh FLAG "VALUES" [TASKS]    (TASKS default "text listops")
#   e.g.   BANK=1 bash scripts/gpu/lti_step_ab.sh bank_method "fft pairs"
#          bash scripts/gpu/lti_step_ab.sh s4d_vandermonde "plain blocked" "text listops image"
set -u
flag=$1 values=($2)
source scripts/gpu/site.sh || exit 1
source scripts/gpu/lra_task_args.sh
export PYTHONUNBUFFERED=1 SSMLAB_CACHE=/tmp/ssmlab_cache JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
[ "${BANK:-0}" = 1 ] && python3 -m benchmarks.fftconv --bank only --no-torch 2>&1 | tee $OUT/bank.txt
last=${values[${#values[@]}-1]}
for task in ${3:-text listops}; do
  extra=$(lra_task_args $task)
  runs=(); for v in "${values[@]}"; do runs+=("$v float32"); done
  runs[${#runs[@]}-1]="$last float32 trace"; runs+=("$last bfloat16")
  for run in "${runs[@]}"; do  # ~40 s each
    set -- $run
    tr=""
    if [ "${3:-}" = trace ]; then
      tr="--trace_dir=/tmp/tr_$task --hlo_dump=/tmp/xd_$task --top=30"
      export XLA_FLAGS="--xla_dump_to=/tmp/xd_$task --xla_dump_hlo_module_re=.*train_step.*"
    fi
    echo "== $task s4d $flag $1 dtype $2" | tee -a $OUT/steps.txt
    python3 scripts/gpu/profile_train_step.py --config=configs/lra/$task.py:s4d $extra \
      --$flag=$1 --config.model.dtype=$2 $tr 2>&1 | grep -v -i warning | tail -70 \
      | tee -a $OUT/steps.txt
    unset XLA_FLAGS
  done
done
