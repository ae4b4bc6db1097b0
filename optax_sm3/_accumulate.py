"""SM3's per-parameter step: the new accumulators and the scaled update.

The new accumulators come from one of the two bit-identical forms of
``_blocks``. The blocked form (a loop over blocks of at most ``block_size``
entries, and at least two blocks) runs on the CPU for parameters with more
than ``MIN_LOOP_SIZE`` entries, the loops sharing one block-sized temporary;
the direct form runs elsewhere. With several devices the loop runs per shard
(``_partitioned``: slicing a sharded axis in a loop would make XLA gather
the parameter), the devices of one host sharing its block: each takes
``block_size // devices`` entries, and the maxima are combined across the
devices that split the reduced axes.

The update itself, ``g / sqrt(nu + eps)``, is left as one elementwise
expression of the gradient and the *old* accumulators, which XLA fuses with
whatever consumes it (momentum, ``optax.apply_updates``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from optax_sm3 import _blocks, _cover, _partitioned

__all__ = [
  "DEFAULT_BLOCK_SIZE",
  "DEFAULT_BLOCK_SIZE_16BIT",
  "MIN_LOOP_SIZE",
  "default_block_size",
  "new_accumulators",
  "scaled_update",
]

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
# a loop with jax.lax's negative-index wrap-around and one trace per
# parameter instead of per shape), and the gain shrinks with the size
# (scratch runs, not kept: 256 parameters of 128 x 128 ran at 1.18x Adam
# looped and 1.39x direct; 1024 of 32 x 64 ran slower looped, 1.51x against
# 1.40x, and took 4x longer to compile).
MIN_LOOP_SIZE = 1 << 16


def default_block_size(dtype) -> int:
  """The block size ``block_size=None`` stands for, for gradients of ``dtype``."""
  if jnp.dtype(dtype).itemsize <= 2:
    return DEFAULT_BLOCK_SIZE_16BIT
  return DEFAULT_BLOCK_SIZE


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
    config = _blocks.Config(cover, variant, block_size)
    return _blocks.direct(config, g, accumulators, c_old, c_new)
  if jax.device_count() != 1:
    # The loop per shard, wherever XLA places the gradient.
    config = _blocks.Config(cover, variant, block_size)
    return jax.lax.platform_dependent(
      cpu=lambda: _partitioned.blocked(config, g, accumulators, c_old, c_new),
      default=lambda: _blocks.direct(config, g, accumulators, c_old, c_new),
    )
  # At least two blocks, also for parameters that would fit in one: XLA folds
  # a one-trip loop back into the direct form, and its CPU scheduler forms
  # every parameter's direct ``nu`` before the first reduction, so they would
  # all be live at once (`python benchmarks/step_time.py --tree transformer
  # --with-direct`: 2.1x Adam's step time with a temporary as large as the
  # parameters; looped, 0.8x and 1.7%).
  config = _blocks.Config(cover, variant, min(block_size, -(-size // 2)))
  return _looped(config, g, tuple(accumulators), c_old, c_new)


@functools.partial(jax.jit, static_argnums=0)
def _looped(config, g, accumulators, c_old, c_new):
  """The blocked form on a CPU, the direct form elsewhere.

  A nested ``jax.jit``: parameters of one shape and dtype are traced and
  lowered once per step, not once each (``platform_dependent`` traces both
  forms; traced once each, they would take most of the lowering time of a
  tree of many layers).
  """
  return jax.lax.platform_dependent(
    cpu=lambda: _blocks.blocked(config, g, accumulators, c_old, c_new),
    default=lambda: _blocks.direct(config, g, accumulators, c_old, c_new),
  )
