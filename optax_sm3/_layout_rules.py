"""Layout rules of the states defined in the sparse modules and _scale_by_sm3.

Each rule belongs beside its state type, registered where the type is defined
(as :mod:`optax_sm3._momentum` registers ``ScaleByMomentumState``'s); they
wait here until those modules take them: ``_scale_by_sm3_specs`` with
``ScaleBySM3State``, ``_sparse_rows_specs`` with ``SparseRowsState``, and
``_sparse_tables_specs`` with the three helpers above it with
``SparseTablesState``. Importing this module registers them.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import PartitionSpec

from optax_sm3 import _layout
from optax_sm3._layout import REPLICATED, ParamLayout, replicated
from optax_sm3._scale_by_sm3 import ScaleBySM3State
from optax_sm3._sparse._rows import SparseRowsState
from optax_sm3._sparse._tables import SparseTablesState


def _scale_by_sm3_specs(state: Any, layout: ParamLayout) -> Any:
  """The counter replicated; each accumulator sharded like the parameter axes
  it indexes."""
  return state._replace(
    count=replicated(state.count),
    accumulators=layout.accumulators(state.accumulators),
  )


def _sparse_rows_specs(state: Any, layout: ParamLayout) -> Any:
  """A lazy ``sparse_rows`` state (``layout`` is the table's): row buffers
  follow the table's rows, the counter and the catch-up ring are replicated."""
  if layout.treedef.num_leaves != 1:
    return replicated(state)
  (shape,), (spec,) = layout.shapes, layout.specs
  if tuple(state.last.shape) != shape[:1]:
    return replicated(state)
  entries = _layout.entries(spec, len(shape))
  return state._replace(
    count=REPLICATED,
    accumulators=layout.accumulators(state.accumulators),
    # Stored as (1, *table.shape): the unit axis is replicated.
    momentum=None if state.momentum is None else PartitionSpec(None, *entries),
    last=PartitionSpec(entries[0]),
    coefficients=replicated(state.coefficients),
  )


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
  # sparse_rows keeps the default cover: one vector per axis, or (rank 1)
  # one array of the table's shape.
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


def _sparse_tables_specs(state: Any, layout: ParamLayout) -> Any:
  """Each table's state laid out like its table; the rest's (``tx``'s state
  over the params with the tables set to ``None``) like the other leaves."""
  positions = _table_positions(state, layout)
  return state._replace(
    rest=layout.without(set(positions)).specs_of(state.rest),
    tables=tuple(
      layout.leaf(i).specs_of(t) for t, i in zip(state.tables, positions, strict=True)
    ),
  )


_layout.register(ScaleBySM3State, _scale_by_sm3_specs)
_layout.register(SparseRowsState, _sparse_rows_specs)
_layout.register(SparseTablesState, _sparse_tables_specs)
