"""Equinox's SparseEmbedding under the transforms Equinox code wraps around it.

Each case compares ``optax_sm3.equinox.filter_value_and_grad`` with
``eqx.filter_value_and_grad`` of the same model built on ``eqx.nn.Embedding``
and asserts that the table's gradient is a ``SparseGrad``; tied tables and
accumulation are checked by training against dense ``optax_sm3.sm3``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

eqx = pytest.importorskip("equinox")

import optax_sm3  # noqa: E402
from optax_sm3 import SparseGrad  # noqa: E402
from optax_sm3.equinox import (  # noqa: E402
  SparseEmbedding,
  SparseOptimizer,
  filter_value_and_grad,
)

ROWS, DIM = 31, 3
IDS = jnp.array([[1, 2, 3], [3, 4, 30]])


class Model(eqx.Module):
  embed: eqx.Module
  head: eqx.nn.Linear
  mode: str = eqx.field(static=True)

  def __init__(self, embedding, mode):
    k1, k2 = jax.random.split(jax.random.key(0))
    self.embed = embedding(ROWS, DIM, key=k1)
    self.head = eqx.nn.Linear(DIM, "scalar", key=k2)
    self.mode = mode

  def rows(self, ids):  # ids (bag,) -> (bag, DIM)
    mode = self.mode
    if mode == "filter_vmap":
      return eqx.filter_vmap(self.embed)(ids)
    if mode == "filter_checkpoint":
      return jax.checkpoint(lambda i: jax.vmap(self.embed)(i))(ids)
    if mode == "filter_jit":
      return eqx.filter_jit(lambda m, i: jax.vmap(m)(i))(self.embed, ids)
    if mode == "scan":
      return jax.lax.scan(lambda c, i: (c, self.embed(i)), 0.0, ids)[1]
    raise AssertionError(mode)

  def __call__(self, ids):
    return jnp.tanh(self.head(self.rows(ids).mean(axis=0)))


def _loss(model, ids):
  return jnp.sum(jax.vmap(model)(ids) ** 2)


def _dense_grad(model_dense, ids):
  return eqx.filter_grad(_loss)(model_dense, ids)


@pytest.mark.parametrize("mode", ["filter_vmap", "filter_checkpoint", "filter_jit"])
def test_gradient_under_a_transform_equals_equinox_and_is_sparse(mode):
  sparse = Model(SparseEmbedding, mode)
  dense = Model(eqx.nn.Embedding, mode)
  _, grads = eqx.filter_jit(filter_value_and_grad(_loss))(sparse, IDS)
  want = _dense_grad(dense, IDS)
  grad = grads.embed.weight
  assert isinstance(grad, SparseGrad)
  table = jnp.zeros((ROWS, DIM)).at[grad.indices].add(grad.row_grads)
  np.testing.assert_allclose(table, want.embed.weight, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads.head.weight, want.head.weight, rtol=1e-5, atol=1e-6)


def test_a_lookup_in_a_scan_is_a_clear_error():
  with pytest.raises(ValueError, match=r"(?s)scan.*before the loop"):
    filter_value_and_grad(_loss)(Model(SparseEmbedding, "scan"), IDS)


class Tied(eqx.Module):
  """Input lookups and an output layer over one table (tied embeddings)."""

  embed: eqx.Module

  def __call__(self, ids):  # ids (bag,) -> logits over the vocabulary.
    hidden = jax.vmap(self.embed)(ids).mean(axis=0)
    return self.embed.weight @ hidden


def _tied_loss(model, ids):
  logits = jax.vmap(model)(ids)
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0])


def _train(model, grad_fn, step_fn, state, batches):
  for ids in batches:
    grads = grad_fn(model, state, ids)
    model, state = step_fn(model, grads, state)
  return model, state


def test_tied_table_trains_as_dense_sm3_with_one_state():
  batches = [(IDS + 3 * k) % ROWS for k in range(3)]
  sparse = Tied(SparseEmbedding(ROWS, DIM, key=jax.random.key(1)))
  dense = Tied(eqx.nn.Embedding(ROWS, DIM, key=jax.random.key(1)))
  opt = SparseOptimizer(optax.sgd(0.1), optax_sm3.sm3(0.1, momentum=0.9))
  state = opt.init(sparse)
  assert len(state.tables) == 1  # One table, one state.

  @eqx.filter_jit
  def grad_fn(model, state, ids):
    return opt.filter_value_and_grad(_tied_loss)(model, state, ids)[1]

  sparse, state = _train(sparse, grad_fn, eqx.filter_jit(opt.step), state, batches)
  sparse, state = opt.sync(sparse, state)
  tx = optax_sm3.sm3(0.1, momentum=0.9)
  d_state = tx.init(eqx.filter(dense, eqx.is_inexact_array))
  dense_grad = eqx.filter_jit(eqx.filter_grad(_tied_loss))
  for ids in batches:
    g = dense_grad(dense, ids)
    updates, d_state = tx.update(g, d_state, eqx.filter(dense, eqx.is_inexact_array))
    dense = eqx.apply_updates(dense, updates)
  np.testing.assert_allclose(
    sparse.embed.weight, dense.embed.weight, rtol=1e-5, atol=1e-6
  )


def _bag_loss(model, ids):
  return jnp.sum(jax.vmap(model)(ids) ** 2)


def test_accumulated_microbatches_train_as_dense_sm3_on_the_summed_gradient():
  sparse = Model(SparseEmbedding, "filter_vmap")
  dense = Model(eqx.nn.Embedding, "filter_vmap")
  # The same SM3 on the table (sparse rows) and on the head (tx).
  opt = SparseOptimizer(optax_sm3.sm3(0.1, momentum=0.9))
  state = opt.init(sparse)
  dense_tx = optax_sm3.sm3(0.1, momentum=0.9)
  params = eqx.filter(dense, eqx.is_inexact_array)
  d_state = dense_tx.init(params)
  sparse_grad = eqx.filter_jit(
    lambda m, s, i: opt.filter_value_and_grad(_bag_loss)(m, s, i)[1]
  )
  dense_grad = eqx.filter_jit(eqx.filter_grad(_bag_loss))
  step = eqx.filter_jit(opt.step)
  for k in range(2):
    micro = [(IDS + 7 * k + j) % ROWS for j in range(3)]
    grads = [sparse_grad(sparse, state, m) for m in micro]
    with pytest.raises(TypeError):  # The naive sum is loud.
      jax.tree.map(jnp.add, grads[0], grads[1])
    total = optax_sm3.sparse_grad_sum(*grads)
    assert isinstance(total.embed.weight, SparseGrad)
    assert total.embed.weight.indices.shape == (3 * IDS.size,)
    sparse, state = step(sparse, total, state)
    g = jax.tree.map(lambda *x: sum(x), *[dense_grad(dense, m) for m in micro])
    updates, d_state = dense_tx.update(g, d_state, params)
    dense = eqx.apply_updates(dense, updates)
    params = eqx.filter(dense, eqx.is_inexact_array)
  sparse, state = opt.sync(sparse, state)
  np.testing.assert_allclose(
    sparse.embed.weight, dense.embed.weight, rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    sparse.head.weight, dense.head.weight, rtol=1e-5, atol=1e-6
  )
