"""Shardings of an optimizer's state that follow the parameters' layout.

``tx.init`` is opaque (``optax.chain`` hides its pieces in closures), so the
state's layout is read off its *shapes*: :func:`jax.eval_shape` gives the
abstract state, and a walk over it recognises

* :class:`~optax_sm3.ScaleBySM3State`: the counter is replicated; each
  parameter's accumulators are matched to the axes of the parameter (a cover
  is a run of stacked leading axes that prefix every accumulator, then
  increasing groups of adjacent axes, possibly with size-1 axes left out), and
  each accumulator dimension takes the ``PartitionSpec`` entry of the
  parameter axis it indexes;
* any subtree with the parameters' structure (the momentum of
  :class:`~optax_sm3.ScaleByMomentumState`, ``optax.adam``'s ``mu`` and
  ``nu``, ...): a leaf of its parameter's shape is sharded like the
  parameter;
* :class:`~optax_sm3.SparseTablesState` (:func:`optax_sm3.sparse_tables`):
  each table's state as below, for its table; the ``rest`` as above, for
  the other leaves;
* :class:`~optax_sm3.SparseRowsState` (:func:`optax_sm3.sparse_rows` with
  momentum or weight decay; ``params`` is then the table): accumulators as
  above, the momentum like the table (after its leading unit axis), ``last``
  like the table's rows; the counter and the catch-up ring replicated;
* everything else (counters, injected hyperparameters, leaves that match
  nothing): replicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from optax_sm3 import _boxes, _momentum, _scale_by_sm3, _tree
from optax_sm3._sparse import _rows, _tables

_REPLICATED = PartitionSpec()


def _entries(spec: PartitionSpec, rank: int) -> tuple[Any, ...]:
  """``spec``'s entry for each of ``rank`` axes (missing trailing ones: None)."""
  entries = tuple(spec)
  if len(entries) > rank:
    raise ValueError(
      f"`param_specs`: the spec {spec} has {len(entries)} entries for a "
      f"parameter of rank {rank}"
    )
  return entries + (None,) * (rank - len(entries))


def _match_groups(
  shape: tuple[int, ...], tails: Sequence[tuple[int, ...]], start: int
) -> list[tuple[int, ...]] | None:
  """Axes of ``shape[start:]`` indexed by each tail, in order, or ``None``.

  Each tail must be the sizes of a run of adjacent axes after the previous
  run; only size-1 axes may be left between runs or after the last one.
  Depth-first, earliest run first, so the answer is deterministic.
  """
  if not tails:
    return [] if all(d == 1 for d in shape[start:]) else None
  tail, rest = tails[0], tails[1:]
  for first in range(start, len(shape) - len(tail) + 1):
    if shape[first : first + len(tail)] == tail:
      later = _match_groups(shape, rest, first + len(tail))
      if later is not None:
        return [tuple(range(first, first + len(tail))), *later]
    if shape[first] != 1:
      break  # only size-1 axes can be skipped
  return None


def _accumulator_axes(
  shape: tuple[int, ...], accumulator_shapes: Sequence[tuple[int, ...]]
) -> list[tuple[int, ...]] | None:
  """For each accumulator, the parameter axis each of its dimensions indexes.

  Tries the fewest stacked axes first. ``None`` if no cover fits.
  """
  rank = len(shape)
  if len(accumulator_shapes) == 1 and tuple(accumulator_shapes[0]) == shape:
    # Rank 0 or 1 (per slice), or all axes of size 1: the full accumulator.
    return [tuple(range(rank))]
  for stacked in range(rank + 1):
    prefix = shape[:stacked]
    if any(tuple(s[:stacked]) != prefix for s in accumulator_shapes):
      continue
    tails = [tuple(s[stacked:]) for s in accumulator_shapes]
    if any(not tail for tail in tails):
      continue
    groups = _match_groups(shape, tails, stacked)
    if groups is not None:
      return [tuple(range(stacked)) + group for group in groups]
  return None


def _like_param(leaf: Any, shape: tuple[int, ...], spec: PartitionSpec) -> Any:
  return spec if tuple(leaf.shape) == shape else _REPLICATED


def _accumulator_specs(
  accumulators: Any, shapes: list[tuple[int, ...]], specs: list[PartitionSpec], treedef
) -> Any:
  try:
    per_param = treedef.flatten_up_to(accumulators)
  except (ValueError, TypeError):
    return jax.tree.map(lambda _: _REPLICATED, accumulators)
  out = []
  for shape, spec, accs in zip(shapes, specs, per_param, strict=True):
    leaves = jax.tree.leaves(accs)
    if not isinstance(accs, tuple) or len(leaves) != len(accs) or not leaves:
      out.append(jax.tree.map(lambda _: _REPLICATED, accs))
      continue
    axes = _accumulator_axes(shape, [tuple(a.shape) for a in accs])
    if axes is None:
      out.append(tuple(_REPLICATED for _ in accs))
      continue
    entries = _entries(spec, len(shape))
    out.append(tuple(PartitionSpec(*(entries[a] for a in dims)) for dims in axes))
  return treedef.unflatten(out)


def _sparse_rows_specs(
  state: _rows.SparseRowsState,
  shapes: list[tuple[int, ...]],
  specs: list[PartitionSpec],
  treedef,
) -> _rows.SparseRowsState:
  """Specs of a lazy ``sparse_rows`` state: row buffers follow the table."""
  replicated = lambda tree: jax.tree.map(lambda _: _REPLICATED, tree)
  if treedef.num_leaves != 1:
    return replicated(state)
  (shape,), (spec,) = shapes, specs
  if tuple(state.last.shape) != shape[:1]:
    return replicated(state)
  entries = _entries(spec, len(shape))
  return _rows.SparseRowsState(
    count=_REPLICATED,
    accumulators=_accumulator_specs(state.accumulators, shapes, specs, treedef),
    # Stored as (1, *table.shape): the unit axis is replicated.
    momentum=None if state.momentum is None else PartitionSpec(None, *entries),
    last=PartitionSpec(entries[0]),
    coefficients=replicated(state.coefficients),
  )


def _table_shape(table_state: Any) -> tuple[int, ...] | None:
  """The shape of the table a ``sparse_rows`` state was made for, if readable."""
  if isinstance(table_state, _rows.SparseRowsState):
    accumulators = table_state.accumulators
  else:
    found = [
      x
      for x in jax.tree.leaves(
        table_state, is_leaf=lambda x: isinstance(x, _scale_by_sm3.ScaleBySM3State)
      )
      if isinstance(x, _scale_by_sm3.ScaleBySM3State)
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


def _tables_from_rest(rest: Any, treedef, count: int) -> list[int] | None:
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


def _table_positions(
  state: _tables.SparseTablesState,
  treedef,
  shapes: list[tuple[int, ...]],
  specs: list[PartitionSpec],
) -> list[int]:
  """The params leaves each of ``state.tables`` was made for, in order.

  ``sparse_tables`` keeps one state per table leaf, in leaf order, and its
  mask inside closures. The positions are read off ``tx``'s state where it
  holds a tree of the params' structure (its ``None`` leaves), else off the
  tables' shapes: where leaves of one shape leave the choice open, any
  choice gives the same specs if those leaves share one spec; otherwise the
  layout cannot be told, and a ``ValueError`` says so.
  """
  wanted = [_table_shape(t) for t in state.tables]
  if any(w is None for w in wanted):
    raise ValueError(
      "a table state of the `sparse_tables` state is not a sparse_rows state"
    )
  from_rest = _tables_from_rest(state.rest, treedef, len(wanted))
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


def _sparse_tables_specs(
  state: _tables.SparseTablesState,
  shapes: list[tuple[int, ...]],
  specs: list[PartitionSpec],
  treedef,
) -> _tables.SparseTablesState:
  """Specs of a ``sparse_tables`` state: each table's like the table, the rest's."""
  positions = _table_positions(state, treedef, shapes, specs)
  single = jax.tree.structure(0)
  tables = tuple(
    _state_specs(t, single, [shapes[i]], [specs[i]])
    for t, i in zip(state.tables, positions, strict=True)
  )
  # The rest's state is tx's over the params with the tables set to None.
  tables_at = set(positions)
  rest_treedef = jax.tree.structure(
    treedef.unflatten([None if i in tables_at else 0 for i in range(len(shapes))])
  )
  rest_shapes = [s for i, s in enumerate(shapes) if i not in tables_at]
  rest_specs = [p for i, p in enumerate(specs) if i not in tables_at]
  return _tables.SparseTablesState(
    rest=_state_specs(state.rest, rest_treedef, rest_shapes, rest_specs),
    tables=tables,
  )


def _state_specs(
  state: Any, treedef, shapes: list[tuple[int, ...]], specs: list[PartitionSpec]
) -> Any:
  """The spec of every leaf of the abstract ``state`` of params ``treedef``."""

  def is_params_like(node: Any) -> bool:
    return jax.tree.structure(node) == treedef

  def is_leaf(node: Any) -> bool:
    return isinstance(
      node,
      (
        _scale_by_sm3.ScaleBySM3State,
        _momentum.ScaleByMomentumState,
        _rows.SparseRowsState,
        _tables.SparseTablesState,
      ),
    ) or is_params_like(node)

  def params_like(node: Any) -> Any:
    leaves = treedef.flatten_up_to(node)
    return treedef.unflatten(
      [_like_param(x, s, p) for x, s, p in zip(leaves, shapes, specs, strict=True)]
    )

  def visit(node: Any) -> Any:
    if isinstance(node, _tables.SparseTablesState):
      return _sparse_tables_specs(node, shapes, specs, treedef)
    if isinstance(node, _rows.SparseRowsState):
      return _sparse_rows_specs(node, shapes, specs, treedef)
    if isinstance(node, _scale_by_sm3.ScaleBySM3State):
      return _scale_by_sm3.ScaleBySM3State(
        count=jax.tree.map(lambda _: _REPLICATED, node.count),
        accumulators=_accumulator_specs(node.accumulators, shapes, specs, treedef),
      )
    if isinstance(node, _momentum.ScaleByMomentumState):
      if is_params_like(node.momentum):
        return _momentum.ScaleByMomentumState(params_like(node.momentum))
      return jax.tree.map(lambda _: _REPLICATED, node)
    if is_params_like(node):
      return params_like(node)
    return _REPLICATED  # a leaf that is none of the above

  return jax.tree.map(visit, state, is_leaf=is_leaf)


def state_partition_specs(
  tx: optax.GradientTransformation | _rows.SparseRows | _tables.SparseTables,
  params: Any,
  param_specs: Any,
) -> Any:
  """The ``PartitionSpec`` of every leaf of ``tx.init(params)``.

  The specs to give the optimizer's state so that it follows the parameters'
  layout: each SM3 accumulator is split like the parameter axis it indexes
  (replicated where that axis is), momentum and any other parameter-shaped
  buffer like its parameter, and counters and other scalars are replicated.
  Only shapes are used (``tx.init`` runs under :func:`jax.eval_shape`), so
  ``params`` may be :class:`jax.ShapeDtypeStruct` leaves.

  ``tx`` may also be the :class:`~optax_sm3.SparseRows` of
  :func:`optax_sm3.sparse_rows`, with ``params`` the table and
  ``param_specs`` its spec: the specs of ``tx.init(table)``. In a
  :class:`~optax_sm3.SparseRowsState` the row accumulators, the momentum
  (after its leading unit axis) and ``last`` are split like the table's rows;
  the counter, the column accumulators and the catch-up ring are replicated.
  (For ``optax_sm3.nnx.SparseOptimizer``, a table's ``sparse_state`` holds
  ``optax_sm3.sparse_rows(optimizer.table_tx).init(table)``, leaf for leaf.) With these, a
  row-sharded table's ``update``, ``lookup`` and ``sync`` run under
  ``jax.jit`` with no collective larger than the batch's rows; in explicit
  sharding mode, run them under :func:`jax.sharding.auto_axes`.

  ``tx`` may be the :class:`~optax_sm3.SparseTables` of
  :func:`optax_sm3.sparse_tables`, with ``params`` the whole tree: each
  table's state gets the specs above for that table, and ``tx``'s state
  over the other leaves the specs of those leaves. (Which leaves are tables
  is read off the state: ``tx``'s state where it holds a tree of the
  params' structure, else the tables' shapes; a ``ValueError`` says when
  leaves of one shape but different specs leave it open.)

  The cover of each parameter is read off its accumulators' shapes (fewest
  stacked axes first); a state leaf that matches nothing is replicated.

  Flax-boxed ``params`` and ``param_specs`` (an ``nnx.State`` of
  Variables, e.g. ``nnx.get_partition_spec(nnx.state(model))``, or linen's
  ``nn.Partitioned``) are read through their boxes: the result is the specs
  of the unboxed state, a prefix of the boxed state's tree (which
  ``jax.jit``'s ``out_shardings`` accepts). The boxed state itself carries
  the same specs as metadata: each SM3 accumulator of a boxed parameter is
  boxed on its own with the parameter's entries for the axes it indexes,
  so ``nnx.get_partition_spec`` and ``nn.get_partition_spec`` read them.

  Args:
    tx: an optax transformation, e.g. :func:`optax_sm3.sm3`, or an
      :func:`optax.chain` holding :func:`optax_sm3.scale_by_sm3` and other
      optax transformations; or a :class:`~optax_sm3.SparseRows`.
    params: the parameters (arrays or shape-dtype structs).
    param_specs: a tree of :class:`jax.sharding.PartitionSpec` (or ``None``
      for replicated) matching ``params``.

  Returns:
    A tree of ``PartitionSpec`` with the structure of ``tx.init(params)``.

  Raises:
    ValueError: if ``param_specs`` does not match ``params`` or a spec has
      more entries than its parameter has axes.
    TypeError: if a leaf of ``param_specs`` is not a ``PartitionSpec``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> import optax_sm3
    >>> params = {"emb": jnp.zeros((1000, 64)), "b": jnp.zeros(64)}
    >>> specs = {"emb": P("model", None), "b": P()}
    >>> tx = optax_sm3.sm3(0.1, momentum=0.9)
    >>> sm3_state, momentum_state = optax_sm3.state_partition_specs(
    ...     tx, params, specs)[:2]
    >>> sm3_state.count
    P()
    >>> sm3_state.accumulators["emb"]
    (P('model',), P(None,))
    >>> momentum_state.momentum["emb"]
    P('model', None)

    A sparse table's state (lazy: with momentum):

    >>> rows = optax_sm3.sparse_rows(optax_sm3.sm3(0.1, momentum=0.9))
    >>> state = optax_sm3.state_partition_specs(
    ...     rows, params["emb"], P("model", None))
    >>> state.accumulators, state.momentum, state.last, state.count
    ((P('model',), P(None,)), P(None, 'model', None), P('model',), P())
  """
  # Flax-boxed parameters and specs (nnx.State of Variables, nn.Partitioned)
  # are read through their boxes.
  params, param_specs = _boxes.unboxed(params), _boxes.unboxed(param_specs)
  treedef = jax.tree.structure(params)
  specs = _tree.flatten_like(
    treedef, param_specs, "`param_specs` must have the structure of `params`"
  )
  for i, spec in enumerate(specs):
    if spec is None:
      specs[i] = _REPLICATED
    elif not isinstance(spec, PartitionSpec):
      raise TypeError(
        f"`param_specs` leaves must be PartitionSpec or None, got {spec!r}"
      )
  shapes = [tuple(p.shape) for p in treedef.flatten_up_to(params)]
  for shape, spec in zip(shapes, specs, strict=True):
    _entries(spec, len(shape))
  if isinstance(tx, _rows.SparseRows) and treedef.num_leaves != 1:
    raise ValueError(
      "`params` must be the table (one array) when `tx` is a SparseRows, got "
      f"{treedef.num_leaves} leaves"
    )
  return _state_specs(jax.eval_shape(tx.init, params), treedef, shapes, specs)


def state_shardings(
  tx: optax.GradientTransformation | _rows.SparseRows | _tables.SparseTables,
  params: Any,
  param_shardings: Any,
) -> Any:
  """The :class:`~jax.sharding.NamedSharding` of every leaf of ``tx.init(params)``.

  :func:`state_partition_specs` on the specs of ``param_shardings``, on their
  (common) mesh. Pass the result as ``out_shardings`` of
  ``jax.jit(tx.init)``, as the state's in/out shardings of a jitted training
  step, and as the target layout when restoring a checkpoint. Works the same
  in explicit sharding mode (meshes with ``jax.sharding.AxisType.Explicit``).

  Args:
    tx: an optax transformation or a :class:`~optax_sm3.SparseRows` (with
      ``params`` the table; see :func:`state_partition_specs`).
    params: the parameters (arrays or shape-dtype structs).
    param_shardings: a tree of ``NamedSharding`` matching ``params``, all on
      the same mesh.

  Returns:
    A tree of ``NamedSharding`` with the structure of ``tx.init(params)``.

  Raises:
    ValueError: if ``param_shardings`` does not match ``params``, is empty,
      or uses more than one mesh.
    TypeError: if a leaf of ``param_shardings`` is not a ``NamedSharding``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> import optax_sm3
    >>> mesh = jax.make_mesh((1,), ("model",), devices=jax.devices()[:1])
    >>> params = {"w": jnp.zeros((8, 4))}
    >>> shardings = {"w": NamedSharding(mesh, P("model", None))}
    >>> tx = optax_sm3.sm3(0.1, momentum=0.0)
    >>> out = optax_sm3.state_shardings(tx, params, shardings)
    >>> [s.spec for s in out[0].accumulators["w"]]
    [P('model',), P(None,)]
    >>> state = jax.jit(tx.init, out_shardings=out)(params)
    >>> state[0].accumulators["w"][0].sharding == out[0].accumulators["w"][0]
    True
  """
  params, param_shardings = _boxes.unboxed(params), _boxes.unboxed(param_shardings)
  treedef = jax.tree.structure(params)
  flat = _tree.flatten_like(
    treedef, param_shardings, "`param_shardings` must have the structure of `params`"
  )
  for sharding in flat:
    if not isinstance(sharding, NamedSharding):
      raise TypeError(
        f"`param_shardings` leaves must be NamedSharding, got {sharding!r}"
      )
  meshes = []
  for sharding in flat:
    if not any(sharding.mesh == mesh for mesh in meshes):
      meshes.append(sharding.mesh)
  if len(meshes) != 1:
    raise ValueError(
      f"`param_shardings` must all be on one mesh, got {len(meshes)} meshes"
    )
  mesh = meshes[0]
  specs = state_partition_specs(tx, params, treedef.unflatten([s.spec for s in flat]))
  return jax.tree.map(
    lambda spec: NamedSharding(mesh, spec),
    specs,
    is_leaf=lambda x: isinstance(x, PartitionSpec),
  )
