"""Polyak averaging: evaluation parameters as a moving average of the trained."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_sm3 import _validation


class PolyakState(NamedTuple):
  """State of :func:`polyak_averaging`.

  Attributes:
    count: ``[]`` int32: the number of updates averaged so far (saturating at
      the int32 maximum).
    average: a tree like the parameters: the average of the parameters as
      they stand after the latest update (the initial parameters before
      any), each leaf of its parameter's shape, dtype ``average_dtype`` (or
      the parameter's dtype when ``average_dtype`` is ``None``). Read it
      with :func:`polyak_params`.
  """

  count: jax.Array
  average: optax.Params


def polyak_averaging(
  decay: jax.typing.ArrayLike = 0.999,
  *,
  debias: bool = True,
  average_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  r"""Keeps a moving average of the parameters to evaluate with.

  The updates pass through unchanged; the state keeps the average. The
  :math:`t`-th call of ``update`` receives the parameters
  :math:`p_{t-1}` and the final updates :math:`u_t`, forms the parameters
  the caller is about to hold, :math:`p_t = p_{t-1} + u_t` (rounded to the
  parameter's dtype, as :func:`optax.apply_updates` does), and averages
  them in, so that after ``params = optax.apply_updates(params, updates)``
  the average includes ``params``:

  .. math::

    a_0 = p_0, \qquad
    a_t = (1 - \eta_t)\, a_{t-1} + \eta_t\, p_t, \qquad
    \eta_t = \begin{cases}
      \dfrac{1 - \delta}{1 - \delta^t} & \text{debias (} 1/t
      \text{ when } \delta = 1\text{)} \\[1ex]
      1 - \delta & \text{otherwise}
    \end{cases}

  With ``debias`` (the default) :math:`a_t = \sum_{s=1}^t \delta^{t-s} p_s
  / \sum_{s=1}^t \delta^{t-s}`: the exponential moving average of
  :func:`optax.ema` with its bias correction, in which the initial
  parameters carry no weight once a step is taken (:math:`\eta_1 = 1`);
  :math:`\delta = 1` gives the arithmetic mean of :math:`p_1, \dots, p_t`,
  Polyak and Juditsky's average proper. Without it, :math:`p_0` keeps the
  weight :math:`\delta^t` (0.61 after 500 steps at :math:`\delta = 0.999`).
  A decay injected as a schedule
  enters :math:`\eta_t` with its current value only.

  Chain it **last**, after the learning rate, the sign flip, weight decay
  and any clipping: it recovers :math:`p_t` as ``params + updates``, which
  is the next parameters only for the final updates (placed earlier it
  would average ``params`` plus gradients). It is a transformation rather
  than a wrapper around an optimizer so that it composes with optax's own
  wrappers and with :class:`flax.nnx.Optimizer` unchanged: inside
  :class:`optax.MultiSteps` it averages once per real step, inside
  :func:`optax.apply_if_finite` a skipped step leaves it untouched.

  Memory: one buffer the size of the parameters, in ``average_dtype``
  (4 bytes an entry in float32; ``jnp.bfloat16`` halves that), and an int32.
  That is half of Adam's state for float32 parameters (a quarter in
  bfloat16), far more than SM3's own. The average is computed in at least
  float32 and rounded to ``average_dtype`` after every step; in bfloat16
  (8 significant bits) a step moves the average only if
  :math:`\eta_t |p_t - a_{t-1}|` exceeds half a bfloat16 unit in the last
  place of :math:`a_{t-1}` (0.2% to 0.4% of :math:`|a_{t-1}|`), so with
  :math:`\eta_t` near 0 a bfloat16 average lags or stalls: keep float32
  unless :math:`1 - \delta` is large or memory decides.

  Args:
    decay: :math:`\delta` in ``[0, 1]``; may be traced (for
      :func:`optax.inject_hyperparams`).
    debias: divide out the weight of the start, as above.
    average_dtype: dtype of the average; ``None`` keeps the parameter's.
      Under :func:`optax.inject_hyperparams` list it in ``static_args``
      (a dtype is callable, so it would be taken for a schedule).

  Returns:
    A :class:`optax.GradientTransformation` whose state is a
    :class:`PolyakState`; its ``update`` needs ``params``.

  Raises:
    ValueError: if ``decay`` is outside ``[0, 1]`` (when known); at
      ``update``, if ``params`` is not given.
    TypeError: if ``debias`` is not a bool, ``average_dtype`` is not a real
      floating dtype (or is an array), or (at ``init``) a parameter is not real floating.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_sm3
    >>> tx = optax.chain(optax.sgd(1.0), optax_sm3.polyak_averaging(0.5))
    >>> params = jnp.zeros([])
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, state = tx.update(jnp.asarray(-1.0), state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   print(f"{params:.0f} {optax_sm3.polyak_params(state):.4f}")
    1 1.0000
    2 1.6667
    3 2.4286

  References:
    Polyak and Juditsky, `Acceleration of Stochastic Approximation by
    Averaging <https://doi.org/10.1137/0330046>`_, 1992;
    Anil et al., `Memory-Efficient Adaptive Optimization
    <https://arxiv.org/abs/1901.11150>`_, 2019
  """
  _validation.check_range("decay", decay, low=0.0, high=1.0)
  debias = _validation.check_bool("debias", debias)
  if isinstance(average_dtype, (jax.Array, np.ndarray, np.generic)):
    # What optax.inject_hyperparams passes for a dtype: a callable, it is
    # taken for a schedule and called.
    raise TypeError(
      f"`average_dtype` must be a dtype, got an array {average_dtype!r}: under "
      "optax.inject_hyperparams list 'average_dtype' in static_args"
    )
  average_dtype = _validation.float_dtype("average_dtype", average_dtype)

  def init_fn(params):
    _validation.check_float_leaves(params, "polyak_averaging")
    # A copy, never the parameters' own buffer: both may be donated to a step.
    average = jax.tree.map(
      lambda p: jnp.asarray(p).astype(average_dtype or jnp.result_type(p), copy=True),
      params,
    )
    return PolyakState(jnp.zeros([], jnp.int32), average)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
        "polyak_averaging averages the parameters: call update(updates, state, params)"
      )
    count = _validation.safe_increment(state.count)

    def step(average, p, u):
      p = jnp.asarray(p)
      new_p = jnp.asarray(p + u).astype(p.dtype)  # optax.apply_updates
      dtype = jnp.promote_types(jnp.promote_types(p.dtype, average.dtype), jnp.float32)
      keep, rate = _weights(decay, count, debias, dtype)
      new = keep * average.astype(dtype) + rate * new_p.astype(dtype)
      return new.astype(average.dtype)

    average = jax.tree.map(step, state.average, params, updates)
    return updates, PolyakState(count, average)

  return optax.GradientTransformation(init_fn, update_fn)


def _weights(
  decay: jax.typing.ArrayLike,
  count: jax.Array,
  debias: bool,
  dtype: jax.typing.DTypeLike,
) -> tuple[jax.Array, jax.Array]:
  """``(1 - eta_t, eta_t)`` for step ``count`` (>= 1) as scalars of ``dtype``."""
  decay, one_minus_decay = _validation.complement(decay, dtype)
  if not debias:
    return decay, one_minus_decay
  t = count.astype(dtype)
  # 1 - decay**t without cancellation near decay = 1.
  bias = -jnp.expm1(t * jnp.log1p(-one_minus_decay))
  positive = bias > 0
  rate = jnp.where(
    positive,
    one_minus_decay / jnp.where(positive, bias, 1),
    1 / t,  # the limit as decay -> 1: the arithmetic mean
  )
  # eta_1 = 1 exactly, which the quotient misses by an ulp for most decays:
  # the first step replaces the start.
  rate = jnp.where(count > 1, rate, 1)
  return 1 - rate, rate


def polyak_params(opt_state: optax.OptState) -> optax.Params:
  """The averaged parameters kept by :func:`polyak_averaging` in a state.

  Searches any optimizer state tree (a chain, :func:`optax.inject_hyperparams`,
  :class:`optax.MultiSteps`, the ``opt_state`` of a
  :class:`flax.nnx.Optimizer`) for its one :class:`PolyakState` and returns
  that state's ``average``: a tree like the parameters, in the average's
  dtype. Works under ``jax.jit``. With Flax NNX, evaluate on a copy of the
  model (tested in ``tests/test_polyak.py``):

  .. code-block:: python

    optimizer = nnx.Optimizer(
        model,
        optax.chain(optax_sm3.sm3(0.1), optax_sm3.polyak_averaging(0.999)),
        wrt=nnx.Param)
    ...  # train with optimizer.update(model, grads)
    eval_model = nnx.clone(model)
    nnx.update(eval_model, optax_sm3.polyak_params(optimizer.opt_state))

  Args:
    opt_state: an optimizer state.

  Returns:
    The average, a tree of the parameters' structure.

  Raises:
    ValueError: if the state holds no :class:`PolyakState`, or more than one.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_sm3
    >>> tx = optax.chain(optax_sm3.sm3(0.1), optax_sm3.polyak_averaging())
    >>> optax_sm3.polyak_params(tx.init({"w": jnp.ones(2)}))
    {'w': Array([1., 1.], dtype=float32)}
  """
  found = [
    leaf
    for leaf in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PolyakState))
    if isinstance(leaf, PolyakState)
  ]
  if not found:
    raise ValueError(
      "the optimizer state holds no PolyakState: chain "
      "optax_sm3.polyak_averaging(decay) last in the optimizer"
    )
  if len(found) > 1:
    raise ValueError(
      f"the optimizer state holds {len(found)} PolyakStates; pass the one "
      "whose average you want (its .average field)"
    )
  return found[0].average
