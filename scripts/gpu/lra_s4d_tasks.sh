#!/usr/bin/env bash
# One device-tool call: S4D at the published recipes on LRA Text (real IMDB), Image (the
# JPEG CIFAR-10 copy) and Pathfinder-32 (generated), three processes sharing one GPU for
# SECONDS each; validation curves come back as metrics files.
# Needs .lra_data/{aclImdb.tar.gz,cifar10-jpeg.tar.gz} (copies of ../shared/data) carried.
#   usage (on the GPU machine, repo root): bash scripts/gpu/lra_s4d_tasks.sh SECONDS [PF_EXAMPLES]
set -u
secs=${1:-420}
pf_n=${2:-20000}
source scripts/gpu/site.sh || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 SSMLAB_CACHE=/tmp/ssmlab_cache
nvidia-smi -L
common="--config.train.checkpoint_every=0 --config.train.log_every=250"
timeout $secs python3 -m train --config=configs/lra/text.py:s4d --workdir=/tmp/runs/text $common \
  --config.data.data_dir=.lra_data/aclImdb.tar.gz --config.train.eval_every=1000 > $OUT/text.log 2>&1 &
timeout $secs python3 -m train --config=configs/lra/image.py:s4d --workdir=/tmp/runs/image $common \
  --config.data.data_dir=.lra_data/cifar10-jpeg.tar.gz --config.train.eval_every=1000 > $OUT/image.log 2>&1 &
timeout $secs python3 -m train --config=configs/lra/pathfinder.py:s4d --workdir=/tmp/runs/pathfinder $common \
  --config.data.num_examples=$pf_n --config.train.eval_every=1000 > $OUT/pathfinder.log 2>&1 &
wait
for t in text image pathfinder; do
  cp /tmp/runs/$t/metrics.jsonl $OUT/${t}_metrics.jsonl 2>/dev/null
  echo "== $t"; grep -E "val step|Error|error" $OUT/$t.log | tail -6
done
