"""Row ids: checking them, and reading a table's rows by them.

Ids outside ``[0, V)`` raise a ``ValueError`` when they are concrete. Under
``jit``, where they cannot be checked, :func:`in_range` maps them to row
``V`` (out of range, so gathers with ``mode="fill"`` fill it and scatters
with ``mode="drop"`` drop it): a lookup reads a NaN row, an update skips
it, and a negative id never reads row ``V - 1``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np


def check_ids(ids: Any, num_rows: int, name: str = "ids") -> jax.Array:
  """``ids`` as an integer array; concrete ids must lie in ``[0, num_rows)``.

  The range is checked on the values as given, before any conversion (an
  int64 id at or above ``2**31`` is reported, not wrapped).

  Args:
    ids: integer ids of any shape (an array, or anything ``np.asarray``
      takes).
    num_rows: the table's number of rows.
    name: how the error messages name ``ids``.

  Returns:
    ``jnp.asarray(ids)``.

  Raises:
    TypeError: for non-integer ids.
    ValueError: for concrete ids outside ``[0, num_rows)``.
  """
  if not isinstance(ids, jax.core.Tracer):
    values = np.asarray(ids)
    if not np.issubdtype(values.dtype, np.integer):
      raise TypeError(f"`{name}` must be integers, got dtype {values.dtype}")
    if values.size and (values.min() < 0 or values.max() >= num_rows):
      raise ValueError(
        f"`{name}` must be in [0, {num_rows}) for a table of {num_rows} rows, "
        f"got values in [{values.min()}, {values.max()}]"
      )
  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"`{name}` must be integers, got dtype {ids.dtype}")
  return ids


def in_range(indices: jax.Array, rows: int) -> jax.Array:
  """``indices`` as int32, each outside ``[0, rows)`` replaced by ``rows``.

  ``rows`` is out of range, so gathers with ``mode="fill"`` fill it and
  scatters with ``mode="drop"`` drop it. The test runs in the ids' own dtype,
  before the cast, against a bound that cannot wrap: an int64 id at or
  above ``2**31`` cannot wrap onto a row, nor a ``uint8`` id meet a bound
  of 300 taken modulo 256.
  """
  indices = jnp.asarray(indices)
  valid = below(indices, rows)
  if jnp.issubdtype(indices.dtype, jnp.signedinteger):
    valid = valid & (indices >= 0)
  return jnp.where(valid, indices.astype(jnp.int32), rows)


def below(ids: jax.Array, bound: int) -> jax.Array:
  """``ids < bound`` for ids of any integer dtype, with nothing wrapped.

  A Python int beside a narrow array takes the array's dtype (``uint8(200)
  < 300`` would compare with ``300 % 256 = 44``): a bound past the dtype's
  range holds for every id.
  """
  if bound > jnp.iinfo(ids.dtype).max:
    return jnp.ones(ids.shape, bool)
  return ids < jnp.asarray(bound, ids.dtype)


def equals(ids: jax.Array, value: int) -> jax.Array:
  """``ids == value`` for ids of any integer dtype, with nothing wrapped."""
  info = jnp.iinfo(ids.dtype)
  if not info.min <= value <= info.max:
    return jnp.zeros(ids.shape, bool)
  return ids == jnp.asarray(value, ids.dtype)


def take_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
  """``table[ids]``; ids outside ``[0, V)`` (negative ones too) read NaN rows."""
  flat = in_range(ids.reshape(-1), table.shape[0])
  rows = jnp.take(table, flat, axis=0, mode="fill", fill_value=jnp.nan)
  return rows.reshape(ids.shape + table.shape[1:])
