#!/usr/bin/env bash
# One device-tool call (issue 22): jax-linear-attention's own trainer beside ours, same GPU,
# same tokens per step (16 x 2048), bf16 compute, float32 parameters:
#   jla train, presets mamba2-130m and transformer-125m at vocabulary 256
#     (scripts/gpu/jla_trainer_row.toml; the median of its logged tokens/s after step 10)
#   python -m benchmarks.train_step on configs/lm/imdb.py:mamba2 and :transformer, bf16
# jla's trainer needs equinox, jaxtyping, wadler-lindig and safetensors beside its own
# wheel: bash scripts/gpu/fetch_wheels.sh jax-linear-attention equinox jaxtyping \
#   wadler-lindig safetensors; carry .whl.
#   usage (GPU machine, repo root): bash scripts/gpu/jla_trainer_row.sh [PRESET ...]
#   JLA_TIMEOUT (s, default 300) bounds each jla run; OURS="" skips our rows (e.g. when
#   scripts/gpu/lm_step_ab.sh times them in the same call), OURS="transformer" keeps one.
set -u
source scripts/gpu/site.sh || exit 1
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
presets=${*:-mamba2-130m transformer-125m}
nvidia-smi -L
for p in $presets; do
  rm -rf /tmp/jla_runs/$p
  timeout ${JLA_TIMEOUT:-300} python3 -m jla.cli train --config scripts/gpu/jla_trainer_row.toml \
    --set model.preset=$p --set train.output_dir=/tmp/jla_runs/$p > $OUT/jla_$p.log 2>&1
  echo "jla $p exit $?"
  grep -E "parameters|compiled" $OUT/jla_$p.log | tail -2
  python3 - /tmp/jla_runs/$p/metrics.jsonl $p <<'PY'
import json, statistics, sys
rows = [json.loads(l)["metrics"] for l in open(sys.argv[1]) if '"event":"train"' in l]
rows = [m for m in rows if m["step"] > 10]  # past the compile and warm-up
if not rows:
  sys.exit(f"jla {sys.argv[2]}: no train records after step 10")
tps = statistics.median(m["tokens_per_sec"] for m in rows)
ms = statistics.median(m["step_time"] for m in rows) * 1e3
mfu = statistics.median(m["mfu_percent"] for m in rows)
print(f"jla {sys.argv[2]}: {ms:.1f} ms/step, {tps:,.0f} tok/s, MFU {mfu:.1f}% (jla's count), "
      f"{len(rows)} logged intervals")
PY
  cp /tmp/jla_runs/$p/metrics.jsonl $OUT/jla_${p}_metrics.jsonl 2>/dev/null
done
ours=${OURS-mamba2 transformer}
[ -n "$ours" ] && python3 -m benchmarks.train_step $(for m in $ours; do
  echo --config=configs/lm/imdb.py:$m; done) --dtypes=bfloat16 --steps=10 2>&1 \
  | tee $OUT/ours.txt | tail -8
