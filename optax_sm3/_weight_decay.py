"""Weight decay whose presence is decided once, at ``init``."""

from __future__ import annotations

from typing import Any, NamedTuple

import optax

from optax_sm3 import _validation


class WeightDecayState(NamedTuple):
  """State of the weight-decay stage of :func:`optax_sm3.sm3` when it is on.

  The stage keeps no numbers; the state's type records that decay was on at
  ``init`` (when it was off, the state is ``optax.EmptyState()``).

  Attributes:
    inner: the state of :func:`optax.add_decayed_weights` (empty, or an
      ``optax.MaskedState`` around an empty state when a mask is given).
  """

  inner: optax.OptState


def add_decayed_weights(
  weight_decay: Any, mask: Any = None, *, always: bool = False
) -> optax.GradientTransformation:
  """``optax.add_decayed_weights`` that is left out when the decay is 0 at init.

  Whether the stage is on is decided at ``init`` from the value
  ``weight_decay`` has then, and read back from the state's type at
  ``update``: a Python ``0.0`` and an ``optax.inject_hyperparams``-injected
  ``0.0`` give the same state, and neither needs ``params`` at ``update``.
  A state made with the stage off cannot decay later: ``update`` raises if
  ``weight_decay`` is non-zero (when the step executes, for a traced value).

  Args:
    weight_decay: the decay rate, ``>= 0``; may be traced.
    mask: as :func:`optax.add_decayed_weights`.
    always: keep the stage on even for a decay of 0 at ``init`` (then
      ``update`` always needs ``params``).

  Returns:
    A :class:`optax.GradientTransformation`.
  """
  inner = optax.add_decayed_weights(weight_decay, mask)

  def init_fn(params):
    if not always and _validation.concrete_zero(weight_decay):
      return optax.EmptyState()
    return WeightDecayState(inner.init(params))

  def update_fn(updates, state, params=None):
    if not isinstance(state, WeightDecayState):
      _validation.runtime_check_zero(
        weight_decay, "weight_decay", "the weight-decay stage was left out"
      )
      return updates, state
    if params is None:
      raise ValueError(
        "weight decay needs the parameters: call update(grads, state, params)"
      )
    updates, inner_state = inner.update(updates, state.inner, params)
    return updates, WeightDecayState(inner_state)

  return optax.GradientTransformation(init_fn, update_fn)
