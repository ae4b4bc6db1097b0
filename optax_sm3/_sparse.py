"""Exact SM3 updates of an embedding table that touch only the batch's rows.

The gradient of ``table[ids]`` is a table-sized array that is zero outside
the ``k`` rows in the batch, so the dense optimizer spends ``O(V * D)`` per
step on a table of ``V`` rows. For SM3-II with the per-axis cover the step
can be taken exactly in ``O(k * D + V)``:

* every accumulator is a maximum of the same ``nu``, so after each step
  ``max_i r_i = max_j c_j`` (row accumulators ``r``, column accumulators
  ``c``); hence for a row ``i`` outside the batch,
  ``max_j min(r_i, c_j) = r_i``: its accumulator is unchanged (scaled by
  ``beta`` for ``beta > 0``), and its update is zero;
* a column accumulator becomes the larger of the maximum of ``nu`` over the
  batch's rows and ``beta * min(R, c_j)`` (``1 * ...`` for ``beta = 0``),
  with ``R`` the largest accumulator of the rows outside the batch.

Both identities hold in floating point bit for bit (minimum and maximum are
exact, and rounding a product by a non-negative constant is monotone), so
the result is the dense one, not an approximation of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_sm3 import (
  _accumulate,
  _cover,
  _momentum,
  _scale_by_sm3,
  _sm3,
  _validation,
  _weight_decay,
)

_safe_increment = getattr(optax, "safe_increment", None) or optax.safe_int32_increment


class SparseRows(NamedTuple):
  """The pair of functions returned by :func:`sparse_rows`.

  Attributes:
    init: ``init(table) -> state``; the state of
      ``optax_sm3.sm3(...).init(table)`` (an :func:`optax.chain` state).
    update: ``update(indices, row_grads, state, table) -> (new_table,
      new_state)``; ``indices`` has shape ``(k,)`` (repeats allowed),
      ``row_grads`` shape ``(k, *table.shape[1:])``.
    lookup: ``lookup(indices, state, table) -> rows``: the rows
      ``table[indices]`` as the dense optimizer would hold them now. Read
      rows through it, never by indexing ``table`` directly.
    sync: ``sync(state, table) -> (table, state)``: the whole table as the
      dense optimizer would hold it now (for evaluation and checkpoints).
  """

  init: Callable[[jax.Array], optax.OptState]
  update: Callable[
    [jax.Array, jax.Array, optax.OptState, jax.Array],
    tuple[jax.Array, optax.OptState],
  ]
  lookup: Callable[[jax.Array, optax.OptState, jax.Array], jax.Array]
  sync: Callable[[optax.OptState, jax.Array], tuple[jax.Array, optax.OptState]]


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
  if not jnp.issubdtype(jnp.asarray(indices).dtype, jnp.integer):
    raise TypeError(
      f"`indices` must be integers, got dtype {jnp.asarray(indices).dtype}"
    )
  if jnp.ndim(indices) != 1 or jnp.shape(indices)[0] < 1:
    raise ValueError(
      f"`indices` must have shape (k,) with k >= 1, got {jnp.shape(indices)}"
    )
  expected = (jnp.shape(indices)[0], *table.shape[1:])
  if tuple(jnp.shape(row_grads)) != expected:
    raise ValueError(
      f"`row_grads` must have shape (k, *table.shape[1:]) = {expected}, got "
      f"{tuple(jnp.shape(row_grads))}"
    )
  if not isinstance(indices, jax.core.Tracer):
    values = np.asarray(indices)
    rows = table.shape[0]
    if values.min() < 0 or values.max() >= rows:
      raise ValueError(
        f"`indices` must be in [0, {rows}) for a table of {rows} rows, got "
        f"values in [{values.min()}, {values.max()}]"
      )


def _sm3_rows(
  indices: jax.Array,
  row_grads: jax.Array,
  accumulators: tuple[jax.Array, ...],
  beta: Any,
  eps: Any,
) -> tuple[jax.Array, jax.Array, tuple[jax.Array, ...]]:
  """SM3-II on the batch's rows: ``(unique rows, their updates, new covers)``.

  ``indices`` must already be in ``[0, V)``. The ``k`` slots of the result
  hold the distinct rows in increasing order, then padding rows numbered
  ``V`` (out of range, so gathers fill and scatters drop them).
  """
  rows = accumulators[0].shape[0]
  k = indices.shape[0]
  dtype = accumulators[0].dtype
  c_old, c_new = _scale_by_sm3._coefficients(beta, dtype)
  # A fixed number k of slots keeps every shape static under jit.
  unique, inverse = jnp.unique(indices, size=k, fill_value=rows, return_inverse=True)
  inverse = inverse.reshape(k)
  grads = jax.ops.segment_sum(row_grads, inverse, num_segments=k)
  valid = unique < rows
  row_acc = accumulators[0].at[unique].get(mode="fill", fill_value=0)

  # The same cover as the dense parameter, on a table of k rows.
  cover = _cover.make_cover(grads.shape)
  local = (row_acc, *accumulators[1:])
  shapes = [cover.broadcast_shape(group) for group in cover.groups]
  nu = _accumulate.estimate(grads, local, shapes, c_old, c_new)
  updates = _accumulate.scaled_update(grads, nu, eps)

  mask_shape = (k,) + (1,) * (grads.ndim - 1)
  # Non-finite gradient entries count as 0 in the accumulators, as in the
  # dense path (see _accumulate.finite_or_zero).
  nu_acc = _accumulate.estimate(
    _accumulate.finite_or_zero(grads), local, shapes, c_old, c_new
  )
  nu_valid = jnp.where(valid.reshape(mask_shape), nu_acc, -jnp.inf)
  # Rows outside the batch see a zero gradient: their accumulator is
  # c_old * max_j min(r_i, c_j) = c_old * r_i, as max_j c_j = max_i r_i >= r_i.
  new_rows = jnp.max(nu_valid, axis=cover.reduced_axes(cover.groups[0]))
  new = [(c_old * accumulators[0]).at[unique].set(new_rows, mode="drop")]
  if len(accumulators) > 1:
    touched = jnp.zeros([rows], bool).at[unique].set(True, mode="drop")
    # The largest row accumulator outside the batch (-inf if there is none).
    rest = jnp.max(jnp.where(touched, -jnp.inf, accumulators[0]))
    for group, column in zip(cover.groups[1:], accumulators[1:], strict=True):
      in_batch = jnp.max(nu_valid, axis=cover.reduced_axes(group))
      # Over the rows outside the batch, the maximum of c_old * min(r_i, c_j,
      # other covers) is c_old * min(rest, c_j): every other cover's maximum
      # is >= every r_i. (Rounding is monotone: c_old commutes with max.)
      new.append(jnp.maximum(in_batch, c_old * jnp.minimum(rest, column)))
  return unique, updates, tuple(new)


def sparse_rows(
  learning_rate: optax.ScalarOrSchedule,
  momentum: Any = 0.0,
  beta: Any = 0.0,
  eps: Any = 1e-8,
  weight_decay: Any = 0.0,
) -> SparseRows:
  r"""SM3 for an embedding table, updating only the rows in the batch.

  ``update(indices, row_grads, state, table)`` returns exactly (to float
  rounding; in practice bit for bit) what

  .. code-block:: python

    opt = optax_sm3.sm3(learning_rate, momentum, beta, eps,
                        weight_decay=weight_decay)
    grad = jnp.zeros_like(table).at[indices].add(row_grads)
    updates, state = opt.update(grad, state, table)
    table = optax.apply_updates(table, updates)

  returns, and ``init(table)`` equals ``opt.init(table)``: states can be
  passed between the two paths. For a table of shape :math:`(V, D_1, \dots)`
  with row accumulators :math:`r` and per-axis accumulators :math:`c^{(a)}`,
  a batch of distinct rows :math:`B` (repeated indices are summed first) and
  :math:`(c_{old}, c_{new}) = (1, 1)` for :math:`\beta = 0`, else
  :math:`(\beta, 1 - \beta)`:

  .. math::

    \nu_{ij} &= c_{old} \min(r_i, c^{(1)}_{j_1}, \dots) + c_{new} g_{ij}^2,
      \quad i \in B \\
    r_i &\leftarrow \max_j \nu_{ij} \quad (i \in B), \qquad
    r_i \leftarrow c_{old}\, r_i \quad (i \notin B) \\
    c^{(a)}_j &\leftarrow \max\Big(\max_{i \in B,\, j_a = j} \nu_{ij},\;
      c_{old} \min\big(\max_{i \notin B} r_i,\; c^{(a)}_j\big)\Big)

  (the dense SM3-II step, rewritten with :math:`\max_i r_i = \max_j
  c^{(a)}_j`, which every SM3-II step maintains), and the rows in :math:`B`
  move by :math:`-\eta\, g_{ij} / \sqrt{\nu_{ij} + \epsilon}`. Cost:
  :math:`O(k D + V)` for :math:`k` indices of rows of :math:`D` entries,
  against :math:`O(V D)` for the dense path.

  Momentum and weight decay are exact too, but they move *every* row (the
  buffer decays, :math:`m \leftarrow \mu m`, and decoupled weight decay
  shrinks every row), so with ``momentum > 0`` or ``weight_decay > 0`` the
  step adds one fused elementwise pass over the table and the momentum
  buffer: :math:`O(V D)`, though still without the dense path's reductions.
  Leave both at 0 for the :math:`O(k D + V)` step.

  Only SM3-II with the default per-axis cover (the :func:`optax_sm3.sm3`
  defaults) is supported. The state must come from ``init`` and this
  function or ``optax_sm3.sm3`` with the same arguments.

  Args:
    learning_rate: a non-negative float or an optax schedule of the step
      count.
    momentum: :math:`\mu` in ``[0, 1)`` (EMA momentum, as
      :func:`optax_sm3.sm3`); ``0`` (default) keeps no buffer.
    beta: second-moment decay in ``[0, 1)``; ``0`` sums squared gradients.
    eps: ``>= 0``, added under the square root.
    weight_decay: decoupled weight decay :math:`\lambda \ge 0`.

  Returns:
    A :class:`SparseRows` ``(init, update)``. ``update`` is jit-friendly:
    shapes are static for a fixed ``k``, the table and the state may be
    donated (``jax.jit(update, donate_argnums=(2, 3))``). Indices outside
    ``[0, V)`` raise a ``ValueError`` when they are concrete and are ignored
    under ``jit``.

  Raises:
    ValueError: for arguments out of range (as :func:`optax_sm3.sm3`), and at
      ``update`` for mismatched shapes or out-of-range concrete indices.
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

  References:
    Anil et al., `Memory-Efficient Adaptive Optimization
    <https://arxiv.org/abs/1901.11150>`_, 2019
  """
  # sm3 checks every argument (and names it in its errors).
  dense = _sm3.sm3(learning_rate, momentum, beta, eps, weight_decay=weight_decay)
  # The stages after scale_by_sm3 in sm3's chain, built the same way.
  has_momentum = not _validation.is_static_zero(momentum)
  has_decay = not _validation.is_static_zero(weight_decay)
  tail = optax.chain(
    _momentum.scale_by_momentum(momentum),
    _weight_decay.add_decayed_weights(weight_decay),
    optax.scale_by_learning_rate(learning_rate),
  )
  every_row = has_momentum or has_decay

  def init_fn(table):
    _check_table(table)
    return dense.init(table)

  @jax.jit
  def step(indices, row_grads, state, table):
    sm3_state, tail_state = state[0], tuple(state[1:])
    rows = table.shape[0]
    indices = indices.astype(jnp.int32)
    # Out-of-range rows (possible only under jit) are dropped, like JAX's
    # scatters do.
    indices = jnp.where((indices >= 0) & (indices < rows), indices, rows)
    row_grads = row_grads.astype(table.dtype)
    unique, updates, new_acc = _sm3_rows(
      indices, row_grads, tuple(sm3_state.accumulators), beta, eps
    )
    new_sm3 = _scale_by_sm3.ScaleBySM3State(_safe_increment(sm3_state.count), new_acc)
    if every_row:
      # Momentum decays and weight decay shrinks every row: one dense pass.
      dense_updates = jnp.zeros_like(table).at[unique].set(updates, mode="drop")
      dense_updates, tail_state = tail.update(dense_updates, tail_state, table)
      new_table = optax.apply_updates(table, dense_updates)
    else:
      old = table.at[unique].get(mode="fill", fill_value=0)
      updates, tail_state = tail.update(updates, tail_state, old)
      new = optax.apply_updates(old, updates)
      new_table = table.at[unique].set(new, mode="drop")
    return new_table, (new_sm3, *tail_state)

  def update_fn(indices, row_grads, state, table):
    _check_table(table)
    _check_batch(indices, row_grads, table)
    accumulators = state[0].accumulators
    if len(accumulators) != table.ndim:
      raise ValueError(
        f"`state` does not belong to a table of shape {table.shape}: "
        f"{len(accumulators)} accumulators"
      )
    return step(jnp.asarray(indices), jnp.asarray(row_grads), state, table)

  def lookup_fn(indices, state, table):
    del state  # Every row is kept current (see above).
    return jnp.take(jnp.asarray(table), jnp.asarray(indices), axis=0)

  def sync_fn(state, table):
    return table, state

  return SparseRows(init_fn, update_fn, lookup_fn, sync_fn)
