"""The catch-up ring of _lazy_rows against the step-by-step recurrence."""

import _tiers
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_sm3 import _lazy_rows


def _reference(p, m, a, mu, etas, lam, c_olds, nesterov=False):
  """Zero-gradient steps in float64: a <- c a; m <- mu m; p <- p - eta (nu m + lam p)."""
  p, m, a = np.float64(p), np.float64(m), np.float64(a)
  nu = mu if nesterov else 1.0
  for eta, c in zip(etas, c_olds, strict=True):
    a = c * a
    m = mu * m
    p = p - eta * (nu * m + lam * p)
  return p, m, a


@jax.jit
def _run_ring(ring, etas, c_olds, mu, lam, look_ahead):
  """The ring after len(etas) steps, starting from count 0."""

  def body(ring, step):
    count, eta, c_old = step
    maps = _lazy_rows.one_step(mu, eta, lam, c_old, look_ahead)
    return _lazy_rows.advance(ring, count + 1, maps), None

  steps = (jnp.arange(etas.shape[0], dtype=jnp.int32), etas, c_olds)
  ring, _ = jax.lax.scan(body, ring, steps)
  return ring


def _ring_after(window, etas, c_olds, mu, lam, nesterov=False):
  return _run_ring(
    _lazy_rows.identity(window, jnp.float32),
    jnp.asarray(etas, jnp.float32),
    jnp.asarray(c_olds, jnp.float32),
    jnp.float32(mu),
    jnp.float32(lam),
    jnp.float32(mu) if nesterov else jnp.float32(1.0),
  )


def _apply(ring, last, p, m, a):
  maps = _lazy_rows.maps_at(ring, jnp.asarray(last, jnp.int32))
  new_p, new_m = _lazy_rows.catch_up(maps, jnp.asarray(p), jnp.asarray(m))
  return new_p, new_m, _lazy_rows.scale_rows(maps, jnp.asarray(a))


@pytest.mark.parametrize("window", [1, 2, 3, 4, 8, 15, 16, 17, 50])
def test_geometry_spans_the_window_and_a_block(window):
  block, blocks = _lazy_rows.geometry(window)
  assert block * blocks >= window + 1 + block
  # About sqrt(window) each: O(sqrt(W)) a step.
  assert block <= np.sqrt(window) + 1 and blocks <= np.sqrt(window) + 3


@hypothesis.settings(max_examples=_tiers.examples(25, 8), deadline=None)
@hypothesis.given(
  window=st.integers(1, 30),
  steps=st.integers(0, 90),
  mu=st.sampled_from([0.0, 0.5, 0.9, 0.999]),
  lam=st.sampled_from([0.0, 1e-4, 0.1, 0.5]),
  nesterov=st.booleans(),
  ages=st.booleans(),
  seed=st.integers(0, 2**31 - 1),
)
def test_every_step_in_the_window_maps_to_now(
  window, steps, mu, lam, nesterov, ages, seed
):
  # Many windows and step counts: rows behind by 0..W steps, in the current
  # block or an older one, before and after the ring wraps around.
  rng = np.random.default_rng(seed)
  etas = rng.uniform(0.0, 1.0, steps).astype(np.float32)
  c_olds = (rng.uniform(0.5, 1.0, steps) if ages else np.ones(steps)).astype(np.float32)
  ring = _ring_after(window, etas, c_olds, mu, lam, nesterov)
  p0, m0, a0 = (rng.standard_normal(3).astype(np.float32) for _ in range(3))
  first = max(0, steps - window)
  for s in range(first, steps + 1):
    p, m, a = _apply(ring, np.full([3], s), p0, m0, a0)
    ref = _reference(
      p0, m0, a0, np.float64(mu), etas[s:], lam, c_olds[s:].astype(np.float64), nesterov
    )
    np.testing.assert_allclose(m, ref[1], rtol=2e-6, atol=1e-30)
    np.testing.assert_allclose(p, ref[0], rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(a, ref[2], rtol=2e-6, atol=1e-30)
    # Without momentum the buffer is not needed: the same map with m = 0.
    p_only, none = _lazy_rows.catch_up(
      _lazy_rows.maps_at(ring, jnp.full([3], s, jnp.int32)), jnp.asarray(p0), None
    )
    assert none is None
    ref_p = _reference(p0, 0.0 * m0, a0, mu, etas[s:], lam, c_olds[s:], nesterov)[0]
    np.testing.assert_allclose(p_only, ref_p, rtol=1e-5, atol=2e-6)


def test_the_current_step_maps_to_itself():
  ring = _ring_after(3, np.full(5, 0.3), np.full(5, 0.9), 0.9, 0.1)
  p = jnp.array([[1.5, -2.0]])
  m = jnp.array([[0.25, 4.0]])
  a = jnp.array([[7.0, 0.5]])
  same = _apply(ring, [5], p, m, a)
  for got, want in zip(same, (p, m, a), strict=True):
    np.testing.assert_array_equal(got, want)


def test_a_step_costs_the_square_root_of_the_window():
  # advance touches one block of steps and every block's map: its HLO has
  # no operand of the window's length.
  window = 10_000
  ring = _lazy_rows.identity(window, jnp.float32)
  block, blocks = _lazy_rows.geometry(window)
  maps = _lazy_rows.one_step(*(jnp.float32(x) for x in (0.9, 0.1, 0.01, 0.99)))
  lowered = jax.jit(_lazy_rows.advance, donate_argnums=0).lower(
    ring, jnp.int32(7), maps
  )
  text = lowered.compile().as_text()
  assert f"f32[5,{block}]" in text and f"f32[5,{blocks}]" in text
  stats = lowered.compile().memory_analysis()
  assert stats.alias_size_in_bytes >= 4 * 5 * block * blocks  # in place
  assert stats.temp_size_in_bytes < 4 * 5 * 4 * (block + blocks), stats


def test_long_gap_keeps_digits_of_slowly_decaying_rows():
  # 3000 steps of a tiny decay: D = prod(1 - eta lam) is close to 1, so
  # p + G p must keep p's digits where D * p would lose ~3000 roundings.
  steps, lam = 3000, 1e-4
  ring = _ring_after(steps, np.full(steps, 0.01), np.ones(steps), 0.0, lam)
  p0 = np.linspace(-3.0, 3.0, 7).astype(np.float32)
  maps = _lazy_rows.maps_at(ring, jnp.zeros([7], jnp.int32))
  p, _ = _lazy_rows.catch_up(maps, jnp.asarray(p0), None)
  expected = p0.astype(np.float64) * (1.0 - 0.01 * lam) ** steps
  np.testing.assert_allclose(p, expected, rtol=3e-7)


def test_momentum_weight_underflows_to_zero_not_nan():
  # mu**3000 underflows float32: the ring must hold 0, not NaN or inf.
  ring = _ring_after(3000, np.full(3000, 0.1), np.full(3000, 0.9), 0.9, 0.01)
  for maps in ring:
    assert np.all(np.isfinite(np.asarray(maps)))
  p, m, a = _apply(ring, [0], jnp.ones([1, 2]), jnp.ones([1, 2]), jnp.ones([1, 2]))
  p_ref, _, _ = _reference(
    1.0, 1.0, 1.0, 0.9, np.full(3000, np.float32(0.1)), 0.01, np.full(3000, 0.9)
  )
  # p_n = D p_0 - E m_0 cancels (D ~ 0.05, p_n ~ 0.0045): the error is
  # bounded relative to the inputs' size (1 here), not to p_n's.
  np.testing.assert_allclose(p, np.full([1, 2], p_ref), rtol=0, atol=5e-7)
  np.testing.assert_array_equal(m, np.zeros([1, 2]))
  np.testing.assert_array_equal(a, np.zeros([1, 2]))
