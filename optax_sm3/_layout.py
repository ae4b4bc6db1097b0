"""How an optimizer state's leaves are laid out relative to the parameters.

Each state type declares its own rule with :func:`register`, in the module
that defines it: ``rule(state, layout)`` returns the state with a
:class:`~jax.sharding.PartitionSpec` in place of every leaf, read from the
parameters' :class:`ParamLayout`. :meth:`ParamLayout.specs_of` walks a whole
state and asks each node's rule, so a new state type adds its rule and
nothing else changes. A node no rule claims is sharded like the parameters
when it is a tree of the parameters' structure (``optax.adam``'s ``mu`` and
``nu``, ...): a leaf of its parameter's shape takes the parameter's spec.
Every other leaf (counters, injected hyperparameters) is replicated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import jax
from jax.sharding import PartitionSpec

REPLICATED = PartitionSpec()

# A pytree with a PartitionSpec (or None: replicated) at each leaf, as
# jax.jit's shardings take; keys are anything hashable, as in chex.ArrayTree.
PartitionSpecTree: TypeAlias = (
  PartitionSpec
  | Iterable["PartitionSpecTree"]
  | Mapping[Any, "PartitionSpecTree"]
  | None
)

# state type -> rule(state, layout) -> the state's specs. The state is Any:
# each rule takes its own state type (a registry of rules of any state).
Rule = Callable[[Any, "ParamLayout"], PartitionSpecTree]
_RULES: dict[type, Rule] = {}


def register(state_type: type, rule: Rule) -> None:
  """Declares how the leaves of ``state_type`` (and its subclasses) shard.

  Args:
    state_type: a state class (a ``NamedTuple``, usually).
    rule: ``rule(state, layout)``: ``state``'s tree (abstract, from
      :func:`jax.eval_shape`) with a ``PartitionSpec`` at each leaf, given the
      parameters' :class:`ParamLayout`. It may call ``layout.specs_of`` on the
      states it holds.
  """
  _RULES[state_type] = rule


def _rule(node: object) -> Rule | None:
  for cls in type(node).__mro__:
    if cls in _RULES:
      return _RULES[cls]
  return None


def replicated(tree: Any) -> PartitionSpecTree:
  """``tree`` with every leaf replicated."""
  return jax.tree.map(lambda _: REPLICATED, tree)


def _match_groups(
  shape: tuple[int, ...], tails: Sequence[tuple[int, ...]], start: int
) -> list[tuple[int, ...]] | None:
  """Axes of ``shape[start:]`` indexed by each tail, in order, or ``None``.

  Each tail must be the sizes of a run of adjacent axes after the previous
  run; only size-1 axes may be left between runs or after the last one.
  Depth-first, earliest run first, so the answer is deterministic.
  """
  if not tails:
    return [] if all(d == 1 for d in shape[start:]) else None
  tail, rest = tails[0], tails[1:]
  for first in range(start, len(shape) - len(tail) + 1):
    if shape[first : first + len(tail)] == tail:
      later = _match_groups(shape, rest, first + len(tail))
      if later is not None:
        return [tuple(range(first, first + len(tail))), *later]
    if shape[first] != 1:
      break  # only size-1 axes can be skipped
  return None


def accumulator_axes(
  shape: tuple[int, ...], accumulator_shapes: Sequence[tuple[int, ...]]
) -> list[tuple[int, ...]] | None:
  """For each SM3 accumulator, the parameter axis each of its dimensions indexes.

  A cover is a run of stacked leading axes that prefix every accumulator, then
  increasing groups of adjacent axes, possibly with size-1 axes left out. Tries
  the fewest stacked axes first. ``None`` if no cover fits.
  """
  rank = len(shape)
  if len(accumulator_shapes) == 1 and tuple(accumulator_shapes[0]) == shape:
    # Rank 0 or 1 (per slice), or all axes of size 1: the full accumulator.
    return [tuple(range(rank))]
  for stacked in range(rank + 1):
    prefix = shape[:stacked]
    if any(tuple(s[:stacked]) != prefix for s in accumulator_shapes):
      continue
    tails = [tuple(s[stacked:]) for s in accumulator_shapes]
    if any(not tail for tail in tails):
      continue
    groups = _match_groups(shape, tails, stacked)
    if groups is not None:
      return [tuple(range(stacked)) + group for group in groups]
  return None


def entries(spec: PartitionSpec, rank: int) -> tuple[Any, ...]:
  """``spec``'s entry for each of ``rank`` axes (missing trailing ones: None).

  Raises:
    ValueError: if ``spec`` has more entries than ``rank``.
  """
  found = tuple(spec)
  if len(found) > rank:
    raise ValueError(
      f"`param_specs`: the spec {spec} has {len(found)} entries for a "
      f"parameter of rank {rank}"
    )
  return found + (None,) * (rank - len(found))


@dataclasses.dataclass(frozen=True)
class ParamLayout:
  """The parameters' tree structure, shapes and specs, leaf by leaf.

  Attributes:
    treedef: the parameters' tree structure.
    shapes: each parameter's shape, in leaf order.
    specs: each parameter's ``PartitionSpec``, in leaf order.
  """

  treedef: Any
  shapes: list[tuple[int, ...]]
  specs: list[PartitionSpec]

  def is_params_like(self, node: object) -> bool:
    """Whether ``node`` is a tree of the parameters' structure."""
    return jax.tree.structure(node) == self.treedef

  def like_params(self, node: Any) -> Any:
    """A tree of the parameters' structure: each leaf of its parameter's shape
    sharded like the parameter, the others replicated."""
    leaves: list[Any] = self.treedef.flatten_up_to(node)
    return self.treedef.unflatten(
      [
        spec if tuple(leaf.shape) == shape else REPLICATED
        for leaf, shape, spec in zip(leaves, self.shapes, self.specs, strict=True)
      ]
    )

  def accumulators(self, accumulators: Any) -> Any:
    """SM3's accumulators (a tuple per parameter): each dimension sharded like
    the parameter axis it indexes (:func:`accumulator_axes`), replicated where
    no cover fits."""
    try:
      per_param: list[Any] = self.treedef.flatten_up_to(accumulators)
    except (ValueError, TypeError):
      return replicated(accumulators)
    out = []
    for shape, spec, accs in zip(self.shapes, self.specs, per_param, strict=True):
      leaves = jax.tree.leaves(accs)
      if not isinstance(accs, tuple) or len(leaves) != len(accs) or not leaves:
        out.append(replicated(accs))
        continue
      axes = accumulator_axes(shape, [tuple(a.shape) for a in accs])
      if axes is None:
        out.append(tuple(REPLICATED for _ in accs))
        continue
      spec_entries = entries(spec, len(shape))
      out.append(
        tuple(PartitionSpec(*(spec_entries[a] for a in dims)) for dims in axes)
      )
    return self.treedef.unflatten(out)

  def leaf(self, index: int) -> ParamLayout:
    """The layout of parameter ``index`` alone, as a single array."""
    return ParamLayout(jax.tree.structure(0), [self.shapes[index]], [self.specs[index]])

  def without(self, indices: set[int]) -> ParamLayout:
    """The layout of the parameters with leaves ``indices`` set to ``None``."""
    kept = [i for i in range(len(self.shapes)) if i not in indices]
    treedef = jax.tree.structure(
      self.treedef.unflatten(
        [None if i in indices else 0 for i in range(len(self.shapes))]
      )
    )
    return ParamLayout(
      treedef, [self.shapes[i] for i in kept], [self.specs[i] for i in kept]
    )

  def specs_of(self, state: Any) -> Any:
    """The spec of every leaf of the abstract ``state``: each node a registered
    rule claims by its rule, a tree of the parameters' structure like the
    parameters, any other leaf replicated."""

    def is_leaf(node: Any) -> bool:
      return _rule(node) is not None or self.is_params_like(node)

    def visit(node: Any) -> Any:
      rule = _rule(node)
      if rule is not None:
        return rule(node, self)
      if self.is_params_like(node):
        return self.like_params(node)
      return REPLICATED

    return jax.tree.map(visit, state, is_leaf=is_leaf)
