"""The blocked form of ``_blocks`` on sharded parameters, one shard per device.

Inside a ``jax.jit`` with automatic sharding, the gradient's sharding is not
known when the step is traced, so the loop cannot be written as a
``shard_map`` there. It is wrapped in
:func:`jax.experimental.custom_partitioning` instead: when XLA partitions the
step, the ``partition`` callback receives the gradient's sharding and lowers,
per device, the blocked loop on the local block, then takes the maximum of
each accumulator across the devices that split the axes it reduces over (one
all-reduce of accumulator size). A maximum does not depend on the order it is
taken in, so the result is bit-identical to the direct form. Each accumulator
comes out split like the parameter axes it indexes: the layout
:func:`optax_sm3.state_shardings` gives it.

Around the partitioned call:

* ``jax.custom_jvp``: ``custom_partitioning`` has no derivative; the tangent
  is the derivative of the direct form (which only differentiated programs
  pay for).
* ``jax.custom_batching.custom_vmap``: nor has it a batching rule; a batch
  axis becomes one more stacked axis of the cover (a batched ``beta`` falls
  back to the direct form).
* explicit sharding mode: the gradient's sharding is in its type, so the
  loop runs under ``jax.shard_map`` on the specs read from it.

Unpartitioned (one device in the jit, or all mesh axes manual inside a
``shard_map``), the call is the single-device loop. Inside a ``shard_map``
over only some of the mesh axes the direct form runs (XLA gives the
partitioner no mesh to read the other axes' shardings from), and an axis
that its mesh axes do not divide evenly is gathered (per-shard shapes must
be exact).

The devices of one host run their shards at once and share its caches, so
each loops over blocks of ``block_size // devices`` entries (and at least
two per shard): the host's temporary is one block, as on one device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import (
  ArrayMapping,
  SdyShardingRule,
  custom_partitioning,
)
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from optax_sm3 import _blocks, _cover


def _local(config: _blocks.Config, g, accumulators, c_old, c_new, devices: int = 1):
  """The single-device loop on ``g`` (a whole parameter or one shard).

  ``devices`` run it at once on this host and share its caches: each gets a
  block of ``block_size // devices`` entries.
  """
  cover = dataclasses.replace(config.cover, shape=tuple(g.shape))
  block = min(config.block_size // devices, -(-math.prod(cover.shape) // 2))
  local = dataclasses.replace(config, cover=cover, block_size=max(block, 1))
  return _blocks.blocked(local, g, accumulators, c_old, c_new)


def _entries(spec: PartitionSpec, rank: int) -> list[tuple[str, ...]]:
  """The mesh axes splitting each array axis, as tuples of names."""
  out = []
  for entry in tuple(spec) + (None,) * (rank - len(spec)):
    if entry is None:
      out.append(())
    elif isinstance(entry, str):
      out.append((entry,))
    else:
      out.append(tuple(entry))
  return out


def _even_entries(shape, spec, mesh_shape) -> list[tuple[str, ...]]:
  """``_entries``, with the mesh axes of an unevenly split axis dropped.

  Per-device shapes must be exact for the loop; an uneven axis is gathered
  instead (correct, and only for shapes the mesh does not divide).
  """
  entries = _entries(spec, len(shape))
  return [
    names if size % math.prod(mesh_shape[n] for n in names) == 0 else ()
    for size, names in zip(shape, entries, strict=True)
  ]


def _spec(entries: Sequence[tuple[str, ...]]) -> PartitionSpec:
  return PartitionSpec(
    *(None if not e else e[0] if len(e) == 1 else tuple(e) for e in entries)
  )


def _devices_here(mesh) -> int:
  """How many of ``mesh``'s devices this process drives."""
  return max(1, min(mesh.size, jax.local_device_count()))


def _sharded_fn(
  config: _blocks.Config, entries: Sequence[tuple[str, ...]], devices: int
):
  """The per-shard loop followed by the cross-device maxima."""
  reduced = [config.cover.reduced_axes(group) for group in config.cover.groups]

  def per_shard(g, accumulators, c_old, c_new):
    new = _local(config, g, accumulators, c_old, c_new, devices)
    out = []
    for a, axes in zip(new, reduced, strict=True):
      names = tuple(n for axis in axes for n in entries[axis])
      # SM3-I folds ``c_old * a + c_new * max`` per shard: monotone in the
      # maximum (``c_new >= 0``, the same ``a`` on every device it is taken
      # over, rounding monotone), so the maximum of the folds is the fold of
      # the maximum, bit for bit.
      out.append(jax.lax.pmax(a, names) if names else a)
    return tuple(out)

  return per_shard


@functools.cache
def _partitioned(config: _blocks.Config):
  """``custom_partitioning`` of the loop, for one configuration."""
  indexed = config.indexed()
  rank = len(config.cover.shape)

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    g_shape = arg_shapes[0]
    entries = _even_entries(g_shape.shape, g_shape.sharding.spec, mesh.shape)
    acc_shardings = tuple(
      NamedSharding(mesh, _spec([entries[a] for a in axes])) for axes in indexed
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    arg_shardings = (
      NamedSharding(mesh, _spec(entries)),
      acc_shardings,
      replicated,
      replicated,
    )
    per_shard = _sharded_fn(config, entries, _devices_here(mesh))
    return mesh, per_shard, acc_shardings, arg_shardings

  def infer(mesh, arg_shapes, result_shape):
    del result_shape
    g_shape = arg_shapes[0]
    entries = _even_entries(g_shape.shape, g_shape.sharding.spec, mesh.shape)
    return tuple(
      NamedSharding(mesh, _spec([entries[a] for a in axes])) for axes in indexed
    )

  factors = [f"d{axis}" for axis in range(rank)]
  rule = SdyShardingRule(
    operand_mappings=(
      ArrayMapping(*factors),
      *(ArrayMapping(*(factors[a] for a in axes)) for axes in indexed),
      ArrayMapping(),
      ArrayMapping(),
    ),
    result_mappings=tuple(
      ArrayMapping(*(factors[a] for a in axes)) for axes in indexed
    ),
  )

  def whole(g, accumulators, c_old, c_new):
    return _local(config, g, accumulators, c_old, c_new)

  fn = custom_partitioning(whole)
  fn.def_partition(
    partition=partition,
    infer_sharding_from_operands=infer,
    sharding_rule=rule,
  )
  return fn


def _stacked_once_more(config: _blocks.Config, axis_size: int) -> _blocks.Config:
  cover = config.cover
  return dataclasses.replace(
    config,
    cover=_cover.Cover(
      (axis_size, *cover.shape),
      cover.stacked + 1,
      tuple(tuple(a + 1 for a in group) for group in cover.groups),
    ),
  )


@functools.cache
def _batchable(config: _blocks.Config):
  """``_partitioned`` with a batching rule: a batch axis is a stacked axis."""

  @jax.custom_batching.custom_vmap
  def fn(g, accumulators, c_old, c_new):
    types = _axis_types(g)
    if AxisType.Explicit in types:
      entries = _explicit_entries(g)
      return _shard_mapped(config, entries, g, accumulators, c_old, c_new)
    if AxisType.Manual in types and AxisType.Auto in types:
      # Inside a shard_map over some of the mesh's axes, XLA hands the
      # partitioner no mesh to read the other axes' shardings from.
      return _blocks.direct(config, g, accumulators, c_old, c_new)
    return _partitioned(config)(g, accumulators, c_old, c_new)

  @fn.def_vmap
  def rule(axis_size, in_batched, g, accumulators, c_old, c_new):
    g_batched, acc_batched, c_old_batched, c_new_batched = in_batched
    if c_old_batched or c_new_batched:
      axes = (
        0 if g_batched else None,
        tuple(0 if b else None for b in acc_batched),
        0 if c_old_batched else None,
        0 if c_new_batched else None,
      )
      out = jax.vmap(functools.partial(_blocks.direct, config), in_axes=axes)(
        g, tuple(accumulators), c_old, c_new
      )
      return out, tuple(True for _ in out)
    stack = lambda x, batched: (
      x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
    )
    g = stack(g, g_batched)
    accumulators = tuple(
      stack(a, b) for a, b in zip(accumulators, acc_batched, strict=True)
    )
    out = _batchable(_stacked_once_more(config, axis_size))(
      g, accumulators, c_old, c_new
    )
    return out, tuple(True for _ in out)

  return fn


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _differentiable(config: _blocks.Config, g, accumulators, c_old, c_new):
  return _batchable(config)(g, accumulators, c_old, c_new)


@_differentiable.defjvp
def _differentiable_jvp(config, primals, tangents):
  out = _differentiable(config, *primals)
  _, tangent = jax.jvp(functools.partial(_blocks.direct, config), primals, tangents)
  return out, tangent


def _axis_types(g) -> set[AxisType]:
  """The types of the axes of the mesh ``g`` is traced on (none: no mesh)."""
  mesh = jax.typeof(g).sharding.mesh
  return set() if mesh.empty else set(mesh.axis_types)


def _explicit_entries(g) -> list[tuple[str, ...]]:
  """The explicit mesh axes splitting each axis of ``g``."""
  sharding = jax.typeof(g).sharding
  return _even_entries(g.shape, sharding.spec, dict(sharding.mesh.shape))


def _shard_mapped(config: _blocks.Config, entries, g, accumulators, c_old, c_new):
  """Explicit sharding mode: the loop under ``shard_map`` on ``g``'s specs."""
  specs = [_spec([entries[a] for a in axes]) for axes in config.indexed()]
  g = jax.sharding.reshard(g, _spec(entries))
  accumulators = tuple(
    jax.sharding.reshard(a, s) for a, s in zip(accumulators, specs, strict=True)
  )
  c_old, c_new = (jax.sharding.reshard(c, PartitionSpec()) for c in (c_old, c_new))
  mesh = jax.typeof(g).sharding.mesh
  explicit = {
    n
    for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
    if t == AxisType.Explicit
  }
  per_shard = jax.shard_map(
    _sharded_fn(config, entries, _devices_here(mesh)),
    axis_names=explicit,
    in_specs=(_spec(entries), tuple(specs), PartitionSpec(), PartitionSpec()),
    out_specs=tuple(specs),
  )
  return per_shard(g, accumulators, c_old, c_new)


def blocked(
  config: _blocks.Config,
  g: jax.Array,
  accumulators: Sequence[jax.Array],
  c_old: jax.Array,
  c_new: jax.Array,
) -> tuple[jax.Array, ...]:
  """:func:`optax_sm3._blocks.blocked` per shard, for any sharding of ``g``.

  Takes ``blocked``'s arguments (``config.cover`` the cover of the whole
  parameter) and returns the same accumulators, each split like the
  parameter axes it indexes.
  """
  return tuple(_differentiable(config, g, tuple(accumulators), c_old, c_new))
