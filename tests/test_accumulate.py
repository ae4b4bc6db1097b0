"""Which parameters the CPU loop takes, and what that does to the step."""

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_sm3
from optax_sm3 import _accumulate


def _compiled_step(tx, params):
  """The optimized HLO text and temporary bytes of a donated train step."""
  state = jax.eval_shape(tx.init, params)

  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
  return compiled.as_text(), compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize(
  ("shape", "looped"),
  [
    ((256, 256), False),  # 2**16 entries: at the threshold, direct
    ((257, 256), True),
    ((512, 512), True),  # fits one block, still looped (two blocks)
    ((4096,), False),  # one accumulator: nothing to reduce
    ((300, 300, 3), True),
  ],
)
def test_which_parameters_are_looped(shape, looped):
  params = {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}
  hlo, _ = _compiled_step(optax_sm3.sm3(0.1, momentum=0.0), params)
  assert (" while(" in hlo) == looped


def test_many_mid_sized_parameters_share_one_temporary():
  # XLA's CPU scheduler forms every parameter's direct nu before reducing
  # any; looped, they share one block.
  params = {f"w{i}": jax.ShapeDtypeStruct((512, 512), jnp.float32) for i in range(16)}
  param_bytes = 16 * 512 * 512 * 4
  _, direct = _compiled_step(optax_sm3.sm3(0.1, momentum=0.0, block_size=0), params)
  _, looped = _compiled_step(optax_sm3.sm3(0.1, momentum=0.0), params)
  assert direct >= param_bytes / 2  # what the loop avoids
  assert looped <= param_bytes / 10, (looped, param_bytes)


def test_at_least_two_blocks():
  tiling = _accumulate._tiling((512, 512), 512 * 512 // 2)
  assert tiling.num_blocks == 2
  assert _accumulate._tiling((3, 3, 256, 256), 3 * 3 * 256 * 256 // 2).num_blocks == 3
