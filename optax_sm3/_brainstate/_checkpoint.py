""":class:`SM3`'s checkpoints: its state in braintools' layout, and back.

The checkpoint is checked whole against the registered groups before
anything is restored, so a mismatch leaves the optimizer as it was and the
message names the first leaf that differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_sm3 import _validation
from optax_sm3._brainstate._rates import is_schedule
from optax_sm3._brainstate._states import read


def state_dict(optimizer: Any) -> dict[str, Any]:
  """``optimizer.state_dict()``: read from its documented attributes."""
  groups = {}
  for index, group in enumerate(optimizer.param_groups):
    entry = {"weight_decay": read(group["weight_decay"])}
    if not is_schedule(group["lr"]):
      entry["lr"] = read(group["lr"])
    groups[str(index)] = entry
  return {
    "step_count": optimizer.step_count.value,
    "lr": optimizer.current_lr,
    "base_lr": optimizer.base_lr,
    "param_groups": groups,
    "param_groups_opt_states": {
      str(i): holder.value for i, holder in enumerate(optimizer.param_groups_opt_states)
    },
    "opt_state": None if optimizer.opt_state is None else optimizer.opt_state.value,
  }


def checked(
  optimizer: Any, state_dict: Mapping[str, Any], *, restores_lr: bool
) -> tuple[list[Any] | None, list[tuple[int, str, Any]]]:
  """What ``optimizer.load_state_dict(state_dict)`` restores, all checked.

  Args:
    optimizer: the :class:`SM3` to restore into (read, not changed).
    state_dict: the mapping from ``state_dict``.
    restores_lr: whether the optimizer's ``lr`` and ``base_lr`` come from
      the checkpoint (not for an optax schedule).

  Returns:
    The optax states of groups 0, 1, ... in the registered structures and
    dtypes (``None`` if the checkpoint holds none), and the groups' rates
    and weight decays as ``(group index, key, value)``.

  Raises:
    ValueError: see ``SM3.load_state_dict``.
  """
  saved = state_dict.get("opt_state")
  opt_state = optimizer.opt_state
  if saved is not None and opt_state is None:
    raise ValueError("register_trainable_weights must be called before load_state_dict")
  groups = state_dict.get("param_groups")
  group_states = state_dict.get("param_groups_opt_states")
  for name, found, count in (
    ("param_groups", groups, len(optimizer.param_groups)),
    (
      "param_groups_opt_states",
      group_states,
      len(optimizer.param_groups_opt_states),
    ),
  ):
    if found is not None and optimizer.opt_state is not None and len(found) != count:
      raise ValueError(
        f"`state_dict['{name}']` has {len(found)} entries, this optimizer "
        f"{count}: add the same parameter groups (add_param_group) before "
        "load_state_dict"
      )
  restored = None
  if saved is not None:
    restored = [_restore_like("state_dict['opt_state']", saved, opt_state.value)]
    for i, holder in enumerate(optimizer.param_groups_opt_states):
      if group_states is not None:
        restored.append(
          _restore_like(
            f"state_dict['param_groups_opt_states']['{i}']",
            group_states[str(i)],
            holder.value,
          )
        )
  hyper = []
  for i, entry in (groups or {}).items():
    for key in ("lr", "weight_decay"):
      if key in entry:
        _validation.check_range(f"param_groups[{i}]['{key}']", entry[key], low=0.0)
        hyper.append((int(i), key, entry[key]))
  if restores_lr and "lr" in state_dict:
    _validation.check_range("lr", state_dict["lr"], low=0.0)
  return restored, hyper


def _restore_like(name: str, saved: Any, template: Any) -> Any:
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
