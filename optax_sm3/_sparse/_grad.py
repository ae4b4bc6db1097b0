"""Row-sparse gradients of embedding lookups in plain JAX.

:func:`sparse_lookup` is ``jnp.take(table, ids, axis=0)``; inside
:func:`sparse_value_and_grad` the table's gradient comes out as the
looked-up ``indices`` and one row gradient per index (a :class:`SparseGrad`),
in ``O(k * D)`` memory for ``k`` looked-up rows of ``D`` entries, and no
table-sized array is formed. The lookup may sit under ``jax.jit``,
``jax.checkpoint`` or ``jax.vmap`` (any nesting) inside the loss; how the
rows' gradients and ids are captured is :mod:`optax_sm3._sparse._capture`'s concern.

The same table may be looked up any number of times in one loss (two
towers, tied embeddings, context windows): its lookups are concatenated, and
repeated indices stay repeated (optimizers sum them). A table the loss also
reads another way (``x @ table.T``) gets its dense gradient, lookups
included, as ``jax.grad`` would give it.

Ids outside ``[0, V)`` raise a ``ValueError`` when they are concrete. Under
``jit`` (where they cannot be checked) they read as NaN rows, their gradient
is dropped (index ``-1`` in the :class:`SparseGrad`) and
:func:`optax_sm3.sparse_rows` skips them: lookup, gradient and update agree,
and a negative id never reads row ``V - 1``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_sm3._sparse import _capture, _ids
from optax_sm3._sparse._types import SparseGrad  # also re-exported


@jax.custom_jvp
def value_of_first(value: jax.Array, through: jax.Array) -> jax.Array:
  """``value``, differentiated as ``through`` (same shape): a straight-through."""
  del through
  return value


@value_of_first.defjvp
def _value_of_first_jvp(primals, tangents):
  return primals[0], tangents[1]


def current_rows(lookup, state: Any, table: jax.Array, ids: jax.Array) -> jax.Array:
  """``lookup(ids, state, table)`` (rows as the optimizer holds them now).

  The value is the optimizer's; the gradient reaches ``table`` as through
  ``jnp.take(table, ids, axis=0)`` (the rows are the table's, caught up), so
  a table differentiated densely gets the gradient of its current value.
  """
  flat = ids.reshape(-1)
  rows = lookup(flat, jax.lax.stop_gradient(state), jax.lax.stop_gradient(table))
  rows = value_of_first(rows, _ids.take_rows(table, flat))
  return rows.reshape(ids.shape + table.shape[1:])


def synced_table(sync, state: Any, table: jax.Array) -> jax.Array:
  """``sync(state, table)``'s table (every row as the optimizer holds it now).

  The value is the optimizer's; the gradient reaches ``table`` as through
  the identity, so a table read whole gets the gradient of its current value.
  """
  synced, _ = sync(jax.lax.stop_gradient(state), jax.lax.stop_gradient(table))
  return value_of_first(synced, table)


def normalize_argnums(argnums: int | Sequence[int], nargs: int) -> tuple[int, ...]:
  """``argnums`` as a tuple of non-negative ints below ``nargs``."""
  single = isinstance(argnums, int)
  values = (argnums,) if single else tuple(argnums)
  if not values or not all(
    isinstance(a, int) and not isinstance(a, bool) for a in values
  ):
    raise TypeError(
      f"`argnums` must be an int or a non-empty sequence of ints, got {argnums!r}"
    )
  out = []
  for a in values:
    if not -nargs <= a < nargs:
      raise ValueError(
        f"`argnums` entry {a} is out of range for {nargs} positional arguments"
      )
    out.append(a % nargs)
  if len(set(out)) != len(out):
    raise ValueError(f"`argnums` has repeated entries: {argnums!r}")
  return tuple(out)


# ---------------------------------------------------------------------------
# Plain JAX: sparse_lookup and sparse_value_and_grad.


def sparse_lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
  """``jnp.take(table, ids, axis=0)`` whose gradient comes out row-sparse.

  Use it in a loss in place of ``table[ids]``. Called outside
  :func:`sparse_value_and_grad` it is ``jnp.take(table, ids, axis=0)``
  (except that ids out of range read NaN rows under ``jit``, negative ones
  included); inside, where ``table`` is a leaf of a differentiated argument
  (passed in directly or through ``jax.jit``, ``jax.checkpoint``,
  ``jax.vmap`` and the like), the table's gradient is returned as a
  :class:`SparseGrad` and no table-sized array is formed.

  Args:
    table: an array of rank >= 1, rows first.
    ids: integer ids of any shape, in ``[0, table.shape[0])``.

  Returns:
    The rows, of shape ``ids.shape + table.shape[1:]``.

  Raises:
    TypeError: for non-integer ``ids``.
    ValueError: for concrete ``ids`` out of range.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_sm3
    >>> params = {"table": jnp.ones((1000, 2)), "scale": jnp.asarray(2.0)}
    >>> def loss(params, ids):
    ...   rows = optax_sm3.sparse_lookup(params["table"], ids)
    ...   return params["scale"] * jnp.sum(rows)
    >>> value, grads = optax_sm3.sparse_value_and_grad(loss)(params, jnp.array([4, 4, 9]))
    >>> print(value, grads["scale"], grads["table"].indices)
    12.0 6.0 [4 4 9]
    >>> print(grads["table"].row_grads.shape)
    (3, 2)
  """
  table = jnp.asarray(table) if not isinstance(table, jax.Array) else table
  if table.ndim < 1:
    raise ValueError(
      f"`table` must have rank >= 1 (rows first), got shape {table.shape}"
    )
  ids = _ids.check_ids(ids, table.shape[0])
  return _capture.read_rows(table, ids, _ids.take_rows)


def current_table(table: jax.Array) -> jax.Array:
  """The whole ``table`` as the optimizer holds it now, for dense reads.

  Inside a helper that reads through an optimizer state (whose untouched
  rows may be stale), the synced table, differentiated as ``table``;
  elsewhere ``table`` itself. The table's gradient is dense.
  """
  return _capture.read_table(table, lambda t: t)


def sparse_value_and_grad(
  # Any: the loss is the caller's function, of any arguments and value.
  fun: Callable[..., Any],
  argnums: int | Sequence[int] = 0,
  *,
  has_aux: bool = False,
) -> Callable[..., tuple[Any, optax.Updates]]:
  """``jax.value_and_grad`` with row-sparse gradients for looked-up tables.

  Every leaf of the differentiated arguments gets the gradient
  ``jax.value_and_grad`` would give it, except a table that the loss reads
  only through :func:`sparse_lookup`: its gradient is a :class:`SparseGrad`
  ``(indices, row_grads)`` and no table-sized array is formed. A table that
  the loss also reads another way (``x @ table.T``) gets its dense gradient,
  lookups included.

  Args:
    fun: the loss, ``fun(*args) -> scalar`` (or ``(scalar, aux)``).
    argnums: which positional arguments to differentiate (int or tuple).
    has_aux: whether ``fun`` returns ``(value, aux)``.

  Returns:
    A function of ``fun``'s arguments returning ``(value, grads)`` (or
    ``((value, aux), grads)``), ``grads`` shaped as ``jax.value_and_grad``'s
    with :class:`SparseGrad` nodes in place of sparse tables' leaves.

  Lookups may sit under ``jax.jit``, ``jax.checkpoint`` and ``jax.vmap``
  (any nesting, any ``in_axes``) inside ``fun``; a table batched by the
  ``vmap`` itself (a stacked ensemble of tables) gets its dense gradient.

  Raises:
    ValueError: at trace time, for a lookup inside ``lax.scan``,
      ``while_loop`` / ``fori_loop``, ``shard_map`` or ``pmap`` (each
      iteration's rows would share one gradient slot): look the rows up
      before the loop.
  """
  return routed_value_and_grad(fun, argnums, has_aux)


def routed_value_and_grad(
  fun: Callable[..., Any],
  argnums: int | Sequence[int],
  has_aux: bool,
  reader: Callable[[int], Any] | None = None,
  known_tables: frozenset = frozenset(),
  syncer: Callable[[int], Any] | None = None,
) -> Callable[..., Any]:
  """:func:`sparse_value_and_grad`, each table's reads routed by its leaf.

  Args:
    fun: as :func:`sparse_value_and_grad`.
    argnums: as :func:`sparse_value_and_grad`.
    has_aux: as :func:`sparse_value_and_grad`.
    reader: maps a table's leaf position (in the flattened differentiated
      arguments) to the ``read_rows(table, ids)`` its lookups use, or to
      ``None`` for the default; ``None`` for the default everywhere.
    known_tables: leaf positions that are tables even when not looked up:
      an empty :class:`SparseGrad` when the loss does not read them, their
      dense gradient when it reads them other than by lookups.
    syncer: as ``reader``, for whole-table reads: ``table -> current table``
      (differentiated as ``table``). A table the loss reads other than by
      lookups is replaced by its current value before ``fun`` runs.
  """

  @functools.wraps(fun)
  def wrapper(*args):
    nums = normalize_argnums(argnums, len(args))
    flat, treedef = jax.tree.flatten([args[i] for i in nums])
    flat = [jnp.asarray(x) if isinstance(x, np.ndarray) else x for x in flat]

    def with_leaves(leaves):
      new = list(args)
      for i, value in zip(nums, jax.tree.unflatten(treedef, leaves), strict=True):
        new[i] = value
      return new

    floats = [
      p
      for p, leaf in enumerate(flat)
      if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]

    def traced(values):
      leaves = list(flat)
      for p, v in zip(floats, values, strict=True):
        leaves[p] = v
      out = fun(*with_leaves(leaves))
      return out[0] if has_aux else out

    plan = _capture.plan(traced, [flat[p] for p in floats])
    tables = {floats[j] for j in plan.tables} | set(known_tables)
    dense = {floats[j] for j in plan.dense}
    sparse = sorted(tables - dense)
    # A table read other than by lookups is differentiated densely, from its
    # current value (the optimizer may store rows behind).
    current = {p: syncer(p) for p in tables & dense} if syncer else {}
    slots = _capture.slots(plan)
    diff = [p for p in range(len(flat)) if p not in sparse]
    by_float = lambda f: None if f is None else (lambda j: f(floats[j]))

    def differentiated(diff_values, slots):
      leaves = list(flat)
      for p, v in zip(diff, diff_values, strict=True):
        leaves[p] = current[p](v) if current.get(p) else v
      with _capture.differentiating(plan, slots, by_float(reader), by_float(syncer)):
        out = fun(*with_leaves(leaves))
      return out if has_aux else (out, None)

    (value, aux), (diff_grads, slot_grads) = jax.value_and_grad(
      differentiated, argnums=(0, 1), has_aux=True
    )([flat[p] for p in diff], slots)
    by_leaf = _capture.assemble(
      plan, slot_grads, lambda j: jnp.shape(flat[floats[j]])[0]
    )
    leaf_grads: list[jax.Array | SparseGrad | None] = [None] * len(flat)
    for p, g in zip(diff, diff_grads, strict=True):
      leaf_grads[p] = g
    for p in sparse:
      j = floats.index(p)
      if j in by_leaf:
        leaf_grads[p] = by_leaf[j]
      else:  # A table the loss does not read: its gradient is zero.
        leaf_grads[p] = _capture.empty_grad(
          jnp.shape(flat[p]), jnp.result_type(flat[p])
        )
    grads = jax.tree.unflatten(treedef, leaf_grads)
    grads = grads[0] if isinstance(argnums, int) else tuple(grads)
    return ((value, aux) if has_aux else value), grads

  return wrapper
