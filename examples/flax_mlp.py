"""Train a small Flax linen MLP with optax_sm3.sm3 on a synthetic regression.

Run: ``python examples/flax_mlp.py --steps 300``. Prints the loss as it falls.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.training import train_state

import optax_sm3


class MLP(nn.Module):
  """Two hidden layers of ``width`` units."""

  width: int = 64

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.width)(x))
    x = nn.relu(nn.Dense(self.width)(x))
    return nn.Dense(1)(x)[:, 0]


def make_data(key, n=512, dim=8):
  """``y = sin(x @ w) + noise`` for a random ``w``."""
  kx, kw, kn = jax.random.split(key, 3)
  x = jax.random.normal(kx, (n, dim))
  w = jax.random.normal(kw, (dim,)) / jnp.sqrt(dim)
  return x, jnp.sin(2.0 * x @ w) + 0.01 * jax.random.normal(kn, (n,))


def main(steps: int = 300, learning_rate: float = 0.1, seed: int = 0, log_every=0):
  """Trains the MLP full-batch; returns the final mean squared error."""
  key_data, key_init = jax.random.split(jax.random.key(seed))
  x, y = make_data(key_data)
  model = MLP()
  state = train_state.TrainState.create(
    apply_fn=model.apply,
    params=model.init(key_init, x[:1])["params"],
    tx=optax_sm3.sm3(optax_sm3.warmup_schedule(learning_rate, steps)),
  )

  @jax.jit
  def train_step(state):
    def loss_fn(params):
      return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  loss = jnp.nan
  for step in range(steps):
    state, loss = train_step(state)
    if log_every and step % log_every == 0:
      print(f"step {step:4d}: loss {float(loss):.4f}")
  final = float(jnp.mean((state.apply_fn({"params": state.params}, x) - y) ** 2))
  print(f"final loss {final:.4f} after {steps} steps")
  return final


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--learning-rate", type=float, default=0.1)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  main(args.steps, args.learning_rate, args.seed, log_every=max(1, args.steps // 10))
