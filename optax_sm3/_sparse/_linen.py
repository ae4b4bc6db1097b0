"""Flax linen: ``SparseEmbed`` (a drop-in for ``nn.Embed``) and ``SparseTrainState``.

The linen module reads its table through :func:`optax_sm3.sparse_lookup`, so
the function-level helpers train it: :func:`optax_sm3.sparse_value_and_grad`
(or ``sparse_tables(...).value_and_grad``, which reads rows through the
optimizer state) of a loss written against the usual params tree gives the
table's gradient as a :class:`SparseGrad`, and :func:`optax_sm3.sparse_tables`
applies it and ``tx`` on the rest in one jittable ``step``.
:class:`SparseTrainState` wraps both in Flax's ``TrainState`` idiom.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from flax.linen.dtypes import promote_dtype

from optax_sm3._sparse import _embed, _grad, _ids
from optax_sm3._sparse._accumulate import SparseMultiSteps, SparseMultiStepsState
from optax_sm3._sparse._tables import SparseTables, SparseTablesState


class SparseEmbed(nn.Module):
  """``nn.Embed`` whose table gradient comes out row-sparse.

  The same attributes, parameter (``embedding``, same initialisation) and
  forward pass as :class:`flax.linen.Embed`. Under
  :func:`optax_sm3.sparse_value_and_grad` the table's gradient is a
  :class:`SparseGrad` ``(indices, row_grads)`` (no table-sized array);
  elsewhere (``jax.grad``, ``apply``) it behaves exactly as ``nn.Embed``.
  ``attend`` reads the whole table, so the helpers give that table a dense
  gradient, lookups included (and :func:`optax_sm3.sparse_tables` takes the
  dense SM3 step): a table tied to the output layer is one parameter, with
  one state and one step of its merged gradient. So is a module called
  more than once (two towers, context windows): its lookups are
  concatenated.

  Attributes:
    num_embeddings: rows of the table.
    features: entries per row.
    dtype: dtype of the returned rows (default: the table's).
    param_dtype: dtype of the table.
    embedding_init: initializer of the table.
    promote_dtype: as ``nn.Embed``'s.
    padding_id: a row id that reads as zeros and is never trained (zeroed at
      initialisation, zero gradient); ``None`` (default) for none.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from optax_sm3.linen import SparseEmbed
    >>> embed = SparseEmbed(10, 3, padding_id=0)
    >>> variables = embed.init(jax.random.key(0), jnp.array([1]))
    >>> print(embed.apply(variables, jnp.array([0])))
    [[0. 0. 0.]]
  """

  num_embeddings: int
  features: int
  dtype: jax.typing.DTypeLike | None = None
  param_dtype: jax.typing.DTypeLike = jnp.float32
  embedding_init: Callable[..., jax.Array] = _embed.default_embed_init
  promote_dtype: Callable[..., list[jax.Array]] = promote_dtype
  padding_id: int | None = None

  def setup(self):
    _embed.check_embed(self.num_embeddings, self.features, self.padding_id)
    self.embedding = self.param(
      "embedding",
      _embed.padded_init(self.embedding_init, self.padding_id),
      (self.num_embeddings, self.features),
      self.param_dtype,
    )

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Embeds ``inputs`` (integer ids of any shape) along a new last axis.

    Raises:
      TypeError: for non-integer ``inputs``.
      ValueError: for concrete ids outside ``[0, num_embeddings)``.
    """
    ids = _ids.check_ids(inputs, self.num_embeddings, "inputs")
    rows = _grad.sparse_lookup(self.embedding, ids)
    rows = _embed.mask_padding(rows, ids, self.padding_id)
    (rows,) = self.promote_dtype(rows, dtype=self.dtype, inexact=False)
    return rows

  def attend(self, query: jax.Array) -> jax.Array:
    """``query @ embedding.T`` (tied output embeddings), as ``nn.Embed.attend``."""
    # Under sparse_tables(...).value_and_grad: the table as the optimizer
    # holds it now (rows the sparse step left behind caught up).
    table = _grad.current_table(self.embedding)
    query, embedding = self.promote_dtype(query, table, dtype=self.dtype)
    return jnp.dot(query, embedding.T)


class SparseTrainState(struct.PyTreeNode):
  """``flax.training.train_state.TrainState`` for :func:`optax_sm3.sparse_tables`.

  The same fields and idiom as Flax's ``TrainState`` (``create``,
  ``apply_gradients(grads=...)``, ``replace``; a pytree of ``step``,
  ``params`` and ``opt_state``, so it is a ``jit`` argument and an orbax
  checkpoint), but ``tx`` is a :func:`optax_sm3.sparse_tables` optimizer (or
  a :func:`optax_sm3.sparse_multi_steps` of one) and ``apply_gradients``
  takes its exact row-sparse step. Flax's own ``TrainState`` cannot take
  that step: it adds what ``tx.update`` returns to the parameters, and
  ``sparse_tables(...).update`` raises a ``TypeError`` saying so.

  Take gradients with :meth:`value_and_grad` (the tables' rows read through
  the optimizer state, as the dense optimizer would hold them); with
  momentum or weight decay rows outside recent batches are stored behind,
  so evaluate and export ``state.sync().params``, not ``state.params``.

  Attributes:
    step: ``apply_gradients`` calls so far.
    apply_fn: usually ``model.apply``.
    params: the parameters.
    tx: the sparse optimizer (static).
    opt_state: its state.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import optax
    >>> import optax_sm3
    >>> from optax_sm3.linen import SparseEmbed, SparseTrainState
    >>> class Bag(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, ids):
    ...     return nn.Dense(1)(SparseEmbed(1000, 4)(ids).mean(axis=1))[:, 0]
    >>> model, ids, y = Bag(), jnp.array([[1, 2], [3, 3]]), jnp.array([1.0, -1.0])
    >>> tables = lambda p: jax.tree.map_with_path(
    ...   lambda path, _: "SparseEmbed" in jax.tree_util.keystr(path), p)
    >>> state = SparseTrainState.create(
    ...   apply_fn=model.apply,
    ...   params=model.init(jax.random.key(0), ids)["params"],
    ...   tx=optax_sm3.sparse_tables(
    ...     optax.adam(1e-2), optax_sm3.sm3(0.1, momentum=0.0), tables=tables
    ...   ),
    ... )
    >>> @jax.jit
    ... def train_step(state, ids, y):
    ...   def loss_fn(params, ids, y):
    ...     return jnp.mean((state.apply_fn({"params": params}, ids) - y) ** 2)
    ...   loss, grads = state.value_and_grad(loss_fn)(ids, y)
    ...   return state.apply_gradients(grads=grads), loss
    >>> for _ in range(3):
    ...   state, loss = train_step(state, ids, y)
    ...   print(f"{loss:.3f}")
    1.568
    1.095
    0.848
  """

  step: int | jax.Array
  # Any: the model's apply, whose outputs are the model's (as Flax's TrainState).
  apply_fn: Callable[..., Any] = struct.field(pytree_node=False)
  params: optax.Params = struct.field(pytree_node=True)
  tx: SparseTables | SparseMultiSteps = struct.field(pytree_node=False)
  # `tx.init`'s (see create): pyright cannot pair it with tx's kind, hence the
  # ignores where tx takes it.
  opt_state: SparseTablesState | SparseMultiStepsState = struct.field(pytree_node=True)

  def apply_gradients(self, *, grads: optax.Updates, **kwargs) -> SparseTrainState:
    """One step of ``tx``; ``step`` advances by one.

    Args:
      grads: from :meth:`value_and_grad` (a :class:`SparseGrad` or a dense
        array at each table, arrays elsewhere), or a sum of such
        (:func:`optax_sm3.sparse_grad_sum`).
      **kwargs: other fields to ``replace``.

    Returns:
      The new state.
    """
    params, opt_state = self.tx.step(self.params, grads, self.opt_state)  # pyright: ignore[reportArgumentType]
    return self.replace(
      step=self.step + 1, params=params, opt_state=opt_state, **kwargs
    )

  def value_and_grad(
    self, fun: Callable[..., Any], *, has_aux: bool = False
  ) -> Callable[..., tuple[Any, optax.Updates]]:
    """``jax.value_and_grad(fun)`` at ``params``, tables' gradients row-sparse.

    Args:
      fun: the loss, ``fun(params, *args)`` (``-> (value, aux)`` with
        ``has_aux``).
      has_aux: whether ``fun`` returns ``(value, aux)``.

    Returns:
      ``g(*args) -> (value, grads)`` (or ``((value, aux), grads)``), the rows
      of every :func:`optax_sm3.sparse_lookup` (so every
      :class:`SparseEmbed`) read through ``opt_state``.
    """
    inner = self.tx.value_and_grad(fun, has_aux=has_aux)
    return lambda *args: inner(self.params, self.opt_state, *args)

  def sync(self) -> SparseTrainState:
    """The state with every table current (``O(V * D)`` per table).

    For evaluation through ``apply_fn`` outside :meth:`value_and_grad`, and
    for export. A no-op on the values without momentum and weight decay.
    """
    params, opt_state = self.tx.sync(self.params, self.opt_state)  # pyright: ignore[reportArgumentType]
    return self.replace(params=params, opt_state=opt_state)

  @classmethod
  def create(
    cls,
    *,
    apply_fn: Callable[..., Any],
    params: optax.Params,
    tx: SparseTables | SparseMultiSteps,
    grads_like: optax.Updates | None = None,
    **kwargs,
  ) -> SparseTrainState:
    """A new state with ``step = 0`` and ``opt_state = tx.init(params)``.

    Args:
      apply_fn: usually ``model.apply``.
      params: the parameters.
      tx: a :func:`optax_sm3.sparse_tables` optimizer, or a
        :func:`optax_sm3.sparse_multi_steps` of one.
      grads_like: for a ``sparse_multi_steps`` ``tx`` only: one microbatch's
        gradients or their shapes (``jax.eval_shape``), which fix the
        accumulator's.
      **kwargs: other fields (for subclasses).

    Raises:
      TypeError: for another ``tx`` (use Flax's ``TrainState`` with an
        optax transformation), or a missing ``grads_like``.
    """
    if isinstance(tx, SparseMultiSteps):
      if grads_like is None:
        raise TypeError(
          "a sparse_multi_steps tx needs `grads_like`: one microbatch's gradients "
          "or their jax.eval_shape"
        )
      opt_state = tx.init(params, grads_like)
    elif isinstance(tx, SparseTables):
      if grads_like is not None:
        raise TypeError("`grads_like` is for a sparse_multi_steps tx only")
      opt_state = tx.init(params)
    else:
      raise TypeError(
        "SparseTrainState's tx must be optax_sm3.sparse_tables(...) or "
        f"optax_sm3.sparse_multi_steps(...), got {type(tx).__name__}; for an "
        "optax GradientTransformation use flax.training.train_state.TrainState"
      )
    return cls(
      step=0, apply_fn=apply_fn, params=params, tx=tx, opt_state=opt_state, **kwargs
    )
