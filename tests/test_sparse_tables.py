"""sparse_tables: its API cannot be taken for an optax GradientTransformation.

The exactness of its step against dense sm3 is tested in test_sparse_grad.py
(with the lookups that feed it), test_sparse_accumulate.py and
test_linen_sparse.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sm3

MASK = {"table": True, "w": False}


def _params():
  return {"table": jnp.ones((20, 2)), "w": jnp.asarray(2.0, jnp.float32)}


def _loss(params, ids):
  return params["w"] * jnp.sum(optax_sm3.sparse_lookup(params["table"], ids) ** 2)


def test_update_raises_and_names_the_fix():
  opt = optax_sm3.sparse_tables(
    optax.sgd(0.1), optax_sm3.sm3(0.1, momentum=0.0), tables=MASK
  )
  assert not isinstance(opt, optax.GradientTransformation)
  assert not isinstance(opt, tuple)  # No (init, update) unpacking either.
  params = _params()
  state = opt.init(params)
  _, grads = opt.value_and_grad(_loss)(params, state, jnp.array([1]))
  with pytest.raises(TypeError, match=r"step\(params, grads, state\)"):
    opt.update(grads, state, params)
  # Wrapped in an optax combinator, it fails at its first update.
  chained = optax.chain(opt)
  with pytest.raises(TypeError, match="SparseTrainState"):
    chained.update(grads, chained.init(params), params)


def test_step_returns_params_not_updates():
  opt = optax_sm3.sparse_tables(
    optax.sgd(0.1), optax_sm3.sm3(0.1, momentum=0.0), tables=MASK
  )
  params = _params()
  state = opt.init(params)
  _, grads = opt.value_and_grad(_loss)(params, state, jnp.array([1, 1]))
  new, _ = opt.step(params, grads, state)
  # Row 1 moved by one AdaGrad-like step of 0.1; the others are the params.
  np.testing.assert_allclose(new["table"][1], 0.9, rtol=1e-6)
  np.testing.assert_array_equal(new["table"][0], 1.0)
  np.testing.assert_allclose(new["w"], 2.0 - 0.1 * 4.0, rtol=1e-6)


def test_step_under_jit_compiles_once():
  opt = optax_sm3.sparse_tables(
    optax.sgd(0.1), optax_sm3.sm3(0.1, momentum=0.0), tables=MASK
  )
  params = _params()
  state = opt.init(params)
  step = jax.jit(opt.step)
  for ids in ([1, 2], [3, 3], [0, 19]):
    _, grads = opt.value_and_grad(_loss)(params, state, jnp.array(ids))
    params, state = step(params, grads, state)
  assert step._cache_size() == 1


def test_sparse_grad_outside_the_tables_is_rejected():
  opt = optax_sm3.sparse_tables(
    optax.sgd(0.1),
    optax_sm3.sm3(0.1, momentum=0.0),
    tables={"table": False, "w": False},
  )
  params = _params()
  _, grads = optax_sm3.sparse_value_and_grad(_loss)(params, jnp.array([1]))
  with pytest.raises(TypeError, match="does not mark as a table"):
    opt.step(params, grads, opt.init(params))


@pytest.mark.parametrize(
  "tables", [{"table": "sm3", "w": "adam"}, {"table": 1, "w": 0}]
)
def test_tables_must_be_booleans(tables):
  params = {"table": jnp.ones((5, 2)), "w": jnp.ones(2)}
  opt = optax_sm3.sparse_tables(
    optax.sgd(0.1), optax_sm3.sm3(0.1, momentum=0.0), tables=tables
  )
  with pytest.raises(TypeError, match="`tables` must be a tree of booleans"):
    opt.init(params)


def test_tables_as_a_function_or_an_equinox_tree_of_booleans():
  eqx = pytest.importorskip("equinox")

  class Model(eqx.Module):
    table: object
    w: object

    def __call__(self, ids):
      return self.table[ids] @ self.w

  params = Model(jnp.ones((5, 2)), jnp.ones(2))
  flags = Model(True, False)  # Callable (an eqx.Module), but a tree of flags.
  by_tree = optax_sm3.sparse_tables(
    optax.sgd(0.1), optax_sm3.sm3(0.1, momentum=0.0), tables=flags
  )
  by_function = optax_sm3.sparse_tables(
    optax.sgd(0.1),
    optax_sm3.sm3(0.1, momentum=0.0),
    tables=lambda p: Model(True, False),
  )
  for opt in (by_tree, by_function):
    state = opt.init(params)
    assert len(state.tables) == 1  # The table alone, not w.
    shapes = {np.shape(x) for x in jax.tree.leaves(state.tables[0])}
    assert (5,) in shapes and (2,) in shapes  # Its row and column accumulators.
