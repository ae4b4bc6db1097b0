"""Cover construction."""

import pytest

from optax_sm3 import _cover


@pytest.mark.parametrize(
  ("shape", "kwargs", "groups", "size"),
  [
    ((), {}, ((),), 1),
    ((7,), {}, ((0,),), 7),
    ((3, 4), {}, ((0,), (1,)), 7),
    ((3, 3, 64, 32), {"merge_axes_up_to": 9}, ((0, 1), (2,), (3,)), 9 + 96),
    ((2, 2, 2), {"merge_axes_up_to": 4}, ((0, 1), (2,)), 6),
    ((3, 1, 5), {"skip_unit_axes": True}, ((0,), (2,)), 8),
    ((1, 1), {"skip_unit_axes": True}, ((0, 1),), 1),
    ((4, 3, 5), {"stacked_axes": 1}, ((1,), (2,)), 4 * 8),
    ((4, 5), {"stacked_axes": 1}, ((1,),), 20),
    ((4, 5), {"stacked_axes": 2}, ((),), 20),
  ],
)
def test_make_cover(shape, kwargs, groups, size):
  cover = _cover.make_cover(shape, **kwargs)
  assert cover.groups == groups
  assert cover.size == size


def test_shapes_and_reduced_axes():
  cover = _cover.make_cover((2, 3, 4), stacked_axes=1)
  assert cover.accumulator_shape((1,)) == (2, 3)
  assert cover.broadcast_shape((2,)) == (2, 1, 4)
  assert cover.reduced_axes((1,)) == (2,)


@pytest.mark.parametrize(
  ("kwargs", "error"),
  [
    ({"stacked_axes": -1}, ValueError),
    ({"stacked_axes": 4}, ValueError),
    ({"stacked_axes": 1.0}, TypeError),
    ({"merge_axes_up_to": 0}, ValueError),
  ],
)
def test_invalid(kwargs, error):
  with pytest.raises(error, match=r"stacked_axes|merge_axes_up_to"):
    _cover.make_cover((2, 3, 4), **kwargs)
