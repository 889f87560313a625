r"""LRA Path-X: Pathfinder at 128x128 pixels (16384 positions), 2 classes.

  python -m train --config=configs/lra/pathx.py:s4 --workdir=runs/pathx_s4
  python -m train --config=configs/lra/pathx.py:s4,local --workdir=/tmp/pathx_demo

The argument is "model[,size]" as in configs/lra/pathfinder.py (model: s4, s4d; size:
"" = the published recipe on 200k generated 128x128 images or the LRA release via
--config.data.data_dir, "short" = that recipe over a tenth of its schedule, "local" = a
CPU demo at 64x64, "tiny" = a test at 32x32).
Generating the 200k images takes about 200k / (60 images/s x cores): under 5 minutes
on 16 cores.

Published recipe (source: state-spaces/s4 configs/experiment/lra/s4-pathx.yaml, the
SPECS.md table): 6 layers, H 256, N 64, prenorm BatchNorm, bidirectional, GELU + GLU,
no dropout, dt_min 1e-4 (dt_max 0.1), batch 16, lr 0.001 (SSM at 1e-3, no decay),
AdamW wd 0.05, cosine with warmup 50k of 500k steps (50 epochs of 160k images).
S4 reports 96.35 test accuracy on the release. Differences as in pathfinder.py.
"""

from configs.lra import pathfinder

MODELS = pathfinder.MODELS


def get_config(arg: str = "s4"):
  return pathfinder.build(arg, task="pathx", size=128,
                          recipe=dict(lr=0.001, batch_size=16, dt_min=1e-4, local_size=64))
