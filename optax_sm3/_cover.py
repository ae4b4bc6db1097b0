"""Covers: which accumulators SM3 keeps for a parameter of a given shape.

A cover is a family of index sets whose union is every entry of the tensor;
SM3 keeps one accumulator per set. For a tensor of shape ``(d_1, ..., d_k)``
the paper's default cover has one set per slice along each axis, i.e. one
accumulator vector of length ``d_r`` per axis ``r``: ``sum_r d_r`` numbers
instead of ``prod_r d_r``.

Here a cover is described by *groups* of axes. The accumulator of a group
``S`` is indexed by the axes in ``S`` (shape ``[d_s for s in S]``) and holds,
for each index, the maximum over every axis not in ``S``. A single group with
all the axes is the full (diagonal AdaGrad) cover. Leading *stacked* axes are
batch axes: every accumulator carries them, so each slice along them (one
layer of a Flax ``nn.scan`` stack, say) keeps a cover of its own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Cover:
  """The accumulator layout of one parameter.

  Attributes:
    shape: the parameter's shape.
    stacked: the number of leading batch axes.
    groups: one tuple of (absolute) axes per accumulator; the stacked axes are
      implicit in every group.
  """

  shape: tuple[int, ...]
  stacked: int
  groups: tuple[tuple[int, ...], ...]

  def accumulator_shape(self, group: tuple[int, ...]) -> tuple[int, ...]:
    """The stored shape of ``group``'s accumulator."""
    return self.shape[: self.stacked] + tuple(self.shape[a] for a in group)

  def broadcast_shape(self, group: tuple[int, ...]) -> tuple[int, ...]:
    """``group``'s accumulator reshaped to broadcast against the parameter."""
    return self.shape[: self.stacked] + tuple(
      self.shape[a] if a in group else 1 for a in range(self.stacked, len(self.shape))
    )

  def reduced_axes(self, group: tuple[int, ...]) -> tuple[int, ...]:
    """The axes a parameter-shaped array is reduced over for ``group``."""
    return tuple(a for a in range(self.stacked, len(self.shape)) if a not in group)

  @property
  def size(self) -> int:
    """Number of accumulator entries this cover stores."""
    return sum(math.prod(self.accumulator_shape(g)) for g in self.groups)


def make_cover(
  shape: Sequence[int],
  *,
  stacked_axes: int = 0,
  merge_axes_up_to: int | None = None,
  skip_unit_axes: bool = False,
) -> Cover:
  """Builds the cover of a parameter of ``shape``.

  Args:
    shape: the parameter's shape.
    stacked_axes: how many leading axes are batch (stacked-layer) axes.
    merge_axes_up_to: if set, runs of adjacent axes are merged into one group
      while the product of their sizes stays at or below this number (a conv
      kernel ``(3, 3, C_in, C_out)`` with ``9`` keeps a ``(3, 3)`` accumulator
      and two vectors: a finer cover for 9 - 6 = 3 more numbers).
    skip_unit_axes: drop the accumulators of size-1 axes. Exact: such an
      accumulator holds the global maximum, which never wins the minimum.

  Returns:
    The :class:`Cover`.

  Raises:
    ValueError: if ``stacked_axes`` is negative or exceeds the rank, or
      ``merge_axes_up_to`` is below 1.
  """
  shape = tuple(int(d) for d in shape)
  rank = len(shape)
  if isinstance(stacked_axes, bool) or not isinstance(stacked_axes, int):
    raise TypeError(f"`stacked_axes` must be an int, got {stacked_axes!r}")
  if not 0 <= stacked_axes <= rank:
    raise ValueError(
      f"`stacked_axes` must be in [0, {rank}] for a parameter of shape "
      f"{shape}, got {stacked_axes}"
    )
  if merge_axes_up_to is not None and merge_axes_up_to < 1:
    raise ValueError(f"`merge_axes_up_to` must be None or >= 1, got {merge_axes_up_to}")
  axes = tuple(range(stacked_axes, rank))
  if len(axes) <= 1:
    # Rank 0 or 1 (per slice): a full accumulator, i.e. diagonal AdaGrad.
    return Cover(shape, stacked_axes, (axes,))
  groups: list[tuple[int, ...]] = []
  for axis in axes:
    if skip_unit_axes and shape[axis] == 1:
      continue
    if (
      merge_axes_up_to is not None
      and groups
      and groups[-1][-1] == axis - 1
      and math.prod(shape[a] for a in groups[-1]) * shape[axis] <= merge_axes_up_to
    ):
      groups[-1] = (*groups[-1], axis)
    else:
      groups.append((axis,))
  if not groups:
    # Every axis has size 1: one scalar per slice covers everything.
    groups = [axes]
  return Cover(shape, stacked_axes, tuple(groups))
