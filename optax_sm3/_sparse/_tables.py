"""One optimizer for a params tree: exact SM3 rows for tables, any tx for the rest.

The plain-JAX (and Flax linen) counterpart of ``optax_sm3.nnx.SparseOptimizer``:
``sparse_tables(tx, learning_rate, ...)`` returns ``init``/``step``/``sync``
over a params tree whose table leaves (named by a mask) are trained by
:func:`optax_sm3.sparse_rows` from the :class:`SparseGrad` of
:func:`optax_sm3.sparse_value_and_grad`, and the other leaves by ``tx``; and
a ``value_and_grad`` that reads the tables' rows through the optimizer state
(``sparse_rows``'s ``lookup``), as the dense optimizer would hold them.

``step`` returns new *parameters*, not updates, so the object has no optax
``update``: one that raises a ``TypeError``, so that passing it where optax
expects a ``GradientTransformation`` (``optax.chain``, Flax's
``TrainState.create(tx=...)``, whose ``apply_gradients`` would add the new
parameters to the old) fails at the first step instead of training wrongly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_sm3 import _tree
from optax_sm3._sparse import _grad, _rows
from optax_sm3._sparse._types import SparseGrad, check_sparse_grad


class SparseTablesState(NamedTuple):
  """The state of :func:`sparse_tables`.

  Attributes:
    rest: the state of ``tx`` over the params with the tables set to ``None``.
    tables: one ``sparse_rows`` state per table leaf, in ``jax.tree.leaves``
      order of the params.
  """

  rest: optax.OptState  # tx's state over the non-table leaves.
  tables: tuple[optax.OptState, ...]  # Per table: sm3(...).init(table).


NOT_A_TRANSFORMATION = (
  "is not an optax GradientTransformation: its `step(params, grads, state)` "
  "returns the new parameters, not updates to add to them. Call `step` "
  "yourself, or for a Flax TrainState use optax_sm3.linen.SparseTrainState."
  "create(apply_fn=..., params=..., tx=<this object>), whose apply_gradients "
  "takes the sparse step"
)


class SparseTables:
  """The functions returned by :func:`sparse_tables`.

  Attributes:
    init: ``init(params) -> state``.
    step: ``step(params, grads, state) -> (new_params, new_state)``;
      ``grads`` from :meth:`value_and_grad` (or
      :func:`optax_sm3.sparse_value_and_grad`): a :class:`SparseGrad` or a
      dense array at each table leaf, arrays elsewhere. Not an optax
      ``update``: it returns the parameters themselves.
    sync: ``sync(params, state) -> (params, state)``: every table current,
      for evaluation outside ``value_and_grad`` and for checkpoints.
    value_and_grad: ``value_and_grad(fun, has_aux=False)`` returns
      ``g(params, state, *args) -> (value, grads)``: as
      :func:`optax_sm3.sparse_value_and_grad` of ``fun(params, *args)``,
      with every :func:`optax_sm3.sparse_lookup` of a table reading the rows
      through ``state`` (and ``current_table``, used by linen's
      ``attend``, reading the synced table).
  """

  __slots__ = ("init", "step", "sync", "value_and_grad")

  def __init__(self, init, step, sync, value_and_grad):
    self.init: Callable[[Any], Any] = init
    self.step: Callable[[Any, Any, Any], tuple[Any, Any]] = step
    self.sync: Callable[[Any, Any], tuple[Any, Any]] = sync
    self.value_and_grad: Callable[..., Callable[..., Any]] = value_and_grad

  def update(self, *args, **kwargs):
    """Raises ``TypeError``: this is not an optax ``GradientTransformation``.

    Use :attr:`step`, which returns the new parameters (an optax ``update``
    returns updates that the caller adds to the parameters).
    """
    del args, kwargs
    raise TypeError(f"optax_sm3.sparse_tables(...) {NOT_A_TRANSFORMATION}")


class _Split(NamedTuple):
  """A params tree, its table leaves told apart from the rest."""

  leaves: list  # The params' leaves, in jax.tree.leaves order.
  treedef: Any  # The params' structure.
  mask: list[bool]  # True at each table leaf.
  rest: Any  # The params with the tables set to None (tx's params).
  tables: list  # The table leaves, in order.


def _mask_of(tables: Any, params: Any) -> list[bool]:
  """``tables`` resolved against ``params``: a boolean per leaf."""
  flags = _tree.flatten_like(
    jax.tree.structure(params),
    _tree.resolve(tables, params),
    "`tables` must have the structure of the params",
  )
  for flag in flags:
    # Booleans only: a label (as optax.multi_transform takes) is truthy,
    # and would silently make every leaf a table.
    dtype = getattr(flag, "dtype", type(flag))
    scalar_bool = dtype in (bool, np.bool_) and np.ndim(flag) == 0
    if not scalar_bool or isinstance(flag, jax.core.Tracer):
      raise TypeError(
        "`tables` must be a tree of booleans shaped like the params (True at "
        "each table), or a function of the params returning one; got a leaf "
        f"{flag!r} of type {type(flag).__name__}"
      )
  return [bool(f) for f in flags]


def _split(tables: Any, params: Any) -> _Split:
  leaves, treedef = jax.tree.flatten(params)
  mask = _mask_of(tables, params)
  rest = [None if m else leaf for leaf, m in zip(leaves, mask, strict=True)]
  table_leaves = [leaf for leaf, m in zip(leaves, mask, strict=True) if m]
  return _Split(leaves, treedef, mask, jax.tree.unflatten(treedef, rest), table_leaves)


def _merge(split: _Split, rest: list, tables: list) -> Any:
  """The params tree of ``rest`` leaves and ``tables``, in ``split``'s layout."""
  rest_iter, table_iter = iter(rest), iter(tables)
  leaves = [next(table_iter) if m else next(rest_iter) for m in split.mask]
  return jax.tree.unflatten(split.treedef, leaves)


def _check_state(state: SparseTablesState, table_leaves: list) -> None:
  # Each table's state against its shape is checked by sparse_rows itself
  # (update and sync), with both shapes in the message.
  if len(state.tables) != len(table_leaves):
    raise ValueError(
      f"`state` holds {len(state.tables)} tables, the params {len(table_leaves)}"
    )


def _init(
  rows: _rows.SparseRows, tx: optax.GradientTransformation, tables: Any, params: Any
) -> SparseTablesState:
  split = _split(tables, params)
  return SparseTablesState(tx.init(split.rest), tuple(map(rows.init, split.tables)))


def _step(
  rows: _rows.SparseRows,
  tx: optax.GradientTransformation,
  tables: Any,
  params: Any,
  grads: Any,
  state: SparseTablesState,
) -> tuple[Any, SparseTablesState]:
  split = _split(tables, params)
  _check_state(state, split.tables)
  grad_leaves = _tree.flatten_like(
    split.treedef, grads, "`grads` does not have the structure of the params"
  )
  pairs = list(zip(grad_leaves, split.mask, strict=True))
  if any(isinstance(g, SparseGrad) and not m for g, m in pairs):
    raise TypeError(
      "`grads` holds a SparseGrad at a leaf that `tables` does not mark as a "
      "table; mark every looked-up table True in `tables`"
    )
  rest_grads = jax.tree.unflatten(split.treedef, [None if m else g for g, m in pairs])
  updates, rest_state = tx.update(rest_grads, state.rest, split.rest)
  new_rest = jax.tree.leaves(optax.apply_updates(split.rest, updates))
  stepped = [
    grad_update(rows, g, table_state, table, name="a table's gradient")
    for g, table_state, table in zip(
      [g for g, m in pairs if m], state.tables, split.tables, strict=True
    )
  ]
  new_params = _merge(split, new_rest, [table for table, _ in stepped])
  return new_params, SparseTablesState(rest_state, tuple(s for _, s in stepped))


def _sync(
  rows: _rows.SparseRows, tables: Any, params: Any, state: SparseTablesState
) -> tuple[Any, SparseTablesState]:
  split = _split(tables, params)
  _check_state(state, split.tables)
  synced = [rows.sync(s, t) for s, t in zip(state.tables, split.tables, strict=True)]
  rest = [leaf for leaf, m in zip(split.leaves, split.mask, strict=True) if not m]
  new_params = _merge(split, rest, [table for table, _ in synced])
  return new_params, state._replace(tables=tuple(s for _, s in synced))


def _table_reader(
  read: Callable[..., Any], states: tuple, number: dict[int, int], position: int
) -> Callable[..., Any] | None:
  """``read`` bound to the state of the table at leaf ``position`` (if one)."""
  if position not in number:
    return None
  return functools.partial(read, states[number[position]])


def _value_and_grad_at(
  rows: _rows.SparseRows,
  tables: Any,
  fun: Callable[..., Any],
  has_aux: bool,
  params: Any,
  state: SparseTablesState,
  *args: Any,
) -> Any:
  """``value_and_grad(fun)(params, state, *args)``: rows read through ``state``."""
  mask = _mask_of(tables, params)
  leaves = jax.tree.leaves(params)
  _check_state(state, [leaf for leaf, m in zip(leaves, mask, strict=True) if m])
  positions = [position for position, m in enumerate(mask) if m]
  number = {position: n for n, position in enumerate(positions)}
  lookup = functools.partial(_grad.current_rows, rows.lookup)
  sync = functools.partial(_grad.synced_table, rows.sync)
  reader = functools.partial(_table_reader, lookup, state.tables, number)
  syncer = functools.partial(_table_reader, sync, state.tables, number)
  return _grad.routed_value_and_grad(
    fun, 0, has_aux, reader, frozenset(number), syncer
  )(params, *args)


def _value_and_grad(
  rows: _rows.SparseRows,
  tables: Any,
  fun: Callable[..., Any],
  *,
  has_aux: bool = False,
) -> Callable[..., Any]:
  return functools.partial(_value_and_grad_at, rows, tables, fun, has_aux)


def sparse_tables(
  tx: optax.GradientTransformation,
  learning_rate: optax.ScalarOrSchedule,
  momentum: jax.typing.ArrayLike = 0.0,
  beta: jax.typing.ArrayLike = 0.0,
  eps: jax.typing.ArrayLike = 1e-8,
  weight_decay: jax.typing.ArrayLike = 0.0,
  *,
  tables: Any,
) -> SparseTables:
  """Exact row-sparse SM3 for the table leaves of a params tree, ``tx`` for the rest.

  The result equals, to float rounding, dense gradients with
  ``optax_sm3.sm3(learning_rate, momentum, beta, eps,
  weight_decay=weight_decay)`` on the tables and ``tx`` on the other leaves
  (e.g. ``optax.multi_transform``). A table whose gradient is dense (it was
  read other than through ``sparse_lookup``) takes the dense SM3 step.

  Args:
    tx: optax transformation of the non-table leaves.
    learning_rate: the tables' learning rate (float or schedule).
    momentum: as :func:`optax_sm3.sm3`.
    beta: as :func:`optax_sm3.sm3`.
    eps: as :func:`optax_sm3.sm3`.
    weight_decay: the tables' decoupled weight decay.
    tables: a pytree of booleans with the params' structure (``True`` at
      table leaves) or a function from the params to such a tree, told apart
      as ``optax.masked`` tells them (an Equinox module of booleans is a
      tree). Labels (``optax.multi_transform``'s strings) are a
      ``TypeError``.

  Returns:
    A :class:`SparseTables` ``(init, step, sync, value_and_grad)``. It is
    not an optax ``GradientTransformation`` (``step`` returns parameters):
    its ``update`` raises a ``TypeError``. Linen users train with
    :class:`optax_sm3.linen.SparseTrainState`; accumulate microbatches
    with :func:`optax_sm3.sparse_multi_steps`.

  Raises:
    TypeError: at ``init`` (and each call), for ``tables`` leaves that are
      not booleans; at ``step``, for a table's gradient that is neither an
      array of its shape nor a :class:`SparseGrad` of its rows (one whose
      marker, indices or dtypes show arithmetic applied leaf by leaf
      included), or a SparseGrad at a leaf ``tables`` does not mark.
    ValueError: at ``step``, for grads whose structure is not the params'
      or a table whose shape changed since ``init``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_sm3
    >>> params = {"table": jnp.ones((1000, 2)), "w": jnp.asarray(2.0)}
    >>> opt = optax_sm3.sparse_tables(
    ...   optax.sgd(0.1), learning_rate=0.1, tables={"table": True, "w": False}
    ... )
    >>> state = opt.init(params)
    >>> def loss(params, ids):
    ...   return params["w"] * jnp.sum(optax_sm3.sparse_lookup(params["table"], ids))
    >>> value, grads = opt.value_and_grad(loss)(params, state, jnp.array([3, 3]))
    >>> params, state = opt.step(params, grads, state)
    >>> print(params["table"][3], params["table"][0], params["w"])
    [0.9 0.9] [1. 1.] 1.6
  """
  rows = _rows.sparse_rows(learning_rate, momentum, beta, eps, weight_decay)
  return SparseTables(
    init=functools.partial(_init, rows, tx, tables),
    step=functools.partial(_step, rows, tx, tables),
    sync=functools.partial(_sync, rows, tables),
    value_and_grad=functools.partial(_value_and_grad, rows, tables),
  )


def grad_update(
  rows: _rows.SparseRows,
  grad: Any,
  state: optax.OptState,
  table: jax.Array,
  *,
  name: str,
) -> tuple[jax.Array, optax.OptState]:
  """``rows.update`` from a table's gradient: a :class:`SparseGrad` or dense.

  A dense gradient (the table read other than by lookups: ``attend``, a
  penalty) steps every row: ``sparse_rows`` is exact for any indices, so that
  is the dense SM3 step, whatever the state keeps. A SparseGrad of ``k = 0``
  rows (a table not looked up) is the zero-gradient step.

  Args:
    rows: the table's :class:`optax_sm3.SparseRows`.
    grad: the table's gradient.
    state: the table's state.
    table: the table.
    name: how the error messages name ``grad`` (e.g. its path).

  Returns:
    ``(new_table, new_state)``.

  Raises:
    TypeError: for a gradient that is neither a :class:`SparseGrad` of the
      table's rows (see :func:`check_sparse_grad`) nor an array of its shape.
    ValueError: for a SparseGrad whose shapes do not match the table.
  """
  if isinstance(grad, SparseGrad):
    check_sparse_grad(grad, tuple(table.shape[1:]), name=name)
    return rows.update(grad.indices, grad.row_grads, state, table)
  if hasattr(grad, "shape") and tuple(grad.shape) == tuple(table.shape):
    every = jnp.arange(table.shape[0], dtype=jnp.int32)
    return rows.update(every, grad, state, table)
  shape = getattr(grad, "shape", None)
  got = type(grad).__name__ + ("" if shape is None else f" of shape {tuple(shape)}")
  raise TypeError(
    f"{name} must be a SparseGrad or an array of the table's shape "
    f"{tuple(table.shape)}, got {got}"
  )
