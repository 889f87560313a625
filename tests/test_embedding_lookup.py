"""models.heads.embedding_lookup: the gather forward and its one-hot-product backward
against the scatter-add it replaces (float64 numpy) and XLA's own gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import heads


def _scatter_reference(vocab, ids, g):
  out = np.zeros((vocab, g.shape[-1]))
  np.add.at(out, np.asarray(ids).reshape(-1), np.asarray(g, np.float64).reshape(-1, g.shape[-1]))
  return out


@pytest.mark.parametrize("vocab", [17, 257, heads.ONE_HOT_GRAD_MAX_VOCAB + 1])
def test_gradient_is_the_scatter_sum(vocab):
  """Both branches (one-hot product, scatter-add above the threshold): float32 gradients
  within float32 rounding of the float64 sums, values equal to the gather."""
  rng = np.random.default_rng(vocab)
  table = jnp.asarray(rng.standard_normal((vocab, 24)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, vocab, (3, 500)))           # heavy collisions on few rows
  w = jnp.asarray(rng.standard_normal((3, 500, 24)), jnp.float32)
  y, vjp = jax.jit(lambda t: jax.vjp(lambda t: heads.embedding_lookup(t, ids), t))(table)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(table)[np.asarray(ids)])
  (d_table,) = vjp(w)
  assert d_table.dtype == jnp.float32 and d_table.shape == table.shape
  want = _scatter_reference(vocab, ids, w)
  np.testing.assert_allclose(np.asarray(d_table), want, rtol=0, atol=1e-6 * np.abs(want).max())


def test_float64_and_bf16_tables():
  rng = np.random.default_rng(1)
  ids = jnp.asarray(rng.integers(0, 9, (40,)))
  w = rng.standard_normal((40, 5))
  with jax.enable_x64(True):
    table = jnp.asarray(rng.standard_normal((9, 5)))
    d = jax.grad(lambda t: jnp.sum(jnp.asarray(w) * heads.embedding_lookup(t, ids)))(table)
    assert d.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(d), _scatter_reference(9, ids, w), rtol=1e-13, atol=1e-13)
  table = jnp.asarray(rng.standard_normal((9, 5)), jnp.bfloat16)
  d = jax.grad(lambda t: jnp.sum(jnp.asarray(w, jnp.float32)
                                 * heads.embedding_lookup(t, ids).astype(jnp.float32)))(table)
  assert d.dtype == jnp.bfloat16  # the parameter's dtype; the sum itself ran in float32
  np.testing.assert_allclose(np.asarray(d, np.float32), _scatter_reference(9, ids, w), rtol=1e-2,
                             atol=1e-2)


def test_small_vocabulary_backward_has_no_scatter():
  table, ids = jnp.ones((257, 8)), jnp.zeros((2, 16), jnp.int32)
  hlo = jax.jit(jax.grad(lambda t: jnp.sum(heads.embedding_lookup(t, ids) ** 2))).lower(
      table).as_text()
  assert "scatter" not in hlo


def test_token_encoder_uses_it():
  """The encoder's gradient (padding id 0 masked to zero) equals autodiff through take."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  enc = heads.TokenEncoder(11, 6, rngs=nnx.Rngs(0))
  ids = jnp.asarray(np.random.default_rng(2).integers(0, 11, (2, 30)))
  table = enc.embedding[...]
  loss = lambda t: jnp.sum(jnp.sin(jnp.where((ids != 0)[..., None], jnp.take(t, ids, axis=0), 0.)))
  want = jax.grad(loss)(table)

  got = nnx.grad(lambda m: jnp.sum(jnp.sin(m(ids))))(enc)["embedding"][...]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(got[0]).max()) == 0.0  # padding's row gets nothing
