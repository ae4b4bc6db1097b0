"""Learning rates the braintools way: schedulers attached to the optimizer.

braintools drives an optimizer's rate with an ``LRScheduler`` that writes
into it; a float ``lr`` becomes a constant scheduler (:class:`ConstantLR`)
and an optax schedule is read from the step count. None of it imports
braintools: a scheduler is recognised by its attributes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from optax_sm3 import _tree
from optax_sm3._brainstate._states import Box

if TYPE_CHECKING:
  from typing_extensions import TypeIs


class RateHolder(Protocol):
  """A ``.value`` holder of the rates, one per group (a brainstate State)."""

  @property
  def value(self) -> Sequence[float]:
    """The rates."""
    ...

  @value.setter
  def value(self, rates: list[float], /) -> None: ...


class LRScheduler(Protocol):
  """A learning-rate scheduler as :class:`SM3` drives one.

  A braintools ``LRScheduler``, or :class:`ConstantLR` (what a float ``lr``
  becomes). Recognised by these attributes (:func:`is_scheduler`), so
  braintools is not imported.
  """

  @property
  def base_lrs(self) -> Sequence[float]:
    """The initial rate of each group."""
    ...

  @property
  def current_lrs(self) -> RateHolder:
    """The rates the groups use now."""
    ...

  def get_last_lr(self) -> list[float]:
    """The current rates."""
    ...

  def apply(self, apply_fn: Callable[[float], float]) -> None:
    """Sets the rates to ``apply_fn`` of the scheduled ones."""
    ...


def is_schedule(lr: Any) -> bool:
  """Whether a group's ``lr`` entry is an optax schedule (not a holder)."""
  return callable(lr) and not hasattr(lr, "value")


def nice_float(value: jax.typing.ArrayLike) -> float | jax.Array:
  """The shortest decimal that rounds to the float32 ``value`` (0.1, not 0.1000…)."""
  if isinstance(value, jax.core.Tracer):
    return value
  return float(str(np.float32(np.asarray(value))))


def is_scheduler(lr: object) -> TypeIs[LRScheduler]:
  """Whether ``lr`` looks like a braintools ``LRScheduler`` (duck-typed)."""
  return all(
    hasattr(lr, name) for name in ("current_lrs", "base_lrs", "get_lr", "apply")
  )


def attach(scheduler: Any, optimizer: Any) -> None:
  """Attaches a braintools scheduler to ``optimizer`` as braintools does.

  ``LRScheduler.attach_optimizer`` insists on a braintools optimizer, so its
  effect is reproduced here: the scheduler's ``apply`` (run by its ``step``)
  then writes the new rates into ``optimizer.param_groups[i]['lr']`` and
  ``optimizer._current_lr``, and the first rate is the scheduled one.
  """
  scheduler.optimizer = optimizer
  try:
    rates = scheduler.get_lr()
  except (AttributeError, NotImplementedError, TypeError, IndexError, KeyError):
    return  # as braintools: a scheduler not ready to compute keeps its rates
  scheduler.current_lrs.value = (
    list(rates) if isinstance(rates, (list, tuple)) else [rates]
  )


class ConstantLR:
  """A constant learning rate with the braintools ``LRScheduler`` interface.

  What ``optax_sm3.brainstate.SM3(lr=0.1).lr_scheduler`` is, as braintools
  turns a float ``lr`` into ``braintools.optim.ConstantLR(base_lr=lr,
  factor=1.0, total_iters=0)``: ``step()`` counts epochs and keeps the rate,
  ``apply(fn)`` sets the rate to ``fn(base_lr)`` (not cumulative, as in
  braintools), and an attached optimizer follows both.

  Args:
    base_lr: the rate.
  """

  def __init__(self, base_lr: float):
    self.optimizer = None
    self.base_lrs = [base_lr]
    self.last_epoch = Box(0)
    self.current_lrs = Box([base_lr])

  def __repr__(self) -> str:
    return f"ConstantLR(base_lr={self.base_lrs[0]!r})"

  def get_lr(self) -> list[float]:
    """The scheduled rates: ``base_lrs``."""
    return list(self.base_lrs)

  def step(self, epoch: int | None = None) -> None:
    """Advances the epoch counter (the rate stays ``fn(base_lr)``)."""
    self.last_epoch.value = self.last_epoch.value + 1 if epoch is None else epoch
    self.apply(lambda rate: rate)

  def step_epoch(self) -> None:
    """Same as :meth:`step`."""
    self.step()

  def apply(self, apply_fn: Callable[[float], float]) -> None:
    """Sets the rates to ``apply_fn(base_lr)`` and pushes them to the optimizer."""
    rates = [apply_fn(rate) for rate in self.get_lr()]
    self.current_lrs.value = rates
    if self.optimizer is not None:
      for group, rate in zip(self.optimizer.param_groups, rates, strict=False):
        group["lr"].value = rate
      # The attribute braintools' own schedulers write the rate to.
      self.optimizer._current_lr.value = rates[0]

  def get_last_lr(self) -> list[float]:
    """The current rates."""
    return list(self.current_lrs.value)

  def __call__(self, count: jax.typing.ArrayLike) -> jax.Array:
    """Minus the current rate, for ``optax.scale_by_schedule`` (as braintools)."""
    del count
    return -jnp.asarray(self.current_lrs.value[0])

  def state_dict(self) -> dict[str, _tree.ArrayTree]:
    """``last_epoch``, ``base_lrs`` and ``current_lrs``, as braintools saves them."""
    return {
      "last_epoch": self.last_epoch.value,
      "base_lrs": list(self.base_lrs),
      "current_lrs": list(self.current_lrs.value),
    }

  # Any: a checkpoint as braintools types it, its entries read by key.
  def load_state_dict(self, state_dict: dict[str, Any]) -> None:
    """Restores what :meth:`state_dict` returned."""
    self.last_epoch.value = state_dict["last_epoch"]
    self.base_lrs = list(state_dict["base_lrs"])
    self.current_lrs.value = list(state_dict.get("current_lrs", self.base_lrs))
