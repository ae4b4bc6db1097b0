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

  def mask_of(params) -> list[bool]:
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

  def split(params):
    leaves, treedef = jax.tree.flatten(params)
    mask = mask_of(params)
    rest = [None if m else leaf for leaf, m in zip(leaves, mask, strict=True)]
    table_leaves = [leaf for leaf, m in zip(leaves, mask, strict=True) if m]
    return leaves, treedef, mask, jax.tree.unflatten(treedef, rest), table_leaves

  def init_fn(params):
    _, _, _, rest, table_leaves = split(params)
    return SparseTablesState(tx.init(rest), tuple(rows.init(t) for t in table_leaves))

  def check_state(state, table_leaves):
    # Each table's state against its shape is checked by sparse_rows itself
    # (update and sync), with both shapes in the message.
    if len(state.tables) != len(table_leaves):
      raise ValueError(
        f"`state` holds {len(state.tables)} tables, the params {len(table_leaves)}"
      )

  def step_fn(params, grads, state):
    _, treedef, mask, rest, table_leaves = split(params)
    check_state(state, table_leaves)
    grad_leaves = _tree.flatten_like(
      treedef, grads, "`grads` does not have the structure of the params"
    )
    if any(
      isinstance(g, SparseGrad) and not m
      for g, m in zip(grad_leaves, mask, strict=True)
    ):
      raise TypeError(
        "`grads` holds a SparseGrad at a leaf that `tables` does not mark as a "
        "table; mark every looked-up table True in `tables`"
      )
    rest_grads = jax.tree.unflatten(
      treedef, [None if m else g for g, m in zip(grad_leaves, mask, strict=True)]
    )
    updates, rest_state = tx.update(rest_grads, state.rest, rest)
    new_rest = jax.tree.leaves(optax.apply_updates(rest, updates))
    new_leaves, new_tables = [], []
    rest_iter, table_iter = (
      iter(new_rest),
      iter(zip(table_leaves, state.tables, strict=True)),
    )
    for g, m in zip(grad_leaves, mask, strict=True):
      if not m:
        new_leaves.append(next(rest_iter))
        continue
      table, table_state = next(table_iter)
      if isinstance(g, SparseGrad):
        check_sparse_grad(g, tuple(table.shape[1:]), name="a table's gradient")
        # k = 0 (not looked up) is sparse_rows' zero-gradient step.
        table, table_state = rows.update(g.indices, g.row_grads, table_state, table)
      elif hasattr(g, "shape") and tuple(g.shape) == tuple(table.shape):
        # Read densely: every row in the batch is the dense SM3 step.
        every = jnp.arange(table.shape[0], dtype=jnp.int32)
        table, table_state = rows.update(every, g, table_state, table)
      else:
        raise TypeError(
          "a table's gradient must be a SparseGrad or an array of the table's "
          f"shape {tuple(table.shape)}, got {type(g).__name__}"
        )
      new_leaves.append(table)
      new_tables.append(table_state)
    return jax.tree.unflatten(treedef, new_leaves), SparseTablesState(
      rest_state, tuple(new_tables)
    )

  def sync_fn(params, state):
    leaves, treedef, mask, _, table_leaves = split(params)
    check_state(state, table_leaves)
    synced = [rows.sync(s, t) for s, t in zip(state.tables, table_leaves, strict=True)]
    it = iter(synced)
    leaves = [next(it)[0] if m else leaf for leaf, m in zip(leaves, mask, strict=True)]
    return jax.tree.unflatten(treedef, leaves), state._replace(
      tables=tuple(s for _, s in synced)
    )

  def value_and_grad_fn(
    fun: Callable[..., Any], *, has_aux: bool = False
  ) -> Callable[..., Any]:
    def wrapped(params, state, *args):
      leaves = jax.tree.leaves(params)
      mask = mask_of(params)
      check_state(state, [leaf for leaf, m in zip(leaves, mask, strict=True) if m])
      number = {}
      for position, m in enumerate(mask):
        if m:
          number[position] = len(number)

      def reader(position):
        if position not in number:
          return None
        table_state = state.tables[number[position]]
        return lambda t, ids: _grad.current_rows(rows.lookup, table_state, t, ids)

      def syncer(position):
        if position not in number:
          return None
        table_state = jax.lax.stop_gradient(state.tables[number[position]])

        def sync(t):
          synced, _ = rows.sync(table_state, jax.lax.stop_gradient(t))
          return _grad.value_of_first(synced, t)

        return sync

      known = frozenset(number)
      return _grad._value_and_grad(fun, 0, has_aux, reader, known, syncer)(
        params, *args
      )

    return wrapped

  return SparseTables(init_fn, step_fn, sync_fn, value_and_grad_fn)
