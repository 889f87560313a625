#!/usr/bin/env bash
# One device-tool call on a 2-GPU machine: ListOps S4D (published model, a 10k-example
# generated set) for a few hundred steps on 1 GPU and on 2 GPUs (data-parallel mesh);
# prints step times and the first losses of both runs side by side.
#   usage (on the GPU machine, repo root): bash scripts/gpu/multi_gpu_steptime.sh STEPS
set -u
steps=${1:-400}
source scripts/gpu/site.sh || exit 1
export PYTHONUNBUFFERED=1 SSMLAB_CACHE=/tmp/ssmlab_cache NCCL_NVLS_ENABLE=0
nvidia-smi -L
common="--config=configs/lra/listops.py:s4d --config.data.num_train=10000 --config.train.num_steps=$steps --config.optim.warmup_steps=100
  --config.train.eval_every=100000 --config.train.checkpoint_every=100000 --config.train.log_every=50"
for gpus in 1 2; do
  if [ $gpus = 1 ]; then export CUDA_VISIBLE_DEVICES=0; else unset CUDA_VISIBLE_DEVICES; fi
  python3 -m train $common --config.train.batch_size=${BATCH:-50} --workdir=/tmp/run_$gpus > $OUT/gpus_$gpus.log 2>&1
  cp /tmp/run_$gpus/metrics.jsonl $OUT/metrics_gpus_$gpus.jsonl
done
python3 - <<'PY'
import json, os, statistics
out = os.environ["OUT"]
rows = {g: [json.loads(l) for l in open(f"{out}/metrics_gpus_{g}.jsonl")] for g in (1, 2)}
for g, r in rows.items():
  tr = [x for x in r if x.get("split") == "train" and x["step"] > 100]
  print(f"{g} GPU(s): median step {1e3 * statistics.median(x['step_time_s'] for x in tr):.2f} ms, "
        f"{statistics.median(x['examples_per_s'] for x in tr):.0f} examples/s")
for a, b in list(zip(rows[1], rows[2]))[:6]:
  if a.get("split") == "train":
    print(f"step {a['step']}: loss 1 GPU {a['loss']:.6f}  2 GPUs {b['loss']:.6f}")
PY
