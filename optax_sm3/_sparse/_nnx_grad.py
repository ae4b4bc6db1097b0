"""Flax NNX: ``value_and_grad`` with row-sparse gradients for SparseEmbed tables.

The NNX form of :func:`optax_sm3.sparse_value_and_grad`: the lookups of
every :class:`~optax_sm3.nnx.SparseEmbed` are found in an abstract pass
(:mod:`optax_sm3._sparse._capture`), then the loss is differentiated with
``nnx.value_and_grad``, the tables' gradients captured as rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

from optax_sm3._sparse import _capture, _grad, _nnx


def _in_paths(paths: frozenset, path: Any, value: Any) -> bool:
  """An ``nnx`` filter: whether ``path`` is one of ``paths``."""
  del value
  return tuple(path) in paths


def _value_at(
  f: Callable[..., Any],
  has_aux: bool,
  args: tuple,
  splits: dict,
  layouts: dict,
  values: list,
) -> Any:
  """``f``'s value with the tables of ``args`` replaced by ``values``.

  ``splits`` holds each graph argument's ``nnx.split`` (graphdef, tables,
  rest), ``layouts`` its tables' ``(treedef, number of leaves)``.
  """
  new, start = list(args), 0
  for i, (graphdef, _, rest) in splits.items():
    treedef, n = layouts[i]
    tables = jax.tree.unflatten(treedef, values[start : start + n])
    start += n
    # Fresh variables: the loss may mutate state (lifted transforms do).
    new[i] = nnx.merge(graphdef, tables, rest, copy=True)
  out = f(*new)
  return out[0] if has_aux else out


def _differentiated(
  f: Callable[..., Any],
  has_aux: bool,
  plan: _capture.Plan,
  dense: list[tuple[int, tuple]],
  *inner_args: Any,
) -> tuple[Any, Any]:
  """``f(*model_args)`` in the differentiated pass; the last argument: slots.

  The tables of ``dense`` (``(argument, path)``, read other than by lookups)
  hold their current value while ``f`` runs (differentiated as the stored
  one), then the stored one again: the optimizer may store rows behind.
  """
  *model_args, slots = inner_args
  restore = []
  for i, path in dense:
    module = _nnx.tables_of(model_args[i])[path][0]
    if module.sparse_rows is not None and module.sparse_rows.rule.lazy:
      stored = module.embedding[...]
      state = nnx.as_pure(module.sparse_state)
      module.embedding[...] = _grad.synced_table(module.sparse_rows.sync, state, stored)
      restore.append((module.embedding, stored))
  with _capture.differentiating(plan, slots):
    out = f(*model_args)
  for variable, stored in restore:
    variable[...] = stored
  return out if has_aux else (out, None)


def _dense_params(i: int, sparse_keys: set) -> Any:
  """The ``nnx.Param`` filter of argument ``i`` without its sparse tables."""
  skip = frozenset(path for (j, path) in sparse_keys if j == i)
  return nnx.All(nnx.Param, nnx.Not(functools.partial(_in_paths, skip)))


def _with_sparse(
  grads: nnx.State, i: int, sparse_keys: set, by_key: dict, tables: dict
) -> nnx.State:
  """Argument ``i``'s ``grads`` with a SparseGrad at each of its sparse tables."""
  flat = list(nnx.to_flat_state(grads))
  for j, path in sorted(sparse_keys):
    if j != i:
      continue
    grad = by_key.get((i, path))
    if grad is None:  # Not looked up: no rows.
      table = tables[path][0].embedding
      grad = _capture.empty_grad(table.shape, table.dtype)
    flat.append((path, nnx.Param(grad)))
  return nnx.from_flat_state(flat)


def value_and_grad(
  # Any: the loss is the caller's function, of any arguments and value.
  f: Callable[..., Any],
  argnums: int | Sequence[int] = 0,
  *,
  has_aux: bool = False,
) -> Callable[..., tuple[Any, nnx.State | tuple[nnx.State, ...]]]:
  """``nnx.value_and_grad`` with row-sparse gradients for SparseEmbed tables.

  The gradient of every ``nnx.Param`` is what ``nnx.value_and_grad`` gives,
  except the ``embedding`` of a :class:`SparseEmbed` that ``f`` reads only
  by calling the module: its entry holds a :class:`SparseGrad`
  ``(indices, row_grads)`` of every lookup in ``f`` (any number of calls,
  through any SparseEmbed that shares the table; repeats kept, an optimizer
  sums them), and no table-sized array is formed. Calls may sit under
  ``jax.jit`` / ``nnx.jit``, ``jax.checkpoint`` / ``nnx.remat`` and
  ``jax.vmap`` / ``nnx.vmap`` (any nesting) inside ``f``. A table that ``f``
  also reads another way (``attend``, a penalty on ``embedding``, a vmap
  over stacked tables) gets its dense gradient instead, as ``nnx.grad``
  would give it; :class:`SparseOptimizer` handles both. A table not looked
  up at all gets an empty :class:`SparseGrad` (``k = 0``).

  ``f`` is traced twice (once abstractly, to find the lookups' shapes), so it
  must be a deterministic function of its arguments' shapes; it runs once.

  Args:
    f: the loss; its differentiated arguments are NNX modules (or arrays).
    argnums: which positional arguments to differentiate (an int or a tuple
      of ints), as ``nnx.value_and_grad``.
    has_aux: whether ``f`` returns ``(value, aux)``.

  Returns:
    A function of ``f``'s arguments returning ``(value, grads)`` (or
    ``((value, aux), grads)``); ``grads`` is an ``nnx.State`` per
    differentiated module (a tuple for a tuple ``argnums``).

  Raises:
    ValueError: at trace time, for a lookup inside ``nnx.scan`` /
      ``lax.scan``, ``fori_loop`` / ``while_loop`` or ``shard_map``: embed
      the ids of every step before the loop instead.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import optax_sm3.nnx
    >>> embed = optax_sm3.nnx.SparseEmbed(1000, 2, rngs=nnx.Rngs(0))
    >>> loss = lambda m: jnp.sum(m(jnp.array([[3, 5], [3, 9]])) ** 2)
    >>> _, grads = optax_sm3.nnx.value_and_grad(loss)(embed)
    >>> print(grads["embedding"].get_value().indices)
    [3 5 3 9]
  """

  @functools.wraps(f)
  def wrapper(*args):
    nums = _grad.normalize_argnums(argnums, len(args))
    graph_nums = [i for i in nums if nnx.graph.is_graph_node(args[i])]
    tables_of = {i: _nnx.tables_of(args[i]) for i in graph_nums}
    paths = {i: frozenset(tables_of[i]) for i in graph_nums}

    # 1. Abstract pass: the lookups, and which tables are also read densely.
    splits = {}
    for i in graph_nums:
      table_filter = functools.partial(_in_paths, paths[i])
      splits[i] = nnx.split(args[i], table_filter, ...)
    keys, primals, layouts = [], [], {}
    for i in graph_nums:
      leaves, treedef = jax.tree.flatten(splits[i][1])
      layouts[i] = (treedef, len(leaves))
      keys.extend((i, tuple(path)) for path, _ in nnx.to_flat_state(splits[i][1]))
      primals.extend(leaves)

    traced = functools.partial(_value_at, f, has_aux, args, splits, layouts)
    plan = _capture.plan(traced, primals)
    dense = {keys[j] for j in plan.dense}
    sparse_keys = {key for i in graph_nums for key in ((i, p) for p in paths[i])}
    sparse_keys -= dense
    slots = _capture.slots(plan)

    # 2. Differentiated pass, through nnx.value_and_grad.
    dense_tables = sorted(
      key for i in graph_nums for key in ((i, p) for p in paths[i]) if key in dense
    )
    inner = functools.partial(_differentiated, f, has_aux, plan, dense_tables)
    diff_nums = [
      nnx.DiffState(i, _dense_params(i, sparse_keys)) if i in paths else i for i in nums
    ]
    (value, aux), grads = nnx.value_and_grad(
      inner, argnums=(*diff_nums, len(args)), has_aux=True
    )(*args, slots)
    *grads, slot_grads = grads
    by_leaf = _capture.assemble(plan, slot_grads, lambda j: primals[j].shape[0])
    by_key = {keys[j]: g for j, g in by_leaf.items()}
    out = [
      _with_sparse(g, i, sparse_keys, by_key, tables_of[i]) if i in paths else g
      for i, g in zip(nums, grads, strict=True)
    ]
    grads = out[0] if isinstance(argnums, int) else tuple(out)
    return ((value, aux) if has_aux else value), grads

  return wrapper


def grad(
  # Any: the caller's loss; `grads`, or `(grads, aux)` with its own aux.
  f: Callable[..., Any],
  argnums: int | Sequence[int] = 0,
  *,
  has_aux: bool = False,
) -> Callable[..., Any]:
  """:func:`value_and_grad` without the value: ``grads`` (or ``(grads, aux)``).

  Args:
    f: the loss.
    argnums: as :func:`value_and_grad`.
    has_aux: as :func:`value_and_grad`.

  Returns:
    A function returning ``grads`` (or ``(grads, aux)`` with ``has_aux``).
  """
  fn = value_and_grad(f, argnums, has_aux=has_aux)

  @functools.wraps(f)
  def wrapper(*args):
    value, grads = fn(*args)
    return (grads, value[1]) if has_aux else grads

  return wrapper
