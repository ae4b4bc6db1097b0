"""Weight decay whose state does not depend on the decay's value."""

from __future__ import annotations

import numbers
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_sm3 import _tree, _validation


class WeightDecayState(NamedTuple):
  """State of the weight-decay stage of :func:`optax_sm3.sm3`.

  The stage keeps no numbers, and its state is the same whatever the decay's
  value (0 or not, a Python number, an array or a tracer), so that
  ``jax.jit`` and :func:`optax.inject_hyperparams` give the state tree of a
  plain call.

  Attributes:
    inner: the state of :func:`optax.add_decayed_weights` (empty, or an
      ``optax.MaskedState`` around an empty state when a mask is given).
  """

  inner: optax.OptState


def add_decayed_weights(
  weight_decay: jax.typing.ArrayLike | None,
  mask: _tree.TreeOrFunction | None = None,
) -> optax.GradientTransformation:
  """``optax.add_decayed_weights`` that needs no ``params`` for a static 0.

  ``None`` or a Python or NumPy number equal to 0 (known when the
  transformation is built, whatever ``jax.jit`` or injection does later)
  passes the updates through, and ``update`` may then be called without
  ``params``. Any other value, including a JAX array or tracer equal to 0,
  adds ``weight_decay * params`` (a zero decay adds zeros). A non-zero
  Python number needs ``params``, as ``optax.add_decayed_weights`` does; so
  does an array, but an array equal to 0 (an injected hyperparameter) is
  let through without them, and a non-zero one raises a ``ValueError``
  (when the step executes, for a traced one). The updates keep their dtype
  (a float32 decay does not promote bfloat16 updates).

  Args:
    weight_decay: the decay rate, ``>= 0``, or ``None``; may be traced.
    mask: as :func:`optax.add_decayed_weights` (a tree of booleans or a
      function returning one; optax decides which by its leaves).

  Returns:
    A :class:`optax.GradientTransformation` whose state is a
    :class:`WeightDecayState`.
  """
  off = _validation.is_static_zero(weight_decay)
  # optax types the rate as a float, an Array or a schedule; any real scalar works.
  rate = 0.0 if off else cast(optax.ScalarOrSchedule, weight_decay)
  inner = optax.add_decayed_weights(rate, mask)

  def init_fn(params):
    return WeightDecayState(inner.init(params))

  def update_fn(updates, state, params=None):
    if off:
      return updates, state
    if params is None:
      if isinstance(weight_decay, (numbers.Real, np.generic)):
        raise ValueError(
          "weight decay needs the parameters: call update(grads, state, params)"
        )
      # An array (injected) decay of 0 needs no parameters; any other value
      # is refused (when the step executes, for a traced one).
      _validation.runtime_check_zero(
        weight_decay,
        "`weight_decay` is not 0, so weight decay needs the parameters: call "
        "update(grads, state, params)",
      )
      return updates, state
    decayed, inner_state = inner.update(updates, state.inner, params)
    # A float32 array decay would promote bfloat16 updates: keep their dtype.
    decayed = jax.tree.map(
      lambda d, u: jnp.asarray(d).astype(jnp.result_type(u)), decayed, updates
    )
    return decayed, WeightDecayState(inner_state)

  return optax.GradientTransformation(init_fn, update_fn)
