"""One optimizer for a params tree: exact SM3 rows for tables, any tx for the rest.

The plain-JAX (and Flax linen) counterpart of ``optax_sm3.nnx.SparseOptimizer``:
``sparse_tables(tx, table_tx, tables=mask)`` returns ``init``/``step``/``sync``
over a params tree whose table leaves (named by a mask) take the row-sparse
step derived from ``table_tx`` (an optimizer made by :func:`optax_sm3.sm3`
or :func:`optax_sm3.sm3_recipe`; ``tx`` itself by default) from the
:class:`SparseGrad` of :func:`optax_sm3.sparse_value_and_grad`, and the
other leaves ``tx``'s step; and
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
from typing import Any, NamedTuple, Protocol, TypeVar

import jax
import jax.core
import numpy as np
import optax

from optax_sm3 import _layout, _sm3, _tree
from optax_sm3._sparse import _batch, _grad, _rows, _table_layout, _table_rule
from optax_sm3._sparse._types import SparseGrad, check_sparse_grad


class SparseTablesState(NamedTuple):
  """The state of :func:`sparse_tables`.

  Attributes:
    rest: the state of ``tx`` over the params with the tables set to ``None``.
    tables: one ``sparse_rows`` state per table leaf, in ``jax.tree.leaves``
      order of the params.
  """

  rest: optax.OptState  # tx's state over the non-table leaves.
  tables: tuple[optax.OptState, ...]  # Per table: sparse_rows(table_tx).init(table).


_layout.register(SparseTablesState, _table_layout.specs)

ParamsT = TypeVar("ParamsT")  # The params' own type comes back (a dict, a module).
StateT = TypeVar("StateT")


class StepFn(Protocol[StateT]):
  """``step(params, grads, state) -> (new_params, new_state)``."""

  def __call__(
    self, params: ParamsT, grads: optax.Updates, state: StateT, /
  ) -> tuple[ParamsT, StateT]: ...


class SyncFn(Protocol[StateT]):
  """``sync(params, state) -> (params, state)``."""

  def __call__(self, params: ParamsT, state: StateT, /) -> tuple[ParamsT, StateT]: ...


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

  init: Callable[[optax.Params], SparseTablesState]
  step: StepFn[SparseTablesState]
  sync: SyncFn[SparseTablesState]
  # The function's value (or `(value, aux)`) is the loss's own: anything.
  value_and_grad: Callable[..., Callable[..., tuple[Any, optax.Updates]]]

  def __init__(self, init, step, sync, value_and_grad):
    self.init = init
    self.step = step
    self.sync = sync
    self.value_and_grad = value_and_grad

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
  rest: optax.Params  # The params with the tables set to None (tx's params).
  tables: list  # The table leaves, in order.


def _mask_of(tables: _tree.TreeOrFunction | None, params: optax.Params) -> list[bool]:
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


def _split(tables: _tree.TreeOrFunction | None, params: optax.Params) -> _Split:
  leaves, treedef = jax.tree.flatten(params)
  mask = _mask_of(tables, params)
  rest = [None if m else leaf for leaf, m in zip(leaves, mask, strict=True)]
  table_leaves = [leaf for leaf, m in zip(leaves, mask, strict=True) if m]
  return _Split(leaves, treedef, mask, jax.tree.unflatten(treedef, rest), table_leaves)


def _merge(split: _Split, rest: list, tables: list) -> optax.Params:
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


class Optimizers(NamedTuple):
  """What :func:`sparse_tables` binds.

  Attributes:
    tx: the rest's transformation.
    rules: the tables' rules, from ``table_tx``.
    joint: whether ``tx`` is the tables' optimizer too, so that its clipping
      spans the rest and the tables at once (as ``tx`` on the whole tree).
    tables: the mask.
  """

  tx: optax.GradientTransformation
  rules: _rows.Rules
  joint: bool
  tables: _tree.TreeOrFunction | None


def optimizers(
  tx: optax.GradientTransformation,
  table_tx: optax.GradientTransformation | None,
  tables: _tree.TreeOrFunction | None,
  sweep_period: int | None,
  name: str = "table_tx",
) -> Optimizers:
  """Checks and binds the arguments of :func:`sparse_tables` (and its kin)."""
  if table_tx is None:
    if _sm3.spec_of(tx) is None:
      raise TypeError(
        "without `table_tx`, `tx` trains the tables too, so it must be an "
        "optimizer made by optax_sm3.sm3 or optax_sm3.sm3_recipe (the sparse "
        f"path derives its row-sparse step from it), got {type(tx).__name__}; "
        "pass the tables' optimizer as `table_tx`, e.g. "
        "(tx, optax_sm3.sm3(learning_rate, momentum=0.0))"
      )
    rules = _rows.Rules(tx, sweep_period, name="tx")
  else:
    rules = _rows.Rules(table_tx, sweep_period, name=name)
  return Optimizers(tx, rules, table_tx is None or table_tx is tx, tables)


def _init(opts: Optimizers, params: optax.Params) -> SparseTablesState:
  split = _split(opts.tables, params)
  fns = opts.rules.of_tree(params, _positions(split))
  return SparseTablesState(
    opts.tx.init(split.rest),
    tuple(f.init(table) for f, table in zip(fns, split.tables, strict=True)),
  )


def _positions(split: _Split) -> list[int]:
  return [p for p, m in enumerate(split.mask) if m]


def batch_of(grad: Any, table: jax.Array, *, name: str) -> _batch.RowBatch:
  """A table's gradient (a :class:`SparseGrad` or dense) as its batch of rows.

  A dense gradient (the table read other than by lookups: ``attend``, plain
  indexing, a penalty) is the batch of every row: the row-sparse step is
  exact for any rows, so that is the dense step, whatever the state keeps.
  A SparseGrad of ``k = 0`` rows (a table not read at all) is the
  zero-gradient step.

  Raises:
    TypeError: for a gradient that is neither a :class:`SparseGrad` of the
      table's rows (see :func:`check_sparse_grad`) nor an array of its shape.
    ValueError: for a SparseGrad whose shapes do not match the table.
  """
  if isinstance(grad, SparseGrad):
    check_sparse_grad(grad, tuple(table.shape[1:]), name=name)
    return _rows_of(grad.indices, grad.row_grads, table)
  if hasattr(grad, "shape") and tuple(grad.shape) == tuple(table.shape):
    return _batch.every_row(grad, table)
  shape = getattr(grad, "shape", None)
  got = type(grad).__name__ + ("" if shape is None else f" of shape {tuple(shape)}")
  raise TypeError(
    f"{name} must be a SparseGrad or an array of the table's shape "
    f"{tuple(table.shape)}, got {got}"
  )


@jax.jit
def _rows_of(indices: jax.Array, row_grads: jax.Array, table: jax.Array):
  return _batch.rows_of(indices, row_grads, table)


def step_tables(
  fns: list[_rows.Table],
  spec: Any,
  grads: list[Any],
  states: tuple,
  tables: list[jax.Array],
  names: list[str],
  rest_grads: Any = None,
) -> tuple[list[jax.Array], tuple, Any]:
  """The tables' steps from their gradients, clipped jointly.

  Args:
    fns: each table's functions.
    spec: the tables' optimizer's spec (its clipping stages).
    grads: each table's gradient (SparseGrad or dense).
    states: each table's state.
    tables: the tables.
    names: how errors name each table's gradient.
    rest_grads: the other parameters' gradients, clipped with the tables'
      (the tables' optimizer is theirs too), or ``None``.

  Returns:
    ``(new tables, new states, rest_grads clipped)``.
  """
  batches = [
    batch_of(g, table, name=n) for g, table, n in zip(grads, tables, names, strict=True)
  ]
  for f, state, table in zip(fns, states, tables, strict=True):
    _rows.check_state(f, state, table)
  rest_grads, clipped = _table_rule.clip(spec, (rest_grads, [b.grads for b in batches]))
  stepped = [
    f.step(b._replace(grads=g), state, table)
    for f, b, g, state, table in zip(fns, batches, clipped, states, tables, strict=True)
  ]
  return [t for t, _ in stepped], tuple(s for _, s in stepped), rest_grads


def _step(
  opts: Optimizers, params: optax.Params, grads: optax.Updates, state: SparseTablesState
) -> tuple[optax.Params, SparseTablesState]:
  split = _split(opts.tables, params)
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
  fns = opts.rules.of_tree(params, _positions(split))
  paths = [
    jax.tree_util.keystr(path)
    for (path, _), m in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], split.mask, strict=True
    )
    if m
  ]
  new_tables, table_states, clipped_rest = step_tables(
    fns,
    opts.rules.spec,
    [g for g, m in pairs if m],
    state.tables,
    split.tables,
    [f"the gradient of the table at {p or 'the root'}" for p in paths],
    rest_grads if opts.joint else None,
  )
  if opts.joint:
    rest_grads = clipped_rest
  updates, rest_state = opts.tx.update(rest_grads, state.rest, split.rest)
  new_rest = jax.tree.leaves(optax.apply_updates(split.rest, updates))
  new_params = _merge(split, new_rest, new_tables)
  return new_params, SparseTablesState(rest_state, table_states)


def _sync(
  opts: Optimizers, params: optax.Params, state: SparseTablesState
) -> tuple[optax.Params, SparseTablesState]:
  split = _split(opts.tables, params)
  _check_state(state, split.tables)
  fns = opts.rules.of_tree(params, _positions(split))
  synced = []
  for f, s, t in zip(fns, state.tables, split.tables, strict=True):
    _rows.check_state(f, s, t)
    synced.append(f.sync(s, t) if f.rule.lazy else (t, s))
  rest = [leaf for leaf, m in zip(split.leaves, split.mask, strict=True) if not m]
  new_params = _merge(split, rest, [table for table, _ in synced])
  return new_params, state._replace(tables=tuple(s for _, s in synced))


def _value_and_grad_at(
  opts: Optimizers,
  fun: Callable[..., Any],
  has_aux: bool,
  params: Any,
  state: SparseTablesState,
  *args: Any,
) -> Any:
  """``value_and_grad(fun)(params, state, *args)``: rows read through ``state``."""
  split = _split(opts.tables, params)
  _check_state(state, split.tables)
  positions = _positions(split)
  fns = opts.rules.of_tree(params, positions)
  readers = {
    p: functools.partial(_grad.current_rows, f.lookup, s)
    for p, f, s in zip(positions, fns, state.tables, strict=True)
  }
  syncers = {
    p: functools.partial(_grad.synced_table, f.sync, s)
    for p, f, s in zip(positions, fns, state.tables, strict=True)
  }
  return _grad.routed_value_and_grad(
    fun, 0, has_aux, readers.get, frozenset(positions), syncers.get
  )(params, *args)


def _value_and_grad(
  opts: Optimizers, fun: Callable[..., Any], *, has_aux: bool = False
) -> Callable[..., Any]:
  return functools.partial(_value_and_grad_at, opts, fun, has_aux)


def sparse_tables(
  tx: optax.GradientTransformation,
  table_tx: optax.GradientTransformation | None = None,
  *,
  tables: _tree.TreeOrFunction,
  sweep_period: int | None = None,
) -> SparseTables:
  """Exact row-sparse steps for the table leaves of a params tree, ``tx`` for the rest.

  ``table_tx`` trains the tables: an optimizer made by
  :func:`optax_sm3.sm3` or :func:`optax_sm3.sm3_recipe`, with any of their
  options, from which the row-sparse step is derived (see
  :func:`optax_sm3.sparse_rows`). ``tx`` trains every other leaf.

  * ``table_tx=None`` (or ``tx`` itself): ``tx`` trains the tables too, and
    the result equals, to float rounding, ``tx`` on the whole tree with
    dense gradients (its clipping by global norm spans every leaf).
  * another ``table_tx``: the result equals ``optax.multi_transform`` of
    ``table_tx`` on the tables and ``tx`` on the rest (each clips its own
    leaves).

  Every table leaf gets the gradient ``jax.grad`` would give it: a table
  read only through :func:`optax_sm3.sparse_lookup` takes the row-sparse
  step of its rows, one that the loss also reads another way (plain
  indexing, a framework's own ``Embed``, a whole-table product) takes the
  dense step, and one the loss does not read takes the zero-gradient step.

  Args:
    tx: optax transformation of the non-table leaves (and of the tables,
      without ``table_tx``).
    table_tx: the tables' optimizer (made by ``sm3`` or ``sm3_recipe``), or
      ``None`` for ``tx``.
    tables: a pytree of booleans with the params' structure (``True`` at
      table leaves) or a function from the params to such a tree, told apart
      as ``optax.masked`` tells them (an Equinox module of booleans is a
      tree). Labels (``optax.multi_transform``'s strings) are a
      ``TypeError``.
    sweep_period: see :func:`optax_sm3.sparse_rows`.

  Returns:
    A :class:`SparseTables` ``(init, step, sync, value_and_grad)``. It is
    not an optax ``GradientTransformation`` (``step`` returns parameters):
    its ``update`` raises a ``TypeError``. Linen users train with
    :class:`optax_sm3.linen.SparseTrainState`; accumulate microbatches
    with :func:`optax_sm3.sparse_multi_steps`.

  Raises:
    TypeError: for a tables' optimizer not made by ``sm3`` or ``sm3_recipe``
      (the message shows how to pass one); at ``init`` (and each call), for
      ``tables`` leaves that are not booleans; at ``step``, for a table's
      gradient that is neither an array of its shape nor a
      :class:`SparseGrad` of its rows, or a SparseGrad at a leaf ``tables``
      does not mark.
    ValueError: for a tables' optimizer with coupled weight decay; at
      ``step``, for grads whose structure is not the params' or a table
      whose shape changed since ``init``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_sm3
    >>> params = {"table": jnp.ones((1000, 2)), "w": jnp.asarray(2.0)}
    >>> opt = optax_sm3.sparse_tables(
    ...   optax.sgd(0.1), optax_sm3.sm3(0.1, momentum=0.0),
    ...   tables={"table": True, "w": False},
    ... )
    >>> state = opt.init(params)
    >>> def loss(params, ids):
    ...   return params["w"] * jnp.sum(optax_sm3.sparse_lookup(params["table"], ids))
    >>> value, grads = opt.value_and_grad(loss)(params, state, jnp.array([3, 3]))
    >>> params, state = opt.step(params, grads, state)
    >>> print(params["table"][3], params["table"][0], params["w"])
    [0.9 0.9] [1. 1.] 1.6
  """
  opts = optimizers(tx, table_tx, tables, sweep_period)
  return SparseTables(
    init=functools.partial(_init, opts),
    step=functools.partial(_step, opts),
    sync=functools.partial(_sync, opts),
    value_and_grad=functools.partial(_value_and_grad, opts),
  )
