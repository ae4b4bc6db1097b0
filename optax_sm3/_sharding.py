"""Shardings of an optimizer's state that follow the parameters' layout.

``tx.init`` is opaque (``optax.chain`` hides its pieces in closures), so the
layout is read off the abstract state (:func:`jax.eval_shape`) by the rules the
state types declare beside themselves (:mod:`optax_sm3._layout`):

* :class:`~optax_sm3.ScaleBySM3State`: the counter is replicated; each
  parameter's accumulators are matched to the axes of the parameter (a cover
  is a run of stacked leading axes that prefix every accumulator, then
  increasing groups of adjacent axes, possibly with size-1 axes left out), and
  each accumulator dimension takes the ``PartitionSpec`` entry of the
  parameter axis it indexes;
* :class:`~optax_sm3.ScaleByMomentumState`, and any subtree with the
  parameters' structure (``optax.adam``'s ``mu`` and ``nu``, ...): a leaf of
  its parameter's shape is sharded like the parameter;
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

from collections.abc import Iterable, Mapping
from typing import Any, TypeAlias

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from optax_sm3 import _boxes, _layout, _tree
from optax_sm3._sparse import _rows, _tables

# The cover matching, under the name tests/test_sharding.py reads.
_accumulator_axes = _layout.accumulator_axes

# A pytree with a NamedSharding at each leaf; keys are anything hashable, as
# in chex.ArrayTree.
NamedShardingTree: TypeAlias = (
  NamedSharding | Iterable["NamedShardingTree"] | Mapping[Any, "NamedShardingTree"]
)


def state_partition_specs(
  tx: optax.GradientTransformation | _rows.SparseRows | _tables.SparseTables,
  params: optax.Params,
  param_specs: _layout.PartitionSpecTree,
) -> _layout.PartitionSpecTree:
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
  specs: list[Any] = _tree.flatten_like(
    treedef, param_specs, "`param_specs` must have the structure of `params`"
  )
  for i, spec in enumerate(specs):
    if spec is None:
      specs[i] = _layout.REPLICATED
    elif not isinstance(spec, PartitionSpec):
      raise TypeError(
        f"`param_specs` leaves must be PartitionSpec or None, got {spec!r}"
      )
  leaves: list[Any] = treedef.flatten_up_to(params)
  shapes = [tuple(p.shape) for p in leaves]
  for shape, spec in zip(shapes, specs, strict=True):
    _layout.entries(spec, len(shape))
  if isinstance(tx, _rows.SparseRows) and treedef.num_leaves != 1:
    raise ValueError(
      "`params` must be the table (one array) when `tx` is a SparseRows, got "
      f"{treedef.num_leaves} leaves"
    )
  layout = _layout.ParamLayout(treedef, shapes, specs)
  return layout.specs_of(jax.eval_shape(tx.init, params))


def state_shardings(
  tx: optax.GradientTransformation | _rows.SparseRows | _tables.SparseTables,
  params: optax.Params,
  param_shardings: NamedShardingTree,
) -> NamedShardingTree:
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
