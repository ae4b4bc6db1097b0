"""Flax linen: ``SparseEmbed``, a drop-in for ``nn.Embed`` with row-sparse gradients.

The linen module reads its table through :func:`optax_sm3.sparse_lookup`, so
the function-level helpers train it: :func:`optax_sm3.sparse_value_and_grad`
(or ``sparse_tables(...).value_and_grad``, which reads rows through the
optimizer state) of a loss written against the usual params tree gives the
table's gradient as a :class:`SparseGrad`, and :func:`optax_sm3.sparse_tables`
applies it and ``tx`` on the rest in one jittable ``update``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen.dtypes import promote_dtype

from optax_sm3 import _sparse_grad

_default_embed_init = nn.initializers.variance_scaling(
  1.0, "fan_in", "normal", out_axis=0
)


class SparseEmbed(nn.Module):
  """``nn.Embed`` whose table gradient comes out row-sparse.

  The same attributes, parameter (``embedding``, same initialisation) and
  forward pass as :class:`flax.linen.Embed`. Under
  :func:`optax_sm3.sparse_value_and_grad` the table's gradient is a
  :class:`SparseGrad` ``(indices, row_grads)`` (no table-sized array);
  elsewhere (``jax.grad``, ``apply``) it behaves exactly as ``nn.Embed``.
  ``attend`` reads the whole table, so the helpers give that table a dense
  gradient (and :func:`optax_sm3.sparse_tables` takes the dense SM3 step).

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
  dtype: Any = None
  param_dtype: Any = jnp.float32
  embedding_init: Any = _default_embed_init
  promote_dtype: Any = promote_dtype
  padding_id: int | None = None

  def setup(self):
    for name in ("num_embeddings", "features"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
    pad = self.padding_id
    if pad is not None and (
      not isinstance(pad, int) or not 0 <= pad < self.num_embeddings
    ):
      raise ValueError(
        f"`padding_id` must be None or an int in [0, {self.num_embeddings}), "
        f"got {pad!r}"
      )

    def init(key, shape, dtype):
      table = self.embedding_init(key, shape, dtype)
      return table if pad is None else table.at[pad].set(0)

    self.embedding = self.param(
      "embedding", init, (self.num_embeddings, self.features), self.param_dtype
    )

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Embeds ``inputs`` (integer ids of any shape) along a new last axis.

    Raises:
      TypeError: for non-integer ``inputs``.
      ValueError: for concrete ids outside ``[0, num_embeddings)``.
    """
    ids = _sparse_grad.check_ids(inputs, self.num_embeddings, "inputs")
    rows = _sparse_grad.sparse_lookup(self.embedding, ids)
    if self.padding_id is not None:
      rows = jnp.where(
        (ids == self.padding_id)[..., None], jnp.zeros((), rows.dtype), rows
      )
    (rows,) = self.promote_dtype(rows, dtype=self.dtype, inexact=False)
    return rows

  def attend(self, query: jax.Array) -> jax.Array:
    """``query @ embedding.T`` (tied output embeddings), as ``nn.Embed.attend``."""
    # Under sparse_tables(...).value_and_grad: the table as the optimizer
    # holds it now (rows the sparse step left behind caught up).
    table = _sparse_grad.current_table(self.embedding)
    query, embedding = self.promote_dtype(query, table, dtype=self.dtype)
    return jnp.dot(query, embedding.T)
