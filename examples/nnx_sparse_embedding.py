"""MovieLens-100k with hashed feature crosses: sparse NNX training next to dense.

A factorisation machine predicts a rating from hashed features of the
(user, item) pair: the user, the item, user x item, user x genre (one per
genre of the item), item x gender, item x age group, item x occupation and
the release year, all hashed into one table of ``2**20`` rows (row 0 is the
padding row of items with fewer genres). Two runs from the same
initialisation on the same batches:

* sparse: ``optax_sm3.nnx.SparseEmbed`` + ``optax_sm3.nnx.value_and_grad`` +
  ``optax_sm3.nnx.SparseOptimizer`` (exact SM3 on the looked-up rows,
  ``optax_sm3.sm3`` on the rest);
* dense: ``nnx.Embed`` (masked at the padding id) + ``nnx.grad`` +
  ``nnx.Optimizer(model, optax_sm3.sm3(...))``, a full table pass per step.

SM3 is exact on the sparse path, so the two runs agree to float rounding;
the script prints the test RMSE of both, the state sizes, and two lines a
script can read::

  max relative |sparse - dense| = <x>
  step speed-up = <y>x

Run from the repository root (``--quick`` for a run under a minute)::

  python -m examples.nnx_sparse_embedding --quick

The data is read from the ``recbole`` package (``pip install --no-deps
recbole==1.2.1``) by ``benchmarks._data``; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import optax_sm3
import optax_sm3.nnx
from benchmarks._data import load_movielens, package_dir

ROWS = 2**20
DIM = 16
MAX_GENRES = 6


def _read_side_tables():
  """Per item (0-based): genre ids and release year; per user: age, gender, job."""
  folder = package_dir("recbole") / "dataset_example" / "ml-100k"
  items = {}
  vocab = {}
  with open(folder / "ml-100k.item", encoding="latin-1") as f:
    next(f)
    for line in f:
      parts = line.rstrip("\n").split("\t")
      genres = [vocab.setdefault(g, len(vocab) + 1) for g in parts[3].split()]
      year = int(parts[2]) if parts[2].isdigit() else 0
      items[int(parts[0])] = (genres[:MAX_GENRES], year)
  users = {}
  jobs = {}
  with open(folder / "ml-100k.user", encoding="latin-1") as f:
    next(f)
    for line in f:
      user, age, gender, job, _ = line.rstrip("\n").split("\t")
      users[int(user)] = (
        int(age) // 10,
        gender == "F",
        jobs.setdefault(job, len(jobs)),
      )
  return items, users


def _hash(salt: int, *columns: np.ndarray) -> np.ndarray:
  """A row in [1, ROWS) per entry, from a salt and integer columns."""
  h = np.full(columns[0].shape, salt * 0x9E3779B97F4A7C15 % 2**64, np.uint64)
  with np.errstate(over="ignore"):
    for c in columns:
      h = (h ^ c.astype(np.uint64)) * np.uint64(0xBF58476D1CE4E5B9)
      h ^= h >> np.uint64(31)
  return (h % np.uint64(ROWS - 1) + np.uint64(1)).astype(np.int32)


def features(users: np.ndarray, items: np.ndarray) -> np.ndarray:
  """``(n, fields)`` hashed feature ids of (user, item) pairs (0 = padding)."""
  item_table, user_table = _read_side_tables()
  # load_movielens numbers users and items by sorted raw id: raw = index + 1.
  raw_u, raw_i = users + 1, items + 1
  genres = np.zeros((len(users), MAX_GENRES), np.int64)
  year = np.zeros(len(users), np.int64)
  for n, i in enumerate(raw_i):
    g, year[n] = item_table[int(i)]
    genres[n, : len(g)] = g
  age, female, job = (
    np.array([user_table[int(u)][k] for u in raw_u]) for k in range(3)
  )
  columns = [
    _hash(1, raw_u),
    _hash(2, raw_i),
    _hash(3, raw_u, raw_i),
    _hash(4, raw_i, female),
    _hash(5, raw_i, age),
    _hash(6, raw_i, job),
    _hash(7, year),
  ]
  user_genre = _hash(8, np.repeat(raw_u[:, None], MAX_GENRES, 1), genres)
  user_genre = np.where(genres > 0, user_genre, 0)  # Missing genres: padding.
  return np.concatenate([np.stack(columns, 1), user_genre], 1).astype(np.int32)


class DenseEmbed(nnx.Embed):
  """``nnx.Embed`` with a zero padding row: the dense twin of SparseEmbed."""

  def __init__(self, rows, features, *, rngs, padding_id, embedding_init):
    super().__init__(rows, features, rngs=rngs, embedding_init=embedding_init)
    self.padding_id = padding_id
    self.embedding[...] = self.embedding[...].at[padding_id].set(0)

  def __call__(self, ids):
    return jnp.where((ids == self.padding_id)[..., None], 0.0, super().__call__(ids))


class FM(nnx.Module):
  """Factorisation machine: linear terms plus pairwise interactions."""

  def __init__(self, embed, mean: float, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.01)
    self.table = embed(ROWS, DIM, rngs=rngs, padding_id=0, embedding_init=init)
    self.weights = nnx.Linear(DIM, 1, rngs=rngs)
    self.offset = nnx.Param(jnp.asarray(mean, jnp.float32))

  def __call__(self, ids):
    v = self.table(ids)  # (batch, fields, DIM)
    total = v.sum(axis=1)
    pairs = 0.5 * jnp.sum(total**2 - jnp.sum(v**2, axis=1), axis=-1)
    return self.offset[...] + self.weights(total)[:, 0] + pairs


def _loss(model, ids, ratings):
  return jnp.mean((model(ids) - ratings) ** 2)


def _bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main(quick: bool = False, epochs: int = 2, batch_size: int = 512, seed: int = 0):
  data = load_movielens(split_seed=seed)
  train_ids = features(data["train_users"], data["train_items"])
  test_ids = features(data["test_users"], data["test_items"])
  mean = float(data["train_ratings"].mean())
  lr = 0.05

  sparse = FM(optax_sm3.nnx.SparseEmbed, mean, nnx.Rngs(seed))
  dense = FM(DenseEmbed, mean, nnx.Rngs(seed))
  # Momentum 0: with momentum every row moves each step (lazily, but the
  # catch-up sweep and the step counters still cost O(V) a step).
  sparse_opt = optax_sm3.nnx.SparseOptimizer(sparse, optax_sm3.sm3(lr, momentum=0.0))
  dense_opt = nnx.Optimizer(dense, optax_sm3.sm3(lr, momentum=0.0), wrt=nnx.Param)

  @nnx.jit(donate_argnums=(0, 1))
  def sparse_step(model, optimizer, ids, ratings):
    loss, grads = optax_sm3.nnx.value_and_grad(_loss)(model, ids, ratings)
    optimizer.update(model, grads)
    return loss

  @nnx.jit(donate_argnums=(0, 1))
  def dense_step(model, optimizer, ids, ratings):
    loss, grads = nnx.value_and_grad(_loss)(model, ids, ratings)
    optimizer.update(model, grads)
    return loss

  @nnx.jit
  def rmse(model, ids, ratings):
    return jnp.sqrt(jnp.mean((jnp.clip(model(ids), 1.0, 5.0) - ratings) ** 2))

  n = len(train_ids) // batch_size * batch_size
  order_rng = np.random.default_rng(seed)
  steps = 60 if quick else epochs * (n // batch_size)
  times = {"sparse": [], "dense": []}
  for step in range(steps):
    if step % (n // batch_size) == 0:
      order = order_rng.permutation(len(train_ids))[:n].reshape(-1, batch_size)
    batch = order[step % (n // batch_size)]
    ids = jnp.asarray(train_ids[batch])
    ratings = jnp.asarray(data["train_ratings"][batch])
    for name, fn, model, opt in (
      ("sparse", sparse_step, sparse, sparse_opt),
      ("dense", dense_step, dense, dense_opt),
    ):
      start = time.perf_counter()
      jax.block_until_ready(fn(model, opt, ids, ratings))
      times[name].append(time.perf_counter() - start)

  sparse_opt.sync(sparse)
  test = (jnp.asarray(test_ids), jnp.asarray(data["test_ratings"]))
  rel = 0.0
  dense_params = dict(nnx.to_flat_state(nnx.state(dense, nnx.Param)))
  for path, value in nnx.to_flat_state(nnx.state(sparse, nnx.Param)):
    a, b = np.asarray(value[...]), np.asarray(dense_params[path][...])
    rel = max(rel, float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)))
  # Medians after the first steps (compilation).
  warm = slice(3, None)
  t_sparse = float(np.median(times["sparse"][warm]))
  t_dense = float(np.median(times["dense"][warm]))
  sparse_state = _bytes(nnx.state(sparse_opt)) + _bytes(
    nnx.state(sparse, optax_sm3.nnx.SparseState)
  )
  print(f"steps: {steps} of {batch_size} ratings, table {ROWS} x {DIM}")
  print(f"test RMSE: sparse {rmse(sparse, *test):.4f}, dense {rmse(dense, *test):.4f}")
  print(f"step time: sparse {1e3 * t_sparse:.2f} ms, dense {1e3 * t_dense:.2f} ms")
  print(
    f"optimizer state: sparse {sparse_state / 2**20:.2f} MiB, dense "
    f"{_bytes(nnx.state(dense_opt)) / 2**20:.2f} MiB (parameters "
    f"{_bytes(nnx.state(dense, nnx.Param)) / 2**20:.1f} MiB)"
  )
  print(f"max relative |sparse - dense| = {rel:.3g}")
  print(f"step speed-up = {t_dense / t_sparse:.1f}x")
  return rel, t_dense / t_sparse


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="60 steps (< 1 minute)")
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--batch-size", type=int, default=512)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  main(args.quick, args.epochs, args.batch_size, args.seed)
