"""sparse_rows against the dense optax_sm3.sm3 path, plus its contracts."""

import functools
import importlib.util
import pathlib
import sys

import _tiers
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sm3
from optax_sm3._sparse import _batch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCHEDULE = optax.linear_schedule(0.3, 0.01, 6)
COSINE = optax.warmup_cosine_decay_schedule(0.0, 0.3, 20, 200, 0.01)


def _learning_rate(name):
  return {"constant": 0.1, "schedule": SCHEDULE, "cosine": COSINE}[name]


@functools.cache
def _pair(lr_name, momentum, beta, weight_decay, period=None):
  """(sparse, dense, jitted dense step) for one set of hyperparameters."""
  lr = _learning_rate(lr_name)
  kwargs = {} if period is None else {"sweep_period": period}
  dense = optax_sm3.sm3(lr, momentum, beta, 1e-8, weight_decay=weight_decay)
  sparse = optax_sm3.sparse_rows(dense, **kwargs)

  @jax.jit
  def dense_step(indices, row_grads, state, table):
    return _dense_update(dense, indices, row_grads, state, table)

  return sparse, dense, dense_step


def _dense_update(dense, indices, row_grads, state, table):
  # The dense gradient of table[indices]: zeros elsewhere, repeats summed.
  grad = jnp.zeros_like(table).at[indices].add(row_grads.astype(table.dtype))
  updates, state = dense.update(grad, state, table)
  return optax.apply_updates(table, updates), state


def _stage(state, kind):
  """The one stage of type `kind` in an optax chain state (found by type)."""
  found = [
    x
    for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kind))
    if isinstance(x, kind)
  ]
  assert len(found) <= 1
  return found[0] if found else None


def _dense_parts(state):
  """(count, accumulators, momentum or None) of an sm3 chain state."""
  sm3 = _stage(state, optax_sm3.ScaleBySM3State)
  momentum = _stage(state, optax_sm3.ScaleByMomentumState)
  momentum = None if momentum is None else momentum.momentum
  return sm3.count, tuple(sm3.accumulators), momentum


def _current(sparse, state, table):
  """(count, accumulators) of a sparse state, its rows brought up to date."""
  state = sparse.sync(state, table)[1]
  if isinstance(state, optax_sm3.SparseRowsState):
    return state.count, state.accumulators
  return _dense_parts(state)[:2]


def _assert_close(actual, expected, rtol=2e-6, atol=1e-7):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    assert a.shape == e.shape and a.dtype == e.dtype
    np.testing.assert_allclose(
      np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=rtol, atol=atol
    )


# Lazy catch-up rounds differently from the dense path's step-by-step
# rounding: both stay within float32 rounding of the exact values, so they
# agree to 1e-6 of the largest entry (entries near 0 have no relative
# accuracy to compare, in either path).
LAZY_TOLERANCE = 1e-6


def _assert_table_close(actual, expected, scale, tolerance=LAZY_TOLERANCE):
  assert actual.shape == expected.shape and actual.dtype == expected.dtype
  a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  np.testing.assert_allclose(a, e, rtol=tolerance, atol=tolerance * scale)


def _assert_matches_dense(
  sparse, s_table, s_state, d_table, d_state, scale, rtol=2e-6, atol=1e-7
):
  """The sparse path's rows (via lookup and sync) and state equal the dense."""
  if not isinstance(s_state, optax_sm3.SparseRowsState):
    _assert_close((s_table, s_state), (d_table, d_state), rtol=rtol, atol=atol)
    return
  count, accumulators, momentum = _dense_parts(d_state)
  assert int(s_state.count) == int(count)
  tolerance = max(rtol, LAZY_TOLERANCE)
  rows = sparse.lookup(np.arange(s_table.shape[0]), s_state, s_table)
  _assert_table_close(rows, d_table, scale, tolerance)
  synced, synced_state = sparse.sync(s_state, s_table)
  # The rows' accumulators are stored behind too (they age with beta > 0).
  _assert_close(synced_state.accumulators, accumulators, rtol=rtol, atol=atol)
  _assert_table_close(synced, d_table, scale, tolerance)
  assert np.all(np.asarray(synced_state.last) == int(count))
  if momentum is None:
    assert synced_state.momentum is None
  else:
    m_scale = max(1e-30, float(jnp.max(jnp.abs(momentum))))
    _assert_table_close(synced_state.momentum[0], momentum, m_scale, tolerance)


def _batches(rng, shape, steps, k, touched_rows, scale=1.0):
  for _ in range(steps):
    indices = rng.integers(0, touched_rows, size=k).astype(np.int32)
    grads = rng.standard_normal((k, *shape[1:])).astype(np.float32)
    yield indices, grads * np.float32(scale * rng.uniform(0.1, 10.0))


def _compare(shape, steps, k, touched_rows, seed, hyper, dtype=jnp.float32, **kw):
  sparse, dense, dense_step = _pair(*hyper)
  rng = np.random.default_rng(seed)
  table = jnp.asarray(rng.standard_normal(shape), dtype)
  scale = max(1.0, float(jnp.max(jnp.abs(table))))
  s_table, s_state = table, sparse.init(table)
  d_table, d_state = table, dense.init(table)
  _assert_matches_dense(sparse, s_table, s_state, d_table, d_state, scale, **kw)
  lazy = isinstance(s_state, optax_sm3.SparseRowsState)
  rows = np.arange(shape[0])
  for indices, grads in _batches(rng, shape, steps, k, touched_rows):
    s_table, s_state = sparse.update(indices, grads, s_state, s_table)
    d_table, d_state = dense_step(indices, grads, d_state, d_table)
    if lazy:  # Every row, every step, as a forward pass would read it.
      tolerance = max(kw.get("rtol", 0.0), LAZY_TOLERANCE)
      _assert_table_close(
        sparse.lookup(rows, s_state, s_table), d_table, scale, tolerance
      )
    else:
      _assert_close((s_table, s_state), (d_table, d_state), **kw)
  if lazy:  # (the rows' accumulators are stored behind: synced first)
    synced = sparse.sync(s_state, s_table)[1].accumulators
    _assert_close(synced, _dense_parts(d_state)[1], **kw)
  return s_table, s_state, table


# ---------------------------------------------------------------------------
# Equality with the dense path.

# (learning rate, momentum, beta, weight_decay, sweep_period): a few
# combinations, each compiled once (the pairs are cached), covering every
# stage of the chain, the sweep and the ring's wrap-around (periods 1 to 3
# within 10 steps).
HYPER = st.sampled_from(
  [
    ("constant", 0.0, 0.0, 0.0, None),
    ("constant", 0.0, 0.99, 0.0, None),
    ("schedule", 0.0, 0.5, 0.0, None),
    ("constant", 0.9, 0.0, 0.01, 2),
    ("schedule", 0.9, 0.99, 0.0, 3),
    ("cosine", 0.0, 0.5, 0.01, 1),
  ]
)
SHAPES = st.sampled_from([(1,), (9,), (1, 3), (9, 4), (16, 1), (7, 2, 3), (5, 1, 4)])


# Each example compiles a sparse and a dense step (about 1 s on a CPU core):
# a fixed, modest number of examples, each running up to 10 steps.
@hypothesis.settings(max_examples=_tiers.examples(12, 4), deadline=None)
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


def _scan_both(sparse, dense, table, indices, grads):
  """Both paths over a batch sequence in one lax.scan; per-step lookup error.

  Returns ``(sparse table, sparse state, dense table, dense state, errors)``
  with ``errors[t]`` the largest ``|lookup(all rows) - dense table|`` after
  step ``t + 1``, over the dense table's largest entry (at least 1).
  """
  rows = jnp.arange(table.shape[0])

  @jax.jit
  def run(table, indices, grads):
    def body(carry, batch):
      (s_table, s_state), (d_table, d_state) = carry
      s_table, s_state = sparse.update(*batch, s_state, s_table)
      d_table, d_state = _dense_update(dense, *batch, d_state, d_table)
      error = jnp.max(jnp.abs(sparse.lookup(rows, s_state, s_table) - d_table))
      error = error / jnp.maximum(1.0, jnp.max(jnp.abs(d_table)))
      return ((s_table, s_state), (d_table, d_state)), error

    start = ((table, sparse.init(table)), (table, dense.init(table)))
    ((s_table, s_state), (d_table, d_state)), errors = jax.lax.scan(
      body, start, (indices, grads)
    )
    return s_table, s_state, d_table, d_state, errors

  return run(table, indices, grads)


@pytest.mark.parametrize(
  "hyper",
  [
    # Momentum alone, decay alone, both with a ring longer than the gaps.
    ("constant", 0.9, 0.0, 0.0, 3),
    ("cosine", 0.0, 0.5, 0.01, 2),
    ("cosine", 0.9, 0.99, 0.1, 1500),
  ],
)
def test_1200_steps_with_long_gaps_match_dense(hyper):
  # 1200 steps (a cosine schedule of 200 steps, then its floor). Rows 0..2
  # get gradients in the first two steps only (momentum builds up), then sit
  # out 1198 steps; rows 3..7 are drawn every step (repeats likely); row 8
  # never. Every row is read through lookup after every step and compared.
  # With a period of 1500 the sweep (one row a step) has passed rows 0..2
  # before their momentum built up: they come back through the ring after a
  # gap of 1198 steps.
  sparse, dense, _ = _pair(*hyper)
  rng = np.random.default_rng(5)
  steps, k = 1200, 3
  table = jnp.asarray(rng.standard_normal((9, 4)), jnp.float32)
  indices = rng.integers(3, 8, (steps, k)).astype(np.int32)
  indices[:2] = [[0, 1, 3], [2, 2, 4]]
  grads = rng.standard_normal((steps, k, 4)) * rng.uniform(0.1, 10.0, (steps, 1, 1))
  s_table, s_state, d_table, d_state, errors = _scan_both(
    sparse, dense, table, jnp.asarray(indices), jnp.asarray(grads, jnp.float32)
  )
  # Both paths' float32 rounding errors grow with the number of steps (each
  # is as far from the float64 values as the two are apart).
  assert float(jnp.max(errors[:200])) <= LAZY_TOLERANCE
  assert float(jnp.max(errors)) <= 3 * LAZY_TOLERANCE
  scale = max(1.0, float(jnp.max(jnp.abs(d_table))))
  _assert_matches_dense(
    sparse, s_table, s_state, d_table, d_state, scale, rtol=3 * LAZY_TOLERANCE
  )
  last = np.asarray(s_state.last)
  if hyper[-1] == 1500:
    assert last[:3].max() <= 3  # far behind, yet read right
  else:
    assert last.min() >= steps - hyper[-1]
  # The rows outside the batch did move (by decay or momentum).
  assert not np.allclose(d_table[jnp.array([0, 8])], table[jnp.array([0, 8])])


def test_no_row_falls_more_than_sweep_period_behind():
  sparse, _, _ = _pair("constant", 0.9, 0.0, 0.01, 3)
  table = jnp.ones((10, 2))
  state = sparse.init(table)
  update = jax.jit(sparse.update)
  for step in range(1, 13):
    table, state = update(jnp.array([7]), jnp.ones((1, 2)), state, table)
    last = np.asarray(state.last)
    assert int(state.count) == step and last[7] == step
    assert last.min() >= step - 3, (step, last)


@pytest.mark.parametrize("beta", _tiers.fast_first([0.0, 0.9], [0.9]))
@pytest.mark.parametrize("shape", [(64, 8), (32, 3, 5)])
def test_long_run_matches_dense(shape, beta):
  # Many steps with rows seen at very different rates: accumulators of rows
  # that were skipped for a while must still be right when they come back.
  table, state, _ = _compare(
    shape, 25, 6, shape[0], 0, ("constant", 0.0, beta, 0.0), rtol=1e-5, atol=1e-6
  )
  assert int(_current(_pair("constant", 0.0, beta, 0.0)[0], state, table)[0]) == 25
  assert np.all(np.isfinite(np.asarray(table)))


@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_untouched_rows_stay_and_row_accumulators_scale_by_beta(beta):
  sparse = _pair("constant", 0.0, beta, 0.0)[0]
  rng = np.random.default_rng(1)
  table = jnp.asarray(rng.standard_normal((10, 4)), jnp.float32)
  state = sparse.init(table)
  table, state = sparse.update(np.arange(10), np.ones((10, 4)), state, table)
  rows_before = np.asarray(_current(sparse, state, table)[1][0])
  new_table, state = sparse.update(np.array([2, 5]), np.ones((2, 4)), state, table)
  # With beta > 0 the state is lazy, and its rows' accumulators age lazily.
  assert isinstance(state, optax_sm3.SparseRowsState) == (beta > 0)
  untouched = np.setdiff1d(np.arange(10), [2, 5])
  np.testing.assert_array_equal(new_table[untouched], table[untouched])
  assert not np.any(np.asarray(new_table[2]) == np.asarray(table[2]))
  c_old = 1.0 if beta == 0 else beta
  np.testing.assert_allclose(
    np.asarray(_current(sparse, state, new_table)[1][0])[untouched],
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
    _dense_parts(s_state)[1][0][jnp.array([1, 4])],
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
    _assert_matches_dense(sparse, *s, *d, scale=3.0)


def test_first_step_beta_from_zero_accumulators():
  # Step 1 with beta > 0 from all-zero accumulators, a small batch of a big
  # table: the column accumulators are (1 - beta) * max g**2 over the batch.
  sparse = optax_sm3.sparse_rows(optax_sm3.sm3(0.1, momentum=0.0, beta=0.9))
  grads = np.array([[1.0, -3.0], [2.0, 0.5]], np.float32)
  table, state = sparse.update(
    np.array([7, 2]), grads, sparse.init(jnp.zeros((100, 2))), jnp.zeros((100, 2))
  )
  rows, columns = _current(sparse, state, table)[1]
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
  # A 16-bit table: the lazy rows are rounded once per catch-up, the dense
  # ones every step; they agree to 16-bit rounding.
  _compare((12, 4), 5, 4, 12, 3, ("constant", 0.9, 0.0, 0.01), dtype=dtype, rtol=1e-2)


def test_rows_touched_every_step_match_dense_to_the_last_bits():
  # A row in every batch is never behind: no catch-up, the dense arithmetic
  # (XLA may fuse it differently: an ulp, not the catch-up's rounding).
  sparse, dense, dense_step = _pair("constant", 0.9, 0.0, 0.01, 2)
  rng = np.random.default_rng(8)
  table = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
  s, d = (table, sparse.init(table)), (table, dense.init(table))
  for _ in range(8):
    indices = np.array([2, rng.integers(0, 5)], np.int32)
    grads = rng.standard_normal((2, 3)).astype(np.float32)
    s = sparse.update(indices, grads, s[1], s[0])
    d = dense_step(indices, grads, d[1], d[0])
    # An ulp of the operands (about 1): no catch-up's drift.
    np.testing.assert_allclose(s[0][2], d[0][2], rtol=2.5e-7, atol=1e-8)
    np.testing.assert_allclose(
      s[1].momentum[0, 2], _dense_parts(d[1])[2][2], rtol=2.5e-7, atol=1e-8
    )


@pytest.mark.parametrize(
  "hyper", [("schedule", 0.0, 0.5, 0.0), ("constant", 0.9, 0.0, 0.01, 2)]
)
def test_empty_batch_is_a_step_with_zero_gradient(hyper):
  sparse, dense, dense_step = _pair(*hyper)
  table = jnp.asarray(np.random.default_rng(9).standard_normal((5, 3)), jnp.float32)
  s = sparse.update(np.array([1, 3]), np.ones((2, 3)), sparse.init(table), table)
  s = sparse.update(np.zeros(0, np.int32), np.zeros((0, 3)), s[1], s[0])
  s = sparse.update(np.zeros(0, np.int32), np.zeros((0, 3)), s[1], s[0])
  d = dense_step(np.array([1, 3]), np.ones((2, 3)), dense.init(table), table)
  # The dense step of an all-zero gradient (an index with a zero row).
  d = dense_step(np.array([0]), np.zeros((1, 3)), d[1], d[0])
  d = dense_step(np.array([0]), np.zeros((1, 3)), d[1], d[0])
  _assert_matches_dense(sparse, *s, *d, scale=3.0)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0,)])
@pytest.mark.parametrize("lazy", [False, True])
def test_zero_size_tables(shape, lazy):
  sparse = optax_sm3.sparse_rows(
    optax_sm3.sm3(0.1, momentum=0.9 if lazy else 0.0, weight_decay=0.01 * lazy)
  )
  table = jnp.zeros(shape)
  state = sparse.init(table)
  row_shape = shape[1:]
  no_rows = (np.zeros(0, np.int32), np.zeros((0, *row_shape)))
  table, state = sparse.update(*no_rows, state, table)
  assert table.shape == shape
  if shape[0]:
    table, state = sparse.update(
      np.array([1, 4]), np.ones((2, *row_shape)), state, table
    )
  else:
    # Only out-of-range indices exist: dropped under jit.
    table, state = jax.jit(sparse.update)(
      np.array([0, 3]), np.ones((2, *row_shape)), state, table
    )
  count = state.count if lazy else _dense_parts(state)[0]
  assert int(count) == 2 and table.shape == shape
  assert sparse.lookup(np.zeros(0, np.int32), state, table).shape == (0, *row_shape)
  if shape[0]:
    assert sparse.lookup(np.array([[0, 4]]), state, table).shape == (1, 2, *row_shape)
  synced, synced_state = sparse.sync(state, table)
  assert synced.shape == shape
  assert jax.tree.structure(synced_state) == jax.tree.structure(state)


# ---------------------------------------------------------------------------
# jit, donation, state contracts.


@pytest.mark.parametrize(
  "hyper", [("schedule", 0.0, 0.5, 0.0), ("cosine", 0.9, 0.5, 0.01, 3)]
)
def test_jit_with_donated_table_and_state_matches_dense_without_recompiling(hyper):
  sparse, dense, dense_step = _pair(*hyper)
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
    _assert_matches_dense(sparse, s_table, s_state, d_table, d_state, scale=4.0)
    assert old_table.is_deleted()
  assert update._cache_size() == 1


@pytest.mark.parametrize("momentum", [0.9])
def test_donated_step_needs_no_table_sized_temporary(momentum):
  # The momentum buffer is stored as (1, V, D) so that jit's donation (which
  # pairs inputs and outputs by shape) cannot swap it with the table; a
  # swap, or an in-place write beside a fused read, makes XLA copy the table.
  sparse = optax_sm3.sparse_rows(
    optax_sm3.sm3(0.1, momentum=momentum, weight_decay=0.01)
  )
  table = jnp.zeros((8192, 16))
  state = sparse.init(table)
  update = jax.jit(sparse.update, donate_argnums=(2, 3))
  indices, grads = jnp.arange(8, dtype=jnp.int32), jnp.ones((8, 16))
  memory = update.lower(indices, grads, state, table).compile().memory_analysis()
  assert memory.temp_size_in_bytes < table.nbytes // 4
  assert memory.alias_size_in_bytes >= table.nbytes * (2 if momentum else 1)


def test_state_structure_dtypes_and_shapes_are_stable():
  sparse = optax_sm3.sparse_rows(
    optax_sm3.sm3(SCHEDULE, momentum=0.9, beta=0.5, weight_decay=0.1)
  )
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
  (scanned, state), _ = jax.lax.scan(body, (table, state), batches)
  assert bool(jnp.all(scanned[jnp.array([0, 3, 7])] < 1.0))
  # Weight decay moves every row: row 5, never swept yet, is behind in the
  # table but current through lookup.
  assert bool(jnp.all(scanned[5] == 1.0))
  assert bool(jnp.all(sparse.lookup(jnp.array([5]), state, scanned) < 1.0))


def test_init_equals_sm3_init_without_momentum_and_decay():
  table = jnp.ones((4, 3))
  sparse = optax_sm3.sparse_rows(optax_sm3.sm3(SCHEDULE, momentum=0.0))
  dense = optax_sm3.sm3(SCHEDULE, 0.0)
  _assert_close(sparse.init(table), dense.init(table), rtol=0, atol=0)
  # momentum = 0 keeps no buffer: the state is O(V + D).
  state = optax_sm3.sparse_rows(optax_sm3.sm3(0.1, momentum=0.0)).init(
    jnp.ones((1000, 16))
  )
  assert sum(x.size for x in jax.tree.leaves(state)) == 1000 + 16 + 1


@pytest.mark.parametrize(
  ("momentum", "weight_decay"), [(0.9, 0.0), (0.0, 0.1), (0.5, 0.1)]
)
def test_lazy_state_layout(momentum, weight_decay):
  table = jnp.ones((1000, 16), jnp.bfloat16)
  sparse = optax_sm3.sparse_rows(
    optax_sm3.sm3(SCHEDULE, momentum=momentum, weight_decay=weight_decay),
    sweep_period=7,
  )
  state = sparse.init(table)
  assert isinstance(state, optax_sm3.SparseRowsState)
  dense_count, dense_accumulators, _ = _dense_parts(
    optax_sm3.sm3(SCHEDULE, momentum, weight_decay=weight_decay).init(table)
  )
  _assert_close(
    (state.count, state.accumulators), (dense_count, dense_accumulators), rtol=0
  )
  if momentum:
    assert state.momentum.shape == (1, *table.shape)
    assert state.momentum.dtype == table.dtype
  else:
    assert state.momentum is None  # no buffer without momentum
  assert state.last.shape == (1000,) and state.last.dtype == jnp.int32
  block, blocks = 3, 4  # windows of 7 steps: blocks of 3, 4 of them
  assert state.coefficients.steps.shape == (5, block * blocks)
  assert state.coefficients.blocks.shape == (5, blocks)
  assert all(x.dtype == jnp.float32 for x in state.coefficients)


@pytest.mark.parametrize("lazy", [False, True])
def test_out_of_range_indices_under_jit(lazy):
  hyper = ("constant", 0.9, 0.0, 0.01, 2) if lazy else ("constant", 0.0, 0.0, 0.0)
  sparse, dense, dense_step = _pair(*hyper)
  table = jnp.ones((6, 2))
  grads = np.ones((3, 2), np.float32)
  s = jax.jit(sparse.update)(np.array([1, 6, -1]), grads, sparse.init(table), table)
  d = dense_step(np.array([1]), grads[:1], dense.init(table), table)
  # update drops them, like JAX's scatters.
  _assert_matches_dense(sparse, *s, *d, scale=1.0)
  # lookup reads them as NaN, like JAX's gathers fill.
  rows = jax.jit(sparse.lookup)(np.array([6, 1, -1]), s[1], s[0])
  assert np.all(np.isnan(rows[jnp.array([0, 2])]))
  _assert_table_close(rows[1], d[0][1], 1.0)


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
    optax_sm3.sparse_rows(optax_sm3.sm3(**kwargs))


def test_rejects_what_sm3_did_not_make():
  # A learning rate (the old signature) is refused with the new call shown.
  with pytest.raises(TypeError, match=r"sparse_rows\(optax_sm3\.sm3\("):
    optax_sm3.sparse_rows(0.1)
  for other in (optax.sgd(0.1), optax.chain(optax_sm3.sm3(0.1))):
    with pytest.raises(TypeError, match=r"made by optax_sm3\.sm3"):
      optax_sm3.sparse_rows(other)
  # Coupled decay gives every row a gradient: no row-sparse form.
  coupled = optax_sm3.sm3(0.1, weight_decay=0.1, weight_decay_mode="coupled")
  with pytest.raises(ValueError, match="coupled"):
    optax_sm3.sparse_rows(coupled)


@pytest.mark.parametrize("period", [0, -3, 2.5, True, "8"])
def test_rejects_bad_sweep_period(period):
  with pytest.raises(ValueError, match="`sweep_period` must be an int >= 1"):
    optax_sm3.sparse_rows(optax_sm3.sm3(0.1, momentum=0.9), sweep_period=period)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_rejects_bad_batches_and_tables(momentum):
  sparse = optax_sm3.sparse_rows(optax_sm3.sm3(0.1, momentum=momentum))
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
      r"`row_grads` must have shape .* \(2, 3\)",
      (np.array([0, 1]), np.ones((2, 4))),
    ),
    (ValueError, r"`indices` must be in \[0, 5\)", (np.array([0, 5]), np.ones((2, 3)))),
    (ValueError, r"`indices` must be in \[0, 5\)", (np.array([-1]), np.ones((1, 3)))),
  ]
  for error, message, (indices, grads) in cases:
    with pytest.raises(error, match=message):
      sparse.update(indices, grads, state, table)
  with pytest.raises(TypeError, match="`indices` must be integers"):
    sparse.lookup(np.array([0.0]), state, table)
  with pytest.raises(TypeError, match="`indices` must be integers"):
    jax.jit(sparse.lookup)(jnp.array([0.0]), state, table)
  with pytest.raises(ValueError, match=r"`indices` must be in \[0, 5\)"):
    sparse.lookup(np.array([[0], [7]]), state, table)
  with pytest.raises(ValueError, match="`table` must have rank >= 1"):
    sparse.init(jnp.ones(()))
  with pytest.raises(TypeError, match="`table` must have a real floating dtype"):
    sparse.init(jnp.ones((3, 2), jnp.int32))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_rejects_a_state_made_for_another_table(momentum):
  sparse = optax_sm3.sparse_rows(optax_sm3.sm3(0.1, momentum=momentum))
  state = sparse.init(jnp.ones((5, 3)))
  grown = jnp.ones((7, 3))
  # A vocabulary that grew: both shapes are named, in every entry point.
  message = r"made for a table of shape \(5, 3\), but `table` has shape \(7, 3\)"
  with pytest.raises(ValueError, match=message):
    sparse.update(np.array([6]), np.ones((1, 3)), state, grown)
  with pytest.raises(ValueError, match=message):
    jax.jit(sparse.update)(np.array([6]), np.ones((1, 3)), state, grown)
  with pytest.raises(ValueError, match=message):
    sparse.lookup(np.array([6]), state, grown)
  with pytest.raises(ValueError, match=message):
    sparse.sync(state, grown)
  with pytest.raises(ValueError, match=r"shape \(5, 3, 1\)"):
    sparse.update(np.array([0]), np.ones((1, 3, 1)), state, jnp.ones((5, 3, 1)))
  # A state of the other layout (momentum on or off); with momentum, a table
  # of another dtype (the buffer has the table's dtype; the accumulators are
  # float32 whatever the table's).
  if momentum:
    with pytest.raises(ValueError, match="`state` does not belong"):
      sparse.update(
        np.array([0]), np.ones((1, 3)), state, jnp.ones((5, 3), jnp.bfloat16)
      )
  other = optax_sm3.sparse_rows(optax_sm3.sm3(0.1, momentum=0.9 - momentum)).init(
    jnp.ones((5, 3))
  )
  with pytest.raises(ValueError, match="`state` does not belong"):
    sparse.update(np.array([0]), np.ones((1, 3)), other, jnp.ones((5, 3)))


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


@hypothesis.given(ids=st.lists(st.integers(0, 12), min_size=0, max_size=40))
def test_unique_matches_jnp_unique(ids):
  """The sort-and-search ``_unique`` returns exactly what ``jnp.unique`` does."""
  indices = jnp.asarray(ids, jnp.int32)
  unique, inverse = _batch._unique(indices, 12)  # 12: the fill, >= every id
  want, want_inverse = jnp.unique(
    indices, size=len(ids), fill_value=12, return_inverse=True
  )
  np.testing.assert_array_equal(unique, want)
  np.testing.assert_array_equal(inverse, want_inverse.reshape(-1))
  assert inverse.dtype == jnp.int32
