"""Memory caching (MC) for linear memories: RNNs whose memory grows with the sequence.

Behrouz et al. 2026, "Memory Caching: RNNs with Growing Memory" (arXiv 2602.24281; no
official code).

What this was checked against (issue 27). The paper's method section could not be read
here: the stored copies of its arXiv HTML page, its Hugging Face page and mirrors return
only the title and abstract. Read instead: the abstract; third-party summaries of the
method (howistudyai.com, gentic.news, bemiagent.com, wispaper.ai, arxivlens.com,
emergentmind.com); and the unofficial PyTorch reproduction (github kmccleary3301/
memory_caching, `src/memory_caching/layer.py`, PyPI memory-caching). No equation below is
quoted from the paper; "summaries" are what those pages say in words.

| equation (our notation)                  | source found          | this code           |
|------------------------------------------|-----------------------|---------------------|
| segments of fixed size; the memory at a  | abstract, summaries,  | follows             |
| segment's end is cached, M^(i)           | unofficial package    |                     |
| token t reads its online memory M_t and  | summaries, package    | follows             |
| the cached M^(i), i < s(t); cost O(N L)  | (summaries: O(NL))    | (O(L x segments))   |
| segment start: checkpoint (continue) or  | package (both modes)  | follows, default    |
| restart (independent compressors)        |                       | checkpoint          |
| RM: y = M_t(q) + sum_i M^(i)(q)          | summaries ("sum all   | follows             |
|                                          | cached"), package     |                     |
| GRM: y = g^on M_t(q) + sum_i g^i M^(i)(q)| summaries ("input-    | follows; softmax    |
| g = softmax_i <u_t, pool(keys of seg i)>,| dependent gates per   | includes the online |
| the online segment pooled up to t        | segment"), package    | segment, as package |
| u_t = W_u x_t, or u_t = q_t ("shared")   | arxivlens ("shared u  | follows: mixers     |
|                                          | and q"), package      | learn W_u; default q|
| pool = mean over the segment's keys      | package: SUM          | option `pooling`,   |
|                                          | (paper: not readable) | default "mean" (a)  |
| Soup: M*_t = g^on M_t + sum_i g^i M^(i), | summaries ("averages  | follows (step form  |
| y = M*_t(q) (mix parameters, then read)  | the parameters"), pkg | mixes the states)   |
| SSC: router = the GRM scores; keep the   | summaries ("router",  | follows; top_k over |
| top_k cached; softmax over them + online | "only a few caches    | cached only, online |
| and read only those                      | per token"), package  | always kept (d)     |
| logarithmic segmentation                 | package               | absent (b)          |
| deep (MLP) memories                      | abstract              | absent (c)          |

(a) The mean keeps the scores' scale independent of the segment size and of how far the
    online segment has run; "sum" reproduces the package (tests cover both). Which the
    paper uses could not be read here.
(b) Constant segments only: the sweep (scripts/mqar_suite.py sweep) varies their size.
(c) Linear memories only (matrix states with a scalar or per-key decay), where Soup and
    GRM coincide; a deep memory's soup would mix its weights, which GRM does not.

(d) Fixed here: the step form read all cached memories and zeroed the unselected ones, so
    SSC cost as much as GRM at inference; it now gathers the top_k memories and reads only
    those, O(top_k dk dv) per token instead of O(segments dk dv). The parallel (training)
    form still computes every cached read and masks (dense, as the package does).

Beyond (a)-(d) nothing was found that departs from these sources in the equations; tests/test_memory_caching_paper.py checks each row on hand-computed
examples, tests/test_memory_caching.py the general definition.

A *linear memory* is a matrix state per head, S (dk, dv), written and read as

    S_t = a_t * S_{t-1} + k_t v_t^T          a_t = exp(log_a_t) in (0, 1]
    M(q) = q^T S                              (dv,)

with log_a_t a scalar per head (Mamba-2, lightning, retention), a vector over the
key dim (Mamba-1's exp(dt A), elementwise on S's rows) or absent (plain linear
attention). MC cuts the sequence into segments of `segment_size` tokens
(segment s(t) = t // segment_size) and, at the end of every segment, caches a copy
of the memory. Token t reads the *online* memory M_t (its own segment so far) and
the memories cached at the end of every earlier segment, M^(0) .. M^(s(t)-1):

    residual: y_t = M_t(q_t) + sum_{i < s(t)} M^(i)(q_t)
    gated:    y_t = g_t^on M_t(q_t) + sum_{i < s(t)} g_t^i M^(i)(q_t)      (GRM, default)
              g_t = softmax over {i < s(t)} + {online} of the scores
              r_t^i = <u_t, mean of the gate keys over segment i>,
              r_t^on = <u_t, mean of the gate keys of segment s(t) up to and including t>
    soup:     y_t = M*_t(q_t), M*_t = g_t^on M_t + sum_i g_t^i M^(i) (states mixed first);
              for linear memories this equals "gated" (the parallel form computes it
              so; the step form mixes the states, and tests hold the two equal)
    sparse:   only the top_k cached scores survive (SSC, the paper's MoE-style
              router); the softmax runs over those and the online score.

The gate token u_t defaults to q_t and the gate keys to k_t (mixers pass a learned
u_t = W_u x_t). Summaries pool the gate keys with the mean (`pooling="mean"`, default;
for the online segment the mean over the tokens seen so far) or the sum
(`pooling="sum"`, the unofficial package's choice).

How a segment's memory starts (`state_init`; both are in the unofficial package):

    "checkpoint" (default): one continuous recurrence; the cached memories are
      checkpoints of it (M_0^(s) = M^(s-1)), the online memory is the ordinary
      recurrent state. The base model's output is y = M_t(q_t) unchanged.
    "restart": independent compressors; every segment's memory starts from zero,
      so M^(i) summarises segment i alone.

Special cases (tested): one segment covering the sequence is the base recurrence;
with segment_size 1, "restart" and "residual", every token is its own memory and
y_t = sum_{s<=t} (q_t . k_s) v_s (unnormalised, decay-free linear attention); with
"checkpoint" and "residual", y_t = sum_{s<=t} (t - s + 1) (q_t . k_s) v_s when there
is no decay.

Cost of the parallel form: the online read is a chunked linear recurrence,
O(L dk dv); the cached reads are O(L x number of segments x dk dv) time and
O(L x segments x dv) memory for gated/soup/sparse (residual sums the cached states
once per segment, O(L dk dv)). No (L, L) matrix is formed. For a per-key-dim decay
(Mamba-1) the online read materialises all states, (b, L, h, dk, dv), as the XLA
selective scan reference does.

Step form: `init_cache_state` + `cached_memory_step`. The state holds the online
memory and a fixed-capacity buffer of `max_segments` cached memories (plus their
pooled gate keys) with a count, so it jits with a static shape; it grows by one
cached memory at the end of each segment. Past capacity the oldest memory is
overwritten (ring buffer): step and parallel forms agree for sequences of up to
(max_segments + 1) * segment_size tokens.

Mixers take the option `memory_caching=dict(segment_size=..., variant="gated",
top_k=None, state_init="checkpoint", max_segments=64, pooling="mean")`, validated by
`memory_caching_config`.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ssm.ops._dtypes import compute_dtype
from ssm.ops.linear_scan import assoc_scan
from ssm.ops.ssd import segsum

VARIANTS = ("residual", "gated", "soup", "sparse")
POOLINGS = ("mean", "sum")
STATE_INITS = ("checkpoint", "restart")
DEFAULT_MAX_SEGMENTS = 64


# -- configuration --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MemoryCachingConfig:
  """Validated memory-caching options (see the module docstring).

  segment_size: tokens per segment, int >= 1.
  variant: "residual" | "gated" | "soup" | "sparse".
  top_k: cached memories kept per token by "sparse", int in [1, max_segments];
    must be None for the other variants.
  state_init: "checkpoint" | "restart".
  max_segments: capacity of the step-mode buffer of cached memories.
  pooling: "mean" | "sum", how a segment's gate keys are pooled into its summary.
  """

  segment_size: int
  variant: str = "gated"
  top_k: int | None = None
  state_init: str = "checkpoint"
  max_segments: int = DEFAULT_MAX_SEGMENTS
  pooling: str = "mean"

  def __post_init__(self):
    _check_options(self.segment_size, self.variant, self.top_k, self.state_init, self.pooling)
    if not _is_int(self.max_segments) or self.max_segments < 1:
      raise ValueError(f"memory_caching: max_segments must be an int >= 1, "
                       f"got {self.max_segments!r}")
    if self.top_k is not None and self.top_k > self.max_segments:
      raise ValueError(f"memory_caching: top_k={self.top_k} exceeds the number of cached "
                       f"segments allowed (max_segments={self.max_segments})")

  @property
  def gated(self) -> bool:
    """Whether the variant needs gate tokens u_t (all but "residual")."""
    return self.variant != "residual"

  def capacity(self, max_len: int | None = None) -> int:
    """Cached-memory slots of the step state: enough for max_len tokens when given (the
    segments before the last one), else max_segments."""
    if max_len is None:
      return self.max_segments
    return max(1, -(-max_len // self.segment_size) - 1)

  def read_kwargs(self) -> dict[str, Any]:
    """The keyword arguments of `cached_memory_read` / `cached_memory_step`."""
    return dict(segment_size=self.segment_size, variant=self.variant, top_k=self.top_k,
                state_init=self.state_init, pooling=self.pooling)


def memory_caching_config(options) -> MemoryCachingConfig | None:
  """The `memory_caching` option of a mixer: None, a dict or a MemoryCachingConfig."""
  if options is None or isinstance(options, MemoryCachingConfig):
    return options
  if not hasattr(options, "keys"):
    raise ValueError(f"memory_caching must be None or a dict, got {options!r}")
  options = dict(options)
  valid = [f.name for f in dataclasses.fields(MemoryCachingConfig)]
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise ValueError(f"memory_caching got unknown keys {unknown}; valid keys: {valid}")
  if "segment_size" not in options:
    raise ValueError("memory_caching needs segment_size")
  return MemoryCachingConfig(**options)


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _check_options(segment_size, variant, top_k, state_init, pooling="mean"):
  if pooling not in POOLINGS:
    raise ValueError(f"memory_caching: pooling must be one of {POOLINGS}, got {pooling!r}")
  if not _is_int(segment_size) or segment_size < 1:
    raise ValueError(f"memory_caching: segment_size must be an int >= 1, got {segment_size!r}")
  if variant not in VARIANTS:
    raise ValueError(f"memory_caching: variant must be one of {VARIANTS}, got {variant!r}")
  if state_init not in STATE_INITS:
    raise ValueError(
        f"memory_caching: state_init must be one of {STATE_INITS}, got {state_init!r}")
  if variant == "sparse":
    if not _is_int(top_k) or top_k < 1:
      raise ValueError(f"memory_caching: variant 'sparse' needs an int top_k >= 1, "
                       f"got {top_k!r}")
  elif top_k is not None:
    raise ValueError(f"memory_caching: top_k is only used by variant 'sparse' "
                     f"(got top_k={top_k!r} with variant {variant!r})")


# -- shape checks ----------------------------------------------------------------

def _heads(named, fn):
  """The common head count of named (b, l, h?, ...) arrays whose head axis is 1 or h."""
  h = max(x.shape[2] for x in named.values())
  for name, x in named.items():
    if x.shape[2] not in (1, h):
      shapes = {n: tuple(a.shape) for n, a in named.items()}
      raise ValueError(f"{fn}: head axis of {name} must be 1 or {h}, got shapes {shapes}")
  return h


def _check_read_args(q, k, v, log_a, gate_u, gate_keys, fn="cached_memory_read"):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{fn}: {name} must be (batch, length, heads, dim), got {x.shape}")
  b, l = v.shape[:2]
  if l < 1:
    raise ValueError(f"{fn}: empty sequence (v {v.shape})")
  if q.shape[:2] != (b, l) or k.shape[:2] != (b, l):
    raise ValueError(f"{fn}: q, k, v must share (batch, length); got q {q.shape}, "
                     f"k {k.shape}, v {v.shape}")
  if q.shape[3] != k.shape[3]:
    raise ValueError(f"{fn}: q and k must share the key dim; got q {q.shape}, k {k.shape}")
  named = {"q": q, "k": k, "v": v}
  if log_a is not None:
    dk = k.shape[3]
    if log_a.ndim not in (3, 4) or log_a.shape[:2] != (b, l) or (
        log_a.ndim == 4 and log_a.shape[3] != dk):
      raise ValueError(f"{fn}: log_a must be None, (batch, length, heads) or (batch, "
                       f"length, heads, dk={dk}), got {log_a.shape}")
    named["log_a"] = log_a
  h = _heads(named, fn)
  gate = {}
  for name, x in (("gate_u", gate_u), ("gate_keys", gate_keys)):
    if x is not None:
      if x.ndim != 4 or x.shape[:2] != (b, l):
        raise ValueError(f"{fn}: {name} must be (batch, length, heads, du), got {x.shape}")
      gate[name] = x
  gu = q if gate_u is None else gate_u
  gk = k if gate_keys is None else gate_keys
  if gu.shape[3] != gk.shape[3]:
    raise ValueError(f"{fn}: gate tokens and gate keys must share their last dim; got "
                     f"{gu.shape} and {gk.shape}")
  if gate:
    _heads({"v": v, "gate_u": gu, "gate_keys": gk}, fn)
  return h


# -- the online recurrence (parallel over chunks) ---------------------------------

def _bcast_heads(x, h):
  return jnp.broadcast_to(x, x.shape[:2] + (h,) + x.shape[3:])


def _online_scalar(q, k, v, log_a, reset, c):
  """Chunked linear memory with a scalar (or no) decay per head and step.

  q, k: (b, L, h?, dk); v: (b, L, h, dv); log_a: (b, L, h?) or None; L = nc * c;
  reset: (nc,) bool, the carry into chunk n is zeroed where True.
  Returns y (b, L, h, dv) and the state after every chunk (b, nc, h, dk, dv).
  """
  b, L, h, dv = v.shape
  nc = L // c
  chunks = lambda x: x.reshape((b, nc, c) + x.shape[2:])
  qc = chunks(_bcast_heads(q, h))
  kc = chunks(_bcast_heads(k, h))
  vc = chunks(v)
  if log_a is None:
    la = jnp.zeros((1, nc, h, c), v.dtype)
  else:
    la = jnp.moveaxis(chunks(_bcast_heads(log_a[..., None], h)[..., 0]), 2, 3)  # (b,nc,h,c)
  seg = segsum(la)                                            # (b?, nc, h, c, c)
  cum = jnp.cumsum(la, axis=-1)                               # (b?, nc, h, c) inclusive
  scores = jnp.einsum("bnthk,bnshk->bnhts", qc, kc) * jnp.exp(seg)
  y_intra = jnp.einsum("bnhts,bnshv->bnthv", scores, vc)
  # Each chunk's own contribution to the state at its end, and its total decay.
  to_end = jnp.exp(seg[..., -1, :])                           # (b?, nc, h, c)
  x_chunk = jnp.einsum("bnhs,bnshk,bnshv->bnhkv", to_end, kc, vc)
  keep = 1.0 - reset.astype(v.dtype)[None, :, None]
  a_chunk = jnp.exp(cum[..., -1]) * keep                      # (b?, nc, h)
  states = assoc_scan(a_chunk[..., None, None], x_chunk)    # after each chunk
  before = jnp.concatenate([jnp.zeros_like(states[:, :1]), states[:, :-1]], axis=1)
  before = before * keep[..., None, None]
  q_decay = qc * jnp.exp(jnp.moveaxis(cum, 2, 3))[..., None]  # (b, nc, c, h, dk)
  y_inter = jnp.einsum("bnthk,bnhkv->bnthv", q_decay, before)
  return (y_intra + y_inter).reshape(b, L, h, dv), states


def _online_per_key(q, k, v, log_a, reset):
  """Linear memory with a decay per head and key dim (Mamba-1), all states at once.

  log_a: (b, L, h?, dk); reset: (L,) bool, the carry into token t is zeroed.
  Returns y (b, L, h, dv) and every state (b, L, h, dk, dv).
  """
  h = v.shape[2]
  a = jnp.exp(_bcast_heads(log_a, h)) * (1.0 - reset.astype(v.dtype))[None, :, None, None]
  x = _bcast_heads(k, h)[..., :, None] * v[..., None, :]
  states = assoc_scan(a[..., None], x)
  y = jnp.einsum("blhk,blhkv->blhv", _bcast_heads(q, h), states)
  return y, states


def entering_states(local_ends, decay):
  """The state entering each segment of one continuous recurrence, from each segment's own
  end state (run from a zero state) and its total decay: E_0 = 0, E_{s+1} = a_s E_s + R_s.

  local_ends R (b, n_seg, ...); decay a (b, n_seg, ...), broadcastable against R past the
  first two axes -> E (b, n_seg, ...). Kernels that run a layer's segments as one batch
  (`ssm.mamba.selective_segment_reads`, `ssm.mamba2.ssd_segment_reads`) chain their
  segments with it for state_init="checkpoint".
  """
  after = assoc_scan(decay, local_ends)
  return jnp.concatenate([jnp.zeros_like(after[:, :1]), after[:, :-1]], axis=1)


# -- gates -------------------------------------------------------------------------

def _gate_weights(variant, top_k, scores, valid, score_on):
  """Weights of the cached memories (..., n) and of the online memory (...,).

  scores: (..., n) cached scores; valid: bool broadcastable to scores; score_on: (...).
  """
  valid = jnp.broadcast_to(valid, scores.shape)
  if variant == "residual":
    return valid.astype(scores.dtype), jnp.ones(score_on.shape, scores.dtype)
  if variant == "sparse":
    n = scores.shape[-1]
    masked = jnp.where(valid, scores, -jnp.inf)
    _, idx = lax.top_k(masked, min(top_k, n))
    chosen = jnp.any(jnp.arange(n) == idx[..., None], axis=-2)
    valid = valid & chosen
  logits = jnp.concatenate([jnp.where(valid, scores, -jnp.inf), score_on[..., None]], -1)
  w = jax.nn.softmax(logits, axis=-1)
  return w[..., :-1], w[..., -1]


# -- parallel form -------------------------------------------------------------------

def cached_memory_read(q, k, v, log_a=None, *, segment_size: int, variant: str = "gated",
                       top_k: int | None = None, gate_u=None, gate_keys=None,
                       state_init: str = "checkpoint", chunk_size: int = 64, online=None,
                       pooling: str = "mean"):
  """Memory-cached read of a linear memory over a whole sequence (parallel form).

  Args:
    q: (b, l, h or 1, dk) queries; k: (b, l, h or 1, dk) keys; v: (b, l, h, dv)
      values (any of the three head axes may be 1 and broadcast).
    log_a: None (no decay), (b, l, h or 1) a log-decay per head and step, or
      (b, l, h or 1, dk) per key dim; <= 0. S_t = exp(log_a_t) S_{t-1} + k_t v_t^T.
    segment_size: tokens per segment (int >= 1).
    variant: "residual" | "gated" | "soup" | "sparse" (module docstring).
    top_k: cached memories kept per token by "sparse" (>= 1; all when fewer exist).
    gate_u: (b, l, h or 1, du) gate tokens (default q).
    gate_keys: (b, l, h or 1, du) what segment summaries pool (default k).
    state_init: "checkpoint" (continuous recurrence) | "restart" (fresh memory
      per segment).
    chunk_size: chunk of the online recurrence (a segment is split into
      ceil(segment_size / chunk_size) equal chunks).
    online: None, or the online read computed elsewhere (a kernel): a pair
      (y_on (b, l, h, dv), segment states (b, ceil(l / segment_size), h, dk, dv)), the
      memory's own output at every token and its state at every segment's end, as
      `state_init` defines them (e.g. `ssm.mamba2.ssd_segment_reads`). Then q, k, v and
      log_a serve the gates and shapes only.

  Returns:
    y: (b, l, h, dv), dtype of q. Computed in float32.
  """
  h = _check_read_args(q, k, v, log_a, gate_u, gate_keys)
  _check_options(segment_size, variant, top_k, state_init, pooling)
  if not _is_int(chunk_size) or chunk_size < 1:
    raise ValueError(f"cached_memory_read: chunk_size must be an int >= 1, got {chunk_size!r}")
  out_dtype = q.dtype
  acc = compute_dtype(q, k, v)
  f32 = lambda x: None if x is None else x.astype(acc)
  q, k, v, log_a = f32(q), f32(k), _bcast_heads(f32(v), h), f32(log_a)
  gu = q if gate_u is None else f32(gate_u)
  gk = k if gate_keys is None else f32(gate_keys)
  b, l = v.shape[:2]
  S = segment_size
  n_seg = -(-l // S)
  m = -(-S // chunk_size)              # chunks per segment
  c = -(-S // m)                       # chunk length
  Sp = m * c

  # Lay the sequence out as n_seg segments of Sp tokens: padding (zero keys, values,
  # log-decays) at the end of a segment leaves the memory unchanged.
  def to_segments(x):
    x = jnp.pad(x, [(0, 0), (0, n_seg * S - l)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((b, n_seg, S) + x.shape[2:])
    x = jnp.pad(x, [(0, 0), (0, 0), (0, Sp - S)] + [(0, 0)] * (x.ndim - 3))
    return x.reshape((b, n_seg * Sp) + x.shape[3:])

  def from_segments(y):
    return y.reshape((b, n_seg, Sp) + y.shape[2:])[:, :, :S].reshape(
        (b, n_seg * S) + y.shape[2:])[:, :l]

  restart = state_init == "restart"
  if online is not None:
    y_on, seg_states = (x.astype(acc) for x in online)
    if y_on.shape != v.shape or seg_states.shape != (b, n_seg, h, k.shape[3], v.shape[3]):
      raise ValueError(f"cached_memory_read: online must be (y {v.shape}, states "
                       f"{(b, n_seg, h, k.shape[3], v.shape[3])}), got {y_on.shape}, "
                       f"{seg_states.shape}")
  else:
    qs, ks, vs = to_segments(q), to_segments(k), to_segments(v)
    las = None if log_a is None else to_segments(log_a)
    if las is not None and las.ndim == 4:
      reset = (jnp.arange(n_seg * Sp) % Sp == 0) & restart
      y_on, states = _online_per_key(qs, ks, vs, las, reset)
      seg_states = states[:, Sp - 1::Sp]                 # (b, n_seg, h, dk, dv)
    else:
      reset = (jnp.arange(n_seg * m) % m == 0) & restart
      y_on, states = _online_scalar(qs, ks, vs, las, reset, c)
      seg_states = states[:, m - 1::m]
    y_on = from_segments(y_on)                           # (b, l, h, dv)
  n_cached = n_seg - 1
  if n_cached == 0:
    return y_on.astype(out_dtype)

  seg_of = jnp.arange(l) // S                            # (l,)
  valid = jnp.arange(n_cached)[None, :] < seg_of[:, None]  # (l, n): segment i < s(t)
  cached = seg_states[:, :n_cached]

  def read_states(q_, states, lhs, rhs):
    """q_ (.., 1 or h, dk) read against states (.., h, dk, dv): with one query head shared
    by all (Mamba-1: q = C_t) it is one batched GEMM over (h, dv) columns; broadcasting the
    query to every head first would make it h products with dv (= 1) columns."""
    if q_.shape[-2] == 1:
      return jnp.einsum(f"{lhs.replace('h', '')},{rhs}", q_[..., 0, :], states)
    return jnp.einsum(f"{lhs},{rhs}", q_, states)

  if variant == "residual":
    # sum_{i < s} S_i once per segment: O(L dk dv), no per-(token, segment) reads.
    prefix = jnp.cumsum(cached, axis=1)
    prefix = jnp.concatenate([jnp.zeros_like(prefix[:, :1]), prefix], axis=1)
    qseg = jnp.pad(q, [(0, 0), (0, n_seg * S - l), (0, 0), (0, 0)]).reshape(
        (b, n_seg, S) + q.shape[2:])
    y_c = read_states(qseg, prefix, "bnshk", "bnhkv->bnshv").reshape(
        (b, n_seg * S, h, v.shape[-1]))[:, :l]
    return (y_on + y_c).astype(out_dtype)

  # Segment summaries: mean of the gate keys over each cached segment, and the
  # running mean over the current segment for the online memory.
  gks = jnp.pad(gk, [(0, 0), (0, n_seg * S - l), (0, 0), (0, 0)]).reshape(
      (b, n_seg, S) + gk.shape[2:])
  summaries = jnp.sum(gks[:, :n_cached], axis=2)          # (b, n, g, du)
  running = jnp.cumsum(gks, axis=2)
  if pooling == "mean":
    summaries = summaries / S
    running = running / jnp.arange(1, S + 1, dtype=acc)[:, None, None]
  running = running.reshape((b, n_seg * S) + gk.shape[2:])[:, :l]  # (b, l, g, du)
  g = max(gu.shape[2], gk.shape[2])
  gu_b = _bcast_heads(gu, g)
  scores = jnp.einsum("blgd,bngd->blgn", gu_b, _bcast_heads(summaries, g))
  score_on = jnp.sum(gu_b * _bcast_heads(running, g), axis=-1)      # (b, l, g)
  w_c, w_on = _gate_weights(variant, top_k, scores, valid[None, :, None, :], score_on)
  # The reads of every cached memory (b, l, h, n, dv), weighted and summed; the gate
  # weights (b, l, g, n) broadcast over the heads (g = 1 or h) in the fused product.
  reads = read_states(q, cached, "blhk", "bnhkv->blhnv")
  y_c = jnp.sum(w_c[..., None] * reads, axis=3)
  return (w_on[..., None] * y_on + y_c).astype(out_dtype)


# -- step form ------------------------------------------------------------------------

class MemoryCacheState(NamedTuple):
  """Recurrent state of a memory-cached linear memory (all float32 but the counters).

  online: (b, h, dk, dv) the current segment's memory.
  key_sum: (b, g, du) sum of the gate keys seen in the current segment.
  cached: (b, max_segments, h, dk, dv) cached memories (ring buffer).
  summaries: (b, max_segments, g, du) their pooled gate keys (means).
  pos: () int32 tokens seen; count: () int32 memories cached so far.
  """

  online: jax.Array
  key_sum: jax.Array
  cached: jax.Array
  summaries: jax.Array
  pos: jax.Array
  count: jax.Array


def init_cache_state(batch_size: int, num_heads: int, key_dim: int, value_dim: int, *,
                     max_segments: int = DEFAULT_MAX_SEGMENTS, gate_heads: int | None = None,
                     gate_dim: int | None = None, dtype=jnp.float32) -> MemoryCacheState:
  """Empty state for `cached_memory_step`.

  gate_heads / gate_dim: head count (1 or num_heads) and last dim of the gate keys;
  default num_heads and key_dim (the gate keys are the keys). dtype: float32
  (float64 only for tests).
  """
  g = num_heads if gate_heads is None else gate_heads
  du = key_dim if gate_dim is None else gate_dim
  if not _is_int(max_segments) or max_segments < 1:
    raise ValueError(f"init_cache_state: max_segments must be an int >= 1, got {max_segments!r}")
  z = lambda *s: jnp.zeros(s, dtype)
  return MemoryCacheState(
      online=z(batch_size, num_heads, key_dim, value_dim),
      key_sum=z(batch_size, g, du),
      cached=z(batch_size, max_segments, num_heads, key_dim, value_dim),
      summaries=z(batch_size, max_segments, g, du),
      pos=jnp.zeros((), jnp.int32), count=jnp.zeros((), jnp.int32))


def cached_memory_step(state: MemoryCacheState, q_t, k_t, v_t, log_a_t=None, *,
                       segment_size: int, variant: str = "gated", top_k: int | None = None,
                       gate_u_t=None, gate_keys_t=None, state_init: str = "checkpoint",
                       pooling: str = "mean"):
  """One token of `cached_memory_read`.

  Args:
    state: from `init_cache_state` (or a previous step).
    q_t, k_t: (b, h or 1, dk); v_t: (b, h, dv); log_a_t: None, (b, h or 1) or
      (b, h or 1, dk); gate_keys_t: (b, g or 1, du) with g the state's gate heads;
      gate_u_t: (b, h or 1, du) (defaults q_t, k_t).
    Other options as in `cached_memory_read`.

  Returns:
    (state, y_t) with y_t (b, h, dv) in q_t's dtype.
  """
  _check_options(segment_size, variant, top_k, state_init, pooling)
  b, h, dk, dv = state.online.shape
  M = state.cached.shape[1]
  gu = q_t if gate_u_t is None else gate_u_t
  gk = k_t if gate_keys_t is None else gate_keys_t
  want = {"q_t": (b, h, dk), "k_t": (b, h, dk), "v_t": (b, h, dv),
          "gate_u_t": (b, h) + state.key_sum.shape[2:], "gate_keys_t": state.key_sum.shape}
  got = {"q_t": q_t, "k_t": k_t, "v_t": v_t, "gate_u_t": gu, "gate_keys_t": gk}
  if log_a_t is not None:
    want["log_a_t"] = (b, h) if log_a_t.ndim == 2 else (b, h, dk)
    got["log_a_t"] = log_a_t
  for name, x in got.items():
    w = want[name]
    if x.ndim != len(w) or x.shape[0] != w[0] or x.shape[2:] != w[2:] or (
        x.shape[1] not in (1, w[1])):
      raise ValueError(f"cached_memory_step: {name} must have shape {w} (head axis 1 or "
                       f"{w[1]}) to match the state, got {x.shape}")
  out_dtype = q_t.dtype
  acc = compute_dtype(state.online, q_t, k_t, v_t)
  f32 = lambda x: x.astype(acc)
  q, k, v, gu, gk = f32(q_t), f32(k_t), f32(v_t), f32(gu), f32(gk)

  online = state.online
  if log_a_t is not None:
    la = f32(log_a_t)
    decay = jnp.exp(la)[..., None, None] if la.ndim == 2 else jnp.exp(la)[..., None]
    online = decay * online
  online = online + k[..., :, None] * v[..., None, :]
  key_sum = state.key_sum + gk  # broadcasts a single gate head
  pos = state.pos
  qh = jnp.broadcast_to(q, (b, h, dk))
  y_on = jnp.einsum("bhk,bhkv->bhv", qh, online)
  n_valid = jnp.minimum(state.count, M)
  valid = jnp.arange(M) < n_valid                                   # (M,)

  if variant == "residual":
    w_c = jnp.broadcast_to(valid.astype(acc)[None, None], (b, h, M))
    y = y_on + jnp.einsum("bhm,bhk,bmhkv->bhv", w_c, qh, state.cached)
  else:
    g = max(gu.shape[1], state.key_sum.shape[1])
    gu_b = jnp.broadcast_to(gu, (b, g, gu.shape[-1]))
    summaries = jnp.broadcast_to(state.summaries, (b, M, g, gu.shape[-1]))
    n_in = (pos % segment_size + 1).astype(acc) if pooling == "mean" else 1.0
    scores = jnp.einsum("bgd,bmgd->bgm", gu_b, summaries)
    score_on = jnp.sum(gu_b * key_sum / n_in, axis=-1)
    w_c, w_on = _gate_weights(variant, top_k, scores, valid, score_on)
    w_c = jnp.broadcast_to(w_c, (b, h, M))
    w_on = jnp.broadcast_to(w_on[..., None], (b, h, 1))[..., 0]
    if variant == "soup":
      # Mix the memories first, then read once (memory soup).
      mixed = w_on[..., None, None] * online + jnp.einsum("bhm,bmhkv->bhkv", w_c, state.cached)
      y = jnp.einsum("bhk,bhkv->bhv", qh, mixed)
    elif variant == "sparse":
      # Read only the top_k selected memories: the unselected have weight exactly 0, so
      # the top_k weights are the selected ones (ties at 0 add nothing).
      w_sel, idx = lax.top_k(w_c, min(top_k, M))                     # (b, h, k)
      by_head = jnp.moveaxis(state.cached, 1, 2)                      # (b, h, M, dk, dv)
      sel = jnp.take_along_axis(by_head, idx[..., None, None], axis=2)
      y = w_on[..., None] * y_on + jnp.einsum("bhm,bhk,bhmkv->bhv", w_sel, qh, sel)
    else:
      y = w_on[..., None] * y_on + jnp.einsum("bhm,bhk,bmhkv->bhv", w_c, qh, state.cached)

  # At the end of a segment cache the memory and its pooled keys; restart empties it.
  end = (pos + 1) % segment_size == 0
  slot = state.count % M
  cached = jnp.where(end, state.cached.at[:, slot].set(online), state.cached)
  pooled = key_sum / segment_size if pooling == "mean" else key_sum
  summaries = jnp.where(end, state.summaries.at[:, slot].set(pooled),
                        state.summaries)
  if state_init == "restart":
    online = jnp.where(end, jnp.zeros_like(online), online)
  key_sum = jnp.where(end, jnp.zeros_like(key_sum), key_sum)
  new_state = MemoryCacheState(online, key_sum, cached, summaries, pos + 1,
                               state.count + end.astype(jnp.int32))
  return new_state, y.astype(out_dtype)


def max_sequence_length(config: MemoryCachingConfig) -> int:
  """Longest sequence for which the step form equals the parallel form."""
  return (config.max_segments + 1) * config.segment_size


__all__ = ["VARIANTS", "STATE_INITS", "POOLINGS", "MemoryCachingConfig", "memory_caching_config",
           "cached_memory_read", "MemoryCacheState", "init_cache_state", "cached_memory_step",
           "max_sequence_length"]
