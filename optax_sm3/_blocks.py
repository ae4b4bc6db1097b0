"""SM3's per-block arithmetic: the estimate ``nu`` and the new accumulators.

Two forms of the new accumulators, bit-identical (a maximum does not depend
on the order it is taken in):

* :func:`direct`: ``nu`` over the whole array, then one reduction per group.
  XLA on the CPU materialises ``nu`` to feed the reductions: a temporary as
  large as the array, and an extra write and read of it.
* :func:`blocked`: a loop over blocks of at most ``block_size`` entries that
  forms ``nu`` one cache-sized block at a time and folds each block's maxima
  into the accumulators; the only temporary is one block.

Both take an array and the cover of its shape: a whole parameter, or the
shard of one that a device holds; which form runs where is the caller's
choice.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from optax_sm3 import _cover


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


def finite_or_zero(g: jax.Array) -> jax.Array:
  """``g`` with its non-finite entries replaced by 0, for the accumulators.

  NaN and infinite gradient entries count as zero in the accumulators on
  every path (direct, blocked, sparse rows) and platform; XLA's CPU
  max-reductions would otherwise keep a NaN in small arrays and drop it in
  large ones. The entry's own update stays non-finite.
  """
  return jnp.where(jnp.isfinite(g), g, jnp.zeros([], g.dtype))


@dataclasses.dataclass(frozen=True)
class Config:
  """What one parameter's update is specialised on (hashable).

  Attributes:
    cover: the cover of the array's shape.
    variant: ``"II"`` or ``"I"``.
    block_size: the most entries of ``g`` a block of :func:`blocked` holds;
      :func:`direct` ignores it.
  """

  cover: _cover.Cover
  variant: str
  block_size: int

  def indexed(self) -> list[tuple[int, ...]]:
    """The array axes each accumulator is indexed by, in order."""
    stacked = tuple(range(self.cover.stacked))
    return [stacked + tuple(group) for group in self.cover.groups]


def _combine(maxima, accumulators, c_old, c_new, variant) -> tuple[jax.Array, ...]:
  """SM3-II keeps the maxima of ``nu``; SM3-I mixes the maxima of ``g**2`` in."""
  if variant == "II":
    return tuple(maxima)
  return tuple(c_old * a + c_new * m for a, m in zip(accumulators, maxima, strict=True))


def direct(
  config: Config,
  g: jax.Array,
  accumulators: Sequence[jax.Array],
  c_old: jax.Array,
  c_new: jax.Array,
) -> tuple[jax.Array, ...]:
  """The accumulators after one step, from ``nu`` over the whole of ``g``.

  Args:
    config: the cover of ``g``'s shape and the variant.
    g: the gradient (or a shard of it).
    accumulators: the current accumulators, one per group of the cover.
    c_old: weight of the old estimate (1, or ``beta``).
    c_new: weight of the squared gradient (1, or ``1 - beta``).

  Returns:
    The new accumulators, same shapes and dtype as the old.
  """
  cover = config.cover
  g = finite_or_zero(g)
  if config.variant == "II":
    shapes = [cover.broadcast_shape(group) for group in cover.groups]
    # The maxima of ``nu``.
    source = estimate(g, accumulators, shapes, c_old, c_new)
  else:
    # The maxima of ``g**2``.
    gf = g.astype(accumulators[0].dtype)
    source = gf * gf
  maxima = [jnp.max(source, axis=cover.reduced_axes(gr)) for gr in cover.groups]
  return _combine(maxima, accumulators, c_old, c_new, config.variant)


@dataclasses.dataclass(frozen=True)
class _Tiling:
  """How a parameter is cut into blocks for the CPU loop.

  Blocks hold ``rows`` consecutive indices of ``axis`` and every index of the
  axes after it, at one fixed index of each axis before it. So a block never
  holds more than ``block_size`` entries, whatever the parameter's rank.
  """

  axis: int
  rows: int
  row_blocks: int
  outer: tuple[int, ...]

  @property
  def num_blocks(self) -> int:
    return math.prod(self.outer) * self.row_blocks

  def block_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (1,) * self.axis + (self.rows,) + shape[self.axis + 1 :]

  def starts(self, index: jax.Array, shape: tuple[int, ...]) -> list[jax.Array]:
    """The block's first index along every axis."""
    # Non-negative indices: truncating division is floor division, and a few
    # scalar ops less matter inside a loop body.
    row_block = index
    leading = []
    if self.outer:
      outer, row_block = (
        jax.lax.div(index, self.row_blocks),
        jax.lax.rem(index, self.row_blocks),
      )
      for size in reversed(self.outer[1:]):
        leading.append(jax.lax.rem(outer, size))
        outer = jax.lax.div(outer, size)
      leading.append(outer)
    # The last block may overlap its predecessor: harmless for a maximum.
    row = jnp.minimum(row_block * self.rows, shape[self.axis] - self.rows)
    zero = jnp.zeros([], index.dtype)
    return [*reversed(leading), row] + [zero] * (len(shape) - self.axis - 1)


def _tiling(shape: tuple[int, ...], block_size: int) -> _Tiling:
  """Cuts along the first axis whose trailing sub-tensor fits in a block."""
  axis = next(a for a in range(len(shape)) if math.prod(shape[a + 1 :]) <= block_size)
  rows = min(shape[axis], max(1, block_size // math.prod(shape[axis + 1 :])))
  return _Tiling(axis, rows, -(-shape[axis] // rows), shape[:axis])


# The loop's indices are never negative: without the wrap-around of negative
# indices that ``jax.lax`` adds by default, XLA compiles each loop in about
# two thirds of the time (72 loops of the transformer tree of
# benchmarks/step_time.py: 1.1 s instead of 1.6 s).
def _slice(operand, starts, sizes):
  return jax.lax.dynamic_slice(operand, starts, sizes, allow_negative_indices=False)


def _update_slice(operand, update, starts):
  return jax.lax.dynamic_update_slice(
    operand, update, starts, allow_negative_indices=False
  )


def _varying_axes(x: jax.Array) -> frozenset:
  """The manual (``shard_map``) mesh axes ``x`` varies along."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", ()))  # jax 0.9


def blocked(
  config: Config,
  g: jax.Array,
  accumulators: Sequence[jax.Array],
  c_old: jax.Array,
  c_new: jax.Array,
) -> tuple[jax.Array, ...]:
  """:func:`direct` as a loop over blocks, with no temporary the size of ``g``.

  Blocks hold at most ``config.block_size`` entries. Under ``shard_map`` it
  runs on the device's shard, ``config.cover`` being the cover of the
  shard's shape.
  """
  cover, variant = config.cover, config.variant
  shape = cover.shape
  tiling = _tiling(shape, config.block_size)
  block_shape = tiling.block_shape(shape)
  dtype = accumulators[0].dtype
  # The axes each accumulator is indexed by, in the parameter's axis order.
  indexed = config.indexed()
  local_shapes = [
    tuple(block_shape[a] if a in axes else 1 for a in range(len(shape)))
    for axes in indexed
  ]
  # How a block's maxima enter each accumulator. The axes up to the tiling
  # axis vary between blocks. Indexed by all of them, an accumulator gets a
  # part of its own from each block ("own": written, and where the clamped
  # last block overlaps it rewrites the same values); indexed by none, every
  # block covers all of it ("whole"); otherwise parts are revisited ("part").
  varying = set(range(tiling.axis + 1))
  merges = [
    "own" if varying <= set(axes) else "part" if varying & set(axes) else "whole"
    for axes in indexed
  ]

  def body(index, carry):
    # Tying the gradient to the loop counter keeps XLA from hoisting a
    # whole-parameter conversion out of the loop: the CPU backend upcasts
    # bf16/f16 slices to f32, and loop-invariant code motion would then
    # convert all of ``g`` at once.
    index, grad = jax.lax.optimization_barrier((index, g))
    starts = tiling.starts(index, shape)
    block = finite_or_zero(_slice(grad, starts, block_shape))

    # Where each accumulator's part for this block starts, and its size.
    at = [[starts[a] for a in axes] for axes in indexed]
    sizes = [[block_shape[a] for a in axes] for axes in indexed]
    if variant == "II":
      local = [
        _slice(a, s, n).reshape(shape_)
        for a, s, n, shape_ in zip(accumulators, at, sizes, local_shapes, strict=True)
      ]
      source = estimate(block, local, local_shapes, c_old, c_new)
    else:
      block = block.astype(dtype)
      source = block * block
    new_carry = []
    for c, group, s, n, merge in zip(
      carry, cover.groups, at, sizes, merges, strict=True
    ):
      maximum = jnp.max(source, axis=cover.reduced_axes(group)).reshape(n)
      if merge == "whole":
        new_carry.append(jnp.maximum(c, maximum))
        continue
      if merge == "part":
        maximum = jnp.maximum(_slice(c, s, n), maximum)
      new_carry.append(_update_slice(c, maximum, s))
    return tuple(new_carry)

  init = tuple(jnp.full(a.shape, -jnp.inf, dtype) for a in accumulators)
  # Under shard_map the maxima vary along every manual axis an input does;
  # the loop's initial carry must say so too.
  vma = set().union(*(_varying_axes(x) for x in (g, *accumulators, c_old, c_new)))
  if vma:
    init = jax.lax.pcast(init, tuple(sorted(vma)), to="varying")
  maxima = jax.lax.fori_loop(0, tiling.num_blocks, body, init)
  return _combine(maxima, accumulators, c_old, c_new, variant)
