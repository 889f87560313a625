"""The sequence mixer shared by the time-invariant layers (LSSL, S4, S4D, SGConv).

Each of those layers is a *kernel module*: an NNX module that owns the SSM's
parameters and produces a convolution kernel and, for the causal recurrent mode,
a state and a step. `LTIMixer` wraps any kernel module into the layer the papers
use:

    y = act(K * x + D x)          K * x by FFT: all channels (and both directions) from
                                  one transform of x (`fft_conv_bank_xla`), or per channel
                                  by the Pallas kernel of `ssm.ops.fft_conv` (impl="pallas";
                                  "auto" keeps the bank: see `lti_conv`)
    y = dropout(y)
    out = output projection(y)    "glu": Linear(c*h -> 2h) then GLU, "linear": Linear(c*h -> h)

Kernel module protocol (duck-typed):

    kernel.d_model, kernel.channels           h and c
    kernel(seq_len) -> K                      (c, h, seq_len) float32
    kernel.init_state(batch_size) -> state    any pytree
    kernel.step(state, u_t) -> (state, y_t)   u_t (b, h), y_t (b, c, h); no D term
    kernel.diagonal() -> (log_ab, w)          optional (S4D): K[i, h, l] = 2 Re sum_m
                                              w[i, h, m] exp(l log_ab[h, m]), (h, n) and
                                              (c, h, n) complex (`ssm.ops.diag_conv`
                                              convolves with it as a chunked recurrence;
                                              the layer keeps the FFT bank, faster on GPUs)

Bidirectional mode (non-causal use, e.g. LRA classification): the kernel module is
built with 2c channels; the first c run forward in time, the last c run on the
time-reversed sequence, and the two outputs are added (S4's `bidirectional=True`).

Sequence parallelism: `seq_mesh=mesh` (a jax.sharding.Mesh with an axis `seq_axis`, default
"seq"; the batch split over every other axis) takes the length split over that axis, as
the recurrent mixers do (`ssm.mamba`), and the block around the layer then does not
gather it. `seq_conv` picks the convolution's path (`lti_conv`):

    "fft"     the distributed FFT (`ssm.ops.fft_conv_seq_parallel.fft_conv_bank_seq_parallel`):
              each device transforms its own chunk, two all-to-alls; 2 (1 + c) (P - 1) / P
              times the local input's bytes per device and direction
    "gather"  all-gather the length around the convolution only (every device convolves
              the whole length and keeps its chunk; `fft_conv_bank_seq_gather`):
              (P - 1) times the local bytes; the only path for impl="pallas"
    "auto"    (default) "fft" where its all-to-alls move no more bytes than the all-gather,
              P >= 2 (1 + c) (c = 1: a seq axis of 4 or more), and the chunk fits the
              decomposition; else "gather"

The default is chosen by those byte counts (read off the compiled programs, equal to the
formulas: results/seq_conv_cpu8.txt), which are what transfers to a GPU's interconnect.
The CPU times there (8 fake devices on 2 cores: an indication only, mostly of the FLOPs all
devices do, which the gather path repeats P times) agree: the distributed FFT was faster at
P = 8 on every shape (forward 1.4-2.7x), about level at P = 4 on small shapes and 1.5x
(forward) / 2.9x (forward + backward) faster at b4 l8192, slower forward at P = 2. No GPU
timing yet. The D skip, the activation and the output projection run on the split tokens
(GSPMD) either way (not flattened into one token axis there: FLAT_TOKENS); an LTI mixer
built without seq_mesh under a seq mesh is instead gathered whole by its block
(models.blocks, gather_mesh), the path before this option.
"""

import functools
import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ssm._activations import ACTIVATIONS as _ACT_FNS
from ssm._checks import positive_int
from ssm.mixer import Mixer
from ssm.ops import fft_conv
from ssm.ops.fft_conv import fft_conv_bank_xla, two_sided_kernel
from ssm.ops.fft_conv_seq_parallel import (fft_conv_bank_seq_gather, fft_conv_bank_seq_parallel,
                                           fft_moves_fewer_bytes)
from ssm.ops._impl import check_impl
from ssm.ops.seq_parallel import check_seq_mesh

ACTIVATIONS = ("gelu", "silu", "relu", "tanh", "identity")
# The output projection takes its input as one (tokens, c h) matrix. The convolution
# leaves time last, and XLA otherwise kept that layout into the projection: its weight
# gradient became a per-sequence batched GEMM and a sum over the batch, and the residual
# stream was transposed back and forth around it. Flat, the one transpose is fused into the
# convolution's epilogue. A module constant so that profile_train_step.py --set can A/B it.
# Not under a seq mesh: merging the batch and the split length into one axis made GSPMD
# all-gather the convolution's (b, l, c, h) output over the length (the compiled program).
FLAT_TOKENS = True
POSTACTS = ("glu", "linear", "none")
# The convolution's path under a seq mesh (module docstring).
SEQ_CONVS = ("auto", "fft", "gather")


def check_mixer_options(activation: str, postact: str, impl: str, d_model=1,
                        seq_conv: str = "auto") -> None:
  """ValueError listing the valid choices (and for a d_model that is not a positive int);
  factories call it before building parameters."""
  positive_int("LTI mixer", "d_model", d_model)
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
  if postact not in POSTACTS:
    raise ValueError(f"postact must be one of {POSTACTS}, got {postact!r}")
  check_impl("LTI mixer", impl)
  check_seq_conv("LTI mixer", seq_conv, impl)


def check_seq_conv(who: str, seq_conv: str, impl: str) -> None:
  if seq_conv not in SEQ_CONVS:
    raise ValueError(f"{who}: seq_conv must be one of {SEQ_CONVS}, got {seq_conv!r}")
  if seq_conv == "fft" and impl == "pallas":
    raise ValueError(f"{who}: seq_conv='fft' (the distributed FFT, jnp.fft) cannot run "
                     f"impl='pallas'; take seq_conv='gather' for the kernel")


def seq_conv_path(seq_conv: str, impl: str, *, n: int, channels: int, chunk: int) -> str:
  """The path "auto" takes (module docstring): "fft" or "gather"."""
  if seq_conv != "auto":
    return seq_conv
  fits = (2 * chunk) % n == 0
  return ("fft" if impl != "pallas" and fits and fft_moves_fewer_bytes(n, channels)
          else "gather")


def lti_conv(x, kernel_chl, *, bidirectional: bool, impl: str = "auto", seq_mesh=None,
             seq_axis: str = "seq", seq_conv: str = "auto"):
  """Channel-wise causal (or bidirectional) convolution of x with a kernel stack.

  Args:
    x: (b, l, h).
    kernel_chl: (c, h, l) for causal; (2c, h, l) for bidirectional, the last c
      applied to the time-reversed sequence.
    impl: "auto"/"xla": every channel and both directions from one FFT of x and one
      inverse (`fft_conv_bank_xla`); "pallas": one `fft_conv` kernel call per channel,
      both directions as one circular convolution with the two-sided kernel.
      "auto" stays on the bank even on Hopper, where `fft_conv` alone takes the kernel at
      FFT sizes 2048-4096: end to end the kernel made a ListOps S4 training step no faster
      and added compilation time (results/README.md).
    seq_mesh, seq_axis: x and the output split over the length on that mesh axis (the
      batch over the others); None: no split.
    seq_conv: the path under seq_mesh, "auto" | "fft" | "gather" (module docstring).

  Returns:
    (b, l, c, h).
  """
  c = kernel_chl.shape[0] // 2 if bidirectional else kernel_chl.shape[0]
  check_impl("lti_conv", impl)
  if seq_mesh is not None:
    check_seq_conv("lti_conv", seq_conv, impl)
    seq_mesh, seq_axis = check_seq_mesh("lti_conv", seq_mesh, seq_axis)
    n = seq_mesh.shape[seq_axis]
    path = seq_conv_path(seq_conv, impl, n=n, channels=c, chunk=x.shape[1] // n)
    k_causal, k_anti = kernel_chl[:c], (kernel_chl[c:] if bidirectional else None)
    if path == "fft":
      return fft_conv_bank_seq_parallel(x, k_causal, k_anti, mesh=seq_mesh, seq_axis=seq_axis)
    local = functools.partial(_whole_conv, bidirectional=bidirectional, impl=impl)
    return fft_conv_bank_seq_gather(x, k_causal, k_anti, mesh=seq_mesh, seq_axis=seq_axis,
                                    conv=local)
  if impl != "pallas":
    return fft_conv_bank_xla(x, kernel_chl[:c], kernel_chl[c:] if bidirectional else None)
  if not bidirectional:
    return jnp.stack([fft_conv(x, k, impl="pallas") for k in kernel_chl], axis=2)
  # Both directions in one kernel call: a circular convolution of x zero-padded to n with
  # the two-sided kernel (the kernel's circular mode needs a power-of-two n).
  l, lk = x.shape[1], kernel_chl.shape[-1]
  n = max(256, 1 << (l + lk - 2).bit_length())
  x_pad = jnp.pad(x, ((0, 0), (0, n - l), (0, 0)))
  kern = two_sided_kernel(kernel_chl[:c], kernel_chl[c:], n)               # (c, h, n)
  return jnp.stack([fft_conv(x_pad, kern[i], impl="pallas", circular=True)[:, :l]
                    for i in range(c)], axis=2)


def _whole_conv(x, k_causal, k_anti, *, bidirectional, impl):
  """lti_conv of a whole-length x (the gathered path's per-device convolution)."""
  kernel_chl = k_causal if k_anti is None else jnp.concatenate([k_causal, k_anti], axis=0)
  return lti_conv(x, kernel_chl, bidirectional=bidirectional, impl=impl)


class LTIMixer(Mixer):
  """A linear time-invariant SSM layer around a kernel module (the call, state and step
  contract is `ssm.mixer.Mixer`'s).

  Args:
    kernel: a kernel module (see the module docstring). For bidirectional=True it
      must have an even number of channels (forward half, backward half).
    bidirectional: add a second kernel run on the reversed sequence (not causal;
      no step mode).
    activation: applied after the convolution and D term.
    postact: output projection, "glu" (default, as S4/S4D), "linear" or "none"
      ("none" requires a single causal channel: the output is act(y) itself).
    dropout: rate after the activation.
    impl: "auto", "xla" or "pallas" for the convolution (`lti_conv`).
    dtype, param_dtype: of the output projection (`ssm.mixer.Mixer`); the kernel, its
      generation, the convolution and the D skip stay float32.
    seq_mesh, seq_axis: sequence parallelism (module docstring): a jax.sharding.Mesh with
      that axis, or None.
    seq_conv: "auto" | "fft" | "gather", the convolution's path under seq_mesh (module
      docstring); "fft" with impl="pallas" is refused.
  """

  def __init__(self, kernel: nnx.Module, *, bidirectional: bool = False,
               activation: str = "gelu", postact: str = "glu", dropout: float = 0.0,
               impl: str = "auto", dtype: str | None = None, param_dtype: str = "float32",
               seq_mesh=None, seq_axis: str = "seq", seq_conv: str = "auto",
               rngs: nnx.Rngs):
    check_mixer_options(activation, postact, impl, seq_conv=seq_conv)
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    who = f"{type(kernel).__name__} mixer"
    h = positive_int(who, "d_model", kernel.d_model)
    c_total = positive_int(who, "kernel channels", kernel.channels)
    if bidirectional and c_total % 2:
      raise ValueError(f"bidirectional needs an even number of kernel channels, got {c_total}")
    c = c_total // 2 if bidirectional else c_total
    if postact == "none" and c != 1:
      raise ValueError("postact='none' needs one channel per direction")
    self.name = who
    self.seq_mesh, self.seq_axis = check_seq_mesh(who, seq_mesh, seq_axis)
    self.seq_conv = seq_conv
    self._precision(dtype, param_dtype)
    self.kernel = kernel
    self.d_model, self.channels = h, c
    self.bidirectional = bidirectional
    self.activation, self.postact, self.impl = activation, postact, impl
    self.D = nnx.Param(jax.random.normal(rngs.params(), (c, h), jnp.float32))
    if postact == "glu":
      self.out_proj = self.dense(c * h, 2 * h, rngs=rngs)
    elif postact == "linear":
      self.out_proj = self.dense(c * h, h, rngs=rngs)
    else:
      self.out_proj = None
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  # -- shared tail -----------------------------------------------------------
  def _tail(self, y_clh_last, x, deterministic=None):
    """y (..., c, h) conv output, x (..., h) input -> (..., h) layer output."""
    y = y_clh_last + self.D[...] * x[..., None, :].astype(jnp.float32)
    y = _ACT_FNS[self.activation](y)
    lead = y.shape[:-2]
    flat = FLAT_TOKENS and self.seq_mesh is None
    y = y.reshape(*((-1,) if flat else lead), self.channels * self.d_model)
    y = self.dropout(y, deterministic=deterministic)
    if self.postact == "glu":
      y = jax.nn.glu(self.out_proj(self.compute(y)), axis=-1)
    elif self.postact == "linear":
      y = self.out_proj(self.compute(y))
    return y.reshape(*lead, y.shape[-1]).astype(x.dtype)

  def flops_per_token(self, seq_len: int) -> float:
    """The FFT convolution of every (channel, feature) map: the input's transform and the
    inverse at FFT size n = 2 L (causal) or L, 2.5 n log2 n real FLOPs each per sequence
    (the kernel's transform is per step, not per token), plus the pointwise product."""
    n = seq_len if self.bidirectional else 2 * seq_len
    maps = self.channels * self.d_model * (2 if self.bidirectional else 1)
    return maps * (5.0 * math.log2(max(n, 2)) + 6.0) * n / seq_len

  # -- parallel (convolution) mode --------------------------------------------
  def forward(self, x, *, mask, deterministic, segment_ids):
    """x (b, l, h) -> (b, l, h); padded rows of x are zero already (mask unused)."""
    del mask, segment_ids
    k = self.kernel(x.shape[1])
    y = lti_conv(x.astype(jnp.float32), k, bidirectional=self.bidirectional, impl=self.impl,
                 seq_mesh=self.seq_mesh, seq_axis=self.seq_axis, seq_conv=self.seq_conv)
    return self._tail(y, x, deterministic)

  # -- recurrent mode ----------------------------------------------------------
  def _init_state(self, batch_size: int, max_len: int | None) -> Any:
    del max_len  # a constant-size state
    return self.kernel.init_state(batch_size)

  def _step(self, state: Any, x_t: jax.Array) -> tuple[Any, jax.Array]:
    """One token: x_t (b, h) -> (state, y_t (b, h)). Dropout is off in step mode."""
    state, y = self.kernel.step(state, x_t.astype(jnp.float32))
    return state, self._tail(y, x_t, deterministic=True)


# -- the registry factory of an LTI layer -----------------------------------------------

def _keyword_options(fn) -> list[inspect.Parameter]:
  return [p for p in inspect.signature(fn).parameters.values()
          if p.kind == p.KEYWORD_ONLY and p.name not in ("rngs", "kernel")]


def lti_factory(kernel_cls, doc: str, **defaults):
  """The registry factory of an LTI layer: a `kernel_cls` kernel inside `LTIMixer`.

  Its options are the kernel's keyword options and LTIMixer's, their defaults read off
  the two signatures (written once, in the classes); `defaults` overrides those a layer
  sets differently (LSSL's postact="linear"). With bidirectional=True the kernel gets
  2 * channels output maps (the forward half, the backward half). The factory's
  signature lists them all, so `models.mixer_options` reads them as for any factory.
  """
  kernel_opts = _keyword_options(kernel_cls.__init__)
  mixer_opts = _keyword_options(LTIMixer.__init__)
  params = [p.replace(default=defaults.pop(p.name, p.default)) for p in kernel_opts + mixer_opts]
  if defaults:
    raise TypeError(f"lti_factory({kernel_cls.__name__}): no options {sorted(defaults)}")
  kernel_names = {p.name for p in kernel_opts}

  def make_mixer(d_model: int, *, rngs: nnx.Rngs, **options) -> LTIMixer:
    opts = {p.name: p.default for p in params}
    unknown = sorted(set(options) - set(opts))
    if unknown:
      raise TypeError(f"{kernel_cls.__name__} mixer: unknown options {unknown}")
    opts.update(options)
    check_mixer_options(opts["activation"], opts["postact"], opts["impl"], d_model,
                        opts["seq_conv"])
    kernel_kw = {n: v for n, v in opts.items() if n in kernel_names}
    kernel_kw["channels"] *= 2 if opts["bidirectional"] else 1
    kernel = kernel_cls(d_model, rngs=rngs, **kernel_kw)
    return LTIMixer(kernel, rngs=rngs, **{n: v for n, v in opts.items() if n not in kernel_names})

  make_mixer.__signature__ = inspect.Signature(
      [inspect.Parameter("d_model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=int),
       inspect.Parameter("rngs", inspect.Parameter.KEYWORD_ONLY, annotation=nnx.Rngs)] + params,
      return_annotation=LTIMixer)
  make_mixer.__doc__ = doc
  return make_mixer
