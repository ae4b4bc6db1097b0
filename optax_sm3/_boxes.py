"""Parameters boxed with Flax metadata: one box per accumulator, axis by axis.

Flax hands optimizers parameters *boxed*: ``nnx.Optimizer`` calls
``tx.init(nnx.state(model, wrt))``, a tree of ``nnx.Variable`` whose
metadata holds the sharding (``nnx.with_partitioning``), and a linen
``TrainState`` built on ``nn.with_partitioning`` parameters holds
``nn.Partitioned`` boxes with the axis names. Both are pytree nodes with the
value as their only child, so a ``jax.tree.map`` over the parameters puts
whatever it returns for a parameter *inside* that parameter's box, metadata
included. That suits a buffer of the parameter's shape (Adam's moments); a
parameter's SM3 accumulators are a tuple of smaller arrays, and a rank-1
accumulator in a box carrying a rank-2 spec cannot be sharded (Flax raises a
``ValueError`` when it applies the spec).

:func:`box_accumulators` gives each accumulator a box of its own instead,
whose sharding metadata keeps the parameter's entries for the axes the
accumulator indexes (a row accumulator of a ``("data", "model")`` kernel
gets ``("data",)``, its column accumulator ``("model",)``): the layout of
:func:`optax_sm3.state_shardings`, readable with ``nnx.get_partition_spec``
and ``nn.get_partition_spec``. :func:`unboxed` and :func:`reboxed` let
``update`` run on the plain values of boxed gradients and states.

Flax is optional: with it not imported, no parameter can be boxed and every
function here returns its input.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

# nnx Variable metadata that holds a sharding (``optimizer_sharding`` is the
# one nnx.Optimizer gives the state in place of ``out_sharding``).
_NNX_SHARDING_KEYS = ("out_sharding", "optimizer_sharding")


def _box_types() -> tuple[type, ...]:
  """Flax's box types, where Flax is loaded (a parameter cannot be boxed else)."""
  types = []
  nnx = sys.modules.get("flax.nnx")
  if nnx is not None:
    types.append(nnx.Variable)
  meta = sys.modules.get("flax.core.meta")
  if meta is not None:
    types.append(meta.AxisMetadata)
  return tuple(types)


def _content(box: Any) -> Any:
  """The box's only child (its value), read without Flax's hooks or constraints."""
  children, _ = jax.tree_util.tree_flatten(box, is_leaf=lambda node: node is not box)
  (child,) = children
  return child


def _pick(entries: Iterable[Any], axes: tuple[int, ...], rank: int) -> tuple[Any, ...]:
  padded = tuple(entries)
  padded += (None,) * (rank - len(padded))
  return tuple(padded[a] for a in axes)


def _select_sharding(sharding: Any, axes: tuple[int, ...], rank: int) -> Any:
  """``sharding`` (names, a ``PartitionSpec`` or a ``NamedSharding``) on ``axes``."""
  if isinstance(sharding, NamedSharding):
    return NamedSharding(
      sharding.mesh, PartitionSpec(*_pick(sharding.spec, axes, rank))
    )
  if isinstance(sharding, PartitionSpec):
    return PartitionSpec(*_pick(sharding, axes, rank))
  if isinstance(sharding, (tuple, list)):
    return type(sharding)(_pick(sharding, axes, rank))
  return sharding  # a Format or anything else: not ours to rewrite


def _rebox(box: Any, value: Any, axes: tuple[int, ...], rank: int) -> Any:
  """A box like ``box`` around ``value``, its axis metadata kept for ``axes``."""
  nnx = sys.modules.get("flax.nnx")
  if nnx is not None and isinstance(box, nnx.Variable):
    metadata = box.get_metadata()
    for key in _NNX_SHARDING_KEYS:
      if metadata.get(key):
        metadata[key] = _select_sharding(metadata[key], axes, rank)
    # from_metadata, not the constructor: no sharding is applied here (what
    # a tree.map would give); nnx.Optimizer's to_opt_state applies it.
    return type(box).from_metadata(value, metadata)
  meta = sys.modules["flax.core.meta"]
  if isinstance(box, meta.Partitioned):  # and LogicallyPartitioned
    return dataclasses.replace(box, value=value, names=_pick(box.names, axes, rank))
  return box.replace_boxed(value)


def box_accumulators(params: Any, accumulators: Any, covers: Any) -> Any:
  """Each boxed parameter's accumulators, each in a box of its own.

  Args:
    params: the parameters given to ``init``, boxed or not.
    accumulators: a tree with ``params``'s structure (boxes included) and a
      tuple of accumulators at each parameter: what ``jax.tree.map`` over
      ``params`` returns, so a boxed parameter's tuple sits in its box.
    covers: the same structure with a :class:`optax_sm3._cover.Cover` at
      each parameter.

  Returns:
    ``accumulators`` with every ``box(tuple)`` turned into a tuple of boxes,
    each with the parameter's metadata for the axes its accumulator indexes
    (the stacked axes, then its group's); the very same tree where no
    parameter is boxed.
  """
  types = _box_types()
  if not types:
    return accumulators
  is_box = lambda node: isinstance(node, types)
  treedef = jax.tree.structure(params, is_leaf=is_box)
  boxes = treedef.flatten_up_to(params)
  if not any(is_box(b) for b in boxes):
    return accumulators
  out = []
  for box, accs, cover in zip(
    boxes,
    treedef.flatten_up_to(accumulators),
    treedef.flatten_up_to(covers),
    strict=True,
  ):
    if not is_box(box):
      out.append(accs)
      continue
    if not hasattr(_content(cover), "groups"):
      # Masked out (optax.multi_transform, optax.masked): no accumulators.
      out.append(accs)
      continue
    accs, cover = _content(accs), _content(cover)
    stacked = tuple(range(cover.stacked))
    rank = len(cover.shape)
    out.append(
      tuple(
        _rebox(box, a, stacked + tuple(group), rank)
        for a, group in zip(accs, cover.groups, strict=True)
      )
    )
  return treedef.unflatten(out)


def unboxed(tree: Any) -> Any:
  """``tree`` with every Flax box replaced by its value (``tree`` if none)."""
  types = _box_types()
  if not types:
    return tree
  is_box = lambda node: isinstance(node, types)
  if not any(is_box(x) for x in jax.tree.leaves(tree, is_leaf=is_box)):
    return tree
  return jax.tree.map(lambda x: _content(x) if is_box(x) else x, tree, is_leaf=is_box)


def reboxed(like: Any, plain: Any) -> Any:
  """``plain`` (the leaves of ``unboxed(like)``, new values) in ``like``'s boxes.

  ``plain`` itself where ``like`` holds no box, so that states and updates
  of unboxed parameters come back exactly as before.
  """
  if unboxed(like) is like:
    return plain
  return jax.tree.structure(like).unflatten(jax.tree.leaves(plain))
