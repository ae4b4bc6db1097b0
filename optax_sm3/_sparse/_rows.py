"""Exact SM3 updates of an embedding table that touch only the batch's rows.

The gradient of ``table[ids]`` is zero outside the ``k`` rows in the batch,
so the dense optimizer spends ``O(V * D)`` per step on a table of ``V`` rows
where :func:`sparse_rows` spends ``O(k * D + V)``: SM3-II on the batch's
rows alone is the dense step, bit for bit (:mod:`optax_sm3._sparse._batch`).

Momentum and decoupled weight decay move rows outside the batch too, but by
amounts known in closed form (:mod:`optax_sm3._lazy_rows`): such rows are
left behind and brought up to date when they are next read or updated, or by
a round-robin sweep that bounds how far behind any row can fall.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_sm3 import (
  _lazy_rows,
  _momentum,
  _scale_by_sm3,
  _sm3,
  _validation,
)
from optax_sm3._sparse import _batch, _ids

_DEFAULT_SWEEP_PERIOD = 1024


class SparseRows(NamedTuple):
  """The functions returned by :func:`sparse_rows`.

  Attributes:
    init: ``init(table) -> state``. With ``momentum = weight_decay = 0`` the
      state of ``optax_sm3.sm3(...).init(table)`` (an :func:`optax.chain`
      state); otherwise a :class:`SparseRowsState`.
    update: ``update(indices, row_grads, state, table) -> (new_table,
      new_state)``; ``indices`` has shape ``(k,)`` (repeats allowed, ``k = 0``
      takes a step with a zero gradient), ``row_grads`` shape
      ``(k, *table.shape[1:])``.
    lookup: ``lookup(indices, state, table) -> rows``: the rows
      ``table[indices]`` (``indices`` of any shape) as the dense optimizer
      would hold them now. Read rows through it, never by indexing ``table``
      directly: with momentum or weight decay, rows outside recent batches
      are stored behind.
    sync: ``sync(state, table) -> (table, state)``: the whole table as the
      dense optimizer would hold it now (for evaluation and checkpoints),
      and the state with every row marked current. ``O(V D)``.
  """

  init: Callable[[jax.Array], optax.OptState]
  update: Callable[
    [jax.Array, jax.Array, optax.OptState, jax.Array],
    tuple[jax.Array, optax.OptState],
  ]
  lookup: Callable[[jax.Array, optax.OptState, jax.Array], jax.Array]
  sync: Callable[[optax.OptState, jax.Array], tuple[jax.Array, optax.OptState]]


class SparseRowsState(NamedTuple):
  """State of :func:`sparse_rows` with momentum or weight decay.

  Row ``i`` of the table (and of ``momentum``) holds the dense optimizer's
  values after ``last[i]`` updates, not ``count``; ``lookup`` and ``sync``
  bring rows up to date with ``coefficients``.

  Attributes:
    count: number of updates applied so far; shape ``()``, dtype ``int32``.
    accumulators: the SM3 accumulators, as in
      :class:`optax_sm3.ScaleBySM3State` for the table alone: a tuple of one
      float32 vector per axis of the table (one array of the table's shape
      for a table of rank 1). Always current.
    momentum: the EMA momentum buffer, the table's dtype, stored with a
      leading unit axis (shape ``(1, *table.shape)``) so that its shape is
      never the table's: ``jax.jit`` pairs donated inputs with outputs by
      shape, and a buffer paired with the table would cost two table-sized
      copies per step. ``None`` when ``momentum = 0``.
    last: shape ``(V,)``, dtype ``int32``: the step each row is current at;
      always ``>= count - sweep_period``.
    coefficients: the catch-up ring, a
      :class:`optax_sm3._lazy_rows.Coefficients` of three vectors of shape
      ``(sweep_period + 1,)`` in the catch-up dtype (the table's, at least
      float32).
  """

  count: jax.Array
  accumulators: tuple[jax.Array, ...]
  momentum: jax.Array | None
  last: jax.Array
  coefficients: _lazy_rows.Coefficients


class _Config(NamedTuple):
  """What :func:`sparse_rows` binds: its arguments and the stages built from them.

  Attributes:
    learning_rate: a float or a schedule of the step count.
    momentum: the EMA momentum.
    beta: the second-moment decay.
    eps: added under the square root.
    weight_decay: the decoupled weight decay.
    period: ``sweep_period``, an int ``>= 1``.
    dense: ``optax_sm3.sm3`` with the same arguments (``init`` builds its state).
    momentum_tx: the chain's momentum stage; ``None`` for ``momentum = 0``.
    decay_tx: the chain's weight decay stage; ``None`` for ``weight_decay = 0``.
    rate_tx: the chain's learning-rate stage.
  """

  learning_rate: optax.ScalarOrSchedule
  momentum: jax.typing.ArrayLike
  beta: jax.typing.ArrayLike
  eps: jax.typing.ArrayLike
  weight_decay: jax.typing.ArrayLike
  period: int
  dense: optax.GradientTransformation
  momentum_tx: optax.GradientTransformation | None
  decay_tx: optax.GradientTransformation | None
  rate_tx: optax.GradientTransformation

  @property
  def lazy(self) -> bool:
    """Whether rows outside the batch move (momentum or weight decay)."""
    return self.momentum_tx is not None or self.decay_tx is not None


def _check_table(table: Any) -> None:
  if not hasattr(table, "shape") or not hasattr(table, "dtype"):
    raise TypeError(f"`table` must be an array, got {type(table).__name__}")
  if table.ndim < 1:
    raise ValueError(
      f"`table` must have rank >= 1 (rows first), got shape {table.shape}"
    )
  if not jnp.issubdtype(table.dtype, jnp.floating):
    raise TypeError(f"`table` must have a real floating dtype, got {table.dtype}")


def _check_batch(indices: Any, row_grads: Any, table: jax.Array) -> None:
  if jnp.ndim(indices) != 1:
    raise ValueError(f"`indices` must have shape (k,), got {jnp.shape(indices)}")
  _ids.check_ids(indices, table.shape[0], "indices")
  expected = (jnp.shape(indices)[0], *table.shape[1:])
  if tuple(jnp.shape(row_grads)) != expected:
    raise ValueError(
      f"`row_grads` must have shape (k, *table.shape[1:]) = {expected}, got "
      f"{tuple(jnp.shape(row_grads))}"
    )


def _store(buffer: jax.Array | None) -> jax.Array | None:
  """A row buffer as stored in the state: a leading unit axis (see there)."""
  return None if buffer is None else buffer[None]


def _load(buffer: jax.Array | None) -> jax.Array | None:
  return None if buffer is None else buffer[0]


def _is_stage(x: Any) -> bool:
  return isinstance(
    x, (_scale_by_sm3.ScaleBySM3State, optax.ScaleByScheduleState, SparseRowsState)
  )


def _sm3_state(state: Any) -> _scale_by_sm3.ScaleBySM3State | None:
  """The one ScaleBySM3State in an ``sm3`` chain state, found by type."""
  found = [
    x
    for x in jax.tree.leaves(state, is_leaf=_is_stage)
    if isinstance(x, _scale_by_sm3.ScaleBySM3State)
  ]
  return found[0] if len(found) == 1 else None


def _table_shape(accumulators: Any) -> tuple[int, ...] | None:
  """The table shape a tuple of per-axis accumulators was made for."""
  if not isinstance(accumulators, tuple) or not accumulators:
    return None
  if len(accumulators) == 1:
    return tuple(np.shape(accumulators[0]))
  if any(np.ndim(a) != 1 for a in accumulators):
    return None
  return tuple(np.shape(a)[0] for a in accumulators)


def _check_sweep_period(sweep_period: Any) -> int:
  if (
    isinstance(sweep_period, bool)
    or not isinstance(sweep_period, (int, np.integer))
    or sweep_period < 1
  ):
    raise ValueError(f"`sweep_period` must be an int >= 1, got {sweep_period!r}")
  return int(sweep_period)


def _catch_up_dtype(table: jax.Array) -> jnp.dtype:
  """The dtype of the catch-up ring: the table's, at least float32."""
  return jnp.promote_types(table.dtype, jnp.float32)


def _chain_rows(
  config: _Config,
  updates: jax.Array,
  rows: jax.Array,
  rows_momentum: jax.Array | None,
  count: jax.Array,
) -> tuple[jax.Array, jax.Array | None]:
  """The stages after ``scale_by_sm3`` in ``sm3``'s chain, on the batch's rows.

  Returns:
    ``(new rows, new rows' momentum)``; the momentum ``None`` without it.
  """
  if config.momentum_tx is not None:
    updates, new = config.momentum_tx.update(
      updates, _momentum.ScaleByMomentumState(rows_momentum)
    )
    rows_momentum = new.momentum
  if config.decay_tx is not None:
    updates, _ = config.decay_tx.update(updates, config.decay_tx.init(rows), rows)
  rate_state = (
    optax.ScaleByScheduleState(count)
    if callable(config.learning_rate)
    else optax.EmptyState()
  )
  updates, _ = config.rate_tx.update(updates, rate_state)
  return optax.apply_updates(rows, updates), rows_momentum


def _init(config: _Config, table: jax.Array) -> optax.OptState:
  """``init``: ``sm3``'s chain state, or a :class:`SparseRowsState` if lazy."""
  _check_table(table)
  state = config.dense.init(table)
  if not config.lazy:
    return state
  return SparseRowsState(
    count=jnp.zeros([], jnp.int32),
    accumulators=tuple(_sm3_state(state).accumulators),
    momentum=_store(jnp.zeros_like(table)) if config.momentum_tx is not None else None,
    last=jnp.zeros(table.shape[:1], jnp.int32),
    coefficients=_lazy_rows.identity(config.period + 1, _catch_up_dtype(table)),
  )


def _expected_state(
  init: Callable[[jax.Array], optax.OptState], shape: tuple[int, ...], dtype: Any
) -> Any:
  """The shapes and dtypes of ``init`` for a table of ``shape`` and ``dtype``."""
  return jax.eval_shape(init, jax.ShapeDtypeStruct(shape, dtype))


def _check_state(
  expected_state: Callable[[tuple[int, ...], Any], Any], state: Any, table: jax.Array
) -> None:
  """Raises ``ValueError`` unless ``state`` is ``init``'s for ``table``."""
  accumulators = (
    state.accumulators
    if isinstance(state, SparseRowsState)
    else getattr(_sm3_state(state), "accumulators", None)
  )
  shape = _table_shape(accumulators)
  if shape is not None and shape != tuple(table.shape):
    raise ValueError(
      f"`state` was made for a table of shape {shape}, but `table` has shape "
      f"{tuple(table.shape)}; a table that changed shape needs a new state "
      "(`init`)"
    )
  expected = expected_state(tuple(table.shape), jnp.dtype(table.dtype))
  leaves, treedef = jax.tree.flatten(state)
  if treedef != jax.tree.structure(expected) or any(
    (np.shape(a), jnp.result_type(a)) != (b.shape, b.dtype)
    for a, b in zip(leaves, jax.tree.leaves(expected), strict=True)
  ):
    raise ValueError(
      f"`state` does not belong to a table of shape {tuple(table.shape)} and "
      f"dtype {table.dtype} with this optimizer's arguments: expected "
      f"{jax.tree.map(lambda x: (x.shape, str(x.dtype)), expected)}, got "
      f"{jax.tree.map(lambda x: (np.shape(x), str(jnp.result_type(x))), state)}"
    )


def _batch_sm3(
  config: _Config,
  indices: jax.Array,
  row_grads: jax.Array,
  accumulators: tuple[jax.Array, ...],
  table: jax.Array,
) -> tuple[jax.Array, jax.Array, tuple[jax.Array, ...]]:
  """:func:`optax_sm3._sparse._batch.sm3_rows` of the batch, out-of-range rows dropped."""
  # Out-of-range rows (possible only under jit) are dropped, like JAX's
  # scatters do; the test runs before the int32 cast, so an int64 id at or
  # above 2**31 cannot wrap onto a real row.
  indices = _ids.in_range(indices, table.shape[0])
  row_grads = row_grads.astype(table.dtype)
  return _batch.sm3_rows(indices, row_grads, accumulators, config.beta, config.eps)


def _advance_stage(new_sm3: _scale_by_sm3.ScaleBySM3State, stage: Any) -> Any:
  """One stage of ``sm3``'s chain state after a step (found by type)."""
  if isinstance(stage, _scale_by_sm3.ScaleBySM3State):
    return new_sm3
  if isinstance(stage, optax.ScaleByScheduleState):
    return optax.ScaleByScheduleState(_validation.safe_increment(stage.count))
  return stage  # The other stages hold no state.


def _dense_layout_step(
  config: _Config,
  indices: jax.Array,
  row_grads: jax.Array,
  state: optax.OptState,
  table: jax.Array,
) -> tuple[jax.Array, optax.OptState]:
  """``update`` without momentum and weight decay: ``sm3``'s own state."""
  sm3_state = _sm3_state(state)
  count = sm3_state.count
  accumulators = tuple(sm3_state.accumulators)
  if table.size:
    unique, updates, accumulators = _batch_sm3(
      config, indices, row_grads, accumulators, table
    )
    old = table.at[unique].get(mode="fill", fill_value=0)
    new, _ = _chain_rows(config, updates, old, None, count)
    table = table.at[unique].set(new, mode="drop")
  new_sm3 = _scale_by_sm3.ScaleBySM3State(
    _validation.safe_increment(count), accumulators
  )
  advance = functools.partial(_advance_stage, new_sm3)
  return table, jax.tree.map(advance, state, is_leaf=_is_stage)


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


def _lazy_rows_step(
  config: _Config,
  unique: jax.Array,
  updates: jax.Array,
  state: SparseRowsState,
  table: jax.Array,
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
  """The batch's rows and the sweep's, caught up; the batch's then stepped.

  Returns:
    ``(table, momentum buffer, last)`` after the step (the buffer unstored).
  """
  count, buffer, last = state.count, _load(state.momentum), state.last
  k = unique.shape[0]
  swept = _sweep(count, unique, table.shape[0], config.period)
  # One gather and one scatter per buffer for the batch and the sweep
  # (an in-place slice update beside the scatter makes XLA copy the
  # buffers whole).
  both = jnp.concatenate([unique, swept])
  behind = last.at[both].get(mode="fill", fill_value=0)
  current, current_buffer = _lazy_rows.catch_up(
    state.coefficients,
    behind,
    table.at[both].get(mode="fill", fill_value=0),
    None if buffer is None else buffer.at[both].get(mode="fill", fill_value=0),
  )
  # The batch's rows, now current, take the dense step.
  new, new_buffer = _chain_rows(
    config,
    updates,
    current[:k],
    None if buffer is None else current_buffer[:k],
    count,
  )
  table = table.at[both].set(jnp.concatenate([new, current[k:]]), mode="drop")
  if buffer is not None:
    buffer = buffer.at[both].set(
      jnp.concatenate([new_buffer, current_buffer[k:]]), mode="drop"
    )
  new_count = _validation.safe_increment(count)
  steps = jnp.concatenate(
    [jnp.full([k], new_count, jnp.int32), jnp.full([swept.shape[0]], count, jnp.int32)]
  )
  # `behind <= count` always: the maximum changes nothing, but makes the
  # write wait for the read, so XLA updates `last` in place instead of
  # copying it (twice) to keep the read's input alive.
  last = last.at[both].set(jnp.maximum(steps, behind), mode="drop")
  return table, buffer, last


def _advance_ring(
  config: _Config, state: SparseRowsState, new_count: jax.Array, dtype: Any
) -> _lazy_rows.Coefficients:
  """The catch-up ring with this step's coefficients added."""
  lr = config.learning_rate
  rate = jnp.asarray(lr(state.count) if callable(lr) else lr, dtype)
  mu = (
    _validation.complement(config.momentum, dtype)[0]
    if config.momentum_tx is not None
    else jnp.zeros([], dtype)
  )
  lam = (
    jnp.asarray(config.weight_decay, dtype)
    if config.decay_tx is not None
    else jnp.zeros([], dtype)
  )
  return _lazy_rows.advance(state.coefficients, new_count, mu, rate, lam)


def _lazy_step(
  config: _Config,
  indices: jax.Array,
  row_grads: jax.Array,
  state: SparseRowsState,
  table: jax.Array,
) -> tuple[jax.Array, SparseRowsState]:
  """``update`` with momentum or weight decay: rows are left behind."""
  accumulators, buffer, last = state.accumulators, state.momentum, state.last
  new_count = _validation.safe_increment(state.count)
  if table.size:
    unique, updates, accumulators = _batch_sm3(
      config, indices, row_grads, accumulators, table
    )
    table, buffer, last = _lazy_rows_step(config, unique, updates, state, table)
    buffer = _store(buffer)
  else:
    last = jnp.full_like(last, new_count)
  coefficients = _advance_ring(config, state, new_count, _catch_up_dtype(table))
  return table, SparseRowsState(new_count, accumulators, buffer, last, coefficients)


def _update(
  step: Callable[..., tuple[jax.Array, optax.OptState]],
  expected_state: Callable[[tuple[int, ...], Any], Any],
  indices: jax.Array,
  row_grads: jax.Array,
  state: optax.OptState,
  table: jax.Array,
) -> tuple[jax.Array, optax.OptState]:
  """``update``: the arguments checked, then the jitted ``step``."""
  _check_table(table)
  _check_batch(indices, row_grads, table)
  _check_state(expected_state, state, table)
  indices, row_grads = jnp.asarray(indices), jnp.asarray(row_grads)
  if indices.shape[0] == 0:
    # No rows: the step of a zero gradient. One dropped row keeps the
    # shapes of the batch arithmetic non-empty.
    indices = jnp.full([1], -1, jnp.int32)
    row_grads = jnp.zeros((1, *table.shape[1:]), table.dtype)
  return step(indices, row_grads, state, table)


@functools.partial(jax.jit, static_argnums=0)
def _lookup_rows(
  lazy: bool, indices: jax.Array, state: optax.OptState, table: jax.Array
) -> jax.Array:
  """The rows ``table[indices]`` as the dense optimizer holds them now."""
  rows = table.shape[0]
  flat = _ids.in_range(indices.reshape(-1), rows)
  values = table.at[flat].get(mode="fill", fill_value=jnp.nan)
  if lazy:
    buffer = _load(state.momentum)
    values, _ = _lazy_rows.catch_up(
      state.coefficients,
      state.last.at[flat].get(mode="fill", fill_value=0),
      values,
      None if buffer is None else buffer.at[flat].get(mode="fill", fill_value=0),
    )
  return values.reshape(*indices.shape, *table.shape[1:])


def _lookup(
  lazy: bool,
  expected_state: Callable[[tuple[int, ...], Any], Any],
  indices: jax.Array,
  state: optax.OptState,
  table: jax.Array,
) -> jax.Array:
  """``lookup``: the arguments checked, then :func:`_lookup_rows`."""
  _check_table(table)
  _ids.check_ids(indices, table.shape[0], "indices")
  _check_state(expected_state, state, table)
  return _lookup_rows(lazy, jnp.asarray(indices), state, table)


@jax.jit
def _sync_all(
  state: SparseRowsState, table: jax.Array
) -> tuple[jax.Array, SparseRowsState]:
  """Every row caught up to ``state.count``."""
  table, buffer = _lazy_rows.catch_up(
    state.coefficients, state.last, table, _load(state.momentum)
  )
  last = jnp.full_like(state.last, state.count)
  return table, state._replace(momentum=_store(buffer), last=last)


def _sync(
  lazy: bool,
  expected_state: Callable[[tuple[int, ...], Any], Any],
  state: optax.OptState,
  table: jax.Array,
) -> tuple[jax.Array, optax.OptState]:
  """``sync``: the arguments checked, then :func:`_sync_all` if lazy."""
  _check_table(table)
  _check_state(expected_state, state, table)
  if not lazy:
    return table, state  # Every row is current.
  return _sync_all(state, table)


def sparse_rows(
  learning_rate: optax.ScalarOrSchedule,
  momentum: Any = 0.0,
  beta: Any = 0.0,
  eps: Any = 1e-8,
  weight_decay: Any = 0.0,
  *,
  sweep_period: int = _DEFAULT_SWEEP_PERIOD,
) -> SparseRows:
  r"""SM3 for an embedding table, updating only the rows in the batch.

  ``update(indices, row_grads, state, table)`` followed by ``sync`` returns
  exactly (to float rounding) what

  .. code-block:: python

    opt = optax_sm3.sm3(learning_rate, momentum, beta, eps,
                        weight_decay=weight_decay)
    grad = jnp.zeros_like(table).at[indices].add(row_grads)
    updates, state = opt.update(grad, state, table)
    table = optax.apply_updates(table, updates)

  returns. For a table of shape :math:`(V, D_1, \dots)` with row
  accumulators :math:`r` and per-axis accumulators :math:`c^{(a)}`, a batch
  of distinct rows :math:`B` (repeated indices are summed first) and
  :math:`(c_{old}, c_{new}) = (1, 1)` for :math:`\beta = 0`, else
  :math:`(\beta, 1 - \beta)`:

  .. math::

    \nu_{ij} &= c_{old} \min(r_i, c^{(1)}_{j_1}, \dots) + c_{new} g_{ij}^2,
      \quad i \in B \\
    r_i &\leftarrow \max_j \nu_{ij} \quad (i \in B), \qquad
    r_i \leftarrow c_{old}\, r_i \quad (i \notin B) \\
    c^{(a)}_j &\leftarrow \max\Big(\max_{i \in B,\, j_a = j} \nu_{ij},\;
      c_{old}\, c^{(a)}_j\Big)

  (the dense SM3-II step, rewritten with :math:`\max_i r_i = \max_j
  c^{(a)}_j`, which every SM3-II step maintains, and :math:`\nu_{ij} \ge
  c_{old} \min(r_i, c^{(1)}_{j_1}, \dots)`); the rows in :math:`B`
  then take the rest of :func:`optax_sm3.sm3`'s chain with
  :math:`u_{ij} = g_{ij} / \sqrt{\nu_{ij} + \epsilon}`:

  .. math::

    m_i \leftarrow \mu m_i + (1 - \mu) u_i, \qquad
    p_i \leftarrow p_i - \eta_t (m_i + \lambda p_i).

  **Without momentum and weight decay** (the defaults) rows outside
  :math:`B` do not move, the step costs :math:`O(k D)` for :math:`k`
  indices of rows of :math:`D` entries with ``beta = 0``, :math:`O(k D +
  V)` with ``beta > 0`` (against :math:`O(V D)` for the dense path), it matches the dense step bit for bit in practice, and
  ``init(table)`` equals ``opt.init(table)``: states pass between the two
  paths.

  **With momentum or decoupled weight decay** every row moves each step,
  but a row outside :math:`B` only by :math:`m \leftarrow \mu m,\ p
  \leftarrow p - \eta_s (m + \lambda p)`, which composes over steps
  :math:`a+1..n` into :math:`m_n = M m_a,\ p_n = D p_a - E m_a` with
  scalars :math:`M = \mu^{n-a}`, :math:`D = \prod_s (1 - \eta_s \lambda)`
  and :math:`E` that depend only on :math:`(a, n)` and the learning rates.
  So rows are updated lazily: each row remembers the step ``last`` it is
  current at, a ring of ``sweep_period + 1`` sets of these coefficients
  (one per recent step, :math:`O(W)` to advance) brings any row up
  to date, rows in the batch are brought up to date before their step, and
  each step also brings one block of :math:`\lceil V / W \rceil` rows up to
  date, round robin (:math:`W` = ``sweep_period``), so that no row is ever
  more than :math:`W` steps behind. Cost per step: :math:`O(k D + V +
  V D / W + W)`, the same every step (no branch, no spikes). The state is
  then a :class:`SparseRowsState`, not the dense one; the table's rows are
  stored behind, so read them through ``lookup`` (:math:`O(k D)`) or
  ``sync`` (:math:`O(V D)`, for evaluation and checkpoints). Rows read
  through either equal the dense path's up to float32 rounding: the
  catch-up rounds differently from the dense path's step-by-step
  arithmetic, and the two agree to ``1e-6`` of the table's largest entry
  over 200 steps and to ``3e-6`` over 1,200 steps with gaps of over 1,000
  steps (both paths' float32 errors grow with the steps). Rows in every
  batch are never behind and take the dense arithmetic itself. A 16-bit table rounds a caught-up
  row once where the dense path rounds every step, so the two agree only
  to 16-bit rounding.

  Weight decay here is the decoupled kind (``sm3``'s default
  ``weight_decay_mode="decoupled"``): coupled (L2) decay would give every row
  a gradient, and has no sparse form. Only SM3-II with the default per-axis
  cover (the :func:`optax_sm3.sm3` defaults) is supported.

  Args:
    learning_rate: a non-negative float or an optax schedule of the step
      count (the first update uses ``learning_rate(0)``, as optax).
    momentum: :math:`\mu` in ``[0, 1)`` (EMA momentum, as
      :func:`optax_sm3.sm3`); ``0`` (default) keeps no buffer.
    beta: second-moment decay in ``[0, 1)``; ``0`` sums squared gradients.
    eps: ``>= 0``, added under the square root.
    weight_decay: decoupled weight decay :math:`\lambda \ge 0`.
    sweep_period: :math:`W \ge 1`, the most steps a row may stay behind
      (used only with momentum or weight decay). Larger means a smaller
      sweep per step (:math:`\lceil V / W \rceil` rows) and a longer ring
      (:math:`4 (W + 1)` numbers). The default, 1024, sweeps 1024 rows a
      step at a million rows.

  Returns:
    A :class:`SparseRows` ``(init, update, lookup, sync)``. ``update`` is
    jit-friendly: shapes are static for a fixed ``k``, and the table and the
    state may be donated (``jax.jit(update, donate_argnums=(2, 3))``).
    Indices outside ``[0, V)`` raise a ``ValueError`` when they are concrete;
    under ``jit`` ``update`` ignores them (as JAX's scatters drop them) and
    ``lookup`` returns NaN rows for them (as JAX's gathers fill them).

  Raises:
    ValueError: for arguments out of range (as :func:`optax_sm3.sm3`), a
      ``sweep_period`` below 1; at ``update``, ``lookup`` and ``sync``, for
      mismatched shapes, a state made for a table of another shape or by
      other arguments, or out-of-range concrete indices.
    TypeError: for non-integer ``indices`` or a non-floating ``table``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_sm3
    >>> opt = optax_sm3.sparse_rows(learning_rate=0.1)
    >>> table = jnp.ones((1000, 4))
    >>> state = opt.init(table)
    >>> indices = jnp.array([3, 7, 3])  # row 3 twice: its gradients add up
    >>> row_grads = jnp.array([[1.0], [3.0], [1.0]]) * jnp.ones((3, 4))
    >>> # Rows 3 and 7 move like AdaGrad; row 0, not in the batch, stays put.
    >>> for step in range(3):
    ...   table, state = opt.update(indices, row_grads, state, table)
    ...   print(f"{table[3, 0]:.4f} {table[7, 0]:.4f} {table[0, 0]:.4f}")
    0.9000 0.9000 1.0000
    0.8293 0.8293 1.0000
    0.7716 0.7716 1.0000

    With weight decay every row shrinks; ``lookup`` and ``sync`` show it,
    though row 0 was never in a batch:

    >>> opt = optax_sm3.sparse_rows(0.1, momentum=0.9, weight_decay=0.5)
    >>> table = jnp.ones((1000, 4))
    >>> state = opt.init(table)
    >>> for step in range(3):
    ...   table, state = opt.update(indices, row_grads, state, table)
    ...   rows = opt.lookup(jnp.array([3, 0]), state, table)
    ...   print(f"{rows[0, 0]:.4f} {rows[1, 0]:.4f}")
    0.9400 0.9500
    0.8769 0.9025
    0.8128 0.8574
    >>> print(f"{table[0, 0]:.4f}")  # stored behind: read it through lookup
    1.0000
    >>> table, state = opt.sync(state, table)
    >>> print(f"{table[0, 0]:.4f}")
    0.8574

  References:
    Anil et al., `Memory-Efficient Adaptive Optimization
    <https://arxiv.org/abs/1901.11150>`_, 2019
  """
  # sm3 checks every argument (and names it in its errors).
  dense = _sm3.sm3(learning_rate, momentum, beta, eps, weight_decay=weight_decay)
  period = _check_sweep_period(sweep_period)
  has_momentum = not _validation.is_static_zero(momentum)
  has_decay = not _validation.is_static_zero(weight_decay)
  config = _Config(
    learning_rate,
    momentum,
    beta,
    eps,
    weight_decay,
    period,
    dense,
    # The stages after scale_by_sm3 in sm3's chain, built the same way.
    momentum_tx=_momentum.scale_by_momentum(momentum) if has_momentum else None,
    decay_tx=optax.add_decayed_weights(weight_decay) if has_decay else None,
    rate_tx=optax.scale_by_learning_rate(learning_rate),
  )
  init = functools.partial(_init, config)
  expected_state = functools.cache(functools.partial(_expected_state, init))
  step = jax.jit(
    functools.partial(_lazy_step if config.lazy else _dense_layout_step, config)
  )
  return SparseRows(
    init=init,
    update=functools.partial(_update, step, expected_state),
    lookup=functools.partial(_lookup, config.lazy, expected_state),
    sync=functools.partial(_sync, config.lazy, expected_state),
  )
