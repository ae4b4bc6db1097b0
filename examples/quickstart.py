"""The README's quick example: an embedding-heavy model trained with SM3."""

import jax
import jax.numpy as jnp
import optax

import optax_sm3

# A model that is mostly an embedding table (50,000 x 64), fit to random targets.
k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
params = {"embedding": 0.1 * jax.random.normal(k1, (50_000, 64)), "head": jnp.ones(64)}
ids = jax.random.randint(k2, (4096,), 0, 50_000)
targets = jax.random.normal(k3, (4096,))


def loss_fn(params):
  return jnp.mean((params["embedding"][ids] @ params["head"] - targets) ** 2)


optimizer = optax_sm3.sm3(learning_rate=0.1, momentum=0.0)
state = optimizer.init(params)


@jax.jit
def train_step(params, state):
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, state = optimizer.update(grads, state, params)
  return optax.apply_updates(params, updates), state, loss


for step in range(9):
  params, state, loss = train_step(params, state)
  if step % 4 == 0:
    print(f"step {step:3d}  loss {loss:.4f}")


nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
adam_state = optax.adam(learning_rate=1e-3).init(params)
print(f"parameters {nbytes(params):,} B")
print(f"SM3 state  {nbytes(state):,} B")
print(f"Adam state {nbytes(adam_state):,} B")
