"""The direct and blocked forms (optax_sm3._blocks): tiling, and non-finite
gradients, which count as zero in the accumulators on every path."""

import _tiers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_sm3
from optax_sm3 import _blocks


def test_at_least_two_blocks():
  tiling = _blocks._tiling((512, 512), 512 * 512 // 2)
  assert tiling.num_blocks == 2
  assert _blocks._tiling((3, 3, 256, 256), 3 * 3 * 256 * 256 // 2).num_blocks == 3


@pytest.mark.parametrize("variant", ["II", "I"])
@pytest.mark.parametrize("shape", [(6, 5), (512, 256)])  # direct, blocked
@pytest.mark.parametrize("bad", _tiers.fast_first([np.nan, np.inf, -np.inf], [np.inf]))
def test_non_finite_entries_count_as_zero_in_the_accumulators(variant, shape, bad):
  rng = np.random.default_rng(0)
  g = rng.standard_normal(shape).astype(np.float32)
  clean = g.copy()
  g[1, 2] = bad
  clean[1, 2] = 0.0
  warm_up = jnp.asarray(rng.standard_normal(shape))
  results = []
  for block_size in (0, None):
    tx = optax_sm3.scale_by_sm3(variant=variant, block_size=block_size)
    state = tx.init(jnp.zeros(shape))
    state = tx.update(warm_up, state)[1]
    u_bad, s_bad = jax.jit(tx.update)(jnp.asarray(g), state)
    u_clean, s_clean = jax.jit(tx.update)(jnp.asarray(clean), state)
    for a, b in zip(jax.tree.leaves(s_bad), jax.tree.leaves(s_clean), strict=True):
      np.testing.assert_array_equal(a, b)
    assert not np.isfinite(u_bad[1, 2])  # the entry's own update shows it
    mask = np.ones(shape, bool)
    mask[1, 2] = False
    if variant == "I":
      np.testing.assert_array_equal(np.asarray(u_bad)[mask], np.asarray(u_clean)[mask])
    results.append(s_bad)
  for a, b in zip(
    jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True
  ):
    np.testing.assert_array_equal(a, b)


def test_non_finite_rows_in_sparse_rows_match_dense():
  table = jnp.ones((50, 4))
  sparse = optax_sm3.sparse_rows(optax_sm3.sm3(0.1, momentum=0.0))
  dense = optax_sm3.sm3(0.1, momentum=0.0)
  rows = jnp.asarray([[1.0, np.nan, 2.0, 3.0], [np.inf, 1.0, 1.0, 1.0]])
  ids = jnp.asarray([3, 9])
  _, s_sparse = sparse.update(ids, rows, sparse.init(table), table)
  _, s_dense = dense.update(
    jnp.zeros_like(table).at[ids].add(rows), dense.init(table), table
  )
  for a, b in zip(jax.tree.leaves(s_sparse), jax.tree.leaves(s_dense), strict=True):
    np.testing.assert_array_equal(a, b)
