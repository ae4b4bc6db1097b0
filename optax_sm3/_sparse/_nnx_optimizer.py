"""Flax NNX: ``SparseOptimizer``, exact row-sparse SM3 steps on SparseEmbed tables.

The optimizer attaches each table's row-sparse state (derived from the
tables' optimizer, :func:`optax_sm3.sparse_rows`) to its
:class:`~optax_sm3.nnx.SparseEmbed` modules (``sparse_state``; see
:mod:`optax_sm3._sparse._nnx`), steps the tables from their
:class:`SparseGrad` (or dense gradient) and the other parameters with
``tx``, as ``nnx.Optimizer.update(model, grads)`` does.
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
import optax
from flax import nnx
from flax.nnx.training.optimizer import OptState, to_opt_state

from optax_sm3._sparse import _nnx, _nnx_state, _rows, _table_rule, _tables
from optax_sm3._sparse._nnx import SparseEmbed, SparseState
from optax_sm3._sparse._nnx_check import path_str


def _is_dense(table_shapes: tuple, wrt: Any, path: Any, value: Any) -> bool:
  """An ``nnx`` filter: the parameters ``tx`` trains (``wrt``, not a table)."""
  tables = {p for p, _ in table_shapes}
  return tuple(path) not in tables and nnx.filterlib.to_predicate(wrt)(path, value)


def _trained(model: nnx.Module, wrt: Any, table_paths: frozenset) -> nnx.State:
  """The parameters the dense optimizer would see: ``wrt`` and the tables."""
  return nnx.state(model, nnx.Any(wrt, functools.partial(_in, table_paths)))


def _in(paths: frozenset, path: Any, value: Any) -> bool:
  del value
  return tuple(path) in paths


def _positions(state: nnx.State, paths: list[tuple]) -> list[int]:
  """Where each of ``paths`` is among the leaves of ``state``."""
  order = [tuple(p) for p, _ in nnx.to_flat_state(state)]
  return [order.index(path) for path in paths]


def _attach(
  rules: _rows.Rules, wrt: Any, model: nnx.Module
) -> dict[tuple, _rows.Table]:
  """Gives every SparseEmbed table of ``model`` a fresh state; its functions.

  Returns:
    Each table's path (sorted) and its :class:`optax_sm3._sparse._rows.Table`.
  """
  tables = _nnx.tables_of(model)
  paths = sorted(tables)
  trained = nnx.as_pure(_trained(model, wrt, frozenset(paths)))
  fns = rules.of_tree(trained, _positions(trained, paths))
  for path, f in zip(paths, fns, strict=True):
    modules = tables[path]
    # One state per table, shared by every module that uses the table.
    state = _nnx_state.sparse_state_variables(f, modules[0].embedding, SparseState)
    for module in modules:
      module.sparse_rows = f
      module.sparse_state = nnx.data(state)
  return dict(zip(paths, fns, strict=True))


def _owned_tables(
  table_fns: dict[tuple, _rows.Table], table_shapes: tuple, model: nnx.Module
) -> dict[tuple, SparseEmbed]:
  """Each table's path and the module that holds it (and its shared state).

  Raises:
    ValueError: unless ``model`` has the tables of ``table_shapes``, each
      attached to this optimizer.
  """
  tables = _nnx.tables_of(model)
  expected = dict(table_shapes)
  if set(tables) != set(expected):
    raise ValueError(
      "`model` does not have the SparseEmbed tables this optimizer was built "
      f"for: expected {sorted(map(path_str, expected))}, got "
      f"{sorted(map(path_str, tables))}"
    )
  for path, modules in tables.items():
    module = modules[0]
    if tuple(module.embedding.shape) != expected[path]:
      raise ValueError(
        f"the table at {path_str(path)} has shape {tuple(module.embedding.shape)}, "
        f"but this optimizer was built for shape {expected[path]}"
      )
    for other in modules:
      if other.sparse_rows is not table_fns[path]:
        raise ValueError(
          f"a SparseEmbed using the table at {path_str(path)} belongs to "
          "another SparseOptimizer (the latest one built for it owns it)"
        )
  # The first module of each table holds the (shared) table and state.
  return {path: modules[0] for path, modules in tables.items()}


def _paths(tree: Any, dense: Any) -> list[tuple]:
  return [tuple(p) for p, _ in nnx.to_flat_state(nnx.state(tree, dense))]


def _dense_grads(model: nnx.Module, grads: nnx.State, dense: Any) -> Any:
  """The gradients of the parameters ``dense`` selects, checked against them."""
  param_paths, grad_paths = _paths(model, dense), _paths(grads, dense)
  if param_paths != grad_paths:
    missing = sorted(map(path_str, set(param_paths) - set(grad_paths)))
    extra = sorted(map(path_str, set(grad_paths) - set(param_paths)))
    raise ValueError(
      "`grads` does not match the model's parameters: missing "
      f"{missing[:5]}, unexpected {extra[:5]}; compute them with "
      "optax_sm3.nnx.value_and_grad on this model"
    )
  return nnx.as_pure(nnx.state(grads, dense))


def _step_dense(
  tx: optax.GradientTransformation,
  opt_state: Any,
  model: nnx.Module,
  dense_grads: Any,
  dense: Any,
  kwargs: dict,
) -> None:
  """``tx`` on the parameters ``dense`` selects, as ``nnx.Optimizer.update``."""
  params = nnx.as_pure(nnx.state(model, dense))
  updates, new_opt_state = tx.update(
    dense_grads, nnx.as_pure(opt_state), params, **nnx.as_pure(kwargs)
  )
  nnx.update(model, optax.apply_updates(params, updates))
  nnx.update(opt_state, nnx.state(new_opt_state))


def _table_grad(flat_grads: dict, path: tuple) -> Any:
  if path not in flat_grads:
    raise ValueError(
      f"`grads` has no entry for the table at {path_str(path)}; compute "
      "them with optax_sm3.nnx.value_and_grad on this model"
    )
  return nnx.as_pure(flat_grads[path])


def _sync_table(f: _rows.Table, module: SparseEmbed) -> None:
  """Every row of ``module``'s table made current, in place."""
  if not f.rule.lazy:
    return
  table, state = f.sync(nnx.as_pure(module.sparse_state), module.embedding[...])
  module.embedding[...] = table
  nnx.update(module.sparse_state, nnx.state(state))


class SparseOptimizer(nnx.Pytree):
  """``nnx.Optimizer`` that takes exact row-sparse steps on SparseEmbed tables.

  A drop-in for ``nnx.Optimizer(model, tx, wrt=wrt)``: the ``embedding`` of
  every :class:`SparseEmbed` is trained by ``table_tx`` (``tx`` itself by
  default), an optimizer made by :func:`optax_sm3.sm3` or
  :func:`optax_sm3.sm3_recipe` from which the row-sparse step is derived
  (:func:`optax_sm3.sparse_rows`), from the :class:`SparseGrad` that
  :func:`value_and_grad` gives it; every other parameter selected by ``wrt``
  by ``tx``. The result equals, to float rounding, training the same model
  with ``nnx.Embed`` tables, ``nnx.value_and_grad`` and
  ``nnx.Optimizer(model, tx, wrt=wrt)`` (with ``table_tx``: ``table_tx`` on
  the tables and ``tx`` on the rest, each clipping its own leaves). A table
  whose gradient came out dense (``attend``, a read of ``embedding``
  itself) takes the dense step.

  Building it attaches the tables' state to their modules (``sparse_state``,
  see the module docs): the module reads its rows through it, so build the
  optimizer before restoring a checkpoint into the model.

  Args:
    model: the NNX module to train.
    tx: optax transformation of the other parameters, and of the tables
      without ``table_tx`` (then made by ``sm3`` or ``sm3_recipe``).
    table_tx: the tables' optimizer, made by ``sm3`` or ``sm3_recipe``;
      ``None`` for ``tx``.
    wrt: filter of the variables to train (``nnx.Param``); SparseEmbed tables
      are always trained.
    sweep_period: see :func:`optax_sm3.sparse_rows`.

  Attributes:
    step: ``OptState`` uint32 step count.
    tx: the transformation of the other parameters.
    opt_state: its state.
    wrt: the filter.
    table_tx: the tables' optimizer.

  Raises:
    TypeError: for a tables' optimizer not made by ``sm3`` or
      ``sm3_recipe`` (a learning rate, as this class took before, included:
      the message shows the new call).
    ValueError: for a tables' optimizer with coupled weight decay; at
      ``update``, for grads that do not match the model or a table whose
      shape changed since the optimizer was built.
  """

  def __init__(
    self,
    model: nnx.Module,
    tx: optax.GradientTransformation,
    table_tx: optax.GradientTransformation | None = None,
    *,
    wrt: nnx.filterlib.Filter = nnx.Param,
    sweep_period: int | None = None,
  ):
    opts = _tables.optimizers(tx, table_tx, None, sweep_period)
    self.table_tx = tx if table_tx is None else table_tx
    self.joint = opts.joint
    # Static attributes, so hashable: (path, functions) pairs.
    self.table_fns = tuple(sorted(_attach(opts.rules, wrt, model).items()))
    self.table_shapes = tuple(
      (path, tuple(module.embedding.shape))
      for path, module in sorted((p, ms[0]) for p, ms in _nnx.tables_of(model).items())
    )
    self.step = OptState(jnp.array(0, dtype=jnp.uint32))
    self.tx = tx
    self.wrt = wrt
    self.opt_state = nnx.data(
      to_opt_state(tx.init(nnx.state(model, self._dense_filter)))
    )

  def _dense_filter(self, path, value) -> bool:
    return _is_dense(self.table_shapes, self.wrt, path, value)

  def update(self, model: nnx.Module, grads: nnx.State, /, **kwargs) -> None:
    """Takes one step: ``tx`` on the dense parameters, row steps on the tables.

    Args:
      model: the module the optimizer was built for.
      grads: from :func:`value_and_grad` (or :func:`grad`) on ``model``.
      **kwargs: passed to ``tx.update``.

    Raises:
      ValueError: if ``grads`` does not match ``model`` (another model's
        grads, a missing table) or a table's shape changed.
      TypeError: if a table's gradient is neither a :class:`SparseGrad` nor an
        array of the table's shape.
    """
    table_fns = dict(self.table_fns)
    tables = _owned_tables(table_fns, self.table_shapes, model)
    dense_grads = _dense_grads(model, grads, self._dense_filter)
    flat_grads = dict(nnx.to_flat_state(grads))
    paths = sorted(tables)
    new_tables, new_states, clipped = _tables.step_tables(
      [table_fns[p] for p in paths],
      _table_rule.optimizer_spec(self.table_tx),
      [_table_grad(flat_grads, p) for p in paths],
      tuple(nnx.as_pure(tables[p].sparse_state) for p in paths),
      [tables[p].embedding[...] for p in paths],
      [f"the gradient of {path_str(p)}" for p in paths],
      dense_grads if self.joint else None,
    )
    if self.joint:
      dense_grads = clipped
    _step_dense(self.tx, self.opt_state, model, dense_grads, self._dense_filter, kwargs)
    for p, table, state in zip(paths, new_tables, new_states, strict=True):
      tables[p].embedding[...] = table
      nnx.update(tables[p].sparse_state, nnx.state(state))
    self.step[...] += 1

  def sync(self, model: nnx.Module) -> None:
    """Makes every table's ``embedding`` current (as the dense optimizer's).

    Call it before reading ``embedding`` directly, exporting or handing a
    checkpoint to code without this optimizer; the module's own forward pass
    is always current.

    Args:
      model: the module the optimizer was built for.
    """
    table_fns = dict(self.table_fns)
    tables = _owned_tables(table_fns, self.table_shapes, model)
    for path, module in tables.items():
      _sync_table(table_fns[path], module)
