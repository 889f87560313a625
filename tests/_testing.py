"""Shared test helpers: errors, tolerances keyed by dtype, gradients, mixer runners.

    rel(a, b)              ||a - b|| / ||b||, float64 (complex128 for complex inputs)
    max_rel(a, b)          max |a - b| / max |b|: a worst-element error
    tolerance(dtype)       the relative-norm tolerance of a fast path against a float32
                           reference at that input dtype
    grads(fn, args, cts)   gradients of sum(re(out_i * ct_i)) w.r.t. every argument
    perturbed(module, s)   a copy of an NNX module with every parameter moved off its init
    run_parallel(m, x)     m(x) under jit
    run_steps(m, x)        init_state + step over x one token at a time, under jit
    parallel_and_steps     both at once, under one jit
    assert_steps_match     the step mode equals the parallel form (max_rel < tol)

The jitted runners take the module's graph definition as a static argument, so tests that
build mixers of one configuration share a compilation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Relative-norm tolerances of a fast path against a float32 reference, by input dtype:
# float32 products are exact-ish on the CPU; kernels that feed bf16 to the matrix units
# (or bf16 inputs) sit near bf16's 2^-8.
TOLERANCE = {jnp.dtype(jnp.float64): 1e-9, jnp.dtype(jnp.float32): 1e-5,
             jnp.dtype(jnp.bfloat16): 1e-2}


def tolerance(dtype) -> float:
  return TOLERANCE[jnp.dtype(dtype)]


def _wide(x):
  x = np.asarray(x)
  return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def rel(a, b) -> float:
  """||a - b|| / ||b|| in float64 (complex128 for complex inputs); fails on non-finite a."""
  a, b = _wide(a), _wide(b)
  assert np.all(np.isfinite(a)), "non-finite values"
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def max_rel(a, b) -> float:
  """max |a - b| / max |b| in float64: the worst element against the output's scale."""
  a, b = _wide(a), _wide(b)
  return float(np.abs(a - b).max() / np.abs(b).max())


def bf16_exact(x, dtype=jnp.float32):
  """x rounded to bf16 and held in `dtype`: inputs a bf16 kernel sees without rounding."""
  return jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(dtype)


def grads(fn, args, cts, *, jit=False):
  """Gradients of sum_i re(sum(out_i * ct_i)) w.r.t. every argument of fn (which returns a
  tuple of outputs). jit=True for XLA references (one compilation instead of many eager
  ops); interpreted Pallas kernels run faster eagerly than compiled as one large program."""
  def loss(*a):
    return sum(jnp.real(jnp.sum(o * c)) for o, c in zip(fn(*a), cts))
  grad = jax.grad(loss, argnums=tuple(range(len(args))))
  return (jax.jit(grad) if jit else grad)(*args)


def perturbed(module, seed, scale=0.3):
  """The module with scale * N(0, 1) added to every nnx.Param (D = 1 and the structured
  inits would hide mistakes); other variables (fixed decays, statistics) stay."""
  rng = np.random.default_rng(seed)
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  params = jax.tree.map(
      lambda p: p + scale * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
  return nnx.merge(graphdef, params, rest)


def kernel_path_error(cls, d_model, x_shape, seed, **kw):
  """Relative error of mixer cls(d_model, impl="pallas", **kw) against the same weights
  (perturbed) on impl="xla", on one random input (full-precision matmuls)."""
  xla = perturbed(cls(d_model, impl="xla", **kw, rngs=nnx.Rngs(seed)), seed)
  pallas = cls(d_model, impl="pallas", **kw, rngs=nnx.Rngs(seed))
  nnx.update(pallas, nnx.state(xla))
  x = jax.random.normal(jax.random.key(seed + 1), x_shape)
  with jax.default_matmul_precision("highest"):
    y, y_ref = pallas(x), xla(x)
  return float(jnp.linalg.norm(y - y_ref) / jnp.linalg.norm(y_ref))


# -- mixer runners -----------------------------------------------------------------------

def _scan_steps(m, x, max_len):
  state = (m.init_state(x.shape[0]) if max_len is None
           else m.init_state(x.shape[0], max_len=max_len))
  _, ys = jax.lax.scan(m.step, state, jnp.moveaxis(x, 1, 0))
  return jnp.moveaxis(ys, 0, 1)


@functools.partial(jax.jit, static_argnums=0)
def _parallel(graphdef, params, x):
  return nnx.merge(graphdef, params)(x)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _steps(graphdef, params, x, max_len):
  return _scan_steps(nnx.merge(graphdef, params), x, max_len)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _both(graphdef, params, x, max_len):
  m = nnx.merge(graphdef, params)
  return m(x), _scan_steps(m, x, max_len)


def run_parallel(mixer, x):
  """mixer(x) under jit (deterministic)."""
  return _parallel(*nnx.split(mixer), x)


def run_steps(mixer, x, *, max_len=None):
  """Feed x (b, l, h) one token at a time through init_state(b, max_len=...) / step;
  returns (b, l, h). max_len: None, or True for the sequence length."""
  return _steps(*nnx.split(mixer), x, x.shape[1] if max_len is True else max_len)


def parallel_and_steps(mixer, x, *, max_len=None):
  """(mixer(x), run_steps(mixer, x)) under one jit."""
  return _both(*nnx.split(mixer), x, x.shape[1] if max_len is True else max_len)


def assert_steps_match(mixer, x, *, tol, max_len=None):
  """Given a causal mixer and x (b, l, d), its step mode over x equals its parallel form:
  both (b, l, d_model), max_rel(steps, parallel) < tol."""
  y, y_steps = parallel_and_steps(mixer, x, max_len=max_len)
  assert y.shape == y_steps.shape == x.shape[:2] + (mixer.d_model,)
  err = max_rel(y_steps, y)
  assert err < tol, err


def write_word_corpus(path, *, docs: int = 24, words_per_doc: int | None = None):
  """A folder of `docs` small text files of words from a fixed list (a byte-level LM
  corpus for the trainer tests): words_per_doc words each, or 5..39 (seeded) when None."""
  import pathlib
  path = pathlib.Path(path)
  rng = np.random.default_rng(0)
  words = ["the", "state", "space", "model", "scan", "of", "a", "long", "sequence"]
  for i in range(docs):
    n = words_per_doc if words_per_doc is not None else int(rng.integers(5, 40))
    (path / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, n)))
  return path
