"""Why a saved optimizer state does not fit an optimizer, in words.

``nnx.update(optimizer, saved)`` with a state saved from an optimizer built
with other hyperparameters fails with Flax's generic message ("Cannot set
key 'l' on immutable node of type NoneType"), or, the other way round,
silently leaves buffers the saved state lacks untouched. Our states'
*structure* tells which hyperparameters differ: ``sm3``'s momentum buffers
exist only with ``momentum != 0``, and a ``sparse_rows`` table state is the
lazy :class:`~optax_sm3.SparseRowsState` (``count``, ``accumulators``,
``momentum``, ``last``, ``coefficients``) with momentum, weight decay or
``beta > 0`` and ``sm3``'s chain state (``0``, ``1``, ...) with none of them.
:func:`state_mismatch` compares the optimizer-state subtrees (``opt_state``,
``sparse_state``) of a target and of a state leaf by leaf and says what
differs and how to fix it; :func:`checked_update` is ``nnx.update`` that
raises a ``ValueError`` with that message first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

if TYPE_CHECKING:  # an extra: imported where used
  from flax import nnx

# A graph node (a model, an optimizer) or an nnx.State of one.
NodeOrState: TypeAlias = "nnx.Pytree | nnx.State"

# The attributes under which our optimizers keep their state: nnx.Optimizer
# and SparseOptimizer (`opt_state`), SparseEmbed (`sparse_state`).
_STATE_ROOTS = ("opt_state", "sparse_state")
_LAZY_FIELDS = ("last", "coefficients")


def _flat(tree: Any) -> dict[tuple, Any]:
  from flax import nnx  # an extra: imported where used

  state = tree if isinstance(tree, nnx.State) else nnx.state(tree)
  return {tuple(path): value for path, value in nnx.to_flat_state(state)}


def _root(path: tuple) -> tuple | None:
  """The path up to and including its optimizer-state attribute, if any."""
  for i, key in enumerate(path):
    if key in _STATE_ROOTS:
      return path[: i + 1]
  return None


def _describe(paths: set[tuple], root: tuple) -> set[str]:
  """What a set of paths under ``root`` holds, in the optimizers' terms."""
  found = set()
  for path in paths:
    rest = path[len(root) :]
    if "momentum" in rest:
      found.add("momentum")
    if rest and rest[0] in _LAZY_FIELDS:
      found.add("lazy")
    if rest and isinstance(rest[0], int) and root[-1] == "sparse_state":
      found.add("dense-layout")
  return found


def _hints(root: tuple, only_target: set[tuple], only_given: set[tuple]) -> list[str]:
  target, given = _describe(only_target, root), _describe(only_given, root)
  hints = []
  if "momentum" in target and "momentum" not in given:
    hints.append(
      "the optimizer keeps momentum buffers and the state has none: the state "
      "was saved from an optimizer built with momentum=0 (this one has "
      "momentum != 0)"
    )
  if "momentum" in given and "momentum" not in target:
    hints.append(
      "the state holds momentum buffers and the optimizer has none: the state "
      "was saved from an optimizer built with momentum != 0 (this one has "
      "momentum=0)"
    )
  if "lazy" in target and "dense-layout" in given:
    hints.append(
      "the table state was saved with momentum=0, weight_decay=0 and beta=0 "
      "(sm3's chain state); this optimizer's has momentum, weight decay or "
      "beta > 0 (a SparseRowsState)"
    )
  if "lazy" in given and "dense-layout" in target:
    hints.append(
      "the table state was saved with momentum, weight decay or beta > 0 (a "
      "SparseRowsState); this optimizer has momentum=0, weight_decay=0 and "
      "beta=0 (sm3's chain state)"
    )
  return hints


def path_str(path: tuple) -> str:
  """A state path as the error messages print it: ``a/b/c``."""
  return "/".join(str(p) for p in path)


def state_mismatch(target: NodeOrState, state: NodeOrState) -> str | None:
  """Why ``state`` does not fit ``target``'s optimizer state; ``None`` if it does.

  Only the optimizer-state subtrees (``opt_state`` of an ``nnx.Optimizer``
  or ``SparseOptimizer``, ``sparse_state`` of a ``SparseEmbed``) that
  ``state`` holds are compared, leaf for leaf (paths, shapes, dtypes); the
  rest of ``state`` may be partial, as ``nnx.update`` allows.

  Args:
    target: the object to update (an optimizer, a model) or its ``nnx.State``.
    state: the ``nnx.State`` to put into it (e.g. a restored checkpoint).

  Returns:
    A message naming the differing paths, what the difference means (which
    hyperparameter the state was saved with) and how to fix it; or ``None``.
  """
  have, given = _flat(target), _flat(state)
  roots: list[tuple] = sorted(
    {r for p in given if (r := _root(p)) is not None}, key=str
  )
  problems = []
  for root in roots:
    mine = {p for p in have if p[: len(root)] == root}
    theirs = {p for p in given if p[: len(root)] == root}
    only_target, only_given = mine - theirs, theirs - mine
    lines = []
    if only_target:
      lines.append(
        "  missing from the state: "
        + ", ".join(sorted(path_str(p) for p in only_target)[:6])
      )
    if only_given:
      lines.append(
        "  not in the optimizer: "
        + ", ".join(sorted(path_str(p) for p in only_given)[:6])
      )
    for path in sorted(mine & theirs, key=str):
      a, b = have[path], given[path]
      shape_a, shape_b = np.shape(a.get_value()), np.shape(b.get_value())
      dtype_a = getattr(a.get_value(), "dtype", None)
      dtype_b = getattr(b.get_value(), "dtype", None)
      if shape_a != shape_b or dtype_a != dtype_b:
        lines.append(
          f"  {path_str(path)}: the optimizer holds {shape_a} {dtype_a}, the "
          f"state {shape_b} {dtype_b}"
        )
    if lines:
      hints = _hints(root, only_target, only_given)
      problems.append(
        f"{path_str(root)}:\n"
        + "\n".join(lines)
        + "".join(f"\n  meaning: {h}" for h in hints)
      )
  if not problems:
    return None
  return (
    "the state does not fit this optimizer's state\n"
    + "\n".join(problems)
    + "\nto fix: build the optimizer with the hyperparameters the state was "
    "saved with (momentum, weight_decay, and for SM3 the cover options and "
    "accumulator_dtype) before restoring; or keep the new optimizer's fresh "
    "state and restore only the parameters (nnx.update(model, "
    "nnx.state(saved, nnx.Param)) or a filter that leaves out opt_state and "
    "sparse_state)"
  )


def checked_update(target: NodeOrState, *states: NodeOrState) -> None:
  """``nnx.update(target, *states)``, after :func:`state_mismatch` on each state.

  Raises:
    ValueError: with :func:`state_mismatch`'s message, before anything is
      written, if a state's optimizer state does not fit ``target``'s.
  """
  from flax import nnx  # an extra: imported where used

  for state in states:
    message = state_mismatch(target, state)
    if message is not None:
      raise ValueError(message)
  nnx.update(target, *states)
