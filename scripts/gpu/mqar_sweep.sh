#!/usr/bin/env bash
# One device-tool call of the MQAR sweep (issue 27; scripts/mqar_suite.py sweep), resumed
# across calls: restores runs/mqar_sweep.tgz when it is there (else starts from the cells
# committed in results/mqar_sweep; copy new ones there), runs the grid slice named by
# the extra arguments for at most SECONDS, then packs the finished cells, sweep.json and the
# tables into $OUT/mqar_sweep.tgz (bring it back as runs/mqar_sweep.tgz). A cell cut off by
# SECONDS is lost: its stacked checkpoint (tens to hundreds of MB at vocabulary 8192) does
# not fit what the device tool returns, so keep slices small enough to finish.
#   usage (GPU machine, repo root): bash scripts/gpu/mqar_sweep.sh SECONDS [--mixers=...]
#   e.g. bash scripts/gpu/mqar_sweep.sh 480 --caching=none --d_models=64 --seq_lens=256
#   (add --pack_pairs to train a program's pair counts together where mqar_probe.py shows
#   the step time per replica falling from R = 4 to 12)
# Beside another job on the same GPU, set XLA_PYTHON_CLIENT_MEM_FRACTION for both.
set -u
secs=$1
shift
source scripts/gpu/site.sh || exit 1
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
work=/tmp/runs/mqar_sweep
mkdir -p /tmp/runs
if [ -f runs/mqar_sweep.tgz ]; then tar xzf runs/mqar_sweep.tgz -C /tmp/runs && echo "restored runs/mqar_sweep.tgz"
elif [ -f results/mqar_sweep/sweep.json ]; then
  # a fresh checkout: start from the committed cells (finished cells only, no checkpoints)
  mkdir -p $work && cp -r results/mqar_sweep/cells results/mqar_sweep/sweep.json $work/ \
    && echo "seeded from results/mqar_sweep ($(ls $work/cells | wc -l) cells)"
fi
t0=$(date +%s)
python3 scripts/mqar_suite.py sweep --workdir=$work --max_seconds=$secs "$@" > $OUT/mqar_sweep.log 2>&1
echo "sweep exit $? after $(( $(date +%s) - t0 )) s"
cd /tmp/runs && tar czf $OUT/mqar_sweep.tgz --exclude='*.ckpt.npz' mqar_sweep
cp $work/results.md $OUT/mqar_results.md 2>/dev/null
grep -E "best lr|stopped|ran " $OUT/mqar_sweep.log | tail -20
