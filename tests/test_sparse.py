"""sparse_rows against the dense optax_sm3.sm3 path, plus its contracts."""

import functools
import importlib.util
import pathlib
import sys

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sm3

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCHEDULE = optax.linear_schedule(0.3, 0.01, 6)


def _learning_rate(name):
  return {"constant": 0.1, "schedule": SCHEDULE}[name]


@functools.cache
def _pair(lr_name, momentum, beta, weight_decay):
  """(sparse, jitted dense step) for one set of hyperparameters, cached."""
  lr = _learning_rate(lr_name)
  sparse = optax_sm3.sparse_rows(lr, momentum, beta, 1e-8, weight_decay)
  dense = optax_sm3.sm3(lr, momentum, beta, 1e-8, weight_decay=weight_decay)

  @jax.jit
  def dense_step(indices, row_grads, state, table):
    # The dense gradient of table[indices]: zeros elsewhere, repeats summed.
    grad = jnp.zeros_like(table).at[indices].add(row_grads.astype(table.dtype))
    updates, state = dense.update(grad, state, table)
    return optax.apply_updates(table, updates), state

  return sparse, dense, dense_step


def _assert_close(actual, expected, rtol=2e-6, atol=1e-7):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    assert a.shape == e.shape and a.dtype == e.dtype
    np.testing.assert_allclose(
      np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=rtol, atol=atol
    )


def _batches(rng, shape, steps, k, touched_rows, scale=1.0):
  for _ in range(steps):
    indices = rng.integers(0, touched_rows, size=k).astype(np.int32)
    grads = rng.standard_normal((k, *shape[1:])).astype(np.float32)
    yield indices, grads * np.float32(scale * rng.uniform(0.1, 10.0))


def _compare(shape, steps, k, touched_rows, seed, hyper, dtype=jnp.float32, **kw):
  sparse, dense, dense_step = _pair(*hyper)
  rng = np.random.default_rng(seed)
  table = jnp.asarray(rng.standard_normal(shape), dtype)
  s_table, s_state = table, sparse.init(table)
  d_table, d_state = table, dense.init(table)
  _assert_close(s_state, d_state, rtol=0, atol=0)
  for indices, grads in _batches(rng, shape, steps, k, touched_rows):
    s_table, s_state = sparse.update(indices, grads, s_state, s_table)
    d_table, d_state = dense_step(indices, grads, d_state, d_table)
    _assert_close((s_table, s_state), (d_table, d_state), **kw)
  return s_table, s_state, table


# ---------------------------------------------------------------------------
# Equality with the dense path.

# (learning rate, momentum, beta, weight_decay): a few combinations, each
# compiled once (the pairs are cached), covering every stage of the chain.
HYPER = st.sampled_from(
  [
    ("constant", 0.0, 0.0, 0.0),
    ("constant", 0.0, 0.99, 0.0),
    ("schedule", 0.0, 0.5, 0.0),
    ("constant", 0.9, 0.0, 0.01),
    ("schedule", 0.9, 0.99, 0.0),
    ("schedule", 0.0, 0.5, 0.01),
  ]
)
SHAPES = st.sampled_from([(1,), (9,), (1, 3), (9, 4), (16, 1), (7, 2, 3), (5, 1, 4)])


# Each example compiles a sparse and a dense step (about 1 s on a CPU core):
# a fixed, modest number of examples, each running up to 10 steps.
@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(
  shape=SHAPES,
  steps=st.integers(1, 10),
  k=st.sampled_from([2, 8]),
  narrow=st.booleans(),
  seed=st.integers(0, 2**31 - 1),
  hyper=HYPER,
)
def test_matches_dense_sm3(shape, steps, k, narrow, seed, hyper):
  # `narrow` draws indices from the first half of the rows only: repeats are
  # likely and the other rows are never touched.
  touched_rows = max(1, shape[0] // 2) if narrow else shape[0]
  _compare(shape, steps, k, touched_rows, seed, hyper)


@pytest.mark.parametrize("beta", [0.0, 0.9])
@pytest.mark.parametrize("shape", [(64, 8), (32, 3, 5)])
def test_long_run_matches_dense(shape, beta):
  # Many steps with rows seen at very different rates: accumulators of rows
  # that were skipped for a while must still be right when they come back.
  table, state, _ = _compare(
    shape, 25, 6, shape[0], 0, ("constant", 0.0, beta, 0.0), rtol=1e-5, atol=1e-6
  )
  assert int(state[0].count) == 25
  assert np.all(np.isfinite(np.asarray(table)))


@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_untouched_rows_stay_and_row_accumulators_scale_by_beta(beta):
  sparse = _pair("constant", 0.0, beta, 0.0)[0]
  rng = np.random.default_rng(1)
  table = jnp.asarray(rng.standard_normal((10, 4)), jnp.float32)
  state = sparse.init(table)
  table, state = sparse.update(np.arange(10), np.ones((10, 4)), state, table)
  rows_before = np.asarray(state[0].accumulators[0])
  new_table, state = sparse.update(np.array([2, 5]), np.ones((2, 4)), state, table)
  untouched = np.setdiff1d(np.arange(10), [2, 5])
  np.testing.assert_array_equal(new_table[untouched], table[untouched])
  assert not np.any(np.asarray(new_table[2]) == np.asarray(table[2]))
  c_old = 1.0 if beta == 0 else beta
  np.testing.assert_allclose(
    np.asarray(state[0].accumulators[0])[untouched],
    np.float32(c_old) * rows_before[untouched],
    rtol=0,
  )


def test_repeated_indices_are_summed():
  sparse, dense, dense_step = _pair("constant", 0.0, 0.0, 0.0)
  table = jnp.zeros((6, 3))
  grads = np.arange(15, dtype=np.float32).reshape(5, 3)
  indices = np.array([4, 4, 1, 4, 1])
  s_table, s_state = sparse.update(indices, grads, sparse.init(table), table)
  d_table, d_state = dense_step(indices, grads, dense.init(table), table)
  _assert_close((s_table, s_state), (d_table, d_state))
  # Row 4 saw gradient rows 0 + 1 + 3, row 1 rows 2 + 4.
  np.testing.assert_allclose(
    s_state[0].accumulators[0][jnp.array([1, 4])],
    [np.max((grads[2] + grads[4]) ** 2), np.max((grads[0] + grads[1] + grads[3]) ** 2)],
  )


@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_every_row_in_the_batch(beta):
  # No row outside the batch: the column rule must not use an empty maximum.
  sparse, dense, dense_step = _pair("constant", 0.9, beta, 0.0)
  rng = np.random.default_rng(2)
  table = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
  s, d = (table, sparse.init(table)), (table, dense.init(table))
  for _ in range(3):
    indices = rng.permutation(5)
    grads = rng.standard_normal((5, 3)).astype(np.float32)
    s = sparse.update(indices, grads, s[1], s[0])
    d = dense_step(indices, grads, d[1], d[0])
    _assert_close(s, d)


def test_first_step_beta_from_zero_accumulators():
  # Step 1 with beta > 0 from all-zero accumulators, a small batch of a big
  # table: the column accumulators are (1 - beta) * max g**2 over the batch.
  sparse = optax_sm3.sparse_rows(0.1, beta=0.9)
  grads = np.array([[1.0, -3.0], [2.0, 0.5]], np.float32)
  table, state = sparse.update(
    np.array([7, 2]), grads, sparse.init(jnp.zeros((100, 2))), jnp.zeros((100, 2))
  )
  rows, columns = state[0].accumulators
  np.testing.assert_allclose(columns, np.float32(0.1) * np.array([4.0, 9.0]))
  np.testing.assert_allclose(
    rows[jnp.array([2, 7])], np.float32(0.1) * np.array([4.0, 9.0])
  )
  assert float(jnp.sum(rows)) == pytest.approx(1.3, rel=1e-6)
  # nu = (1 - beta) g**2: each touched entry moves by lr * sign(g) /
  # sqrt(1 - beta), untouched rows not at all.
  expected = np.zeros((100, 2), np.float32)
  expected[[7, 2]] = -0.1 * np.sign(grads) / np.sqrt(0.1)
  np.testing.assert_allclose(table, expected, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes_follow_the_dense_path(dtype):
  _compare((12, 4), 5, 4, 12, 3, ("constant", 0.9, 0.0, 0.01), dtype=dtype, rtol=1e-2)


# ---------------------------------------------------------------------------
# jit, donation, state contracts.


def test_jit_with_donated_table_and_state_matches_dense_without_recompiling():
  sparse, dense, dense_step = _pair("schedule", 0.0, 0.5, 0.0)
  update = jax.jit(sparse.update, donate_argnums=(2, 3))
  rng = np.random.default_rng(4)
  table = jnp.asarray(rng.standard_normal((20, 3, 2)), jnp.float32)
  s_table, s_state = jnp.copy(table), sparse.init(table)
  d_table, d_state = table, dense.init(table)
  for indices, grads in _batches(rng, table.shape, 6, 5, 20):
    old_table = s_table
    s_table, s_state = update(
      jnp.asarray(indices), jnp.asarray(grads), s_state, s_table
    )
    d_table, d_state = dense_step(indices, grads, d_state, d_table)
    _assert_close((s_table, s_state), (d_table, d_state))
    assert old_table.is_deleted()
  assert update._cache_size() == 1


def test_state_structure_dtypes_and_shapes_are_stable():
  sparse = optax_sm3.sparse_rows(SCHEDULE, momentum=0.9, beta=0.5, weight_decay=0.1)
  table = jnp.ones((8, 2, 3), jnp.bfloat16)
  state = sparse.init(table)
  new_table, new_state = sparse.update(
    np.array([1, 1]), np.ones((2, 2, 3)), state, table
  )
  assert new_table.dtype == table.dtype and new_table.shape == table.shape
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True):
    assert (a.shape, a.dtype) == (b.shape, b.dtype)

  # So lax.scan can carry it.
  def body(carry, batch):
    return sparse.update(batch[0], batch[1], carry[1], carry[0]), None

  batches = (jnp.array([[0, 7], [3, 3]]), jnp.ones((2, 2, 2, 3), jnp.float32))
  (scanned, _), _ = jax.lax.scan(body, (table, state), batches)
  assert bool(jnp.all(scanned[jnp.array([0, 3, 7])] < 1.0))
  assert bool(jnp.all(scanned[1] < 1.0))  # weight decay moves every row


def test_init_equals_sm3_init():
  for momentum, weight_decay in [(0.0, 0.0), (0.9, 0.0), (0.0, 0.1), (0.5, 0.1)]:
    table = jnp.ones((4, 3))
    sparse = optax_sm3.sparse_rows(SCHEDULE, momentum, weight_decay=weight_decay)
    dense = optax_sm3.sm3(SCHEDULE, momentum, weight_decay=weight_decay)
    _assert_close(sparse.init(table), dense.init(table), rtol=0, atol=0)
  # momentum = 0 keeps no buffer: the state is O(V + D).
  state = optax_sm3.sparse_rows(0.1).init(jnp.ones((1000, 16)))
  assert sum(x.size for x in jax.tree.leaves(state)) == 1000 + 16 + 1


def test_out_of_range_indices_under_jit_are_dropped():
  sparse, dense, dense_step = _pair("constant", 0.0, 0.0, 0.0)
  table = jnp.ones((6, 2))
  grads = np.ones((3, 2), np.float32)
  s = jax.jit(sparse.update)(np.array([1, 6, -1]), grads, sparse.init(table), table)
  d = dense_step(np.array([1]), grads[:1], dense.init(table), table)
  _assert_close(s, d)


# ---------------------------------------------------------------------------
# Invalid input.


@pytest.mark.parametrize(
  ("kwargs", "name"),
  [
    ({"learning_rate": -0.1}, "learning_rate"),
    ({"momentum": 1.0}, "momentum"),
    ({"beta": 1.0}, "beta"),
    ({"beta": -0.5}, "beta"),
    ({"eps": -1.0}, "eps"),
    ({"weight_decay": -1e-3}, "weight_decay"),
  ],
)
def test_rejects_hyperparameters_out_of_range(kwargs, name):
  kwargs = {"learning_rate": 0.1, **kwargs}
  with pytest.raises(ValueError, match=rf"`{name}` must be in"):
    optax_sm3.sparse_rows(**kwargs)


def test_rejects_bad_batches_and_tables():
  sparse = optax_sm3.sparse_rows(0.1)
  table = jnp.ones((5, 3))
  state = sparse.init(table)
  cases = [
    (TypeError, "`indices` must be integers", (np.array([0.0]), np.ones((1, 3)))),
    (
      ValueError,
      r"`indices` must have shape \(k,\)",
      (np.ones((1, 1), int), np.ones((1, 3))),
    ),
    (
      ValueError,
      r"`indices` must have shape \(k,\)",
      (np.zeros(0, int), np.ones((0, 3))),
    ),
    (
      ValueError,
      r"`row_grads` must have shape .* \(2, 3\)",
      (np.array([0, 1]), np.ones((2, 4))),
    ),
    (ValueError, r"`indices` must be in \[0, 5\)", (np.array([0, 5]), np.ones((2, 3)))),
    (ValueError, r"`indices` must be in \[0, 5\)", (np.array([-1]), np.ones((1, 3)))),
  ]
  for error, message, (indices, grads) in cases:
    with pytest.raises(error, match=message):
      sparse.update(indices, grads, state, table)
  with pytest.raises(ValueError, match="`table` must have rank >= 1"):
    sparse.init(jnp.ones(()))
  with pytest.raises(TypeError, match="`table` must have a real floating dtype"):
    sparse.init(jnp.ones((3, 2), jnp.int32))
  with pytest.raises(ValueError, match="`state` does not belong"):
    sparse.update(np.array([0]), np.ones((1, 3, 1)), state, jnp.ones((5, 3, 1)))


# ---------------------------------------------------------------------------
# The MovieLens example.


def test_movielens_example_sparse_matches_dense_and_learns():
  sys.path.insert(0, str(ROOT))
  try:
    from benchmarks import _data

    try:
      _data.package_dir("recbole")
    except _data.MissingDataError as error:
      pytest.skip(str(error))
    spec = importlib.util.spec_from_file_location(
      "movielens_sparse", ROOT / "examples" / "movielens_sparse.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
  finally:
    sys.path.remove(str(ROOT))
  result = example.main(["--epochs", "2", "--quiet"])
  sparse, dense = result["sparse"], result["dense"]
  assert sparse["test_rmse"][-1] == pytest.approx(dense["test_rmse"][-1], abs=1e-3)
  assert sparse["test_rmse"][-1] < sparse["initial_test_rmse"] - 0.05
