"""scale_by_sm3 against the NumPy reference, plus its contracts."""

import math
from unittest import mock

import _reference
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sm3
from optax_sm3 import _accumulate, _cover


@pytest.fixture(autouse=True, scope="module")
def _loop_small_parameters():
  # The shapes here are tiny; let the blocked CPU loop run on them anyway, so
  # that every test with a block_size checks the loop (test_accumulate.py
  # tests which parameters the library loops by default).
  with mock.patch.object(_accumulate, "MIN_LOOP_SIZE", 0):
    yield


# ---------------------------------------------------------------------------
# Gradient sequences: random, with exact zeros, zero rows, all-zero steps.


@st.composite
def shapes(draw, max_rank=4):
  rank = draw(st.integers(0, max_rank))
  return tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))


@st.composite
def gradient_sequences(draw, shape):
  steps = draw(st.integers(1, 4))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  grads = []
  for _ in range(steps):
    pattern = draw(st.sampled_from(["dense", "sparse", "zero_rows", "zero"]))
    g = rng.standard_normal(shape).astype(np.float32)
    g *= draw(st.sampled_from([1e-3, 1.0, 30.0]))
    if pattern == "sparse":
      g *= rng.random(shape) < 0.5
    elif pattern == "zero_rows" and len(shape) >= 1:
      g[rng.random(shape[0]) < 0.5] = 0.0
    elif pattern == "zero":
      g = np.zeros(shape, np.float32)
    grads.append(g)
  return grads


def _run(tx, grads):
  state = tx.init(jnp.zeros(grads[0].shape))
  outs = []
  update = jax.jit(tx.update)
  for g in grads:
    u, state = update(jnp.asarray(g), state)
    outs.append(np.asarray(u))
  return outs, state


def _flat_accumulators(state):
  leaves = jax.tree.leaves(state.accumulators)
  return np.concatenate([np.ravel(a) for a in leaves])


def _check_against_reference(tx, ref, grads):
  outs, state = _run(tx, grads)
  for g, out in zip(grads, outs, strict=True):
    expected = ref.precondition(g)
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(
    _flat_accumulators(state), ref.accumulator_values(), rtol=2e-5, atol=1e-30
  )


@hypothesis.given(data=st.data())
@pytest.mark.parametrize("variant", ["II", "I"])
@pytest.mark.parametrize("beta", [0.0, 0.9])
@pytest.mark.parametrize("block_size", [0, 3])
def test_matches_reference(data, variant, beta, block_size):
  shape = data.draw(shapes())
  grads = data.draw(gradient_sequences(shape))
  tx = optax_sm3.scale_by_sm3(
    beta=beta, eps=1e-8, variant=variant, block_size=block_size
  )
  ref = _reference.ReferenceSM3(shape, beta=beta, eps=1e-8, variant=variant)
  _check_against_reference(tx, ref, grads)


def _rising(count):
  """Adafactor's rising decay, ``1 - t**-0.8`` at the ``t``-th step."""
  return 1.0 - (count + 1.0) ** -0.8


@hypothesis.given(data=st.data())
@pytest.mark.parametrize("variant", ["II", "I"])
@pytest.mark.parametrize(
  "beta, bias_correction",
  [
    (0.99, True),
    (0.0, True),
    (_rising, False),
    pytest.param(0.9, True, marks=pytest.mark.slow),
    pytest.param(0.999, True, marks=pytest.mark.slow),
  ],
)
def test_beta_levers_match_reference(data, variant, beta, bias_correction):
  shape = data.draw(shapes())
  grads = data.draw(gradient_sequences(shape))
  tx = optax_sm3.scale_by_sm3(
    beta=beta, bias_correction=bias_correction, variant=variant, block_size=0
  )
  ref = _reference.ReferenceSM3(
    shape, beta=beta, bias_correction=bias_correction, variant=variant
  )
  _check_against_reference(tx, ref, grads)


def test_bias_correction_first_step_is_rmsprop_exact():
  # After one step the corrected estimate is g**2 itself: |update| = 1.
  g = jnp.asarray([[0.5, -2.0], [3.0, 1e-3]])
  tx = optax_sm3.scale_by_sm3(beta=0.99, bias_correction=True, eps=0.0)
  u, _ = tx.update(g, tx.init(g))
  np.testing.assert_allclose(np.abs(u), np.ones_like(g), rtol=1e-6)
  plain = optax_sm3.scale_by_sm3(beta=0.99, eps=0.0)
  u, _ = plain.update(g, plain.init(g))
  np.testing.assert_allclose(np.abs(u), 10.0 * np.ones_like(g), rtol=1e-5)


def test_beta_schedule_under_jit_and_inject_hyperparams():
  params = {"w": jnp.ones((3, 4)), "b": jnp.ones((4,))}
  grads = jax.tree.map(lambda p: 0.3 * p, params)
  tx = optax_sm3.scale_by_sm3(beta=_rising)
  state = tx.init(params)
  for _ in range(3):
    updates, state = jax.jit(tx.update)(grads, state)
  injected = optax.inject_hyperparams(optax_sm3.scale_by_sm3)(beta=_rising)
  istate = injected.init(params)
  for _ in range(3):
    iupdates, istate = jax.jit(injected.update)(grads, istate)
  jax.tree.map(np.testing.assert_allclose, iupdates, updates)


def test_beta_lever_errors():
  with pytest.raises(ValueError, match="`bias_correction` needs a constant `beta`"):
    optax_sm3.scale_by_sm3(beta=_rising, bias_correction=True)
  with pytest.raises(TypeError, match="`bias_correction` must be a bool"):
    optax_sm3.scale_by_sm3(beta=0.9, bias_correction=1)


@hypothesis.given(data=st.data())
@pytest.mark.parametrize("block_size", [0, 5])
def test_covers_match_reference(data, block_size):
  shape = data.draw(shapes())
  stacked = data.draw(st.integers(0, len(shape)))
  merge = data.draw(st.sampled_from([None, 4, 9]))
  skip = data.draw(st.booleans())
  beta = data.draw(st.sampled_from([0.0, 0.5]))
  grads = data.draw(gradient_sequences(shape))
  tx = optax_sm3.scale_by_sm3(
    beta=beta,
    stacked_axes=stacked,
    merge_axes_up_to=merge,
    skip_unit_axes=skip,
    block_size=block_size,
  )
  cover = _cover.make_cover(
    shape, stacked_axes=stacked, merge_axes_up_to=merge, skip_unit_axes=skip
  )
  ref = _reference.ReferenceSM3(shape, groups=cover.groups, stacked=stacked, beta=beta)
  _check_against_reference(tx, ref, grads)


def test_skipping_unit_axes_does_not_change_updates():
  rng = np.random.default_rng(0)
  shape = (3, 1, 4)
  full = optax_sm3.scale_by_sm3()
  lean = optax_sm3.scale_by_sm3(skip_unit_axes=True)
  s_full, s_lean = full.init(jnp.zeros(shape)), lean.init(jnp.zeros(shape))
  assert [a.shape for a in s_lean.accumulators] == [(3,), (4,)]
  for _ in range(3):
    g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    u_full, s_full = full.update(g, s_full)
    u_lean, s_lean = lean.update(g, s_lean)
    np.testing.assert_array_equal(u_full, u_lean)


def test_blocked_and_direct_are_bit_identical():
  rng = np.random.default_rng(1)
  shape = (37, 5, 6)  # 37 rows do not divide into blocks evenly
  txs = [optax_sm3.scale_by_sm3(beta=0.3, block_size=b) for b in (0, 64, 1000)]
  states = [tx.init(jnp.zeros(shape)) for tx in txs]
  for _ in range(3):
    g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    results = [jax.jit(tx.update)(g, s) for tx, s in zip(txs, states, strict=True)]
    states = [s for _, s in results]
    for u, s in results[1:]:
      np.testing.assert_array_equal(u, results[0][0])
      for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(results[0][1]), strict=True):
        np.testing.assert_array_equal(a, b)


@hypothesis.given(data=st.data())
@pytest.mark.parametrize("variant", ["II", "I"])
def test_blocked_is_bit_identical_to_direct_for_any_tiling(data, variant):
  # Small block sizes force every tiling: rows of axis 0, single slices of
  # the leading axes with blocks cut along a later axis, blocks of one entry.
  shape = data.draw(shapes())
  stacked = data.draw(st.integers(0, len(shape)))
  merge = data.draw(st.sampled_from([None, 4]))
  skip = data.draw(st.booleans())
  beta = data.draw(st.sampled_from([0.0, 0.7]))
  dtype = data.draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
  block_size = data.draw(st.integers(1, max(1, math.prod(shape))))
  grads = data.draw(gradient_sequences(shape))
  options = dict(stacked_axes=stacked, merge_axes_up_to=merge, skip_unit_axes=skip)
  direct = optax_sm3.scale_by_sm3(beta=beta, variant=variant, block_size=0, **options)
  blocked = optax_sm3.scale_by_sm3(
    beta=beta, variant=variant, block_size=block_size, **options
  )
  s_direct = direct.init(jnp.zeros(shape, dtype))
  s_blocked = blocked.init(jnp.zeros(shape, dtype))
  for g in grads:
    g = jnp.asarray(g, dtype)
    u_direct, s_direct = jax.jit(direct.update)(g, s_direct)
    u_blocked, s_blocked = jax.jit(blocked.update)(g, s_blocked)
    np.testing.assert_array_equal(u_blocked, u_direct)
    for a, b in zip(jax.tree.leaves(s_blocked), jax.tree.leaves(s_direct), strict=True):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(
  "shape",
  [
    (65536, 256),  # blocks of rows
    (6, 1024, 2048),  # one axis-0 slice is two blocks: blocks cut along axis 1
    (3, 3, 1024, 1024),  # a conv kernel: blocks cut along axis 2
  ],
)
def test_blocked_path_temporary_is_one_block(shape, dtype):
  # Lowered from shapes only, never allocated.
  tx = optax_sm3.scale_by_sm3()
  params = jax.ShapeDtypeStruct(shape, dtype)
  state = jax.eval_shape(tx.init, params)
  compiled = jax.jit(tx.update).lower(params, state).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  block_bytes = 4 * _accumulate.default_block_size(dtype)
  accumulator_bytes = sum(a.size * 4 for a in jax.tree.leaves(state.accumulators))
  assert temp <= block_bytes + 2 * accumulator_bytes + 2**16, (temp, block_bytes)
  assert temp < math.prod(shape) * jnp.dtype(dtype).itemsize / 4


# ---------------------------------------------------------------------------
# State layout, dtypes, memory.


@pytest.mark.parametrize(
  ("shape", "expected"),
  [
    ((), [()]),
    ((5,), [(5,)]),
    ((3, 4), [(3,), (4,)]),
    ((2, 3, 4, 5), [(2,), (3,), (4,), (5,)]),
    ((1, 1), [(1,), (1,)]),
  ],
)
def test_accumulator_shapes(shape, expected):
  state = optax_sm3.scale_by_sm3().init(jnp.zeros(shape))
  assert [a.shape for a in state.accumulators] == expected
  assert state.count.shape == () and state.count.dtype == jnp.int32


@pytest.mark.parametrize(
  ("options", "shape", "expected"),
  [
    ({"stacked_axes": 1}, (6, 3, 4), [(6, 3), (6, 4)]),
    ({"stacked_axes": 1}, (6, 4), [(6, 4)]),
    ({"merge_axes_up_to": 9}, (3, 3, 16, 8), [(3, 3), (16,), (8,)]),
    ({"skip_unit_axes": True}, (1, 7, 1), [(7,)]),
    ({"skip_unit_axes": True}, (1, 1), [(1, 1)]),
  ],
)
def test_cover_options_shapes(options, shape, expected):
  state = optax_sm3.scale_by_sm3(**options).init(jnp.zeros(shape))
  assert [a.shape for a in state.accumulators] == expected


def test_stacked_axes_per_parameter_tree_and_callable():
  params = {"stack": jnp.zeros((4, 3, 2)), "dense": jnp.zeros((3, 2))}
  tree = {"stack": 1, "dense": 0}
  for option in (tree, lambda p: tree):
    state = optax_sm3.scale_by_sm3(stacked_axes=option).init(params)
    assert [a.shape for a in state.accumulators["stack"]] == [(4, 3), (4, 2)]
    assert [a.shape for a in state.accumulators["dense"]] == [(3,), (2,)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes(dtype):
  params = {"w": jnp.zeros((3, 4), dtype), "b": jnp.zeros((4,), dtype)}
  tx = optax_sm3.scale_by_sm3()
  state = tx.init(params)
  for a in jax.tree.leaves(state.accumulators):
    assert a.dtype == jnp.float32
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 3, params)
  updates, new_state = tx.update(grads, state)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
    assert u.dtype == p.dtype
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == jax.tree.map(
    lambda x: (x.shape, x.dtype), new_state
  )


def test_bf16_accumulators_keep_growing():
  # bf16 sums stall at 256 (an increment of 1 is below half an ulp); ours are
  # float32 whatever the parameter dtype.
  tx = optax_sm3.scale_by_sm3()
  state = tx.init(jnp.zeros((2, 2), jnp.bfloat16))
  g = jnp.ones((2, 2), jnp.bfloat16)
  update = jax.jit(tx.update)
  for _ in range(400):
    _, state = update(g, state)
  np.testing.assert_array_equal(state.accumulators[0], [400.0, 400.0])


def test_accumulator_dtype_option():
  state = optax_sm3.scale_by_sm3(accumulator_dtype=jnp.bfloat16).init(jnp.zeros((2, 3)))
  assert all(a.dtype == jnp.bfloat16 for a in state.accumulators)


def test_memory_is_sum_of_dims():
  params = {
    "emb": jnp.zeros((1000, 64)),
    "conv": jnp.zeros((3, 3, 8, 16)),
    "b": jnp.zeros((16,)),
    "s": jnp.zeros(()),
  }
  state = optax_sm3.scale_by_sm3().init(params)
  total = sum(a.size for a in jax.tree.leaves(state.accumulators))
  assert total == (1000 + 64) + (3 + 3 + 8 + 16) + 16 + 1


def test_scalar_parameters_train():
  tx = optax.chain(optax_sm3.scale_by_sm3(), optax.scale(-0.5))
  params = jnp.asarray(3.0)
  state = tx.init(params)
  for _ in range(50):
    g = jax.grad(lambda p: (p - 1.0) ** 2)(params)
    u, state = tx.update(g, state)
    params = optax.apply_updates(params, u)
  assert abs(float(params) - 1.0) < 0.05


def test_zero_gradient_gives_zero_update_even_with_zero_eps():
  tx = optax_sm3.scale_by_sm3(eps=0.0)
  state = tx.init(jnp.zeros((2, 3)))
  u, state = tx.update(jnp.zeros((2, 3)), state)
  np.testing.assert_array_equal(u, np.zeros((2, 3)))
  g = jnp.asarray([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
  u, _ = tx.update(g, state)
  assert np.all(np.isfinite(u))
  np.testing.assert_allclose(u, g)


def test_masked_and_none_leaves():
  params = {"a": jnp.ones((2, 3)), "b": jnp.ones((4,))}
  tx = optax.masked(optax_sm3.scale_by_sm3(), {"a": True, "b": False})
  state = tx.init(params)
  grads = jax.tree.map(lambda p: 3.0 * p, params)
  updates, _ = tx.update(grads, state)
  np.testing.assert_array_equal(updates["b"], grads["b"])  # passed through
  np.testing.assert_allclose(updates["a"], np.ones((2, 3)), rtol=1e-6)


# ---------------------------------------------------------------------------
# Traced hyperparameters.


def test_inject_hyperparams_traced_beta_and_eps():
  tx = optax.inject_hyperparams(optax_sm3.scale_by_sm3)(beta=0.5, eps=1e-6)
  params = {"w": jnp.ones((3, 4))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  u, state = update(params, state)
  direct = optax_sm3.scale_by_sm3(beta=0.5, eps=1e-6)
  u_direct, _ = direct.update(params, direct.init(params))
  np.testing.assert_allclose(u["w"], u_direct["w"], rtol=1e-6)
  # beta is a run-time value: switching it to 0 (a sum) takes effect.
  state.hyperparams["beta"] = jnp.asarray(0.0)
  u0, _ = update(params, state)
  assert not np.allclose(u0["w"], u["w"])


def test_beta_and_eps_under_jit_as_arguments():
  params = jnp.ones((3, 4))

  @jax.jit
  def run(beta, eps):
    tx = optax_sm3.scale_by_sm3(beta=beta, eps=eps)
    return tx.update(params, tx.init(params))[0]

  expected = optax_sm3.scale_by_sm3(beta=0.25, eps=1e-3).update(
    params, optax_sm3.scale_by_sm3().init(params)
  )[0]
  np.testing.assert_allclose(run(0.25, 1e-3), expected, rtol=1e-6)


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
# Invalid input.


@pytest.mark.parametrize(
  ("kwargs", "name"),
  [
    ({"beta": -0.1}, "beta"),
    ({"beta": 1.0}, "beta"),
    ({"beta": float("nan")}, "beta"),
    ({"eps": -1e-8}, "eps"),
    ({"variant": "III"}, "variant"),
    ({"merge_axes_up_to": 0}, "merge_axes_up_to"),
    ({"block_size": -1}, "block_size"),
  ],
)
def test_invalid_hyperparameters(kwargs, name):
  with pytest.raises(ValueError, match=name):
    optax_sm3.scale_by_sm3(**kwargs)


@pytest.mark.parametrize(
  ("kwargs", "name"),
  [
    ({"beta": "0.5"}, "beta"),
    ({"eps": [1e-8]}, "eps"),
    ({"merge_axes_up_to": 2.5}, "merge_axes_up_to"),
  ],
)
def test_wrong_types(kwargs, name):
  with pytest.raises(TypeError, match=name):
    optax_sm3.scale_by_sm3(**kwargs)


def test_complex_parameters_rejected_at_init():
  with pytest.raises(ValueError, match="complex"):
    optax_sm3.scale_by_sm3().init({"z": jnp.zeros((2, 2), jnp.complex64)})


def test_stacked_axes_out_of_range():
  with pytest.raises(ValueError, match="stacked_axes"):
    optax_sm3.scale_by_sm3(stacked_axes=3).init(jnp.zeros((2, 2)))


def test_stacked_axes_tree_mismatch():
  with pytest.raises(ValueError, match="stacked_axes"):
    optax_sm3.scale_by_sm3(stacked_axes={"x": 1}).init({"a": jnp.zeros((2, 2))})


def test_boolean_gradients_rejected():
  tx = optax_sm3.scale_by_sm3()
  with pytest.raises(TypeError, match="boolean"):
    tx.update(jnp.ones(3, bool), tx.init(jnp.zeros(3)))


def test_wrong_gradient_shape_names_the_parameter():
  tx = optax_sm3.sm3(0.1)
  params = {"layer": {"w": jnp.zeros((3, 1))}}
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"\['layer'\]\['w'\].*\(4,\).*\(3,\)"):
    tx.update({"layer": {"w": jnp.zeros(4)}}, state, params)
