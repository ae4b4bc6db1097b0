"""optax_sm3.sm3 under optax's wrappers and abstract evaluation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sm3

_PARAMS = {
  "emb": jax.random.normal(jax.random.key(0), (50, 8)),
  "w": jax.random.normal(jax.random.key(1), (8, 4)),
  "b": jnp.zeros(4),
}


def _grads(seed):
  keys = jax.random.split(jax.random.key(seed), 3)
  return {
    name: jax.random.normal(key, p.shape)
    for key, (name, p) in zip(keys, sorted(_PARAMS.items()), strict=True)
  }


def _run(tx, grads_seq, params=_PARAMS):
  state, update = tx.init(params), jax.jit(tx.update)
  for g in grads_seq:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


_HYPERPARAMS = {"learning_rate": 0.1, "momentum": 0.9, "beta": 0.0, "eps": 1e-8}
_CHANGED = [
  ("learning_rate", 0.02),
  ("momentum", 0.5),
  ("beta", 0.9),
  ("eps", 1.0),
]


def test_inject_hyperparams_changes_take_effect_without_recompiling():
  tx = optax.inject_hyperparams(optax_sm3.sm3)(**_HYPERPARAMS)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), updates, state

  params, state = _PARAMS, tx.init(_PARAMS)
  for seed in range(2):
    params, _, state = step(params, state, _grads(seed))
  for i, (name, value) in enumerate(_CHANGED):
    grads = _grads(10 + i)
    _, old_updates, _ = step(params, state, grads)
    state.hyperparams[name] = jnp.full_like(state.hyperparams[name], value)
    params_new, updates, state_new = step(params, state, grads)
    # The injected update equals a fresh sm3 with the new values applied to
    # the same inner state; it differs from the update with the old value.
    current = dict(state.hyperparams)
    expected, _ = optax_sm3.sm3(**current).update(grads, state.inner_state, params)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9),
      updates,
      expected,
    )
    assert not np.allclose(updates["w"], old_updates["w"]), name
    params, state = params_new, state_new
  assert step._cache_size() == 1


def test_multi_steps_equals_one_step_on_the_mean_gradient():
  k = 3
  grads = [_grads(seed) for seed in range(2 * k)]
  tx = optax.MultiSteps(optax_sm3.sm3(0.1), every_k_schedule=k)
  state, update = tx.init(_PARAMS), jax.jit(tx.update)
  params = _PARAMS
  for i, g in enumerate(grads):
    updates, state = update(g, state, params)
    if (i + 1) % k:
      assert all(jnp.all(u == 0) for u in jax.tree.leaves(updates))
    params = optax.apply_updates(params, updates)
  means = [jax.tree.map(lambda *gs: sum(gs) / k, *grads[j : j + k]) for j in (0, k)]
  expected, _ = _run(optax_sm3.sm3(0.1), means)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    params,
    expected,
  )


def test_masked_applies_sm3_to_the_mask_only():
  mask = {"emb": True, "w": False, "b": False}
  tx = optax.masked(optax_sm3.sm3(0.1), mask)
  grads = [_grads(seed) for seed in range(3)]
  state = tx.init(_PARAMS)
  params = _PARAMS
  sub_tx = optax_sm3.sm3(0.1)
  sub_params, sub_state = {"emb": _PARAMS["emb"]}, sub_tx.init({"emb": _PARAMS["emb"]})
  for g in grads:
    updates, state = tx.update(g, state, params)
    # Unmasked leaves pass through untouched (raw gradients).
    chex.assert_trees_all_equal(updates["w"], g["w"])
    chex.assert_trees_all_equal(updates["b"], g["b"])
    sub_updates, sub_state = sub_tx.update({"emb": g["emb"]}, sub_state, sub_params)
    chex.assert_trees_all_equal(updates["emb"], sub_updates["emb"])
    params = optax.apply_updates(params, updates)
    sub_params = optax.apply_updates(sub_params, sub_updates)


def test_multi_transform_sm3_on_embeddings_adam_elsewhere():
  labels = {"emb": "sm3", "w": "adam", "b": "adam"}
  tx = optax.multi_transform(
    {"sm3": optax_sm3.sm3(0.5), "adam": optax.adam(0.05)}, labels
  )
  tokens = jax.random.randint(jax.random.key(3), (64,), 0, 50)
  targets = jax.random.normal(jax.random.key(4), (64, 4))

  def loss(p):
    return jnp.mean((p["emb"][tokens] @ p["w"] + p["b"][None, :] - targets) ** 2)

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  params, state = _PARAMS, tx.init(_PARAMS)
  first = None
  for _ in range(60):
    params, state, value = step(params, state)
    first = value if first is None else first
  assert float(loss(params)) < 0.2 * float(first)
  # The embedding's state is SM3's: one vector per axis, not a full table.
  sm3_state = state.inner_states["sm3"].inner_state
  assert [a.shape for a in sm3_state[0].accumulators["emb"]] == [(50,), (8,)]
  # Each group matches its optimizer run alone on the same gradients.
  grads = _grads(7)
  updates, _ = tx.update(grads, tx.init(_PARAMS), _PARAMS)
  sm3_updates, _ = optax_sm3.sm3(0.5).update(
    {"emb": grads["emb"]}, optax_sm3.sm3(0.5).init({"emb": _PARAMS["emb"]})
  )
  chex.assert_trees_all_equal(updates["emb"], sm3_updates["emb"])
  adam = optax.adam(0.05)
  rest = {"w": _PARAMS["w"], "b": _PARAMS["b"]}
  adam_updates, _ = adam.update({"w": grads["w"], "b": grads["b"]}, adam.init(rest))
  chex.assert_trees_all_equal(updates["w"], adam_updates["w"])


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_apply_if_finite_skips_bad_steps(bad):
  tx = optax.apply_if_finite(optax_sm3.sm3(0.1), max_consecutive_errors=3)
  grads = [_grads(seed) for seed in range(3)]
  params, state, update = _PARAMS, tx.init(_PARAMS), jax.jit(tx.update)
  updates, state = update(grads[0], state, params)
  params = optax.apply_updates(params, updates)

  poisoned = dict(grads[1], w=grads[1]["w"].at[2, 1].set(bad))
  updates, bad_state = update(poisoned, state, params)
  assert all(jnp.all(u == 0) for u in jax.tree.leaves(updates))
  chex.assert_trees_all_equal(optax.apply_updates(params, updates), params)
  chex.assert_trees_all_equal(bad_state.inner_state, state.inner_state)
  assert int(bad_state.notfinite_count) == 1
  assert not bool(bad_state.last_finite)

  # Training resumes as if the bad step had never happened.
  updates, after = update(grads[2], bad_state, params)
  expected, expected_state = _run(optax_sm3.sm3(0.1), [grads[0], grads[2]])
  # Close, not bit-equal: the skip's select compiles the step differently.
  chex.assert_trees_all_close(
    optax.apply_updates(params, updates), expected, rtol=1e-5, atol=1e-8
  )
  chex.assert_trees_all_close(after.inner_state, expected_state, rtol=1e-5, atol=1e-8)
  assert int(after.notfinite_count) == 0


def test_tree_map_params_resets_param_shaped_state():
  tx = optax_sm3.sm3(0.1)
  _, state = _run(tx, [_grads(0), _grads(1)])
  reset = optax.tree.map_params(tx, jnp.zeros_like, state)
  fresh = tx.init(_PARAMS)
  # Accumulators and momentum are mapped; the step count is not a parameter.
  chex.assert_trees_all_equal(reset[0].accumulators, fresh[0].accumulators)
  chex.assert_trees_all_equal(reset[1].momentum, fresh[1].momentum)
  assert int(reset[0].count) == 2
  assert jax.tree.structure(reset) == jax.tree.structure(state)
  doubled = optax.tree.map_params(tx, lambda x: 2 * x, state)
  chex.assert_trees_all_equal(doubled[1].momentum["w"], 2 * state[1].momentum["w"])


@pytest.mark.parametrize("kwargs", [{}, {"momentum": 0.0}, {"stacked_axes": 1}])
def test_eval_shape_init_matches_init(kwargs):
  params = {"w": jnp.ones((3, 5, 4), jnp.bfloat16), "b": jnp.ones(4), "s": jnp.ones(())}
  if kwargs.get("stacked_axes"):
    params = {"w": params["w"]}
  tx = optax_sm3.sm3(0.1, **kwargs)
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  shapes = jax.eval_shape(tx.init, abstract)
  concrete = tx.init(params)
  assert jax.tree.structure(shapes) == jax.tree.structure(concrete)
  jax.tree.map(
    lambda s, c: (s.shape, s.dtype) == (c.shape, c.dtype) or pytest.fail(f"{s} {c}"),
    shapes,
    concrete,
  )
  # The abstract state costs what SM3 promises: sum, not product, of dims.
  accumulators = shapes[0].accumulators["w"]
  sizes = sum(int(np.prod(a.shape)) for a in accumulators)
  assert sizes == (3 * (5 + 4) if kwargs.get("stacked_axes") else 3 + 5 + 4)
