"""optax_sm3._layout: each state type declares its layout, _sharding asks."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

import optax_sm3
from optax_sm3 import _layout


class _RowScaleState(NamedTuple):
  """A new state: one scale per row of each parameter, and a counter."""

  count: jax.Array
  row_scales: Any


def _row_scale() -> optax.GradientTransformation:
  def init_fn(params):
    return _RowScaleState(
      jnp.zeros([], jnp.int32), jax.tree.map(lambda p: jnp.ones(p.shape[:1]), params)
    )

  def update_fn(updates, state, params=None):
    del params
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def _row_scale_specs(state, layout):
  rows = layout.treedef.unflatten(
    [
      P(*_layout.entries(spec, len(shape))[:1])
      for shape, spec in zip(layout.shapes, layout.specs, strict=True)
    ]
  )
  return _RowScaleState(count=_layout.replicated(state.count), row_scales=rows)


def test_a_new_state_type_adds_its_rule_and_nothing_else():
  params = {"emb": jnp.zeros((8, 4)), "w": jnp.zeros((4, 2))}
  specs = {"emb": P("model", None), "w": P(None, "model")}
  tx = optax.chain(_row_scale(), optax_sm3.sm3(0.1, momentum=0.9))
  before = optax_sm3.state_partition_specs(tx, params, specs)[0]
  # Unregistered, the row scales match no rule and no parameter: replicated.
  assert before.row_scales == {"emb": P(), "w": P()}
  _layout.register(_RowScaleState, _row_scale_specs)
  try:
    row_state, sm3_state = optax_sm3.state_partition_specs(tx, params, specs)
  finally:
    del _layout._RULES[_RowScaleState]
  assert row_state.count == P()
  assert row_state.row_scales == {"emb": P("model"), "w": P(None)}
  # The library's own rules still apply around it.
  assert sm3_state[0].accumulators["emb"] == (P("model"), P(None))
  assert sm3_state[1].momentum["w"] == P(None, "model")


def test_every_library_state_with_a_layout_declares_it():
  for state_type in (
    optax_sm3.ScaleBySM3State,
    optax_sm3.ScaleByMomentumState,
    optax_sm3.SparseRowsState,
    optax_sm3.SparseTablesState,
  ):
    assert state_type in _layout._RULES, state_type.__name__


def test_a_subclass_takes_its_base_rule():
  class Sub(optax_sm3.ScaleByMomentumState):
    pass

  layout = _layout.ParamLayout(jax.tree.structure({"w": 0}), [(4, 2)], [P("m")])
  state = Sub({"w": jax.ShapeDtypeStruct((4, 2), jnp.float32)})
  assert layout.specs_of(state) == optax_sm3.ScaleByMomentumState({"w": P("m")})
