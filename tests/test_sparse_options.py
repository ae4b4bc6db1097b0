"""sparse_rows with every option of sm3 and sm3_recipe equals the dense step.

Deterministic companions of ``test_sparse_differential``: one table, 30
steps, batches that leave rows behind for many steps and bring them back
(so the lazy catch-up of momentum, Nesterov momentum and weight decay is
exercised over gaps), each option set on its own.
"""

from __future__ import annotations

import _tiers
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sm3

STEPS = 30


def _rising(count):
  return 1.0 - (count + 1.0) ** -0.8


CASES = {
  "paper": lambda: optax_sm3.sm3(0.1, momentum=0.0),
  "momentum": lambda: optax_sm3.sm3(0.1, 0.9),
  "nesterov": lambda: optax_sm3.sm3(0.1, 0.9, nesterov=True),
  "nesterov_decay": lambda: optax_sm3.sm3(0.05, 0.5, nesterov=True, weight_decay=0.1),
  "recipe": lambda: optax_sm3.sm3_recipe(1e-2, total_steps=STEPS),
  "recipe_clip_decay": lambda: optax_sm3.sm3_recipe(
    3e-2, total_steps=STEPS, grad_clip_norm=0.5, weight_decay=0.05
  ),
  "bias_correction": lambda: optax_sm3.sm3(0.1, 0.5, beta=0.9, bias_correction=True),
  "rising_beta": lambda: optax_sm3.sm3(0.1, 0.0, beta=_rising),
  "schedule_decay": lambda: optax_sm3.sm3(
    optax.cosine_decay_schedule(0.1, STEPS), 0.9, weight_decay=0.01
  ),
  "clip_value": lambda: optax_sm3.sm3(0.1, 0.0, grad_clip_value=0.3),
  "clip_norm_momentum": lambda: optax_sm3.sm3(0.1, 0.9, grad_clip_norm=0.5),
  "sm3_i": lambda: optax_sm3.sm3(0.1, 0.0, beta=0.5, variant="I"),
  "merged_cover": lambda: optax_sm3.sm3(0.1, 0.9, merge_axes_up_to=10**6),
  "stacked": lambda: optax_sm3.sm3(0.1, 0.9, stacked_axes=1),
  "skip_unit_axes": lambda: optax_sm3.sm3(0.1, 0.0, skip_unit_axes=True),
  "mask_off": lambda: optax_sm3.sm3(
    0.1, 0.0, weight_decay=0.3, weight_decay_mask=lambda p: False
  ),
  "large_eps": lambda: optax_sm3.sm3(0.1, 0.0, eps=1e-3),
}


def _batches(rows, seed):
  rng = np.random.default_rng(seed)
  out = []
  for step in range(STEPS):
    # Rows of a window that moves: most rows wait many steps between batches.
    start = (7 * step) % rows
    ids = (start + rng.integers(0, 6, size=5)) % rows
    out.append((jnp.asarray(ids), jnp.asarray(rng.normal(size=(5, 1, 3)), jnp.float32)))
  return out


# By default a few cases that between them exercise momentum, Nesterov, weight
# decay, bias correction, SM3-I and a stacked cover; --slow runs every case.
FAST = ("momentum", "nesterov_decay", "bias_correction", "sm3_i", "stacked")


@pytest.mark.parametrize("case", _tiers.fast_first(sorted(CASES), FAST))
def test_sparse_rows_equals_dense_for_every_option(case):
  opt = CASES[case]()
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(40, 1, 3)), jnp.float32)
  sparse = optax_sm3.sparse_rows(opt)
  state, dense_state = sparse.init(table), opt.init(table)
  got, want = table, table
  for ids, row_grads in _batches(40, 1):
    got, state = sparse.update(ids, row_grads, state, got)
    grad = jnp.zeros_like(want).at[ids].add(row_grads)
    updates, dense_state = opt.update(grad, dense_state, want)
    want = optax.apply_updates(want, updates)
    # Rows read through lookup are current at every step.
    np.testing.assert_allclose(
      sparse.lookup(jnp.arange(40), state, got), want, rtol=0, atol=2e-6
    )
  got, _ = sparse.sync(state, got)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
  assert not np.allclose(got, table)
