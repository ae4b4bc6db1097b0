"""The sparse benchmarks' bag-of-ids workload and its NNX train steps.

A ``V x 64`` table averaged over bags of 4 ids and a linear head, 1024 bags a
step, regressed on random targets; the table trains with
``optax_sm3.sm3(0.1, momentum=m)``, the head with ``optax.adam(1e-3)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_sm3
import optax_sm3.nnx

DIM, BAGS, BAG = 64, 1024, 4
LEARNING_RATE, HEAD_LEARNING_RATE = 0.1, 1e-3
MOMENTA = (0.0, 0.9)


class Model(nnx.Module):
  """Bag-of-ids regression: mean of the bag's rows, then a linear head."""

  def __init__(self, embed, rows: int, rngs: nnx.Rngs, param_dtype=jnp.float32, **kw):
    self.items = embed(rows, DIM, param_dtype=param_dtype, rngs=rngs, **kw)
    self.head = nnx.Linear(DIM, 1, rngs=rngs)

  def __call__(self, ids):  # ids: (bags, bag) ints
    return self.head(self.items(ids).mean(axis=1))[:, 0]


def mse(model, ids, y):
  return jnp.mean((model(ids) - y) ** 2)


def optimizers(momentum: float) -> tuple[optax.GradientTransformation, ...]:
  """The head's optimizer (adam) and the table's (``sm3`` with ``momentum``)."""
  return optax.adam(HEAD_LEARNING_RATE), optax_sm3.sm3(LEARNING_RATE, momentum=momentum)


def tables(params):
  """Which of ``params`` are the table: the ``items`` embedding's."""
  return jax.tree.map_with_path(
    lambda path, _: "items" in jax.tree_util.keystr(path), params
  )


def dense_tx(momentum: float) -> optax.GradientTransformation:
  """The sparse optimizers' dense twin: ``sm3`` on the table, adam on the rest."""
  head, table = optimizers(momentum)
  return optax.multi_transform(
    {"table": table, "head": head},
    lambda params: jax.tree.map(lambda t: "table" if t else "head", tables(params)),
  )


def build(kind: str, rows: int, momentum: float, param_dtype=jnp.float32, **kw):
  """``(model, optimizer, train_step)`` of the ``"sparse"`` or ``"dense"`` NNX model;
  ``kw`` goes to the embedding, the step donates the model and the optimizer."""
  if kind == "sparse":
    model = Model(optax_sm3.nnx.SparseEmbed, rows, nnx.Rngs(0), param_dtype, **kw)
    optimizer = optax_sm3.nnx.SparseOptimizer(model, *optimizers(momentum))
    value_and_grad = optax_sm3.nnx.value_and_grad
  elif kind == "dense":
    model = Model(nnx.Embed, rows, nnx.Rngs(0), param_dtype, **kw)
    optimizer = nnx.Optimizer(model, dense_tx(momentum), wrt=nnx.Param)
    value_and_grad = nnx.value_and_grad
  else:
    raise ValueError(f"`kind` must be 'sparse' or 'dense', got {kind!r}")

  @nnx.jit(donate_argnums=(0, 1))
  def train_step(model, optimizer, ids, y):
    loss, grads = value_and_grad(mse)(model, ids, y)
    optimizer.update(model, grads)
    return loss

  return model, optimizer, train_step


def batches(rows: int, count: int, seed: int) -> list:
  """``count`` batches of ``(ids (BAGS, BAG) int32, targets (BAGS,) float32)``."""
  rng = np.random.default_rng(seed)
  return [
    (
      jnp.asarray(rng.integers(0, rows, (BAGS, BAG), dtype=np.int32)),
      jnp.asarray(rng.standard_normal(BAGS, dtype=np.float32)),
    )
    for _ in range(count)
  ]
