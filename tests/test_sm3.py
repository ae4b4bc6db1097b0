"""The ready optimizer: reference, drop-in equality, memory, optax's checklist."""

import _reference
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sm3


def _tree_allclose(a, b, **kwargs):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, **kwargs)


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
    _tree_allclose(u_ours, u_theirs, rtol=1e-6, atol=1e-9)
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
    _tree_allclose(u_plain, u_inj, rtol=1e-5, atol=1e-9)


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
    _tree_allclose(ua, ub, rtol=0, atol=0)


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
