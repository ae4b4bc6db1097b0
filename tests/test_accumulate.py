"""Which parameters the CPU loop takes, and what that does to the step."""

from unittest import mock

import _tiers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sm3
from optax_sm3 import _accumulate, _blocks


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


def test_loop_commutes_with_vmap_grad_and_scan():
  # (300, 300) has more than 2**16 entries: the library loops it by default.
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  g, h, w = (jax.random.normal(k, (300, 300)) for k in keys[:3])
  ensemble = jax.random.normal(keys[3], (3, 300, 300))
  looped = optax_sm3.scale_by_sm3(beta=0.5)
  direct = optax_sm3.scale_by_sm3(beta=0.5, block_size=0)

  def two_steps(tx, first, second):
    state = tx.init(first)
    _, state = tx.update(first, state)
    return tx.update(second, state)

  def vmapped(tx):
    return jax.jit(jax.vmap(lambda x: two_steps(tx, x, 2 * x)))(ensemble)

  for a, b in zip(
    jax.tree.leaves(vmapped(looped)), jax.tree.leaves(vmapped(direct)), strict=True
  ):
    np.testing.assert_array_equal(a, b)

  def grad(tx):
    loss = lambda t: jnp.sum(two_steps(tx, g, g + t * h)[0] * w)
    return jax.jit(jax.grad(loss))(0.3)

  assert grad(looped) == grad(direct) != 0

  def scanned(tx):
    def body(state, x):
      updates, state = tx.update(x, state)
      return state, updates.sum()

    return jax.jit(lambda: jax.lax.scan(body, tx.init(g), ensemble))()

  for a, b in zip(
    jax.tree.leaves(scanned(looped)), jax.tree.leaves(scanned(direct)), strict=True
  ):
    np.testing.assert_array_equal(a, b)


def test_blocked_form_is_traced_once_per_shape():
  # Lowering cost: a tree of many same-shaped layers traces the loop once.
  # (301, 299) is this test's own shape, so no earlier trace is cached.
  params = {f"w{i}": jax.ShapeDtypeStruct((301, 299), jnp.float32) for i in range(4)}
  tx = optax_sm3.sm3(0.1, momentum=0.0)
  traced = []
  blocked = _blocks.blocked

  def counting(*args):
    traced.append(args[0].cover.shape)
    return blocked(*args)

  with mock.patch.object(_blocks, "blocked", counting):
    hlo, _ = _compiled_step(tx, params)
  assert traced == [(301, 299)]
  assert hlo.count(" while(") == 4


@pytest.mark.parametrize("variant", ["II", "I"])
@pytest.mark.parametrize("beta", _tiers.fast_first([0.0, 0.9], [0.9]))
@pytest.mark.parametrize("shape", [(300, 400), (40, 50, 60)])
def test_default_loop_bit_identical_in_the_full_optimizer(variant, beta, shape):
  assert np.prod(shape) > _accumulate.MIN_LOOP_SIZE

  def run(block_size):
    tx = optax.inject_hyperparams(
      optax_sm3.sm3, static_args=("variant", "block_size", "nesterov")
    )(
      learning_rate=0.1, momentum=0.9, beta=beta, variant=variant, block_size=block_size
    )
    params = jnp.ones(shape)
    state = tx.init(params)

    @jax.jit
    def step(params, state, g):
      updates, state = tx.update(g, state, params)
      return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(1)
    for _ in range(3):
      params, state = step(params, state, jnp.asarray(rng.standard_normal(shape)))
    return params, state

  for a, b in zip(jax.tree.leaves(run(0)), jax.tree.leaves(run(None)), strict=True):
    np.testing.assert_array_equal(a, b)
