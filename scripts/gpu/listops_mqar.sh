#!/usr/bin/env bash
# One device-tool call: ListOps S4D at the published recipe (resuming from runs/listops_s4d.tgz
# when present) with the MQAR comparison in a second process on the same GPU.
#   usage (on the GPU machine, repo root): bash scripts/gpu/listops_mqar.sh SECONDS
set -u
secs=${1:-480}
source scripts/gpu/site.sh || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.4 SSMLAB_CACHE=/tmp/ssmlab_cache
nvidia-smi -L; python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
mkdir -p /tmp/runs
[ -f runs/listops_s4d.tgz ] && tar xzf runs/listops_s4d.tgz -C /tmp/runs && echo "restored checkpoint"
if [ "${MQAR:-1}" = 1 ]; then
  (python3 scripts/mqar_suite.py --workdir=/tmp/runs/mqar --variants=${MQAR_VARIANTS:-lightning,lightning+mc,mamba,transformer} > $OUT/mqar.log 2>&1; cp /tmp/runs/mqar/summary.json $OUT/mqar_summary.json) &
fi
timeout --signal=TERM $secs python3 -m train --config=configs/lra/listops.py:s4d --workdir=/tmp/runs/listops_s4d \
  --config.train.eval_every=1000 --config.train.checkpoint_every=1000 --config.train.log_every=500 > $OUT/listops.log 2>&1
echo "listops exit $?"
wait
cd /tmp/runs/listops_s4d && latest=$(ls checkpoints | sort -n | tail -1) && \
  tar czf $OUT/listops_s4d.tgz -C /tmp/runs listops_s4d/checkpoints/$latest listops_s4d/metrics.jsonl listops_s4d/config.json
cp /tmp/runs/listops_s4d/metrics.jsonl $OUT/listops_metrics.jsonl
tail -5 $OUT/listops.log; cat $OUT/mqar.log | tail -8
