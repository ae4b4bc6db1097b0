"""Gradient accumulation with row-sparse gradients: sums, means, MultiSteps.

A :class:`SparseGrad`'s dense form is ``zeros.at[indices].add(row_grads)``,
so the sum of several is their concatenation (repeats are summed by the
optimizer): exact, with no table-sized array. Adding them leaf by leaf
(``jax.tree.map(jnp.add, g1, g2)``) would add the indices; the SparseGrad's
marker makes that raise instead. :func:`sparse_grad_sum` and
:func:`sparse_grad_mean` combine whole gradient trees, and
:func:`sparse_multi_steps` is ``optax.MultiSteps`` for
:func:`optax_sm3.sparse_tables`, with a state of fixed shape.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import optax

from optax_sm3._sparse._tables import (
  NOT_A_TRANSFORMATION,
  SparseTables,
  SparseTablesState,
  StepFn,
  SyncFn,
)
from optax_sm3._sparse._types import SparseGrad, check_sparse_grad, is_sparse_grad

# A gradient tree: a pytree, nnx.State or Equinox module whose table leaves
# may be SparseGrads; the sum and mean have the type of their terms.
GradsT = TypeVar("GradsT")


def _densify(grad: SparseGrad, like: jax.typing.ArrayLike) -> jax.Array:
  dense = jnp.zeros(jnp.shape(like), jnp.result_type(like))
  return dense.at[grad.indices].add(grad.row_grads.astype(dense.dtype))


def _sum_leaf(parts: list[Any]) -> Any:
  sparse = [p for p in parts if isinstance(p, SparseGrad)]
  dense = [p for p in parts if not isinstance(p, SparseGrad)]
  for number, p in enumerate(sparse):
    check_sparse_grad(p, name=f"SparseGrad {number} of a leaf")
  if not dense:
    return sum(sparse[1:], sparse[0])
  # Sparse in one gradient, dense in another (a table read densely in one
  # microbatch, attend): the sum is dense.
  total = functools.reduce(operator.add, dense)
  for p in sparse:
    total = total + _densify(p, total)
  return total


def sparse_grad_sum(*grads: GradsT) -> GradsT:
  """The sum of gradient trees whose table leaves may be :class:`SparseGrad`.

  Arrays are added; the :class:`SparseGrad`\\ s at a leaf are concatenated
  (``indices`` and ``row_grads``), whose dense form is the sum of theirs,
  so stepping with the result equals stepping the dense optimizer with the
  summed dense gradients. A leaf that is a SparseGrad in one tree and an
  array in another (a table read densely in one microbatch) comes out dense.
  The trees may be plain pytrees, ``nnx.State`` or Equinox modules.

  Args:
    *grads: one or more trees of one structure (SparseGrad nodes counted as
      leaves).

  Returns:
    A tree of that structure.

  Raises:
    TypeError: for no trees, or a SparseGrad that went through arithmetic
      leaf by leaf (its marker replaced, its indices not integers).
    ValueError: for trees of different structures.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_sm3
    >>> g1 = {"table": optax_sm3.SparseGrad(jnp.array([2]), jnp.ones((1, 3))),
    ...       "w": jnp.asarray(1.0)}
    >>> g2 = {"table": optax_sm3.SparseGrad(jnp.array([7]), jnp.ones((1, 3))),
    ...       "w": jnp.asarray(2.0)}
    >>> total = optax_sm3.sparse_grad_sum(g1, g2)
    >>> print(total["table"].indices, total["w"])
    [2 7] 3.0
  """
  if not grads:
    raise TypeError("sparse_grad_sum needs at least one gradient tree")
  leaves, treedef = jax.tree.flatten(grads[0], is_leaf=is_sparse_grad)
  columns = [leaves]
  for number, tree in enumerate(grads[1:], start=1):
    try:
      columns.append(treedef.flatten_up_to(tree))
    except (ValueError, TypeError) as error:
      raise ValueError(
        f"gradient tree {number} does not have the structure of tree 0: {error}"
      ) from None
  return treedef.unflatten(
    [_sum_leaf(list(parts)) for parts in zip(*columns, strict=True)]
  )


def _scale_leaf(leaf: Any, scale: Any) -> Any:
  if isinstance(leaf, SparseGrad):
    return leaf * scale
  leaf = jnp.asarray(leaf)
  return (leaf * scale).astype(leaf.dtype)


def scale_tree(grads: GradsT, scale: jax.typing.ArrayLike) -> GradsT:
  """``grads`` times a scalar: arrays scaled, each SparseGrad's ``row_grads`` too.

  Args:
    grads: a gradient tree (SparseGrad nodes allowed).
    scale: a scalar (may be traced).

  Returns:
    The scaled tree, dtypes kept.
  """
  return jax.tree.map(lambda g: _scale_leaf(g, scale), grads, is_leaf=is_sparse_grad)


def sparse_grad_mean(*grads: GradsT) -> GradsT:
  """``sparse_grad_sum(*grads)`` divided by ``len(grads)``.

  The gradient of the mean of the microbatches' mean losses (the full
  batch's mean loss, for equal microbatches), as ``optax.MultiSteps``
  applies it.

  Args:
    *grads: one or more gradient trees of one structure.

  Returns:
    Their mean, a tree of that structure.
  """
  return scale_tree(sparse_grad_sum(*grads), 1.0 / max(len(grads), 1))


# ---------------------------------------------------------------------------
# MultiSteps for sparse_tables.


def empty_buffer(like: Any, every_k: int) -> Any:
  """Empty room for ``every_k`` gradients like ``like``."""
  if isinstance(like, SparseGrad):
    k = jnp.shape(like.indices)[0]
    row = tuple(jnp.shape(like.row_grads)[1:])
    # Unfilled slots read as row 0 with a zero gradient: a valid SparseGrad
    # whose dense form is the sum so far (the slots fill before a step).
    return SparseGrad(
      jnp.zeros((every_k * k,), jnp.int32),
      jnp.zeros((every_k * k, *row), jnp.result_type(like.row_grads)),
    )
  return jnp.zeros(jnp.shape(like), jnp.result_type(like))


def add_to_buffer(
  buffer: Any, grad: Any, slot: jax.Array, every_k: int, name: str
) -> Any:
  if isinstance(buffer, SparseGrad):
    if not isinstance(grad, SparseGrad):
      raise TypeError(
        f"the gradient at {name} was a SparseGrad in `grads_like` (the "
        f"accumulator holds rows), got {type(grad).__name__}"
      )
    check_sparse_grad(grad, tuple(buffer.row_grads.shape[1:]), name=name)
    k = grad.indices.shape[0]
    if buffer.indices.shape[0] != every_k * k:
      raise ValueError(
        f"the SparseGrad at {name} has {k} rows, but the accumulator holds "
        f"{buffer.indices.shape[0] // every_k} per microbatch (its `grads_like`)"
      )
    start = slot * k
    return SparseGrad(
      jax.lax.dynamic_update_slice(
        buffer.indices, grad.indices.astype(jnp.int32), (start,)
      ),
      jax.lax.dynamic_update_slice(
        buffer.row_grads,
        grad.row_grads.astype(buffer.row_grads.dtype),
        (start,) + (0,) * (buffer.row_grads.ndim - 1),
      ),
      buffer.marker,
    )
  if isinstance(grad, SparseGrad):
    check_sparse_grad(grad, tuple(jnp.shape(buffer)[1:]), name=name)
    return buffer + _densify(grad, buffer)
  if jnp.shape(grad) != jnp.shape(buffer):
    raise ValueError(
      f"the gradient at {name} has shape {jnp.shape(grad)}, the accumulator "
      f"{jnp.shape(buffer)}"
    )
  return buffer + jnp.asarray(grad).astype(buffer.dtype)


class SparseMultiStepsState(NamedTuple):
  """The state of :func:`sparse_multi_steps`.

  Attributes:
    mini_step: microbatches accumulated since the last step, in ``[0,
      every_k_schedule)``; shape ``()``, int32.
    gradient_step: steps of the inner optimizer taken; shape ``()``, int32.
    inner_state: the :class:`optax_sm3.SparseTablesState` of the inner
      optimizer.
    grads: the sum of this cycle's gradients, with the structure of
      ``grads_like``: an array per dense leaf (its shape and dtype), a
      :class:`SparseGrad` of ``every_k_schedule * k`` rows per sparse table
      (``k``: its rows per microbatch; slots not yet written are row 0 with a
      zero gradient).
  """

  mini_step: jax.Array  # () int32.
  gradient_step: jax.Array  # () int32.
  inner_state: SparseTablesState
  grads: optax.Updates  # grads_like's structure: sums, and SparseGrad buffers.


class SparseMultiSteps:
  """The functions returned by :func:`sparse_multi_steps`.

  Attributes:
    init: ``init(params, grads_like) -> state``; ``grads_like`` is one
      microbatch's gradients or their shapes (``jax.eval_shape`` of the
      gradient function), which fix the accumulator's shapes.
    step: ``step(params, grads, state) -> (new_params, new_state)``: adds
      ``grads``; every ``every_k_schedule``-th call steps the inner optimizer
      with the mean of the cycle's gradients, the other calls return
      ``params`` unchanged.
    sync: ``sync(params, state) -> (params, state)``, as the inner one's.
    value_and_grad: ``value_and_grad(fun, has_aux=False)`` returns ``g(params,
      state, *args)``, as the inner one's (rows read through its state).
    every_k_schedule: the number of microbatches per step.
  """

  __slots__ = ("every_k_schedule", "init", "step", "sync", "value_and_grad")

  init: Callable[[optax.Params, optax.Updates], SparseMultiStepsState]
  step: StepFn[SparseMultiStepsState]
  sync: SyncFn[SparseMultiStepsState]
  # The function's value (or `(value, aux)`) is the loss's own: anything.
  value_and_grad: Callable[..., Callable[..., tuple[Any, optax.Updates]]]
  every_k_schedule: int

  def __init__(self, init, step, sync, value_and_grad, every_k_schedule):
    self.init = init
    self.step = step
    self.sync = sync
    self.value_and_grad = value_and_grad
    self.every_k_schedule = every_k_schedule

  def update(self, *args, **kwargs):
    """Raises ``TypeError``: this is not an optax ``GradientTransformation``."""
    del args, kwargs
    raise TypeError(f"optax_sm3.sparse_multi_steps(...) {NOT_A_TRANSFORMATION}")


def check_every_k(every_k_schedule: object) -> int:
  """``every_k_schedule`` if it is an int >= 1 (buffer shapes depend on it).

  Raises:
    ValueError: otherwise, naming the argument.
  """
  if (
    isinstance(every_k_schedule, bool)
    or not isinstance(every_k_schedule, int)
    or every_k_schedule < 1
  ):
    raise ValueError(
      f"`every_k_schedule` must be an int >= 1, got {every_k_schedule!r}"
    )
  return every_k_schedule


def _empty(every_k: int, grads_like: Any) -> Any:
  return jax.tree.map(
    lambda g: empty_buffer(g, every_k), grads_like, is_leaf=is_sparse_grad
  )


def _init(
  opt: SparseTables, every_k: int, params: optax.Params, grads_like: optax.Updates
) -> SparseMultiStepsState:
  return SparseMultiStepsState(
    mini_step=jnp.zeros([], jnp.int32),
    gradient_step=jnp.zeros([], jnp.int32),
    inner_state=opt.init(params),
    grads=_empty(every_k, grads_like),
  )


def _added(
  every_k: int, grads: optax.Updates, state: SparseMultiStepsState
) -> optax.Updates:
  """``state.grads`` with ``grads`` added (in this microbatch's slots)."""
  leaves, treedef = jax.tree.flatten(state.grads, is_leaf=is_sparse_grad)
  paths = [
    jax.tree_util.keystr(p)
    for p, _ in jax.tree_util.tree_flatten_with_path(
      state.grads, is_leaf=is_sparse_grad
    )[0]
  ]
  try:
    grad_leaves = treedef.flatten_up_to(grads)
  except (ValueError, TypeError) as error:
    raise ValueError(
      f"`grads` does not have the structure of the accumulator's `grads_like`: {error}"
    ) from None
  return treedef.unflatten(
    [
      add_to_buffer(b, g, state.mini_step, every_k, f"grads{path}")
      for b, g, path in zip(leaves, grad_leaves, paths, strict=True)
    ]
  )


def _apply(
  opt: SparseTables, every_k: int, params: Any, inner_state: Any, summed: Any
) -> tuple[Any, Any, Any]:
  """The inner step with the cycle's mean; the sums emptied."""
  mean = scale_tree(summed, 1.0 / every_k)
  params, inner_state = opt.step(params, mean, inner_state)
  return params, inner_state, jax.tree.map(jnp.zeros_like, summed)


def _hold(params: Any, inner_state: Any, summed: Any) -> tuple[Any, Any, Any]:
  return params, inner_state, summed


def _step(
  opt: SparseTables,
  every_k: int,
  params: Any,
  grads: Any,
  state: SparseMultiStepsState,
) -> tuple[Any, SparseMultiStepsState]:
  summed = _added(every_k, grads, state)
  last = state.mini_step == every_k - 1
  apply = functools.partial(_apply, opt, every_k)
  params, inner_state, summed = jax.lax.cond(
    last, apply, _hold, params, state.inner_state, summed
  )
  return params, SparseMultiStepsState(
    mini_step=jnp.where(last, 0, state.mini_step + 1).astype(jnp.int32),
    gradient_step=(state.gradient_step + last.astype(jnp.int32)),
    inner_state=inner_state,
    grads=summed,
  )


def _sync(
  opt: SparseTables, params: Any, state: SparseMultiStepsState
) -> tuple[Any, SparseMultiStepsState]:
  params, inner_state = opt.sync(params, state.inner_state)
  return params, state._replace(inner_state=inner_state)


def _value_and_grad_at(
  inner: Callable[..., Any], params: Any, state: SparseMultiStepsState, *args: Any
) -> Any:
  return inner(params, state.inner_state, *args)


def _value_and_grad(
  opt: SparseTables, fun: Callable[..., Any], *, has_aux: bool = False
) -> Callable[..., Any]:
  inner = opt.value_and_grad(fun, has_aux=has_aux)
  return functools.partial(_value_and_grad_at, inner)


def sparse_multi_steps(opt: SparseTables, every_k_schedule: int) -> SparseMultiSteps:
  """``optax.MultiSteps`` for :func:`optax_sm3.sparse_tables`: one step per k microbatches.

  Each ``step`` adds a microbatch's gradients to the state; the
  ``every_k_schedule``-th steps ``opt`` with their mean, as
  ``optax.MultiSteps(inner, every_k_schedule)`` does (and, as it, leaves the
  parameters unchanged on the other calls). With ``opt =
  sparse_tables(tx, table_tx, tables=mask)`` the result equals,
  to float rounding, ``optax.MultiSteps`` over the dense optimizer
  (``sm3(learning_rate, ...)`` on the tables, ``tx`` on the rest) fed the
  dense gradients. The tables' gradients are kept as rows, never as
  table-sized arrays: ``every_k_schedule * k`` rows per table for ``k`` rows
  looked up per microbatch. The state's shapes are fixed by ``init``, so
  ``step`` runs under ``jit``, ``lax.scan`` and ``lax.cond``.

  Args:
    opt: a :func:`optax_sm3.sparse_tables` optimizer.
    every_k_schedule: microbatches per step, a Python int ``>= 1`` (a
      schedule would change the state's shapes).

  Returns:
    A :class:`SparseMultiSteps` ``(init, step, sync, value_and_grad)``;
    like ``opt``, its ``update`` raises a ``TypeError``.

  Raises:
    TypeError: for an ``opt`` that is not a :class:`SparseTables`.
    ValueError: for ``every_k_schedule`` that is not an int ``>= 1``; at
      ``step``, for gradients that do not match ``grads_like``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import optax
    >>> import optax_sm3
    >>> params = {"table": jnp.ones((100, 2)), "w": jnp.asarray(2.0)}
    >>> tables = optax_sm3.sparse_tables(
    ...   optax.sgd(0.1), optax_sm3.sm3(0.1, momentum=0.0),
    ...   tables={"table": True, "w": False},
    ... )
    >>> opt = optax_sm3.sparse_multi_steps(tables, every_k_schedule=2)
    >>> def loss(params, ids):
    ...   return params["w"] * jnp.sum(optax_sm3.sparse_lookup(params["table"], ids))
    >>> # One microbatch's gradient shapes fix the accumulator's.
    >>> _, grads_like = jax.eval_shape(
    ...   optax_sm3.sparse_value_and_grad(loss), params, jnp.array([0])
    ... )
    >>> state = opt.init(params, grads_like)
    >>> for ids in (jnp.array([3]), jnp.array([4])):
    ...   _, grads = opt.value_and_grad(loss)(params, state, ids)
    ...   params, state = opt.step(params, grads, state)
    ...   print(params["table"][3], params["table"][4], params["w"])
    [1. 1.] [1. 1.] 2.0
    [0.9 0.9] [0.9 0.9] 1.8
  """
  if not isinstance(opt, SparseTables):
    raise TypeError(
      "sparse_multi_steps wraps an optax_sm3.sparse_tables(...) optimizer, got "
      f"{type(opt).__name__}; for an optax transformation use optax.MultiSteps"
    )
  every_k = check_every_k(every_k_schedule)
  return SparseMultiSteps(
    init=functools.partial(_init, opt, every_k),
    step=functools.partial(_step, opt, every_k),
    sync=functools.partial(_sync, opt),
    value_and_grad=functools.partial(_value_and_grad, opt),
    every_k_schedule=every_k,
  )
