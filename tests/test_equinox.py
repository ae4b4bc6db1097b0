"""optax_sm3.equinox: SparseEmbedding, filter_value_and_grad, SparseOptimizer.

The reference everywhere is dense training of the same model: the table's
gradient from ``eqx.filter_value_and_grad`` (table-sized) and
``optax_sm3.sm3`` on the table through ``optax.multi_transform``.
"""

import functools
import pathlib
import re

import _tiers
import chex
import equinox as eqx
import hypothesis
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import strategies as st

import optax_sm3
import optax_sm3.equinox
from optax_sm3.equinox import SparseEmbedding, SparseOptimizer, filter_value_and_grad

ROWS, DIM, BAGS, BAG = 50, 3, 4, 3
LR, HEAD_LR = 0.1, 0.05


def _is_embedding(node):
  return isinstance(node, (eqx.nn.Embedding, SparseEmbedding))


def _labels(params):
  """ "table" at every embedding's weight, "rest" elsewhere (multi_transform)."""

  def mark(node):
    label = "table" if _is_embedding(node) else "rest"
    return jax.tree.map(lambda _: label, node)

  return jax.tree.map(mark, params, is_leaf=_is_embedding)


def _dense_tx(**hyper):
  return optax.multi_transform(
    {"table": optax_sm3.sm3(LR, **hyper), "rest": optax.sgd(HEAD_LR)}, _labels
  )


class BagModel(eqx.Module):
  """A batch at once: ``ids`` (bags, bag) -> (bags,), the table read with array ids."""

  embed: SparseEmbedding
  head: eqx.nn.Linear
  count: jax.Array  # An integer leaf: never differentiated nor trained.

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.embed = SparseEmbedding(ROWS, DIM, key=k1)
    self.head = eqx.nn.Linear(DIM, "scalar", key=k2)
    self.count = jnp.array(7, jnp.int32)

  def __call__(self, ids):
    return jax.vmap(self.head)(self.embed(ids).mean(axis=1))


class ExampleModel(eqx.Module):
  """The Equinox idiom: one example, ``ids`` (bag,) -> scalar; batched by vmap."""

  embed: eqx.Module
  head: eqx.nn.Linear

  def __init__(self, embedding, key):
    k1, k2 = jax.random.split(key)
    self.embed = embedding(ROWS, DIM, key=k1)
    self.head = eqx.nn.Linear(DIM, "scalar", key=k2)

  def __call__(self, ids):
    return self.head(jax.vmap(self.embed)(ids).mean(axis=0))


def _bag_loss(model, ids, y):
  return jnp.mean((model(ids) - y) ** 2)


def _vmap_loss(model, ids, y):
  return jnp.mean((jax.vmap(model)(ids) - y) ** 2)


def _filter_vmap_loss(model, ids, y):
  return jnp.mean((eqx.filter_vmap(model)(ids) - y) ** 2)


def _batches(seed, steps):
  rng = np.random.default_rng(seed)
  return [
    (
      jnp.asarray(rng.integers(0, ROWS, (BAGS, BAG), dtype=np.int32)),
      jnp.asarray(rng.standard_normal(BAGS, dtype=np.float32)),
    )
    for _ in range(steps)
  ]


def _copy(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, tree)


def _assert_trees_close(a, b, rtol=1e-6, atol=1e-6):
  # Leaf by leaf: the dense model may hold eqx.nn.Embedding where ours has
  # SparseEmbedding (the same fields).
  a = jax.tree.leaves(eqx.filter(a, eqx.is_inexact_array))
  b = jax.tree.leaves(eqx.filter(b, eqx.is_inexact_array))
  chex.assert_trees_all_equal_shapes(a, b)
  chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


@functools.cache
def _steps(loss, momentum, weight_decay):
  """The jitted, donating sparse and dense train steps for one configuration."""
  hyper = {"momentum": momentum, "weight_decay": weight_decay}
  opt = SparseOptimizer(optax.sgd(HEAD_LR), optax_sm3.sm3(LR, **hyper))
  dense = _dense_tx(**hyper)

  @eqx.filter_jit(donate="all-except-first")
  def sparse_step(batch, model, state):
    value, grads = opt.filter_value_and_grad(loss)(model, state, *batch)
    model, state = opt.step(model, grads, state)
    return value, grads, model, state

  @eqx.filter_jit(donate="all-except-first")
  def dense_step(batch, model, state):
    value, grads = eqx.filter_value_and_grad(loss)(model, *batch)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, state = dense.update(grads, state, params)
    return value, eqx.apply_updates(model, updates), state

  return opt, dense, sparse_step, dense_step


def _train_both(
  model, dense_model, loss, batches, momentum=0.0, weight_decay=0.0, sparse=True
):
  """Trains both models on ``batches``; returns them (sparse one synced) and losses.

  ``sparse``: whether the table's gradient must come out as a SparseGrad.
  """
  opt, dense, sparse_step, dense_step = _steps(loss, momentum, weight_decay)
  state = opt.init(model)
  dense_state = dense.init(eqx.filter(dense_model, eqx.is_inexact_array))
  losses = []
  for batch in batches:
    value, grads, model, state = sparse_step(batch, model, state)
    assert isinstance(grads.embed.weight, optax_sm3.SparseGrad) == sparse
    dense_value, dense_model, dense_state = dense_step(batch, dense_model, dense_state)
    losses.append((float(value), float(dense_value)))
  model, state = opt.sync(model, state)
  return model, dense_model, losses


# --- SparseEmbedding ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, jnp.float32, jnp.bfloat16, jnp.float16])
def test_embedding_init_is_eqx_embeddings(dtype):
  key = jax.random.key(3)
  ours = SparseEmbedding(11, 5, dtype=dtype, key=key)
  theirs = eqx.nn.Embedding(11, 5, dtype=dtype, key=key)
  assert ours.weight.dtype == theirs.weight.dtype
  np.testing.assert_array_equal(np.asarray(ours.weight), np.asarray(theirs.weight))
  assert (ours.num_embeddings, ours.embedding_size) == (11, 5)
  weight = jnp.arange(12.0).reshape(4, 3)
  given = SparseEmbedding(weight=weight)
  assert given.weight is weight and given.num_embeddings == 4


@pytest.mark.parametrize(
  "kwargs",
  [{"num_embeddings": 3}, {"num_embeddings": -1, "embedding_size": 2}, {"weight": 1}],
)
def test_embedding_raises_as_eqx_embedding(kwargs):
  kwargs = dict(kwargs)
  if kwargs.get("weight") == 1:
    kwargs["weight"] = jnp.ones((2, 3, 4))
  else:
    kwargs["key"] = jax.random.key(0)
  with pytest.raises(ValueError) as theirs:
    eqx.nn.Embedding(**kwargs)
  with pytest.raises(ValueError) as ours:
    SparseEmbedding(**kwargs)
  assert str(ours.value) == str(theirs.value)


def test_embedding_lookup_matches_eqx_embedding():
  key = jax.random.key(1)
  ours, theirs = SparseEmbedding(9, 4, key=key), eqx.nn.Embedding(9, 4, key=key)
  ids = jnp.array([[0, 8], [3, 3]])
  np.testing.assert_array_equal(ours(jnp.array(5)), theirs(jnp.array(5)))
  np.testing.assert_array_equal(
    jax.vmap(jax.vmap(ours))(ids), jax.vmap(jax.vmap(theirs))(ids)
  )
  np.testing.assert_array_equal(ours(ids), jax.vmap(jax.vmap(theirs))(ids))
  with pytest.raises(ValueError, match=r"in \[0, 9\)"):
    ours(jnp.array([9]))
  with pytest.raises(TypeError, match="integers"):
    ours(jnp.array([1.0]))


# --- filter_value_and_grad ----------------------------------------------------


def _densify(grads, model):
  def dense(g, table):
    if isinstance(g, optax_sm3.SparseGrad):
      return jnp.zeros_like(table).at[g.indices].add(g.row_grads)
    return g

  params = eqx.filter(model, eqx.is_inexact_array)
  return jax.tree.map(
    dense, grads, params, is_leaf=lambda x: isinstance(x, optax_sm3.SparseGrad)
  )


def test_filter_value_and_grad_matches_eqx_dense_gradient():
  model = BagModel(jax.random.key(0))
  ((ids, y),) = _batches(0, 1)
  value, grads = filter_value_and_grad(_bag_loss)(model, ids, y)
  dense_value, dense_grads = eqx.filter_value_and_grad(_bag_loss)(model, ids, y)
  assert isinstance(grads.embed.weight, optax_sm3.SparseGrad)
  np.testing.assert_array_equal(grads.embed.weight.indices, ids.reshape(-1))
  assert grads.count is None and dense_grads.count is None  # Integer leaf.
  np.testing.assert_allclose(value, dense_value, rtol=1e-6)
  _assert_trees_close(_densify(grads, model), dense_grads)


def test_filter_value_and_grad_aux_kwargs_and_jit():
  model = BagModel(jax.random.key(0))
  ((ids, y),) = _batches(1, 1)

  def loss(model, ids, *, y):
    out = model(ids)
    return jnp.mean((out - y) ** 2), out

  @eqx.filter_jit
  def run(model, ids, y):
    return filter_value_and_grad(loss, has_aux=True)(model, ids, y=y)

  (value, out), grads = run(model, ids, y)
  (dense_value, dense_out), dense_grads = eqx.filter_value_and_grad(loss, has_aux=True)(
    model, ids, y=y
  )
  np.testing.assert_allclose(out, dense_out, rtol=1e-6)
  np.testing.assert_allclose(value, dense_value, rtol=1e-6)
  assert isinstance(grads.embed.weight, optax_sm3.SparseGrad)
  _assert_trees_close(_densify(grads, model), dense_grads)


def test_dense_read_of_the_weight_gives_the_dense_gradient_and_step():
  """A weight also read as a matrix (tied output) is differentiated densely."""
  model = BagModel(jax.random.key(2))
  ((ids, y),) = _batches(2, 1)

  def loss(model, ids, y):
    tied = model.embed(ids).mean(axis=1) @ model.embed.weight.T  # (bags, ROWS)
    return _bag_loss(model, ids, y) + 1e-2 * jnp.sum(tied**2)

  _, grads = filter_value_and_grad(loss)(model, ids, y)
  _, dense_grads = eqx.filter_value_and_grad(loss)(model, ids, y)
  assert not isinstance(grads.embed.weight, optax_sm3.SparseGrad)
  _assert_trees_close(grads, dense_grads)
  dense_model = _copy(model)
  trained, dense_trained, _ = _train_both(
    model, dense_model, loss, _batches(3, 3), sparse=False
  )
  _assert_trees_close(trained, dense_trained)


# --- SparseOptimizer against dense SM3 ----------------------------------------


@pytest.mark.parametrize(
  ("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.0), (0.9, 1e-2)]
)
def test_optimizer_matches_dense_sm3_over_steps(momentum, weight_decay):
  model = BagModel(jax.random.key(4))
  dense_model = _copy(model)
  model, dense_model, losses = _train_both(
    model, dense_model, _bag_loss, _batches(4, 8), momentum, weight_decay
  )
  _assert_trees_close(model, dense_model)
  np.testing.assert_allclose(*zip(*losses, strict=True), rtol=1e-5)
  assert losses[-1][0] < losses[0][0]
  assert int(model.count) == 7


@hypothesis.settings(max_examples=_tiers.examples(10, 4), deadline=None)
@hypothesis.given(
  ids=hnp.arrays(np.int32, (4, BAGS, BAG), elements=st.integers(0, ROWS - 1)),
  momentum=st.sampled_from([0.0, 0.9]),
)
def test_optimizer_matches_dense_sm3_hypothesis(ids, momentum):
  model = BagModel(jax.random.key(5))
  dense_model = _copy(model)
  y = jnp.linspace(-1.0, 1.0, BAGS)
  batches = [(jnp.asarray(step), y) for step in ids]
  model, dense_model, _ = _train_both(model, dense_model, _bag_loss, batches, momentum)
  _assert_trees_close(model, dense_model)


def test_step_donates_the_model_and_state():
  model = BagModel(jax.random.key(6))
  _, _, sparse_step, _ = _steps(_bag_loss, 0.0, 0.0)
  opt = _steps(_bag_loss, 0.0, 0.0)[0]
  state = opt.init(model)
  table = model.embed.weight
  _, _, new_model, _ = sparse_step(_batches(6, 1)[0], model, state)
  assert table.is_deleted()  # Donated: XLA wrote the new table in place.
  assert not new_model.embed.weight.is_deleted()


def test_step_is_not_an_optax_update():
  opt = SparseOptimizer(optax.sgd(0.1), optax_sm3.sm3(0.1, momentum=0.0))
  assert not hasattr(opt, "update")  # Its step returns the model, not updates.
  assert not isinstance(opt, optax.GradientTransformation)


def test_sync_is_the_dense_table_with_momentum():
  model = BagModel(jax.random.key(7))
  dense_model = _copy(model)
  model, dense_model, _ = _train_both(
    model, dense_model, _bag_loss, _batches(7, 5), momentum=0.9
  )
  np.testing.assert_allclose(
    model.embed.weight, dense_model.embed.weight, rtol=1e-6, atol=1e-6
  )


# --- The vmap-over-the-batch idiom (needs the lookup capture under vmap) -------


@pytest.mark.parametrize(
  "loss", [_vmap_loss, _filter_vmap_loss], ids=["vmap", "filter_vmap"]
)
@pytest.mark.parametrize("momentum", _tiers.fast_first([0.0, 0.9], [0.9]))
def test_vmap_over_batch_matches_dense(loss, momentum):
  """``jax.vmap(model)(ids)`` / ``eqx.filter_vmap`` in the loss, under filter_jit."""
  key = jax.random.key(8)
  model = ExampleModel(SparseEmbedding, key)
  dense_model = ExampleModel(eqx.nn.Embedding, key)
  model, dense_model, losses = _train_both(
    model, dense_model, loss, _batches(8, 5), momentum
  )
  _assert_trees_close(model, dense_model)
  np.testing.assert_allclose(*zip(*losses, strict=True), rtol=1e-5)


def test_vmap_over_batch_gradient_eagerly():
  model = ExampleModel(SparseEmbedding, jax.random.key(9))
  ((ids, y),) = _batches(9, 1)
  _, grads = filter_value_and_grad(_vmap_loss)(model, ids, y)
  _, dense_grads = eqx.filter_value_and_grad(_vmap_loss)(model, ids, y)
  assert isinstance(grads.embed.weight, optax_sm3.SparseGrad)
  _assert_trees_close(_densify(grads, model), dense_grads)


# --- Packaging ----------------------------------------------------------------


def test_namespace_exports():
  assert optax_sm3.equinox.SparseGrad is optax_sm3.SparseGrad
  assert set(optax_sm3.equinox.__all__) <= set(dir(optax_sm3.equinox))


def test_api_page_documents_every_name():
  page = pathlib.Path(__file__).resolve().parent.parent / "docs" / "api" / "equinox.rst"
  text = page.read_text()
  assert ".. automodule:: optax_sm3.equinox" in text
  documented = set(re.findall(r"^\.\. auto(?:function|class):: (\w+)", text, re.M))
  assert set(optax_sm3.equinox.__all__) <= documented
