"""SM3's per-parameter arithmetic: the estimate ``nu`` and the new covers.

Two ways to compute the new accumulators, bit-identical (a maximum does not
depend on the order it is taken in):

* direct: ``nu`` over the whole parameter, then one reduction per group. XLA
  on the CPU materialises ``nu`` to feed the reductions: a temporary as large
  as the parameter, and an extra write and read of it.
* blocked: a loop over blocks of the leading axis that forms ``nu`` one
  cache-sized block at a time and folds it into the accumulators. Used on a
  single-device CPU for parameters larger than one block; it needs no
  full-size temporary. With several devices the direct form is kept, because
  slicing a sharded axis in a loop would make XLA gather the parameter.

The update itself, ``g / sqrt(nu + eps)``, is left as one elementwise
expression of the gradient and the *old* accumulators, which XLA fuses with
whatever consumes it (momentum, ``optax.apply_updates``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from optax_sm3 import _cover

# Elements of ``nu`` formed per loop iteration on the CPU: 1 MiB of float32,
# small enough to stay in cache, large enough to amortise the loop.
DEFAULT_BLOCK_SIZE = 1 << 18


def cover_minimum(
  accumulators: Sequence[jax.Array], shapes: Sequence[tuple[int, ...]]
) -> jax.Array:
  """``min_r a_r``, each ``a_r`` reshaped to ``shapes[r]`` to broadcast."""
  expanded = [a.reshape(s) for a, s in zip(accumulators, shapes, strict=True)]
  minimum = expanded[0]
  for a in expanded[1:]:
    minimum = jnp.minimum(minimum, a)
  return minimum


def estimate(
  g: jax.Array,
  accumulators: Sequence[jax.Array],
  shapes: Sequence[tuple[int, ...]],
  c_old: jax.Array,
  c_new: jax.Array,
) -> jax.Array:
  """``nu = c_old * min_r a_r + c_new * g**2`` in the accumulators' dtype.

  Args:
    g: the gradient (or a block of it).
    accumulators: one array per group.
    shapes: the shape each accumulator is reshaped to for broadcasting.
    c_old: weight of the old estimate (1, or ``beta``).
    c_new: weight of the squared gradient (1, or ``1 - beta``).

  Returns:
    ``nu``, with ``g``'s shape.
  """
  gf = g.astype(accumulators[0].dtype)
  return c_old * cover_minimum(accumulators, shapes) + c_new * (gf * gf)


def scaled_update(g: jax.Array, nu: jax.Array, eps: jax.Array) -> jax.Array:
  """``g / sqrt(nu + eps)``, 0 where ``nu == 0``, in ``g``'s dtype."""
  zero = jnp.zeros([], nu.dtype)
  inv_sqrt = jnp.where(nu > 0, jax.lax.rsqrt(nu + eps), zero)
  return (g.astype(nu.dtype) * inv_sqrt).astype(g.dtype)


def _fold(
  source: jax.Array,
  accumulators: Sequence[jax.Array],
  cover: _cover.Cover,
  c_old: jax.Array,
  c_new: jax.Array,
  variant: str,
) -> tuple[jax.Array, ...]:
  """New accumulators from ``source`` (``nu`` for SM3-II, ``g**2`` for I)."""
  maxima = [jnp.max(source, axis=cover.reduced_axes(g)) for g in cover.groups]
  if variant == "II":
    return tuple(maxima)
  return tuple(c_old * a + c_new * m for a, m in zip(accumulators, maxima, strict=True))


def _direct(g, accumulators, cover, c_old, c_new, variant):
  if variant == "II":
    shapes = [cover.broadcast_shape(group) for group in cover.groups]
    source = estimate(g, accumulators, shapes, c_old, c_new)
  else:
    gf = g.astype(accumulators[0].dtype)
    source = gf * gf
  return _fold(source, accumulators, cover, c_old, c_new, variant)


def _blocked(g, accumulators, cover, c_old, c_new, variant, block_size):
  """``_direct`` as a loop over blocks of axis 0, with no full-size temporary."""
  rows = cover.shape[0]
  rows_per_block = max(1, min(rows, block_size // max(1, math.prod(cover.shape[1:]))))
  num_blocks = -(-rows // rows_per_block)
  dtype = accumulators[0].dtype
  # Accumulators indexed by axis 0 are written block by block; the others are
  # maxima over axis 0, carried across blocks.
  indexed = [cover.stacked > 0 or 0 in group for group in cover.groups]
  shapes = [
    (rows_per_block, *cover.broadcast_shape(group)[1:])
    if on_rows
    else cover.broadcast_shape(group)
    for group, on_rows in zip(cover.groups, indexed, strict=True)
  ]

  def body(index, carry):
    # The last block may overlap its predecessor: harmless for a maximum.
    start = jnp.minimum(index * rows_per_block, rows - rows_per_block)
    block = jax.lax.dynamic_slice_in_dim(g, start, rows_per_block, 0)
    if variant == "II":
      local = [
        jax.lax.dynamic_slice_in_dim(a, start, rows_per_block, 0) if on_rows else a
        for a, on_rows in zip(accumulators, indexed, strict=True)
      ]
      source = estimate(block, local, shapes, c_old, c_new)
    else:
      block = block.astype(dtype)
      source = block * block
    maxima = [jnp.max(source, axis=cover.reduced_axes(group)) for group in cover.groups]
    return tuple(
      jax.lax.dynamic_update_slice_in_dim(c, m, start, 0)
      if on_rows
      else jnp.maximum(c, m)
      for c, m, on_rows in zip(carry, maxima, indexed, strict=True)
    )

  init = tuple(
    jnp.zeros(a.shape, dtype) if on_rows else jnp.full(a.shape, -jnp.inf, dtype)
    for a, on_rows in zip(accumulators, indexed, strict=True)
  )
  maxima = jax.lax.fori_loop(0, num_blocks, body, init)
  if variant == "II":
    return maxima
  return tuple(c_old * a + c_new * m for a, m in zip(accumulators, maxima, strict=True))


def new_accumulators(
  g: jax.Array,
  accumulators: Sequence[jax.Array],
  cover: _cover.Cover,
  c_old: jax.Array,
  c_new: jax.Array,
  variant: str,
  block_size: int,
) -> tuple[jax.Array, ...]:
  """The accumulators after one step, blocked where that pays off.

  Args:
    g: the gradient.
    accumulators: the current accumulators, one per group of ``cover``.
    cover: the parameter's cover.
    c_old: weight of the old estimate.
    c_new: weight of the squared gradient.
    variant: ``"II"`` or ``"I"``.
    block_size: elements per block of the CPU loop; 0 disables it.

  Returns:
    The new accumulators, same shapes and dtype as the old.
  """
  if (
    block_size <= 0
    or len(cover.groups) < 2
    or math.prod(cover.shape) <= block_size
    or jax.device_count() != 1
  ):
    return _direct(g, accumulators, cover, c_old, c_new, variant)
  return jax.lax.platform_dependent(
    cpu=lambda: _blocked(g, accumulators, cover, c_old, c_new, variant, block_size),
    default=lambda: _direct(g, accumulators, cover, c_old, c_new, variant),
  )
