"""Resuming from an ``optax.sm3`` checkpoint: its state in our layout."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_sm3 import _momentum, _scale_by_sm3, _tree

T = TypeVar("T")


def _find(tree: optax.OptState, kind: type[T], what: str) -> T:
  nodes = [
    node
    for node in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, kind))
    if isinstance(node, kind)
  ]
  if len(nodes) != 1:
    raise ValueError(
      f"{what} must hold exactly one {kind.__name__}, found {len(nodes)}"
    )
  return nodes[0]


def _replace(
  tree: optax.OptState, kind: type[T], make: Callable[[T], object]
) -> optax.OptState:
  return jax.tree.map(
    lambda node: make(node) if isinstance(node, kind) else node,
    tree,
    is_leaf=lambda x: isinstance(x, kind),
  )


def from_optax_sm3(
  optax_state: optax.OptState,
  params: optax.Params,
  optimizer: optax.GradientTransformation,
  *,
  step: int = 0,
) -> optax.OptState:
  """Converts an ``optax.sm3`` state into ``optimizer``'s, to resume training.

  ``optax.sm3(lr, momentum)`` keeps, per parameter of shape
  :math:`(d_1, \\dots, d_k)`, a *list* of :math:`k` per-axis accumulators in
  the parameter's dtype (``mu``) and a full-size momentum buffer (``nu``),
  in an :class:`optax.ScaleBySM3State`. This returns ``optimizer.init(params)``
  with the accumulators copied in (as float32, or ``accumulator_dtype``), the
  momentum buffer copied in when ``optimizer`` keeps one (with
  ``momentum=0`` it keeps none, and ``nu`` is dropped: ``optax.sm3`` stores
  the last update there even at momentum 0), and every step counter (SM3's
  and the learning-rate schedule's) set to ``step``, since ``optax.sm3``
  counts no steps. Training then continues exactly where it stopped:
  ``optax_sm3.sm3(lr, momentum)`` takes the same steps as ``optax.sm3``.

  Args:
    optax_state: a state of ``optax.sm3`` or of a chain holding one
      ``optax.scale_by_sm3``.
    params: the parameters the state belongs to.
    optimizer: the ``optax_sm3`` optimizer to resume with (e.g.
      ``optax_sm3.sm3(lr, momentum=0.9)``), with the default per-axis cover
      (no ``stacked_axes``, ``merge_axes_up_to`` or ``skip_unit_axes``: other
      covers keep other statistics, which ``optax.sm3`` never had).
    step: the number of steps already taken, for schedules.

  Returns:
    ``optimizer``'s state.

  Raises:
    ValueError: if either state does not hold exactly one SM3 state, or an
      accumulator's shape does not match (the message names the
      parameter's tree path).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_sm3
    >>> params = {"w": jnp.ones((3, 2))}
    >>> grads = {"w": jnp.arange(6.0).reshape(3, 2)}
    >>> theirs = optax.sm3(0.1, momentum=0.9)
    >>> old = theirs.init(params)
    >>> for _ in range(3):
    ...   _, old = theirs.update(grads, old, params)
    >>> ours = optax_sm3.sm3(0.1, momentum=0.9)
    >>> state = optax_sm3.from_optax_sm3(old, params, ours, step=3)
    >>> u_ours, _ = ours.update(grads, state, params)
    >>> u_theirs, _ = theirs.update(grads, old, params)
    >>> bool(jnp.allclose(u_ours["w"], u_theirs["w"], rtol=1e-6))
    True
  """
  source = _find(optax_state, optax.ScaleBySM3State, "`optax_state`")
  state = optimizer.init(params)
  target = _find(state, _scale_by_sm3.ScaleBySM3State, "`optimizer`'s state")
  treedef = jax.tree.structure(params)
  paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  message = "`optax_state` does not belong to `params` (tree structure)"
  their_mu = _tree.flatten_like(treedef, source.mu, message)
  their_nu = _tree.flatten_like(treedef, source.nu, message)
  ours = treedef.flatten_up_to(target.accumulators)
  converted = []
  for path, mu, acc in zip(paths, their_mu, ours, strict=True):
    where = jax.tree_util.keystr(path)
    mu = list(mu)
    if not mu:  # a scalar: optax.sm3 cannot step it, its statistics are 0
      converted.append(tuple(jnp.zeros_like(a) for a in acc))
      continue
    shapes = [tuple(np.shape(m)) for m in mu]
    if shapes != [tuple(a.shape) for a in acc]:
      raise ValueError(
        f"accumulators at {where}: optax.sm3 has shapes {shapes}, the optimizer "
        f"{[tuple(a.shape) for a in acc]}; convert into an optimizer with the "
        "default per-axis cover (no stacked_axes, merge_axes_up_to or "
        "skip_unit_axes)"
      )
    converted.append(
      tuple(jnp.asarray(m, a.dtype) for m, a in zip(mu, acc, strict=True))
    )
  count = jnp.asarray(step, jnp.int32)
  state = _replace(
    state,
    _scale_by_sm3.ScaleBySM3State,
    lambda node: _scale_by_sm3.ScaleBySM3State(count, treedef.unflatten(converted)),
  )

  def momentum(node):
    if node.momentum is None:
      return node
    buffers = treedef.flatten_up_to(node.momentum)
    return _momentum.ScaleByMomentumState(
      treedef.unflatten(
        [jnp.asarray(n, b.dtype) for n, b in zip(their_nu, buffers, strict=True)]
      )
    )

  state = _replace(state, _momentum.ScaleByMomentumState, momentum)
  return _replace(
    state,
    optax.ScaleByScheduleState,
    lambda node: optax.ScaleByScheduleState(jnp.full_like(node.count, step)),
  )
