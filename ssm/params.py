"""Parameter kinds the trainer routes to different optimizer groups.

`SSMParam`: the state-space parameters of S4/S4D/LSSL/SGConv (A, B, dt, kernel
weights). The papers train them with their own, smaller learning rate and no
weight decay (state-spaces/s4 `register(..., lr=min(lr, 1e-3), weight_decay=0)`), except
SGConv's, whose kernels keep the main weight decay (config.optim.ssm_weight_decay, set by
configs/common.py sgconv_kernel_decay).

`NoDecayParam`: trained at the main learning rate but without weight decay
(Mamba's A_log and D, as in state-spaces/mamba `_no_weight_decay`).

Both are `nnx.Param` subclasses, so `nnx.state(model, nnx.Param)` still sees them
and `nnx.state(model, SSMParam)` selects them alone.
"""

from flax import nnx


class SSMParam(nnx.Param):
  """A state-space parameter: own learning rate (config.optim.ssm_lr) and weight decay
  (config.optim.ssm_weight_decay, 0 unless a recipe sets it: SGConv's)."""


class NoDecayParam(nnx.Param):
  """A parameter trained at the main learning rate with no weight decay."""
