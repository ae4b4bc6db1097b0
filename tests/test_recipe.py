"""optax_sm3.sm3_recipe: the preset is exactly the chain its docstring spells out."""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sm3

PARAMS = {
  "embedding": jnp.zeros((65, 16)),
  "small": jnp.zeros((32, 16)),  # 512 entries: merged into one accumulator
  "kernel": jnp.zeros((64, 48)),  # 3072 entries: one per axis
  "bias": jnp.zeros((48,)),
}


def _grads(step):
  keys = jax.random.split(jax.random.key(step), len(PARAMS))
  return {
    name: jax.random.normal(key, p.shape)
    for key, (name, p) in zip(keys, PARAMS.items(), strict=True)
  }


def _train(opt, steps):
  params, state = PARAMS, opt.init(PARAMS)
  for step in range(steps):
    updates, state = opt.update(_grads(step), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_equals_the_spelled_out_chain():
  steps = 30
  schedule = optax_sm3.warmup_schedule(
    3e-3, steps, warmup_fraction=0.02, decay_fraction=0.3
  )
  explicit = optax_sm3.sm3(
    schedule, momentum=0.0, beta=0.99, bias_correction=True, merge_axes_up_to=2048
  )
  ours, state = _train(optax_sm3.sm3_recipe(3e-3, steps), steps)
  theirs, _ = _train(explicit, steps)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
    np.testing.assert_array_equal(a, b)
  # No momentum buffer: the state is SM3's accumulators (and step counts).
  # Merged (<= 2048 entries): 65 * 16 + 32 * 16; per axis: 64 + 48; bias: 48.
  accumulators = [x for x in jax.tree.leaves(state) if x.ndim]
  assert sum(x.size for x in accumulators) == 1040 + 512 + 112 + 48
  assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(explicit.init(PARAMS)))


def test_schedule_warms_up_holds_and_cools_down():
  steps = 100
  opt = optax_sm3.sm3_recipe(1.0, steps, merge_axes_up_to=None)
  params = {"w": jnp.zeros((2, 2))}
  state = opt.init(params)
  sizes = []
  for _ in range(steps):
    updates, state = opt.update({"w": jnp.ones((2, 2))}, state, params)
    sizes.append(float(jnp.abs(updates["w"]).max()))
  # A constant gradient of 1 gives nu = 1 - 0.99**t after t steps, which the
  # bias correction divides by 1 - 0.99**t, so |u| = rate(t) / sqrt(1 + eps):
  # 2 warm-up steps (quadratic), constant, then the linear cool-down over the
  # last 30.
  rate = [min(1.0, (t / 2) ** 2, (steps - t) / 30) for t in range(steps)]
  expected = [r / np.sqrt(1 + 1e-8) for r in rate]
  np.testing.assert_allclose(sizes, expected, rtol=2e-5)
  assert sizes[0] == 0.0 and sizes[85] == pytest.approx(0.5, rel=1e-4)


def test_traced_learning_rate():
  @jax.jit
  def step(lr):
    opt = optax_sm3.sm3_recipe(lr, 10)
    state = opt.init(PARAMS)
    for _ in range(3):
      updates, state = opt.update(_grads(0), state, PARAMS)
    return updates

  small, large = step(1e-3), step(2e-3)
  np.testing.assert_allclose(large["kernel"], 2 * small["kernel"], rtol=1e-6)


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"learning_rate": -1.0}, "`learning_rate`"),
    ({"learning_rate": float("inf")}, "`learning_rate`"),
    ({"total_steps": 0}, "`total_steps`"),
    ({"decay_fraction": 1.5}, "`decay_fraction`"),
    ({"warmup_fraction": 0.95}, "warmup_fraction \\+ decay_fraction"),
    ({"beta": 1.0}, "`beta`"),
    ({"merge_axes_up_to": 0}, "`merge_axes_up_to`"),
  ],
)
def test_bad_arguments_name_themselves(kwargs, match):
  args = {"learning_rate": 1e-3, "total_steps": 100, **kwargs}
  with pytest.raises(ValueError, match=match):
    optax_sm3.sm3_recipe(**args)


def test_inject_hyperparams_changes_the_peak_rate():
  opt = optax.inject_hyperparams(optax_sm3.sm3_recipe, static_args=("total_steps",))(
    learning_rate=1e-3, total_steps=10
  )
  plain = optax_sm3.sm3_recipe(1e-3, 10)
  state, plain_state = opt.init(PARAMS), plain.init(PARAMS)
  for step in range(3):
    updates, state = opt.update(_grads(step), state, PARAMS)
    expected, plain_state = plain.update(_grads(step), plain_state, PARAMS)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-6)
  state.hyperparams["learning_rate"] = jnp.asarray(2e-3)
  doubled, _ = opt.update(_grads(3), state, PARAMS)
  expected, _ = plain.update(_grads(3), plain_state, PARAMS)
  np.testing.assert_allclose(doubled["kernel"], 2 * expected["kernel"], rtol=1e-5)


@pytest.mark.parametrize(
  "static_args", [("merge_axes_up_to",), ("total_steps", "merge_axes_up_to")]
)
def test_injected_recipe_under_jit_equals_the_plain_recipe(static_args):
  # Every numeric argument but the cover's bound may be traced, total_steps
  # and the warm-up and cool-down fractions included.
  opt = optax.inject_hyperparams(optax_sm3.sm3_recipe, static_args=static_args)(
    learning_rate=1e-3, total_steps=10, warmup_fraction=0.2, decay_fraction=0.3
  )
  plain = optax_sm3.sm3_recipe(1e-3, 10, warmup_fraction=0.2, decay_fraction=0.3)
  state, plain_state = jax.jit(opt.init)(PARAMS), plain.init(PARAMS)
  # No momentum buffer.
  chex.assert_trees_all_equal_shapes_and_dtypes(state.inner_state, plain_state)
  update = jax.jit(opt.update)
  for step in range(10):
    updates, state = update(_grads(step), state, PARAMS)
    expected, plain_state = plain.update(_grads(step), plain_state, PARAMS)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12)
  assert float(jnp.abs(expected["kernel"]).max()) > 0  # the schedule moved


def test_traced_cover_bound_says_to_make_it_static():
  opt = optax.inject_hyperparams(optax_sm3.sm3_recipe, static_args=("total_steps",))(
    learning_rate=1e-3, total_steps=10
  )
  state = opt.init(PARAMS)  # eager: the bound is a concrete array, read as an int
  updates, state = opt.update(_grads(0), state, PARAMS)
  assert updates["kernel"].shape == (64, 48)
  with pytest.raises(TypeError, match=r"static_args=\('merge_axes_up_to',\)"):
    jax.jit(opt.update)(_grads(1), state, PARAMS)


def test_default_rate_and_required_total_steps():
  parameters = inspect.signature(optax_sm3.sm3_recipe).parameters
  assert parameters["learning_rate"].default == 8e-3
  assert parameters["decay_fraction"].default == 0.3
  # The defaults are the docstring's and the recipe guide's spelled-out chain.
  ours, _ = _train(optax_sm3.sm3_recipe(total_steps=30), 30)
  schedule = optax_sm3.warmup_schedule(
    8e-3, 30, warmup_fraction=0.02, decay_fraction=0.3
  )
  explicit = optax_sm3.sm3(
    schedule, momentum=0.0, beta=0.99, bias_correction=True, merge_axes_up_to=2048
  )
  theirs, _ = _train(explicit, 30)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
    np.testing.assert_array_equal(a, b)
  # The previous default, as the changelog's migration line spells it.
  old, _ = _train(optax_sm3.sm3_recipe(4e-3, 30, decay_fraction=0.1), 30)
  assert not np.array_equal(old["kernel"], ours["kernel"])
  with pytest.raises(TypeError, match="needs `total_steps`"):
    optax_sm3.sm3_recipe()
  with pytest.raises(TypeError, match="needs `total_steps`"):
    optax_sm3.sm3_recipe(1e-2)
