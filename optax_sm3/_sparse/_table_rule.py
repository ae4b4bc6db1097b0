"""The rule of a table's row-sparse step, derived from the user's optimizer.

The sparse path takes the optimizer object the user built for the dense
path (one made by :func:`optax_sm3.sm3` or :func:`optax_sm3.sm3_recipe`):
its :class:`optax_sm3._sm3.SM3Spec` names its arguments and holds its
chain's stages. Here the spec is checked (:func:`optimizer_spec`), each
table's per-parameter options are resolved into a :class:`TableRule`
(:func:`table_rules`), and the rule says what the step keeps (momentum,
weight decay, aging accumulators), its sweep period, its cover and its
clipping. :mod:`optax_sm3._sparse._row_step` steps a table by its rule.

A stage with no exact row-sparse form (coupled weight decay, which gives
every row a gradient) is refused when the sparse path is built.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from optax_sm3 import _cover, _scale_by_sm3, _sm3, _tree, _validation
from optax_sm3._sparse import _batch

SWEEP_ROWS = 256
"""The most rows the default sweep brings up to date a step."""
MIN_SWEEP_PERIOD = 1024
"""The default sweep period of tables of fewer than ``1024 * SWEEP_ROWS`` rows."""

MIGRATION = (
  "pass the optimizer itself, as built for the dense path: what "
  "sparse_rows(learning_rate, momentum, beta, eps, weight_decay) did is "
  "sparse_rows(optax_sm3.sm3(learning_rate, momentum, beta, eps, "
  "weight_decay=weight_decay)), with momentum=0.0 written out where it was "
  "left at its default (sm3's momentum defaults to 0.9); or pass "
  "optax_sm3.sm3_recipe(learning_rate, total_steps)"
)


class TableRule(NamedTuple):
  """How one table is stepped, derived from the user's optimizer.

  Attributes:
    optimizer: :func:`optax_sm3.sm3` with the user's optimizer's arguments,
      its per-parameter options resolved for this table (``stacked_axes``
      an int, ``weight_decay_mask`` applied: the decay, or 0).
    spec: ``optimizer``'s :class:`optax_sm3._sm3.SM3Spec`.
    period: ``sweep_period``: an int ``>= 1``, or ``None`` for
      :func:`default_period` of the table's rows.
  """

  optimizer: optax.GradientTransformation
  spec: _sm3.SM3Spec
  period: int | None

  @property
  def keeps_momentum(self) -> bool:
    """Whether the optimizer keeps a momentum buffer."""
    return not _validation.is_static_zero(self.spec.momentum)

  @property
  def decays(self) -> bool:
    """Whether the table's weights decay (decoupled weight decay)."""
    return not _validation.is_static_zero(self.spec.weight_decay)

  @property
  def moves_rows(self) -> bool:
    """Whether rows outside the batch move (momentum or weight decay)."""
    return self.keeps_momentum or self.decays

  @property
  def settings(self) -> _batch.SM3Settings:
    """The preconditioner's arguments, for SM3 on the batch's rows."""
    spec = self.spec
    return _batch.SM3Settings(spec.beta, spec.bias_correction, spec.eps, spec.variant)

  @property
  def ages(self) -> bool:
    """Whether accumulators outside the batch change (``beta`` not 0)."""
    return _batch.ages(self.settings)

  @property
  def lazy(self) -> bool:
    """Whether rows are stored behind (a
    :class:`optax_sm3._sparse._row_step.SparseRowsState`)."""
    return self.moves_rows or self.ages

  def period_for(self, rows: int) -> int:
    """The sweep period of a table of ``rows`` rows."""
    return default_period(rows) if self.period is None else self.period


def default_period(rows: int) -> int:
  """The default sweep period: ``1024`` steps, or longer for tables of
  over ``1024 * SWEEP_ROWS`` rows, so that a step sweeps at most
  ``SWEEP_ROWS`` rows whatever the table's size."""
  return max(MIN_SWEEP_PERIOD, -(-rows // SWEEP_ROWS))


def optimizer_spec(optimizer: Any, name: str = "optimizer") -> _sm3.SM3Spec:
  """The spec of an optimizer the sparse path can take, or a clear error.

  Raises:
    TypeError: for anything not made by :func:`optax_sm3.sm3` or
      :func:`optax_sm3.sm3_recipe` (a learning rate, as the sparse front ends
      took before, says how to migrate).
    ValueError: for a stage with no exact row-sparse form.
  """
  spec = _sm3.spec_of(optimizer)
  if spec is None:
    if isinstance(optimizer, optax.GradientTransformation):
      raise TypeError(
        f"`{name}` must be an optimizer made by optax_sm3.sm3 or "
        "optax_sm3.sm3_recipe (the sparse path derives its row-sparse step "
        "from it), got another optax transformation; a chain or wrapper "
        "around sm3 (optax.chain, optax.inject_hyperparams) has no exact "
        "row-sparse form known to optax-sm3"
      )
    raise TypeError(
      f"`{name}` must be an optimizer made by optax_sm3.sm3 or "
      f"optax_sm3.sm3_recipe, got {type(optimizer).__name__} {optimizer!r}: "
      f"{MIGRATION}"
    )
  if spec.weight_decay_mode == "coupled" and not _validation.is_static_zero(
    spec.weight_decay
  ):
    raise ValueError(
      f"`{name}` has coupled weight decay (weight_decay_mode='coupled', the "
      "stage add_decayed_weights before scale_by_sm3): it adds weight_decay * "
      "params to every row's gradient, so every row of a table has a gradient "
      "at every step and there is no row-sparse step. Use "
      "weight_decay_mode='decoupled' (the default) for the tables, or train "
      "them densely"
    )
  return spec


def table_rule(
  spec: _sm3.SM3Spec, *, stacked: int, decays: bool, period: int | None
) -> TableRule:
  """The rule of one table: the optimizer's arguments with its options resolved."""
  fields = spec._asdict()
  del fields["stages"]
  fields.update(
    stacked_axes=stacked,
    weight_decay_mask=None,
    weight_decay=spec.weight_decay if decays else 0.0,
  )
  optimizer = _sm3.sm3(**fields)
  made = _sm3.spec_of(optimizer)
  assert made is not None  # sm3 records every optimizer it makes
  return TableRule(optimizer, made, period)


def table_rules(
  spec: _sm3.SM3Spec, tree: Any, positions: list[int], period: int | None
) -> list[TableRule]:
  """The rule of each table leaf (at ``positions`` of ``tree``'s leaves).

  ``stacked_axes`` and ``weight_decay_mask`` are resolved against ``tree``,
  as the dense optimizer resolves them against the parameters it is given.
  """
  treedef = jax.tree.structure(tree)
  stacked = treedef.flatten_up_to(
    _scale_by_sm3.per_param(spec.stacked_axes, tree, "stacked_axes")
  )
  if spec.weight_decay_mask is None:
    mask = [True] * treedef.num_leaves
  else:
    mask = _tree.flatten_like(
      treedef,
      _tree.resolve(spec.weight_decay_mask, tree),
      "`weight_decay_mask` must have the structure of the parameters",
    )
  decays = not _validation.is_static_zero(spec.weight_decay)
  return [
    table_rule(spec, stacked=stacked[p], decays=decays and bool(mask[p]), period=period)
    for p in positions
  ]


def check_sweep_period(sweep_period: Any) -> int | None:
  """``sweep_period`` as an int ``>= 1`` or ``None``, or a ``ValueError``."""
  if sweep_period is None:
    return None
  if (
    isinstance(sweep_period, bool)
    or not isinstance(sweep_period, (int, np.integer))
    or sweep_period < 1
  ):
    raise ValueError(
      f"`sweep_period` must be an int >= 1 or None, got {sweep_period!r}"
    )
  return int(sweep_period)


def clip(spec: _sm3.SM3Spec, grads: Any) -> Any:
  """The optimizer's clipping stages on a tree of (row) gradients, jointly.

  Exact on rows: the rows outside a batch hold zeros, which add nothing to
  a global norm and which clipping by value keeps.
  """
  for stage in spec.stages.clip:
    grads, _ = stage.update(grads, stage.init(grads))
  return grads


def cover_of(rule: TableRule, shape: tuple[int, ...]) -> _cover.Cover:
  """The table's cover, as the optimizer's preconditioner chooses it."""
  spec = rule.spec
  return _cover.make_cover(
    shape,
    stacked_axes=spec.stacked_axes,
    merge_axes_up_to=spec.merge_axes_up_to,
    skip_unit_axes=spec.skip_unit_axes,
  )
