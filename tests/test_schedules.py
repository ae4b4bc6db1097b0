"""The authors' warm-up schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_sm3


def test_quadratic_warmup_constant_and_linear_decay():
  schedule = optax_sm3.warmup_schedule(
    2.0, 200, warmup_fraction=0.05, decay_fraction=0.1
  )
  steps = np.arange(0, 201)
  values = np.asarray(jax.vmap(schedule)(jnp.asarray(steps)))
  warm = steps < 10
  np.testing.assert_allclose(values[warm], 2.0 * (steps[warm] / 10) ** 2, rtol=1e-6)
  np.testing.assert_allclose(values[10:180], 2.0)
  decay = steps >= 180
  np.testing.assert_allclose(values[decay], 2.0 * (200 - steps[decay]) / 20, rtol=1e-6)
  assert values[-1] == 0.0
  assert np.all(np.diff(values[:10]) > 0)  # not the README's inverted ratio


def test_no_warmup_no_decay_is_constant():
  schedule = optax_sm3.warmup_schedule(0.3, 50, warmup_fraction=0.0)
  np.testing.assert_allclose([schedule(t) for t in (0, 10, 49, 60)], 0.3)


def test_schedule_drives_sm3():
  schedule = optax_sm3.warmup_schedule(1.0, 100)
  tx = optax_sm3.sm3(schedule, momentum=0.0)
  params = jnp.ones(3)
  state = tx.init(params)
  u, state = tx.update(jnp.ones(3), state, params)
  np.testing.assert_array_equal(u, np.zeros(3))  # step 0 of a warm-up: rate 0
  u, state = tx.update(jnp.ones(3), state, params)
  np.testing.assert_allclose(u, -((1 / 5) ** 2) / np.sqrt(2.0), rtol=1e-5)


@pytest.mark.parametrize(
  ("kwargs", "error", "name"),
  [
    ({"peak_value": -1.0}, ValueError, "peak_value"),
    ({"total_steps": 0}, ValueError, "total_steps"),
    ({"total_steps": 10.5}, TypeError, "total_steps"),
    ({"warmup_fraction": 1.5}, ValueError, "warmup_fraction"),
    ({"decay_fraction": -0.1}, ValueError, "decay_fraction"),
    ({"warmup_fraction": 0.6, "decay_fraction": 0.6}, ValueError, "decay_fraction"),
  ],
)
def test_invalid(kwargs, error, name):
  kwargs = {"peak_value": 1.0, "total_steps": 100, **kwargs}
  with pytest.raises(error, match=name):
    optax_sm3.warmup_schedule(**kwargs)


def test_traced_arguments_give_the_concrete_schedule():
  steps = jnp.arange(0, 101)

  @jax.jit
  def traced(peak, total, warmup, decay):
    schedule = optax_sm3.warmup_schedule(
      peak, total, warmup_fraction=warmup, decay_fraction=decay
    )
    return jax.vmap(schedule)(steps)

  for warmup, decay in ((0.05, 0.1), (0.0, 0.0), (0.25, 0.0), (0.0, 0.5)):
    concrete = optax_sm3.warmup_schedule(
      2.0, 100, warmup_fraction=warmup, decay_fraction=decay
    )
    expected = jax.vmap(concrete)(steps)
    got = traced(2.0, jnp.asarray(100), warmup, decay)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert np.all(np.isfinite(got))


def test_traced_values_are_not_range_checked():
  # Out of range, but unknown at construction: no error (and no Python branch).
  schedule = jax.jit(
    lambda f: optax_sm3.warmup_schedule(1.0, 100, warmup_fraction=f)(3)
  )
  assert np.isfinite(float(schedule(1.5)))


def test_total_steps_must_be_an_integer_even_traced():
  with pytest.raises(TypeError, match="total_steps"):
    jax.jit(lambda t: optax_sm3.warmup_schedule(1.0, t)(0))(10.0)
  with pytest.raises(ValueError, match="total_steps"):
    optax_sm3.warmup_schedule(1.0, jnp.asarray(0))


def test_warmup_schedule_accepts_numpy_integers():
  schedule = optax_sm3.warmup_schedule(1.0, np.int64(100))
  assert float(schedule(100)) == 1.0
