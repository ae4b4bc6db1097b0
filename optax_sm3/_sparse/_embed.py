"""What the Flax embedding modules share: their default, checks and padding row.

``optax_sm3.nnx.SparseEmbed`` and ``optax_sm3.linen.SparseEmbed`` are
drop-ins for ``nnx.Embed`` and ``nn.Embed``: the same default initialiser,
the same argument checks, and an optional ``padding_id`` row that reads as
zeros and is never trained (zeroed at initialisation; masked in the forward
pass, so its gradient is zero).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from optax_sm3._sparse import _ids

# Flax's own default for nnx.Embed and nn.Embed.
default_embed_init = jax.nn.initializers.variance_scaling(
  1.0, "fan_in", "normal", out_axis=0
)


def check_embed(num_embeddings: Any, features: Any, padding_id: Any) -> None:
  """Raises ``ValueError`` for sizes ``< 1`` or a ``padding_id`` out of range."""
  for name, value in (("num_embeddings", num_embeddings), ("features", features)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
  if padding_id is not None and (
    not isinstance(padding_id, int) or not 0 <= padding_id < num_embeddings
  ):
    raise ValueError(
      f"`padding_id` must be None or an int in [0, {num_embeddings}), got {padding_id!r}"
    )


def padded_init(
  embedding_init: Callable[..., jax.Array], padding_id: int | None
) -> Callable[..., jax.Array]:
  """``embedding_init`` with the row ``padding_id`` (if any) set to zeros."""
  if padding_id is None:
    return embedding_init

  def init(key: jax.Array, shape: Any, dtype: Any) -> jax.Array:
    return embedding_init(key, shape, dtype).at[padding_id].set(0)

  return init


def mask_padding(rows: jax.Array, ids: jax.Array, padding_id: int | None) -> jax.Array:
  """``rows`` with the rows of ``padding_id`` ids as zeros (zero gradient too)."""
  if padding_id is None:
    return rows
  padded = _ids.equals(ids, padding_id)[..., None]
  return jnp.where(padded, jnp.zeros((), rows.dtype), rows)
