"""Gradients of embedding lookups as ``(indices, row gradients)``.

The gradient of ``jnp.take(table, ids, axis=0)`` is a table-sized array that
is zero outside the looked-up rows. The helpers here never form it: a lookup
made inside them returns ``stop_gradient(rows) + perturbation``, with a zero
*row perturbation* of the rows' shape, and the helper differentiates with
respect to the perturbations. The gradient of a perturbation is the gradient
of the rows it was added to, so each table's gradient comes out as the
looked-up ``indices`` and one row gradient per index (a :class:`SparseGrad`),
in ``O(k * D)`` memory for ``k`` looked-up rows of ``D`` entries.

Two traces of the loss make this work:

1. an abstract one (``jax.make_jaxpr``, no FLOPs) that records every lookup
   (which table, the shapes of its ids and rows), so that the perturbations
   can be made with the right shapes, and that checks whether anything
   *else* in the loss reads a table (``x @ table.T``, a penalty on the whole
   table): the forward-mode tangent of such a table reaches the output. The
   helper then differentiates that table densely, as ``jax.grad`` would,
   rather than silently drop the other use's gradient;
2. the differentiated one, which adds the perturbations.

The same table may be looked up any number of times in one loss (two
towers, context windows): its lookups are concatenated, and repeated indices
stay repeated (optimizers sum them). This module is framework-free: the NNX
and linen layers key lookups by module, :func:`sparse_lookup` by the leaf of
the differentiated argument that holds the table.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_sm3._sparse_types import SparseGrad


class _Call(NamedTuple):
  """One lookup seen by the abstract trace."""

  key: Hashable  # Which table (the layer's choice of key).
  ids_shape: tuple[int, ...]  # Shape of the ids as given.
  rows: jax.ShapeDtypeStruct  # Rows returned: ids_shape + table.shape[1:].


class _Recording:
  """Context of the abstract trace: records lookups, keeps tables constant."""

  def __init__(self, resolve: Callable[[Any], Hashable | None], reader=None):
    self.resolve = resolve  # table handle -> key (None: not a tracked table).
    self.reader = reader  # key -> read_rows to use instead (None: the caller's).
    self.syncer = None  # key -> (table -> current table), or None.
    self.calls: list[_Call] = []

  def gather(self, key, table, ids, read_rows):
    rows = read_rows(jax.lax.stop_gradient(table), ids)
    self.calls.append(
      _Call(key, tuple(ids.shape), jax.ShapeDtypeStruct(rows.shape, rows.dtype))
    )
    return rows


class _Differentiating:
  """Context of the differentiated trace: adds the row perturbations."""

  def __init__(
    self,
    resolve: Callable[[Any], Hashable | None],
    calls: Sequence[_Call],
    dense: frozenset,
    perturbations: dict[int, jax.Array],
    reader=None,
  ):
    self.resolve = resolve
    self.reader = reader
    self.syncer = None
    self.calls = calls
    self.dense = dense  # Keys of tables also read outside lookups.
    self.perturbations = perturbations  # call number -> zeros of its rows.
    self.ids: dict[int, jax.Array] = {}
    self.count = 0

  def gather(self, key, table, ids, read_rows):
    number = self.count
    self.count += 1
    if number >= len(self.calls) or self.calls[number][:2] != (key, tuple(ids.shape)):
      raise RuntimeError(
        "the loss looked up embedding tables differently in its two traces "
        f"(lookup {number}); the loss must be a deterministic function of its "
        "arguments' shapes"
      )
    if key in self.dense:
      return read_rows(table, ids)  # Differentiated densely, as jax.grad would.
    self.ids[number] = ids
    # The table is held constant: its cotangent would be table-sized.
    return read_rows(jax.lax.stop_gradient(table), ids) + self.perturbations[number]


_LOCAL = threading.local()


def _stack() -> list:
  if not hasattr(_LOCAL, "stack"):
    _LOCAL.stack = []
  return _LOCAL.stack


@contextlib.contextmanager
def active(context):
  """Makes ``context`` the one lookups consult, for the ``with`` block."""
  _stack().append(context)
  try:
    yield context
  finally:
    _stack().pop()


def current():
  """The innermost active context, or ``None``."""
  stack = _stack()
  return stack[-1] if stack else None


def check_ids(ids: Any, num_rows: int, name: str = "ids") -> jax.Array:
  """``ids`` as an integer array; concrete ids must lie in ``[0, num_rows)``."""
  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"`{name}` must be integers, got dtype {ids.dtype}")
  if ids.size and not isinstance(ids, jax.core.Tracer):
    values = np.asarray(ids)
    if values.min() < 0 or values.max() >= num_rows:
      raise ValueError(
        f"`{name}` must be in [0, {num_rows}) for a table of {num_rows} rows, "
        f"got values in [{values.min()}, {values.max()}]"
      )
  return ids


def gather(
  handle: Any,
  table: jax.Array,
  ids: jax.Array,
  read_rows: Callable[[jax.Array, jax.Array], jax.Array],
):
  """``read_rows(table, ids)``, routed through the active context.

  Args:
    handle: what identifies the table to the active context (a module, a
      leaf of the differentiated argument).
    table: the table (passed to ``read_rows``, under ``stop_gradient`` when
      the lookup is made sparse).
    ids: integer ids of any shape.
    read_rows: ``(table, ids) -> rows`` of shape ``ids.shape +
      table.shape[1:]``; it must read ``table`` only through its argument.

  Returns:
    The rows; inside a gradient helper, the rows plus the lookup's
    perturbation (differentiable), the table itself held constant.
  """
  context = current()
  key = None if context is None else context.resolve(handle)
  if key is None:
    return read_rows(table, ids)
  if context.reader is not None:
    read_rows = context.reader(key) or read_rows
  return context.gather(key, table, ids, read_rows)


def current_table(table: jax.Array) -> jax.Array:
  """The whole ``table`` as the optimizer holds it now, for dense reads.

  Inside a helper that reads through an optimizer state (and whose state
  may leave untouched rows stale), the synced table, differentiated as
  ``table``; elsewhere ``table`` itself.
  """
  context = current()
  key = None if context is None else context.resolve(table)
  if key is None or context.syncer is None:
    return table
  sync = context.syncer(key)
  return table if sync is None else sync(table)


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
  rows = value_of_first(rows, jnp.take(table, flat, axis=0))
  return rows.reshape(ids.shape + table.shape[1:])


def unused_tangents(
  fun: Callable[[Any], Any], primals: Sequence[jax.Array]
) -> list[bool]:
  """Whether the output of ``fun(primals)`` is independent of each primal.

  Read from the jaxpr of ``jax.jvp`` (no FLOPs): a primal whose tangent input
  no equation uses cannot change the output to first order. A tangent that
  enters a nested ``jit`` counts as used (conservative).
  """
  primals = list(primals)
  if not primals:
    return []

  def probe(values, tangents):
    return jax.jvp(fun, (values,), (tangents,))

  jaxpr = jax.make_jaxpr(probe)(primals, primals).jaxpr
  tangents = jaxpr.invars[len(jaxpr.invars) - len(primals) :]
  used = set()
  for eqn in jaxpr.eqns:
    used.update(id(v) for v in eqn.invars)
  used.update(id(v) for v in jaxpr.outvars)
  return [id(v) not in used for v in tangents]


def assemble(
  calls: Sequence[_Call], ids: dict[int, jax.Array], grads: dict[int, jax.Array]
) -> dict[Hashable, SparseGrad]:
  """Concatenates each table's lookups into one :class:`SparseGrad`."""
  by_key: dict[Hashable, tuple[list, list]] = {}
  for number, call in enumerate(calls):
    if number not in grads:
      continue
    row_shape = call.rows.shape[len(call.ids_shape) :]
    pair = by_key.setdefault(call.key, ([], []))
    pair[0].append(ids[number].reshape(-1).astype(jnp.int32))
    pair[1].append(grads[number].reshape((-1, *row_shape)))
  return {
    key: SparseGrad(jnp.concatenate(i), jnp.concatenate(g))
    for key, (i, g) in by_key.items()
  }


def perturbations(calls: Sequence[_Call], dense: frozenset) -> dict[int, jax.Array]:
  """Zero row perturbations for every lookup of a table not read densely."""
  return {
    number: jnp.zeros(call.rows.shape, call.rows.dtype)
    for number, call in enumerate(calls)
    if call.key not in dense
  }


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
  :func:`sparse_value_and_grad` it is exactly ``jnp.take(table, ids,
  axis=0)``; inside, where ``table`` is a leaf of a differentiated argument,
  the table's gradient is returned as a :class:`SparseGrad` and no
  table-sized array is formed.

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
  ids = check_ids(ids, table.shape[0])
  return gather(table, table, ids, lambda t, i: jnp.take(t, i, axis=0))


def _leaf_resolver(leaves_by_id: dict[int, Any]):
  return lambda handle: leaves_by_id.get(id(handle))


def sparse_value_and_grad(
  fun: Callable[..., Any], argnums: int | Sequence[int] = 0, *, has_aux: bool = False
) -> Callable[..., Any]:
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

  Raises:
    ValueError: if one array object is passed at two leaves and looked up
      (its gradient could not be attributed).
  """
  return _value_and_grad(fun, argnums, has_aux, None)


def _value_and_grad(
  fun, argnums, has_aux, reader, known_tables: frozenset = frozenset(), syncer=None
) -> Callable[..., Any]:
  """:func:`sparse_value_and_grad`; ``reader`` maps a table's leaf position to
  its ``read_rows``; ``known_tables`` are leaf positions that are tables even
  when not looked up (they get an empty :class:`SparseGrad` then)."""

  @functools.wraps(fun)
  def wrapper(*args):
    nums = normalize_argnums(argnums, len(args))
    flat, treedef = jax.tree.flatten([args[i] for i in nums])

    def with_leaves(leaves):
      new = list(args)
      for i, value in zip(nums, jax.tree.unflatten(treedef, leaves), strict=True):
        new[i] = value
      return new

    def resolver(leaves):
      seen: dict[int, Any] = {}
      duplicated = set()
      for position, leaf in enumerate(leaves):
        if id(leaf) in seen:
          duplicated.add(id(leaf))
        seen[id(leaf)] = position

      def resolve(handle):
        if id(handle) in duplicated:
          raise ValueError(
            "one array object is passed at two leaves of the differentiated "
            "arguments and looked up with sparse_lookup; pass distinct arrays"
          )
        return seen.get(id(handle))

      return resolve

    float_positions = [
      p
      for p, leaf in enumerate(flat)
      if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    recording = _Recording(None, reader)
    recording.syncer = syncer

    def traced(values):
      leaves = list(flat)
      for p, v in zip(float_positions, values, strict=True):
        leaves[p] = v
      recording.resolve = resolver(leaves)
      recording.calls.clear()
      with active(recording):
        out = fun(*with_leaves(leaves))
      return out[0] if has_aux else out

    unused = unused_tangents(traced, [flat[p] for p in float_positions])
    calls = list(recording.calls)
    tables = {call.key for call in calls} | set(known_tables)
    dense = frozenset(
      p
      for p, free in zip(float_positions, unused, strict=True)
      if not free and p in tables
    )
    sparse = sorted(tables - dense)
    perts = perturbations(calls, dense)
    diff_positions = [p for p in range(len(flat)) if p not in sparse]

    def differentiated(diff_values, perts):
      leaves = list(flat)
      for p, v in zip(diff_positions, diff_values, strict=True):
        leaves[p] = v
      context = _Differentiating(resolver(leaves), calls, dense, perts, reader)
      context.syncer = syncer
      with active(context):
        out = fun(*with_leaves(leaves))
      value, aux = out if has_aux else (out, None)
      return value, (aux, context.ids)

    (value, (aux, ids)), (diff_grads, pert_grads) = jax.value_and_grad(
      differentiated, argnums=(0, 1), has_aux=True
    )([flat[p] for p in diff_positions], perts)
    by_table = assemble(calls, ids, pert_grads)
    grads = [None] * len(flat)
    for p, g in zip(diff_positions, diff_grads, strict=True):
      grads[p] = g
    for p in sparse:
      if p in by_table:
        grads[p] = by_table[p]
      else:  # A table not looked up: no rows.
        shape, dtype = jnp.shape(flat[p]), jnp.result_type(flat[p])
        grads[p] = SparseGrad(
          jnp.zeros((0,), jnp.int32), jnp.zeros((0, *shape[1:]), dtype)
        )
    grads = jax.tree.unflatten(treedef, grads)
    grads = grads[0] if isinstance(argnums, int) else tuple(grads)
    return ((value, aux) if has_aux else value), grads

  return wrapper
