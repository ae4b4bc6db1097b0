"""A stand-in for a lazy table: the stored table lags the current one."""

import functools

import jax
import jax.numpy as jnp

from optax_sm3._sparse import _row_step, _table_rule


class _StaleRule(_table_rule.TableRule):
  """The real rule, reported lazy: the front ends then sync and look up."""

  @property
  def lazy(self) -> bool:
    return True


def lazy_table(real):
  """A ``Table`` class (``real``'s interface) whose stored table is stale.

  ``stored = current - lag``: the lag lives in the state and changes every
  step, the way lazy momentum and weight decay leave untouched rows behind
  (but by more, and for every optimizer); ``lookup`` and ``sync`` add it
  back. Code that reads ``embedding`` without them goes wrong. Patch it in
  with ``monkeypatch.setattr(optax_sm3._sparse._rows, "Table",
  lazy_table(optax_sm3._sparse._rows.Table))`` before building the optimizer.
  """

  class StaleTable:
    def __init__(self, rule):
      rows = real(rule)
      self.rule = _StaleRule(*rule)

      def init(table):
        return rows.init(table), jnp.zeros_like(table)

      def stale(table, inner, lag):
        # Different for every entry (a uniform shift could cancel, e.g. in a
        # softmax over attend's logits).
        ramp = 1.0 + jnp.arange(lag.size, dtype=lag.dtype).reshape(lag.shape) % 7
        lag = 0.5 * lag + 0.1 * ramp
        return table - lag, (inner, lag)

      def step(batch, state, table):
        inner, lag = state
        table, inner = rows.step(batch, inner, table + lag)
        return stale(table, inner, lag)

      def update(indices, row_grads, state, table):
        inner, lag = state
        table, inner = rows.update(indices, row_grads, inner, table + lag)
        return stale(table, inner, lag)

      def lookup(indices, state, table):
        return rows.lookup(indices, state[0], table + state[1])

      def sync(state, table):
        table, inner = rows.sync(state[0], table + state[1])
        return table, (inner, jnp.zeros_like(table))

      self.init = init
      self.step = jax.jit(step)
      self.update = jax.jit(update)
      self.lookup = jax.jit(lookup)
      self.sync = jax.jit(sync)
      self.expected_state = functools.cache(
        functools.partial(_row_step.expected_state, init)
      )

  return StaleTable
