"""from_optax_sm3: resuming an optax.sm3 run with optax_sm3.sm3."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sm3


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
