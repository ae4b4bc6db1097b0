"""The pytree helpers."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_sm3 import _tree


def test_unzip_pairs_with_ragged_second_elements():
  like = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3), "s": jnp.zeros(())}
  pairs = {
    "w": (jnp.ones((2, 3)), (jnp.ones(2), jnp.ones(3))),
    "b": (2 * jnp.ones(3), (jnp.ones(3),)),
    "s": (jnp.asarray(3.0), (jnp.asarray(4.0),)),
  }
  first, second = _tree.unzip_pairs(like, pairs)
  assert set(first) == set(second) == {"w", "b", "s"}
  np.testing.assert_array_equal(first["b"], 2 * np.ones(3))
  assert [a.shape for a in second["w"]] == [(2,), (3,)]
  assert float(first["s"]) == 3.0 and float(second["s"][0]) == 4.0


def test_unzip_pairs_keeps_nested_structure():
  like = [{"a": jnp.zeros(1)}, (jnp.zeros(2),)]
  pairs = [{"a": (1, "x")}, ((2, "y"),)]
  assert _tree.unzip_pairs(like, pairs) == ([{"a": 1}, (2,)], [{"a": "x"}, ("y",)])


def test_flatten_like_names_the_argument():
  import jax
  import pytest

  treedef = jax.tree.structure({"a": 0, "b": 0})
  assert _tree.flatten_like(treedef, {"a": 1, "b": (2, 3)}, "x") == [1, (2, 3)]
  with pytest.raises(ValueError, match=r"^`grads` must match: "):
    _tree.flatten_like(treedef, {"a": 1}, "`grads` must match")


def test_is_function_follows_optax_masked():
  eqx = pytest.importorskip("equinox")

  class Pair(eqx.Module):
    a: object
    b: object

    def __call__(self, x):
      return x

  mask = Pair(True, False)
  assert callable(mask) and not _tree.is_function(mask)
  assert _tree.is_function(lambda p: p)
  assert not _tree.is_function({"w": 1, "b": 0}) and not _tree.is_function(3)
  assert not _tree.is_function(None)
  # The same verdicts as optax.masked's own test of a callable tree.
  assert _tree.is_function(mask) == optax.transforms._masking._mask_callable(mask)
  params = Pair(jnp.ones(2), jnp.zeros(2))
  assert _tree.resolve(mask, params) is mask
  assert _tree.resolve(lambda p: p.a, params) is params.a
