"""MovieLens-100k matrix factorisation with row-sparse SM3 updates.

The model predicts a rating as ``<U[u], V[i]> + b_u[u] + b_i[i] + mu`` with
128-dimensional user and item embeddings. Two runs from the same
initialisation and the same batches:

* sparse: the gradient is taken with respect to the *gathered rows* of the
  embedding tables, and :func:`optax_sm3.sparse_rows` updates only those rows
  (``O(k * D + V)`` per table per step); the biases and the offset go
  through an ordinary dense optax chain;
* dense: ``jax.grad`` of the whole tables and :func:`optax_sm3.sm3` with the
  same arguments (``O(V * D)`` per step), the same chain for the rest.

SM3 is exact on the sparse path, so both runs reach the same test RMSE (they
differ only by the order in which repeated rows' gradients are summed).

Run from the repository root::

  python -m examples.movielens_sparse            # 20 epochs
  python -m examples.movielens_sparse --epochs 3

The data is read from the ``recbole`` package (``pip install --no-deps
recbole==1.2.1``) by ``benchmarks._data.load_movielens``; nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_sm3
from benchmarks._data import load_movielens

DIM = 128


def init_params(num_users: int, num_items: int, mean: float, seed: int) -> dict:
  """Embeddings ``N(0, 0.1^2)``, zero biases, the offset at the mean rating."""
  user_key, item_key = jax.random.split(jax.random.key(seed))
  return {
    "users": 0.1 * jax.random.normal(user_key, (num_users, DIM)),
    "items": 0.1 * jax.random.normal(item_key, (num_items, DIM)),
    "rest": {
      "user_bias": jnp.zeros(num_users),
      "item_bias": jnp.zeros(num_items),
      "offset": jnp.asarray(mean, jnp.float32),
    },
  }


def predict_rows(user_rows, item_rows, rest, users, items):
  """Ratings from the gathered embedding rows of a batch."""
  dot = jnp.sum(user_rows * item_rows, axis=-1)
  return dot + rest["user_bias"][users] + rest["item_bias"][items] + rest["offset"]


def batch_loss(user_rows, item_rows, rest, users, items, ratings, l2):
  """Mean squared error plus an L2 penalty on the batch's embedding rows."""
  error = predict_rows(user_rows, item_rows, rest, users, items) - ratings
  penalty = jnp.sum(user_rows**2, axis=-1) + jnp.sum(item_rows**2, axis=-1)
  return jnp.mean(error**2 + l2 * penalty)


def rmse(params, users, items, ratings) -> float:
  pred = predict_rows(
    params["users"][users], params["items"][items], params["rest"], users, items
  )
  return float(jnp.sqrt(jnp.mean((jnp.clip(pred, 1.0, 5.0) - ratings) ** 2)))


def make_steps(learning_rate: float, bias_learning_rate: float, l2: float):
  """The jitted sparse and dense training steps and their initial states."""
  dense_tables = optax_sm3.sm3(learning_rate, momentum=0.0)
  sparse = optax_sm3.sparse_rows(dense_tables)  # the same optimizer, row-sparse
  rest_opt = optax_sm3.sm3(bias_learning_rate, momentum=0.0)
  grad_rows = jax.grad(batch_loss, argnums=(0, 1, 2))

  def sparse_init(params):
    return (
      sparse.init(params["users"]),
      sparse.init(params["items"]),
      rest_opt.init(params["rest"]),
    )

  def dense_init(params):
    return (
      dense_tables.init({"users": params["users"], "items": params["items"]}),
      rest_opt.init(params["rest"]),
    )

  # Donated: the table is updated in place, not copied (see the sparse guide).
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def sparse_step(params, state, users, items, ratings):
    user_rows, item_rows = params["users"][users], params["items"][items]
    g_users, g_items, g_rest = grad_rows(
      user_rows, item_rows, params["rest"], users, items, ratings, l2
    )
    new_users, user_state = sparse.update(users, g_users, state[0], params["users"])
    new_items, item_state = sparse.update(items, g_items, state[1], params["items"])
    updates, rest_state = rest_opt.update(g_rest, state[2], params["rest"])
    params = {
      "users": new_users,
      "items": new_items,
      "rest": optax.apply_updates(params["rest"], updates),
    }
    return params, (user_state, item_state, rest_state)

  def full_loss(params, users, items, ratings):
    return batch_loss(
      params["users"][users],
      params["items"][items],
      params["rest"],
      users,
      items,
      ratings,
      l2,
    )

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def dense_step(params, state, users, items, ratings):
    grads = jax.grad(full_loss)(params, users, items, ratings)
    tables = {"users": params["users"], "items": params["items"]}
    table_grads = {"users": grads["users"], "items": grads["items"]}
    updates, table_state = dense_tables.update(table_grads, state[0], tables)
    tables = optax.apply_updates(tables, updates)
    updates, rest_state = rest_opt.update(grads["rest"], state[1], params["rest"])
    params = {**tables, "rest": optax.apply_updates(params["rest"], updates)}
    return params, (table_state, rest_state)

  return (sparse_init, sparse_step), (dense_init, dense_step)


def train(data, init, step, params, epochs, batch_size, seed, quiet, name):
  """Runs ``epochs`` passes in a fixed batch order; returns the history."""
  params = jax.tree.map(jnp.copy, params)  # The step donates it; keep the caller's.
  state = init(params)
  n = len(data["train_ratings"])
  order_rng = np.random.default_rng(seed)
  history = {"test_rmse": [], "seconds": 0.0}
  history["initial_test_rmse"] = rmse(
    params, data["test_users"], data["test_items"], data["test_ratings"]
  )
  start = time.perf_counter()
  for epoch in range(epochs):
    order = order_rng.permutation(n)
    # Whole batches only, so that every step has the same shapes.
    for b in range(n // batch_size):
      batch = order[b * batch_size : (b + 1) * batch_size]
      params, state = step(
        params,
        state,
        data["train_users"][batch],
        data["train_items"][batch],
        data["train_ratings"][batch],
      )
    jax.block_until_ready(params)
    history["test_rmse"].append(
      rmse(params, data["test_users"], data["test_items"], data["test_ratings"])
    )
    if not quiet:
      print(f"{name:6s} epoch {epoch + 1:3d}: test RMSE {history['test_rmse'][-1]:.4f}")
  history["seconds"] = time.perf_counter() - start
  return history, params


def main(argv=None) -> dict:
  """Trains both ways; returns ``{"sparse": history, "dense": history}``."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--epochs", type=int, default=20)
  parser.add_argument("--batch-size", type=int, default=1024)
  parser.add_argument("--learning-rate", type=float, default=0.02)
  parser.add_argument("--bias-learning-rate", type=float, default=0.05)
  parser.add_argument("--l2", type=float, default=0.02)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quiet", action="store_true")
  args = parser.parse_args(argv)

  data = load_movielens(split_seed=args.seed)
  params = init_params(
    data["num_users"],
    data["num_items"],
    float(np.mean(data["train_ratings"])),
    args.seed,
  )
  (sparse_init, sparse_step), (dense_init, dense_step) = make_steps(
    args.learning_rate, args.bias_learning_rate, args.l2
  )
  common = (args.epochs, args.batch_size, args.seed, args.quiet)
  sparse, sparse_params = train(
    data, sparse_init, sparse_step, params, *common, "sparse"
  )
  dense, dense_params = train(data, dense_init, dense_step, params, *common, "dense")
  gap = max(
    float(jnp.max(jnp.abs(sparse_params[k] - dense_params[k])))
    for k in ("users", "items")
  )
  if not args.quiet:
    print(
      f"final test RMSE: sparse {sparse['test_rmse'][-1]:.4f}, dense "
      f"{dense['test_rmse'][-1]:.4f} (initial {sparse['initial_test_rmse']:.4f}); "
      f"largest embedding difference {gap:.2e}; training time sparse "
      f"{sparse['seconds']:.1f} s, dense {dense['seconds']:.1f} s"
    )
  return {"sparse": sparse, "dense": dense, "max_abs_difference": gap}


if __name__ == "__main__":
  main()
