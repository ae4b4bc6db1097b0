"""The row-sparse gradient of an embedding table, and its validation."""

from __future__ import annotations

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The marker is a PRNG-key-typed scalar: JAX's arithmetic rejects key dtypes,
# so elementwise arithmetic over a gradient tree (jax.tree.map(jnp.add, g1,
# g2), optax.tree.add, lax.psum, g / n) fails on it at the line that would
# have added or scaled the indices; copies, jit, vmap, scan, sharding and
# orbax pass it through. One fixed impl, whatever jax_default_prng_impl is.
_MARKER_IMPL = "threefry2x32"

_HOW_TO_SUM = (
  "sum SparseGrads with optax_sm3.sparse_grad_sum (or `g1 + g2`, which "
  "concatenates) and scale them with optax_sm3.sparse_grad_mean or `g * s`"
)


@functools.cache
def _marker() -> jax.Array:
  # One concrete (uncommitted) array, made once even inside a trace: an
  # eager jax.random.key costs ~75 us, and the value never matters.
  with jax.ensure_compile_time_eval():
    return jax.random.key(0, impl=_MARKER_IMPL)


class SparseGrad:
  """The gradient of an embedding table, as the looked-up rows' gradients.

  Equal to the dense gradient ``jnp.zeros_like(table).at[indices].add(
  row_grads)``; pass it to ``optax_sm3.sparse_rows(...).update(indices,
  row_grads, state, table)`` (``update(*grad, state, table)``).

  A pytree (a jit argument and output, carried by ``vmap``, ``scan`` and
  orbax) of three leaves: ``indices``, ``row_grads`` and a marker, a scalar
  of a PRNG key dtype. The marker makes elementwise arithmetic over a tree
  of gradients fail loudly rather than add the indices: ``jax.tree.map(
  jnp.add, g1, g2)`` raises ``TypeError: add does not accept dtype
  key<fry>``. Sum gradients with :func:`optax_sm3.sparse_grad_sum` (whole
  trees) or ``g1 + g2`` (the concatenation, whose dense form is the sum of
  theirs), scale them with ``g * s`` or :func:`optax_sm3.sparse_grad_mean`.

  Attributes:
    indices: ``(k,)`` int32, the ids of every lookup of the table in the loss,
      flattened and concatenated in call order (repeats allowed).
    row_grads: ``(k, *table.shape[1:])`` in the table's dtype, the gradient of
      the loss with respect to each looked-up row.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_sm3
    >>> g1 = optax_sm3.SparseGrad(jnp.array([3, 5]), jnp.ones((2, 2)))
    >>> g2 = optax_sm3.SparseGrad(jnp.array([5]), jnp.ones((1, 2)))
    >>> total = g1 + g2
    >>> print(total.indices, total.row_grads[:, 0])
    [3 5 5] [1. 1. 1.]
    >>> try:
    ...   jnp.add(g1.marker, g2.marker)  # what jax.tree.map(jnp.add, g1, g2) does
    ... except TypeError:
    ...   print("TypeError")
    TypeError
  """

  __slots__ = ("indices", "marker", "row_grads")

  def __init__(
    self,
    indices: jax.Array | np.ndarray,
    row_grads: jax.Array | np.ndarray,
    marker: jax.Array | None = None,
  ):
    self.indices = indices  # (k,) int32: looked-up rows, repeats allowed.
    self.row_grads = row_grads  # (k, *table.shape[1:]): gradient per row.
    # A key-typed scalar (see the module's comment); made here when omitted.
    self.marker = _marker() if marker is None else marker

  def __iter__(self):
    # `indices, row_grads = grad`, as when this was a NamedTuple.
    return iter((self.indices, self.row_grads))

  def __repr__(self) -> str:
    return f"SparseGrad(indices={self.indices!r}, row_grads={self.row_grads!r})"

  def __add__(self, other: object) -> SparseGrad:
    """The concatenation: its dense gradient is the sum of the two."""
    if not isinstance(other, SparseGrad):
      return NotImplemented
    check_sparse_grad(self)
    check_sparse_grad(other)
    if jnp.shape(self.row_grads)[1:] != jnp.shape(other.row_grads)[1:]:
      raise ValueError(
        "cannot sum SparseGrads of rows of different shapes: "
        f"{jnp.shape(self.row_grads)[1:]} and {jnp.shape(other.row_grads)[1:]}"
      )
    dtype = jnp.result_type(self.row_grads, other.row_grads)
    return SparseGrad(
      jnp.concatenate([self.indices, other.indices]).astype(jnp.int32),
      jnp.concatenate([self.row_grads, other.row_grads]).astype(dtype),
      self.marker,
    )

  def __radd__(self, other: object) -> SparseGrad:
    # `sum([g1, g2])` starts from 0.
    if isinstance(other, int) and not isinstance(other, bool) and other == 0:
      return self
    return NotImplemented

  def _scaled(self, scale: Any, op: Any) -> SparseGrad:
    """``op(row_grads, scale)`` in ``row_grads``' dtype, for a scalar ``scale``."""
    if isinstance(scale, SparseGrad) or jnp.ndim(scale) != 0:
      return NotImplemented
    check_sparse_grad(self)
    row_grads = jnp.asarray(self.row_grads)
    return SparseGrad(
      self.indices, op(row_grads, scale).astype(row_grads.dtype), self.marker
    )

  def __mul__(self, scale: Any) -> SparseGrad:
    """``row_grads`` times a scalar: the dense gradient times it."""
    return self._scaled(scale, operator.mul)

  __rmul__ = __mul__

  def __truediv__(self, scale: Any) -> SparseGrad:
    """``row_grads`` divided by a scalar: the dense gradient divided by it."""
    return self._scaled(scale, operator.truediv)


def _flatten_with_keys(grad: SparseGrad):
  return (
    (
      (jax.tree_util.GetAttrKey("indices"), grad.indices),
      (jax.tree_util.GetAttrKey("row_grads"), grad.row_grads),
      (jax.tree_util.GetAttrKey("marker"), grad.marker),
    ),
    None,
  )


def _unflatten(_, children) -> SparseGrad:
  # No checks: JAX rebuilds pytrees with placeholders (None, object(),
  # ShapeDtypeStruct) as leaves, a None marker included.
  grad = object.__new__(SparseGrad)
  grad.indices, grad.row_grads, grad.marker = children
  return grad


jax.tree_util.register_pytree_with_keys(
  SparseGrad,
  _flatten_with_keys,
  _unflatten,
  flatten_func=lambda g: ((g.indices, g.row_grads, g.marker), None),
)


def is_sparse_grad(x: object) -> bool:
  """Whether ``x`` is a :class:`SparseGrad` (an ``is_leaf`` for tree maps)."""
  return isinstance(x, SparseGrad)


def _is_marker(x: object) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def check_sparse_grad(
  grad: object, row_shape: tuple[int, ...] | None = None, *, name: str = "the gradient"
) -> None:
  """Raises unless ``grad`` is a :class:`SparseGrad` an optimizer can apply.

  Static checks only (types, dtypes and shapes), so they hold under ``jit``:
  the marker is a key-typed array (elementwise arithmetic over a tree of
  gradients would have failed on it, or replaced it), ``indices`` are
  integers of shape ``(k,)`` and ``row_grads`` are floats of shape ``(k,
  *row_shape)``. Optimizers call it on every table's gradient.

  Args:
    grad: the value to check.
    row_shape: ``table.shape[1:]``, or ``None`` to skip that check.
    name: how the error messages name ``grad`` (e.g. its path).

  Raises:
    TypeError: for a non-SparseGrad, a missing or non-key marker, integer
      row gradients or non-integer indices (each a sign of arithmetic applied
      leaf by leaf: ``jax.tree.map(jnp.add, ...)``, ``g / n``).
    ValueError: for shapes that do not match.
  """
  if not isinstance(grad, SparseGrad):
    raise TypeError(f"{name} must be a SparseGrad, got {type(grad).__name__}")
  if not _is_marker(grad.marker):
    raise TypeError(
      f"{name} is a SparseGrad whose marker was replaced (by "
      f"{type(grad.marker).__name__} {getattr(grad.marker, 'dtype', '')}): it went "
      "through arithmetic leaf by leaf (jax.tree.map over its indices), which "
      f"does not sum or scale a SparseGrad; {_HOW_TO_SUM}"
    )
  indices, row_grads = grad.indices, grad.row_grads
  for part, value in (("indices", indices), ("row_grads", row_grads)):
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
      raise TypeError(f"{name}'s {part} must be an array, got {type(value).__name__}")
  if not jnp.issubdtype(jnp.result_type(indices), jnp.integer):
    raise TypeError(
      f"{name}'s indices must be integers, got dtype {jnp.result_type(indices)}; "
      f"indices change only by concatenation: {_HOW_TO_SUM}"
    )
  if not jnp.issubdtype(jnp.result_type(row_grads), jnp.inexact):
    raise TypeError(
      f"{name}'s row_grads must be floats, got dtype {jnp.result_type(row_grads)}"
    )
  if jnp.ndim(indices) != 1:
    raise ValueError(
      f"{name}'s indices must have shape (k,), got {tuple(jnp.shape(indices))}"
    )
  k = jnp.shape(indices)[0]
  if jnp.ndim(row_grads) < 1 or jnp.shape(row_grads)[0] != k:
    raise ValueError(
      f"{name} has {k} indices but row_grads of shape {tuple(jnp.shape(row_grads))}"
    )
  if row_shape is not None and tuple(jnp.shape(row_grads)[1:]) != tuple(row_shape):
    raise ValueError(
      f"{name}'s row_grads must have shape (k, *table.shape[1:]) = "
      f"{(k, *row_shape)}, got {tuple(jnp.shape(row_grads))}"
    )
