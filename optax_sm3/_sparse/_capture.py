"""Capturing embedding lookups as row-sparse gradients, under any JAX transform.

A lookup made inside a gradient helper returns ``rows + P[slot]``, with ``P``
a zero *row perturbation* made outside every transform and ``slot`` the
lookup's position in the whole batch of ids (``vmap`` levels included). The
gradient of ``P`` is then exactly the looked-up rows' gradients, and the ids
leave through the backward pass (a ``custom_vjp`` whose cotangent is the
ids, encoded in float32 chunks). Nothing is stored from inside a trace, so a
lookup may sit under ``jax.jit``, ``jax.checkpoint``, ``jax.vmap`` (any
nesting, any ``in_axes``) or their Flax and Equinox counterparts.

The helper traces the loss twice:

1. abstractly (``jax.make_jaxpr`` of its ``jax.jvp``, no FLOPs). Every lookup
   binds a *marker* (a ``custom_vmap`` function of the table and the ids),
   and the jaxpr says, for each marker, which differentiated leaf its table
   is (by data flow through ``jit``, ``checkpoint``, ``cond``, ...), the
   whole batch of ids it sees (the marker's ``vmap`` rule re-binds it with
   the batched ids, so the outermost one has them all) and the loops around
   it. Dead-code elimination of the tangents tells which tables the loss also
   reads another way (``x @ table.T``): those are differentiated densely, as
   ``jax.grad`` would;
2. the differentiated trace, which adds the perturbations.

Inner ``jit``s are traced anew in each pass (``jax.jit`` caches a trace by
its arguments' types, and a cached trace would hold no perturbation): the
passes run under an ``xla_metadata`` context of their own, which is part of
``jit``'s cache key.

A lookup inside ``lax.scan``, ``while_loop`` (``fori_loop``), ``shard_map``
or ``pmap`` would reuse one slot on every iteration or device; it raises a
``ValueError`` at trace time that says how to restructure.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend.core as jex
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.experimental.xla_metadata import set_xla_metadata

from optax_sm3._sparse._ids import take_rows as plain_rows
from optax_sm3._sparse._types import SparseGrad

# jaxpr primitives that run their body more than once per evaluation, with
# what to call them in an error.
_LOOPS = {
  "scan": "jax.lax.scan (or lax.map, fori_loop with static bounds, nnx.scan, nn.scan)",
  "while": "jax.lax.while_loop (or fori_loop)",
  "shard_map": "shard_map (or jax.pmap, built on it)",
  "xla_pmap": "jax.pmap",
}
# Primitives whose output is their (first) input.
_FORWARDING = frozenset({"stop_gradient", "copy", "copy_p", "optimization_barrier"})
_CHUNK_BITS = 16


class Call(NamedTuple):
  """One routed read of a table, as the abstract trace saw it."""

  kind: str  # "rows" (a lookup) or "table" (a whole-table read).
  ids_shape: tuple[int, ...]  # Ids at the lookup's own level (() for "table").
  rows: jax.ShapeDtypeStruct  # What the read returned, at its own level.


class Found(NamedTuple):
  """What the jaxpr says about one call."""

  leaf: int | None  # Which differentiated leaf the table is (None: none).
  size: int  # Ids in the whole batch (every vmap level).
  loops: tuple[str, ...]  # Enclosing primitives that iterate.
  batched_table: bool  # The table itself is batched by a vmap (ensembles).
  nested: bool  # Inside some call primitive (jit, checkpoint, cond, ...).


class Plan(NamedTuple):
  """The result of the abstract pass."""

  calls: tuple[Call, ...]
  found: tuple[Found, ...]
  tables: frozenset  # Leaves looked up (sparse or dense).
  dense: frozenset  # Leaves read other than by lookups (looked up or not).


_LOCAL = threading.local()
_PASSES = itertools.count()


def _stack() -> list:
  if not hasattr(_LOCAL, "stack"):
    _LOCAL.stack = []
  return _LOCAL.stack


@contextlib.contextmanager
def _active(context, fresh: bool = True):
  """Makes ``context`` the one reads consult, for the ``with`` block.

  With ``fresh``, the block runs under an ``xla_metadata`` value of its own,
  so that every inner ``jit`` is traced anew (a cached trace would hold
  another pass's markers or perturbations). The value is part of the cache
  key of eager operations too, so a pass with no read inside a nested
  transform uses one fixed value instead (its eager operations compile once).
  """
  _stack().append(context)
  value = str(next(_PASSES)) if fresh else type(context).__name__
  try:
    with set_xla_metadata(optax_sm3_capture=value):
      yield context
  finally:
    _stack().pop()


def _current():
  stack = _stack()
  return stack[-1] if stack else None


def _marker(recording: Any, number: int):
  """A ``custom_vmap`` identity-shaped function that names lookup ``number``."""

  @custom_vmap
  def marker(table, ids):
    del table
    return jnp.zeros(ids.shape, jnp.int32)

  def rule(axis_size, in_batched, table, ids):
    if in_batched[0]:
      recording.batched_tables.add(number)
    if not in_batched[1]:
      ids = jnp.broadcast_to(ids, (axis_size, *ids.shape))
    # Bound again one level out: the outermost binding sees every id.
    return marker(table, ids), True

  marker.def_vmap(rule)
  recording.rules[rule] = number
  return marker


@custom_vmap
def _position(ids):
  """Each id's position in the whole batch of ids (every vmap level)."""
  return jnp.arange(math.prod(ids.shape), dtype=jnp.int32).reshape(ids.shape)


@_position.def_vmap
def _position_rule(axis_size, in_batched, ids):
  del axis_size, in_batched
  return _position(ids), True


def _ids_dtype():
  """The dtype ids travel in (and come back as) through the id slots."""
  return jnp.int64 if jax.config.read("jax_enable_x64") else jnp.int32


def _chunks() -> int:
  return jnp.iinfo(_ids_dtype()).bits // _CHUNK_BITS


def _encode(ids: jax.Array) -> jax.Array:
  """``ids`` as float32 chunks of 16 bits (exact), on a new last axis.

  Ids of any integer dtype are encoded in :func:`_ids_dtype`, the slots'
  layout; one too large for it (a uint id at or above ``2**31``) comes back
  negative, out of range, as it is.
  """
  ids = ids.astype(_ids_dtype())
  parts = []
  for c in range(_chunks()):
    part = ids >> (c * _CHUNK_BITS)
    if c < _chunks() - 1:
      part = part & ((1 << _CHUNK_BITS) - 1)
    parts.append(part.astype(jnp.float32))
  return jnp.stack(parts, axis=-1)


def _decode(code: jax.Array, dtype) -> jax.Array:
  """Inverse of :func:`_encode` on ``(k, chunks)`` float32."""
  ids = jnp.zeros(code.shape[:1], dtype)
  for c in range(code.shape[1]):
    ids = ids + (jnp.round(code[:, c]).astype(dtype) << (c * _CHUNK_BITS))
  return ids


@jax.custom_vjp
def _emit(slot: jax.Array, code: jax.Array) -> jax.Array:
  """Zeros of ``slot.shape[:-1]``; the gradient of ``slot`` is ``code``."""
  del code
  return jnp.zeros(slot.shape[:-1], slot.dtype)


def _emit_fwd(slot, code):
  return _emit(slot, code), code


def _emit_bwd(code, cotangent):
  del cotangent
  return code, jnp.zeros_like(code)


_emit.defvjp(_emit_fwd, _emit_bwd)


def _as_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
  """``x`` of the ids' shape, broadcast over ``rows``' trailing axes."""
  extra = rows.ndim - x.ndim
  return x.reshape(x.shape + (1,) * extra).astype(rows.dtype)


class _Recording:
  """The abstract pass: binds a marker per read, tables held constant."""

  def __init__(self):
    self.calls: list[Call] = []
    self.rules: dict[Any, int] = {}
    self.batched_tables: set[int] = set()

  def rows(self, table, ids, read_rows):
    number = len(self.calls)
    held = jax.lax.stop_gradient(table)
    rows = read_rows(held, ids)
    where = _marker(self, number)(held, ids)
    self.calls.append(
      Call("rows", tuple(ids.shape), jax.ShapeDtypeStruct(rows.shape, rows.dtype))
    )
    # Used, so that no dead-code elimination drops the marker.
    return rows + _as_rows(where, rows)

  def table(self, table, current):
    number = len(self.calls)
    where = _marker(self, number)(
      jax.lax.stop_gradient(table), jnp.zeros((), jnp.int32)
    )
    self.calls.append(Call("table", (), jax.ShapeDtypeStruct(table.shape, table.dtype)))
    return current(table) + where.astype(table.dtype)


class _Differentiating:
  """The differentiated pass: sparse reads get their perturbation and slot."""

  def __init__(self, plan: Plan, slots: dict[int, Any], reader, syncer):
    self.plan = plan
    self.slots = slots  # call number -> (perturbation, id slot).
    self.reader = reader  # leaf -> read_rows, or None.
    self.syncer = syncer  # leaf -> (table -> current table), or None.
    self.count = 0

  def _next(self, kind, shape) -> tuple[int, Found]:
    number = self.count
    self.count += 1
    calls = self.plan.calls
    if number >= len(calls) or calls[number][:2] != (kind, shape):
      raise RuntimeError(
        "the loss read embedding tables differently in its two traces "
        f"(read {number}); it must be a deterministic function of its "
        "arguments' shapes"
      )
    return number, self.plan.found[number]

  def rows(self, table, ids, read_rows):
    number, found = self._next("rows", tuple(ids.shape))
    if found.leaf in self.plan.dense:
      # Differentiated as jax.grad would, from the table's value as given:
      # whoever holds the table's optimizer state has made that value
      # current (see routed_value_and_grad).
      return plain_rows(table, ids)
    if found.leaf is not None and self.reader is not None:
      read_rows = self.reader(found.leaf) or read_rows
    if number not in self.slots:
      return read_rows(table, ids)
    perturbation, slot = self.slots[number]
    rows = read_rows(jax.lax.stop_gradient(table), ids)
    if found.size == math.prod(ids.shape):
      # No vmap batches these ids: the slots have the lookup's own shape.
      own = perturbation.reshape(rows.shape)
      slot = slot.reshape(*ids.shape, slot.shape[-1])
    else:
      where = _position(ids)
      own = jnp.take(perturbation, where, axis=0)
      slot = jnp.take(slot, where, axis=0)
    return rows + own + _as_rows(_emit(slot, _encode(ids)), rows)

  def table(self, table, current):
    _, found = self._next("table", ())
    if found.leaf in self.plan.dense:
      return table  # Current already (see rows).
    if found.leaf is not None and self.syncer is not None:
      current = self.syncer(found.leaf) or current
    return current(table)


def read_rows(
  table: jax.Array,
  ids: jax.Array,
  read: Callable[[jax.Array, jax.Array], jax.Array],
) -> jax.Array:
  """``read(table, ids)``, made row-sparse inside a gradient helper.

  Args:
    table: the table (rows first).
    ids: integer ids of any shape.
    read: ``(table, ids) -> rows`` of shape ``ids.shape + table.shape[1:]``;
      it must read ``table`` only through its argument.

  Returns:
    The rows; inside a helper, with the table's gradient captured sparsely.
  """
  context = _current()
  if context is None:
    return read(table, ids)
  return context.rows(table, ids, read)


def read_table(table: jax.Array, current: Callable[[jax.Array], jax.Array]):
  """``current(table)``, the whole table read densely (``attend``).

  Inside a helper whose optimizer state reads rows (``reader``), ``current``
  is replaced by the helper's ``syncer`` for that table.
  """
  context = _current()
  if context is None:
    return current(table)
  return context.table(table, current)


def _subjaxprs(eqn) -> list:
  out = []
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jex.ClosedJaxpr):
        out.append(item.jaxpr)
      elif isinstance(item, jex.Jaxpr):
        out.append(item)
  return out


def _walk(
  jaxpr, env: dict, loops: tuple, rules: dict, found: dict, nested: bool = False
) -> None:
  """Finds each marker's leaf, batch and loops; ``env``: var -> leaf."""

  def leaf_of(var):
    return env.get(var) if isinstance(var, jex.Var) else None

  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    rule = eqn.params.get("rule") if name == "custom_vmap_call" else None
    # JAX wraps the rule (a ClosedRule); the function is kept as `rule`.
    rule = getattr(rule, "rule", getattr(rule, "__wrapped__", rule))
    if rule is not None and rule in rules:
      number = rules[rule]
      table, ids = eqn.invars
      found[number] = (leaf_of(table), math.prod(ids.aval.shape), loops, nested)
      continue
    if name in _FORWARDING and eqn.invars:
      env[eqn.outvars[0]] = leaf_of(eqn.invars[0])
      continue
    inner = loops + ((name,) if name in _LOOPS else ())
    for sub in _subjaxprs(eqn):
      sub_env = {}
      n_in, n_sub = len(eqn.invars), len(sub.invars)
      # Bodies take the equation's operands, or all but the first (cond's
      # index); otherwise (while's split consts) nothing is mapped.
      offset = {n_in: 0, n_in - 1: 1}.get(n_sub)
      if offset is not None:
        for var, outer in zip(sub.invars, eqn.invars[offset:], strict=True):
          sub_env[var] = leaf_of(outer)
      _walk(sub, sub_env, inner, rules, found, nested=True)


def _live_inputs(jaxpr, live_outputs: list[bool]) -> list[bool]:
  """Which of ``jaxpr``'s inputs the live outputs depend on (backward liveness).

  A call whose body has the equation's operands and results one for one
  (``jit``, ``checkpoint``, ``closed_call``, ...) and ``cond`` are followed
  into; any other equation with a live result keeps all its operands live,
  which can only make a table dense, never drop a gradient.
  """
  live = {
    v
    for v, used in zip(jaxpr.outvars, live_outputs, strict=True)
    if used and isinstance(v, jex.Var)
  }
  for eqn in reversed(jaxpr.eqns):
    outs = [v in live for v in eqn.outvars]
    if not any(outs):
      continue
    subs = _subjaxprs(eqn)
    if eqn.primitive.name == "cond":
      used = [False] * (len(eqn.invars) - 1)
      for branch in subs:
        used = [u or b for u, b in zip(used, _live_inputs(branch, outs), strict=True)]
      used = [True, *used]  # The branch index.
    elif (
      len(subs) == 1
      and len(subs[0].invars) == len(eqn.invars)
      and len(subs[0].outvars) == len(eqn.outvars)
    ):
      used = _live_inputs(subs[0], outs)
    else:
      used = [True] * len(eqn.invars)
    live.update(
      v for v, u in zip(eqn.invars, used, strict=True) if u and isinstance(v, jex.Var)
    )
  return [v in live for v in jaxpr.invars]


def _dense_leaves(closed, n_primals: int, n_outputs: int) -> set[int]:
  """Primal positions whose tangent reaches an output tangent.

  The reads routed through a helper hold their table constant
  (``stop_gradient``) in the abstract pass, so these are the leaves the
  loss reads some other way: plain indexing, a framework's own embedding,
  a whole-table product.
  """
  jaxpr = closed.jaxpr
  used_outputs = [False] * n_outputs + [True] * (len(jaxpr.outvars) - n_outputs)
  tangents = _live_inputs(jaxpr, used_outputs)[len(jaxpr.invars) - n_primals :]
  return {p for p, u in enumerate(tangents) if u}


def plan(fun: Callable[[list], Any], primals: Sequence[Any]) -> Plan:
  """The abstract pass over ``fun(primals) -> output`` (a pytree)."""
  primals = list(primals)
  recording = _Recording()

  def probe(values, tangents):
    recording.calls.clear()
    recording.rules.clear()
    recording.batched_tables.clear()
    with _active(recording):
      return jax.jvp(fun, (values,), (tangents,))

  closed, out_shape = jax.make_jaxpr(probe, return_shape=True)(primals, primals)
  n_outputs = len(jax.tree.leaves(out_shape[0]))
  jaxpr = closed.jaxpr
  primal_vars = jaxpr.invars[: len(primals)]
  raw: dict[int, tuple] = {}
  env = dict(zip(primal_vars, range(len(primals)), strict=True))
  _walk(jaxpr, env, (), recording.rules, raw)
  found = []
  for number in range(len(recording.calls)):
    leaf, size, loops, nested = raw.get(number, (None, 0, (), False))
    found.append(Found(leaf, size, loops, number in recording.batched_tables, nested))
  tables = frozenset(f.leaf for f in found if f.leaf is not None)
  dense = _dense_leaves(closed, len(primals), n_outputs)
  # A table looked up whole (attend) or batched by a vmap: dense.
  for call, f in zip(recording.calls, found, strict=True):
    if f.leaf is not None and (call.kind == "table" or f.batched_table):
      dense.add(f.leaf)
  for call, f in zip(recording.calls, found, strict=True):
    if f.leaf is not None and f.leaf not in dense and f.loops:
      where = _LOOPS[f.loops[0]]
      raise ValueError(
        f"a sparse embedding lookup (ids of shape {call.ids_shape}) runs inside "
        f"{where}: its rows' gradients cannot be told apart between iterations, "
        "so it has no exact row-sparse gradient. Look the rows up before the "
        "loop (e.g. embed the ids of every step at once, then loop over the "
        "rows), or differentiate the table densely with jax.grad."
      )
  return Plan(tuple(recording.calls), tuple(found), tables, frozenset(dense))


def slots(plan_: Plan) -> dict[int, tuple[jax.Array, jax.Array]]:
  """Zero perturbations and id slots of every sparse lookup."""
  out = {}
  for number, (call, found) in enumerate(zip(plan_.calls, plan_.found, strict=True)):
    if call.kind != "rows" or found.leaf is None or found.leaf in plan_.dense:
      continue
    row_shape = call.rows.shape[len(call.ids_shape) :]
    out[number] = (
      jnp.zeros((found.size, *row_shape), call.rows.dtype),
      jnp.zeros((found.size, _chunks()), jnp.float32),
    )
  return out


@contextlib.contextmanager
def differentiating(plan_: Plan, slots_: dict, reader=None, syncer=None):
  """The context of the differentiated pass."""
  fresh = any(found.nested for found in plan_.found)
  with _active(_Differentiating(plan_, slots_, reader, syncer), fresh) as context:
    yield context


@contextlib.contextmanager
def plain_reads():
  """A context under which every read is plain, even inside a helper."""
  _stack().append(None)
  try:
    yield
  finally:
    _stack().pop()


def assemble(
  plan_: Plan, slot_grads: dict[int, tuple[jax.Array, jax.Array]], rows_of: Callable
) -> dict[int, SparseGrad]:
  """Each sparse leaf's lookups as one :class:`SparseGrad`.

  Args:
    plan_: the abstract pass's plan.
    slot_grads: call number -> gradients of its (perturbation, id slot).
    rows_of: leaf -> the table's number of rows (ids out of range become -1).
  """
  by_leaf: dict[int, tuple[list, list]] = {}
  for number, (perturbation, code) in sorted(slot_grads.items()):
    leaf = plan_.found[number].leaf
    assert leaf is not None  # slots are made for a leaf's lookups only
    ids = _decode(code, _ids_dtype())
    rows = rows_of(leaf)
    ids = jnp.where((ids >= 0) & (ids < rows), ids, -1).astype(jnp.int32)
    pair = by_leaf.setdefault(leaf, ([], []))
    pair[0].append(ids)
    pair[1].append(perturbation)
  return {
    leaf: SparseGrad(jnp.concatenate(i), jnp.concatenate(g))
    for leaf, (i, g) in by_leaf.items()
  }


def empty_grad(shape: Sequence[int], dtype) -> SparseGrad:
  """The :class:`SparseGrad` of a table not looked up (``k = 0``)."""
  return SparseGrad(jnp.zeros((0,), jnp.int32), jnp.zeros((0, *shape[1:]), dtype))
