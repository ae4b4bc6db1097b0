"""Drop-in fidelity and bad input (the "Trust" issue): the contracts behind them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sm3
from optax_sm3 import _accumulate


def _structure_and_shapes(tree):
  return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


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
  assert _structure_and_shapes(s_injected.inner_state) == _structure_and_shapes(s_plain)
  jitted = jax.jit(injected.init)(params)
  assert _structure_and_shapes(jitted) == _structure_and_shapes(s_injected)
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


# ---------------------------------------------------------------------------
# Calls written for optax.scale_by_sm3.


@pytest.mark.parametrize(
  "call",
  [
    lambda: optax_sm3.scale_by_sm3(0.9, 1.0),
    lambda: optax_sm3.scale_by_sm3(0.9),
    lambda: optax_sm3.scale_by_sm3(b1=0.9, b2=1.0),
    lambda: optax_sm3.scale_by_sm3(b2=0.99),
  ],
)
def test_optax_style_calls_explain_the_difference(call):
  with pytest.raises(TypeError, match=r"optax.scale_by_sm3\(b1, b2, eps\)"):
    call()


def test_optax_translation_in_the_message_is_right():
  # optax.scale_by_sm3(b1, b2, eps) == scale_by_sm3(beta=...) + momentum(b1).
  params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
  rng = np.random.default_rng(0)
  for b2, beta in ((1.0, 0.0), (0.99, 0.99)):
    theirs = optax.scale_by_sm3(0.9, b2, 1e-8)
    ours = optax.chain(
      optax_sm3.scale_by_sm3(beta=beta, eps=1e-8), optax_sm3.scale_by_momentum(0.9)
    )
    s_t, s_o = theirs.init(params), ours.init(params)
    for _ in range(3):
      g = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)
      u_t, s_t = theirs.update(g, s_t)
      u_o, s_o = ours.update(g, s_o)
      for a, b in zip(jax.tree.leaves(u_t), jax.tree.leaves(u_o), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# Switching from optax.sm3.


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_resume_from_optax_sm3(momentum, dtype):
  rng = np.random.default_rng(1)
  params = {"emb": jnp.ones((20, 6), dtype), "conv": jnp.ones((3, 3, 2, 4), dtype)}

  def grads():
    return jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params
    )

  theirs = optax.sm3(0.05, momentum=momentum)
  s_theirs = theirs.init(params)
  p_theirs = params
  for _ in range(3):
    u, s_theirs = theirs.update(grads(), s_theirs, p_theirs)
    p_theirs = optax.apply_updates(p_theirs, u)
  ours = optax_sm3.sm3(0.05, momentum=momentum)
  s_ours = optax_sm3.from_optax_sm3(s_theirs, p_theirs, ours, step=3)
  assert int(s_ours[0].count) == 3
  p_ours = p_theirs
  for _ in range(4):
    g = grads()
    u, s_theirs = theirs.update(g, s_theirs, p_theirs)
    p_theirs = optax.apply_updates(p_theirs, u)
    u, s_ours = ours.update(g, s_ours, p_ours)
    p_ours = optax.apply_updates(p_ours, u)
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_theirs), strict=True):
    np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol
    )


def test_resume_sets_the_schedule_count():
  params = {"w": jnp.ones((4, 2))}
  schedule = optax.linear_schedule(1.0, 0.0, 10)
  ours = optax_sm3.sm3(schedule, momentum=0.0)
  state = optax_sm3.from_optax_sm3(optax.sm3(1.0).init(params), params, ours, step=7)
  counts = [int(s.count) for s in state if isinstance(s, optax.ScaleByScheduleState)]
  assert counts == [7]


def test_resume_refuses_other_covers():
  params = {"w": jnp.ones((4, 1))}
  with pytest.raises(ValueError, match=r"\['w'\].*per-axis cover"):
    optax_sm3.from_optax_sm3(
      optax.sm3(1.0).init(params), params, optax_sm3.sm3(1.0, skip_unit_axes=True)
    )


# ---------------------------------------------------------------------------
# Bad input.


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
      assert _structure_and_shapes(new_state) == _structure_and_shapes(state)


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


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_non_float_parameters_rejected(dtype):
  with pytest.raises(TypeError, match=r"\['w'\]"):
    optax_sm3.sm3(0.1).init({"w": jnp.zeros((2, 2), dtype)})


def test_boolean_gradients_rejected():
  tx = optax_sm3.scale_by_sm3()
  with pytest.raises(TypeError, match="boolean"):
    tx.update(jnp.ones(3, bool), tx.init(jnp.zeros(3)))


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


def test_wrong_gradient_shape_names_the_parameter():
  tx = optax_sm3.sm3(0.1)
  params = {"layer": {"w": jnp.zeros((3, 1))}}
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"\['layer'\]\['w'\].*\(4,\).*\(3,\)"):
    tx.update({"layer": {"w": jnp.zeros(4)}}, state, params)


def test_python_number_leaves():
  params = {"a": 1.0, "b": jnp.ones(2)}
  tx = optax_sm3.sm3(0.1, momentum=0.9, weight_decay=0.01)
  state = tx.init(params)
  updates, state = tx.update({"a": 0.5, "b": jnp.ones(2)}, state, params)
  new = optax.apply_updates(params, updates)
  assert float(new["a"]) < 1.0


def test_warmup_schedule_accepts_numpy_integers():
  schedule = optax_sm3.warmup_schedule(1.0, np.int64(100))
  assert float(schedule(100)) == 1.0


# ---------------------------------------------------------------------------
# Non-finite gradients: one behaviour on every path.


@pytest.mark.parametrize("variant", ["II", "I"])
@pytest.mark.parametrize("shape", [(6, 5), (512, 256)])  # direct, blocked
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
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
  sparse = optax_sm3.sparse_rows(0.1)
  dense = optax_sm3.sm3(0.1, momentum=0.0)
  rows = jnp.asarray([[1.0, np.nan, 2.0, 3.0], [np.inf, 1.0, 1.0, 1.0]])
  ids = jnp.asarray([3, 9])
  _, s_sparse = sparse.update(ids, rows, sparse.init(table), table)
  _, s_dense = dense.update(
    jnp.zeros_like(table).at[ids].add(rows), dense.init(table), table
  )
  for a, b in zip(jax.tree.leaves(s_sparse), jax.tree.leaves(s_dense), strict=True):
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# The CPU loop is bit-identical to the direct form where the library uses it.


@pytest.mark.parametrize("variant", ["II", "I"])
@pytest.mark.parametrize("beta", [0.0, 0.9])
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


@pytest.mark.parametrize("weight_decay", [0.0, None, np.float32(0.0)])
def test_plain_static_zero_decay_needs_no_params(weight_decay):
  params = {"w": jnp.ones((3, 4))}
  tx = optax_sm3.sm3(0.1, weight_decay=weight_decay)
  state = tx.init(params)
  without, _ = jax.jit(tx.update)(params, state)
  with_params, _ = tx.update(params, state, params)
  np.testing.assert_array_equal(without["w"], with_params["w"])
  # The decay stage is in the state all the same: one tree for every value.
  assert _structure_and_shapes(state) == _structure_and_shapes(
    optax_sm3.sm3(0.1, weight_decay=0.5).init(params)
  )
