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
