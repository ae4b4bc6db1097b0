"""optax's compatibility checklist, run on every exported optimizer.

Modelled on optax's ``contrib/_common_test.py`` and ``alias_test.py``: each
optimizer or transformation goes through the same battery (eager, jit,
abstract and sharded init; ``inject_hyperparams`` with and without jit;
``optax.tree_utils`` lookups; convergence; dtypes; no recompilation;
``MultiSteps``; ``lax.cond``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import _tiers
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sm3


@dataclasses.dataclass(frozen=True)
class Case:
  """An exported factory and the arguments the battery runs it with.

  ``scale`` set: a transformation without a learning rate, optimised as
  ``optax.chain(tx, optax.scale(-scale))``. ``static_args``: the structural
  arguments ``optax.inject_hyperparams`` must keep static.
  """

  factory: Callable[..., optax.GradientTransformation] | None
  kwargs: dict[str, Any]
  scale: float | None = None
  static_args: tuple[str, ...] = ()
  make: Callable[[], optax.GradientTransformation] | None = None

  def transformation(self, **overrides: Any) -> optax.GradientTransformation:
    if self.make is not None:
      return self.make()
    return self.factory(**{**self.kwargs, **overrides})

  def optimizer(self, **overrides: Any) -> optax.GradientTransformation:
    tx = self.transformation(**overrides)
    return tx if self.scale is None else optax.chain(tx, optax.scale(-self.scale))


CASES = {
  "sm3": Case(optax_sm3.sm3, {"learning_rate": 1.0}),
  "sm3_ema_decay_clip": Case(
    optax_sm3.sm3,
    {
      "learning_rate": 0.05,
      "beta": 0.95,
      "weight_decay": 1e-6,
      "grad_clip_norm": 100.0,
      "grad_clip_value": 100.0,
    },
  ),
  "sm3_no_momentum": Case(optax_sm3.sm3, {"learning_rate": 1.0, "momentum": None}),
  "sm3_recipe": Case(
    optax_sm3.sm3_recipe,
    {"learning_rate": 0.1, "total_steps": 2000},
    static_args=("merge_axes_up_to",),
  ),
  "scale_by_sm3": Case(optax_sm3.scale_by_sm3, {"beta": 0.0}, scale=1.0),
  "scale_by_momentum": Case(optax_sm3.scale_by_momentum, {"momentum": 0.9}, scale=0.01),
  # The SM3 adapter's transformation (group 0's chain): not a factory.
  "adapter": Case(None, {}, make=lambda: optax_sm3.SM3(lr=1.0).default_tx()),
}
INJECTABLE = [name for name, case in CASES.items() if case.factory is not None]


def _params(dtype=jnp.float32):
  return {
    "w": jnp.linspace(-1.0, 1.0, 24, dtype=dtype).reshape(2, 3, 4),
    "b": jnp.ones((4,), dtype),
    "s": jnp.asarray(0.5, dtype),
  }


def _grads(params, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params
  )


# ---------------------------------------------------------------------------
# Init: eager, jit, abstract, sharded.


@pytest.mark.parametrize("name", CASES)
def test_init_with_abstract_input(name):
  # optax's sharding_test.test_init_with_abstract_input, then a whole tree.
  opt = CASES[name].optimizer()
  assert opt.init(jax.ShapeDtypeStruct((2, 4, 8), jnp.float32)) is not None
  params = _params(jnp.bfloat16)
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  chex.assert_trees_all_equal_shapes_and_dtypes(opt.init(abstract), opt.init(params))
  chex.assert_trees_all_equal_shapes_and_dtypes(
    jax.eval_shape(opt.init, abstract), opt.init(params)
  )


@pytest.mark.parametrize("name", CASES)
def test_jit_and_sharded_init_equal_eager_init(name):
  opt = CASES[name].optimizer()
  params = _params()
  eager = opt.init(params)
  jitted = jax.jit(opt.init)(params)
  chex.assert_trees_all_equal_dtypes(jitted, eager)
  chex.assert_trees_all_equal(jitted, eager)
  mesh = jax.make_mesh((1,), ("x",))
  param_shardings = jax.tree.map(
    lambda p: (
      jax.sharding.NamedSharding(mesh, jax.P(*(["x"] + [None] * (p.ndim - 1))))
      if p.ndim
      else jax.sharding.NamedSharding(mesh, jax.P())
    ),
    params,
  )
  shardings = optax_sm3.state_shardings(opt, params, param_shardings)
  sharded = jax.jit(opt.init, out_shardings=shardings)(params)
  chex.assert_trees_all_equal_dtypes(sharded, eager)
  chex.assert_trees_all_equal(sharded, eager)
  for leaf, sharding in zip(
    jax.tree.leaves(sharded), jax.tree.leaves(shardings), strict=True
  ):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)


# ---------------------------------------------------------------------------
# optax.inject_hyperparams.


@pytest.mark.parametrize("jit", _tiers.fast_first([False, True], [True]))
@pytest.mark.parametrize("name", INJECTABLE)
def test_inject_hyperparams_gives_the_plain_state_and_updates(name, jit):
  # optax's test_optimizers_can_be_wrapped_in_inject_hyperparams.
  case = CASES[name]
  plain = case.transformation()
  injected = optax.inject_hyperparams(case.factory, static_args=case.static_args)(
    **case.kwargs
  )
  maybe_jit = jax.jit if jit else (lambda f: f)
  params = [jnp.negative(jnp.ones((2, 3))), jnp.ones((2, 5, 2))]
  grads = [jnp.ones((2, 3)), jnp.negative(jnp.ones((2, 5, 2)))]
  state = maybe_jit(plain.init)(params)
  state_inject = maybe_jit(injected.init)(params)
  # The structure never depends on a hyperparameter's value: jitted and eager
  # inits agree, and the inner state is the plain optimizer's.
  chex.assert_trees_all_equal_shapes_and_dtypes(
    jax.jit(injected.init)(params), injected.init(params)
  )
  chex.assert_trees_all_equal_shapes_and_dtypes(state_inject.inner_state, state)
  for step in range(2):
    updates, state = maybe_jit(plain.update)(grads, state, params)
    updates_inject, state_inject = maybe_jit(injected.update)(
      grads, state_inject, params
    )
    for got, want in ((updates_inject, updates), (state_inject.inner_state, state)):
      chex.assert_trees_all_equal_dtypes(got, want)
      chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
    assert int(state_inject.count) == step + 1


def test_injected_hyperparameter_changes_the_next_step():
  # Injection is only useful if the injected value is read at update time.
  params = _params()
  tx = optax.inject_hyperparams(optax_sm3.sm3)(learning_rate=1.0)
  state = tx.init(params)
  u1, _ = jax.jit(tx.update)(_grads(params), state, params)
  state.hyperparams["learning_rate"] = jnp.asarray(0.5)
  u2, _ = jax.jit(tx.update)(_grads(params), state, params)
  halved = jax.tree.map(lambda u: 0.5 * u, u1)
  chex.assert_trees_all_equal_dtypes(halved, u2)
  chex.assert_trees_all_close(halved, u2, rtol=1e-6)


# ---------------------------------------------------------------------------
# optax.tree_utils lookups.


def test_tree_utils_find_state_fields():
  params = _params()
  opt = optax_sm3.sm3(0.1)
  state = opt.init(params)
  for _ in range(3):
    _, state = opt.update(_grads(params), state, params)
  assert int(optax.tree_utils.tree_get(state, "count")) == 3
  accumulators = optax.tree_utils.tree_get(state, "accumulators")
  assert [a.shape for a in accumulators["w"]] == [(2,), (3,), (4,)]
  momentum = optax.tree_utils.tree_get(state, "ScaleByMomentumState")
  assert momentum.momentum["w"].shape == (2, 3, 4)

  injected = optax.inject_hyperparams(optax_sm3.sm3)(learning_rate=0.1)
  state = injected.init(params)
  for _ in range(2):
    _, state = jax.jit(injected.update)(_grads(params), state, params)
  np.testing.assert_allclose(optax.tree_utils.tree_get(state, "learning_rate"), 0.1)
  counts = optax.tree_utils.tree_get_all_with_path(state, "count")
  tuples = sorted(path[-1].tuple_name for path, _ in counts)
  # The injection's state is InjectStatefulHyperparamsState in recent optax.
  assert tuples[0].startswith("Inject") and tuples[1] == "ScaleBySM3State"
  assert [int(value) for _, value in counts] == [2, 2]
  # tree_set writes back into the same field.
  state = optax.tree_utils.tree_set(state, learning_rate=jnp.asarray(0.2))
  np.testing.assert_allclose(state.hyperparams["learning_rate"], 0.2)


# ---------------------------------------------------------------------------
# Optimisation.


def _parabola():
  final = jnp.array([1.0, -1.0, 1.0])
  return jnp.array([-1.0, 10.0, 1.0]), final, lambda p: jnp.sum((p - final) ** 2)


def _rosenbrock():
  final = jnp.array([1.0, 1.0])

  def loss(p):
    return (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2

  return jnp.zeros(2), final, loss


# (case, overrides, scale) for Rosenbrock, where it needs smaller steps.
_ROSENBROCK = {
  "sm3_recipe": {"learning_rate": 0.01, "total_steps": 10_000},
  "scale_by_sm3": {},
}


def _minimise(opt, target, steps):
  initial, final, loss = target()

  def body(carry, _):
    params, state = carry
    updates, state = opt.update(jax.grad(loss)(params), state, params)
    return (optax.apply_updates(params, updates), state), None

  run = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), length=steps)[0])
  params, _ = run(initial, opt.init(initial))
  return initial, params, final


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("target", ["parabola", "rosenbrock"])
def test_converges(name, target):
  case = CASES[name]
  if target == "parabola":
    opt, setup, steps = case.optimizer(), _parabola, 2000
  else:
    setup, steps = _rosenbrock, 10_000
    opt = case.optimizer(**_ROSENBROCK.get(name, {}))
    if name == "scale_by_sm3":
      opt = optax.chain(case.transformation(), optax.scale(-0.3))
  initial, params, final = _minimise(opt, setup, steps)
  assert float(jnp.max(jnp.abs(initial - final))) > 0.5
  np.testing.assert_allclose(params, final, rtol=3e-2, atol=3e-2)


def test_schedule_and_constant_learning_rate_agree():
  initial, _, loss = _parabola()
  runs = []
  for lr in (1e-2, optax.constant_schedule(1e-2)):
    opt = optax_sm3.sm3(lr)
    params, state = initial, opt.init(initial)
    for _ in range(5):
      updates, state = opt.update(jax.grad(loss)(params), state, params)
      params = optax.apply_updates(params, updates)
    runs.append(params)
  assert not np.allclose(runs[0], initial)
  np.testing.assert_allclose(runs[0], runs[1], rtol=1e-6)


# ---------------------------------------------------------------------------
# Dtypes, compilation, wrappers.


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("name", CASES)
def test_updates_keep_the_parameter_dtype(name, dtype):
  opt = CASES[name].optimizer()
  params = jnp.array([1.0, 2.0], dtype)
  grads = jax.grad(lambda x: jnp.sum(x.astype(jnp.float32) ** 2))(params)
  state = jax.jit(opt.init)(params)
  for _ in range(2):  # the recipe's rate is 0 at step 0 (warm-up)
    updates, state = jax.jit(opt.update)(grads, state, params)
    assert updates.dtype == dtype
  assert bool(jnp.all(updates != 0))


@pytest.mark.parametrize("name", CASES)
def test_no_recompilation_over_steps(name):
  opt = CASES[name].optimizer()
  _, _, loss = _rosenbrock()

  @jax.jit
  def step(params, state):
    updates, state = opt.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  params = jnp.array([0.5, 0.5])
  state = opt.init(params)
  for _ in range(4):
    params, state = step(params, state)
  assert step._cache_size() == 1


@pytest.mark.parametrize(
  "dtype", _tiers.fast_first([jnp.bfloat16, jnp.float32], [jnp.bfloat16])
)
@pytest.mark.parametrize("name", CASES)
def test_multi_steps(name, dtype):
  opt = optax.MultiSteps(CASES[name].optimizer(), every_k_schedule=4)
  params = jnp.array([1.0, 2.0], dtype)
  grads = jnp.array([2.0, 4.0], dtype)
  state = jax.jit(opt.init)(params)
  update = jax.jit(opt.update)
  moved = []
  for _ in range(8):
    updates, state = update(grads, state, params)
    assert updates.dtype == dtype
    moved.append(bool(jnp.any(updates != 0)))
  # Every 4th call steps (the recipe's first step has rate 0: look at 8).
  assert moved[7] and not any(moved[k] for k in (0, 1, 2, 4, 5, 6))
  assert int(state.gradient_step) == 2


@pytest.mark.parametrize(
  "dtype", _tiers.fast_first([jnp.float16, jnp.bfloat16, jnp.float32], [jnp.bfloat16])
)
@pytest.mark.parametrize("name", CASES)
def test_state_dtype_stable_under_cond(name, dtype):
  # optax's test_state_shape_dtype_shard_stability: both branches of a
  # lax.cond must agree on every leaf's shape and dtype.
  opt = CASES[name].optimizer()
  initial, _, loss = _parabola()
  params = initial.astype(dtype)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: loss(p.astype(jnp.float32)))(params)
    pred = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
    updates, new_state = jax.lax.cond(
      pred,
      lambda: opt.update(grads, state, params),
      lambda: (jnp.zeros_like(params), state),
    )
    return optax.apply_updates(params, updates), new_state

  for _ in range(2):
    params, new_state = step(params, state)
    assert params.dtype == dtype
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    state = new_state


# ---------------------------------------------------------------------------
# Trees from other libraries: told apart from functions by their leaves.


def _eqx_linear():
  eqx = pytest.importorskip("equinox")

  class Linear(eqx.Module):
    weight: Any
    bias: Any

    def __call__(self, x):
      return self.weight @ x + self.bias

  return Linear


def test_equinox_module_trees_are_trees_not_functions():
  linear = _eqx_linear()
  params = linear(jnp.ones((2, 3, 4)), jnp.ones((2, 4)))
  assert callable(params)  # as every Equinox module: the case at stake
  grads = jax.tree.map(lambda p: 0.5 * p, params)

  # stacked_axes as a module of ints: the weight's leading axis is a stack.
  state = optax_sm3.sm3(0.1, stacked_axes=linear(1, 0)).init(params)
  assert [a.shape for a in state[0].accumulators.weight] == [(2, 3), (2, 4)]
  assert [a.shape for a in state[0].accumulators.bias] == [(2,), (4,)]

  # weight_decay_mask as a module of booleans: only the weight decays.
  decayed = optax_sm3.sm3(0.1, weight_decay=0.5, weight_decay_mask=linear(True, False))
  plain = optax_sm3.sm3(0.1)
  u_decayed, _ = decayed.update(grads, decayed.init(params), params)
  u_plain, _ = plain.update(grads, plain.init(params), params)
  np.testing.assert_array_equal(u_decayed.bias, u_plain.bias)
  np.testing.assert_allclose(
    u_decayed.weight, u_plain.weight - 0.1 * 0.5 * params.weight
  )

  # The injected optimizer too (the mask is structural: static).
  injected = optax.inject_hyperparams(
    optax_sm3.sm3, static_args=("weight_decay_mask",)
  )(learning_rate=0.1, weight_decay=0.5, weight_decay_mask=linear(True, False))
  u_injected, _ = jax.jit(injected.update)(grads, injected.init(params), params)
  chex.assert_trees_all_equal_dtypes(u_injected, u_decayed)
  chex.assert_trees_all_close(u_injected, u_decayed, rtol=1e-6)


def test_a_function_is_still_called():
  linear = _eqx_linear()
  params = linear(jnp.ones((2, 3, 4)), jnp.ones((2, 4)))
  stacked = optax_sm3.scale_by_sm3(
    stacked_axes=lambda p: jax.tree.map(lambda x: x.ndim - 2, p)
  ).init(params)
  assert [a.shape for a in stacked.accumulators.weight] == [(2, 3), (2, 4)]
  assert [a.shape for a in stacked.accumulators.bias] == [(2,), (4,)]


def test_flax_nnx_state_trees():
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  grads = jax.tree.map(jnp.ones_like, params)
  mask = jax.tree.map(lambda p: p.ndim > 1, params)
  stacked = jax.tree.map(lambda p: p.ndim - 1, params)  # kernel 1, bias 0

  state = optax_sm3.sm3(0.1, stacked_axes=stacked).init(params)
  accumulators = state[0].accumulators
  assert [a.shape for a in accumulators["kernel"]] == [(3, 4)]
  assert [a.shape for a in accumulators["bias"]] == [(4,)]

  decayed = optax_sm3.sm3(0.1, weight_decay=0.5, weight_decay_mask=mask)
  plain = optax_sm3.sm3(0.1)
  u_decayed, _ = jax.jit(decayed.update)(grads, decayed.init(params), params)
  u_plain, _ = jax.jit(plain.update)(grads, plain.init(params), params)
  np.testing.assert_array_equal(u_decayed["bias"][...], u_plain["bias"][...])
  np.testing.assert_allclose(
    u_decayed["kernel"][...],
    u_plain["kernel"][...] - 0.1 * 0.5 * params["kernel"][...],
    rtol=1e-6,
  )
  abstract = jax.eval_shape(decayed.init, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(abstract, decayed.init(params))
