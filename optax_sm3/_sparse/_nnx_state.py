"""NNX variables for a table's ``sparse_rows`` state, laid out like the table.

``optax_sm3.nnx.SparseOptimizer`` keeps each table's state in its
``SparseEmbed`` module (``sparse_state``). Built as plain variables from
``sparse_rows(...).init(table)``, the row accumulators and ``last`` of a
row-sharded table are replicated on every device and carry no sharding
metadata, so ``nnx.get_partition_spec`` reads ``P()`` for them and a
2**20-row table keeps all its row state on each device.
:func:`sparse_state_variables` builds them with the layout of
:func:`optax_sm3.state_partition_specs` instead: each leaf sharded like the
table axis it indexes, its ``out_sharding`` metadata saying so.
"""

from __future__ import annotations

from typing import Any, cast

import jax
from jax.sharding import NamedSharding, PartitionSpec

from optax_sm3 import _sharding
from optax_sm3._sparse import _rows


def _layout(embedding: Any) -> tuple[PartitionSpec, dict[str, Any]]:
  """The table's spec, and the metadata to give its state's variables.

  From the table's ``out_sharding`` metadata (with its ``mesh`` and
  ``sharding_rules``), else from its array's ``NamedSharding`` (with that
  mesh, so that Flax can place the state without a mesh context).
  """
  names = embedding.get_metadata("out_sharding", None)
  if names:
    extra = {
      key: value
      for key in ("mesh", "sharding_rules")
      if (value := embedding.get_metadata(key, None)) is not None
    }
    spec = names.spec if isinstance(names, NamedSharding) else PartitionSpec(*names)
    return spec, extra
  try:
    sharding = embedding.get_value().sharding
  except (AttributeError, TypeError, ValueError):  # a tracer, or not an array
    sharding = None
  if isinstance(sharding, NamedSharding):
    return sharding.spec, {"mesh": sharding.mesh}
  return PartitionSpec(), {}


def sparse_state_variables(
  rows: _rows.Table,
  embedding: Any,
  variable_type: type,
) -> Any:
  """``rows.init(table)`` as ``variable_type`` variables sharded like the table.

  Each leaf's ``out_sharding`` (and the table's ``mesh`` and
  ``sharding_rules``, where it has them) is its entry of
  ``state_partition_specs(rows, table, table_spec)``, with ``table_spec``
  read from the table's ``out_sharding`` metadata (or, without metadata, its
  array's ``NamedSharding``). Flax applies the sharding when the variable is
  made (as for ``nnx.with_partitioning`` parameters: under a mesh); leaves
  that the table's layout replicates get no metadata. A table with neither
  metadata nor a sharding gives what ``jax.tree.map(variable_type,
  rows.init(table))`` gives.

  Args:
    rows: the table's functions (:class:`optax_sm3._sparse._rows.Table`).
    embedding: the table's variable (``SparseEmbed.embedding``).
    variable_type: the ``nnx.Variable`` subclass to hold the state in.

  Returns:
    The tree of ``rows.init(table)`` with a ``variable_type`` at each leaf.
  """
  table = embedding.get_value()
  spec, extra = _layout(embedding)
  # A table's functions hold its init, which is all the specs read.
  specs = _sharding.state_partition_specs(cast(Any, rows), table, spec)

  def variable(leaf: jax.Array, leaf_spec: PartitionSpec) -> Any:
    entries = tuple(leaf_spec) + (None,) * (leaf.ndim - len(leaf_spec))
    if all(e is None for e in entries):
      return variable_type(leaf)
    return variable_type(leaf, out_sharding=entries, **extra)

  return jax.tree.map(variable, rows.init(table), specs)
