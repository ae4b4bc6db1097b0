r"""Bringing rows up to date on the momentum and weight decay they missed.

A row of an embedding table outside the batch has a zero gradient, so its SM3
update is zero and, for :func:`optax_sm3.sm3`'s chain (SM3, EMA momentum,
decoupled weight decay, learning rate), step :math:`s` only does

.. math::

  m_s = \mu m_{s-1}, \qquad
  p_s = p_{s-1} - \eta_s (\nu m_s + \lambda p_{s-1}),

with :math:`\nu = 1`, or :math:`\nu = \mu` with Nesterov momentum (whose
output is :math:`\mu m_s + (1 - \mu) u` with :math:`u = 0`).

Composed over the steps :math:`a+1, \dots, n` this is linear with scalar
coefficients that depend only on :math:`(a, n)`:

.. math::

  m_n = M(a, n)\, m_a, \qquad
  p_n = D(a, n)\, p_a - E(a, n)\, m_a.

A :class:`Coefficients` ring keeps :math:`(M, D, D - 1, E)(s, n)` for the
last ``W + 1`` values of :math:`s`; each step maps every slot forward in
:math:`O(W)` (:func:`advance`) and resets the slot of the new step to the
identity. :math:`G = D - 1` is accumulated on its own so that
:math:`D p_a` can be formed as :math:`p_a + G p_a`, losing no digits, when
:math:`D` is close to 1 (the common case, :math:`\eta \lambda \ll 1`);
when :math:`D < 1/2` the product :math:`D p_a` is the accurate form.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Coefficients(NamedTuple):
  r"""The catch-up maps from each of the last ``W + 1`` steps to now.

  Slot ``s % (W + 1)`` maps a row that is current at step ``s`` (the dense
  optimizer's values after ``s`` updates) to the current step ``n``, for
  ``n - W <= s <= n``. All fields have shape ``(W + 1,)`` and the dtype of
  the catch-up arithmetic (the table's, at least float32).

  Attributes:
    momentum_scale: :math:`M(s, n) = \mu^{n - s}`; ``m_n = M m_s``.
    decay: :math:`D(s, n) = \prod_r (1 - \eta_r \lambda)`, the weight of
      ``p_s`` in ``p_n``.
    decay_minus_one: :math:`G(s, n) = D(s, n) - 1`, accumulated separately.
    momentum_weight: :math:`E(s, n)`, the weight of ``m_s`` in ``p_n``.
  """

  momentum_scale: jax.Array
  decay: jax.Array
  decay_minus_one: jax.Array
  momentum_weight: jax.Array


def identity(slots: int, dtype: jax.typing.DTypeLike) -> Coefficients:
  """Every slot the identity map (``M = D = 1``, ``G = E = 0``)."""
  # Four distinct buffers (a shared one could not be donated twice).
  return Coefficients(
    jnp.ones([slots], dtype),
    jnp.ones([slots], dtype),
    jnp.zeros([slots], dtype),
    jnp.zeros([slots], dtype),
  )


def advance(
  coefficients: Coefficients,
  new_count: jax.Array,
  mu: jax.Array,
  eta: jax.Array,
  lam: jax.Array,
  look_ahead: jax.Array | None = None,
) -> Coefficients:
  r"""Composes every slot with one zero-gradient step; resets ``new_count``'s.

  Args:
    coefficients: the ring, mapping to step ``new_count - 1``.
    new_count: the step just taken (the count after it).
    mu: the momentum :math:`\mu` (0 without momentum).
    eta: this step's learning rate :math:`\eta`.
    lam: the decoupled weight decay :math:`\lambda`.
    look_ahead: :math:`\nu`, the weight of the momentum in the step's
      output (``mu`` with Nesterov momentum); ``None`` for 1.

  Returns:
    The ring mapping to step ``new_count``; the slot of ``new_count - W - 1``
    (outside the window) becomes ``new_count``'s identity.
  """
  scale, decay, minus_one, weight = coefficients
  shrink = eta * lam
  # p_n = (1 - eta lam) p_{n-1} - eta nu m_n, with p_{n-1} = D p_s - E m_s
  # and m_n = mu M m_s.
  scale = mu * scale
  step = eta if look_ahead is None else eta * look_ahead
  weight = weight - shrink * weight + step * scale
  minus_one = minus_one - shrink * decay
  decay = decay - shrink * decay
  slot = new_count % scale.shape[0]
  return Coefficients(
    scale.at[slot].set(1),
    decay.at[slot].set(1),
    minus_one.at[slot].set(0),
    weight.at[slot].set(0),
  )


def catch_up(
  coefficients: Coefficients,
  last: jax.Array,
  params: jax.Array,
  momentum: jax.Array | None,
) -> tuple[jax.Array, jax.Array | None]:
  """Brings rows current at steps ``last`` to the ring's current step.

  Args:
    coefficients: the ring.
    last: shape ``(r,)``, int32: the step each row is current at (within the
      ring's ``W + 1`` steps).
    params: shape ``(r, ...)``: the rows.
    momentum: the rows' momentum (same shape), or ``None`` without momentum.

  Returns:
    ``(params, momentum)`` at the current step, in their own dtypes.
  """
  dtype = coefficients.decay.dtype
  slot = last % coefficients.decay.shape[0]
  column = (-1,) + (1,) * (params.ndim - 1)
  p = params.astype(dtype)
  decay = coefficients.decay[slot].reshape(column)
  minus_one = coefficients.decay_minus_one[slot].reshape(column)
  # D p as p + (D - 1) p near D = 1, as the product below 1/2.
  p = jnp.where(decay < 0.5, decay * p, p + minus_one * p)
  if momentum is None:
    return p.astype(params.dtype), None
  m = momentum.astype(dtype)
  p = p - coefficients.momentum_weight[slot].reshape(column) * m
  new_m = coefficients.momentum_scale[slot].reshape(column) * m
  return p.astype(params.dtype), new_m.astype(momentum.dtype)
