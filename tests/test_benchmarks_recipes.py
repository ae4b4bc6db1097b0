"""The recipe search's logic (benchmarks/recipes.py), with a fake trainer."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sm3
from benchmarks import _runner, _workloads, recipes

PARAMS = {
  "embedding": jnp.zeros((65, 16)),
  "position": jnp.zeros((8, 16)),
  "final_norm": jnp.ones((16,)),
  "unembedding": jnp.zeros((16, 65)),
  "block0": {"qkv": jnp.zeros((16, 48)), "up": jnp.zeros((16, 64))},
}


def _state_bytes(tx):
  return _runner.tree_bytes(jax.eval_shape(tx.init, PARAMS))


@pytest.mark.parametrize(
  ("config", "checks"),
  [
    (recipes.Config("adam", schedule="constant", warmup=0.0), {0: 1.0, 50: 1.0}),
    (recipes.Config(schedule="constant", warmup=0.1), {0: 0.0, 5: 0.25, 10: 1.0}),
    (recipes.Config(schedule="cooldown"), {50: 1.0, 95: 0.5, 100: 0.0}),
    (recipes.Config(schedule="cosine", warmup=0.1), {5: 0.5, 10: 1.0, 55: 0.5}),
    (recipes.Config(schedule="cosine", warmup=0.0), {0: 1.0, 50: 0.5, 100: 0.0}),
  ],
)
def test_schedules(config, checks):
  schedule = recipes.schedule(config, 2.0, 100)
  for step, factor in checks.items():
    assert float(schedule(step)) == pytest.approx(2.0 * factor, abs=1e-6), step


def test_make_states_and_hybrids():
  sizes = {
    name: _state_bytes(recipes.make(config)(0.1, 100))
    for name, config in {
      "sm3": recipes.Config(beta=0.99),
      "merged": recipes.Config(merge_axes_up_to=2048),
      "momentum": recipes.Config(momentum=0.9),
      "bf16": recipes.Config(momentum=0.9, mu_dtype="bfloat16"),
      "sm3+sm3": recipes.Config(family="sm3+sm3", momentum=0.9),
      "sm3+adam": recipes.Config(family="sm3+adam", dense_lr=1e-3),
      "adam": recipes.Config("adam"),
    }.items()
  }
  leaves = jax.tree.leaves(PARAMS)
  params = sum(x.size for x in leaves) * 4
  dense = params - (65 * 16 + 8 * 16) * 4
  assert sizes["merged"] > sizes["sm3"]  # the position table got per-entry sums
  assert sizes["momentum"] - sizes["sm3"] == params
  assert sizes["bf16"] - sizes["sm3"] == params // 2
  # Hybrids: momentum, or Adam's two moments, on the dense leaves only.
  assert sizes["sm3+sm3"] - sizes["sm3"] == pytest.approx(dense, abs=64)  # + counters
  assert dense * 2 < sizes["sm3+adam"] < dense * 2 + 1024  # + the tables' SM3
  assert sizes["adam"] == pytest.approx(2 * params, abs=64)
  # After the warm-up, the hybrid's dense half steps like Adam (sign steps of
  # the rate on a first step) and its tables like SM3 (g / |g| = 1 too, at the
  # table's own rate): check the two rates land where they should.
  tx = recipes.make(
    recipes.Config(family="sm3+adam", schedule="constant", warmup=0.0, dense_lr=1e-3)
  )(0.1, 100)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  np.testing.assert_allclose(updates["embedding"], -0.1, rtol=1e-5)
  np.testing.assert_allclose(updates["block0"]["qkv"], -1e-3, rtol=1e-4)


def test_grid_is_centred_and_factor_two():
  for config, centre in ((recipes.Config(), 0.2), (recipes.Config(beta=0.9), 4e-3)):
    rates = recipes.grid(config, 5)
    assert rates[2] == pytest.approx(centre)
    np.testing.assert_allclose(np.diff(np.log2(rates)), 1.0)


def test_tune_rates_follows_the_edge_and_skips_nan():
  calls = []

  def metric(lr):
    calls.append(lr)
    return math.nan if lr > 1 else abs(math.log2(lr / 0.02))

  tuning = recipes.tune_rates((0.1, 0.2, 0.4), metric)
  assert list(tuning) == [0.025, 0.05, 0.1, 0.2, 0.4]  # two steps outwards
  assert calls == [0.1, 0.2, 0.4, 0.05, 0.025]
  inner = recipes.tune_rates((0.01, 0.02, 0.04), metric)
  assert list(inner) == [0.01, 0.02, 0.04]  # best inside: nothing added
  diverged = recipes.tune_rates((2.0, 4.0), metric)
  assert list(diverged) == [2.0, 4.0]  # no finite rate: nothing to follow


class _FakeTrainer:
  """Trains nothing: the loss is a function of the candidate and the rate."""

  def __init__(self, workload, optimizer, steps):
    del workload, steps
    self.label = optimizer.name
    self.state_bytes = _state_bytes(optimizer.make(1.0, 100))
    self.param_bytes = _runner.tree_bytes(PARAMS)

  def run(self, lr, seed, split):
    assert split == "tune"  # the search never reads the test split
    base = 2.0
    label = self.label + " "
    if "beta=0.9 " in label:
      base -= 0.2
    if "cooldown" in label:
      base -= 0.1
    if "w=0.1 " in label:
      base -= 0.05
    if "d=0.3 " in label:
      base -= 0.02
    if "merge" in self.label or "m=0.9" in self.label:
      base -= 0.5  # better, but merged covers cost memory here
    optimum = 0.2 if "beta=0 " in label else 4e-3
    loss = base + 0.01 * abs(math.log2(lr / optimum)) + 0.001 * seed
    return {"metric": loss, "losses": [loss]}


def test_search_stages_pick_within_budget():
  search = recipes.Search(None, 100, 3, 2, lambda _: None, 0.5, _FakeTrainer)
  chosen = recipes.run(search, quick=True)
  # beta=0.9 with a cool-down wins stage one, warm-up 0.1 stage two, a
  # 30% cool-down stage three; the merged cover would win on loss but costs
  # more than half of Adam's state here.
  assert chosen["recipe"] == "sm3 cooldown w=0.1 d=0.3 beta=0.9"
  stages = [r["stage"] for r in search.results]
  assert stages.count("cool-down") == 1 and stages.count("covers") == 1
  merged = next(r for r in search.results if r["stage"] == "covers")
  assert search.memory(merged) > 0.5
  # Adam also ran with the recipe's schedule, and that is the tuned Adam.
  assert chosen["tuned_adam"] == "adam cooldown w=0.1 d=0.3"
  assert chosen["best_heavier"].startswith(chosen["recipe"] + " m=0.9")
  best = next(r for r in search.results if r["label"] == chosen["recipe"])
  assert best["learning_rate"] == pytest.approx(4e-3)
  assert best["valid_seeds"] == pytest.approx([1.63, 1.631])  # seeds 0 and 1
  report = {
    "steps": 100,
    "grid_size": 3,
    "seeds": 2,
    "wall_s": 1.0,
    "memory_budget": 0.5,
    **chosen,
    "results": search.results,
  }
  text = recipes.markdown(report)
  assert "| beta x schedule | sm3 cooldown w=0.05 d=0.1 beta=0.9 | 0.004 |" in text
  assert f"Recipe (best within 50% of Adam's state): {chosen['recipe']}" in text


def test_search_refuses_when_nothing_fits():
  search = recipes.Search(None, 100, 3, 1, lambda _: None, 1e-6, _FakeTrainer)
  with pytest.raises(RuntimeError, match="no finite candidate within"):
    recipes.run(search, quick=True)


def test_optax_schedule_is_traceable_in_make():
  # The trainer passes a traced rate: every family must accept one.
  for config in (
    recipes.Config("adam", schedule="cosine"),
    recipes.Config(schedule="cosine", beta=0.99),
    recipes.Config(family="sm3+adam", dense_lr=1e-3),
  ):
    jax.eval_shape(lambda lr, c=config: recipes.make(c)(lr, 100).init(PARAMS), 0.1)
  assert isinstance(
    recipes.make(recipes.Config())(0.1, 10), optax.GradientTransformation
  )


def test_search_recipe_is_the_library_recipe_at_beta_0_9():
  """The search's ``SEARCH_RECIPE`` is ``sm3_recipe`` at beta 0.9, uncorrected."""
  ours = recipes.make(recipes.SEARCH_RECIPE)(3e-3, 50)
  library = optax_sm3.sm3_recipe(3e-3, 50, beta=0.9, bias_correction=False)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), PARAMS)
  a, b = ours.init(PARAMS), library.init(PARAMS)
  for _ in range(4):
    ua, a = ours.update(grads, a, PARAMS)
    ub, b = library.update(grads, b, PARAMS)
    for x, y in zip(jax.tree.leaves(ua), jax.tree.leaves(ub), strict=True):
      np.testing.assert_array_equal(x, y)
  assert (
    recipes.SEARCH_RECIPE.label() == "sm3 cooldown w=0.02 d=0.1 beta=0.9 merge<=2048"
  )


def test_state_on_the_benchmark_transformer_is_two_percent_of_adams():
  # The docstring's "about 2% of Adam's on a small transformer".
  workload = _workloads.build("shakespeare-char")
  params = jax.eval_shape(workload.init, jax.random.key(0))
  recipe = _runner.tree_bytes(
    jax.eval_shape(optax_sm3.sm3_recipe(1e-3, 400).init, params)
  )
  adam = _runner.tree_bytes(jax.eval_shape(optax.adam(1e-3).init, params))
  assert 0.015 < recipe / adam < 0.025
