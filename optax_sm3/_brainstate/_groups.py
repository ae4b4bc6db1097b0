"""Parameter registration and groups of the braintools-style ``SM3``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any, Self, TypedDict, Unpack

import jax
import jax.numpy as jnp
import optax

from optax_sm3 import _validation
from optax_sm3._brainstate._rates import is_scheduler
from optax_sm3._brainstate._states import (
  Box,
  Holder,
  ParamTree,
  check_unique_states,
  has_tracer,
  leaf_kind,
  register_graph_node,
  traced_plain_mode_error,
)

_GROUP_OPTIONS = ("lr", "weight_decay")


class GroupOptions(TypedDict, total=False):
  """The keywords of :meth:`SM3.add_param_group`."""

  lr: float | optax.Schedule
  weight_decay: float


class ParamGroups:
  """What :class:`optax_sm3.brainstate.SM3` registers, group by group.

  Registration (:meth:`register_trainable_weights`), parameter groups
  (:meth:`add_param_group`) and the reads of their values, kept apart from
  the optimizer's rates and steps. The optimizer sets the attributes below in
  its constructor and gives each group its transformation (:meth:`_group_tx`).
  """

  param_states: ParamTree | None
  # As braintools types it: a group's entries are of different kinds (a
  # tree, a rate holder or an optax schedule, a float).
  param_groups: list[dict[str, Any]]
  opt_state: Holder[optax.OptState] | None
  param_groups_opt_states: list[Holder[optax.OptState]]
  step_count: Holder[jax.Array]
  weight_decay: float
  _uses_states: bool
  _is_state: Callable[[Any], bool]
  _schedule: Callable[[Any], Any] | None
  _current_lr: Any
  _base_lr: jax.typing.ArrayLike

  def _group_tx(
    self, group: dict[str, Any], index: int
  ) -> optax.GradientTransformation:
    raise NotImplementedError

  def _holder(self, value: Any) -> Any:
    if self._uses_states:
      return sys.modules["brainstate"].LongTermState(value)
    return Box(value)

  def _check_leaves(self, tree: Any, name: str, method: str) -> bool:
    """Whether ``tree`` holds States (else arrays); raises for anything else."""
    uses_states, self._is_state = leaf_kind(tree, name)
    if not uses_states and has_tracer(tree):
      raise traced_plain_mode_error(method)
    return uses_states

  def _group_of(self, key: Any) -> int | None:
    for index, group in enumerate(self.param_groups):
      if isinstance(group["params"], Mapping) and key in group["params"]:
        return index
    return None

  def register_trainable_weights(self, param_states: ParamTree) -> Self:
    """Registers the parameters to train (group 0) and initialises its state.

    Args:
      param_states: a pytree (e.g. ``model.states(brainstate.ParamState)``)
        whose leaves are ``brainstate.State`` objects, or, without
        brainstate, a pytree of arrays. A mapping is merged into group 0's
        parameters registered before, as braintools does; group 0's
        optimizer state starts afresh.

    Returns:
      ``self``.

    Raises:
      ImportError: if the leaves are not arrays and brainstate is missing.
      TypeError: for leaves that are neither States nor arrays, a tree
        mixing the two, or arrays under a JAX transformation.
      ValueError: for an empty tree, or a key already in another group.
    """
    uses_states = self._check_leaves(
      param_states, "param_states", "register_trainable_weights"
    )
    if uses_states:
      register_graph_node(type(self))
    if uses_states != self._uses_states and len(self.param_groups) > 1:
      raise TypeError("`param_states` must be of the kind registered before")
    same_kind = uses_states == self._uses_states and self.param_groups
    group0 = self.param_groups[0]["params"] if same_kind else None
    if isinstance(param_states, Mapping):
      taken = [k for k in param_states if (self._group_of(k) or 0) > 0]
      if taken:
        raise ValueError(f"parameters {taken} are already in other groups")
      # pyright narrows the recursive tree to a Mapping of unknown values
      # here, and then rejects the unpacking of it.
      group0 = {
        **(group0 if isinstance(group0, Mapping) else {}),
        **param_states,  # pyright: ignore[reportGeneralTypeIssues]
      }
    else:
      if len(self.param_groups) > 1:
        raise TypeError("with parameter groups, `param_states` must be a mapping")
      group0 = param_states
    if uses_states:
      others = [g["params"] for g in self.param_groups[1:]]
      check_unique_states([group0, *others], self._is_state)
    else:
      group0 = jax.tree.map(jnp.asarray, group0)
    self._uses_states = uses_states
    self.step_count = self._holder(jnp.asarray(self.step_count.value, jnp.int32))
    if self._current_lr is not None:
      self._current_lr = self._holder(self._current_lr.value)
    weight_decay = self.param_groups[0]["weight_decay"] if same_kind else None
    group = {
      "params": group0,
      "lr": self._schedule if self._schedule is not None else self._current_lr,
      "weight_decay": self.weight_decay if weight_decay is None else weight_decay,
    }
    opt_state = self._holder(self._group_tx(group, 0).init(self._values(group0)))
    self.param_groups[:1] = [group]
    self.opt_state = opt_state
    self.param_states = self._all_params()
    return self

  def add_param_group(
    self, params: Mapping[Any, ParamTree], **kwargs: Unpack[GroupOptions]
  ) -> None:
    """Adds a group of parameters with its own learning rate and weight decay.

    The group runs its own SM3 chain (own accumulators, momentum and step
    count), exactly as a separate ``SM3`` over ``params`` would; its
    parameters join :attr:`param_states` and :meth:`step` updates them.

    Args:
      params: a mapping of ``brainstate.State`` objects (or of arrays, in
        plain mode), with keys not registered before.
      **kwargs: ``lr`` (a float ``>= 0`` or an optax schedule; default
        :attr:`base_lr`, or the optax schedule given as ``lr``) and
        ``weight_decay`` (``>= 0``; default the constructor's).

    Raises:
      ValueError: if called before :meth:`register_trainable_weights`, for
        an empty ``params``, a parameter already in a group, or a
        hyperparameter out of range.
      TypeError: for another keyword, parameters of another kind than those
        registered, or a registered tree that is not a mapping.
    """
    if self.opt_state is None:
      raise ValueError(
        "register_trainable_weights must be called before add_param_group"
      )
    unknown = sorted(set(kwargs) - set(_GROUP_OPTIONS))
    if unknown:
      raise TypeError(
        f"add_param_group got {unknown}; a group sets only {list(_GROUP_OPTIONS)} "
        "(momentum, eps and clipping belong to the optimizer: make another "
        "SM3 for other values)"
      )
    if not isinstance(params, Mapping) or not isinstance(self.param_states, Mapping):
      raise TypeError(
        "add_param_group needs `params` and the registered parameters to be "
        f"mappings, got {type(params).__name__} and "
        f"{type(self.param_states).__name__}"
      )
    if self._check_leaves(params, "params", "add_param_group") != self._uses_states:
      raise TypeError("`params` must be of the kind registered (States or arrays)")
    taken = {k: self._group_of(k) for k in params if self._group_of(k) is not None}
    if taken:
      raise ValueError(
        "parameters already in a group (key: group index): "
        + ", ".join(f"{k!r}: {i}" for k, i in taken.items())
      )
    if self._uses_states:
      groups = [g["params"] for g in self.param_groups]
      check_unique_states([*groups, dict(params)], self._is_state)
    lr = kwargs.get(
      "lr", self._schedule if self._schedule is not None else self._base_lr
    )
    if is_scheduler(lr):
      raise TypeError(
        "a group's `lr` must be a float or an optax schedule; a braintools "
        "scheduler with one base_lr per group, given as the optimizer's `lr`, "
        "drives the groups' rates"
      )
    if not callable(lr):
      _validation.check_range("lr", lr, low=0.0)
      lr = self._holder(jnp.asarray(lr, jnp.float32))
    weight_decay = kwargs.get("weight_decay", self.weight_decay)
    _validation.check_range("weight_decay", weight_decay, low=0.0)
    params = dict(params)
    if not self._uses_states:
      params = jax.tree.map(jnp.asarray, params)
    group = {"params": params, "lr": lr, "weight_decay": weight_decay}
    tx = self._group_tx(group, len(self.param_groups))
    opt_state = self._holder(tx.init(self._values(params)))
    self.param_groups.append(group)
    self.param_groups_opt_states.append(opt_state)
    self.param_states = self._all_params()

  def _all_params(self) -> Any:
    first = self.param_groups[0]["params"]
    if not isinstance(first, Mapping):
      return first
    return {k: v for group in self.param_groups for k, v in group["params"].items()}

  def _values(self, params: Any) -> Any:
    if not self._uses_states:
      return params
    return jax.tree.map(lambda s: s.value, params, is_leaf=self._is_state)
