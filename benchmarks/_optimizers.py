"""The optimizers compared, each with a learning-rate grid of the same size.

Every factory takes the (possibly traced) rate and the run's step count, so
one compiled loop serves the whole grid.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import optax

import optax_sm3


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """A named ``make(learning_rate, total_steps)`` and its learning-rate grid."""

  name: str
  make: Callable[[Any, int], optax.GradientTransformation]
  grid: tuple[float, ...]


def _scheduled(make, **schedule):
  """``make`` at the rate times ``optax_sm3.warmup_schedule(..., **schedule)``."""

  def factory(learning_rate, total_steps):
    factor = optax_sm3.warmup_schedule(1.0, total_steps, **schedule)
    return make(lambda count: learning_rate * factor(count))

  return factory


# The recipe's schedule, read from optax_sm3.sm3_recipe's defaults (quadratic
# warm-up over 2%, linear cool-down over the last 30%), so that Adam gets
# whatever the schedule is worth to SM3.
_RECIPE_SCHEDULE = {
  name: inspect.signature(optax_sm3.sm3_recipe).parameters[name].default
  for name in ("warmup_fraction", "decay_fraction")
}


# The grids are centred on each optimizer's usual rates: SM3 and AdaGrad sum
# squared gradients, so their steps shrink over time and want larger rates;
# Adafactor's rate is relative to the parameters' scale.
_ADAM_GRID, _SUM_GRID = (3e-4, 1e-3, 3e-3, 1e-2), (0.03, 0.1, 0.3, 1.0)
OPTIMIZERS = {
  o.name: o
  for o in (
    Optimizer("sm3-recipe", optax_sm3.sm3_recipe, (1e-3, 3e-3, 1e-2, 3e-2)),
    Optimizer("sm3-m0", _scheduled(lambda lr: optax_sm3.sm3(lr, 0.0)), _SUM_GRID),
    Optimizer("sm3-m0.9", _scheduled(lambda lr: optax_sm3.sm3(lr, 0.9)), _SUM_GRID),
    Optimizer("adam", lambda lr, _: optax.adam(lr), _ADAM_GRID),
    Optimizer("adam-wsd", _scheduled(optax.adam, **_RECIPE_SCHEDULE), _ADAM_GRID),
    Optimizer("adagrad", lambda lr, _: optax.adagrad(lr), (0.01, 0.03, 0.1, 0.3)),
    Optimizer("adafactor", lambda lr, _: optax.adafactor(lr), (3e-3, 1e-2, 3e-2, 0.1)),
    Optimizer("optax.sm3", lambda lr, _: optax.sm3(lr), _SUM_GRID),
  )
}
