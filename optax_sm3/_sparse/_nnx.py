"""Flax NNX: ``SparseEmbed``, whose table is trained one looked-up row at a time.

Where the table's optimizer state lives: in the :class:`SparseEmbed` module,
as ``sparse_state`` (:class:`SparseState` variables, not ``nnx.Param``), set
when a :class:`SparseOptimizer` is built for the model and written by its
``update``. The forward pass needs it: the sparse step may leave rows that
the batch did not touch *stale* in ``embedding`` (caught up when next
touched), so every read goes through ``optax_sm3.sparse_rows(...).lookup``
with that state. A module with no optimizer attached reads its table with a
plain gather, exactly as ``nnx.Embed``.

Consequences: ``nnx.state(model)`` holds the tables' SM3 state (``O(V + D)``
per table, plus a table-sized buffer with momentum), so a model checkpoint
restores into a model that has a :class:`SparseOptimizer` attached (build
both, then restore, the usual NNX order); ``optimizer.sync(model)`` makes
every ``embedding`` current (before reading it directly, checkpointing for
another consumer, or exporting); evaluation through the module is always
current.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes

from optax_sm3._sparse import _capture, _embed, _grad, _ids, _rows

if TYPE_CHECKING:  # for the annotation only
  from flax.typing import PromoteDtypeFn


class SparseState(nnx.Variable):
  """The optimizer state of a :class:`SparseEmbed` table (not a parameter)."""


class SparseEmbed(nnx.Module):
  """``nnx.Embed`` whose table is trained one looked-up row at a time.

  A drop-in for :class:`flax.nnx.Embed`: the same arguments, the same table
  (``embedding``, an ``nnx.Param``, initialised from the same ``rngs``
  stream) and the same forward pass. Trained with
  :func:`value_and_grad` and :class:`SparseOptimizer`, its gradient is the
  looked-up ``(indices, row_grads)`` and its SM3 step costs ``O(k * D + V)``,
  not ``O(V * D)``; with ``nnx.grad`` and any optimizer it trains densely,
  like ``nnx.Embed``.

  Args:
    num_embeddings: rows of the table, ``>= 1``.
    features: entries per row, ``>= 1``.
    dtype: dtype of the returned rows (default: the table's).
    param_dtype: dtype of the table.
    embedding_init: initializer of the table.
    promote_dtype: as ``nnx.Embed``'s.
    padding_id: a row id that reads as zeros and is never trained (its row
      is zeroed at initialisation and its gradient is zero), like torch's
      ``padding_idx``; ``None`` (default) for none.
    rngs: the ``nnx.Rngs`` (its ``params`` stream initialises the table).
    embedding_metadata: metadata of the ``embedding`` parameter.

  Raises:
    ValueError: for sizes ``< 1`` or ``padding_id`` outside
      ``[0, num_embeddings)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import optax_sm3.nnx
    >>> embed = optax_sm3.nnx.SparseEmbed(10, 3, padding_id=0, rngs=nnx.Rngs(0))
    >>> embed(jnp.array([[0, 4]])).shape
    (1, 2, 3)
    >>> print(embed(jnp.array([0])))
    [[0. 0. 0.]]
  """

  def __init__(
    self,
    num_embeddings: int,
    features: int,
    *,
    dtype: jax.typing.DTypeLike | None = None,
    param_dtype: jax.typing.DTypeLike = jnp.float32,
    embedding_init: Callable[..., jax.Array] = _embed.default_embed_init,
    promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
    padding_id: int | None = None,
    rngs: nnx.Rngs,
    # As nnx.Embed's: Variable metadata, whose values are anything.
    embedding_metadata: Mapping[str, Any] = MappingProxyType({}),
  ):
    _embed.check_embed(num_embeddings, features, padding_id)
    init = _embed.padded_init(embedding_init, padding_id)
    table = init(rngs.params(), (num_embeddings, features), param_dtype)
    self.embedding = nnx.Param(table, **embedding_metadata)
    self.num_embeddings = num_embeddings
    self.features = features
    self.dtype = dtype or self.embedding.dtype
    self.param_dtype = param_dtype
    self.promote_dtype = promote_dtype
    self.padding_id = padding_id
    # Set by SparseOptimizer: the table's row-sparse functions and state.
    self.sparse_rows: _rows.Table | None = None
    self.sparse_state = nnx.data(None)

  def _current(self, table: jax.Array) -> jax.Array:
    """The whole table as the optimizer holds it now; gradients pass to ``table``."""
    if self.sparse_rows is None:
      return table
    state = nnx.as_pure(self.sparse_state)
    return _grad.synced_table(self.sparse_rows.sync, state, table)

  def _read(self, table: jax.Array, ids: jax.Array) -> jax.Array:
    if self.sparse_rows is None:
      return _ids.take_rows(table, ids)
    return _grad.current_rows(
      self.sparse_rows.lookup, nnx.as_pure(self.sparse_state), table, ids
    )

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Embeds ``inputs`` (integer ids of any shape) along a new last axis.

    Raises:
      TypeError: for non-integer ``inputs``.
      ValueError: for concrete ids outside ``[0, num_embeddings)``.
    """
    ids = _ids.check_ids(inputs, self.num_embeddings, "inputs")
    rows = _capture.read_rows(self.embedding[...], ids, self._read)
    rows = _embed.mask_padding(rows, ids, self.padding_id)
    (rows,) = self.promote_dtype((rows,), dtype=self.dtype, inexact=False)
    return rows

  def attend(self, query: jax.Array) -> jax.Array:
    """``query @ embedding.T`` (tied output embeddings), as ``nnx.Embed.attend``.

    This reads the whole table, so under :func:`value_and_grad` the table's
    gradient is dense (its lookups included), and :class:`SparseOptimizer`
    steps every row of it in that step (``sparse_rows`` with all ids, which
    is the dense SM3 step): exact, at ``O(V * D)`` plus a sort of ``V`` ids.
    With an optimizer attached it reads the synced table (``sparse_rows``'s
    ``sync``), so it is current even where stored rows are stale.
    """
    table = _capture.read_table(self.embedding[...], self._current)
    query, embedding = self.promote_dtype((query, table), dtype=self.dtype)
    return jnp.dot(query, embedding.T)


def tables_of(node: Any) -> dict[tuple, list[SparseEmbed]]:
  """Each SparseEmbed table's state path, with every module that uses it.

  A table Variable shared by several SparseEmbeds (tied embeddings) is one
  entry, at the path ``nnx.state`` gives it (its first path in the graph).
  """
  paths, tables = {}, {}
  for path, value in nnx.iter_graph(node):
    if isinstance(value, nnx.Variable):
      paths.setdefault(id(value), tuple(path))
  for _, value in nnx.iter_graph(node):
    if isinstance(value, SparseEmbed):
      tables.setdefault(paths[id(value.embedding)], []).append(value)
  return tables
