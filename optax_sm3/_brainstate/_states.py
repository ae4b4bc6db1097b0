"""What :class:`SM3` holds its values in: brainstate States, or plain arrays.

The checks on a registered tree (States or arrays, each State once), a
value holder for the plain-pytree mode, brainstate graph-node registration,
and the error for plain mode under a JAX transformation. None of it imports
brainstate: a tree can only hold States once brainstate is imported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeVar, Union

import jax
import jax.core
import numpy as np
import optax

if TYPE_CHECKING:  # an extra: never imported here at run time
  import brainstate

T = TypeVar("T")

# A pytree of brainstate States; keys are anything hashable, as in
# chex.ArrayTree.
StateTree: TypeAlias = Union[
  "brainstate.State", Iterable["StateTree"], Mapping[Any, "StateTree"]
]
# What SM3 trains: a tree of States, or of arrays (plain mode).
ParamTree: TypeAlias = optax.Params | StateTree


class Holder(Protocol[T]):
  """A mutable ``.value``: a brainstate State, or a :class:`Box` in plain mode."""

  value: T


_INSTALL_HINT = "pip install 'optax-sm3[brainstate]'"


def _state_class() -> type | None:
  """``brainstate.State`` if brainstate is already imported, else ``None``.

  A tree can only hold ``brainstate.State`` objects if brainstate has been
  imported, so looking in ``sys.modules`` needs no import of our own.
  """
  module = sys.modules.get("brainstate")
  return None if module is None else module.State


def _require_brainstate():
  try:
    import brainstate
  except ImportError as error:
    raise ImportError(
      "optax_sm3.SM3 was given objects that are not arrays; trees of "
      f"brainstate.State objects need brainstate ({_INSTALL_HINT})"
    ) from error
  return brainstate


def _is_array_like(leaf: Any) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float))


def leaf_kind(tree: Any, name: str) -> tuple[bool, Callable[[Any], bool]]:
  """Whether ``tree``'s leaves are States (else arrays), and the State test.

  Raises:
    ValueError: if ``tree`` has no leaves.
    TypeError: for a tree mixing States and arrays, or other leaves.
    ImportError: for other leaves when brainstate is missing.
  """
  state_class = _state_class()
  is_state = (
    (lambda x: isinstance(x, state_class)) if state_class else (lambda _: False)
  )
  leaves = jax.tree.leaves(tree, is_leaf=is_state)
  if not leaves:
    raise ValueError(f"`{name}` holds no parameters")
  states = [is_state(leaf) for leaf in leaves]
  if any(states) and not all(states):
    raise TypeError(f"`{name}` mixes brainstate.State objects and arrays")
  if not any(states) and not all(_is_array_like(leaf) for leaf in leaves):
    odd = next(type(leaf) for leaf in leaves if not _is_array_like(leaf))
    brainstate = _require_brainstate()
    raise TypeError(
      f"`{name}` leaves must be {brainstate.State.__name__} objects or "
      f"arrays, got {odd.__name__}"
    )
  return all(states), is_state


def check_unique_states(trees: list[Any], is_state: Callable[[Any], bool]) -> None:
  """Raises if one State object appears twice in ``trees`` (the groups).

  Raises:
    ValueError: naming both places (group index and key path).
  """
  seen = {}
  for path, state in jax.tree_util.tree_flatten_with_path(trees, is_leaf=is_state)[0]:
    where = f"group {path[0].idx} at {jax.tree_util.keystr(path[1:]) or 'the root'}"
    if id(state) in seen:
      raise ValueError(
        f"the same brainstate.State is registered twice ({seen[id(state)]} and "
        f"{where}); pass each parameter once"
      )
    seen[id(state)] = where


class Box:
  """A mutable ``.value`` holder: the plain-pytree stand-in for a State."""

  def __init__(self, value: Any):
    self.value = value

  def __repr__(self) -> str:
    return f"Box({self.value!r})"


def read(entry: Any) -> Any:
  """``entry.value`` for a holder (Box or State), else ``entry`` itself."""
  return entry.value if hasattr(entry, "value") else entry


_GRAPH_NODE_TYPES: set[type] = set()


def register_graph_node(node_type: type) -> None:
  """Makes ``node_type`` a brainstate graph node, once brainstate is imported.

  braintools optimizers are ``brainstate.graph.Node`` subclasses, so a
  module holding one sees its states (``module.states()``) and
  ``brainstate.graph.treefy_split`` takes it apart. Registering the type
  with brainstate's graph engine gives the same without importing
  brainstate here; the node's children are its attributes in alphabetical
  order, less ``graph_invisible_attrs``, as for ``Node``.
  """
  brainstate = sys.modules.get("brainstate")
  if brainstate is None or node_type in _GRAPH_NODE_TYPES:
    return

  def flatten(node):
    hidden = node.graph_invisible_attrs
    items = sorted((k, v) for k, v in vars(node).items() if k not in hidden)
    return items, (type(node),)

  def set_key(node, key, value):
    if not isinstance(key, str):
      raise KeyError(f"Invalid key: {key!r}")
    current = vars(node).get(key)
    if isinstance(current, brainstate.State) and isinstance(
      value, brainstate.TreefyState
    ):
      current.update_from_ref(value)
    else:
      setattr(node, key, value)

  brainstate.graph.register_graph_node_type(
    type=node_type,
    flatten=flatten,
    set_key=set_key,
    pop_key=lambda node, key: vars(node).pop(key),
    create_empty=lambda static: object.__new__(static[0]),
    clear=lambda node: vars(node).clear(),
  )
  _GRAPH_NODE_TYPES.add(node_type)


def has_tracer(tree: Any) -> bool:
  """Whether any leaf of ``tree`` is a JAX tracer."""
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def traced_plain_mode_error(method: str) -> TypeError:
  """The error for :class:`SM3` in plain-pytree mode under a JAX transformation."""
  return TypeError(
    f"optax_sm3.SM3.{method} was called under a JAX transformation (jax.jit, "
    "jax.grad, jax.vmap, ...) with parameters registered as a plain pytree of "
    "arrays. In that mode the optimizer keeps the arrays on the Python object, "
    "so traced values would leak out of the transformation. Call it outside "
    "jax.jit (it runs eagerly), or use the optax transformation `opt.tx` "
    "functionally: `state = opt.tx.init(params)`, then inside jax.jit "
    "`updates, state = opt.tx.update(grads, state, params)` and "
    "`params = optax.apply_updates(params, updates)`; or register "
    "brainstate.State objects and jit with brainstate.transform.jit."
  )
