"""A table's gradient as its distinct rows, and SM3 on those rows alone.

The gradient of ``table[ids]`` is a table-sized array that is zero outside
the ``k`` rows in the batch. :func:`rows_of` and :func:`every_row` hold it
as the batch's distinct rows and their summed gradients (a
:class:`RowBatch`); :func:`sm3_local` takes the SM3 step of any cover on
them, exactly as on the whole table, in ``O(k * D)`` (:func:`sm3_rows`
adds the ``O(V)`` pass that ages every row's accumulators with ``beta >
0``, for a state kept current):

* every accumulator of a cover is a maximum of the previous step's ``nu``
  over its slice, so for a slice whose gradient is zero, ``max over the
  slice of min_T a_T`` is the slice's own accumulator ``a_S`` (the entry
  where ``nu`` was largest has every ``a_T >= a_S``). Hence a group that
  indexes the rows (the row axis is in it, or is a stacked axis) keeps
  ``c_old * a_S`` at every row outside the batch, and its rows in the batch
  take the maximum of their own ``nu``;
* a group that does not index the rows takes the larger of the maximum of
  the batch's ``nu`` and ``c_old * a_S`` (the rows outside the batch
  contribute exactly that, and a row in the batch has ``nu >= c_old *
  min_T a_T``). For SM3-I, ``c_old * a_S + c_new * max g**2`` over the batch
  alone, as the other rows' ``g**2`` is 0.

Both hold in floating point bit for bit (minimum and maximum are exact, and
rounding a product by a non-negative constant is monotone), so the result
is the dense one, not an approximation of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_sm3 import _cover, _scale_by_sm3, _validation
from optax_sm3._sparse import _ids


class RowBatch(NamedTuple):
  """A table's gradient as its distinct rows.

  Attributes:
    unique: ``(k,)`` int32: the distinct rows in increasing order, then
      padding slots numbered ``V`` (out of range: gathers with
      ``mode="fill"`` fill them and scatters with ``mode="drop"`` drop them).
    grads: ``(k, *table.shape[1:])`` in the table's dtype: each row's summed
      gradient, zero in the padding slots.
  """

  unique: jax.Array
  grads: jax.Array


def _unique(indices: jax.Array, fill: int) -> tuple[jax.Array, jax.Array]:
  """``jnp.unique(indices, size=k, fill_value=fill, return_inverse=True)``.

  The same two arrays (the distinct values in increasing order, then
  ``fill``; each index's slot in them), from one single-key sort and a
  binary search: XLA's CPU sort is several times slower with the
  ``(value, position)`` pairs ``jnp.unique`` sorts to get the inverse (0.95
  ms against 0.27 ms for 4096 indices, jax 0.10.2, in a scratch timing not
  kept in the repository). ``fill`` must be ``>=`` every index.
  """
  k = indices.shape[0]
  if k == 0:
    return indices, jnp.zeros((0,), jnp.int32)
  ordered = jax.lax.sort(indices)
  first = jnp.concatenate([jnp.ones((1,), bool), ordered[1:] != ordered[:-1]])
  slot = jnp.cumsum(first) - 1
  unique = jnp.full((k,), fill, indices.dtype).at[slot].set(ordered)
  inverse = jnp.searchsorted(unique, indices, side="left")
  return unique, inverse.astype(jnp.int32)


def rows_of(indices: jax.Array, row_grads: jax.Array, table: Any) -> RowBatch:
  """The batch of ``(indices, row_grads)``: repeated rows summed.

  Indices outside ``[0, V)`` (possible only under ``jit``) are dropped, as
  JAX's scatters drop them: their gradient adds to nothing. No indices is
  the batch of one dropped row (the step of a zero gradient, with the batch
  arithmetic's shapes non-empty).
  """
  rows = table.shape[0]
  if indices.shape[0] == 0:
    indices = jnp.full([1], -1, jnp.int32)
    row_grads = jnp.zeros((1, *table.shape[1:]), table.dtype)
  indices = _ids.in_range(indices, rows)
  k = indices.shape[0]
  unique, inverse = _unique(indices, rows)
  grads = jax.ops.segment_sum(row_grads.astype(table.dtype), inverse, num_segments=k)
  valid = (unique < rows).reshape((k,) + (1,) * (grads.ndim - 1))
  return RowBatch(unique, jnp.where(valid, grads, jnp.zeros([], grads.dtype)))


def every_row(grad: jax.Array, table: Any) -> RowBatch:
  """A dense gradient as the batch of every row (no sort needed)."""
  unique = jnp.arange(table.shape[0], dtype=jnp.int32)
  return RowBatch(unique, jnp.asarray(grad).astype(table.dtype))


def indexes_rows(cover: _cover.Cover, group: tuple[int, ...]) -> bool:
  """Whether ``group``'s accumulator is indexed by the row axis (axis 0)."""
  return cover.stacked > 0 or 0 in group


class SM3Settings(NamedTuple):
  """The preconditioner's arguments the row step reads (from the optimizer).

  Attributes:
    beta: a constant, or a schedule of the step count.
    bias_correction: a bool.
    eps: a constant.
    variant: ``"II"`` or ``"I"``.
  """

  beta: Any
  bias_correction: bool
  eps: Any
  variant: str


def _beta_at(settings: SM3Settings, count: jax.Array) -> Any:
  """``beta`` of the step after ``count`` steps (a schedule evaluated)."""
  return settings.beta(count) if callable(settings.beta) else settings.beta


def coefficients_at(settings: SM3Settings, count: jax.Array, dtype: Any) -> jax.Array:
  """``c_old`` of the step after ``count`` steps: the factor of the old
  accumulators (``beta``, or 1 when ``beta`` is 0)."""
  return _scale_by_sm3.coefficients(_beta_at(settings, count), dtype)[0]


def ages(settings: SM3Settings) -> bool:
  """Whether accumulators outside the batch change (``beta`` not 0)."""
  return callable(settings.beta) or not _validation.is_static_zero(settings.beta)


def sm3_local(
  settings: SM3Settings,
  cover: _cover.Cover,
  batch: RowBatch,
  local: tuple[jax.Array, ...],
  count: jax.Array,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """SM3 on the batch's rows, given the accumulators as the batch sees them.

  Args:
    settings: the preconditioner's arguments.
    cover: the table's cover (as :func:`optax_sm3.scale_by_sm3` chose it).
    batch: the rows and their gradients.
    local: one array per group of ``cover``: the batch's rows of a group
      that indexes the rows (current, 0 in padding slots), a group that
      does not whole.
    count: the step count before this step.

  Returns:
    The updates of the batch's rows (zero in padding slots) and the new
    ``local``: the batch's rows of the row-indexed groups, the other groups
    whole.
  """
  k = batch.unique.shape[0]
  dtype = local[0].dtype
  beta = _beta_at(settings, count)
  c_old, c_new = _scale_by_sm3.coefficients(beta, dtype)
  correction = None
  if settings.bias_correction:
    correction = _scale_by_sm3.bias_correction_factor(jnp.asarray(beta, dtype), count)
  # The same cover on a table of the batch's k rows (padding rows read 0:
  # their nu is 0, which no maximum keeps).
  local_cover = dataclasses.replace(cover, shape=(k, *cover.shape[1:]))
  updates, new_local = _scale_by_sm3.precondition(
    batch.grads,
    local,
    local_cover,
    c_old,
    c_new,
    jnp.asarray(settings.eps, dtype),
    settings.variant,
    0,
    correction,
  )
  new = []
  for group, a, a_new in zip(cover.groups, local, new_local, strict=True):
    if indexes_rows(cover, group) or settings.variant == "I":
      # SM3-I: c_old * a + c_new * max over the batch of g**2.
      new.append(a_new)
    else:
      new.append(jnp.maximum(a_new, c_old * a))
  return updates, tuple(new)


def sm3_rows(
  settings: SM3Settings,
  cover: _cover.Cover,
  batch: RowBatch,
  accumulators: tuple[jax.Array, ...],
  count: jax.Array,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """SM3 on the batch's rows, the accumulators current and kept whole.

  The arguments are :func:`sm3_local`'s, with ``accumulators`` the table's
  (one per group of ``cover``, every row's) in place of ``local``.

  Returns:
    The updates of the batch's rows (zero in padding slots) and the
    table's accumulators after the step: ``O(k D)`` with ``beta = 0``,
    ``O(k D + V)`` otherwise (every row's accumulators age).
  """
  by_rows = [indexes_rows(cover, group) for group in cover.groups]
  local = tuple(
    a.at[batch.unique].get(mode="fill", fill_value=0) if r else a
    for a, r in zip(accumulators, by_rows, strict=True)
  )
  updates, new_local = sm3_local(settings, cover, batch, local, count)
  c_old = coefficients_at(settings, count, accumulators[0].dtype)
  new = []
  for a, a_new, r in zip(accumulators, new_local, by_rows, strict=True):
    if r:
      # Rows outside the batch: c_old * a (with beta = 0 exactly, a itself:
      # no pass over the V rows).
      kept = c_old * a if ages(settings) else a
      a_new = kept.at[batch.unique].set(a_new, mode="drop")
    new.append(a_new)
  return updates, tuple(new)
