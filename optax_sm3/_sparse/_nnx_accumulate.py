"""Flax NNX: ``MultiSteps``, gradient accumulation over a ``SparseOptimizer``.

``optax.MultiSteps`` cannot hold row-sparse gradients (adding them leaf by
leaf would add their indices; the :class:`SparseGrad` marker makes it fail),
and an ``nnx.Optimizer`` around it would not step the tables sparsely. This
wrapper keeps one cycle's gradients in buffers of fixed shape (rows, never a
table-sized array) and steps the wrapped optimizer with their mean every
``every_k_schedule`` calls, as ``optax.MultiSteps`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from optax_sm3._sparse._accumulate import (
  add_to_buffer,
  check_every_k,
  empty_buffer,
  scale_tree,
)
from optax_sm3._sparse._nnx_check import path_str

if TYPE_CHECKING:  # for the annotation only
  from optax_sm3._sparse._nnx_optimizer import SparseOptimizer


class AccumulatedGrad(nnx.Variable):
  """One gradient leaf's sum over the current cycle (not a parameter)."""


class MultiSteps(nnx.Pytree):
  """``optax.MultiSteps`` for :class:`optax_sm3.nnx.SparseOptimizer`.

  ``update(model, grads)`` adds one microbatch's gradients (from
  :func:`optax_sm3.nnx.value_and_grad`); every ``every_k_schedule``-th call
  it calls ``optimizer.update(model, mean)`` with the mean of the cycle's
  gradients, and the other calls leave the model and the optimizer as they
  are. Training equals, to float rounding, ``nnx.Optimizer(model,
  optax.MultiSteps(tx, every_k_schedule))`` over the dense model (the
  optimizer's SM3 on the tables, its ``tx`` on the rest). A table's
  gradients are kept as ``every_k_schedule * k`` rows (``k`` per
  microbatch); every buffer's shape is fixed at construction, so ``update``
  runs under ``nnx.jit`` (it branches with ``nnx.cond``). To accumulate
  within one step instead, sum the microbatches' gradients with
  :func:`optax_sm3.sparse_grad_mean` and call ``optimizer.update`` once.

  Args:
    optimizer: the :class:`optax_sm3.nnx.SparseOptimizer` (or any NNX
      optimizer with ``update(model, grads)``) to step.
    every_k_schedule: microbatches per step, a Python int ``>= 1``.
    grads_like: one microbatch's gradients (or ``jax.eval_shape`` of
      them), which fix the buffers' shapes.

  Attributes:
    optimizer: the wrapped optimizer.
    every_k_schedule: microbatches per step.
    mini_step: microbatches held, in ``[0, every_k_schedule)``.
    buffers: an :class:`AccumulatedGrad` per gradient leaf.

  Raises:
    ValueError: for ``every_k_schedule`` not an int ``>= 1``; at ``update``,
      for gradients that do not match ``grads_like``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import optax, optax_sm3.nnx
    >>> model = optax_sm3.nnx.SparseEmbed(100, 2, rngs=nnx.Rngs(0))
    >>> opt = optax_sm3.nnx.SparseOptimizer(
    ...   model, optax.sgd(0.1), optax_sm3.sm3(0.1, momentum=0.0)
    ... )
    >>> loss = lambda m, ids: jnp.sum(m(ids))
    >>> _, like = optax_sm3.nnx.value_and_grad(loss)(model, jnp.array([0]))
    >>> multi = optax_sm3.nnx.MultiSteps(opt, every_k_schedule=2, grads_like=like)
    >>> before = model.embedding[...]
    >>> for ids in (jnp.array([3]), jnp.array([4])):
    ...   _, grads = optax_sm3.nnx.value_and_grad(loss)(model, ids)
    ...   multi.update(model, grads)
    ...   print(int(opt.step[...]), jnp.any(model.embedding[...] != before, axis=1)[2:6])
    0 [False False False False]
    1 [False  True  True False]
  """

  def __init__(
    self,
    optimizer: SparseOptimizer | nnx.Optimizer,
    every_k_schedule: int,
    grads_like: nnx.State,
  ):
    self.optimizer = optimizer
    self.every_k_schedule = check_every_k(every_k_schedule)
    flat = list(nnx.to_flat_state(grads_like))
    self.paths = tuple(tuple(path) for path, _ in flat)
    # The Variable type of each gradient leaf (nnx.Param), to rebuild them.
    self.kinds = tuple(type(v) for _, v in flat)
    self.buffers = nnx.data(
      [AccumulatedGrad(empty_buffer(nnx.as_pure(v), every_k_schedule)) for _, v in flat]
    )
    self.mini_step = AccumulatedGrad(jnp.zeros([], jnp.int32))

  def update(self, model: nnx.Module, grads: nnx.State, /) -> None:
    """Adds ``grads``; on the cycle's last call, steps ``optimizer``.

    Args:
      model: the model ``optimizer`` was built for.
      grads: one microbatch's gradients of ``model``.

    Raises:
      ValueError: if ``grads`` does not have ``grads_like``'s leaves.
    """
    flat = {tuple(p): v for p, v in nnx.to_flat_state(grads)}
    if set(flat) != set(self.paths):
      raise ValueError(
        "`grads` does not have the leaves of `grads_like`: missing "
        f"{sorted(map(path_str, set(self.paths) - set(flat)))[:5]}, unexpected "
        f"{sorted(map(path_str, set(flat) - set(self.paths)))[:5]}"
      )
    every_k = self.every_k_schedule
    mini_step = self.mini_step[...]
    summed = [
      add_to_buffer(
        buffer.get_value(),
        nnx.as_pure(flat[path]),
        mini_step,
        every_k,
        path_str(path),
      )
      for path, buffer in zip(self.paths, self.buffers, strict=True)
    ]
    last = mini_step == every_k - 1

    def apply(model, optimizer, summed):
      mean = nnx.from_flat_state(
        [
          (path, kind(scale_tree(value, 1.0 / every_k)))
          for path, kind, value in zip(self.paths, self.kinds, summed, strict=True)
        ]
      )
      optimizer.update(model, mean)

    def hold(model, optimizer, summed):
      del model, optimizer, summed

    nnx.cond(last, apply, hold, model, self.optimizer, summed)
    for buffer, value in zip(self.buffers, summed, strict=True):
      buffer.set_value(
        jax.tree.map(lambda x: jnp.where(last, jnp.zeros_like(x), x), value)
      )
    self.mini_step[...] = jnp.where(last, 0, mini_step + 1).astype(jnp.int32)
