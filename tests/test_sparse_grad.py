"""sparse_lookup, sparse_value_and_grad and sparse_tables (framework-free)."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _lazy_rows import lazy_table
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

import optax_sm3
from optax_sm3._sparse._grad import SparseGrad, sparse_lookup, sparse_value_and_grad
from optax_sm3._sparse._tables import sparse_tables


def _params(rows=40, features=3):
  keys = jax.random.split(jax.random.key(0), 3)
  return {
    "table": jax.random.normal(keys[0], (rows, features)),
    "other": jax.random.normal(keys[1], (9, features)),
    "w": jax.random.normal(keys[2], (features,)),
  }


def _loss(params, ids, context, y):
  # One table looked up twice, another once, a dense weight.
  bag = sparse_lookup(params["table"], ids).mean(axis=1)
  ctx = sparse_lookup(params["table"], context) * sparse_lookup(
    params["other"], context % 9
  )
  pred = jnp.sum(bag * ctx * params["w"][None, :], axis=-1)
  return jnp.mean((pred - y) ** 2)


def _scatter(g, like):
  return jnp.zeros_like(like).at[g.indices].add(g.row_grads)


@settings(max_examples=5, deadline=None, phases=(Phase.explicit, Phase.generate))
@given(
  ids=st.lists(st.integers(0, 39), min_size=6, max_size=6),
  context=st.lists(st.integers(0, 39), min_size=2, max_size=2),
)
def test_gradients_equal_jax_grad(ids, context):
  params = _params()
  ids, context = jnp.array(ids).reshape(2, 3), jnp.array(context)
  y = jnp.array([0.5, -1.0])
  value, grads = sparse_value_and_grad(_loss)(params, ids, context, y)
  ref_value, ref = jax.value_and_grad(_loss)(params, ids, context, y)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  np.testing.assert_allclose(grads["w"], ref["w"], rtol=1e-5, atol=1e-7)
  for name in ("table", "other"):
    assert isinstance(grads[name], SparseGrad)
    np.testing.assert_allclose(
      _scatter(grads[name], params[name]), ref[name], rtol=1e-5, atol=1e-7
    )
  # Call order, repeats kept.
  np.testing.assert_array_equal(
    grads["table"].indices, np.concatenate([np.ravel(ids), context])
  )


def test_outside_the_helper_it_is_take_and_checks_ids():
  table = jnp.arange(12.0).reshape(4, 3)
  ids = jnp.array([[3, 0]])
  np.testing.assert_array_equal(sparse_lookup(table, ids), jnp.take(table, ids, axis=0))
  with pytest.raises(TypeError, match="ids"):
    sparse_lookup(table, jnp.array([1.0]))
  with pytest.raises(ValueError, match=r"\[0, 4\)"):
    sparse_lookup(table, jnp.array([4]))
  with pytest.raises(ValueError, match=r"\[0, 4\)"):
    sparse_lookup(table, jnp.array([-1]))


def test_dense_use_gets_the_dense_gradient():
  params = _params()

  def loss(params, ids):
    rows = sparse_lookup(params["table"], ids)
    return jnp.sum(rows**2) + jnp.sum(params["w"] @ params["table"].T)

  _, grads = sparse_value_and_grad(loss)(params, jnp.array([1, 1, 5]))
  ref = jax.grad(loss)(params, jnp.array([1, 1, 5]))
  np.testing.assert_allclose(grads["table"], ref["table"], rtol=1e-6)


def test_argnums_has_aux_and_jit():
  params = _params()
  scale = jnp.asarray(3.0)

  def loss(scale, params, ids):
    value = scale * jnp.sum(sparse_lookup(params["table"], ids))
    return value, value * 2

  fn = jax.jit(sparse_value_and_grad(loss, argnums=(0, 1), has_aux=True))
  (value, aux), (g_scale, g_params) = fn(scale, params, jnp.array([2, 7]))
  np.testing.assert_allclose(aux, 2 * value)
  np.testing.assert_allclose(g_scale, value / 3, rtol=1e-6)
  np.testing.assert_array_equal(g_params["table"].indices, [2, 7])
  np.testing.assert_allclose(g_params["table"].row_grads, 3.0)
  with pytest.raises(ValueError, match="argnums"):
    sparse_value_and_grad(loss, argnums=5)(scale, params, jnp.array([2]))


def test_no_table_sized_array_in_the_gradient():
  params = {"table": jnp.ones((9973, 7)), "w": jnp.ones(7)}
  loss = lambda p, ids: jnp.sum(sparse_lookup(p["table"], ids) @ p["w"])
  pattern = re.compile(r"=\s*\w+\[9973,7\]")

  def made(fn):
    hlo = jax.jit(fn).lower(params, jnp.array([1, 5, 5])).compile().as_text()
    return [
      ln for ln in hlo.splitlines() if pattern.search(ln) and "parameter(" not in ln
    ]

  assert not made(sparse_value_and_grad(loss))
  assert made(jax.grad(loss))  # The check can fail.


def _hyper(beta, momentum, weight_decay):
  return dict(
    learning_rate=0.1, momentum=momentum, beta=beta, eps=1e-8, weight_decay=weight_decay
  )


# Each example compiles two scans: one by default, more with
# OPTAX_SM3_EXACT_EXAMPLES=n.
@settings(
  max_examples=int(os.environ.get("OPTAX_SM3_EXACT_EXAMPLES", "1")),
  deadline=None,
  phases=(Phase.explicit, Phase.generate),
)
@example(beta=0.9, momentum=0.5, weight_decay=1e-3, seed=1)
@given(
  beta=st.sampled_from([0.0, 0.9]),
  momentum=st.sampled_from([0.0, 0.5]),
  weight_decay=st.sampled_from([0.0, 1e-3]),
  seed=st.integers(0, 2**16),
)
def test_sparse_tables_matches_dense_sm3(beta, momentum, weight_decay, seed):
  _check_sparse_tables(_hyper(beta, momentum, weight_decay), seed, 100, 1e-6)


def test_sparse_tables_reads_stale_tables_through_lookup(monkeypatch):
  lazy = lazy_table(optax_sm3._sparse._rows.Table)
  monkeypatch.setattr(optax_sm3._sparse._rows, "Table", lazy)
  _check_sparse_tables(_hyper(0.5, 0.0, 0.0), 3, 20, 1e-5)


def _check_sparse_tables(hyper, seed, steps, rtol):
  params = dict(_params(), unused=jnp.ones((5, 3)))
  mask = {"table": True, "other": True, "unused": True, "w": False}
  tx = optax.adam(1e-2)
  table_tx = optax_sm3.sm3(**hyper)
  opt = sparse_tables(tx, table_tx, tables=mask)
  labels = {k: "tables" if v else "rest" for k, v in mask.items()}
  dense = optax.multi_transform({"tables": table_tx, "rest": tx}, labels)
  rng = np.random.default_rng(seed)
  batches = (
    rng.integers(0, 25, (steps, 2, 3)).astype(np.int32),
    rng.integers(0, 25, (steps, 2)).astype(np.int32),
    rng.normal(size=(steps, 2)).astype(np.float32),
  )

  @jax.jit
  def run(params):
    def sparse_body(carry, batch):
      params, state = carry
      _, grads = opt.value_and_grad(_loss)(params, state, *batch)
      assert grads["unused"].indices.shape == (0,)  # Known table, no lookup.
      return opt.step(params, grads, state), None

    def dense_body(carry, batch):
      params, state = carry
      grads = jax.grad(_loss)(params, *batch)
      updates, state = dense.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    (a, state), _ = jax.lax.scan(sparse_body, (params, opt.init(params)), batches)
    (b, _), _ = jax.lax.scan(dense_body, (params, dense.init(params)), batches)
    return opt.sync(a, state)[0], b

  a, b = run(params)
  for name in params:
    scale = np.max(np.abs(b[name]))
    assert np.max(np.abs(a[name] - b[name])) <= rtol * scale, name
  if hyper["weight_decay"] == 0.0:  # Rows 25.. are never looked up.
    np.testing.assert_allclose(
      a["table"][25:], params["table"][25:], rtol=0 if rtol <= 1e-6 else rtol
    )


def test_sparse_tables_bad_input():
  params = _params()
  mask = {"table": True, "other": True, "w": False}
  opt = sparse_tables(optax.sgd(0.1), optax_sm3.sm3(0.1, momentum=0.0), tables=mask)
  state = opt.init(params)
  with pytest.raises(ValueError, match="tables"):
    sparse_tables(
      optax.sgd(0.1), optax_sm3.sm3(0.1, momentum=0.0), tables={"table": True}
    ).init(params)
  batch = (jnp.array([[1, 2, 3]]), jnp.array([4]), jnp.array([1.0]))
  _, grads = opt.value_and_grad(_loss)(params, state, *batch)
  with pytest.raises(ValueError, match="grads"):
    opt.step(params, {"table": grads["table"]}, state)
  bigger = dict(params, table=jnp.zeros((41, 3)))
  with pytest.raises(ValueError, match=r"shape \(41, 3\)"):
    opt.step(bigger, grads, state)
  with pytest.raises(TypeError, match="SparseGrad"):
    opt.step(params, dict(grads, table=jnp.zeros((2, 3))), state)
