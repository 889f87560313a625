#!/bin/bash
# The SSD kernel on a GPU in one device call: checks at benchmark size, then the tables of
# benchmarks/ssd.py against XLA, jax-linear-attention and mamba_ssm's Triton SSD.
# Carry .whl (jax_linear_attention, ml_collections wheels) and .peers (mamba_ssm's Python
# source: mamba_ssm/ops/triton/*.py and mamba_ssm/utils/{torch,determinism}.py, with empty
# package __init__ files; its SSD path is pure Triton).
#   SSD_ARGS="--sections main,sweep" bash scripts/gpu/ssd_round.sh
source scripts/gpu/site.sh || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/.peers PYTHONUNBUFFERED=1
python3 -c "import jax; print(jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
timeout ${T_SSD:-540} python3 -m benchmarks.ssd ${SSD_ARGS} 2>&1 | tee $OUT/ssd.log | grep -v "^  warnings"
