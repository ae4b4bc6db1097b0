"""The ready SM3 optimizer: clipping, weight decay, SM3, momentum, step size."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_sm3 import _momentum, _scale_by_sm3, _tree, _validation, _weight_decay

_WEIGHT_DECAY_MODES = ("decoupled", "coupled")


class SM3Stages(NamedTuple):
  """The stages of :func:`sm3`'s chain, in order, as the chain holds them.

  Attributes:
    clip: the clipping stages (``optax.clip_by_global_norm``, then
      ``optax.clip``), those that are in the chain.
    coupled_decay: the weight-decay stage before SM3
      (``weight_decay_mode="coupled"``), or ``None``.
    preconditioner: the :func:`optax_sm3.scale_by_sm3` stage.
    momentum: the :func:`optax_sm3.scale_by_momentum` stage.
    decoupled_decay: the weight-decay stage after momentum (the default
      mode), or ``None``.
    rate: the ``optax.scale_by_learning_rate`` stage.
  """

  clip: tuple[optax.GradientTransformation, ...]
  coupled_decay: optax.GradientTransformation | None
  preconditioner: optax.GradientTransformation
  momentum: optax.GradientTransformation
  decoupled_decay: optax.GradientTransformation | None
  rate: optax.GradientTransformation

  def chain(self) -> list[optax.GradientTransformation]:
    """The stages in chain order, ``None``s left out."""
    return [
      *self.clip,
      *([self.coupled_decay] if self.coupled_decay is not None else []),
      self.preconditioner,
      self.momentum,
      *([self.decoupled_decay] if self.decoupled_decay is not None else []),
      self.rate,
    ]


class SM3Spec(NamedTuple):
  """What an optimizer made by :func:`sm3` is: its arguments and its stages.

  The fields are :func:`sm3`'s arguments, by name, as it was called (after
  its checks), and ``stages``, the :class:`SM3Stages` its chain is built
  from. The row-sparse path (:func:`optax_sm3.sparse_rows` and the front ends
  built on it) reads an optimizer's spec with :func:`spec_of` and derives its
  step from it, so the two paths share one source.
  """

  learning_rate: optax.ScalarOrSchedule
  momentum: jax.typing.ArrayLike | None
  beta: jax.typing.ArrayLike | Callable[[jax.Array], jax.Array]
  eps: jax.typing.ArrayLike
  bias_correction: bool
  nesterov: bool
  mu_dtype: jax.typing.DTypeLike | None
  weight_decay: jax.typing.ArrayLike | None
  weight_decay_mode: str
  weight_decay_mask: _tree.TreeOrFunction | None
  grad_clip_norm: jax.typing.ArrayLike | None
  grad_clip_value: jax.typing.ArrayLike | None
  variant: str
  accumulator_dtype: jax.typing.DTypeLike | None
  # As given to sm3 (a PerParam or None); in a table rule's spec, the
  # table's own resolved int (sparse._table_rule.table_rules).
  stacked_axes: Any
  merge_axes_up_to: int | None
  skip_unit_axes: bool
  block_size: int | None
  stages: SM3Stages


_ARGUMENTS = frozenset(SM3Spec._fields) - {"stages"}

# Each optimizer sm3 made, by its `update` function: the chain's own function
# object travels with every copy of the transformation (a pytree round trip,
# `_replace`), and a weak key drops the entry with the optimizer.
_SPECS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def spec_of(tx: object) -> SM3Spec | None:
  """The :class:`SM3Spec` of an optimizer made by :func:`sm3`, else ``None``.

  :func:`optax_sm3.sm3_recipe` returns :func:`sm3`'s optimizer, so it has
  one; a transformation wrapped by anything else (``optax.chain``,
  ``optax.inject_hyperparams``) does not.
  """
  update = getattr(tx, "update", None)
  try:
    return _SPECS.get(update)
  except TypeError:  # not weak-referenceable, so not one of ours
    return None


def sm3(
  learning_rate: optax.ScalarOrSchedule,
  momentum: jax.typing.ArrayLike | None = 0.9,
  beta: jax.typing.ArrayLike = 0.0,
  eps: jax.typing.ArrayLike = 1e-8,
  *,
  bias_correction: bool = False,
  nesterov: bool = False,
  mu_dtype: jax.typing.DTypeLike | None = None,
  weight_decay: jax.typing.ArrayLike | None = 0.0,
  weight_decay_mode: str = "decoupled",
  weight_decay_mask: _tree.TreeOrFunction | None = None,
  grad_clip_norm: jax.typing.ArrayLike | None = None,
  grad_clip_value: jax.typing.ArrayLike | None = None,
  variant: str = "II",
  accumulator_dtype: jax.typing.DTypeLike | None = None,
  stacked_axes: _scale_by_sm3.PerParam | None = None,
  merge_axes_up_to: int | None = None,
  skip_unit_axes: bool = False,
  block_size: int | None = None,
) -> optax.GradientTransformation:
  r"""The SM3 optimizer (Anil et al., 2019).

  An :func:`optax.chain` of, in order: clipping by global norm
  (``grad_clip_norm``), clipping by value (``grad_clip_value``), coupled L2
  weight decay (``weight_decay_mode="coupled"``: :math:`g \leftarrow g +
  \lambda \theta`), :func:`optax_sm3.scale_by_sm3`, momentum, decoupled
  weight decay (the default mode: :math:`u \leftarrow u + \lambda\theta`, as
  AdamW), and the learning rate:

  .. math::

    u_t &= \mathrm{SM3}(g_t) \quad\text{(see } \texttt{scale\_by\_sm3}) \\
    m_t &= \mu m_{t-1} + (1 - \mu) u_t \quad\text{(if } \mu > 0) \\
    \theta_{t+1} &= \theta_t - \eta_t (m_t + \lambda \theta_t)

  The chain's stages, and so the state's structure, are decided when the
  optimizer is built, from the arguments' types (``None`` or not, a Python
  number or an array), never from an array's value: ``jax.jit(opt.init)``
  gives the state tree of ``opt.init``, and the ``inner_state`` of
  ``optax.inject_hyperparams(sm3)(...)`` is the state tree of ``sm3(...)``,
  eagerly or under ``jax.jit``, save for one case below. A ``momentum`` of
  ``None`` or a Python or NumPy 0 keeps no momentum buffer, so the state is
  the accumulators alone, :math:`O(\sum_r d_r)` per parameter
  (``optax.sm3`` and the PyTorch ports keep a full-size buffer even then);
  an array keeps one, so that it can change at run time: an injected
  ``momentum=0.0`` keeps a buffer (the one case) unless ``momentum`` is in
  ``inject_hyperparams``'s ``static_args``. The weight-decay stage keeps no
  numbers and the same state for every value; with ``None`` or a Python 0 it
  passes the updates through and ``update`` needs no ``params``, otherwise
  (an injected 0 included) it needs them. A clipping stage is in the chain
  when its bound is not ``None``. A zero momentum or decay held in an array
  gives the updates of none (for finite parameters).

  For parameters of rank >= 1, ``sm3(lr, momentum)`` produces the same updates
  as ``optax.sm3(lr, momentum)``; unlike it, it accepts scalars, schedules
  and traced ``beta``/``eps``/``momentum`` (``optax.inject_hyperparams``).

  Args:
    learning_rate: a non-negative float or an optax schedule (a callable from
      the step count to the rate), e.g. :func:`optax_sm3.warmup_schedule`.
    momentum: :math:`\mu` in ``[0, 1)``, or ``None``; ``0``/``None`` disables
      momentum and its buffer.
    beta: second-moment decay in ``[0, 1)`` (``0``: sums, the paper's
      default); see :func:`optax_sm3.scale_by_sm3`.
    eps: ``>= 0``, added under the square root.
    bias_correction: correct the ``beta`` average for starting at zero, as
      Adam does (see :func:`optax_sm3.scale_by_sm3`); a Python bool.
    nesterov: Nesterov momentum.
    mu_dtype: dtype of the momentum buffer (``jnp.bfloat16`` halves it);
      ``None`` keeps the parameters' dtype.
    weight_decay: :math:`\lambda \ge 0`, or ``None`` (as 0).
    weight_decay_mode: ``"decoupled"`` (after preconditioning, AdamW style)
      or ``"coupled"`` (an L2 term added to the gradient before
      preconditioning, as braintools does).
    weight_decay_mask: a tree of booleans, or a callable from parameters to
      one, selecting the parameters that decay (``optax.add_decayed_weights``
      semantics: a tree whose leaves are not all callable, such as an
      Equinox module of booleans, is a tree).
    grad_clip_norm: if set (``> 0``), clip gradients to this global norm.
    grad_clip_value: if set (``> 0``), clip each gradient entry to
      ``[-grad_clip_value, grad_clip_value]``.
    variant: ``"II"`` (default) or ``"I"``; see
      :func:`optax_sm3.scale_by_sm3`.
    accumulator_dtype: see :func:`optax_sm3.scale_by_sm3`.
    stacked_axes: see :func:`optax_sm3.scale_by_sm3`.
    merge_axes_up_to: see :func:`optax_sm3.scale_by_sm3`.
    skip_unit_axes: see :func:`optax_sm3.scale_by_sm3`.
    block_size: see :func:`optax_sm3.scale_by_sm3` (CPU only; never changes
      results).

  Returns:
    The optimizer, an :class:`optax.GradientTransformation`.

  Raises:
    ValueError: for a negative or infinite learning rate, ``momentum`` or
      ``beta`` outside ``[0, 1)``, ``eps``/``weight_decay`` negative or
      infinite, clipping bounds ``<= 0`` or infinite, or an unknown
      ``weight_decay_mode`` or ``variant``.
    TypeError: for a non-bool ``nesterov``, a non-floating ``mu_dtype`` or
      ``accumulator_dtype``, or (at ``init``) non-floating parameters.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_sm3
    >>> def loss(params):
    ...   return jnp.sum((params["w"] @ jnp.ones(3) - 1.0) ** 2)
    >>> params = {"w": jnp.zeros((4, 3))}
    >>> opt = optax_sm3.sm3(learning_rate=0.1)
    >>> state = opt.init(params)
    >>> for step in range(5):
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = opt.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   print(f"step {step}: loss {loss(params):.4f}")
    step 0: loss 3.7636
    step 1: loss 3.4012
    step 2: loss 2.9753
    step 3: loss 2.5281
    step 4: loss 2.0887

  References:
    Anil et al., `Memory-Efficient Adaptive Optimization
    <https://arxiv.org/abs/1901.11150>`_, 2019
  """
  if not callable(learning_rate):
    _validation.check_range("learning_rate", learning_rate, low=0.0)
  if momentum is not None:
    _validation.check_range("momentum", momentum, low=0.0, high=1.0, high_open=True)
  if weight_decay is not None:
    _validation.check_range("weight_decay", weight_decay, low=0.0)
  if weight_decay_mode not in _WEIGHT_DECAY_MODES:
    raise ValueError(
      f"`weight_decay_mode` must be one of {_WEIGHT_DECAY_MODES}, got "
      f"{weight_decay_mode!r}"
    )
  for name, bound in (
    ("grad_clip_norm", grad_clip_norm),
    ("grad_clip_value", grad_clip_value),
  ):
    if bound is not None:
      _validation.check_range(name, bound, low=0.0, low_open=True)

  # The arguments as called (checked above): the spec's fields but `stages`.
  arguments = {name: value for name, value in locals().items() if name in _ARGUMENTS}
  decay = _weight_decay.add_decayed_weights(weight_decay, weight_decay_mask)
  stages = SM3Stages(
    clip=(
      *([] if grad_clip_norm is None else [optax.clip_by_global_norm(grad_clip_norm)]),
      *([] if grad_clip_value is None else [optax.clip(grad_clip_value)]),
    ),
    coupled_decay=decay if weight_decay_mode == "coupled" else None,
    preconditioner=_scale_by_sm3.scale_by_sm3(
      **{name: arguments[name] for name in _scale_by_sm3.PARAMETERS}
    ),
    momentum=_momentum.scale_by_momentum(
      momentum, nesterov=nesterov, mu_dtype=mu_dtype
    ),
    decoupled_decay=decay if weight_decay_mode == "decoupled" else None,
    rate=optax.scale_by_learning_rate(learning_rate),
  )
  tx = optax.chain(*stages.chain())
  _SPECS[tx.update] = SM3Spec(**arguments, stages=stages)
  return tx


def sm3_with_weight_decay_stage(
  learning_rate: optax.ScalarOrSchedule,
  *,
  weight_decay: jax.typing.ArrayLike | None = 0.0,
  **kwargs: Any,
) -> optax.GradientTransformation:
  """:func:`sm3` whose weight decay is applied even when it is 0.

  For the :class:`optax_sm3.brainstate.SM3` adapter, whose parameter groups
  may change their weight decay after the state was created: the decay is
  held as an array, so ``update`` always applies it (and needs ``params``).
  The state is the one :func:`sm3` makes. ``kwargs`` are :func:`sm3`'s other
  arguments.
  """
  weight_decay = 0.0 if weight_decay is None else weight_decay
  _validation.check_range("weight_decay", weight_decay, low=0.0)
  return sm3(
    learning_rate, weight_decay=jnp.asarray(weight_decay, jnp.float32), **kwargs
  )
