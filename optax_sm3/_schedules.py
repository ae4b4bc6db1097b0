"""The SM3 authors' learning-rate recipe as an optax schedule."""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

from optax_sm3 import _validation


def warmup_schedule(
  peak_value: Any,
  total_steps: int,
  *,
  warmup_fraction: float = 0.05,
  decay_fraction: float = 0.0,
) -> optax.Schedule:
  r"""Quadratic warm-up, then constant, then (optionally) linear decay to 0.

  With :math:`w` warm-up steps and :math:`d` decay steps out of :math:`T`:

  .. math::

    \eta(t) = \eta_{peak} \cdot \min\left(1, \left(\frac{t}{w}\right)^2,
                                      \frac{T - t}{d}\right)

  clipped at 0 (a term is left out when its length is 0). This is the recipe
  of the SM3 authors' code, whose README writes the warm-up ratio upside down
  (``(w / t)^2``, which starts infinite); this is the intended form.

  Args:
    peak_value: the constant rate after warm-up, finite and ``>= 0``.
    total_steps: :math:`T`, the number of training steps, ``>= 1`` (a Python
      or NumPy integer).
    warmup_fraction: :math:`w / T` in ``[0, 1]``; 5% by default.
    decay_fraction: :math:`d / T` in ``[0, 1]``; 0 (no decay) by default,
      the authors used 10%. ``warmup_fraction + decay_fraction <= 1``.

  Returns:
    An optax schedule: a function from the step count to the rate.

  Raises:
    ValueError: for any argument out of its range.

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
  if isinstance(total_steps, (bool, np.bool_)) or not isinstance(
    total_steps, numbers.Integral
  ):
    raise TypeError(f"`total_steps` must be an int, got {total_steps!r}")
  total_steps = int(total_steps)
  if total_steps < 1:
    raise ValueError(f"`total_steps` must be >= 1, got {total_steps}")
  _validation.check_range("warmup_fraction", warmup_fraction, low=0.0, high=1.0)
  _validation.check_range("decay_fraction", decay_fraction, low=0.0, high=1.0)
  if warmup_fraction + decay_fraction > 1.0:
    raise ValueError(
      "`warmup_fraction + decay_fraction` must be <= 1, got "
      f"{warmup_fraction} + {decay_fraction}"
    )
  warmup_steps = math.ceil(warmup_fraction * total_steps)
  decay_steps = math.ceil(decay_fraction * total_steps)

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    factor = jnp.ones([], jnp.float32)
    if warmup_steps:
      factor = jnp.minimum(factor, (t / warmup_steps) ** 2)
    if decay_steps:
      factor = jnp.minimum(factor, (total_steps - t) / decay_steps)
    return peak_value * jnp.clip(factor, 0.0, 1.0)

  return schedule
