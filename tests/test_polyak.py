"""Polyak averaging: NumPy reference, optax's checklist, NNX and plain loops."""

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sm3

SHAPES = {"r0": (), "r1": (3,), "r2": (2, 1), "r3": (1, 3, 2), "r4": (2, 1, 1, 3)}


def reference_average(trajectory, decay, debias):
  """The average after ``len(trajectory) - 1`` steps, from the definition.

  ``trajectory`` is ``[p_0, p_1, ..., p_T]``. Debiased: the normalised
  weighted mean ``sum_s decay**(T-s) p_s / sum_s decay**(T-s)`` over
  ``s = 1..T`` (``p_0`` before any step). Plain: ``a_0 = p_0``,
  ``a_s = decay a_{s-1} + (1 - decay) p_s``. Float64 throughout.
  """
  p = [np.asarray(x, np.float64) for x in trajectory]
  steps = len(p) - 1
  if steps == 0:
    return p[0]
  if debias:
    weights = [decay ** (steps - s) for s in range(1, steps + 1)]  # 0**0 == 1
    return sum(w * x for w, x in zip(weights, p[1:], strict=True)) / sum(weights)
  a = p[0]
  for x in p[1:]:
    a = decay * a + (1 - decay) * x
  return a


def _params(rng, dtype=jnp.float32):
  return {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in SHAPES.items()}


def _grads(rng, params):
  return jax.tree.map(
    lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params
  )


def _train(tx, params, grads_seq, update=None, averaged=True):
  """Runs the loop; returns the parameter trajectory and the averages seen."""
  update = update or tx.update
  average = optax_sm3.polyak_params if averaged else lambda state: None
  state = tx.init(params)
  trajectory, averages = [params], [average(state)]
  for grads in grads_seq:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    trajectory.append(params)
    averages.append(average(state))
  return trajectory, averages, state


def _reference_tree(trajectory, decay, debias):
  return jax.tree.map(
    lambda *leaves: reference_average(leaves, decay, debias), *trajectory
  )


# ---------------------------------------------------------------------------
# Against the reference.


@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.999, 1.0])
def test_matches_reference_every_step(decay, debias):
  rng = np.random.default_rng(0)
  params = _params(rng)
  tx = optax.chain(optax.sgd(0.3), optax_sm3.polyak_averaging(decay, debias=debias))
  grads_seq = [_grads(rng, params) for _ in range(5)]
  trajectory, averages, state = _train(tx, params, grads_seq)
  for t, average in enumerate(averages):
    expected = _reference_tree(trajectory[: t + 1], decay, debias)
    chex.assert_trees_all_close(average, expected, rtol=2e-6, atol=2e-7)
  assert int(state[1].count) == 5


@hypothesis.given(
  decay=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
  debias=st.booleans(),
  steps=st.integers(1, 6),
  seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_hypothesis(decay, debias, steps, seed):
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)}
  lr = float(rng.uniform(0.01, 1.0))
  tx = optax.chain(optax.sgd(lr), optax_sm3.polyak_averaging(decay, debias=debias))
  grads_seq = [
    {"w": jnp.asarray(rng.standard_normal((2, 3)) * 10.0 ** rng.uniform(-3, 1))}
    for _ in range(steps)
  ]
  trajectory, averages, _ = _train(tx, params, grads_seq)
  expected = _reference_tree(trajectory, decay, debias)
  chex.assert_trees_all_close(averages[-1], expected, rtol=1e-5, atol=1e-5)


# (1 - d) / (1 - d) rounds to 1 - ulp for 0.50025 and to 1 + ulp for 0.50125.
@pytest.mark.parametrize("decay", [0.50025, 0.50125, 0.9999])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_start_is_the_params_and_first_step_is_exact(dtype, decay):
  """a_0 = p_0 (in a buffer of its own); debiased, a_1 = p_1 bit for bit."""
  rng = np.random.default_rng(1)
  params = _params(rng, dtype)
  tx = optax.chain(optax.sgd(0.1), optax_sm3.polyak_averaging(decay))
  state = tx.init(params)
  start = optax_sm3.polyak_params(state)
  for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(start), strict=True):
    assert a.dtype == p.dtype
    np.testing.assert_array_equal(a, p)
    assert a.unsafe_buffer_pointer() != p.unsafe_buffer_pointer()
  updates, state = tx.update(_grads(rng, params), state, params)
  new_params = optax.apply_updates(params, updates)
  jax.tree.map(
    np.testing.assert_array_equal, optax_sm3.polyak_params(state), new_params
  )


def test_updates_pass_through_unchanged():
  rng = np.random.default_rng(2)
  params = _params(rng, jnp.bfloat16)
  updates = _grads(rng, params)  # float32 updates for bfloat16 params
  tx = optax_sm3.polyak_averaging(0.5, average_dtype=jnp.bfloat16)
  out, _ = tx.update(updates, tx.init(params), params)
  for o, u in zip(jax.tree.leaves(out), jax.tree.leaves(updates), strict=True):
    assert o.dtype == u.dtype == jnp.float32
    np.testing.assert_array_equal(o, u)


def test_decay_one_is_the_arithmetic_mean():
  params = jnp.zeros(2)
  tx = optax.chain(optax.sgd(1.0), optax_sm3.polyak_averaging(1.0))
  steps = [jnp.array([-1.0, -2.0])] * 4  # params 1, 2, 3, 4 times (1, 2)
  _, averages, _ = _train(tx, params, steps)
  np.testing.assert_allclose(averages[-1], [2.5, 5.0], rtol=1e-6)


def test_average_beats_the_last_iterate_on_a_noisy_parabola():
  """The reason to average: SGD's noise around the optimum is smoothed out."""
  tx = optax.chain(optax.sgd(0.1), optax_sm3.polyak_averaging(0.99))
  noise = jax.random.normal(jax.random.key(0), (300, 200))

  def body(carry, n):
    params, state = carry
    updates, state = tx.update(params + n, state, params)  # grad of |x|^2/2
    return (optax.apply_updates(params, updates), state), None

  params = jnp.ones(200)
  (params, state), _ = jax.lax.scan(body, (params, tx.init(params)), noise)
  last = float(jnp.mean(params**2))
  averaged = float(jnp.mean(optax_sm3.polyak_params(state) ** 2))
  assert averaged < 0.2 * last, (averaged, last)


# ---------------------------------------------------------------------------
# optax's checklist.


@pytest.mark.parametrize("debias", [True, False])
def test_inject_hyperparams_identical_and_changeable(debias):
  rng = np.random.default_rng(3)
  params = _params(rng)
  grads_seq = [_grads(rng, params) for _ in range(4)]
  injected = optax.inject_hyperparams(
    optax_sm3.polyak_averaging, static_args="average_dtype"
  )(decay=0.75, debias=debias, average_dtype=jnp.bfloat16)
  direct = optax_sm3.polyak_averaging(0.75, debias=debias, average_dtype=jnp.bfloat16)
  _, want, _ = _train(direct, params, grads_seq, update=jax.jit(direct.update))
  _, got, state = _train(injected, params, grads_seq, update=jax.jit(injected.update))
  for g, w in zip(got, want, strict=True):
    jax.tree.map(np.testing.assert_array_equal, g, w)
  # The injected decay is read at run time, traced under jit.
  state.hyperparams["decay"] = jnp.asarray(0.5)
  _, state = jax.jit(injected.update)(grads_seq[0], state, params)
  eta = 0.5 / (1 - 0.5**5) if debias else 0.5  # the fifth step
  expected = jax.tree.map(
    lambda a, p, u: (1 - eta) * np.float64(a) + eta * (np.float64(p) + np.float64(u)),
    got[-1],
    params,
    grads_seq[0],
  )
  chex.assert_trees_all_close(
    optax_sm3.polyak_params(state), expected, rtol=1e-2, atol=1e-2
  )


def test_jit_does_not_recompile():
  traces = []
  tx = optax.chain(optax_sm3.sm3(0.1), optax_sm3.polyak_averaging(0.9))

  @jax.jit
  def step(params, state, grads):
    traces.append(None)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  rng = np.random.default_rng(4)
  params = _params(rng)
  state = tx.init(params)
  for _ in range(4):
    params, state = step(params, state, _grads(rng, params))
  assert len(traces) == 1
  assert int(state[1].count) == 4


@pytest.mark.parametrize(
  "param_dtype, average_dtype",
  [
    (jnp.float32, None),
    (jnp.float32, jnp.bfloat16),
    (jnp.bfloat16, None),
    (jnp.float16, jnp.float32),
  ],
)
def test_state_dtypes_stable_under_cond_and_scan(param_dtype, average_dtype):
  rng = np.random.default_rng(5)
  params = _params(rng, param_dtype)
  tx = optax_sm3.polyak_averaging(0.9, average_dtype=average_dtype)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: (0.1 * p).astype(param_dtype), params)

  @jax.jit
  def maybe(pred, state):
    return jax.lax.cond(
      pred, lambda s: tx.update(grads, s, params)[1], lambda s: s, state
    )

  stepped = maybe(True, state)
  kept = maybe(False, state)
  for a, b in zip(jax.tree.leaves(stepped), jax.tree.leaves(state), strict=True):
    assert (a.dtype, a.shape) == (b.dtype, b.shape)
  assert stepped.count.dtype == jnp.int32 and stepped.count.shape == ()
  assert int(stepped.count) == 1 and int(kept.count) == 0
  want = average_dtype or param_dtype
  assert all(a.dtype == want for a in jax.tree.leaves(stepped.average))

  def body(state, _):
    return tx.update(grads, state, params)[1], None

  scanned, _ = jax.lax.scan(body, state, length=3)
  looped = state
  for _ in range(3):
    looped = tx.update(grads, looped, params)[1]
  for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(looped), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(
      np.float64(a), np.float64(b), rtol=1e-2 if want != jnp.float32 else 1e-6
    )


def test_memory_one_param_sized_buffer_half_in_bfloat16():
  rng = np.random.default_rng(6)
  params = _params(rng)
  param_bytes = sum(p.nbytes for p in jax.tree.leaves(params))

  def state_bytes(tx):
    return sum(x.nbytes for x in jax.tree.leaves(tx.init(params)))

  assert state_bytes(optax_sm3.polyak_averaging()) == param_bytes + 4
  bf16 = optax_sm3.polyak_averaging(average_dtype=jnp.bfloat16)
  assert state_bytes(bf16) == param_bytes // 2 + 4


def test_bfloat16_average_tracks_within_its_precision():
  rng = np.random.default_rng(7)
  params = _params(rng)
  grads_seq = [_grads(rng, params) for _ in range(5)]
  tx = optax.chain(
    optax.sgd(0.3), optax_sm3.polyak_averaging(0.5, average_dtype=jnp.bfloat16)
  )
  trajectory, averages, _ = _train(tx, params, grads_seq, update=jax.jit(tx.update))
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(averages[-1]))
  chex.assert_trees_all_close(
    averages[-1], _reference_tree(trajectory, 0.5, True), rtol=2e-2, atol=2e-2
  )


def test_bfloat16_average_stalls_on_steps_below_half_an_ulp():
  """The docstring's caveat: eta |p - a| under half a bf16 ulp is lost."""
  tx = optax_sm3.polyak_averaging(0.999, debias=False, average_dtype=jnp.bfloat16)
  f32 = optax_sm3.polyak_averaging(0.999, debias=False)
  params = jnp.ones(3)
  state, state32 = tx.init(params), f32.init(params)
  moved = jnp.full(3, 1.1)  # eta |p - a| = 1e-4 < 2**-8 (half an ulp at 1)
  update = jax.jit(tx.update)
  for _ in range(50):
    _, state = update(moved - params, state, params)
    _, state32 = f32.update(moved - params, state32, params)
  np.testing.assert_array_equal(state.average, jnp.ones(3, jnp.bfloat16))
  np.testing.assert_allclose(state32.average, 1 + 0.1 * (1 - 0.999**50), rtol=1e-5)


def test_multi_steps_averages_once_per_real_step():
  rng = np.random.default_rng(8)
  params = _params(rng)
  grads_seq = [_grads(rng, params) for _ in range(4)]
  inner = optax.chain(optax.sgd(0.2), optax_sm3.polyak_averaging(0.6))
  tx = optax.MultiSteps(inner, every_k_schedule=2)
  trajectory, averages, state = _train(tx, params, grads_seq)
  (polyak,) = [s for s in state.inner_opt_state if isinstance(s, optax_sm3.PolyakState)]
  assert int(polyak.count) == 2
  real = [trajectory[0], trajectory[2], trajectory[4]]
  chex.assert_trees_all_close(averages[-1], _reference_tree(real, 0.6, True), rtol=2e-6)


def test_apply_if_finite_skipped_step_leaves_the_average():
  rng = np.random.default_rng(9)
  params = _params(rng)
  tx = optax.apply_if_finite(
    optax.chain(optax.sgd(0.2), optax_sm3.polyak_averaging(0.6)), 3
  )
  state = tx.init(params)
  _, state = tx.update(_grads(rng, params), state, params)
  before = optax_sm3.polyak_params(state)
  bad = jax.tree.map(lambda g: g.at[...].set(jnp.nan), _grads(rng, params))
  _, state = tx.update(bad, state, params)
  jax.tree.map(np.testing.assert_array_equal, optax_sm3.polyak_params(state), before)


# ---------------------------------------------------------------------------
# With SM3, NNX and polyak_params.


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_chained_after_sm3_keeps_sm3_and_averages_its_trajectory(momentum):
  rng = np.random.default_rng(10)
  params = _params(rng)
  grads_seq = [_grads(rng, params) for _ in range(4)]
  sm3 = optax_sm3.sm3(0.1, momentum=momentum)
  tx = optax.chain(sm3, optax_sm3.polyak_averaging(0.8))
  trajectory, averages, _ = _train(tx, params, grads_seq, update=jax.jit(tx.update))
  alone, _, _ = _train(
    sm3, params, grads_seq, update=jax.jit(sm3.update), averaged=False
  )
  for p, q in zip(trajectory, alone, strict=True):
    jax.tree.map(np.testing.assert_array_equal, p, q)
  chex.assert_trees_all_close(
    averages[-1], _reference_tree(trajectory, 0.8, True), rtol=2e-6, atol=1e-7
  )


def test_nnx_optimizer_evaluates_with_the_average():
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  tx = optax.chain(optax_sm3.sm3(0.1), optax_sm3.polyak_averaging(0.9))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (8, 3))
  y = jax.random.normal(jax.random.key(2), (8, 2))

  @nnx.jit
  def train_step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)

  trajectory = [nnx.to_pure_dict(nnx.state(model, nnx.Param))]
  for _ in range(4):
    train_step(model, optimizer)
    trajectory.append(nnx.to_pure_dict(nnx.state(model, nnx.Param)))

  eval_model = nnx.clone(model)
  nnx.update(eval_model, optax_sm3.polyak_params(optimizer.opt_state))
  expected = _reference_tree(trajectory, 0.9, True)
  assert isinstance(eval_model.kernel, nnx.Param)
  chex.assert_trees_all_close(
    nnx.to_pure_dict(nnx.state(eval_model, nnx.Param)), expected, rtol=2e-6
  )
  # The trained model is untouched, and the two differ.
  chex.assert_trees_all_close(
    nnx.to_pure_dict(nnx.state(model, nnx.Param)),
    jax.tree.map(np.asarray, trajectory[-1]),
    rtol=0,
  )
  assert not np.allclose(eval_model(x), model(x))


def test_polyak_params_finds_the_state_anywhere():
  params = {"w": jnp.arange(3.0)}
  polyak = optax_sm3.polyak_averaging(0.9)
  for tx in [
    polyak,
    optax.chain(optax_sm3.sm3(0.1), polyak),
    optax.inject_hyperparams(
      lambda learning_rate: optax.chain(optax_sm3.sm3(learning_rate), polyak)
    )(learning_rate=0.1),
    optax.MultiSteps(optax.chain(optax.sgd(0.1), polyak), 2),
  ]:
    state = tx.init(params)
    got = jax.jit(optax_sm3.polyak_params)(state)
    np.testing.assert_array_equal(got["w"], params["w"])


def test_polyak_params_errors():
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="no PolyakState"):
    optax_sm3.polyak_params(optax_sm3.sm3(0.1).init(params))
  twice = optax.chain(optax_sm3.polyak_averaging(0.9), optax_sm3.polyak_averaging(0.5))
  with pytest.raises(ValueError, match="2 PolyakStates"):
    optax_sm3.polyak_params(twice.init(params))


# ---------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("decay", [-0.1, 1.01, float("nan"), float("inf")])
def test_decay_out_of_range(decay):
  with pytest.raises(ValueError, match="`decay`"):
    optax_sm3.polyak_averaging(decay)


def test_bad_arguments_name_themselves():
  with pytest.raises(TypeError, match="`decay`"):
    optax_sm3.polyak_averaging("0.9")
  with pytest.raises(TypeError, match="`average_dtype`"):
    optax_sm3.polyak_averaging(0.9, average_dtype=jnp.int32)
  injected = optax.inject_hyperparams(optax_sm3.polyak_averaging)
  with pytest.raises(TypeError, match="static_args"):
    injected(average_dtype=jnp.bfloat16).init({"w": jnp.ones(2)})
  with pytest.raises(TypeError, match="`debias`"):
    optax_sm3.polyak_averaging(0.9, debias=1)
  tx = optax_sm3.polyak_averaging(0.9)
  with pytest.raises(TypeError, match="real floating"):
    tx.init({"step": jnp.zeros(2, jnp.int32)})
  with pytest.raises(ValueError, match="params"):
    tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))
