"""optax_sm3.sm3 in Flax train steps: linen TrainState and NNX Optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sm3

flax = pytest.importorskip("flax")
nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")
train_state = pytest.importorskip("flax.training.train_state")

_X = jax.random.normal(jax.random.key(0), (64, 5))
_Y = jnp.sin(_X @ jnp.arange(1.0, 6.0) / 5.0)[:, None]


class _LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(nn.tanh(nn.Dense(16)(x)))


def test_linen_train_state_jitted_step():
  model = _LinenMLP()
  params = model.init(jax.random.key(1), _X)["params"]
  tx = optax_sm3.sm3(0.05)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  @jax.jit
  def step(state):
    def loss_fn(p):
      return jnp.mean((state.apply_fn({"params": p}, _X) - _Y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss, grads

  losses, first_grads = [], None
  for _ in range(40):
    state, loss, grads = step(state)
    first_grads = grads if first_grads is None else first_grads
    losses.append(float(loss))
  assert losses[-1] < 0.3 * losses[0]
  assert int(state.step) == 40
  # The state is SM3's: per-axis vectors for the (5, 16) kernel.
  kernel = state.opt_state[0].accumulators["Dense_1"]["kernel"]
  assert [a.shape for a in kernel] == [(5,), (16,)]
  # The first step is exactly one sm3 update.
  fresh = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  updates, _ = tx.update(first_grads, tx.init(params), params)
  jax.tree.map(
    lambda new, p, u: np.testing.assert_allclose(new - p, u, rtol=1e-5, atol=1e-7),
    step(fresh)[0].params,
    params,
    updates,
  )


class _NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(5, 16, rngs=rngs)
    self.out = nnx.Linear(16, 1, rngs=rngs)
    self.scale = nnx.Param(jnp.ones(()))  # a scalar parameter

  def __call__(self, x):
    return self.out(nnx.tanh(self.hidden(x))) * self.scale[...]


def test_nnx_optimizer_jitted_step():
  model = _NNXMLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax_sm3.sm3(0.05), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      return jnp.mean((model(_X) - _Y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(40)]
  assert losses[-1] < 0.3 * losses[0]
  assert int(optimizer.step[...]) == 40


def test_nnx_functional_state_with_sm3():
  # The pattern that works today: keep the optax state as a plain pytree.
  model = _NNXMLP(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax_sm3.sm3(0.05)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(params):
      return jnp.mean((nnx.merge(graphdef, params)(_X) - _Y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(40):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.3 * losses[0]
