"""The row-sparse step of a table, by the rule derived from the user's optimizer.

A table's rule (:mod:`optax_sm3._sparse._table_rule`) holds the stages of
the optimizer the user built for the dense path. The batch's rows take
those stages themselves (clipping, :mod:`optax_sm3._sparse._batch`'s SM3
on rows, momentum, decoupled weight decay, the learning rate); rows outside
the batch have a zero gradient, so they move only by momentum and weight
decay, and their SM3 accumulators only age by ``beta``, which
:mod:`optax_sm3._lazy_rows` composes in closed form: such rows are left
behind and brought up to date when they are next read or updated, or by a
round-robin sweep of a fixed number of rows a step that bounds how far
behind any row can fall.

Here: the lazy state (:class:`SparseRowsState`) and its layout, ``init``,
``step``, ``lookup``, ``sync`` and ``expected_state``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from optax_sm3 import _cover, _layout, _lazy_rows, _momentum, _scale_by_sm3, _validation
from optax_sm3._sparse import _batch, _ids
from optax_sm3._sparse._table_rule import TableRule, cover_of


class SparseRowsState(NamedTuple):
  """State of :func:`optax_sm3.sparse_rows` with momentum, weight decay or
  ``beta > 0``.

  Row ``i`` of the table, of ``momentum`` and of the row-indexed
  accumulators holds the dense optimizer's values after ``last[i]``
  updates, not ``count``; ``lookup`` and ``sync`` bring rows up to date
  with ``coefficients``.

  Attributes:
    count: number of updates applied so far; shape ``()``, dtype ``int32``.
    accumulators: the SM3 accumulators, as in
      :class:`optax_sm3.ScaleBySM3State` for the table alone: a tuple of one
      array per group of the table's cover (by default one float32 vector
      per axis; one array of the table's shape for a table of rank 1). The
      groups that index the rows are stored behind with the rows (with
      ``beta > 0`` they age every step); the others are current.
    momentum: the EMA momentum buffer, dtype ``mu_dtype`` (or the table's),
      stored with a leading unit axis (shape ``(1, *table.shape)``) so that
      its shape is never the table's: ``jax.jit`` pairs donated inputs with
      outputs by shape, and a buffer paired with the table would cost two
      table-sized copies per step. ``None`` without momentum.
    last: shape ``(V,)``, dtype ``int32``: the step each row is current at;
      always ``>= count - W`` for the sweep period ``W``.
    coefficients: the catch-up ring, a :class:`optax_sm3._lazy_rows.Ring`
      of the maps from each of the last ``W + 1`` steps to now, in about
      ``5 (W + 3 sqrt(W))`` numbers of the catch-up dtype (the table's, at
      least float32).
  """

  count: jax.Array
  accumulators: tuple[jax.Array, ...]
  momentum: jax.Array | None
  last: jax.Array
  coefficients: _lazy_rows.Ring


def _layout_specs(state: SparseRowsState, layout: _layout.ParamLayout) -> Any:
  """A lazy ``sparse_rows`` state (``layout`` is the table's): row buffers
  follow the table's rows, the counter and the catch-up ring are replicated."""
  if layout.treedef.num_leaves != 1:
    return _layout.replicated(state)
  (shape,), (spec,) = layout.shapes, layout.specs
  if tuple(state.last.shape) != shape[:1]:
    return _layout.replicated(state)
  entries = _layout.entries(spec, len(shape))
  return state._replace(
    count=_layout.REPLICATED,
    accumulators=layout.accumulators(state.accumulators),
    # Stored as (1, *table.shape): the unit axis is replicated.
    momentum=None if state.momentum is None else PartitionSpec(None, *entries),
    last=PartitionSpec(entries[0]),
    coefficients=_layout.replicated(state.coefficients),
  )


_layout.register(SparseRowsState, _layout_specs)


def _store(buffer: jax.Array | None) -> jax.Array | None:
  """A row buffer as stored in the state: a leading unit axis (see there)."""
  return None if buffer is None else buffer[None]


def _load(buffer: jax.Array | None) -> jax.Array | None:
  return None if buffer is None else buffer[0]


def _is_stage(x: Any) -> bool:
  return isinstance(
    x, (_scale_by_sm3.ScaleBySM3State, optax.ScaleByScheduleState, SparseRowsState)
  )


def sm3_state(state: Any) -> _scale_by_sm3.ScaleBySM3State | None:
  """The one ScaleBySM3State in an ``sm3`` chain state, found by type."""
  found = [
    x
    for x in jax.tree.leaves(state, is_leaf=_is_stage)
    if isinstance(x, _scale_by_sm3.ScaleBySM3State)
  ]
  return found[0] if len(found) == 1 else None


def the_sm3_state(state: Any) -> _scale_by_sm3.ScaleBySM3State:
  """:func:`sm3_state`, which a state of this module's tables always holds."""
  found = sm3_state(state)
  if found is None:
    raise ValueError("`state` holds no ScaleBySM3State: it is not an sm3 state")
  return found


def _groups(found: _scale_by_sm3.ScaleBySM3State) -> tuple[jax.Array, ...]:
  """The accumulators of a one-table state: one array per group of its cover."""
  accumulators: Any = found.accumulators
  return tuple(accumulators)


def catch_up_dtype(table: Any) -> jnp.dtype:
  """The dtype of the catch-up ring: the table's, at least float32."""
  return jnp.promote_types(table.dtype, jnp.float32)


def init(rule: TableRule, table: jax.Array) -> Any:
  """The optimizer's own state, or a :class:`SparseRowsState` if lazy.

  A lazy state is made from the stages it keeps (the preconditioner's and
  the momentum's), never through the whole chain's state, which would hold
  a second table-sized momentum buffer for a moment.
  """
  if not rule.lazy:
    return rule.optimizer.init(table)
  state = rule.spec.stages.preconditioner.init(table)
  momentum = None
  if rule.keeps_momentum:
    buffer: Any = rule.spec.stages.momentum.init(table)
    momentum = _store(buffer.momentum)
  return SparseRowsState(
    count=jnp.zeros([], jnp.int32),
    accumulators=_groups(the_sm3_state(state)),
    momentum=momentum,
    last=jnp.zeros(table.shape[:1], jnp.int32),
    coefficients=_lazy_rows.identity(
      rule.period_for(table.shape[0]), catch_up_dtype(table)
    ),
  )


def _chain_rows(
  rule: TableRule,
  updates: jax.Array,
  rows: jax.Array,
  rows_momentum: jax.Array | None,
  count: jax.Array,
) -> tuple[jax.Array, jax.Array | None]:
  """The optimizer's stages after SM3 (its own objects), on the batch's rows.

  Returns:
    ``(new rows, new rows' momentum)``; the momentum ``None`` without it.
  """
  stages = rule.spec.stages
  momentum_state: Any
  out: Any
  out, momentum_state = stages.momentum.update(
    updates,
    # A momentum of None is no OptState to pyright (see _momentum).
    _momentum.ScaleByMomentumState(rows_momentum),  # pyright: ignore[reportArgumentType]
  )
  if stages.decoupled_decay is not None:
    decay = stages.decoupled_decay
    out, _ = decay.update(out, decay.init(rows), rows)
  rate_state = stages.rate.init(rows)
  if isinstance(rate_state, optax.ScaleByScheduleState):
    rate_state = optax.ScaleByScheduleState(count)
  out, _ = stages.rate.update(out, rate_state)
  new_rows: Any = optax.apply_updates(rows, out)
  return new_rows, momentum_state.momentum


def _advance_stage(new_sm3: _scale_by_sm3.ScaleBySM3State, stage: Any) -> Any:
  """One stage of ``sm3``'s chain state after a step (found by type)."""
  if isinstance(stage, _scale_by_sm3.ScaleBySM3State):
    return new_sm3
  if isinstance(stage, optax.ScaleByScheduleState):
    return optax.ScaleByScheduleState(
      _validation.safe_increment(jnp.asarray(stage.count))
    )
  return stage  # The other stages hold no state.


def _dense_layout_step(
  rule: TableRule, batch: _batch.RowBatch, state: Any, table: jax.Array
) -> tuple[jax.Array, Any]:
  """The step without momentum and weight decay: the optimizer's own state."""
  found = the_sm3_state(state)
  count = found.count
  accumulators = _groups(found)
  if table.size:
    updates, accumulators = _batch.sm3_rows(
      rule.settings, cover_of(rule, table.shape), batch, accumulators, count
    )
    old = table.at[batch.unique].get(mode="fill", fill_value=0)
    new, _ = _chain_rows(rule, updates, old, None, count)
    table = table.at[batch.unique].set(new, mode="drop")
  new_sm3 = _scale_by_sm3.ScaleBySM3State(
    _validation.safe_increment(count), accumulators
  )
  return table, jax.tree.map(
    lambda stage: _advance_stage(new_sm3, stage), state, is_leaf=_is_stage
  )


def _sweep(count: jax.Array, unique: jax.Array, rows: int, period: int) -> jax.Array:
  """The rows this step's sweep brings up to step ``count``.

  One block of rows, round robin, so that every row is swept at least once
  every ``period`` steps. Rows of the batch (``unique``, sorted) are left
  out of it: they read as ``rows``, out of range.
  """
  block = -(-rows // period)
  start = jnp.minimum((count % period) * block, rows - block)
  swept = start + jnp.arange(block, dtype=jnp.int32)
  found = jnp.minimum(jnp.searchsorted(unique, swept), unique.shape[0] - 1)
  return jnp.where(unique[found] == swept, rows, swept)


def _gather(x: jax.Array, at: jax.Array) -> jax.Array:
  return x.at[at].get(mode="fill", fill_value=0)


def _scatter(
  x: jax.Array, at: jax.Array, head: jax.Array, tail: jax.Array
) -> jax.Array:
  """``x`` with rows ``at`` set to ``head`` then ``tail`` (one scatter: an
  in-place slice update beside a scatter makes XLA copy ``x`` whole)."""
  return x.at[at].set(jnp.concatenate([head, tail]), mode="drop")


def _lazy_rows_step(
  rule: TableRule,
  cover: _cover.Cover,
  batch: _batch.RowBatch,
  state: SparseRowsState,
  table: jax.Array,
) -> tuple[jax.Array, jax.Array | None, tuple[jax.Array, ...], jax.Array]:
  """The batch's rows and the sweep's caught up; the batch's then stepped.

  Returns:
    ``(table, momentum buffer, accumulators, last)`` after the step (the
    buffer unstored).
  """
  count, unique = state.count, batch.unique
  k = unique.shape[0]
  swept = _sweep(count, unique, table.shape[0], rule.period_for(table.shape[0]))
  both = jnp.concatenate([unique, swept])
  behind = _gather(state.last, both)
  maps = _lazy_rows.maps_at(state.coefficients, behind)
  by_rows = [_batch.indexes_rows(cover, group) for group in cover.groups]
  # The row-indexed accumulators of both, current (they age only with beta).
  gathered = [
    (_lazy_rows.scale_rows(maps, _gather(a, both)) if rule.ages else _gather(a, unique))
    if r
    else None
    for a, r in zip(state.accumulators, by_rows, strict=True)
  ]
  local = tuple(
    a if g is None else g[:k] for a, g in zip(state.accumulators, gathered, strict=True)
  )
  updates, new_local = _batch.sm3_local(rule.settings, cover, batch, local, count)
  accumulators = []
  for a, g, new in zip(state.accumulators, gathered, new_local, strict=True):
    if g is None:
      accumulators.append(new)
    elif rule.ages:
      accumulators.append(_scatter(a, both, new, g[k:]))
    else:
      accumulators.append(a.at[unique].set(new, mode="drop"))
  buffer = _load(state.momentum)
  if rule.moves_rows:
    current, current_buffer = _lazy_rows.catch_up(
      maps,
      _gather(table, both),
      None if buffer is None else _gather(buffer, both),
    )
    new, new_buffer = _chain_rows(
      rule,
      updates,
      current[:k],
      None if current_buffer is None else current_buffer[:k],
      count,
    )
    table = _scatter(table, both, new, current[k:])
    if buffer is not None and current_buffer is not None and new_buffer is not None:
      buffer = _scatter(buffer, both, new_buffer, current_buffer[k:])
  else:
    # Rows outside the batch do not move: the table is always current.
    new, _ = _chain_rows(rule, updates, _gather(table, unique), None, count)
    table = table.at[unique].set(new, mode="drop")
  new_count = _validation.safe_increment(count)
  steps = jnp.concatenate(
    [jnp.full([k], new_count, jnp.int32), jnp.full([swept.shape[0]], count, jnp.int32)]
  )
  # XLA updates `last` in place only if every read of it comes before the
  # write in the data flow; otherwise it copies `last` whole, twice. The
  # maxima change nothing (`behind <= count`, `tie < 0`) but make the write
  # wait for this step's read (`behind`) and, in a train step, for the
  # lookups' reads in the forward pass, which the gradient, so `updates`,
  # follows.
  tie = jnp.where(jnp.sum(updates) > 0, -1, -2).astype(jnp.int32)
  written = jnp.maximum(jnp.maximum(steps, behind), tie)
  last = state.last.at[both].set(written, mode="drop")
  return table, buffer, tuple(accumulators), last


def _advance_ring(
  rule: TableRule, state: SparseRowsState, new_count: jax.Array, dtype: Any
) -> _lazy_rows.Ring:
  """The catch-up ring with this step's map added."""
  spec = rule.spec
  lr = spec.learning_rate
  rate = jnp.asarray(lr(state.count) if callable(lr) else lr, dtype)
  zero, one = jnp.zeros([], dtype), jnp.ones([], dtype)
  mu = zero
  if spec.momentum is not None and rule.keeps_momentum:
    mu = _validation.complement(spec.momentum, dtype)[0]
  lam = jnp.asarray(spec.weight_decay, dtype) if rule.decays else zero
  c_old = (
    _batch.coefficients_at(rule.settings, state.count, dtype) if rule.ages else one
  )
  look_ahead = mu if spec.nesterov else None
  return _lazy_rows.advance(
    state.coefficients, new_count, _lazy_rows.one_step(mu, rate, lam, c_old, look_ahead)
  )


def _lazy_step(
  rule: TableRule, batch: _batch.RowBatch, state: SparseRowsState, table: jax.Array
) -> tuple[jax.Array, SparseRowsState]:
  """The step of a lazy state: rows outside the batch are left behind."""
  accumulators, buffer, last = state.accumulators, state.momentum, state.last
  new_count = _validation.safe_increment(state.count)
  if table.size:
    table, buffer, accumulators, last = _lazy_rows_step(
      rule, cover_of(rule, table.shape), batch, state, table
    )
    buffer = _store(buffer)
  else:
    last = jnp.full_like(last, new_count)
  coefficients = _advance_ring(rule, state, new_count, catch_up_dtype(table))
  return table, SparseRowsState(new_count, accumulators, buffer, last, coefficients)


def step(
  rule: TableRule, batch: _batch.RowBatch, state: Any, table: jax.Array
) -> tuple[jax.Array, Any]:
  """One step of the table from its (clipped) batch of rows."""
  if rule.lazy:
    return _lazy_step(rule, batch, state, table)
  return _dense_layout_step(rule, batch, state, table)


def lookup(
  rule: TableRule, indices: jax.Array, state: Any, table: jax.Array
) -> jax.Array:
  """The rows ``table[indices]`` as the dense optimizer holds them now."""
  rows = table.shape[0]
  flat = _ids.in_range(indices.reshape(-1), rows)
  values = table.at[flat].get(mode="fill", fill_value=jnp.nan)
  if rule.moves_rows:
    buffer = _load(state.momentum)
    values, _ = _lazy_rows.catch_up(
      _lazy_rows.maps_at(state.coefficients, _gather(state.last, flat)),
      values,
      None if buffer is None else _gather(buffer, flat),
    )
  return values.reshape(*indices.shape, *table.shape[1:])


def sync(rule: TableRule, state: Any, table: jax.Array) -> tuple[jax.Array, Any]:
  """Every row caught up to ``state.count`` (a no-op unless lazy)."""
  if not rule.lazy:
    return table, state
  maps = _lazy_rows.maps_at(state.coefficients, state.last)
  buffer = _load(state.momentum)
  if rule.moves_rows:
    table, buffer = _lazy_rows.catch_up(maps, table, buffer)
  accumulators = state.accumulators
  if rule.ages:
    cover = cover_of(rule, tuple(table.shape))
    accumulators = tuple(
      _lazy_rows.scale_rows(maps, a) if _batch.indexes_rows(cover, group) else a
      for a, group in zip(accumulators, cover.groups, strict=True)
    )
  return table, state._replace(
    accumulators=accumulators,
    momentum=_store(buffer),
    last=jnp.full_like(state.last, state.count),
  )


def expected_state(
  init_fn: Callable[[jax.Array], Any], shape: tuple[int, ...], dtype: Any
) -> Any:
  """The shapes and dtypes of ``init_fn`` for a table of ``shape`` and ``dtype``."""
  return jax.eval_shape(init_fn, jax.ShapeDtypeStruct(shape, dtype))
