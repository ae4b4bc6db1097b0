"""Rows left behind for up to 10**5 steps come back exactly as the dense path has them.

A 5-row table whose row 0 is never in a batch, the other rows in every
batch, trained by ``sparse_rows`` and by the dense ``sm3`` for the same
steps inside one ``lax.scan`` each; row 0, read through ``lookup`` and
``sync``, must equal the dense path's to float32 rounding, for momentum
betas from 0.5 to 0.999, learning-rate and ``beta`` schedules, and a sweep
period long enough that row 0 is never swept (the whole gap in one
catch-up) or the default one.
"""

import functools

import _tiers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sm3

ROWS, DIM = 5, 3


def _learning_rate(name, steps):
  return {
    "constant": 0.01,
    "cosine": optax.warmup_cosine_decay_schedule(0.0, 0.02, steps // 20, steps, 1e-4),
    "recipe": optax_sm3.warmup_schedule(0.01, steps),
  }[name]


def _optimizer(momentum, schedule, steps, beta, weight_decay):
  """``sm3``; with ``beta``, the recipe's constant ``beta`` with bias
  correction, else a rising ``beta`` schedule (which has no correction)."""
  constant = schedule == "recipe"
  return optax_sm3.sm3(
    _learning_rate(schedule, steps),
    momentum=momentum,
    beta=beta if constant or not beta else optax.linear_schedule(0.5, beta, steps // 2),
    bias_correction=bool(beta) and constant,
    weight_decay=weight_decay,
  )


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _train(dense, sparse, steps, table):
  """(dense table, sparse table, sparse state) after ``steps`` steps."""
  ids = jnp.arange(1, ROWS, dtype=jnp.int32)

  def grads(t):
    key = jax.random.fold_in(jax.random.key(0), t)
    return jax.random.normal(key, (ROWS - 1, DIM)) * (1.0 + 0.5 * jnp.sin(t / 7.0))

  def dense_step(carry, t):
    table, state = carry
    grad = jnp.zeros_like(table).at[ids].add(grads(t))
    updates, state = dense.update(grad, state, table)
    return (optax.apply_updates(table, updates), state), None

  def sparse_step(carry, t):
    table, state = carry
    return sparse.update(ids, grads(t), state, table), None

  counts = jnp.arange(steps)
  (d_table, _), _ = jax.lax.scan(dense_step, (table, dense.init(table)), counts)
  (s_table, s_state), _ = jax.lax.scan(sparse_step, (table, sparse.init(table)), counts)
  return d_table, s_table, s_state


def _check(momentum, schedule, steps, beta=0.0, weight_decay=0.0, sweep=True):
  dense = _optimizer(momentum, schedule, steps, beta, weight_decay)
  period = None if sweep else steps + 1  # never swept: one catch-up of the gap
  sparse = optax_sm3.sparse_rows(dense, sweep_period=period)
  table = jnp.asarray(
    np.random.default_rng(1).standard_normal((ROWS, DIM)), jnp.float32
  )
  d_table, s_table, s_state = _train(dense, sparse, steps, table)
  assert int(s_state.count) == steps
  if not sweep:
    assert int(s_state.last[0]) == 0  # row 0 is still at step 0
  looked_up = sparse.lookup(jnp.arange(ROWS), s_state, s_table)
  synced, _ = sparse.sync(s_state, s_table)
  scale = float(jnp.max(jnp.abs(d_table)))
  # Both paths round in float32 at every step they take, in different
  # orders: they agree to a few float32 roundings of the table's scale.
  for got in (looked_up, synced):
    np.testing.assert_allclose(got, d_table, rtol=0, atol=2e-6 * max(scale, 1.0))
  # Row 0 moved (decay or momentum acted on it) or, with neither, stayed put.
  moved = float(jnp.max(jnp.abs(d_table[0] - table[0])))
  assert (moved > 1e-3) == bool(weight_decay), moved


@pytest.mark.parametrize("momentum", _tiers.fast_first([0.5, 0.9, 0.99, 0.999], [0.9]))
def test_momentum_betas_over_a_long_gap(momentum):
  _check(momentum, "cosine", 10_000, weight_decay=0.1, sweep=False)


@pytest.mark.slow  # 10**5 steps
def test_a_row_untouched_for_100000_steps():
  _check(0.999, "cosine", 100_000, beta=0.99, weight_decay=0.05, sweep=False)


@pytest.mark.slow
@pytest.mark.parametrize("sweep", [False, True])
@pytest.mark.parametrize("schedule", ["constant", "cosine", "recipe"])
@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, 0.99, 0.999])
def test_every_beta_and_schedule_over_100000_steps(momentum, schedule, sweep):
  _check(momentum, schedule, 100_000, beta=0.99, weight_decay=0.05, sweep=sweep)
