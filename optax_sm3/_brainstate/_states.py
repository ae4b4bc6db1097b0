"""Pieces of the braintools optimizer interface that :class:`SM3` builds on.

A value holder for the plain-pytree mode, a constant learning-rate scheduler
with the ``braintools.optim.LRScheduler`` interface (what braintools makes of
a float ``lr``), and the checks that keep checkpoints and traced values out
of trouble. None of it imports brainstate or braintools.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


def is_scheduler(lr: Any) -> bool:
  """Whether ``lr`` looks like a braintools ``LRScheduler`` (duck-typed)."""
  return all(
    hasattr(lr, name) for name in ("current_lrs", "base_lrs", "get_lr", "apply")
  )


def attach(scheduler: Any, optimizer: Any) -> None:
  """Attaches a braintools scheduler to ``optimizer`` as braintools does.

  ``LRScheduler.attach_optimizer`` insists on a braintools optimizer, so its
  effect is reproduced here: the scheduler's ``apply`` (run by its ``step``)
  then writes the new rates into ``optimizer.param_groups[i]['lr']`` and
  ``optimizer._current_lr``, and the first rate is the scheduled one.
  """
  scheduler.optimizer = optimizer
  try:
    rates = scheduler.get_lr()
  except (AttributeError, NotImplementedError, TypeError, IndexError, KeyError):
    return  # as braintools: a scheduler not ready to compute keeps its rates
  scheduler.current_lrs.value = (
    list(rates) if isinstance(rates, (list, tuple)) else [rates]
  )


class ConstantLR:
  """A constant learning rate with the braintools ``LRScheduler`` interface.

  What ``optax_sm3.SM3(lr=0.1).lr_scheduler`` is, as braintools turns a float
  ``lr`` into ``braintools.optim.ConstantLR(base_lr=lr, factor=1.0,
  total_iters=0)``: ``step()`` counts epochs and keeps the rate,
  ``apply(fn)`` sets the rate to ``fn(base_lr)`` (not cumulative, as in
  braintools), and an attached optimizer follows both.

  Args:
    base_lr: the rate.
  """

  def __init__(self, base_lr: Any):
    self.optimizer = None
    self.base_lrs = [base_lr]
    self.last_epoch = Box(0)
    self.current_lrs = Box([base_lr])

  def __repr__(self) -> str:
    return f"ConstantLR(base_lr={self.base_lrs[0]!r})"

  def get_lr(self) -> list[Any]:
    """The scheduled rates: ``base_lrs``."""
    return list(self.base_lrs)

  def step(self, epoch: int | None = None) -> None:
    """Advances the epoch counter (the rate stays ``fn(base_lr)``)."""
    self.last_epoch.value = self.last_epoch.value + 1 if epoch is None else epoch
    self.apply(lambda rate: rate)

  def step_epoch(self) -> None:
    """Same as :meth:`step`."""
    self.step()

  def apply(self, apply_fn: Callable[[Any], Any]) -> None:
    """Sets the rates to ``apply_fn(base_lr)`` and pushes them to the optimizer."""
    rates = [apply_fn(rate) for rate in self.get_lr()]
    self.current_lrs.value = rates
    if self.optimizer is not None:
      for group, rate in zip(self.optimizer.param_groups, rates, strict=False):
        group["lr"].value = rate
      self.optimizer._current_lr.value = rates[0]

  def get_last_lr(self) -> list[Any]:
    """The current rates."""
    return list(self.current_lrs.value)

  def __call__(self, count: Any) -> Any:
    """Minus the current rate, for ``optax.scale_by_schedule`` (as braintools)."""
    del count
    return -jnp.asarray(self.current_lrs.value[0])

  def state_dict(self) -> dict[str, Any]:
    """``last_epoch``, ``base_lrs`` and ``current_lrs``, as braintools saves them."""
    return {
      "last_epoch": self.last_epoch.value,
      "base_lrs": list(self.base_lrs),
      "current_lrs": list(self.current_lrs.value),
    }

  def load_state_dict(self, state_dict: dict[str, Any]) -> None:
    """Restores what :meth:`state_dict` returned."""
    self.last_epoch.value = state_dict["last_epoch"]
    self.base_lrs = list(state_dict["base_lrs"])
    self.current_lrs.value = list(state_dict.get("current_lrs", self.base_lrs))


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


def restore_like(name: str, saved: Any, template: Any) -> Any:
  """``saved`` in the structure and dtypes of ``template``, checked leaf by leaf.

  ``saved`` may have been through a serialisation round trip that turned
  tuples and NamedTuples into lists or dicts, so only the leaves are
  compared, in order.

  Args:
    name: how the saved tree is called in messages, e.g.
      ``"state_dict['opt_state']"``.
    saved: the saved tree.
    template: a tree of the expected structure (the current state).

  Returns:
    ``saved``'s leaves in ``template``'s structure and dtypes.

  Raises:
    ValueError: naming the first leaf (its tree path in ``template``) whose
      shape differs, with both shapes, or the leaves one tree has and the
      other lacks.
  """
  paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  expected = [leaf for _, leaf in paths]
  saved_paths = jax.tree_util.tree_flatten_with_path(saved)[0]
  got = [leaf for _, leaf in saved_paths]
  prefix = f"`{name}` does not match the registered parameters"
  if len(got) != len(expected):
    ours = [jax.tree_util.keystr(path) for path, _ in paths]
    theirs = [jax.tree_util.keystr(path) for path, _ in saved_paths]
    missing = [p for p in ours if p not in theirs][:3]
    extra = [p for p in theirs if p not in ours][:3]
    detail = "".join(
      [
        f"; expected but not saved: {', '.join(missing)}" if missing else "",
        f"; saved but not expected: {', '.join(extra)}" if extra else "",
      ]
    )
    raise ValueError(
      f"{prefix}: {len(got)} arrays saved, {len(expected)} expected{detail}"
    )
  for (path, want), have in zip(paths, got, strict=True):
    if np.shape(have) != np.shape(want):
      raise ValueError(
        f"{prefix}: at {name}{jax.tree_util.keystr(path)} the checkpoint has "
        f"shape {tuple(np.shape(have))}, the registered parameters need "
        f"{tuple(np.shape(want))}"
      )
  return jax.tree.unflatten(
    treedef,
    [jnp.asarray(have, want.dtype) for have, want in zip(got, expected, strict=True)],
  )
