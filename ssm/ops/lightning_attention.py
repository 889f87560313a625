"""Lightning attention: causal linear attention with a per-head exponential decay.

    S_t = lambda_h S_{t-1} + k_t v_t^T,   S_{-1} = h0 (or 0),   o_t = q_t^T S_t
    o[t] = sum_{s<=t} lambda_h^(t-s) (q_t . k_s) v_s + lambda_h^(t+1) q_t^T h0

with lambda_h = exp(log_decay[h]) (log_decay <= 0; None is lambda = 1, plain
causal linear attention). No softmax and no denominator: the layer normalises the
output (TransNormerLLM's SRMSNorm).

XLA path (OpenNLPLab/lightning-attention's block form, Qin et al. 2024), blocks of
B = chunk_size tokens, j the position inside a block:

    intra:  O_intra = (Q K^T o M) V,  M[i, j] = lambda^(i-j) for i >= j, else 0
    inter:  O_inter = (Q o lambda^(i+1)) KV_before
    state:  KV_after = lambda^B KV_before + (K o lambda^(B-1-j))^T V   (float32)

The intra products and each block's contribution to the state are batched over
all blocks at once; only the (B, H, Dk, Dv) state recurrence across blocks is
sequential, and it runs as a log-depth associative scan. A length that is not a
multiple of B is zero-padded at the end; the last block's state update uses its
true length, so padding never reaches the state. On a GPU bf16 inputs feed the
matrix products in bf16 with float32 accumulation (as the Triton kernel does); the
masks, decays and the state are float32. Memory: O(L B H) for the intra scores
and O(L/B H Dk Dv) for the block states. Gradients by autodiff of this path.

impl="pallas" runs the Mosaic GPU kernels of `ssm/ops/lightning_pallas.py` (blocks of
64 whatever chunk_size says; bf16 operands); "auto" takes them for bf16 inputs on a
Hopper GPU (float32 inputs stay here, where the products are float32).
"""

import jax
import jax.numpy as jnp
from jax import lax

from ssm._checks import check_float, check_integer, check_nonpositive, positive_int
from ssm.ops._impl import choose_impl, interpret_mode, on_gpu
from ssm.ops import lightning_pallas
from ssm.ops._dtypes import compute_dtype
from ssm.ops.linear_scan import assoc_scan
from ssm.ops.ssd import ssd


def check_lightning_args(q, k, v, log_decay, h0, chunk_size, segment_ids=None):
  check_float("lightning_attention", q=q, k=k, v=v, log_decay=log_decay, h0=h0)
  check_integer("lightning_attention", segment_ids=segment_ids)
  if q.ndim != 4:
    raise ValueError(f"lightning_attention: q must be (batch, length, heads, dk), got {q.shape}")
  if k.shape != q.shape:
    raise ValueError(f"lightning_attention: k must have q's shape {q.shape}, got {k.shape}")
  if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"lightning_attention: v must be (batch, length, heads, dv) with "
                     f"(batch, length, heads) = {q.shape[:3]}, got {v.shape}")
  b, l, h, dk = q.shape
  if l < 1:
    raise ValueError(f"lightning_attention: empty sequence (q {q.shape})")
  if log_decay is not None and jnp.shape(log_decay) != (h,):
    raise ValueError(f"lightning_attention: log_decay must be None or (heads,) = ({h},), "
                     f"got shape {jnp.shape(log_decay)}")
  check_nonpositive("lightning_attention", "log_decay", log_decay)
  if h0 is not None and h0.shape != (b, h, dk, v.shape[3]):
    raise ValueError(f"lightning_attention: h0 must be (batch, heads, dk, dv) = "
                     f"{(b, h, dk, v.shape[3])}, got {h0.shape}")
  if segment_ids is not None and jnp.shape(segment_ids) != (b, l):
    raise ValueError(f"lightning_attention: segment_ids must be (batch, length) = {(b, l)}, "
                     f"got shape {jnp.shape(segment_ids)}")
  positive_int("lightning_attention", "chunk_size", chunk_size)


def _dtypes(q, v):
  """(accumulation dtype, matmul operand dtype): float32 (float64 under x64 tests),
  and on a GPU the input dtype for 16-bit inputs. (XLA:CPU cannot run some
  bf16 x bf16 -> f32 dots, and gains nothing from them.)"""
  acc = compute_dtype(q, v)
  low = jnp.dtype(q.dtype).itemsize < 4 and jnp.issubdtype(q.dtype, jnp.floating)
  return acc, (q.dtype if low and on_gpu() else acc)


def _scan_states_sequential(a, x):
  """The same recurrence as `assoc_scan`, as a lax.scan over axis 1 (n cheap steps)."""
  a = jnp.broadcast_to(a, x.shape[:2] + a.shape[2:])
  def body(state, ax):
    state = ax[0] * state + ax[1]
    return state, state
  _, out = lax.scan(body, jnp.zeros_like(x[:, 0]), (jnp.swapaxes(a, 0, 1), jnp.swapaxes(x, 0, 1)))
  return jnp.swapaxes(out, 0, 1)


def lightning_attention_xla(q, k, v, log_decay=None, h0=None, *, chunk_size=64,
                            state_scan="associative"):
  """Block form. Returns (o (b, l, h, dv) in q's dtype, final state (b, h, dk, dv)).

  state_scan: "associative" (log depth, default) or "sequential" (lax.scan over blocks),
  the two ways to run the recurrence across blocks (benchmarks/lightning_xla.py).
  """
  b, l, h, dk = q.shape
  dv = v.shape[3]
  acc, mm = _dtypes(q, v)
  c = min(chunk_size, l)
  n = -(-l // c)
  pad = n * c - l
  blocks = lambda x: jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]).reshape(
      (b, n, c) + x.shape[2:]).astype(mm)
  qb, kb, vb = blocks(q), blocks(k), blocks(v)
  lam = (jnp.zeros((h,), acc) if log_decay is None
         else jnp.asarray(log_decay).astype(acc))
  idx = jnp.arange(c)
  diff = idx[:, None] - idx[None, :]
  causal = diff >= 0
  mask = jnp.where(causal, jnp.exp(lam[:, None, None] * jnp.where(causal, diff, 0)), 0.0)

  # Intra-block: masked, decayed quadratic form, batched over all blocks.
  s = jnp.einsum("bnihd,bnjhd->bnhij", qb, kb, preferred_element_type=acc) * mask
  o = jnp.einsum("bnhij,bnjhv->bnihv", s.astype(mm), vb, preferred_element_type=acc)

  # Each block's contribution to the state at its end; the last block's true length
  # decides its decays, so padded tokens neither add to nor decay the state.
  n_valid = jnp.full((n,), c).at[-1].set(l - (n - 1) * c)           # (n,)
  to_end = n_valid[:, None] - 1 - idx[None, :]                      # (n, c)
  k_decay = jnp.where((to_end >= 0)[:, :, None],
                      jnp.exp(jnp.maximum(to_end, 0)[:, :, None] * lam[None, None, :]),
                      0.0)                                          # (n, c, h)
  k_dec = (kb.astype(acc) * k_decay[None, ..., None]).astype(mm)
  x = jnp.einsum("bnjhk,bnjhv->bnhkv", k_dec, vb, preferred_element_type=acc)
  block_decay = jnp.exp(lam[None, :] * n_valid[:, None])            # (n, h)
  scan = {"associative": assoc_scan, "sequential": _scan_states_sequential}[state_scan]
  states = scan(block_decay[None, :, :, None, None], x)             # after each block
  if h0 is not None:
    ends = jnp.cumsum(n_valid)                                       # tokens up to block end
    states = states + jnp.exp(lam[None, :] * ends[:, None])[None, ..., None, None] * (
        h0.astype(acc)[:, None])
    first = h0.astype(acc)[:, None]
  else:
    first = jnp.zeros_like(states[:, :1])
  before = jnp.concatenate([first, states[:, :-1]], axis=1)

  # Inter-block: queries read the state before their block, decayed by lambda^(i+1).
  q_decay = jnp.exp(lam[None, :] * (idx[:, None] + 1))               # (c, h)
  o = o + jnp.einsum("bnihk,bnhkv->bnihv", qb, before.astype(mm),
                     preferred_element_type=acc) * q_decay[None, None, :, :, None]
  o = o.reshape(b, n * c, h, dv)[:, :l]
  return o.astype(q.dtype), states[:, -1]


def lightning_attention_reference(q, k, v, log_decay=None, *, h0=None, return_state=False):
  """The plain quadratic form with the full (L, L) decayed causal mask (for tests)."""
  b, l, h, dk = q.shape
  acc, _ = _dtypes(q, v)
  out_dtype = q.dtype
  q, k, v = q.astype(acc), k.astype(acc), v.astype(acc)
  lam = jnp.zeros((h,), acc) if log_decay is None else jnp.asarray(log_decay).astype(acc)
  t = jnp.arange(l)
  diff = t[:, None] - t[None, :]
  w = jnp.where(diff >= 0, jnp.exp(lam[:, None, None] * jnp.maximum(diff, 0)), 0.0)
  o = jnp.einsum("bthd,bshd,hts,bshv->bthv", q, k, w, v)
  state = jnp.einsum("bshk,hs,bshv->bhkv", k, jnp.exp(lam[:, None] * (l - 1 - t)), v)
  if h0 is not None:
    h0 = h0.astype(acc)
    o = o + jnp.exp(lam[None, :] * (t[:, None] + 1))[None, ..., None] * jnp.einsum(
        "bthk,bhkv->bthv", q, h0)
    state = state + jnp.exp(lam * l)[None, :, None, None] * h0
  o = o.astype(out_dtype)
  return (o, state) if return_state else o


def _bf16_only(dtype) -> None:
  """"auto" gives the kernel bf16 calls only: it feeds bf16 to the matrix units, and float32
  calls keep float32 products on the XLA path (ValueError otherwise)."""
  if dtype != jnp.bfloat16:
    raise ValueError(f"lightning_attention: 'auto' keeps {dtype} inputs on the XLA path")


def lightning_attention(q: jax.Array, k: jax.Array, v: jax.Array, log_decay=None, *,
                        h0: jax.Array | None = None, segment_ids: jax.Array | None = None,
                        return_state: bool = False, chunk_size: int = 64, impl: str = "auto"):
  """Causal linear attention with a per-head decay, computed in blocks.

  Args:
    q, k: (batch, length, heads, dk); v: (batch, length, heads, dv); float32 or bf16.
    log_decay: (heads,) log lambda_h <= 0, or None (no decay).
    h0: (batch, heads, dk, dv) initial state (float32), or None (zeros).
    segment_ids: (batch, length) int, or None: packed documents, the state restarts from
      zero where the id changes. Such calls run the SSD op (`ssm.ops.ssd` with dt = 1,
      A = log_decay, B = k, C = q, one group per head): its XLA path, or its kernel on a
      Hopper GPU for bf16 inputs (impl "auto") or on request ("pallas").
    return_state: also return the state after the last token.
    chunk_size: block length B (any length L works; the last block is masked).
    impl: "auto" (the Pallas kernel for bf16 inputs on a Hopper GPU, else XLA), "xla" or
      "pallas" (ValueError if the kernel cannot take the call: head dims other than 64/128,
      dtypes other than float32/bf16).

  Returns:
    o (batch, length, heads, dv) in q's dtype [and the final state (batch, heads,
    dk, dv) in float32].
  """
  check_lightning_args(q, k, v, log_decay, h0, chunk_size, segment_ids)
  if segment_ids is not None:
    o, state = _packed(q, k, v, log_decay, h0, segment_ids, chunk_size, impl)
    return (o, state) if return_state else o
  path = choose_impl(impl, op="lightning_attention",
                     check=lambda: lightning_pallas.check_supported(q, k, v),
                     prefer=lambda: _bf16_only(q.dtype))
  if path == "pallas":
    o, state = lightning_pallas.lightning_attention_pallas(q, k, v, log_decay, h0,
                                                           interpret=interpret_mode())
  else:
    o, state = lightning_attention_xla(q, k, v, log_decay, h0, chunk_size=chunk_size)
  return (o, state) if return_state else o


def _packed(q, k, v, log_decay, h0, segment_ids, chunk_size, impl):
  """Lightning attention over packed documents as SSD: v the values, k and q the keys and
  queries of their own head (groups = heads), a decay log_decay per token (dt = 1). The
  SSD state is the lightning state transposed. Without documents lightning's own kernel is
  faster (results/README.md, results/ssd_h200.txt), so only packed calls come here."""
  b, l, h, _ = q.shape
  if impl == "auto" and q.dtype != jnp.bfloat16:
    impl = "xla"  # as `_bf16_only`: "auto" feeds the matrix units bf16 only for bf16 calls
  A = jnp.zeros((h,), jnp.float32) if log_decay is None else jnp.asarray(log_decay, jnp.float32)
  h0t = None if h0 is None else jnp.swapaxes(h0, 2, 3)
  o, state = ssd(v, jnp.ones((b, l, h), jnp.float32), A, k, q, h0=h0t, segment_ids=segment_ids,
                 return_state=True, chunk_size=chunk_size, impl=impl)
  return o.astype(q.dtype), jnp.swapaxes(state, 2, 3)
