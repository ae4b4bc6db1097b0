"""Argument checks shared by the public factories.

Hyperparameters may arrive as Python numbers, NumPy scalars, concrete JAX
arrays or tracers (under ``jax.jit`` and ``optax.inject_hyperparams``). Only
values that are known now are checked; tracers pass through untouched so that
no Python branch ever depends on a traced value.
"""

from __future__ import annotations

import numbers

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
import optax


def concrete_value(value: object) -> float | None:
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
  value: jax.typing.ArrayLike,
  *,
  low: float | None = None,
  high: float | None = None,
  low_open: bool = False,
  high_open: bool = False,
) -> None:
  """Raises if a known ``value`` lies outside ``[low, high]`` or is not finite.

  Args:
    name: the argument's name, used in the message.
    value: the argument's value; tracers are not checked.
    low: lower bound, or ``None`` for none.
    high: upper bound, or ``None`` for none.
    low_open: exclude ``low`` itself.
    high_open: exclude ``high`` itself.

  Raises:
    TypeError: if ``value`` is not a real scalar.
    ValueError: if ``value`` is NaN, infinite or out of range.
  """
  try:
    number = concrete_value(value)
  except TypeError as error:
    raise TypeError(f"`{name}` must be a real number: {error}") from None
  if number is None:
    return
  below = low is not None and (number < low or (low_open and number == low))
  above = high is not None and (number > high or (high_open and number == high))
  if not np.isfinite(number) or below or above:
    # Infinite values are never accepted: an unbounded side is open.
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    low_text = "-inf" if low is None else f"{low:g}"
    high_text = "inf" if high is None else f"{high:g}"
    raise ValueError(
      f"`{name}` must be in {left}{low_text}, {high_text}{right}, got {value!r}"
    )


def check_bool(name: str, value: object) -> bool:
  """Returns ``value`` as a Python bool, or raises ``TypeError``.

  Only ``True``/``False`` (Python or NumPy) are accepted: a string such as
  ``"no"`` would otherwise count as true.
  """
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  raise TypeError(f"`{name}` must be a bool, got {value!r}")


def float_dtype(name: str, dtype: jax.typing.DTypeLike | None) -> np.dtype | None:
  """``dtype`` as a real floating NumPy dtype (``None`` passes through).

  Raises:
    TypeError: if ``dtype`` is not a dtype, or not a real floating one.
  """
  if dtype is None:
    return None
  try:
    result = jnp.dtype(dtype)
  except TypeError as error:
    raise TypeError(f"`{name}` must be a floating dtype, got {dtype!r}") from error
  if not jnp.issubdtype(result, jnp.floating):
    raise TypeError(
      f"`{name}` must be a real floating dtype (e.g. float32, bfloat16), got {result}"
    )
  return result


def check_float_leaves(tree: optax.Params, what: str) -> None:
  """Raises ``TypeError`` naming the path of any leaf that is not real floating.

  Args:
    tree: parameters (Python numbers and arrays).
    what: the caller's name, for the message.
  """
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    dtype = jnp.result_type(leaf)
    if jnp.issubdtype(dtype, jnp.complexfloating):
      raise ValueError(
        f"{what} does not support complex parameters; got dtype {dtype} at "
        f"{jax.tree_util.keystr(path)}. Split them into real and imaginary "
        "parts first."
      )
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f"{what} needs real floating parameters; got dtype {dtype} at "
        f"{jax.tree_util.keystr(path)} (an integer or bool parameter cannot "
        "take a fractional step)"
      )


def runtime_check_zero(value: jax.typing.ArrayLike | None, message: str) -> None:
  """Raises ``ValueError(message)`` if ``value`` is not 0.

  A concrete value is checked now; a traced one by a host callback, which
  raises (as a ``JaxRuntimeError`` carrying ``message``) when the step
  executes.
  """
  if not isinstance(value, jax.core.Tracer):
    if value is not None and float(np.asarray(value)) != 0.0:
      raise ValueError(f"{message} (got {float(np.asarray(value))})")
    return

  def check(v):
    if float(np.asarray(v)) != 0.0:
      raise ValueError(f"{message} (got {float(np.asarray(v))})")

  jax.debug.callback(check, value)


def complement(
  value: jax.typing.ArrayLike, dtype: jax.typing.DTypeLike
) -> tuple[jax.Array, jax.Array]:
  """``(value, 1 - value)`` as scalars of ``dtype``.

  For a Python or NumPy number ``1 - value`` is formed in double precision
  before rounding, as optax does; a JAX array (possibly traced) is
  subtracted in ``dtype``.
  """
  if isinstance(value, (numbers.Real, np.generic)) and not isinstance(value, jax.Array):
    return jnp.asarray(value, dtype), jnp.asarray(1.0 - float(value), dtype)
  value = jnp.asarray(value, dtype)
  return value, jnp.ones([], dtype) - value


def is_static_zero(value: jax.typing.ArrayLike | None) -> bool:
  """Whether ``value`` is ``None`` or a Python/NumPy number equal to zero.

  JAX arrays never count as static, even concrete ones: under
  ``optax.inject_hyperparams`` and ``jax.jit`` the same argument may be
  concrete or traced, and the state's structure must not differ between
  the two. Decisions about the state's structure are taken with this.
  """
  if value is None:
    return True
  if isinstance(value, (numbers.Real, np.generic)) and not isinstance(value, jax.Array):
    return float(value) == 0.0
  return False


# optax >= 0.2.6 names it safe_increment; earlier releases safe_int32_increment.
_safe_increment = getattr(optax, "safe_increment", None) or optax.safe_int32_increment


def safe_increment(count: jax.Array) -> jax.Array:
  """``count + 1``, saturating at the dtype's maximum (optax's step counter)."""
  return jnp.asarray(_safe_increment(count))
