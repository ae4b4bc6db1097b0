"""Exact SM3 updates of an embedding table that touch only the batch's rows.

The gradient of ``table[ids]`` is zero outside the ``k`` rows in the batch,
so the dense optimizer spends ``O(V * D)`` per step on a table of ``V`` rows
where :func:`sparse_rows` spends ``O(k * D + V)``. The step is derived from
the optimizer the user built for the dense path: each table's rule
(:mod:`optax_sm3._sparse._table_rule`), stepped by
:mod:`optax_sm3._sparse._row_step`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_sm3._sparse import _batch, _ids, _row_step, _table_rule
from optax_sm3._sparse._row_step import SparseRowsState

__all__ = ["SparseRows", "SparseRowsState", "sparse_rows"]


class SparseRows(NamedTuple):
  """The functions returned by :func:`sparse_rows`.

  Attributes:
    init: ``init(table) -> state``. Without momentum and weight decay the
      state of ``optimizer.init(table)`` (an :func:`optax.chain` state);
      otherwise a :class:`SparseRowsState`.
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


def check_table(table: Any, name: str = "table") -> None:
  """Raises unless ``table`` is a floating array of rank >= 1."""
  if not hasattr(table, "shape") or not hasattr(table, "dtype"):
    raise TypeError(f"`{name}` must be an array, got {type(table).__name__}")
  if len(table.shape) < 1:
    raise ValueError(
      f"`{name}` must have rank >= 1 (rows first), got shape {table.shape}"
    )
  if not jnp.issubdtype(table.dtype, jnp.floating):
    raise TypeError(f"`{name}` must have a real floating dtype, got {table.dtype}")


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


def _table_shape(accumulators: Any, cover: Any) -> tuple[int, ...] | None:
  """The table shape a state's accumulators were made for, if readable."""
  if not isinstance(accumulators, tuple) or len(accumulators) != len(cover.groups):
    return None
  shape: dict[int, int] = {}
  for a, group in zip(accumulators, cover.groups, strict=True):
    axes = tuple(range(cover.stacked)) + tuple(group)
    if np.ndim(a) != len(axes):
      return None
    for axis, size in zip(axes, np.shape(a), strict=True):
      shape[axis] = size
  if sorted(shape) != list(range(len(cover.shape))):
    return None
  return tuple(shape[a] for a in range(len(cover.shape)))


def _update_rows(
  rule: _table_rule.TableRule,
  indices: jax.Array,
  row_grads: jax.Array,
  state: optax.OptState,
  table: jax.Array,
) -> tuple[jax.Array, optax.OptState]:
  """The step of one table from its looked-up rows (clipped on their own)."""
  batch = _batch.rows_of(indices, row_grads, table)
  batch = batch._replace(grads=_table_rule.clip(rule.spec, batch.grads))
  return _row_step.step(rule, batch, state, table)


class Table:
  """One table's rule and its jitted functions (made once per rule).

  Compared and hashed by identity (the rule may hold arrays), so that it
  can sit in a Flax module's static attributes.

  Attributes:
    rule: the table's :class:`optax_sm3._sparse._table_rule.TableRule`.
    init: ``init(table) -> state``.
    step: ``step(batch, state, table) -> (table, state)`` from a clipped
      :class:`optax_sm3._sparse._batch.RowBatch`.
    update: ``update(indices, row_grads, state, table)``, the table clipped
      on its own.
    lookup: ``lookup(indices, state, table) -> rows`` (current rows).
    sync: ``sync(state, table) -> (table, state)``.
    expected_state: ``expected_state(shape, dtype)``: ``init``'s shapes.
  """

  __slots__ = ("expected_state", "init", "lookup", "rule", "step", "sync", "update")

  def __init__(self, rule: _table_rule.TableRule):
    self.rule = rule
    self.init = functools.partial(_row_step.init, rule)
    self.step = jax.jit(functools.partial(_row_step.step, rule))
    self.update = jax.jit(functools.partial(_update_rows, rule))
    self.lookup = jax.jit(functools.partial(_row_step.lookup, rule))
    self.sync = jax.jit(functools.partial(_row_step.sync, rule))
    self.expected_state = functools.cache(
      functools.partial(_row_step.expected_state, self.init)
    )


def check_state(table_fns: Table, state: Any, table: jax.Array) -> None:
  """Raises ``ValueError`` unless ``state`` is the table's ``init`` state."""
  accumulators = (
    state.accumulators
    if isinstance(state, SparseRowsState)
    else getattr(_row_step.sm3_state(state), "accumulators", None)
  )
  cover = _table_rule.cover_of(table_fns.rule, tuple(table.shape))
  shape = _table_shape(accumulators, cover)
  if shape is not None and shape != tuple(table.shape):
    raise ValueError(
      f"`state` was made for a table of shape {shape}, but `table` has shape "
      f"{tuple(table.shape)}; a table that changed shape needs a new state "
      "(`init`)"
    )
  expected = table_fns.expected_state(tuple(table.shape), jnp.dtype(table.dtype))
  leaves, treedef = jax.tree.flatten(state)
  if treedef != jax.tree.structure(expected) or any(
    (np.shape(a), jnp.result_type(a)) != (b.shape, b.dtype)
    for a, b in zip(leaves, jax.tree.leaves(expected), strict=True)
  ):
    raise ValueError(
      f"`state` does not belong to a table of shape {tuple(table.shape)} and "
      f"dtype {table.dtype} with this optimizer: expected "
      f"{jax.tree.map(lambda x: (x.shape, str(x.dtype)), expected)}, got "
      f"{jax.tree.map(lambda x: (np.shape(x), str(jnp.result_type(x))), state)}"
    )


class Rules:
  """The tables' rules of one optimizer, made once per resolved option."""

  def __init__(self, optimizer: Any, sweep_period: Any, name: str = "optimizer"):
    self.spec = _table_rule.optimizer_spec(optimizer, name)
    self.period = _table_rule.check_sweep_period(sweep_period)
    self._made: dict[tuple[int, bool], Table] = {}

  def of_tree(self, tree: Any, positions: list[int]) -> list[Table]:
    """The functions of the tables at ``positions`` of ``tree``'s leaves."""
    rules = _table_rule.table_rules(self.spec, tree, positions, self.period)
    out = []
    for rule in rules:
      key = (rule.spec.stacked_axes, rule.decays)
      if key not in self._made:
        self._made[key] = Table(rule)
      out.append(self._made[key])
    return out

  def of_table(self, table: Any) -> Table:
    """The functions of ``table`` trained alone."""
    check_table(table)
    return self.of_tree(table, [0])[0]


def _init(rules: Rules, table: jax.Array) -> optax.OptState:
  return rules.of_table(table).init(table)


def _update(
  rules: Rules,
  indices: jax.Array,
  row_grads: jax.Array,
  state: optax.OptState,
  table: jax.Array,
) -> tuple[jax.Array, optax.OptState]:
  """``update``: the arguments checked, then the jitted step."""
  fns = rules.of_table(table)
  _check_batch(indices, row_grads, table)
  check_state(fns, state, table)
  indices, row_grads = jnp.asarray(indices), jnp.asarray(row_grads)
  return fns.update(indices, row_grads, state, table)


def _lookup(
  rules: Rules, indices: jax.Array, state: optax.OptState, table: jax.Array
) -> jax.Array:
  """``lookup``: the arguments checked, then the jitted read."""
  fns = rules.of_table(table)
  _ids.check_ids(indices, table.shape[0], "indices")
  check_state(fns, state, table)
  return fns.lookup(jnp.asarray(indices), state, table)


def _sync(
  rules: Rules, state: optax.OptState, table: jax.Array
) -> tuple[jax.Array, optax.OptState]:
  """``sync``: the arguments checked, then every row caught up if lazy."""
  fns = rules.of_table(table)
  check_state(fns, state, table)
  if not fns.rule.lazy:
    return table, state  # Every row is current.
  return fns.sync(state, table)


def sparse_rows(
  optimizer: optax.GradientTransformation,
  *,
  sweep_period: int | None = None,
) -> SparseRows:
  r"""``optimizer`` for an embedding table, updating only the rows in the batch.

  ``optimizer`` is the one built for the dense path,
  :func:`optax_sm3.sm3` or :func:`optax_sm3.sm3_recipe` with any of their
  options; the row-sparse step is derived from it. ``update(indices,
  row_grads, state, table)`` followed by ``sync`` returns exactly (to float
  rounding) what

  .. code-block:: python

    grad = jnp.zeros_like(table).at[indices].add(row_grads)
    updates, state = optimizer.update(grad, state, table)
    table = optax.apply_updates(table, updates)

  returns. The batch's distinct rows :math:`B` (repeated indices are summed
  first) take the optimizer's own stages: clipping (a global norm over the
  rows is the table gradient's norm, as the other rows are zero), SM3 on
  the rows, momentum, decoupled weight decay and the learning rate. For a
  table of shape :math:`(V, D_1, \dots)` with row accumulators :math:`r`
  and per-axis accumulators :math:`c^{(a)}` and :math:`(c_{old}, c_{new}) =
  (1, 1)` for :math:`\beta = 0`, else :math:`(\beta, 1 - \beta)`, SM3-II
  is

  .. math::

    \nu_{ij} &= c_{old} \min(r_i, c^{(1)}_{j_1}, \dots) + c_{new} g_{ij}^2,
      \quad i \in B \\
    r_i &\leftarrow \max_j \nu_{ij} \quad (i \in B), \qquad
    r_i \leftarrow c_{old}\, r_i \quad (i \notin B) \\
    c^{(a)}_j &\leftarrow \max\Big(\max_{i \in B,\, j_a = j} \nu_{ij},\;
      c_{old}\, c^{(a)}_j\Big)

  (the dense step, rewritten with :math:`\max_i r_i = \max_j c^{(a)}_j`,
  which every SM3 step maintains; the same identity gives every cover
  :func:`optax_sm3.scale_by_sm3` can choose, SM3-I, a ``beta`` schedule and
  bias correction), then the rest of the chain on the rows of :math:`B`
  with :math:`u_{ij} = g_{ij} / \sqrt{\nu_{ij} + \epsilon}`:

  .. math::

    m_i \leftarrow \mu m_i + (1 - \mu) u_i, \qquad
    p_i \leftarrow p_i - \eta_t (m_i + \lambda p_i).

  **Without momentum, weight decay and** ``beta`` (the paper's SM3:
  ``sm3(learning_rate, momentum=0.0)``) rows outside :math:`B` do not
  move, the step costs :math:`O(k D)` for :math:`k` indices of rows of
  :math:`D` entries (against :math:`O(V D)` for the dense path), it
  matches the dense step bit for bit in practice, and ``init(table)``
  equals ``optimizer.init(table)``: states pass between the two paths.

  **With momentum, decoupled weight decay or** ``beta > 0`` (which
  ``sm3_recipe`` has) every row moves each step, but a row outside
  :math:`B` only by :math:`r \leftarrow c_{old}\, r,\ m \leftarrow \mu
  m,\ p \leftarrow p - \eta_s (m + \lambda p)`, which composes over steps
  :math:`a+1..n` into :math:`r_n = C r_a,\ m_n = M m_a,\ p_n = D p_a - E
  m_a` with scalars :math:`C = \prod_s c_{old}`, :math:`M = \mu^{n-a}`,
  :math:`D = \prod_s (1 - \eta_s \lambda)` and :math:`E` that depend only
  on :math:`(a, n)`, the learning rates and the ``beta`` schedule (Nesterov
  momentum changes :math:`E` only). So rows are updated lazily: each row
  remembers the step ``last`` it is current at, a ring of these maps (one
  per recent step, in two levels: :math:`O(\sqrt W)` to advance) brings
  any row up to date, rows in the batch are brought up to date before
  their step, and each step also brings one block of :math:`\lceil V / W
  \rceil` rows up to date, round robin (:math:`W` = ``sweep_period``), so
  that no row is ever more than :math:`W` steps behind. By default
  :math:`W` grows with the table, so that block is at most 256 rows: the
  work per step, :math:`O(k D + \lceil V / W \rceil D + \sqrt W)`, does
  not grow with :math:`V` (no pass over the rows, the same every step: no
  branch, no spikes; reading rows at random from a bigger table still
  costs more cache misses, which the performance guide measures). The state is then a :class:`SparseRowsState`, not
  the dense one; the table's rows (with momentum or weight decay) and the
  rows' accumulators are stored behind, so read rows through ``lookup``
  (:math:`O(k D)`) or ``sync`` (:math:`O(V D)`, for evaluation and
  checkpoints; it makes the state current too). Rows read through
  either equal the dense path's up to float32 rounding: the catch-up rounds
  differently from the dense path's step-by-step arithmetic, and the two
  agree to ``1e-6`` of the table's largest entry over 200 steps and to
  ``3e-6`` over 1,200 steps with gaps of over 1,000 steps (both paths'
  float32 errors grow with the steps). Rows in every batch are never behind
  and take the dense arithmetic itself. A 16-bit table (or momentum
  buffer, ``mu_dtype``) rounds a caught-up row once where the dense path
  rounds every step, so the two agree only to 16-bit rounding.

  A ``weight_decay_mask`` and per-parameter ``stacked_axes`` are resolved
  against the table, as the dense optimizer resolves them against its
  parameters; a table the mask leaves out does not decay (and its state is
  then that of the optimizer with no weight decay).

  Args:
    optimizer: an optimizer made by :func:`optax_sm3.sm3` or
      :func:`optax_sm3.sm3_recipe`.
    sweep_period: :math:`W \ge 1`, the most steps a row may stay behind
      (used only with momentum, weight decay or ``beta > 0``). Larger
      means a smaller sweep per step (:math:`\lceil V / W \rceil` rows) and
      a longer ring (about :math:`5 (W + 3 \sqrt W)` numbers, replicated
      on every device). ``None`` (the default): :math:`\max(1024, \lceil V
      / 256 \rceil)`, at most 256 rows a step whatever :math:`V`; a
      ring of 1.3 MB at :math:`V = 2^{24}`, 78 MB at :math:`10^9`.

  Returns:
    A :class:`SparseRows` ``(init, update, lookup, sync)``. ``update`` is
    jit-friendly: shapes are static for a fixed ``k``, and the table and the
    state may be donated (``jax.jit(update, donate_argnums=(2, 3))``).
    Indices outside ``[0, V)`` raise a ``ValueError`` when they are concrete;
    under ``jit`` ``update`` ignores them (as JAX's scatters drop them) and
    ``lookup`` returns NaN rows for them (as JAX's gathers fill them).

  Raises:
    TypeError: for an ``optimizer`` not made by ``sm3`` or ``sm3_recipe``
      (a learning rate, as ``sparse_rows`` took before, included: the
      message shows the new call); at ``update``, for non-integer
      ``indices`` or a non-floating ``table``.
    ValueError: for coupled weight decay (``weight_decay_mode="coupled"``
      gives every row a gradient: no row-sparse form), a ``sweep_period``
      below 1; at ``update``, ``lookup`` and ``sync``, for mismatched
      shapes, a state made for a table of another shape or by another
      optimizer, or out-of-range concrete indices.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_sm3
    >>> opt = optax_sm3.sparse_rows(optax_sm3.sm3(0.1, momentum=0.0))
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

    >>> opt = optax_sm3.sparse_rows(optax_sm3.sm3(0.1, 0.9, weight_decay=0.5))
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

    The recipe, as the dense path takes it:

    >>> opt = optax_sm3.sparse_rows(optax_sm3.sm3_recipe(1e-2, total_steps=100))

  References:
    Anil et al., `Memory-Efficient Adaptive Optimization
    <https://arxiv.org/abs/1901.11150>`_, 2019
  """
  rules = Rules(optimizer, sweep_period)
  return SparseRows(
    init=functools.partial(_init, rules),
    update=functools.partial(_update, rules),
    lookup=functools.partial(_lookup, rules),
    sync=functools.partial(_sync, rules),
  )
