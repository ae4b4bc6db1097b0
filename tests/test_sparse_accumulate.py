"""Gradient accumulation with SparseGrads: the marker, sums, means, MultiSteps."""

import os
import tempfile

import _tiers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_sm3
from optax_sm3 import SparseGrad, sparse_lookup

ROWS, FEATURES = 30, 3


def _params():
  keys = jax.random.split(jax.random.key(1), 3)
  return {
    "table": jax.random.normal(keys[0], (ROWS, FEATURES)),
    "other": jax.random.normal(keys[1], (7, FEATURES)),
    "w": jax.random.normal(keys[2], (FEATURES,)),
  }


MASK = {"table": True, "other": True, "w": False}


def _loss(params, ids, y):
  rows = sparse_lookup(params["table"], ids).mean(axis=1)
  other = sparse_lookup(params["other"], ids[:, 0] % 7)
  pred = jnp.sum(rows * other * params["w"][None, :], axis=-1)
  return jnp.mean((pred - y) ** 2)


def _dense(g, like):
  if isinstance(g, SparseGrad):
    return jnp.zeros_like(like).at[g.indices].add(g.row_grads)
  return g


def _grad(g1_ids, g1_rows):
  return SparseGrad(jnp.asarray(g1_ids, jnp.int32), jnp.asarray(g1_rows, jnp.float32))


# ---------------------------------------------------------------------------
# The naive tree-add is loud.


@pytest.mark.parametrize(
  "combine",
  [
    lambda a, b: jax.tree.map(jnp.add, a, b),
    lambda a, b: jax.tree.map(lambda x, y: x + y, a, b),
    lambda a, b: optax.tree.add(a, b),
    lambda a, b: jax.tree.map(lambda x: x / 2, a),
  ],
  ids=["jnp.add", "plus", "optax.tree.add", "divide"],
)
@pytest.mark.parametrize("jit", [False, True])
def test_leafwise_arithmetic_raises(combine, jit):
  g = {"t": _grad([1, 2], np.ones((2, 3))), "w": jnp.ones(3)}
  h = {"t": _grad([4, 5], np.ones((2, 3))), "w": jnp.ones(3)}
  f = jax.jit(combine) if jit else combine
  with pytest.raises(TypeError, match="key"):
    f(g, h)


def test_optax_multisteps_over_sparse_grads_is_loud():
  # optax's own MultiSteps cannot hold SparseGrads: it fails, never trains.
  params = _params()
  _, grads = optax_sm3.sparse_value_and_grad(_loss)(
    params, jnp.array([[1, 2]]), jnp.array([1.0])
  )
  tx = optax.MultiSteps(optax.sgd(0.1), 2)
  with pytest.raises((TypeError, ValueError)):
    tx.update(grads, tx.init(params), params)


@pytest.mark.parametrize(
  "tamper, error",
  [
    (lambda g: SparseGrad(g.indices, g.row_grads, jnp.zeros(())), "marker"),
    (lambda g: SparseGrad(g.indices * 1.0, g.row_grads, g.marker), "integers"),
    (lambda g: SparseGrad(g.indices, g.row_grads[:1], g.marker), "row_grads"),
  ],
  ids=["marker", "float-indices", "short-rows"],
)
def test_step_rejects_tampered_sparse_grads(tamper, error):
  params = _params()
  opt = optax_sm3.sparse_tables(
    optax.sgd(0.1), optax_sm3.sm3(0.1, momentum=0.0), tables=MASK
  )
  state = opt.init(params)
  _, grads = opt.value_and_grad(_loss)(
    params, state, jnp.array([[1, 2]]), jnp.array([1.0])
  )
  bad = dict(grads, table=tamper(grads["table"]))
  with pytest.raises((TypeError, ValueError), match=error):
    jax.jit(opt.step)(params, bad, state)


def test_sparse_grad_is_a_jit_argument_without_recompiles():
  f = jax.jit(lambda g: g + g)
  for seed in range(3):
    ids = np.random.default_rng(seed).integers(0, ROWS, 4)
    out = f(_grad(ids, np.ones((4, 3))))
    np.testing.assert_array_equal(out.indices, np.concatenate([ids, ids]))
  assert f._cache_size() == 1
  indices, row_grads = out  # Unpacks as the NamedTuple did.
  assert indices.shape == (8,) and row_grads.shape == (8, 3)


def test_sparse_grad_through_vmap_scan_and_orbax():
  ocp = pytest.importorskip("orbax.checkpoint")
  stacked = jax.vmap(lambda i: _grad(i[None], jnp.ones((1, 3)) * i))(jnp.arange(4))
  assert stacked.indices.shape == (4, 1)

  def body(carry, g):
    return carry, g

  _, ys = jax.lax.scan(body, 0, stacked)
  np.testing.assert_array_equal(ys.indices[:, 0], np.arange(4))
  tree = {"table": _grad([3, 1], np.full((2, 3), 0.5)), "w": jnp.ones(2)}
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "grads")
    with ocp.StandardCheckpointer() as c:
      c.save(path, tree)
    with ocp.StandardCheckpointer() as c:
      back = c.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))
  assert isinstance(back["table"], SparseGrad)
  np.testing.assert_array_equal(back["table"].indices, [3, 1])
  np.testing.assert_array_equal(back["table"].row_grads, 0.5)
  # The marker survives: the restored one is still loud.
  with pytest.raises(TypeError):
    jax.tree.map(jnp.add, back, back)


# ---------------------------------------------------------------------------
# sparse_grad_sum and sparse_grad_mean.


@settings(max_examples=_tiers.examples(10, 4), deadline=None)
@given(
  ks=st.lists(st.integers(0, 4), min_size=1, max_size=4),
  seed=st.integers(0, 2**16),
)
def test_sum_is_the_dense_sum(ks, seed):
  rng = np.random.default_rng(seed)
  like = jnp.zeros((ROWS, FEATURES))
  grads = [
    {
      "t": _grad(rng.integers(0, ROWS, k), rng.normal(size=(k, FEATURES))),
      "w": jnp.asarray(rng.normal(size=FEATURES), jnp.float32),
    }
    for k in ks
  ]
  total = optax_sm3.sparse_grad_sum(*grads)
  assert isinstance(total["t"], SparseGrad)
  assert total["t"].indices.shape == (sum(ks),)
  expected = sum(_dense(g["t"], like) for g in grads)
  np.testing.assert_allclose(_dense(total["t"], like), expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(total["w"], sum(g["w"] for g in grads), rtol=1e-6)
  mean = optax_sm3.sparse_grad_mean(*grads)
  np.testing.assert_allclose(
    _dense(mean["t"], like), expected / len(ks), rtol=1e-6, atol=1e-6
  )


def test_sum_of_sparse_and_dense_is_dense():
  like = jnp.zeros((ROWS, FEATURES))
  sparse = _grad([2, 2, 5], np.ones((3, FEATURES)))
  dense = jnp.full((ROWS, FEATURES), 0.25)
  total = optax_sm3.sparse_grad_sum({"t": sparse}, {"t": dense})["t"]
  np.testing.assert_allclose(total, _dense(sparse, like) + dense)


def test_sum_rejects_other_structures_and_nothing():
  with pytest.raises(ValueError, match="structure"):
    optax_sm3.sparse_grad_sum({"a": jnp.ones(2)}, {"b": jnp.ones(2)})
  with pytest.raises(TypeError):
    optax_sm3.sparse_grad_sum()


@pytest.mark.parametrize(
  "hyper",
  [
    dict(learning_rate=0.1, momentum=0.0),
    pytest.param(
      dict(learning_rate=0.1, momentum=0.9, beta=0.5, weight_decay=1e-2),
      marks=pytest.mark.slow,
    ),
  ],
  ids=["plain", "momentum-decay"],
)
def test_stepping_with_the_sum_equals_dense_sm3(hyper):
  params = _params()
  opt = optax_sm3.sparse_tables(optax.adam(1e-2), optax_sm3.sm3(**hyper), tables=MASK)
  labels = {k: "tables" if v else "rest" for k, v in MASK.items()}
  dense = optax.multi_transform(
    {"tables": optax_sm3.sm3(**hyper), "rest": optax.adam(1e-2)}, labels
  )
  rng = np.random.default_rng(0)
  steps, micro = 6, 3
  ids = jnp.asarray(rng.integers(0, 20, (steps, micro, 2, 3)), jnp.int32)
  ys = jnp.asarray(rng.normal(size=(steps, micro, 2)), jnp.float32)

  @jax.jit
  def run(params):
    a, state = params, opt.init(params)
    b, dense_state = params, dense.init(params)
    for s in range(steps):
      parts = [
        opt.value_and_grad(_loss)(a, state, ids[s, m], ys[s, m])[1]
        for m in range(micro)
      ]
      a, state = opt.step(a, optax_sm3.sparse_grad_sum(*parts), state)
      dense_parts = [jax.grad(_loss)(b, ids[s, m], ys[s, m]) for m in range(micro)]
      summed = jax.tree.map(lambda *g: sum(g), *dense_parts)
      updates, dense_state = dense.update(summed, dense_state, b)
      b = optax.apply_updates(b, updates)
    return opt.sync(a, state)[0], b

  a, b = run(params)
  for name in params:
    scale = np.max(np.abs(b[name]))
    assert np.max(np.abs(a[name] - b[name])) <= 2e-6 * scale, name


# ---------------------------------------------------------------------------
# sparse_multi_steps against optax.MultiSteps over the dense optimizer.


@pytest.mark.parametrize(
  "hyper",
  [
    dict(learning_rate=0.1, momentum=0.0),
    dict(learning_rate=0.1, momentum=0.5, beta=0.9, weight_decay=1e-3),
  ],
  ids=["plain", "momentum-decay"],
)
def test_multi_steps_equals_optax_multisteps(hyper):
  every_k, calls = 3, 12
  params = _params()
  opt = optax_sm3.sparse_multi_steps(
    optax_sm3.sparse_tables(optax.adam(1e-2), optax_sm3.sm3(**hyper), tables=MASK),
    every_k,
  )
  labels = {k: "tables" if v else "rest" for k, v in MASK.items()}
  dense = optax.MultiSteps(
    optax.multi_transform(
      {"tables": optax_sm3.sm3(**hyper), "rest": optax.adam(1e-2)}, labels
    ),
    every_k,
  )
  rng = np.random.default_rng(3)
  batches = (
    jnp.asarray(rng.integers(0, 20, (calls, 2, 3)), jnp.int32),
    jnp.asarray(rng.normal(size=(calls, 2)), jnp.float32),
  )
  _, grads_like = jax.eval_shape(
    optax_sm3.sparse_value_and_grad(_loss), params, batches[0][0], batches[1][0]
  )
  state = opt.init(params, grads_like)
  shapes = [(x.shape, x.dtype) for x in jax.tree.leaves(state)]
  treedef = jax.tree.structure(state)

  @jax.jit
  def run(params, state):
    def sparse_body(carry, batch):
      params, state = carry
      _, grads = opt.value_and_grad(_loss)(params, state, *batch)
      params, state = opt.step(params, grads, state)
      return (params, state), params["w"]

    def dense_body(carry, batch):
      params, state = carry
      updates, state = dense.update(jax.grad(_loss)(params, *batch), state, params)
      params = optax.apply_updates(params, updates)
      return (params, state), params["w"]

    (a, state), w_a = jax.lax.scan(sparse_body, (params, state), batches)
    (b, _), w_b = jax.lax.scan(dense_body, (params, dense.init(params)), batches)
    return opt.sync(a, state)[0], b, state, w_a, w_b

  a, b, state, w_a, w_b = run(params, state)
  # The state keeps its shapes (a lax.scan carry), the steps fall where
  # MultiSteps's do, and the parameters agree with its to float rounding.
  assert jax.tree.structure(state) == treedef
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(state)] == shapes
  assert int(state.gradient_step) == calls // every_k
  assert int(state.mini_step) == 0
  np.testing.assert_allclose(w_a, w_b, rtol=1e-5)
  np.testing.assert_array_equal(
    w_a[: every_k - 1], np.broadcast_to(params["w"], (2, 3))
  )
  for name in params:
    scale = np.max(np.abs(b[name]))
    assert np.max(np.abs(a[name] - b[name])) <= 2e-6 * scale, name


def test_multi_steps_bad_input():
  params = _params()
  tables = optax_sm3.sparse_tables(
    optax.sgd(0.1), optax_sm3.sm3(0.1, momentum=0.0), tables=MASK
  )
  with pytest.raises(ValueError, match="every_k_schedule"):
    optax_sm3.sparse_multi_steps(tables, 0)
  with pytest.raises(TypeError, match=r"optax\.MultiSteps"):
    optax_sm3.sparse_multi_steps(optax.sgd(0.1), 2)
  opt = optax_sm3.sparse_multi_steps(tables, 2)
  with pytest.raises(TypeError, match="GradientTransformation"):
    opt.update(None, None, None)
  ids, y = jnp.array([[1, 2, 3]]), jnp.array([1.0])
  _, like = jax.eval_shape(optax_sm3.sparse_value_and_grad(_loss), params, ids, y)
  state = opt.init(params, like)
  _, grads = opt.value_and_grad(_loss)(params, state, jnp.array([[1, 2]]), y)
  with pytest.raises(ValueError, match="rows"):
    opt.step(params, grads, state)


# ---------------------------------------------------------------------------
# NNX: accumulate in the step with sparse_grad_mean, one SparseOptimizer step.


def _nnx_bag_model(nnx):
  """A bag-of-ids NNX model (``embed`` table, linear head) and its loss."""

  class Model(nnx.Module):
    def __init__(self, embed, rngs):
      self.items = embed(ROWS, FEATURES, rngs=rngs)
      self.head = nnx.Linear(FEATURES, 1, rngs=rngs)

    def __call__(self, ids):
      return self.head(self.items(ids).mean(axis=1))[:, 0]

  def loss(model, ids, y):
    return jnp.mean((model(ids) - y) ** 2)

  return Model, loss


def _assert_params_close(nnx, sparse, dense):
  for x, y in zip(
    jax.tree.leaves(nnx.state(sparse, nnx.Param)),
    jax.tree.leaves(nnx.state(dense, nnx.Param)),
    strict=True,
  ):
    assert np.max(np.abs(x - y)) <= 2e-6 * np.max(np.abs(y))


def test_nnx_accumulation_equals_optax_multisteps():
  nnx = pytest.importorskip("flax.nnx")
  import optax_sm3.nnx as sparse_nnx

  Model, loss = _nnx_bag_model(nnx)

  every_k, steps = 3, 4
  hyper = dict(learning_rate=0.1, momentum=0.5, beta=0.5)
  sparse = Model(sparse_nnx.SparseEmbed, nnx.Rngs(0))
  dense = Model(nnx.Embed, nnx.Rngs(0))
  # sm3 on every parameter: the table by sparse rows, the head by tx.
  opt = sparse_nnx.SparseOptimizer(sparse, optax_sm3.sm3(**hyper))
  dense_tx = optax.MultiSteps(optax_sm3.sm3(**hyper), every_k)
  dense_opt = nnx.Optimizer(dense, dense_tx, wrt=nnx.Param)
  rng = np.random.default_rng(5)
  ids = jnp.asarray(rng.integers(0, 20, (steps, every_k, 2, 3)), jnp.int32)
  ys = jnp.asarray(rng.normal(size=(steps, every_k, 2)), jnp.float32)

  @nnx.jit
  def sparse_step(model, opt, ids, ys):
    parts = [
      sparse_nnx.value_and_grad(loss)(model, ids[m], ys[m])[1] for m in range(every_k)
    ]
    opt.update(model, optax_sm3.sparse_grad_mean(*parts))

  @nnx.jit
  def dense_step(model, opt, ids, y):
    opt.update(model, nnx.grad(loss)(model, ids, y))

  for s in range(steps):
    sparse_step(sparse, opt, ids[s], ys[s])
    for m in range(every_k):
      dense_step(dense, dense_opt, ids[s, m], ys[s, m])
  opt.sync(sparse)
  _assert_params_close(nnx, sparse, dense)


def test_nnx_multi_steps_equals_optax_multisteps():
  nnx = pytest.importorskip("flax.nnx")
  import optax_sm3.nnx as sparse_nnx

  Model, loss = _nnx_bag_model(nnx)

  every_k, calls = 3, 9
  hyper = dict(learning_rate=0.1, momentum=0.5, beta=0.5, weight_decay=1e-3)
  sparse = Model(sparse_nnx.SparseEmbed, nnx.Rngs(0))
  dense = Model(nnx.Embed, nnx.Rngs(0))
  opt = sparse_nnx.SparseOptimizer(sparse, optax_sm3.sm3(**hyper))
  dense_opt = nnx.Optimizer(
    dense, optax.MultiSteps(optax_sm3.sm3(**hyper), every_k), wrt=nnx.Param
  )
  rng = np.random.default_rng(6)
  ids = jnp.asarray(rng.integers(0, 20, (calls, 2, 3)), jnp.int32)
  ys = jnp.asarray(rng.normal(size=(calls, 2)), jnp.float32)
  _, like = sparse_nnx.value_and_grad(loss)(sparse, ids[0], ys[0])
  multi = sparse_nnx.MultiSteps(opt, every_k, like)
  shapes = [(x.shape, x.dtype) for x in jax.tree.leaves(nnx.state(multi))]

  @nnx.jit
  def sparse_step(model, multi, ids, y):
    multi.update(model, sparse_nnx.value_and_grad(loss)(model, ids, y)[1])

  @nnx.jit
  def dense_step(model, opt, ids, y):
    opt.update(model, nnx.grad(loss)(model, ids, y))

  for t in range(calls):
    sparse_step(sparse, multi, ids[t], ys[t])
    dense_step(dense, dense_opt, ids[t], ys[t])
    # The tables move only on the cycle's last call.
    assert int(opt.step[...]) == (t + 1) // every_k
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(nnx.state(multi))] == shapes
  opt.sync(sparse)
  _assert_params_close(nnx, sparse, dense)
  with pytest.raises(ValueError, match="every_k_schedule"):
    sparse_nnx.MultiSteps(opt, 0, like)
