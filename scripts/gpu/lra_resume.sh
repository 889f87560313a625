#!/usr/bin/env bash
# One device-tool call of a long run, resumed across calls. Restores runs/NAME.tgz when it
# is there, trains until step HALT (config.train.halt_at_step: the run stops checkpointed)
# or until SECONDS pass, then packs the newest complete checkpoint, the best one, the
# metrics and results.json into $OUT/NAME.tgz (bring it back as runs/NAME.tgz for the
# next call). An archive over 15 MiB (the device tool returns files of 16 MiB at most)
# comes back in pieces $OUT/NAME.tgz.part_aa, _ab, ...: join them with
#   cat NAME.tgz.part_* > runs/NAME.tgz
#   usage (GPU machine, repo root):
#     bash scripts/gpu/lra_resume.sh CONFIG NAME HALT SECONDS [--config.x=y ...]
#   e.g. bash scripts/gpu/lra_resume.sh configs/lra/listops.py:s4d listops_s4d 40000 540
# CKPT_EVERY (default 1000): the checkpoint interval, short enough that a call cut off by
# SECONDS loses little. EVAL_EVERY (default 1000): the validation interval.
set -u
config=$1 name=$2 halt=$3 secs=$4
shift 4
source scripts/gpu/site.sh || exit 1
export PYTHONUNBUFFERED=1 SSMLAB_CACHE=/tmp/ssmlab_cache
# a warm machine's next call reuses the compiled step (and the data cache above)
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
runs=/tmp/runs
mkdir -p $runs
if [ -f runs/$name.tgz ]; then tar xzf runs/$name.tgz -C $runs && echo "restored runs/$name.tgz"; fi
t0=$(date +%s)
timeout --signal=TERM $secs python3 -m train --config=$config --workdir=$runs/$name \
  --config.train.halt_at_step=$halt --config.train.eval_every=${EVAL_EVERY:-1000} \
  --config.train.checkpoint_every=${CKPT_EVERY:-1000} --config.train.log_every=500 "$@" \
  > $OUT/$name.log 2>&1
echo "train exit $? after $(( $(date +%s) - t0 )) s"
# Newest and best checkpoints that finished writing (numeric names with a commit marker;
# a run killed mid-save leaves a temporary folder that must not be picked).
pick() { for d in $(ls "$1" 2>/dev/null | grep -E '^[0-9]+$' | sort -n); do
           [ -f "$1/$d/commit_success.txt" ] && echo "$d"; done | tail -1; }
cd $runs
files="$name/metrics.jsonl $name/config.json"
latest=$(pick $name/checkpoints); [ -n "$latest" ] && files="$files $name/checkpoints/$latest"
best=$(pick $name/best); [ -n "$best" ] && files="$files $name/best/$best"
[ -f $name/results.json ] && files="$files $name/results.json" && cp $name/results.json $OUT/
tar czf /tmp/$name.tgz $files && echo "packed: $files"
if [ $(stat -c %s /tmp/$name.tgz) -gt $((15 * 1024 * 1024)) ]; then
  split -b 15m /tmp/$name.tgz $OUT/$name.tgz.part_ && echo "split: $(ls $OUT | grep part_)"
else
  cp /tmp/$name.tgz $OUT/
fi
cp $name/metrics.jsonl $OUT/${name}_metrics.jsonl
grep -E "val|test|halted" $OUT/$name.log | tail -6
