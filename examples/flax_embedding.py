"""A Flax linen model with large embedding tables, trained with sparse SM3.

SM3 keeps ``vocab + dim`` accumulator entries per ``(vocab, dim)`` table,
where Adam keeps ``2 * vocab * dim`` numbers; ``optax_sm3.linen.SparseEmbed``
and ``SparseTrainState`` (Flax's ``TrainState`` idiom) step only the rows in
the batch, exactly as dense SM3 would. The task: predict a fixed score for
each (user, item) pair from a dot product of two embeddings.

Run: ``python examples/flax_embedding.py --steps 200 --vocab 100000``.
"""

from __future__ import annotations

import argparse
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

import optax_sm3
from optax_sm3.linen import SparseEmbed, SparseTrainState


class DotModel(nn.Module):
  """Scores a (user, item) pair by the dot product of their embeddings."""

  vocab: int
  dim: int

  @nn.compact
  def __call__(self, users, items):
    users = SparseEmbed(self.vocab, self.dim, name="users")(users)
    items = SparseEmbed(self.vocab, self.dim, name="items")(items)
    bias = self.param("bias", nn.initializers.zeros, ())
    return jnp.sum(users * items, axis=-1) + bias


def state_size(tree) -> int:
  """Number of array entries in a tree."""
  return sum(x.size for x in jax.tree.leaves(tree))


def main(
  steps: int = 200,
  vocab: int = 10_000,
  dim: int = 32,
  batch: int = 256,
  learning_rate: float = 0.3,
  momentum: float = 0.0,
  seed: int = 0,
  log_every: int = 0,
):
  """Trains on random mini-batches; returns the final loss on a fixed set."""
  model = DotModel(vocab, dim)
  ids = jax.random.randint(jax.random.key(seed), (512,), 0, vocab)
  user_scores, item_scores = jax.random.normal(jax.random.key(seed + 1), (2, vocab))

  def target(users, items):
    # Rank one, so a dot product of embeddings can fit it.
    return user_scores[users] * item_scores[items]

  params = model.init(jax.random.key(seed + 2), ids[:1], ids[:1])["params"]
  # sm3 trains every parameter: the tables by exact row-sparse steps.
  tables = {"users": {"embedding": True}, "items": {"embedding": True}, "bias": False}
  state = SparseTrainState.create(
    apply_fn=model.apply,
    params=params,
    tx=optax_sm3.sparse_tables(
      optax_sm3.sm3(learning_rate, momentum=momentum), tables=tables
    ),
  )

  # Donated, the tables are updated in place (without, XLA copies them whole).
  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state, users, items):
    def loss_fn(params, users, items):
      pred = state.apply_fn({"params": params}, users, items)
      return jnp.mean((pred - target(users, items)) ** 2)

    loss, grads = state.value_and_grad(loss_fn)(users, items)
    return state.apply_gradients(grads=grads), loss

  # A working set of 512 ids, so that each row is seen many times.
  key = jax.random.key(seed + 3)
  for step in range(steps):
    key, ku, ki = jax.random.split(key, 3)
    users = ids[jax.random.randint(ku, (batch,), 0, ids.size)]
    items = ids[jax.random.randint(ki, (batch,), 0, ids.size)]
    state, loss = train_step(state, users, items)
    if log_every and step % log_every == 0:
      print(f"step {step:4d}: loss {float(loss):.4f}")
  users, items = ids, jnp.roll(ids, 1)
  state = state.sync()  # Every row current (with momentum some lag behind).
  pred = state.apply_fn({"params": state.params}, users, items)
  final = float(jnp.mean((pred - target(users, items)) ** 2))
  print(
    f"final loss {final:.4f} after {steps} steps; "
    f"{state_size(state.params)} parameters, SM3 state "
    f"{state_size(state.opt_state)} numbers (Adam: "
    f"{2 * state_size(state.params) + 1}), momentum {momentum}"
  )
  return final


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--vocab", type=int, default=10_000)
  parser.add_argument("--dim", type=int, default=32)
  parser.add_argument("--learning-rate", type=float, default=0.3)
  args = parser.parse_args()
  main(
    args.steps,
    args.vocab,
    args.dim,
    learning_rate=args.learning_rate,
    log_every=max(1, args.steps // 10),
  )
