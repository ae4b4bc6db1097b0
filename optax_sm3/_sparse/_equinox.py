"""Row-sparse embedding training for Equinox: SparseEmbedding, the grad helper, the optimizer.

``SparseEmbedding`` is ``eqx.nn.Embedding`` whose lookup goes through
:func:`optax_sm3.sparse_lookup`, so the function-level machinery trains it:
:func:`filter_value_and_grad` is ``eqx.filter_value_and_grad`` (the inexact
array leaves of the first argument are differentiated) over
:func:`optax_sm3.sparse_value_and_grad`, and :class:`SparseOptimizer` is
:func:`optax_sm3.sparse_tables` over the model's inexact array leaves, with
every SparseEmbedding's ``weight`` as a table. The optimizer state lives
outside the model (the optax convention Equinox follows); the optimizer's
:meth:`SparseOptimizer.step` returns the new model, and so is named ``step``,
not ``update``: it cannot be taken for an optax ``update`` whose updates
``eqx.apply_updates`` would add to the model a second time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from optax_sm3._sparse._grad import sparse_lookup, sparse_value_and_grad
from optax_sm3._sparse._tables import SparseTablesState, sparse_tables

# A model, or a part of one (eqx.filter keeps the module types): the same
# type comes back.
ModelT = TypeVar("ModelT")


class SparseEmbedding(eqx.Module):
  """``eqx.nn.Embedding`` whose table gradient comes out row-sparse.

  A drop-in for :class:`equinox.nn.Embedding`: the same constructor
  arguments, the same fields (``weight``, ``num_embeddings``,
  ``embedding_size``), the same initialisation from ``key`` (the table is
  built by ``eqx.nn.Embedding`` itself) and the same value of a lookup.
  Under :func:`filter_value_and_grad` (or
  :meth:`SparseOptimizer.filter_value_and_grad`) the gradient of ``weight``
  is a :class:`optax_sm3.SparseGrad` ``(indices, row_grads)`` and no
  table-sized array is formed; under ``eqx.filter_grad`` it is the dense
  gradient, as ``eqx.nn.Embedding``'s.

  ``eqx.nn.Embedding`` takes one scalar index (the Equinox idiom is
  ``jax.vmap(embedding)(ids)``); this module takes that and, as well, ids of
  any shape, returning ``ids.shape + (embedding_size,)``.

  Args:
    num_embeddings: rows of the table.
    embedding_size: entries per row.
    weight: the table itself, of shape ``(num_embeddings, embedding_size)``,
      in place of the three arguments around it.
    dtype: dtype of the table (default: JAX's default floating dtype).
    key: the PRNG key of the table's ``jax.random.normal`` initialisation.

  Raises:
    ValueError: as ``eqx.nn.Embedding`` (missing arguments, negative sizes,
      a ``weight`` of the wrong shape).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import equinox as eqx
    >>> import optax_sm3.equinox
    >>> key = jax.random.key(0)
    >>> embed = optax_sm3.equinox.SparseEmbedding(10, 3, key=key)
    >>> bool(jnp.all(embed.weight == eqx.nn.Embedding(10, 3, key=key).weight))
    True
    >>> embed(jnp.array([[1, 4]])).shape, embed(jnp.array(4)).shape
    ((1, 2, 3), (3,))
  """

  num_embeddings: int = eqx.field(static=True)
  embedding_size: int = eqx.field(static=True)
  weight: jax.Array

  def __init__(
    self,
    num_embeddings: int | None = None,
    embedding_size: int | None = None,
    weight: jax.Array | None = None,
    dtype: jax.typing.DTypeLike | None = None,
    *,
    key: jax.Array | None = None,
  ):
    reference = eqx.nn.Embedding(num_embeddings, embedding_size, weight, dtype, key=key)
    self.num_embeddings = reference.num_embeddings
    self.embedding_size = reference.embedding_size
    self.weight = reference.weight

  def __call__(self, x: jax.typing.ArrayLike, *, key: jax.Array | None = None):
    """The rows of ``x`` (integer ids of any shape), ``x.shape + (embedding_size,)``.

    Args:
      x: integer ids in ``[0, num_embeddings)``.
      key: ignored, as in ``eqx.nn.Embedding``.

    Raises:
      TypeError: for non-integer ``x``.
      ValueError: for concrete ids outside ``[0, num_embeddings)``.
    """
    del key
    return sparse_lookup(self.weight, jnp.asarray(x))


def _is_sparse_embedding(node: Any) -> bool:
  return isinstance(node, SparseEmbedding)


def table_mask(params: ModelT) -> ModelT:
  """``True`` at the ``weight`` of every :class:`SparseEmbedding` in ``params``.

  ``params`` is a model or a part of one (``eqx.filter`` keeps the module
  types): a pytree of bools with its structure, as optax masks.
  """

  def mark(node):
    # A SparseEmbedding's one non-static field is `weight`.
    return jax.tree.map(lambda _: _is_sparse_embedding(node), node)

  return jax.tree.map(mark, params, is_leaf=_is_sparse_embedding)


def _of_params(fun: Callable[..., Any], model: Any, kwargs: dict):
  """``model``'s inexact arrays, and ``fun`` as a function of them (Equinox's
  filtering: the rest of the model is held fixed)."""
  params, static = eqx.partition(model, eqx.is_inexact_array)

  def of_params(params, *args):
    return fun(eqx.combine(params, static), *args, **kwargs)

  return params, of_params


def filter_value_and_grad(
  # Any: the caller's loss, of any arguments and value; the gradients have
  # the structure of its first argument (a model), as Equinox's.
  fun: Callable[..., Any],
  *,
  has_aux: bool = False,
) -> Callable[..., Any]:
  """``eqx.filter_value_and_grad`` with row-sparse gradients for SparseEmbeddings.

  The inexact array leaves of the first argument are differentiated, as by
  ``eqx.filter_value_and_grad``, and get the gradients it gives, except the
  ``weight`` of a :class:`SparseEmbedding` that ``fun`` reads only by
  calling the module: its gradient is a :class:`optax_sm3.SparseGrad` of
  every lookup (repeats kept) and no table-sized array is formed. A weight
  that ``fun`` also reads another way (``x @ embedding.weight.T``) gets its
  dense gradient.

  The rows are read as stored. That is what
  :class:`SparseOptimizer` holds with its defaults (``momentum = 0``,
  ``weight_decay = 0``); with momentum or weight decay the optimizer stores
  rows behind, so take gradients with
  :meth:`SparseOptimizer.filter_value_and_grad`, which reads them through
  its state.

  Args:
    fun: the loss, ``fun(model, *args, **kwargs) -> scalar`` (or
      ``(scalar, aux)``).
    has_aux: whether ``fun`` returns ``(value, aux)``.

  Returns:
    ``g(model, *args, **kwargs) -> (value, grads)`` (or ``((value, aux),
    grads)``); ``grads`` has the structure of ``eqx.filter(model,
    eqx.is_inexact_array)``, with SparseGrad nodes at the sparse tables.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import optax_sm3.equinox
    >>> embed = optax_sm3.equinox.SparseEmbedding(1000, 2, key=jax.random.key(0))
    >>> loss = lambda m, ids: jnp.sum(m(ids) ** 2)
    >>> _, grads = optax_sm3.equinox.filter_value_and_grad(loss)(embed, jnp.array([3, 5, 3]))
    >>> print(grads.weight.indices, grads.weight.row_grads.shape)
    [3 5 3] (3, 2)
  """

  @functools.wraps(fun)
  def wrapper(model, *args, **kwargs):
    params, of_params = _of_params(fun, model, kwargs)
    return sparse_value_and_grad(of_params, has_aux=has_aux)(params, *args)

  return wrapper


class SparseOptimizer:
  """Exact row-sparse steps for an Equinox model's SparseEmbeddings, ``tx`` for the rest.

  The ``weight`` of every :class:`SparseEmbedding` is trained by
  ``table_tx`` (``tx`` itself by default), an optimizer made by
  :func:`optax_sm3.sm3` or :func:`optax_sm3.sm3_recipe` from which the
  row-sparse step is derived (:func:`optax_sm3.sparse_rows`), from its
  :class:`optax_sm3.SparseGrad`; every other inexact array leaf by ``tx``.
  The result equals, to float rounding, dense gradients
  (``eqx.nn.Embedding`` + ``eqx.filter_value_and_grad``) with ``tx`` on
  every leaf (with ``table_tx``: ``table_tx`` on the tables and ``tx`` on
  the rest, each clipping its own leaves). A table whose gradient came out
  dense (its ``weight`` read other than by calling the module) takes the
  dense step.

  The state is separate from the model, as an optax state; :meth:`step`
  returns the new model and state. Jit the train step with the model and
  state donated (``eqx.filter_jit(donate="all")``): without donation the old
  table stays alive, so XLA must copy the whole table to make the new one,
  and the step costs ``O(V * D)`` again.

  With momentum or weight decay, rows outside recent batches are stored
  behind (see :func:`optax_sm3.sparse_rows`): take gradients with
  :meth:`filter_value_and_grad` (reads rows through the state) and call
  :meth:`sync` before using the model elsewhere (evaluation, export).

  Args:
    tx: optax transformation of the other inexact array leaves, and of the
      tables without ``table_tx`` (then made by ``sm3`` or ``sm3_recipe``).
    table_tx: the tables' optimizer, made by ``sm3`` or ``sm3_recipe``;
      ``None`` for ``tx``.
    sweep_period: see :func:`optax_sm3.sparse_rows`.

  Raises:
    TypeError: for a tables' optimizer not made by ``sm3`` or
      ``sm3_recipe`` (the message shows how to pass one).
    ValueError: for a tables' optimizer with coupled weight decay.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import equinox as eqx
    >>> import optax
    >>> import optax_sm3.equinox
    >>> model = optax_sm3.equinox.SparseEmbedding(1000, 2, key=jax.random.key(0))
    >>> opt = optax_sm3.equinox.SparseOptimizer(optax_sm3.sm3(0.1, momentum=0.0))
    >>> state = opt.init(model)
    >>> @eqx.filter_jit(donate="all")  # model and state are updated in place
    ... def train_step(model, state, ids):
    ...   loss_fn = lambda m: jnp.sum(m(ids))
    ...   loss, grads = opt.filter_value_and_grad(loss_fn)(model, state)
    ...   model, state = opt.step(model, grads, state)
    ...   return loss, model, state
    >>> before = model.weight[:4]
    >>> loss, model, state = train_step(model, state, jnp.array([3, 3]))
    >>> print(jnp.any(model.weight[:4] != before, axis=1))  # row 3 moved, alone
    [False False False  True]
  """

  def __init__(
    self,
    tx: optax.GradientTransformation,
    table_tx: optax.GradientTransformation | None = None,
    *,
    sweep_period: int | None = None,
  ):
    self.tx = tx
    self.table_tx = tx if table_tx is None else table_tx
    self._tables = sparse_tables(
      tx, table_tx, tables=table_mask, sweep_period=sweep_period
    )

  def init(self, model: eqx.Module) -> SparseTablesState:
    """The state for ``model`` (a :class:`optax_sm3.SparseTablesState`)."""
    return self._tables.init(eqx.filter(model, eqx.is_inexact_array))

  def filter_value_and_grad(
    self, fun: Callable[..., Any], *, has_aux: bool = False
  ) -> Callable[..., Any]:
    """:func:`filter_value_and_grad` that reads the tables' rows through ``state``.

    Args:
      fun: the loss, ``fun(model, *args, **kwargs)``.
      has_aux: whether ``fun`` returns ``(value, aux)``.

    Returns:
      ``g(model, state, *args, **kwargs) -> (value, grads)`` (or ``((value,
      aux), grads)``): the gradients of :func:`filter_value_and_grad`, the
      rows as the dense optimizer would hold them now.
    """

    @functools.wraps(fun)
    def wrapper(model, state, *args, **kwargs):
      params, of_params = _of_params(fun, model, kwargs)
      return self._tables.value_and_grad(of_params, has_aux=has_aux)(
        params, state, *args
      )

    return wrapper

  def step(
    self, model: ModelT, grads: optax.Updates, state: SparseTablesState
  ) -> tuple[ModelT, SparseTablesState]:
    """One step: SM3 on the tables' rows, ``tx`` on the rest.

    Args:
      model: the model ``state`` was made for.
      grads: from :meth:`filter_value_and_grad` (or :func:`filter_value_and_grad`).
      state: the optimizer state.

    Returns:
      ``(new_model, new_state)``.

    Raises:
      ValueError: for grads or a state that do not match the model.
    """
    params, static = eqx.partition(model, eqx.is_inexact_array)
    params, state = self._tables.step(params, grads, state)
    return eqx.combine(params, static), state

  def sync(
    self, model: ModelT, state: SparseTablesState
  ) -> tuple[ModelT, SparseTablesState]:
    """``(model, state)`` with every table current (for evaluation and export).

    ``O(V * D)``; a no-op on the values without momentum and weight decay.
    """
    params, static = eqx.partition(model, eqx.is_inexact_array)
    params, state = self._tables.sync(params, state)
    return eqx.combine(params, static), state
