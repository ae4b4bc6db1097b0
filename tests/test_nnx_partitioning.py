"""Flax's sharding idiom: parameters boxed with partitioning metadata.

``nnx.Optimizer(model, tx, wrt=nnx.Param)`` over kernels made with
``nnx.with_partitioning`` (and a linen ``TrainState`` over
``nn.with_partitioning`` parameters) gives the state's arrays the boxes and
metadata of the parameters. Each SM3 accumulator gets a box of its own with
the parameter's entries for the axes it indexes. The metadata and update
checks run here on one device; the 8-device checks (actual shardings under
``jax.set_mesh``, Flax's specs, results against one device) run once in
``tests/_nnx_partitioning_worker.py``.
"""

from __future__ import annotations

import pathlib
import sys

import _subprocess
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import optax_sm3

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

from optax_sm3._sparse import _nnx_check as _state_check  # noqa: E402  (needs flax)

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import _nnx_partitioning_worker as worker  # noqa: E402


def _param(shape, names, seed=0):
  value = jax.random.normal(jax.random.key(seed), shape)
  # No mesh here: the metadata without Flax applying it.
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _names(tree):
  """``out_sharding`` of every Variable in ``tree`` (``None`` where absent)."""
  return [
    v.get_metadata("out_sharding", None)
    for v in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
  ]


@pytest.mark.parametrize(
  ("shape", "names", "kwargs", "expected"),
  [
    ((16, 8), ("data", "model"), {}, [("data",), ("model",)]),
    ((16, 8), ("data", None), {}, [("data",), (None,)]),
    ((16,), ("model",), {}, [("model",)]),
    ((4, 16, 8), ("layers", "data", "model"), {"stacked_axes": 1},
     [("layers", "data"), ("layers", "model")]),
    ((3, 3, 8, 16), (None, None, "data", "model"), {"merge_axes_up_to": 9},
     [(None, None), ("data",), ("model",)]),
    ((16, 1, 8), ("data", None, "model"), {"skip_unit_axes": True},
     [("data",), ("model",)]),
    ((16, 8), P("data", "model"), {}, [P("data"), P("model")]),
  ],
)  # fmt: skip
def test_each_accumulator_carries_its_axes_names(shape, names, kwargs, expected):
  params = nnx.State({"w": _param(shape, names)})
  state = optax_sm3.scale_by_sm3(**kwargs).init(params)
  accumulators = state.accumulators["w"]
  assert isinstance(accumulators, tuple)
  assert all(isinstance(a, nnx.Param) for a in accumulators)
  assert _names(accumulators) == expected
  plain = optax_sm3.scale_by_sm3(**kwargs).init({"w": jnp.zeros(shape)})
  assert [a.shape for a in accumulators] == [a.shape for a in plain.accumulators["w"]]
  # Every other piece of metadata is the parameter's.
  assert accumulators[0].get_metadata("eager_sharding") is False


def test_metadata_agrees_with_state_partition_specs():
  shapes = {
    "a": ((16, 8), ("x", "y")),
    "b": ((8, 4, 2), (None, "y", "x")),
    "c": ((4,), None),
  }
  params = nnx.State(
    {k: _param(s, n) if n else nnx.Param(jnp.zeros(s)) for k, (s, n) in shapes.items()}
  )
  tx = optax_sm3.sm3(0.1, momentum=0.9)
  specs = nnx.get_partition_spec(tx.init(params))
  plain = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, (s, _) in shapes.items()}
  want = optax_sm3.state_partition_specs(
    tx, plain, {k: P(*n) if n else P() for k, (_, n) in shapes.items()}
  )
  got = jax.tree.leaves(nnx.as_pure(specs), is_leaf=lambda x: isinstance(x, P))
  want = jax.tree.leaves(want, is_leaf=lambda x: isinstance(x, P))
  assert [worker.normalized(s) for s in got] == [worker.normalized(s) for s in want]


def test_state_partition_specs_reads_through_boxes():
  params = nnx.State({"a": _param((16, 8), ("x", "y")), "b": nnx.Param(jnp.zeros(4))})
  tx = optax_sm3.sm3(0.1, momentum=0.9)
  got = optax_sm3.state_partition_specs(tx, params, nnx.get_partition_spec(params))
  plain = {"a": jnp.zeros((16, 8)), "b": jnp.zeros(4)}
  want = optax_sm3.state_partition_specs(tx, plain, {"a": P("x", "y"), "b": P()})
  assert got == want
  # linen boxes, specs from nn.get_partition_spec.
  boxed = {"a": nn.Partitioned(jnp.zeros((16, 8)), names=("x", "y"))}
  got = optax_sm3.state_partition_specs(tx, boxed, nn.get_partition_spec(boxed))
  assert got[0].accumulators["a"] == (P("x"), P("y"))


def test_plain_parameters_keep_their_state_tree():
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
  state = optax_sm3.scale_by_sm3().init(params)
  assert jax.tree.structure(state.accumulators) == jax.tree.structure(
    {"w": (0, 0), "b": (0,)}
  )


def test_boxed_update_equals_plain_update_and_keeps_the_boxes():
  values = {"w": jax.random.normal(jax.random.key(0), (6, 5)), "b": jnp.arange(5.0)}
  grads = {k: jnp.cos(v) for k, v in values.items()}
  boxed = lambda tree: {
    "w": nn.Partitioned(tree["w"], names=("data", "model")),
    "b": nn.Partitioned(tree["b"], names=("model",)),
  }
  tx = optax_sm3.sm3(0.1, momentum=0.9)
  plain_state, boxed_state = tx.init(values), tx.init(boxed(values))
  assert nn.get_partition_spec(boxed_state)[0].accumulators["w"] == (
    P("data"),
    P("model"),
  )
  for _ in range(3):
    plain_updates, plain_state = tx.update(grads, plain_state, values)
    updates, new_state = tx.update(boxed(grads), boxed_state, boxed(values))
    assert jax.tree.structure(new_state) == jax.tree.structure(boxed_state)
    assert isinstance(updates["w"], nn.Partitioned)
    boxed_state = new_state
  for got, want in zip(
    jax.tree.leaves(nn.unbox(boxed_state)), jax.tree.leaves(plain_state), strict=True
  ):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(nn.unbox(updates)["w"], plain_updates["w"])


def test_nnx_optimizer_steps_with_annotated_kernels_on_one_device():
  class Model(nnx.Module):
    def __init__(self):
      self.w = _param((8, 4), ("data", "model"))

  model = Model()
  optimizer = nnx.Optimizer(model, optax_sm3.sm3(0.1, momentum=0.9), wrt=nnx.Param)
  before = model.w[...]
  grads = nnx.grad(lambda m: jnp.sum(m.w[...] ** 2))(model)
  optimizer.update(model, grads)
  assert float(jnp.max(jnp.abs(model.w[...] - before))) > 1e-3
  assert _names(optimizer.opt_state[0].accumulators["w"]) == [("data",), ("model",)]


# ---------------------------------------------------------------------------
# nnx.update of a state saved with other hyperparameters.


class _Linear(nnx.Module):
  def __init__(self):
    self.l = nnx.Linear(4, 3, rngs=nnx.Rngs(0))


def _optimizer(momentum):
  model = _Linear()
  return nnx.Optimizer(model, optax_sm3.sm3(0.1, momentum=momentum), wrt=nnx.Param)


def test_matching_state_passes_the_check():
  target, saved = _optimizer(0.9), _optimizer(0.9)
  assert _state_check.state_mismatch(target, nnx.state(saved)) is None
  _state_check.checked_update(target, nnx.state(saved))


@pytest.mark.parametrize(
  ("target", "saved", "says"),
  [
    (0.0, 0.9, "saved from an optimizer built with momentum != 0"),
    (0.9, 0.0, "saved from an optimizer built with momentum=0"),
  ],
)
def test_momentum_mismatch_is_explained(target, saved, says):
  target, saved = _optimizer(target), _optimizer(saved)
  message = _state_check.state_mismatch(target, nnx.state(saved))
  assert says in message
  assert "opt_state/1/momentum/l/kernel" in message
  assert "build the optimizer with the hyperparameters" in message
  with pytest.raises(ValueError, match="does not fit"):
    _state_check.checked_update(target, nnx.state(saved))


def _sparse(momentum, rows=64):
  from optax_sm3 import nnx as sparse_nnx

  model = sparse_nnx.SparseEmbed(rows, 4, rngs=nnx.Rngs(0))
  sparse_nnx.SparseOptimizer(
    model, optax.sgd(0.1), optax_sm3.sm3(0.1, momentum=momentum)
  )
  return model


def test_sparse_table_layout_mismatch_is_explained():
  message = _state_check.state_mismatch(_sparse(0.0), nnx.state(_sparse(0.9)))
  assert "saved with momentum, weight decay or beta > 0 (a SparseRowsState)" in message
  message = _state_check.state_mismatch(_sparse(0.9), nnx.state(_sparse(0.0)))
  assert "saved with momentum=0, weight_decay=0 and beta=0" in message
  with pytest.raises(ValueError, match="sparse_state"):
    _state_check.checked_update(_sparse(0.9), nnx.state(_sparse(0.0)))
  # Flax's own message for the same update names neither.
  with pytest.raises(ValueError, match="immutable node") as info:
    nnx.update(_sparse(0.0), nnx.state(_sparse(0.9)))
  assert "momentum" not in str(info.value)


def test_sparse_table_shape_mismatch_names_both_shapes():
  message = _state_check.state_mismatch(_sparse(0.9), nnx.state(_sparse(0.9, rows=32)))
  assert (
    "sparse_state/last: the optimizer holds (64,) int32, the state (32,) int32"
    in (message)
  )


def test_parameters_only_update_is_not_checked():
  target, saved = _optimizer(0.0), _optimizer(0.9)
  # No optimizer state in the update: nothing to compare.
  assert _state_check.state_mismatch(target, nnx.state(saved, nnx.Param)) is None


# ---------------------------------------------------------------------------
# 8 CPU devices, in one subprocess.

_NNX_RUNS = [f"nnx/auto/{t}" for t in worker.TXS] + ["nnx/explicit/sm3"]
_LINEN_RUNS = [f"linen/{t}" for t in worker.TXS]


@pytest.fixture(scope="module")
def multi_device():
  return _subprocess.run_json_worker("_nnx_partitioning_worker.py", timeout=600)


@pytest.mark.parametrize("run", _NNX_RUNS)
@pytest.mark.slow
def test_nnx_optimizer_state_lands_where_state_shardings_puts_it(multi_device, run):
  result = multi_device[run]
  assert result["after_init"] == result["expected"]
  assert result["metadata"] == result["expected"]  # nnx.get_partition_spec
  assert result["named_sharding_matches"]  # nnx.get_named_sharding
  assert result["after_steps"] == result["expected"]
  # The (16, 8) kernel on ("data", "model") of 2 x 4: rows 16 / 2, columns
  # 8 / 4; the recipe merges it into one accumulator of 128 / 8 per device.
  assert result["elements"] == ([[16]] if run.endswith("recipe") else [[8], [2]])
  assert result["diff"] <= 1e-5
  assert result["moved"] > 1e-2
  # jax.jit(tx.init, out_shardings=state_shardings(tx, nnx.state(model),
  # nnx.get_named_sharding(...))) on the boxed parameters.
  assert result["jitted_init"] == result["expected"]


@pytest.mark.parametrize("run", _LINEN_RUNS)
@pytest.mark.slow
def test_linen_train_state_specs_and_shardings(multi_device, run):
  result = multi_device[run]
  assert result["metadata"] == result["expected"]  # nn.get_partition_spec
  assert result["after_init"] == result["expected"]
  assert result["after_steps"] == result["expected"]
  assert result["structure_stable"]
  assert result["diff"] <= 1e-5
  assert result["moved"] > 1e-2
