"""The catch-up ring of _lazy_rows against the step-by-step recurrence."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from optax_sm3 import _lazy_rows


def _reference(p, m, mu, etas, lam):
  """Zero-gradient steps in float64: m <- mu m; p <- p - eta (m + lam p)."""
  p, m = np.float64(p), np.float64(m)
  for eta in etas:
    m = mu * m
    p = p - eta * (m + lam * p)
  return p, m


@jax.jit
def _run_ring(etas, mu, lam, slots_ring):
  """The ring after len(etas) steps, starting from count 0."""

  def body(ring, step):
    count, eta = step
    return _lazy_rows.advance(ring, count + 1, mu, eta, lam), None

  steps = (jnp.arange(etas.shape[0], dtype=jnp.int32), etas)
  ring, _ = jax.lax.scan(body, slots_ring, steps)
  return ring


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(
  period=st.sampled_from([1, 2, 3, 7]),
  steps=st.integers(0, 12),
  mu=st.sampled_from([0.0, 0.5, 0.9, 0.999]),
  lam=st.sampled_from([0.0, 1e-4, 0.1, 0.5]),
  seed=st.integers(0, 2**31 - 1),
)
def test_every_slot_maps_its_step_to_now(period, steps, mu, lam, seed):
  rng = np.random.default_rng(seed)
  etas = rng.uniform(0.0, 1.0, steps).astype(np.float32)
  ring = _run_ring(
    jnp.asarray(etas),
    jnp.float32(mu),
    jnp.float32(lam),
    _lazy_rows.identity(period + 1, jnp.float32),
  )
  p0 = rng.standard_normal(3).astype(np.float32)
  m0 = rng.standard_normal(3).astype(np.float32)
  # Every step s the ring still holds: max(0, steps - period) .. steps.
  for s in range(max(0, steps - period), steps + 1):
    last = jnp.full([3], s, jnp.int32)
    p, m = _lazy_rows.catch_up(ring, last, jnp.asarray(p0), jnp.asarray(m0))
    p_ref, m_ref = _reference(p0, m0, np.float64(mu), etas[s:].astype(np.float64), lam)
    np.testing.assert_allclose(m, m_ref, rtol=2e-6, atol=1e-30)
    np.testing.assert_allclose(p, p_ref, rtol=1e-5, atol=2e-6)
    # Without momentum the buffer is not needed: the same map with m = 0.
    p_only, none = _lazy_rows.catch_up(ring, last, jnp.asarray(p0), None)
    assert none is None
    p_ref = _reference(p0, 0.0 * m0, mu, etas[s:].astype(np.float64), lam)[0]
    np.testing.assert_allclose(p_only, p_ref, rtol=1e-5, atol=2e-6)


def test_slot_of_the_current_step_is_the_identity():
  ring = _run_ring(
    jnp.full([5], 0.3, jnp.float32),
    jnp.float32(0.9),
    jnp.float32(0.1),
    _lazy_rows.identity(3, jnp.float32),
  )
  p = jnp.array([[1.5, -2.0]])
  m = jnp.array([[0.25, 4.0]])
  same_p, same_m = _lazy_rows.catch_up(ring, jnp.array([5]), p, m)
  np.testing.assert_array_equal(same_p, p)
  np.testing.assert_array_equal(same_m, m)


def test_long_gap_keeps_digits_of_slowly_decaying_rows():
  # 3000 steps of a tiny decay: D = prod(1 - eta lam) is close to 1, so
  # p + G p must keep p's digits where D * p would lose ~3000 roundings.
  steps, lam = 3000, 1e-4
  etas = np.full(steps, 0.01, np.float32)
  ring = _run_ring(  # (the shapes of the next test: one compilation)
    jnp.asarray(etas),
    jnp.float32(0.0),
    jnp.float32(lam),
    _lazy_rows.identity(steps + 1, jnp.float32),
  )
  p0 = np.linspace(-3.0, 3.0, 7).astype(np.float32)
  p, _ = _lazy_rows.catch_up(ring, jnp.zeros([7], jnp.int32), jnp.asarray(p0), None)
  expected = p0.astype(np.float64) * (1.0 - 0.01 * lam) ** steps
  np.testing.assert_allclose(p, expected, rtol=3e-7)


def test_momentum_weight_underflows_to_zero_not_nan():
  # mu**3000 underflows float32: the ring must hold 0, not NaN or inf.
  ring = _run_ring(
    jnp.full([3000], 0.1, jnp.float32),
    jnp.float32(0.9),
    jnp.float32(0.01),
    _lazy_rows.identity(3001, jnp.float32),
  )
  assert np.all(np.isfinite(np.asarray(ring.momentum_weight)))
  assert float(ring.momentum_scale[0]) == 0.0
  p, m = _lazy_rows.catch_up(
    ring, jnp.zeros([1], jnp.int32), jnp.ones([1, 2]), jnp.ones([1, 2])
  )
  p_ref, _ = _reference(1.0, 1.0, 0.9, np.full(3000, np.float32(0.1)), 0.01)
  # p_n = D p_0 - E m_0 cancels (D ~ 0.05, p_n ~ 0.0045): the error is
  # bounded relative to the inputs' size (1 here), not to p_n's.
  np.testing.assert_allclose(p, np.full([1, 2], p_ref), rtol=0, atol=5e-7)
  np.testing.assert_array_equal(m, np.zeros([1, 2]))
