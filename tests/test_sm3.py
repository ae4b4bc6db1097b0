"""The ready optimizer: reference, drop-in equality, memory, optax's checklist."""

import _reference
import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sm3

# ---------------------------------------------------------------------------
# Against the reference.


@hypothesis.given(
  shape=st.lists(st.integers(1, 4), min_size=0, max_size=4).map(tuple),
  seed=st.integers(0, 2**31 - 1),
  steps=st.integers(1, 4),
)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("beta", [0.0, 0.95])
def test_matches_reference(shape, seed, steps, momentum, beta):
  rng = np.random.default_rng(seed)
  lr = 0.1
  tx = optax_sm3.sm3(lr, momentum=momentum, beta=beta)
  ref = _reference.ReferenceSM3(shape, beta=beta, momentum=momentum, learning_rate=lr)
  params = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(steps):
    g = rng.standard_normal(shape).astype(np.float32)
    g *= rng.random(shape) < 0.7  # exact zeros
    u, state = update(jnp.asarray(g), state, params)
    np.testing.assert_allclose(u, ref.update(g), rtol=2e-5, atol=1e-8)
    params = optax.apply_updates(params, u)


# ---------------------------------------------------------------------------
# Drop-in for optax.sm3.


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_same_updates_as_optax_sm3(momentum):
  rng = np.random.default_rng(0)
  params = {
    "emb": jnp.zeros((20, 8)),
    "conv": jnp.zeros((3, 3, 2, 4)),
    "bias": jnp.zeros((8,)),
  }
  ours = optax_sm3.sm3(0.05, momentum=momentum)
  theirs = optax.sm3(0.05, momentum=momentum)
  s_ours, s_theirs = ours.init(params), theirs.init(params)
  for _ in range(5):
    grads = jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params
    )
    u_ours, s_ours = ours.update(grads, s_ours, params)
    u_theirs, s_theirs = theirs.update(grads, s_theirs, params)
    chex.assert_trees_all_close(u_ours, u_theirs, rtol=1e-6, atol=1e-9)
    params = optax.apply_updates(params, u_ours)


# ---------------------------------------------------------------------------
# Memory.


def _state_elements(state):
  return sum(x.size for x in jax.tree.leaves(state))


@pytest.mark.parametrize("momentum", [0.0, None])
def test_no_momentum_buffer_when_momentum_off(momentum):
  params = {"emb": jnp.zeros((1000, 32)), "b": jnp.zeros((32,)), "s": jnp.zeros(())}
  state = optax_sm3.sm3(0.1, momentum=momentum).init(params)
  # accumulators + the step counter of scale_by_sm3
  assert _state_elements(state) == (1000 + 32) + 32 + 1 + 1


def test_momentum_adds_exactly_one_copy():
  params = {"emb": jnp.zeros((1000, 32)), "b": jnp.zeros((32,))}
  state = optax_sm3.sm3(0.1, momentum=0.9).init(params)
  assert _state_elements(state) == (1000 + 32) + 32 + 1 + (1000 * 32 + 32)


def test_mu_dtype():
  params = {"w": jnp.zeros((4, 5))}
  tx = optax_sm3.sm3(0.1, momentum=0.9, mu_dtype=jnp.bfloat16)
  state = tx.init(params)
  assert state[1].momentum["w"].dtype == jnp.bfloat16
  u, new_state = tx.update({"w": jnp.ones((4, 5))}, state, params)
  assert u["w"].dtype == jnp.float32
  assert new_state[1].momentum["w"].dtype == jnp.bfloat16


def test_nesterov_differs_and_matches_formula():
  g = jnp.asarray([[1.0, 2.0], [3.0, 4.0]])
  plain = optax_sm3.sm3(1.0, momentum=0.5)
  nest = optax_sm3.sm3(1.0, momentum=0.5, nesterov=True)
  u_plain, _ = plain.update(g, plain.init(g), g)
  u_nest, _ = nest.update(g, nest.init(g), g)
  # m = 0.5 * u; nesterov output = 0.5 * m + 0.5 * u = 1.5 * m.
  np.testing.assert_allclose(u_nest, 1.5 * u_plain, rtol=1e-6)


# ---------------------------------------------------------------------------
# Weight decay and clipping.


def test_decoupled_weight_decay():
  params = jnp.full((2, 3), 2.0)
  g = jnp.ones((2, 3))
  base = optax_sm3.sm3(0.1, momentum=0.0)
  wd = optax_sm3.sm3(0.1, momentum=0.0, weight_decay=0.01)
  u_base, _ = base.update(g, base.init(params), params)
  u_wd, _ = wd.update(g, wd.init(params), params)
  np.testing.assert_allclose(u_wd, u_base - 0.1 * 0.01 * params, rtol=1e-6)


def test_coupled_weight_decay_enters_preconditioner():
  params = jnp.full((2, 3), 2.0)
  g = jnp.ones((2, 3))
  tx = optax_sm3.sm3(0.1, momentum=0.0, weight_decay=0.5, weight_decay_mode="coupled")
  u, _ = tx.update(g, tx.init(params), params)
  pre = optax_sm3.scale_by_sm3()
  expected, _ = pre.update(g + 0.5 * params, pre.init(params))
  np.testing.assert_allclose(u, -0.1 * expected, rtol=1e-6)


def test_weight_decay_mask():
  params = {"w": jnp.full((2, 2), 2.0), "b": jnp.full((2,), 2.0)}
  grads = jax.tree.map(jnp.ones_like, params)
  mask = {"w": True, "b": False}
  tx = optax_sm3.sm3(0.1, momentum=0.0, weight_decay=0.1, weight_decay_mask=mask)
  base = optax_sm3.sm3(0.1, momentum=0.0)
  u, _ = tx.update(grads, tx.init(params), params)
  u0, _ = base.update(grads, base.init(params), params)
  np.testing.assert_array_equal(u["b"], u0["b"])
  np.testing.assert_allclose(u["w"], u0["w"] - 0.1 * 0.1 * 2.0, rtol=1e-6)


def test_gradient_clipping():
  params = jnp.zeros((2, 2))
  big = jnp.full((2, 2), 100.0)
  by_norm = optax_sm3.sm3(1.0, momentum=0.0, grad_clip_norm=1.0)
  by_value = optax_sm3.sm3(1.0, momentum=0.0, grad_clip_value=0.5)
  pre = optax_sm3.scale_by_sm3()
  for tx, clipped in ((by_norm, big / 200.0), (by_value, jnp.full((2, 2), 0.5))):
    u, _ = tx.update(big, tx.init(params), params)
    expected, _ = pre.update(clipped, pre.init(params))
    np.testing.assert_allclose(u, -expected, rtol=1e-6)


# ---------------------------------------------------------------------------
# optax's compatibility checklist for new optimizers.


def _parabola():
  target = jnp.asarray([1.0, -2.0, 3.0])
  return jnp.zeros(3), lambda p: jnp.sum((p - target) ** 2), target


def test_no_recompilation():
  traces = 0
  tx = optax_sm3.sm3(0.1)
  params = {"w": jnp.ones((3, 4)), "s": jnp.ones(())}

  @jax.jit
  def step(params, state):
    nonlocal traces
    traces += 1
    grads = jax.tree.map(lambda p: 2 * p, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  params, state = step(params, state)
  params, state = step(params, state)
  params, state = step(params, state)
  assert traces == 1


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_converges_on_parabola(momentum):
  params, loss, target = _parabola()
  tx = optax_sm3.sm3(0.5, momentum=momentum)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(400):
    params, state = step(params, state)
  np.testing.assert_allclose(params, target, atol=1e-2)


def test_converges_on_rosenbrock():
  def rosenbrock(p):
    return (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2

  params = jnp.asarray([-1.2, 1.0])
  tx = optax_sm3.sm3(0.02, momentum=0.9, beta=0.95)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(rosenbrock)(params), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(5000):
    params, state = step(params, state)
  np.testing.assert_allclose(params, [1.0, 1.0], atol=3e-2)


def test_inject_hyperparams_gives_identical_updates():
  kwargs = {"learning_rate": 0.1, "momentum": 0.9, "beta": 0.5, "eps": 1e-6}
  plain = optax_sm3.sm3(**kwargs)
  injected = optax.inject_hyperparams(optax_sm3.sm3)(**kwargs)
  params = {"w": jnp.ones((3, 4)), "s": jnp.ones(())}
  s_plain, s_inj = plain.init(params), injected.init(params)
  rng = np.random.default_rng(0)
  for _ in range(3):
    grads = jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params
    )
    u_plain, s_plain = plain.update(grads, s_plain, params)
    u_inj, s_inj = jax.jit(injected.update)(grads, s_inj, params)
    # Injection turns 0.9 into a float32 array, so 1 - momentum is rounded
    # differently (optax's own inject_hyperparams test allows rtol=1e-5).
    chex.assert_trees_all_close(u_plain, u_inj, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_updates_keep_parameter_dtype(dtype, momentum):
  params = {"w": jnp.ones((3, 4), dtype), "s": jnp.ones((), dtype)}
  tx = optax_sm3.sm3(0.1, momentum=momentum)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: p * 0.5, params)
  updates, new_state = jax.jit(tx.update)(grads, state, params)
  for u in jax.tree.leaves(updates):
    assert u.dtype == dtype
  new_params = optax.apply_updates(params, updates)
  assert all(p.dtype == dtype for p in jax.tree.leaves(new_params))
  assert jax.tree.map(lambda x: x.dtype, state) == jax.tree.map(
    lambda x: x.dtype, new_state
  )


def test_multi_steps():
  tx = optax.MultiSteps(optax_sm3.sm3(0.1), every_k_schedule=3)
  params = {"w": jnp.ones((2, 3))}
  state = tx.init(params)
  grads = {"w": jnp.ones((2, 3))}
  for k in range(3):
    updates, state = jax.jit(tx.update)(grads, state, params)
    moved = bool(jnp.any(updates["w"] != 0))
    assert moved == (k == 2)


def test_state_stable_under_cond_and_scan():
  tx = optax_sm3.sm3(0.1, momentum=0.9)
  params = {"w": jnp.ones((2, 3)), "s": jnp.ones(())}
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)

  def maybe_update(pred, state):
    return jax.lax.cond(
      pred, lambda s: tx.update(grads, s, params)[1], lambda s: s, state
    )

  after = jax.jit(maybe_update)(True, state)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), after) == jax.tree.map(
    lambda x: (x.shape, x.dtype), state
  )

  def body(carry, _):
    p, s = carry
    u, s = tx.update(grads, s, p)
    return (optax.apply_updates(p, u), s), None

  (_, final), _ = jax.lax.scan(body, (params, state), None, length=4)
  assert int(final[0].count) == 4


def test_constant_schedule_equals_float():
  params = {"w": jnp.ones((3, 4))}
  a = optax_sm3.sm3(0.1)
  b = optax_sm3.sm3(optax.constant_schedule(0.1))
  sa, sb = a.init(params), b.init(params)
  for i in range(3):
    grads = {"w": jnp.full((3, 4), float(i + 1))}
    ua, sa = a.update(grads, sa, params)
    ub, sb = b.update(grads, sb, params)
    chex.assert_trees_all_equal(ua, ub)


def test_schedule_is_followed():
  schedule = optax.linear_schedule(1.0, 0.0, 4)
  tx = optax_sm3.sm3(schedule, momentum=0.0)
  params = jnp.ones((2, 2))
  state = tx.init(params)
  for t in range(5):
    u, state = tx.update(jnp.ones((2, 2)), state, params)
    # lr_t = 1 - t/4, and the accumulators hold t + 1 after t + 1 unit grads.
    expected = -(1.0 - t / 4) / np.sqrt(t + 1 + 1e-8)
    np.testing.assert_allclose(u, np.full((2, 2), expected), rtol=1e-6)


def test_init_on_shape_dtype_structs():
  params = {
    "w": jax.ShapeDtypeStruct((5, 7), jnp.bfloat16),
    "s": jax.ShapeDtypeStruct((), jnp.float32),
  }
  tx = optax_sm3.sm3(0.1, momentum=0.9)
  abstract = jax.eval_shape(tx.init, params)
  concrete = tx.init(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(
    lambda x: (x.shape, x.dtype), concrete
  )


# ---------------------------------------------------------------------------
# optax.inject_hyperparams gives the same state as the plain optimizer.


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_injected_state_equals_plain_state(momentum, weight_decay):
  params = {"emb": jnp.ones((2000, 64)), "b": jnp.ones(64)}
  plain = optax_sm3.sm3(0.1, momentum=momentum, weight_decay=weight_decay)
  # A Python 0 keeps no momentum buffer; an injected (array) 0 keeps one
  # unless it is static (see test_injected_zero_momentum_keeps_a_buffer).
  static = ("momentum",) if momentum == 0.0 else ()
  injected = optax.inject_hyperparams(optax_sm3.sm3, static_args=static)(
    learning_rate=0.1, momentum=momentum, weight_decay=weight_decay
  )
  s_plain = plain.init(params)
  s_injected = injected.init(params)
  chex.assert_trees_all_equal_shapes_and_dtypes(s_injected.inner_state, s_plain)
  jitted = jax.jit(injected.init)(params)
  chex.assert_trees_all_equal_shapes_and_dtypes(jitted, s_injected)
  bytes_plain = sum(x.nbytes for x in jax.tree.leaves(s_plain))
  if momentum == 0.0:
    assert bytes_plain < 0.05 * sum(x.nbytes for x in jax.tree.leaves(params))
  # A checkpoint of the plain optimizer restores into the injected one.
  grads = jax.tree.map(lambda p: 0.5 * p, params)
  restored = s_injected._replace(inner_state=s_plain)
  u_plain, _ = plain.update(grads, s_plain, params)
  u_injected, _ = jax.jit(injected.update)(grads, restored, params)
  for a, b in zip(jax.tree.leaves(u_plain), jax.tree.leaves(u_injected), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_injected_zero_momentum_keeps_a_buffer_that_can_change():
  params = {"w": jnp.ones((3, 4))}
  grads = {"w": jnp.arange(12.0).reshape(3, 4)}
  tx = optax.inject_hyperparams(optax_sm3.sm3)(learning_rate=0.1, momentum=0.0)
  state = jax.jit(tx.init)(params)
  assert state.inner_state[1].momentum["w"].shape == (3, 4)
  plain = optax_sm3.sm3(0.1, momentum=0.0)
  u_plain, _ = plain.update(grads, plain.init(params), params)
  u_injected, state = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_allclose(u_injected["w"], u_plain["w"], rtol=1e-6)
  # Made non-zero at run time, it runs as momentum from then on: the same
  # step as the plain optimizer with that momentum from the same state.
  state.hyperparams["momentum"] = jnp.asarray(0.5)
  u_injected, _ = jax.jit(tx.update)(grads, state, params)
  moving = optax_sm3.sm3(0.1, momentum=0.5)
  u_moving, _ = moving.update(grads, state.inner_state, params)
  np.testing.assert_allclose(u_injected["w"], u_moving["w"], rtol=1e-6)
  assert not np.allclose(u_moving["w"], u_plain["w"])


def test_injected_update_without_params_when_weight_decay_is_zero():
  params = {"w": jnp.ones((3, 4))}
  tx = optax.inject_hyperparams(optax_sm3.sm3)(learning_rate=0.1, momentum=0.0)
  updates, _ = jax.jit(tx.update)(params, tx.init(params))
  assert updates["w"].shape == (3, 4)


def test_weight_decay_needs_params_when_on():
  tx = optax_sm3.sm3(0.1, weight_decay=0.1)
  params = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="needs the parameters"):
    tx.update(params, tx.init(params))


def test_injected_weight_decay_can_change_at_run_time():
  params = {"w": jnp.ones((3, 4))}
  grads = {"w": jnp.full((3, 4), 2.0)}
  tx = optax.inject_hyperparams(optax_sm3.sm3)(learning_rate=0.1, weight_decay=0.0)
  state = tx.init(params)
  state.hyperparams["weight_decay"] = jnp.asarray(0.5)
  u_injected, _ = jax.jit(tx.update)(grads, state, params)
  plain = optax_sm3.sm3(0.1, weight_decay=0.5)
  u_plain, _ = plain.update(grads, plain.init(params), params)
  np.testing.assert_allclose(u_injected["w"], u_plain["w"], rtol=1e-6)
  # Without the parameters a non-zero decay cannot be applied: refused.
  with pytest.raises(ValueError, match="`weight_decay` is not 0"):
    tx.update(grads, state)  # concrete: raised at once
  with pytest.raises(Exception, match="`weight_decay` is not 0"):  # traced: at run
    jax.block_until_ready(jax.jit(tx.update)(grads, state))


def test_state_without_buffer_is_refused_by_a_momentum_that_needs_one():
  params = {"w": jnp.ones((3, 4))}
  state = optax_sm3.sm3(0.1, momentum=0.0).init(params)
  with pytest.raises(ValueError, match="no momentum buffer"):
    optax_sm3.sm3(0.1, momentum=0.5).update(params, state, params)


@pytest.mark.parametrize("weight_decay", [0.0, None, np.float32(0.0)])
def test_plain_static_zero_decay_needs_no_params(weight_decay):
  params = {"w": jnp.ones((3, 4))}
  tx = optax_sm3.sm3(0.1, weight_decay=weight_decay)
  state = tx.init(params)
  without, _ = jax.jit(tx.update)(params, state)
  with_params, _ = tx.update(params, state, params)
  np.testing.assert_array_equal(without["w"], with_params["w"])
  # The decay stage is in the state all the same: one tree for every value.
  chex.assert_trees_all_equal_shapes_and_dtypes(
    state, optax_sm3.sm3(0.1, weight_decay=0.5).init(params)
  )


# ---------------------------------------------------------------------------
# Odd input: empty, integer and Python-number leaves, eps = 0.


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (2, 0, 3), (0,)])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_zero_size_parameters(shape, momentum):
  params = {"empty": jnp.zeros(shape), "w": jnp.ones((2, 3))}
  for tx in (
    optax_sm3.sm3(0.1, momentum=momentum, weight_decay=0.1),
    optax_sm3.scale_by_sm3(),
  ):
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for update in (tx.update, jax.jit(tx.update)):
      updates, new_state = update(grads, state, params)
      assert updates["empty"].shape == shape
      assert np.all(np.isfinite(updates["w"])) and np.any(updates["w"] != 0)
      chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)


def test_eps_zero_is_differentiable():
  # Meta-learning through an update: d(update)/d(lr or g) must be finite even
  # where the gradient, and so nu, is 0.
  tx = optax_sm3.sm3(0.1, momentum=0.0, eps=0.0)
  params = jnp.ones((3, 4))
  state = tx.init(params)

  def f(g):
    updates, _ = tx.update(g, state, params)
    return jnp.sum(updates)

  g = jnp.zeros((3, 4)).at[0, 0].set(2.0)
  grad = jax.grad(f)(g)
  assert np.all(np.isfinite(grad)), grad


def test_integer_gradients_give_float_updates():
  tx = optax_sm3.sm3(0.1, momentum=0.9)
  params = jnp.zeros((2, 3))
  state = tx.init(params)
  float_state = state
  for _ in range(3):
    updates, state = tx.update(jnp.ones((2, 3), jnp.int32), state, params)
    expected, float_state = tx.update(jnp.ones((2, 3)), float_state, params)
  assert updates.dtype == jnp.float32
  np.testing.assert_allclose(updates, expected)
  assert np.all(updates < 0)


def test_python_number_leaves():
  params = {"a": 1.0, "b": jnp.ones(2)}
  tx = optax_sm3.sm3(0.1, momentum=0.9, weight_decay=0.01)
  state = tx.init(params)
  updates, state = tx.update({"a": 0.5, "b": jnp.ones(2)}, state, params)
  new = optax.apply_updates(params, updates)
  assert float(new["a"]) < 1.0


# ---------------------------------------------------------------------------
# Invalid input.


@pytest.mark.parametrize(
  ("kwargs", "name"),
  [
    ({"learning_rate": -0.1}, "learning_rate"),
    ({"momentum": 1.0}, "momentum"),
    ({"momentum": -0.5}, "momentum"),
    ({"beta": 1.5}, "beta"),
    ({"beta": -0.1}, "beta"),
    ({"eps": -1.0}, "eps"),
    ({"weight_decay": -1e-4}, "weight_decay"),
    ({"grad_clip_norm": -1.0}, "grad_clip_norm"),
    ({"grad_clip_norm": 0.0}, "grad_clip_norm"),
    ({"grad_clip_value": -1.0}, "grad_clip_value"),
    ({"weight_decay_mode": "l2"}, "weight_decay_mode"),
    ({"variant": "2"}, "variant"),
    ({"block_size": -1}, "block_size"),
  ],
)
def test_invalid_arguments(kwargs, name):
  kwargs = {"learning_rate": 0.1, **kwargs}
  with pytest.raises(ValueError, match=name):
    optax_sm3.sm3(**kwargs)


def test_block_size_reaches_the_preconditioner():
  # Lowered from shapes only: 64 MiB of parameters are never allocated.
  params = jax.ShapeDtypeStruct((65536, 256), jnp.float32)

  def temp_bytes(tx):
    state = jax.eval_shape(tx.init, params)
    step = jax.jit(lambda g, s: tx.update(g, s, g)).lower(params, state).compile()
    return step.memory_analysis().temp_size_in_bytes

  blocked = temp_bytes(optax_sm3.sm3(0.1, momentum=0.0))
  direct = temp_bytes(optax_sm3.sm3(0.1, momentum=0.0, block_size=0))
  assert blocked < 2**23 < 2**26 <= direct, (blocked, direct)


def test_learning_rate_wrong_type():
  with pytest.raises(TypeError, match="learning_rate"):
    optax_sm3.sm3("0.1")


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_non_float_parameters_rejected(dtype):
  with pytest.raises(TypeError, match=r"\['w'\]"):
    optax_sm3.sm3(0.1).init({"w": jnp.zeros((2, 2), dtype)})


@pytest.mark.parametrize(
  "kwargs, name",
  [
    ({"mu_dtype": jnp.int32}, "mu_dtype"),
    ({"accumulator_dtype": jnp.int32}, "accumulator_dtype"),
    ({"accumulator_dtype": jnp.complex64}, "accumulator_dtype"),
    ({"nesterov": "no"}, "nesterov"),
  ],
)
def test_bad_dtypes_and_flags(kwargs, name):
  with pytest.raises(TypeError, match=name):
    optax_sm3.sm3(0.1, **kwargs)


@pytest.mark.parametrize(
  "call, name",
  [
    (lambda: optax_sm3.sm3(0.1, eps=np.inf), "eps"),
    (lambda: optax_sm3.sm3(np.inf), "learning_rate"),
    (lambda: optax_sm3.sm3(0.1, weight_decay=np.inf), "weight_decay"),
    (lambda: optax_sm3.warmup_schedule(np.inf, 100), "peak_value"),
    (lambda: optax_sm3.scale_by_sm3(eps=-np.inf), "eps"),
  ],
)
def test_infinite_hyperparameters_rejected(call, name):
  with pytest.raises(ValueError, match=f"`{name}` must be in"):
    call()
