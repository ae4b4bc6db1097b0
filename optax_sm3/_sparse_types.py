"""The row-sparse gradient of an embedding table."""

from __future__ import annotations

from typing import NamedTuple

import jax


class SparseGrad(NamedTuple):
  """The gradient of an embedding table, as the looked-up rows' gradients.

  Equal to the dense gradient ``jnp.zeros_like(table).at[indices].add(
  row_grads)``; pass it to ``optax_sm3.sparse_rows(...).update(indices,
  row_grads, state, table)``.

  Attributes:
    indices: ``(k,)`` int32, the ids of every lookup of the table in the loss,
      flattened and concatenated in call order (repeats allowed).
    row_grads: ``(k, *table.shape[1:])`` in the table's dtype, the gradient of
      the loss with respect to each looked-up row.
  """

  indices: jax.Array  # (k,) int32: looked-up rows, repeats allowed.
  row_grads: jax.Array  # (k, *table.shape[1:]): gradient per looked-up row.
