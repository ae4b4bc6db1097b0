"""A marked table read other than by the sparse lookup trains as ``jax.grad`` says.

The regressions of the silent loss: a table marked sparse (``tables=``, a
``SparseTrainState`` mask, ``SparseEmbed``, ``SparseEmbedding``) but read by
plain indexing, by a framework's own ``Embed``, as a whole, by broadcasting,
or on some steps only, got an empty gradient and never trained. Each case
here trains through the sparse route, with momentum and weight decay (rows
stored behind, so the read must see the caught-up table), eagerly and under
``jit``, and must equal dense training with the same optimizer.
"""

from __future__ import annotations

import _tiers
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import optax_sm3
import optax_sm3.equinox
import optax_sm3.linen
import optax_sm3.nnx

STEPS = 4
ROWS, DIM = 50, 3


def _optimizer():
  return optax_sm3.sm3(0.1, momentum=0.9, weight_decay=0.01)


def _ids(step):
  return jnp.asarray(np.random.default_rng(step).integers(0, ROWS, size=(4, 2)))


def _close(got, want):
  # Float rounding, amplified a little by the training itself (eager and
  # jitted dense runs differ by up to ~7e-6 of the table's scale here).
  scale = 1.0 + float(np.max(np.abs(want)))
  np.testing.assert_allclose(
    np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * scale
  )


def _dense(loss, params):
  opt = _optimizer()
  state = opt.init(params)
  for step in range(STEPS):
    grads = jax.grad(loss)(params, _ids(step), step)
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params


def _params():
  key = jax.random.key(0)
  return {
    "u": jax.random.normal(key, (ROWS, DIM)),
    "b": jnp.linspace(-1.0, 1.0, DIM),
    "w": jnp.ones((DIM,)),
  }


def _index_loss(p, ids, step):  # "u" by plain indexing, "b" by broadcasting
  del step
  return jnp.sum(jnp.tanh((p["u"][ids] + p["b"].reshape(1, 1, DIM)) @ p["w"]))


def _whole_loss(p, ids, step):  # "u" as a whole, beside a lookup
  rows = optax_sm3.sparse_lookup(p["u"], ids)
  return jnp.sum(jnp.tanh(rows @ p["w"])) + jnp.sum(jnp.tanh(p["u"] @ p["b"]))


def _sometimes_loss(p, ids, step):  # "u" read densely on odd steps only
  rows = optax_sm3.sparse_lookup(p["u"], ids)
  extra = jax.lax.cond(
    step % 2 == 1, lambda: jnp.sum(p["u"][ids] ** 2), lambda: jnp.zeros([])
  )
  return jnp.sum(jnp.tanh(rows @ p["w"])) + extra


@pytest.mark.parametrize("jit", _tiers.fast_first([False, True], [False]))
@pytest.mark.parametrize(
  "loss", _tiers.fast_first([_index_loss, _whole_loss, _sometimes_loss], [_index_loss])
)
def test_plain_route_marked_leaves_read_other_ways(loss, jit):
  params = _params()
  opt = optax_sm3.sparse_tables(_optimizer(), tables={"u": True, "b": True, "w": False})
  state = opt.init(params)

  def step_fn(params, state, ids, step):
    _, grads = opt.value_and_grad(loss)(params, state, ids, step)
    return opt.step(params, grads, state)

  step_fn = jax.jit(step_fn) if jit else step_fn
  got = params
  for step in range(STEPS):
    got, state = step_fn(got, state, _ids(step), jnp.asarray(step))
  got, _ = opt.sync(got, state)
  want = _dense(loss, params)
  for key in params:
    _close(got[key], want[key])
  assert not np.allclose(got["u"], params["u"])  # it trained


def _lookup_loss(p, ids, step):
  del step
  rows = optax_sm3.sparse_lookup(p["u"], ids)
  return jnp.sum(jnp.tanh(rows @ p["w"]))


def _alternating_loss(p, ids, step):
  """Lookups only on even steps (rows left behind), a plain read on odd ones."""
  return (_index_loss if int(step) % 2 else _lookup_loss)(p, ids, step)


@pytest.mark.parametrize("jit", _tiers.fast_first([False, True], [False]))
def test_plain_route_a_table_read_densely_on_some_steps_only(jit):
  # The dense read must see the rows the lazy steps left behind caught up.
  params = _params()
  opt = optax_sm3.sparse_tables(
    _optimizer(), tables={"u": True, "b": False, "w": False}
  )
  state = opt.init(params)

  def step_fn(params, state, ids, step):
    _, grads = opt.value_and_grad(_alternating_loss)(params, state, ids, step)
    return opt.step(params, grads, state)

  step_fn = jax.jit(step_fn, static_argnums=3) if jit else step_fn
  got = params
  for step in range(2 * STEPS):
    got, state = step_fn(got, state, _ids(step), step)
  got, _ = opt.sync(got, state)
  opt_dense = _optimizer()
  dense_state, want = opt_dense.init(params), params
  for step in range(2 * STEPS):
    grads = jax.grad(_alternating_loss)(want, _ids(step), step)
    updates, dense_state = opt_dense.update(grads, dense_state, want)
    want = optax.apply_updates(want, updates)
  for key in params:
    _close(got[key], want[key])


class _LinenEmbedModel(nn.Module):
  @nn.compact
  def __call__(self, ids):
    rows = nn.Embed(ROWS, DIM, name="embed")(ids)  # the framework's own Embed
    return jnp.sum(jnp.tanh(nn.Dense(1, name="head")(rows)))


@pytest.mark.parametrize("jit", _tiers.fast_first([False, True], [True]))
def test_linen_train_state_mask_selecting_nn_embed(jit):
  model = _LinenEmbedModel()
  params = model.init(jax.random.key(0), _ids(0))["params"]
  mask = {"embed": {"embedding": True}, "head": {"kernel": False, "bias": False}}
  state = optax_sm3.linen.SparseTrainState.create(
    apply_fn=model.apply,
    params=params,
    tx=optax_sm3.sparse_tables(_optimizer(), tables=mask),
  )
  dense = train_state.TrainState.create(
    apply_fn=model.apply, params=params, tx=_optimizer()
  )

  def loss(p, ids):
    return model.apply({"params": p}, ids)

  def sparse_step(state, ids):
    _, grads = state.value_and_grad(loss)(ids)
    return state.apply_gradients(grads=grads)

  def dense_step(state, ids):
    return state.apply_gradients(grads=jax.grad(loss)(state.params, ids))

  if jit:
    sparse_step, dense_step = jax.jit(sparse_step), jax.jit(dense_step)
  for step in range(STEPS):
    state = sparse_step(state, _ids(step))
    dense = dense_step(dense, _ids(step))
  got = state.sync().params
  jax.tree.map(_close, got, dense.params)
  assert not np.allclose(got["embed"]["embedding"], params["embed"]["embedding"])


class _NNXModel(nnx.Module):
  def __init__(self, embed):
    self.embed = embed
    self.w = nnx.Param(jnp.ones((DIM,)))

  def __call__(self, ids):
    table = self.embed.embedding[...]
    return jnp.sum(jnp.tanh(table[ids] @ self.w[...]))  # plain indexing


@pytest.mark.parametrize("jit", [False, True])
def test_nnx_sparse_embed_read_by_plain_indexing(jit):
  sparse = _NNXModel(optax_sm3.nnx.SparseEmbed(ROWS, DIM, rngs=nnx.Rngs(0)))
  dense = _NNXModel(nnx.Embed(ROWS, DIM, rngs=nnx.Rngs(0)))
  opt = optax_sm3.nnx.SparseOptimizer(sparse, _optimizer())
  dense_opt = nnx.Optimizer(dense, _optimizer(), wrt=nnx.Param)

  def sparse_step(model, opt, ids):
    _, grads = optax_sm3.nnx.value_and_grad(lambda m: m(ids))(model)
    opt.update(model, grads)

  def dense_step(model, opt, ids):
    opt.update(model, nnx.grad(lambda m: m(ids))(model))

  if jit:
    sparse_step, dense_step = nnx.jit(sparse_step), nnx.jit(dense_step)
  before = np.asarray(sparse.embed.embedding[...])
  for step in range(STEPS):
    sparse_step(sparse, opt, _ids(step))
    dense_step(dense, dense_opt, _ids(step))
  opt.sync(sparse)
  _close(sparse.embed.embedding[...], dense.embed.embedding[...])
  _close(sparse.w[...], dense.w[...])
  assert not np.allclose(sparse.embed.embedding[...], before)


class _EqxModel(eqx.Module):
  embed: eqx.Module
  w: jax.Array

  def __call__(self, ids):
    return jnp.sum(jnp.tanh(self.embed.weight[ids] @ self.w))  # plain indexing


@pytest.mark.parametrize("jit", [False, True])
def test_equinox_sparse_embedding_read_by_plain_indexing(jit):
  key = jax.random.key(0)
  sparse = _EqxModel(optax_sm3.equinox.SparseEmbedding(ROWS, DIM, key=key), jnp.ones(3))
  dense = _EqxModel(eqx.nn.Embedding(ROWS, DIM, key=key), jnp.ones(3))
  opt = optax_sm3.equinox.SparseOptimizer(_optimizer())
  state = opt.init(sparse)
  dense_tx = _optimizer()
  dense_state = dense_tx.init(eqx.filter(dense, eqx.is_inexact_array))

  def sparse_step(model, state, ids):
    _, grads = opt.filter_value_and_grad(lambda m: m(ids))(model, state)
    return opt.step(model, grads, state)

  def dense_step(model, state, ids):
    grads = eqx.filter_grad(lambda m: m(ids))(model)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, state = dense_tx.update(grads, state, params)
    return eqx.apply_updates(model, updates), state

  if jit:
    sparse_step, dense_step = eqx.filter_jit(sparse_step), eqx.filter_jit(dense_step)
  for step in range(STEPS):
    sparse, state = sparse_step(sparse, state, _ids(step))
    dense, dense_state = dense_step(dense, dense_state, _ids(step))
  sparse, state = opt.sync(sparse, state)
  _close(sparse.embed.weight, dense.embed.weight)
  _close(sparse.w, dense.w)


def test_a_marked_table_the_loss_does_not_read_gets_the_zero_step():
  params = _params()
  opt = optax_sm3.sparse_tables(
    optax.sgd(0.1),
    optax_sm3.sm3(0.1, momentum=0.0),
    tables={"u": True, "b": False, "w": False},
  )
  state = opt.init(params)
  loss = lambda p: jnp.sum(p["w"] * p["b"])
  _, grads = opt.value_and_grad(loss)(params, state)
  assert isinstance(grads["u"], optax_sm3.SparseGrad)
  assert grads["u"].indices.shape == (0,)
  new, _ = opt.step(params, grads, state)
  _close(new["u"], params["u"])
