"""A stand-in for lazy sparse_rows: the stored table lags the current one."""

import jax.numpy as jnp

import optax_sm3


def lazy_sparse_rows(real):
  """sparse_rows whose stored table is stale: ``stored = current - lag``.

  The lag lives in the state and changes every step, the way lazy momentum
  and weight decay will leave untouched rows behind; ``lookup`` and ``sync``
  add it back. Code that reads ``embedding`` without them goes wrong.
  """

  def make(*args, **kwargs):
    rows = real(*args, **kwargs)

    def init(table):
      return rows.init(table), jnp.zeros_like(table)

    def update(indices, row_grads, state, table):
      inner, lag = state
      table, inner = rows.update(indices, row_grads, inner, table + lag)
      # Different for every entry (a uniform shift could cancel, e.g. in a
      # softmax over attend's logits).
      ramp = 1.0 + jnp.arange(lag.size, dtype=lag.dtype).reshape(lag.shape) % 7
      lag = 0.5 * lag + 0.1 * ramp
      return table - lag, (inner, lag)

    def lookup(indices, state, table):
      return jnp.take(table, indices, axis=0) + jnp.take(state[1], indices, axis=0)

    def sync(state, table):
      return table + state[1], (state[0], jnp.zeros_like(table))

    return optax_sm3.SparseRows(init, update, lookup, sync)

  return make
