"""SM3's per-parameter arithmetic: the estimate ``nu`` and the new covers.

Two ways to compute the new accumulators, bit-identical (a maximum does not
depend on the order it is taken in):

* direct: ``nu`` over the whole parameter, then one reduction per group. XLA
  on the CPU materialises ``nu`` to feed the reductions: a temporary as large
  as the parameter, and an extra write and read of it.
* blocked: a loop over blocks of at most ``block_size`` entries (and at
  least two blocks) that forms ``nu`` one cache-sized block at a time and
  folds each block's maxima into the accumulators. Used on the CPU for
  parameters with more than ``MIN_LOOP_SIZE`` entries; the loops share one
  block-sized temporary. With several devices the loop runs per shard
  (``_partitioned``: slicing a sharded axis in a loop would make XLA gather
  the parameter), the devices of one host sharing its block: each takes
  ``block_size // devices`` entries, and the maxima are combined across the
  devices that split the reduced axes.

The update itself, ``g / sqrt(nu + eps)``, is left as one elementwise
expression of the gradient and the *old* accumulators, which XLA fuses with
whatever consumes it (momentum, ``optax.apply_updates``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from optax_sm3 import _cover, _partitioned

# Elements of ``nu`` formed per loop iteration on the CPU: 4 MiB of float32.
# Measured on the step-time benchmark's tree (benchmarks/step_time.py):
# 1 MiB blocks pay ~8% more per step in loop overhead, 16 MiB blocks fall out
# of the cache. 16-bit gradients are bound by their per-entry conversion to
# float32 instead, and run as fast with 1 MiB blocks, a quarter the temporary.
DEFAULT_BLOCK_SIZE = 1 << 20
DEFAULT_BLOCK_SIZE_16BIT = 1 << 18


# Parameters with at most this many entries keep the direct form. Each loop
# costs ~9 ms of XLA compile time (the 72 loops of the transformer tree of
# benchmarks/step_time.py: 1.15 s, against 0.5 s for the direct form; ~25 ms
# before the loop dropped jax.lax's negative-index wrap-around and was traced
# once per shape), and the gain shrinks with the size (scratch
# runs, not kept: 256 parameters of 128 x 128 ran at 1.18x Adam looped and
# 1.39x direct; 1024 of 32 x 64 ran slower looped, 1.51x against 1.40x, and
# took 4x longer to compile).
MIN_LOOP_SIZE = 1 << 16


def default_block_size(dtype) -> int:
  """The block size ``block_size=None`` stands for, for gradients of ``dtype``."""
  if jnp.dtype(dtype).itemsize <= 2:
    return DEFAULT_BLOCK_SIZE_16BIT
  return DEFAULT_BLOCK_SIZE


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
  """``g / sqrt(nu + eps)``, 0 where ``nu == 0``, in ``g``'s dtype.

  The double ``where`` keeps the derivative finite where ``nu == 0`` (with
  ``eps = 0`` the unused branch ``rsqrt(0)`` would otherwise turn the
  zero cotangent into ``0 * inf = NaN``).
  """
  zero = jnp.zeros([], nu.dtype)
  positive = nu > 0
  safe = jnp.where(positive, nu + eps, jnp.ones([], nu.dtype))
  inv_sqrt = jnp.where(positive, jax.lax.rsqrt(safe), zero)
  return (g.astype(nu.dtype) * inv_sqrt).astype(g.dtype)


def finite_or_zero(g: jax.Array) -> jax.Array:
  """``g`` with its non-finite entries replaced by 0, for the accumulators.

  NaN and infinite gradient entries count as zero in the accumulators on
  every path (direct, blocked, sparse rows) and platform; XLA's CPU
  max-reductions would otherwise keep a NaN in small arrays and drop it in
  large ones. The entry's own update stays non-finite.
  """
  return jnp.where(jnp.isfinite(g), g, jnp.zeros([], g.dtype))


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
  return _combine(maxima, accumulators, c_old, c_new, variant)


def _combine(maxima, accumulators, c_old, c_new, variant) -> tuple[jax.Array, ...]:
  """SM3-II keeps the maxima of ``nu``; SM3-I mixes the maxima of ``g**2`` in."""
  if variant == "II":
    return tuple(maxima)
  return tuple(c_old * a + c_new * m for a, m in zip(accumulators, maxima, strict=True))


def _direct(g, accumulators, cover, c_old, c_new, variant):
  g = finite_or_zero(g)
  if variant == "II":
    shapes = [cover.broadcast_shape(group) for group in cover.groups]
    source = estimate(g, accumulators, shapes, c_old, c_new)
  else:
    gf = g.astype(accumulators[0].dtype)
    source = gf * gf
  return _fold(source, accumulators, cover, c_old, c_new, variant)


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


def _blocked(g, accumulators, cover, c_old, c_new, variant, block_size):
  """``_direct`` as a loop over blocks, with no parameter-sized temporary."""
  shape = cover.shape
  tiling = _tiling(shape, block_size)
  block_shape = tiling.block_shape(shape)
  dtype = accumulators[0].dtype
  # The axes each accumulator is indexed by, in the parameter's axis order.
  indexed = [tuple(range(cover.stacked)) + tuple(group) for group in cover.groups]
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
  size = math.prod(cover.shape)
  if block_size <= 0 or len(cover.groups) < 2 or size <= MIN_LOOP_SIZE:
    return _direct(g, accumulators, cover, c_old, c_new, variant)
  if jax.device_count() != 1:
    # The loop per shard, wherever XLA places the gradient (_partitioned).
    return jax.lax.platform_dependent(
      cpu=lambda: _partitioned.new_accumulators(
        g, accumulators, cover, c_old, c_new, variant, block_size
      ),
      default=lambda: _direct(g, accumulators, cover, c_old, c_new, variant),
    )
  # At least two blocks, also for parameters that would fit in one: XLA folds
  # a one-trip loop back into the direct form, and its CPU scheduler forms
  # every parameter's direct ``nu`` before the first reduction, so they would
  # all be live at once (`python benchmarks/step_time.py --tree transformer
  # --with-direct`: 2.1x Adam's step time with a temporary as large as the
  # parameters; looped, 0.8x and 1.7%).
  block = min(block_size, -(-size // 2))
  return _looped(
    g,
    tuple(accumulators),
    c_old,
    c_new,
    cover=cover,
    variant=variant,
    block_size=block,
  )


@functools.partial(jax.jit, static_argnames=("cover", "variant", "block_size"))
def _looped(g, accumulators, c_old, c_new, *, cover, variant, block_size):
  """The blocked form on a CPU, the direct form elsewhere.

  A nested ``jax.jit``: parameters of one shape and dtype are traced and
  lowered once per step, not once each (``platform_dependent`` traces both
  forms), which was most of the lowering time of a tree of many layers.
  """
  return jax.lax.platform_dependent(
    cpu=lambda: _blocked(g, accumulators, cover, c_old, c_new, variant, block_size),
    default=lambda: _direct(g, accumulators, cover, c_old, c_new, variant),
  )
