"""How a ``sparse_tables`` state is laid out relative to the parameters.

:func:`specs` is the layout rule of :class:`optax_sm3.SparseTablesState`,
registered beside the type (:mod:`optax_sm3._sparse._tables`): each table's
state laid out like its table, the rest's like the other leaves. The mask
lives in closures, so the tables' positions are read off the state.
"""

from __future__ import annotations

from typing import Any

import jax

from optax_sm3._layout import ParamLayout
from optax_sm3._scale_by_sm3 import ScaleBySM3State
from optax_sm3._sparse._row_step import SparseRowsState


def _table_shape(table_state: Any) -> tuple[int, ...] | None:
  """The shape of the table a ``sparse_rows`` state was made for, if readable."""
  accumulators: Any
  if isinstance(table_state, SparseRowsState):
    accumulators = table_state.accumulators
  else:
    found = [
      x
      for x in jax.tree.leaves(
        table_state, is_leaf=lambda x: isinstance(x, ScaleBySM3State)
      )
      if isinstance(x, ScaleBySM3State)
    ]
    if len(found) != 1:
      return None
    accumulators = found[0].accumulators
  if not isinstance(accumulators, tuple) or not accumulators:
    return None
  # Read for the covers tables keep by default: one vector per axis, one
  # array of the table's shape (rank 1, or every axis merged), or merged
  # runs of axes; another cover's state reads as no shape (an error below).
  if len(accumulators) == 1:
    return tuple(accumulators[0].shape)
  return tuple(d for a in accumulators for d in a.shape)


def _tables_from_rest(rest: Any, treedef: Any, count: int) -> list[int] | None:
  """The table positions, where ``rest`` holds a tree of the params' structure.

  ``tx``'s state over the params with the tables set to ``None`` often holds
  such a tree (Adam's moments, SM3's accumulators): its ``None`` leaves are
  the tables.
  """

  def fits(node: Any) -> bool:
    try:
      treedef.flatten_up_to(node)
    except (ValueError, TypeError):
      return False
    return True

  for node in jax.tree.leaves(rest, is_leaf=fits):
    if not fits(node):
      continue
    flat = treedef.flatten_up_to(node)
    positions = [i for i, x in enumerate(flat) if x is None]
    if len(positions) == count:
      return positions
  return None


def _table_positions(state: Any, layout: ParamLayout) -> list[int]:
  """The params leaves each of ``state.tables`` was made for, in order.

  ``sparse_tables`` keeps one state per table leaf, in leaf order, and its
  mask inside closures. The positions are read off ``tx``'s state where it
  holds a tree of the params' structure (its ``None`` leaves), else off the
  tables' shapes: where leaves of one shape leave the choice open, any
  choice gives the same specs if those leaves share one spec; otherwise the
  layout cannot be told, and a ``ValueError`` says so.
  """
  shapes, specs = layout.shapes, layout.specs
  found = [_table_shape(t) for t in state.tables]
  wanted = [shape for shape in found if shape is not None]
  if len(wanted) != len(found):
    raise ValueError(
      "a table state of the `sparse_tables` state is not a sparse_rows state"
    )
  from_rest = _tables_from_rest(state.rest, layout.treedef, len(wanted))
  if from_rest is not None and [shapes[i] for i in from_rest] == wanted:
    return from_rest

  def match(order: range, tables: list[tuple[int, ...]]) -> list[int] | None:
    found, j = [], 0
    for i in order:
      if j < len(tables) and shapes[i] == tables[j]:
        found.append(i)
        j += 1
    return found if j == len(tables) else None

  earliest = match(range(len(shapes)), wanted)
  latest = match(range(len(shapes) - 1, -1, -1), wanted[::-1])
  if earliest is None or latest is None:
    raise ValueError(
      f"the `sparse_tables` state holds tables of shapes {wanted}, which are "
      f"not leaves of `params` (shapes {shapes}) in order"
    )
  latest = latest[::-1]
  for table, first, last in zip(wanted, earliest, latest, strict=True):
    candidates = {specs[i] for i in range(first, last + 1) if shapes[i] == table}
    if len(candidates) > 1:
      raise ValueError(
        f"`params` has several leaves of shape {table} with different specs "
        f"({sorted(map(str, candidates))}) that could be the table of shape "
        f"{table}: its layout cannot be told from the state. Give "
        "each table its specs with state_partition_specs(optax_sm3.sparse_rows"
        "(...), table, spec) instead"
      )
  return earliest


def specs(state: Any, layout: ParamLayout) -> Any:
  """Each table's state laid out like its table; the rest's (``tx``'s state
  over the params with the tables set to ``None``) like the other leaves."""
  positions = _table_positions(state, layout)
  return state._replace(
    rest=layout.without(set(positions)).specs_of(state.rest),
    tables=tuple(
      layout.leaf(i).specs_of(t) for t, i in zip(state.tables, positions, strict=True)
    ),
  )
