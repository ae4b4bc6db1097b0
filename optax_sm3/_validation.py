"""Argument checks shared by the public factories.

Hyperparameters may arrive as Python numbers, NumPy scalars, concrete JAX
arrays or tracers (under ``jax.jit`` and ``optax.inject_hyperparams``). Only
values that are known now are checked; tracers pass through untouched so that
no Python branch ever depends on a traced value.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete_value(value: Any) -> float | None:
  """Returns ``value`` as a Python float if it is a known real scalar.

  Args:
    value: a hyperparameter.

  Returns:
    The float, or ``None`` for tracers (their value is not known yet).

  Raises:
    TypeError: if ``value`` is neither a real number nor a scalar array.
  """
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, bool) or (
    not isinstance(value, numbers.Real)
    and not isinstance(value, (np.ndarray, np.generic, jax.Array))
  ):
    raise TypeError(f"expected a real number, got {value!r}")
  array = np.asarray(value)
  if array.shape != () or not (
    np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
  ):
    raise TypeError(f"expected a real scalar, got {value!r}")
  return float(array)


def check_range(
  name: str,
  value: Any,
  *,
  low: float | None = None,
  high: float | None = None,
  low_open: bool = False,
  high_open: bool = False,
) -> None:
  """Raises if a known ``value`` lies outside ``[low, high]``.

  Args:
    name: the argument's name, used in the message.
    value: the argument's value; tracers are not checked.
    low: lower bound, or ``None`` for none.
    high: upper bound, or ``None`` for none.
    low_open: exclude ``low`` itself.
    high_open: exclude ``high`` itself.

  Raises:
    TypeError: if ``value`` is not a real scalar.
    ValueError: if ``value`` is NaN or out of range.
  """
  try:
    number = concrete_value(value)
  except TypeError as error:
    raise TypeError(f"`{name}` must be a real number: {error}") from None
  if number is None:
    return
  below = low is not None and (number < low or (low_open and number == low))
  above = high is not None and (number > high or (high_open and number == high))
  if np.isnan(number) or below or above:
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    low_text = "-inf" if low is None else f"{low:g}"
    high_text = "inf" if high is None else f"{high:g}"
    raise ValueError(
      f"`{name}` must be in {left}{low_text}, {high_text}{right}, got {value!r}"
    )


def complement(value: Any, dtype: Any) -> tuple[jax.Array, jax.Array]:
  """``(value, 1 - value)`` as scalars of ``dtype``.

  For a Python or NumPy number ``1 - value`` is formed in double precision
  before rounding, as optax does; a JAX array (possibly traced) is
  subtracted in ``dtype``.
  """
  if isinstance(value, (numbers.Real, np.generic)) and not isinstance(value, jax.Array):
    return jnp.asarray(value, dtype), jnp.asarray(1.0 - float(value), dtype)
  value = jnp.asarray(value, dtype)
  return value, jnp.ones([], dtype) - value


def is_static_zero(value: Any) -> bool:
  """Whether ``value`` is ``None`` or a Python/NumPy number equal to zero.

  JAX arrays never count as static, even concrete ones: under
  ``optax.inject_hyperparams`` the same argument is concrete at ``init`` and
  traced at ``update``, and the state's structure must not differ between
  the two.
  """
  if value is None:
    return True
  if isinstance(value, (numbers.Real, np.generic)) and not isinstance(value, jax.Array):
    return float(value) == 0.0
  return False
