r"""Bringing rows up to date on the steps they sat out.

A row of an embedding table outside the batch has a zero gradient, so its SM3
update is zero and, for :func:`optax_sm3.sm3`'s chain (SM3, EMA momentum,
decoupled weight decay, learning rate), step :math:`s` only does

.. math::

  a_s = c_s a_{s-1}, \qquad
  m_s = \mu m_{s-1}, \qquad
  p_s = p_{s-1} - \eta_s (\nu m_s + \lambda p_{s-1}),

with :math:`a` the row's own SM3 accumulators, :math:`c_s` the
preconditioner's ``c_old`` (:math:`\beta_s`, or 1 with ``beta = 0``), and
:math:`\nu = 1`, or :math:`\nu = \mu` with Nesterov momentum (whose output
is :math:`\mu m_s + (1 - \mu) u` with :math:`u = 0`).

Composed over the steps :math:`a+1, \dots, n` this is linear with scalar
coefficients that depend only on :math:`(a, n)`, a :class:`Maps`:

.. math::

  a_n = C(a, n)\, a_a, \qquad m_n = M(a, n)\, m_a, \qquad
  p_n = D(a, n)\, p_a - E(a, n)\, m_a.

Two maps compose in :math:`O(1)` (:func:`compose`). A :class:`Ring` keeps
the map from each of the last ``W + 1`` steps to now, for a window
:math:`W` (the sweep period), in two levels so that a step costs
:math:`O(\sqrt W)`, not :math:`O(W)`: the steps are grouped in blocks of
:math:`b \approx \sqrt W`; ``Ring.steps`` maps each step to the end of its
block (to now, in the current block) and ``Ring.blocks`` maps each block's
end to now. A step composes every block's map and the current block's
steps' maps with the step's own (:func:`advance`); a row's catch-up is the
composition of its step's map and its block's (:func:`maps_at`).

:math:`G = D - 1` is accumulated on its own so that :math:`D p_a` can be
formed as :math:`p_a + G p_a`, losing no digits, when :math:`D` is close to
1 (the common case, :math:`\eta \lambda \ll 1`); when :math:`D < 1/2` the
product :math:`D p_a` is the accurate form (:func:`catch_up`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Maps(NamedTuple):
  r"""Zero-gradient steps composed: one map per entry of every field.

  Attributes:
    momentum_scale: :math:`M = \prod \mu`; ``m_n = M m_a``.
    decay: :math:`D = \prod_r (1 - \eta_r \lambda)`, the weight of ``p_a``
      in ``p_n``.
    decay_minus_one: :math:`G = D - 1`, accumulated separately.
    momentum_weight: :math:`E`, the weight of ``m_a`` in ``p_n``.
    accumulator_scale: :math:`C = \prod c_{old}`, the factor of a row's
      own SM3 accumulators.
  """

  momentum_scale: jax.Array
  decay: jax.Array
  decay_minus_one: jax.Array
  momentum_weight: jax.Array
  accumulator_scale: jax.Array


class Ring(NamedTuple):
  """The catch-up maps from each of the last ``W + 1`` steps to now.

  With block size ``b`` and ``n`` blocks (:func:`geometry`), step ``s``
  has column ``s % (n b)`` of ``steps`` and column ``(s % (n b)) // b`` of
  ``blocks``; the map from ``s`` to now is the block's after the step's.
  Each column is a map, its 5 entries :class:`Maps`'s fields in order (one
  array, so that a step updates it in place), in the dtype of the catch-up
  arithmetic (the table's, at least float32).

  Attributes:
    steps: shape ``(5, n b)``: from each step to the end of its block, or to
      now for the steps of the current block.
    blocks: shape ``(5, n)``: from the end of each block to now (the
      identity for the current block).
  """

  steps: jax.Array
  blocks: jax.Array


def geometry(window: int) -> tuple[int, int]:
  """``(block size, blocks)`` of the ring of a window of ``window`` steps.

  The slots of the current block past the current step hold stale maps,
  so the ring spans ``window + 1`` steps plus one block.
  """
  block = math.isqrt(window) + 1
  return block, -(-(window + 1) // block) + 1


_IDENTITY = (1.0, 1.0, 0.0, 0.0, 1.0)  # Maps' fields of the identity map


def _identity_maps(size: int, dtype: jax.typing.DTypeLike) -> jax.Array:
  column = jnp.asarray(_IDENTITY, dtype)[:, None]
  return jnp.broadcast_to(column, (len(_IDENTITY), size)).copy()


def identity(window: int, dtype: jax.typing.DTypeLike) -> Ring:
  """The ring of a ``window`` of steps, every map the identity."""
  block, blocks = geometry(window)
  return Ring(_identity_maps(block * blocks, dtype), _identity_maps(blocks, dtype))


def compose(first: Maps, then: Maps) -> Maps:
  """The map of ``first`` followed by ``then`` (fields broadcast)."""
  return Maps(
    momentum_scale=then.momentum_scale * first.momentum_scale,
    decay=then.decay * first.decay,
    decay_minus_one=first.decay_minus_one
    + then.decay_minus_one
    + first.decay_minus_one * then.decay_minus_one,
    momentum_weight=then.decay * first.momentum_weight
    + then.momentum_weight * first.momentum_scale,
    accumulator_scale=then.accumulator_scale * first.accumulator_scale,
  )


def one_step(
  mu: jax.Array,
  eta: jax.Array,
  lam: jax.Array,
  c_old: jax.Array,
  look_ahead: jax.Array | None = None,
) -> Maps:
  r"""The map of one zero-gradient step (scalars).

  Args:
    mu: the momentum :math:`\mu` (0 without momentum).
    eta: the step's learning rate :math:`\eta`.
    lam: the decoupled weight decay :math:`\lambda`.
    c_old: the preconditioner's factor of the old accumulators.
    look_ahead: :math:`\nu`, the weight of the momentum in the step's
      output (``mu`` with Nesterov momentum); ``None`` for 1.
  """
  shrink = eta * lam
  step = eta if look_ahead is None else eta * look_ahead
  # p_n = (1 - eta lam) p_{n-1} - eta nu mu m_{n-1}.
  return Maps(mu, 1 - shrink, -shrink, step * mu, c_old)


def _then(maps: Maps, step: Maps) -> Maps:
  """``compose(maps, step)`` for one step, with ``D`` and ``G`` formed as
  ``D - shrink D`` and ``G - shrink D`` (no ``1 - shrink`` rounding)."""
  shrink = -step.decay_minus_one
  return Maps(
    momentum_scale=step.momentum_scale * maps.momentum_scale,
    decay=maps.decay - shrink * maps.decay,
    decay_minus_one=maps.decay_minus_one - shrink * maps.decay,
    momentum_weight=maps.momentum_weight
    - shrink * maps.momentum_weight
    + step.momentum_weight * maps.momentum_scale,
    accumulator_scale=step.accumulator_scale * maps.accumulator_scale,
  )


def _followed(columns: jax.Array, step: Maps, position: jax.Array) -> jax.Array:
  """Every map (column) followed by ``step``; the one at ``position`` the
  identity."""
  new = jnp.stack(_then(Maps(*columns), step))
  return new.at[:, position].set(jnp.asarray(_IDENTITY, new.dtype))


def advance(ring: Ring, new_count: jax.Array, step: Maps) -> Ring:
  """The ring after the step to ``new_count``, whose map is ``step``.

  Every block's map, and the maps of the steps of ``new_count``'s block,
  are followed by ``step``; ``new_count``'s own map and its block's become
  the identity. ``O(block size + blocks)``.
  """
  fields, slots = ring.steps.shape
  block = slots // ring.blocks.shape[1]
  slot = new_count % slots
  start = slot - slot % block
  current = jax.lax.dynamic_slice(ring.steps, [0, start], [fields, block])
  current = _followed(current, step, slot - start)
  steps = jax.lax.dynamic_update_slice(ring.steps, current, [0, start])
  return Ring(steps, _followed(ring.blocks, step, slot // block))


def maps_at(ring: Ring, last: jax.Array) -> Maps:
  """The maps from steps ``last`` (within the ring's window) to now."""
  slots = ring.steps.shape[1]
  slot = last % slots
  block = slot // (slots // ring.blocks.shape[1])
  return compose(Maps(*ring.steps[:, slot]), Maps(*ring.blocks[:, block]))


def _column(x: jax.Array, ndim: int) -> jax.Array:
  return x.reshape((-1,) + (1,) * (ndim - 1))


def catch_up(
  maps: Maps, params: jax.Array, momentum: jax.Array | None
) -> tuple[jax.Array, jax.Array | None]:
  """Rows brought up to date by their maps (one per row, from :func:`maps_at`).

  Args:
    maps: one map per row: fields of shape ``(r,)``.
    params: shape ``(r, ...)``: the rows.
    momentum: the rows' momentum (same shape), or ``None`` without momentum.

  Returns:
    ``(params, momentum)`` at the current step, in their own dtypes.
  """
  dtype = maps.decay.dtype
  p = params.astype(dtype)
  decay = _column(maps.decay, p.ndim)
  minus_one = _column(maps.decay_minus_one, p.ndim)
  # D p as p + (D - 1) p near D = 1, as the product below 1/2.
  p = jnp.where(decay < 0.5, decay * p, p + minus_one * p)
  if momentum is None:
    return p.astype(params.dtype), None
  m = momentum.astype(dtype)
  p = p - _column(maps.momentum_weight, p.ndim) * m
  new_m = _column(maps.momentum_scale, m.ndim) * m
  return p.astype(params.dtype), new_m.astype(momentum.dtype)


def scale_rows(maps: Maps, accumulators: jax.Array) -> jax.Array:
  """Row-indexed accumulators (leading axis: the rows) brought up to date."""
  scale = _column(maps.accumulator_scale, accumulators.ndim)
  return (scale * accumulators.astype(scale.dtype)).astype(accumulators.dtype)
