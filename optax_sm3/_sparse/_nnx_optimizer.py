"""Flax NNX: ``SparseOptimizer``, exact row-sparse SM3 steps on SparseEmbed tables.

The optimizer attaches each table's :func:`optax_sm3.sparse_rows` state to
its :class:`~optax_sm3.nnx.SparseEmbed` modules (``sparse_state``; see
:mod:`optax_sm3._sparse._nnx`), steps the tables from their
:class:`SparseGrad` (or dense gradient) and the other parameters with
``tx``, as ``nnx.Optimizer.update(model, grads)`` does.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.nnx.training.optimizer import OptState, to_opt_state

from optax_sm3._sparse import _nnx, _nnx_state, _rows, _tables
from optax_sm3._sparse._nnx import SparseEmbed, SparseState
from optax_sm3._sparse._nnx_check import path_str


def _is_dense(table_shapes: tuple, wrt: Any, path: Any, value: Any) -> bool:
  """An ``nnx`` filter: the parameters ``tx`` trains (``wrt``, not a table)."""
  tables = {p for p, _ in table_shapes}
  return tuple(path) not in tables and nnx.filterlib.to_predicate(wrt)(path, value)


def _attach(rows: _rows.SparseRows, model: nnx.Module) -> tuple:
  """Gives every SparseEmbed table of ``model`` a fresh state; its shapes.

  Returns:
    ``((path, shape), ...)``, one per table, sorted by path.
  """
  tables = _nnx.tables_of(model)
  for modules in tables.values():
    # One state per table, shared by every module that uses the table.
    state = _nnx_state.sparse_state_variables(rows, modules[0].embedding, SparseState)
    for module in modules:
      module.sparse_rows = rows
      module.sparse_state = nnx.data(state)
  return tuple(
    (path, tuple(modules[0].embedding.shape))
    for path, modules in sorted(tables.items())
  )


def _owned_tables(
  rows: _rows.SparseRows, table_shapes: tuple, model: nnx.Module
) -> dict[tuple, SparseEmbed]:
  """Each table's path and the module that holds it (and its shared state).

  Raises:
    ValueError: unless ``model`` has the tables of ``table_shapes``, each
      attached to ``rows``.
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
      if other.sparse_rows is not rows:
        raise ValueError(
          f"a SparseEmbed using the table at {path_str(path)} belongs to "
          "another SparseOptimizer (the latest one built for it owns it)"
        )
  # The first module of each table holds the (shared) table and state.
  return {path: modules[0] for path, modules in tables.items()}


def _paths(tree: Any, dense: Any) -> list[tuple]:
  return [tuple(p) for p, _ in nnx.to_flat_state(nnx.state(tree, dense))]


def _step_dense(
  tx: optax.GradientTransformation,
  opt_state: Any,
  model: nnx.Module,
  grads: nnx.State,
  dense: Any,
  kwargs: dict,
) -> None:
  """``tx`` on the parameters ``dense`` selects, as ``nnx.Optimizer.update``."""
  params = nnx.as_pure(nnx.state(model, dense))
  dense_grads = nnx.as_pure(nnx.state(grads, dense))
  param_paths, grad_paths = _paths(model, dense), _paths(grads, dense)
  if param_paths != grad_paths:
    missing = sorted(map(path_str, set(param_paths) - set(grad_paths)))
    extra = sorted(map(path_str, set(grad_paths) - set(param_paths)))
    raise ValueError(
      "`grads` does not match the model's parameters: missing "
      f"{missing[:5]}, unexpected {extra[:5]}; compute them with "
      "optax_sm3.nnx.value_and_grad on this model"
    )
  updates, new_opt_state = tx.update(
    dense_grads, nnx.as_pure(opt_state), params, **nnx.as_pure(kwargs)
  )
  nnx.update(model, optax.apply_updates(params, updates))
  nnx.update(opt_state, nnx.state(new_opt_state))


def _step_table(
  rows: _rows.SparseRows, module: SparseEmbed, flat_grads: dict, path: tuple
) -> None:
  """The SM3 step of the table at ``path`` (held by ``module``), in place."""
  if path not in flat_grads:
    raise ValueError(
      f"`grads` has no entry for the table at {path_str(path)}; compute "
      "them with optax_sm3.nnx.value_and_grad on this model"
    )
  table, state = _tables.grad_update(
    rows,
    nnx.as_pure(flat_grads[path]),
    nnx.as_pure(module.sparse_state),
    module.embedding[...],
    name=f"the gradient of {path_str(path)}",
  )
  module.embedding[...] = table
  nnx.update(module.sparse_state, nnx.state(state))


def _sync_table(rows: _rows.SparseRows, module: SparseEmbed) -> None:
  """Every row of ``module``'s table made current, in place."""
  table, state = rows.sync(nnx.as_pure(module.sparse_state), module.embedding[...])
  module.embedding[...] = table
  nnx.update(module.sparse_state, nnx.state(state))


class SparseOptimizer(nnx.Pytree):
  """``nnx.Optimizer`` that takes exact row-sparse SM3 steps on SparseEmbed tables.

  The ``embedding`` of every :class:`SparseEmbed` in the model is trained by
  :func:`optax_sm3.sparse_rows` (exact SM3 with ``learning_rate``,
  ``momentum``, ``beta``, ``eps``, ``weight_decay``) from the
  :class:`SparseGrad` that :func:`value_and_grad` gives it; every other
  parameter selected by ``wrt`` by ``tx``. The result equals, to float
  rounding, training the same model with dense gradients,
  ``optax_sm3.sm3(learning_rate, momentum, beta, eps,
  weight_decay=weight_decay)`` on the tables and ``tx`` on the rest. A table
  whose gradient came out dense (``attend``) takes the dense SM3 step.

  Building it attaches the tables' state to their modules (``sparse_state``,
  see the module docs): the module reads its rows through it, so build the
  optimizer before restoring a checkpoint into the model.

  Args:
    model: the NNX module to train.
    tx: optax transformation of the other parameters.
    learning_rate: the tables' learning rate (float or schedule of the step).
    momentum: as :func:`optax_sm3.sm3`.
    beta: as :func:`optax_sm3.sm3`.
    eps: as :func:`optax_sm3.sm3`.
    weight_decay: decoupled weight decay of the tables.
    wrt: filter of the variables to train (``nnx.Param``); SparseEmbed tables
      are always trained.

  Attributes:
    step: ``OptState`` uint32 step count.
    tx: the transformation of the other parameters.
    opt_state: its state.
    wrt: the filter.
    sparse_rows: the tables' :class:`optax_sm3.SparseRows`.

  Raises:
    ValueError: at ``update``, for grads that do not match the model or a
      table whose shape changed since the optimizer was built.
  """

  def __init__(
    self,
    model: nnx.Module,
    tx: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    momentum: jax.typing.ArrayLike = 0.0,
    beta: jax.typing.ArrayLike = 0.0,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 0.0,
    *,
    wrt: Any = nnx.Param,
  ):
    self.sparse_rows = _rows.sparse_rows(
      learning_rate, momentum, beta, eps, weight_decay
    )
    self.table_shapes = _attach(self.sparse_rows, model)
    self.step = OptState(jnp.array(0, dtype=jnp.uint32))
    self.tx = tx
    self.wrt = wrt
    self.opt_state = nnx.data(
      to_opt_state(tx.init(nnx.state(model, self._dense_filter)))
    )

  def _dense_filter(self, path, value) -> bool:
    return _is_dense(self.table_shapes, self.wrt, path, value)

  def update(self, model: nnx.Module, grads: nnx.State, /, **kwargs) -> None:
    """Takes one step: ``tx`` on the dense parameters, SM3 rows on the tables.

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
    tables = _owned_tables(self.sparse_rows, self.table_shapes, model)
    _step_dense(self.tx, self.opt_state, model, grads, self._dense_filter, kwargs)
    flat_grads = dict(nnx.to_flat_state(grads))
    for path, module in tables.items():
      _step_table(self.sparse_rows, module, flat_grads, path)
    self.step[...] += 1

  def sync(self, model: nnx.Module) -> None:
    """Makes every table's ``embedding`` current (as the dense optimizer's).

    Call it before reading ``embedding`` directly, exporting or handing a
    checkpoint to code without this optimizer; the module's own forward pass
    is always current.

    Args:
      model: the module the optimizer was built for.
    """
    tables = _owned_tables(self.sparse_rows, self.table_shapes, model)
    for module in tables.values():
      _sync_table(self.sparse_rows, module)
