"""The SM3 authors' learning-rate recipe as an optax schedule."""

from __future__ import annotations

import math
import numbers

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
import optax

from optax_sm3 import _validation


def _total_steps(value: jax.typing.ArrayLike) -> int | jax.Array:
  """``total_steps`` checked: a Python int, or an integer JAX array (traced)."""
  if isinstance(value, (jax.Array, np.ndarray)) and not isinstance(
    value, (bool, np.bool_)
  ):
    if np.shape(value) != () or not jnp.issubdtype(value.dtype, jnp.integer):
      raise TypeError(f"`total_steps` must be an integer scalar, got {value!r}")
    if isinstance(value, jax.core.Tracer):
      return value
    value = int(value)
  elif isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
    raise TypeError(f"`total_steps` must be an int, got {value!r}")
  value = int(value)
  if value < 1:
    raise ValueError(f"`total_steps` must be >= 1, got {value}")
  return value


def _length(
  fraction: jax.typing.ArrayLike, total_steps: int | jax.Array
) -> float | jax.Array:
  """``ceil(fraction * total_steps)``: in Python for Python numbers, else in
  float32 (the same for a concrete array as for a tracer)."""
  if isinstance(fraction, (numbers.Real, np.generic)) and isinstance(total_steps, int):
    return float(math.ceil(fraction * total_steps))
  return jnp.ceil(jnp.asarray(fraction, jnp.float32) * total_steps)


def warmup_schedule(
  peak_value: jax.typing.ArrayLike,
  total_steps: int | jax.Array,
  *,
  warmup_fraction: jax.typing.ArrayLike = 0.05,
  decay_fraction: jax.typing.ArrayLike = 0.0,
) -> optax.Schedule:
  r"""Quadratic warm-up, then constant, then (optionally) linear decay to 0.

  With :math:`w` warm-up steps and :math:`d` decay steps out of :math:`T`:

  .. math::

    \eta(t) = \eta_{peak} \cdot \min\left(1, \left(\frac{t}{w}\right)^2,
                                      \frac{T - t}{d}\right)

  clipped at 0 (a term is left out when its length is 0), with
  :math:`w = \lceil \text{warmup\_fraction} \cdot T \rceil` and
  :math:`d = \lceil \text{decay\_fraction} \cdot T \rceil` (computed in
  float32 when a fraction is a JAX array). This is the recipe of the SM3
  authors' code, whose README writes the warm-up ratio upside down
  (``(w / t)^2``, which starts infinite); this is the intended form.

  Every argument may be traced (``jax.jit``, ``optax.inject_hyperparams``);
  the range checks below apply to the values that are known.

  Args:
    peak_value: the constant rate after warm-up, finite and ``>= 0``.
    total_steps: :math:`T`, the number of training steps, ``>= 1``: a Python
      or NumPy integer, or an integer JAX scalar.
    warmup_fraction: :math:`w / T` in ``[0, 1]``; 5% by default.
    decay_fraction: :math:`d / T` in ``[0, 1]``; 0 (no decay) by default,
      the authors used 10%. ``warmup_fraction + decay_fraction <= 1``.

  Returns:
    An optax schedule: a function from the step count to the rate.

  Raises:
    ValueError: for a known argument out of its range (the message names
      it).
    TypeError: for a ``total_steps`` that is not an integer.

  Examples:
    >>> import optax_sm3
    >>> schedule = optax_sm3.warmup_schedule(1.0, 100, decay_fraction=0.1)
    >>> [round(float(schedule(t)), 3) for t in (0, 1, 4, 5, 50, 90, 95, 100)]
    [0.0, 0.04, 0.64, 1.0, 1.0, 1.0, 0.5, 0.0]

  References:
    Anil et al., `Memory-Efficient Adaptive Optimization
    <https://arxiv.org/abs/1901.11150>`_, 2019
  """
  _validation.check_range("peak_value", peak_value, low=0.0)
  total_steps = _total_steps(total_steps)
  _validation.check_range("warmup_fraction", warmup_fraction, low=0.0, high=1.0)
  _validation.check_range("decay_fraction", decay_fraction, low=0.0, high=1.0)
  warmup, decay = (
    _validation.concrete_value(warmup_fraction),
    _validation.concrete_value(decay_fraction),
  )
  if warmup is not None and decay is not None and warmup + decay > 1.0:
    raise ValueError(
      "`warmup_fraction + decay_fraction` must be <= 1, got "
      f"{warmup_fraction} + {decay_fraction}"
    )
  warmup_steps = _length(warmup_fraction, total_steps)
  decay_steps = _length(decay_fraction, total_steps)

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    factor = jnp.ones([], jnp.float32)
    # A zero length leaves its term out; the maximum keeps the unused
    # quotient finite.
    factor = jnp.where(
      warmup_steps > 0,
      jnp.minimum(factor, (t / jnp.maximum(warmup_steps, 1.0)) ** 2),
      factor,
    )
    factor = jnp.where(
      decay_steps > 0,
      jnp.minimum(factor, (total_steps - t) / jnp.maximum(decay_steps, 1.0)),
      factor,
    )
    return peak_value * jnp.clip(factor, 0.0, 1.0)

  return schedule
