"""A NumPy SM3, written from the paper's equations, to test against.

Anil et al. 2019, Algorithms SM3-I and SM3-II. A cover is a list of index
sets ``S_1..S_n`` (here: boolean masks over the parameter) whose union is
every entry; one accumulator ``mu(r)`` per set. For entry ``i`` and step t:

SM3-II:  nu'(i) = min_{r: S_r contains i} mu(r) + g(i)^2
         mu(r)  = max_{j in S_r} nu'(j)
SM3-I:   mu(r)  = mu(r) + max_{j in S_r} g(j)^2
         nu(i)  = min_{r: S_r contains i} mu(r)

update(i) = g(i) / sqrt(nu(i) + eps), with 0/0 = 0. With ``beta > 0`` the
sums become moving averages: ``beta * old + (1 - beta) * g^2``.

Everything runs in float64, entry by entry set by set, independent of the
library's axis-wise reductions.
"""

from __future__ import annotations

import itertools

import numpy as np


def cover_sets(
  shape: tuple[int, ...], groups: tuple[tuple[int, ...], ...], stacked: int = 0
) -> list[np.ndarray]:
  """The index sets (as masks) of a cover given by groups of axes.

  The set for group ``S`` and index ``(b, s)`` (``b`` over the stacked
  axes) holds every entry whose stacked coordinates equal ``b`` and whose
  coordinates on the axes of ``S`` equal ``s``.
  """
  sets = []
  for group in groups:
    axes = tuple(range(stacked)) + tuple(group)
    for index in itertools.product(*(range(shape[a]) for a in axes)):
      mask = np.ones(shape, dtype=bool)
      for axis, value in zip(axes, index, strict=True):
        selector = [slice(None)] * len(shape)
        selector[axis] = np.arange(shape[axis]) != value
        mask[tuple(selector)] = False
      sets.append(mask)
  return sets


def default_groups(shape: tuple[int, ...], stacked: int = 0):
  """The paper's cover: one set per slice along each (non-stacked) axis."""
  axes = tuple(range(stacked, len(shape)))
  if len(axes) <= 1:
    return (axes,)
  return tuple((a,) for a in axes)


class ReferenceSM3:
  """SM3 on one parameter, with optional EMA momentum and a learning rate."""

  def __init__(
    self,
    shape,
    *,
    groups=None,
    stacked=0,
    beta=0.0,
    eps=1e-8,
    variant="II",
    momentum=0.0,
    learning_rate=1.0,
    bias_correction=False,
  ):
    shape = tuple(shape)
    if groups is None:
      groups = default_groups(shape, stacked)
    self.shape = shape
    self.sets = cover_sets(shape, groups, stacked)
    self.mu = np.zeros(len(self.sets))
    self.beta = beta  # a number, or a function of the step count (from 0)
    self.bias_correction = bias_correction
    self.count = 0
    self.eps = eps
    self.variant = variant
    self.momentum = momentum
    self.learning_rate = learning_rate
    self.m = np.zeros(shape)

  def _beta(self):
    return float(self.beta(self.count)) if callable(self.beta) else self.beta

  def _mix(self, old, new):
    beta = self._beta()
    if beta == 0:
      return old + new
    return beta * old + (1.0 - beta) * new

  def precondition(self, g: np.ndarray) -> np.ndarray:
    """One step of ``scale_by_sm3``: returns the preconditioned gradient."""
    g = np.asarray(g, np.float64).reshape(self.shape)
    g2 = g * g
    nu = np.full(self.shape, np.inf)
    if self.variant == "II":
      for r, mask in enumerate(self.sets):
        nu[mask] = np.minimum(nu[mask], self.mu[r])
      nu = self._mix(nu, g2)
      for r, mask in enumerate(self.sets):
        self.mu[r] = nu[mask].max()
    else:
      for r, mask in enumerate(self.sets):
        self.mu[r] = self._mix(self.mu[r], g2[mask].max())
      for r, mask in enumerate(self.sets):
        nu[mask] = np.minimum(nu[mask], self.mu[r])
    beta = self._beta()
    if self.bias_correction and beta:
      nu = nu / (1.0 - beta ** (self.count + 1))
    self.count += 1
    out = np.zeros(self.shape)
    positive = nu > 0
    out[positive] = g[positive] / np.sqrt(nu[positive] + self.eps)
    return out

  def update(self, g: np.ndarray) -> np.ndarray:
    """One step of the full optimizer: returns the (negative) update."""
    u = self.precondition(g)
    if self.momentum:
      self.m = self.momentum * self.m + (1.0 - self.momentum) * u
      u = self.m
    return -self.learning_rate * u

  def accumulator_values(self) -> np.ndarray:
    return self.mu.copy()
