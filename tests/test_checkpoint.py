"""The full sm3 state round-trips exactly through checkpoints; resuming is exact."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sm3

serialization = pytest.importorskip("flax.serialization")
ocp = pytest.importorskip("orbax.checkpoint")

_PARAMS = {
  "emb": jax.random.normal(jax.random.key(0), (30, 6)),
  "w": jax.random.normal(jax.random.key(1), (6, 3), jnp.bfloat16),
  "b": jnp.zeros(3),
  "s": jnp.ones(()),
}
_TX = optax_sm3.sm3(
  optax_sm3.warmup_schedule(0.1, 20), weight_decay=1e-3, mu_dtype=jnp.bfloat16
)


def _grads(step):
  key = jax.random.key(100 + step)
  return {
    name: jax.random.normal(jax.random.fold_in(key, i), p.shape, p.dtype)
    for i, (name, p) in enumerate(sorted(_PARAMS.items()))
  }


@jax.jit
def _step(params, opt_state, grads):
  updates, opt_state = _TX.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def _train(params, opt_state, steps):
  for i in steps:
    params, opt_state = _step(params, opt_state, _grads(i))
  return params, opt_state


def _assert_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _midway():
  return _train(_PARAMS, _TX.init(_PARAMS), range(5))


def _orbax_round_trip(tree, path):
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, tree)
  checkpointer.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  return checkpointer.restore(path, abstract)


def _flax_round_trip(tree):
  data = serialization.to_bytes(tree)
  template = jax.tree.map(jnp.zeros_like, tree)
  return serialization.from_bytes(template, data)


@pytest.mark.parametrize("how", ["orbax", "flax"])
def test_round_trip_is_exact_and_resumes_bit_identically(how, tmp_path):
  params, opt_state = _midway()
  assert int(opt_state[0].count) == 5
  tree = {"params": params, "opt_state": opt_state}
  if how == "orbax":
    restored = _orbax_round_trip(tree, tmp_path / "ckpt")
  else:
    restored = _flax_round_trip(tree)
  _assert_identical(restored, tree)
  assert isinstance(restored["opt_state"][0], optax_sm3.ScaleBySM3State)

  uninterrupted = _train(params, opt_state, range(5, 10))
  resumed = _train(restored["params"], restored["opt_state"], range(5, 10))
  _assert_identical(resumed, uninterrupted)


def test_adapter_state_dict_through_flax_bytes():
  opt = optax_sm3.SM3(lr=0.1).register_trainable_weights(dict(_PARAMS))
  for i in range(3):
    opt.step(_grads(i))
  saved_params = opt.param_states
  data = serialization.to_bytes(opt.state_dict())

  resumed = optax_sm3.SM3(lr=0.1).register_trainable_weights(saved_params)
  resumed.load_state_dict(serialization.from_bytes(resumed.state_dict(), data))
  assert int(resumed.step_count.value) == 3
  for i in range(3, 5):
    expected = opt.step(_grads(i))
    got = resumed.step(_grads(i))
  _assert_identical(got, expected)
