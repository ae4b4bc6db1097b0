"""Small pytree helpers shared by the transformations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import jax
import optax

# A pytree of arrays and numbers (chex.ArrayTree): optax names it Params,
# Updates or OptState after its role; this name is for trees of options.
ArrayTree: TypeAlias = optax.Params

# A per-parameter option: a tree with the parameters' structure (or a prefix
# of it), or a function from the parameters to one, told apart by
# `is_function` (optax.masked's `mask`).
TreeOrFunction: TypeAlias = ArrayTree | Callable[[optax.Params], ArrayTree]


def unzip_pairs(like: Any, pairs: Any) -> tuple[Any, Any]:
  """Splits a tree of ``(a, b)`` pairs into a tree of ``a`` and one of ``b``.

  ``jax.tree.transpose`` needs every pair to have the same inner structure;
  here ``b`` may differ between leaves (SM3 keeps one accumulator per axis).

  Args:
    like: a tree whose structure the pairs sit in (the updates).
    pairs: ``like``'s structure with a pair ``(a, b)`` at each leaf.

  Returns:
    ``(a_tree, b_tree)``, both with ``like``'s structure.
  """
  treedef = jax.tree.structure(like)
  flat = treedef.flatten_up_to(pairs)
  return treedef.unflatten([a for a, _ in flat]), treedef.unflatten(
    [b for _, b in flat]
  )


def flatten_like(treedef: Any, tree: Any, message: str) -> list[Any]:
  """``treedef.flatten_up_to(tree)``, or a ``ValueError`` starting ``message``.

  For arguments that must have the parameters' structure (shardings, masks,
  gradients, states): the error names the argument instead of JAX's
  internal node types alone.
  """
  try:
    return treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as error:
    raise ValueError(f"{message}: {error}") from None


def is_function(option: object) -> bool:
  """Whether a tree-or-callable argument is a function (optax's rule).

  ``optax.masked`` calls a mask only if every leaf of it is callable (a
  function is a single callable leaf). A tree that is itself callable but
  holds data, such as an Equinox module (whose class defines ``__call__``)
  of booleans or ints, is a tree.

  Args:
    option: a tree, or a function from the parameters to one.

  Returns:
    ``True`` if ``option`` is to be called on the parameters.
  """
  flags = jax.tree.leaves(jax.tree.map(callable, option))
  return bool(flags) and all(flags)


def resolve(option: Any, params: Any) -> Any:
  """``option(params)`` if ``option`` is a function, else ``option`` itself.

  Functions are told from trees by :func:`is_function`.
  """
  return option(params) if is_function(option) else option
