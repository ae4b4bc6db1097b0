"""The SM3 recipe chosen across workloads: no momentum, tiny state."""

from __future__ import annotations

import jax
import optax

from optax_sm3 import _schedules, _sm3, _tree, _validation


def sm3_recipe(
  learning_rate: jax.typing.ArrayLike = 8e-3,
  total_steps: int | jax.Array | None = None,
  *,
  beta: jax.typing.ArrayLike = 0.99,
  bias_correction: bool = True,
  warmup_fraction: jax.typing.ArrayLike = 0.02,
  decay_fraction: jax.typing.ArrayLike = 0.3,
  merge_axes_up_to: int | None = 2048,
  eps: jax.typing.ArrayLike = 1e-8,
  weight_decay: jax.typing.ArrayLike | None = 0.0,
  weight_decay_mask: _tree.TreeOrFunction | None = None,
  grad_clip_norm: jax.typing.ArrayLike | None = None,
  accumulator_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  r"""SM3 without momentum, chosen to transfer across workloads: the low-memory preset.

  Exactly

  .. code-block:: python

    optax_sm3.sm3(
        optax_sm3.warmup_schedule(learning_rate, total_steps,
                                  warmup_fraction=0.02, decay_fraction=0.3),
        momentum=0.0, beta=0.99, bias_correction=True, merge_axes_up_to=2048)

  that is: second moments as a moving average (``beta=0.99``) over SM3's
  covers, corrected for starting at zero as Adam corrects its own (the
  estimate is divided by ``1 - 0.99**t`` at step ``t``), no momentum buffer,
  a short quadratic warm-up (2% of the steps), a constant rate, and a
  linear cool-down to 0 over the last 30% of the steps; parameters of at
  most 2,048 entries get per-entry accumulators (a few KiB). The state is
  the accumulators alone: :math:`O(\sum_r d_r)` per parameter, about 2% of
  Adam's on a small transformer.

  The settings were chosen by ``python -m benchmarks.transfer``, which
  leaves one workload out at a time (four workloads: character-level
  transformers on Shakespeare and on SymPy's source code, a word-level
  Wikipedia transformer with tied embeddings, a bidirectional encoder
  counting syllables) and picks, on the other three validation splits, the
  setting whose worst gap to a tuned Adam is smallest: this one, in every
  fold. Its default peak rate and cool-down, ``8e-3`` over the last 30%,
  were chosen the same way (``python -m benchmarks.transfer``: the
  ``(decay_fraction, learning_rate)`` pair, of four cool-downs and nine
  rates, whose worst validation gap to a tuned Adam is smallest) on seven
  workloads, among them three classifiers and a model with a ``2**18``-row
  table, and the syllable classifier again at 5x its steps. Untuned, the
  recipe is within 2% of a tuned Adam on five of the seven; the
  documentation's recipe guide has the tables, and the two where it is
  not (two small classifiers). Rates are on Adam's scale (``beta > 0``
  normalises like RMSProp): the workloads' own best rates lay between
  8e-3 and 3.2e-2, the syllable classifier's at 5x the steps at 2e-3 to
  4e-3. ``sm3_recipe(lr, n, decay_fraction=0.1)`` with ``lr=4e-3`` is the
  previous default.

  Under :func:`optax.inject_hyperparams` every numeric argument may be
  injected (and traced under ``jax.jit``) except ``merge_axes_up_to``, which
  fixes the state's shapes: list it in ``static_args`` (a traced one raises
  a ``TypeError`` saying so). The momentum of 0 is the recipe's own Python
  number, so an injected recipe keeps no momentum buffer either.

  Args:
    learning_rate: the peak rate, reached after the warm-up, finite and
      ``>= 0`` (may be a traced scalar); ``8e-3`` by default.
    total_steps: the number of training steps, ``>= 1``; the cool-down ends
      at 0 on the last one. An int, or an integer JAX scalar (may be
      traced). Required (it has a default only so that ``learning_rate``
      can have one): ``sm3_recipe(total_steps=10_000)``.
    beta: second-moment decay in ``[0, 1)``.
    bias_correction: correct the ``beta`` average for starting at zero (see
      :func:`optax_sm3.scale_by_sm3`); a Python bool.
    warmup_fraction: warm-up length as a fraction of ``total_steps``.
    decay_fraction: cool-down length as a fraction of ``total_steps``;
      ``0.3`` by default.
    merge_axes_up_to: SM3's cover option (see :func:`optax_sm3.sm3`); ``None``
      keeps one accumulator per axis everywhere. Structural: never traced.
    eps: added to the estimate before the square root, ``>= 0``.
    weight_decay: decoupled weight decay (as AdamW), ``>= 0``.
    weight_decay_mask: which leaves decay (see :func:`optax_sm3.sm3`).
    grad_clip_norm: clip the gradient's global norm first, or ``None``.
    accumulator_dtype: the accumulators' dtype, or ``None`` for float32 (the
      parameters' dtype where that is wider).

  Returns:
    An :class:`optax.GradientTransformation`, the same chain as
    :func:`optax_sm3.sm3` builds (so it works with every optax wrapper and
    with :func:`optax_sm3.state_shardings`).

  Raises:
    TypeError: without ``total_steps``.
    ValueError: for an argument out of its range (the messages of
      :func:`optax_sm3.warmup_schedule` and :func:`optax_sm3.sm3`).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_sm3
    >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))}
    >>> opt = optax_sm3.sm3_recipe(total_steps=1000)  # the default rate, 8e-3
    >>> state = opt.init(params)
    >>> for _ in range(2):
    ...   updates, state = opt.update(params, state, params)
    >>> print(jnp.round(updates["w"][0], 7))  # step 1 of 20 warming up: 8e-3 / 20**2
    [-2.e-05 -2.e-05 -2.e-05]

  References:
    Anil et al., `Memory-Efficient Adaptive Optimization
    <https://arxiv.org/abs/1901.11150>`_, 2019
  """
  if total_steps is None:
    raise TypeError(
      "sm3_recipe() needs `total_steps` (its cool-down ends on the last step), "
      "e.g. sm3_recipe(total_steps=10_000)"
    )
  _validation.check_range("learning_rate", learning_rate, low=0.0)
  schedule = _schedules.warmup_schedule(
    learning_rate,
    total_steps,
    warmup_fraction=warmup_fraction,
    decay_fraction=decay_fraction,
  )
  return _sm3.sm3(
    schedule,
    0.0,
    beta,
    eps,
    bias_correction=bias_correction,
    weight_decay=weight_decay,
    weight_decay_mask=weight_decay_mask,
    grad_clip_norm=grad_clip_norm,
    accumulator_dtype=accumulator_dtype,
    merge_axes_up_to=merge_axes_up_to,
  )
