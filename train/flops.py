"""Model FLOPs per token and model FLOPs utilisation (MFU), from the model itself.

    flops_per_token = 6 N + 3 sum over mixers of mixer.flops_per_token(L)

6 N is a training step's matrix products (2 N forward, 4 N backward; Kaplan et al. 2020)
with N the parameters that multiply activations: every parameter except a token
embedding table that is only looked up (a tied LM head is a matrix product, so a tied
table counts). The handful of elementwise parameters (norm scales, SSM A and D) are
counted too: they are far below 1% of N at the sizes MFU matters. The sequence terms
are each mixer's forward FLOPs beyond its projections (attention's scores, a scan's
state updates, an FFT convolution; `ssm.mixer.Mixer.flops_per_token` and the mixers'
docstrings give each count), times 3 for forward + backward. Attention's causal half is
not subtracted (PaLM's convention), so MFU is comparable with PaLM / nanoGPT's numbers.
Rematerialisation's recomputation is not model FLOPs (it is hardware FLOPs), so remat
lowers MFU.

    mfu = tokens_per_s * flops_per_token / (peak_flops(device_kind, dtype) * devices)

Peaks are the vendors' dense (no sparsity) matrix throughput: bf16 for model.dtype
bfloat16, and for float32 the rate XLA computes float32 products at by default (TF32 on
NVIDIA GPUs since Ampere, bf16 passes on TPUs). An unknown device (a CPU) has no peak:
MFU is left out, never guessed.
"""

from __future__ import annotations

import jax
from flax import nnx

# (substring of jax.Device.device_kind, {dtype: peak FLOP/s}); first match wins.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bfloat16": 989.4e12, "float32": 494.7e12}),
    ("H100", {"bfloat16": 989.4e12, "float32": 494.7e12}),   # SXM
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
    ("TPU v6", {"bfloat16": 918e12, "float32": 918e12}),     # v6e (Trillium)
    ("TPU v5p", {"bfloat16": 459e12, "float32": 459e12}),
    ("TPU v5", {"bfloat16": 197e12, "float32": 197e12}),     # v5e ("TPU v5 lite")
    ("TPU v4", {"bfloat16": 275e12, "float32": 275e12}),
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """Dense matrix FLOP/s of one device of this kind at this dtype, or None (unknown)."""
  for key, peaks in PEAK_FLOPS:
    if key.lower() in device_kind.lower():
      return peaks.get(dtype)
  return None


def _is_lookup_table(path) -> bool:
  """Whether a parameter's path is the model's token-embedding table (encoder.embedding;
  a Variable's trailing .value is not part of the name)."""
  names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  if names and names[-1] == "value":
    names = names[:-1]
  return names == ["encoder", "embedding"]


def matmul_params(params, *, tied: bool) -> int:
  """N of the module docstring: parameter count without an untied embedding table."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not tied and _is_lookup_table(path):
      continue
    total += int(getattr(leaf, "size", 0))
  return total


def sequence_flops(model, seq_len: int) -> float:
  """Sum of the mixers' forward sequence terms per token (`Mixer.flops_per_token`)."""
  from ssm.mixer import Mixer  # noqa: PLC0415 (the trainer imports this module first)
  return float(sum(m.flops_per_token(seq_len) for _, m in nnx.iter_modules(model)
                   if isinstance(m, Mixer)))


def flops_per_token(model, params, seq_len: int) -> float:
  """Training FLOPs per token (module docstring) of `model` (an nnx module) with
  parameters `params` (arrays or shapes) on sequences of seq_len."""
  tied = bool(getattr(model, "tie_embeddings", False))
  return 6.0 * matmul_params(params, tied=tied) + 3.0 * sequence_flops(model, seq_len)


def mfu(tokens_per_s: float, flops_per_tok: float, *, dtype: str,
        devices=None) -> float | None:
  """Model FLOPs utilisation of these devices (default: all of jax.devices()), or None
  where their peak is unknown."""
  devices = jax.devices() if devices is None else devices
  peak = peak_flops(devices[0].device_kind, dtype)
  if peak is None:
    return None
  return tokens_per_s * flops_per_tok / (peak * len(devices))
