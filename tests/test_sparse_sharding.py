"""Row-sharded embedding tables trained by optax_sm3.sparse_rows.

The state specs of a ``SparseRows`` are tested here in the single-device
process; the 8-device checks (results, per-device bytes, collectives in the
compiled step) run once in ``tests/_sparse_sharding_worker.py``.
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
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_sm3
from optax_sm3 import _lazy_rows

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import _sparse_sharding_worker as worker  # noqa: E402


@pytest.mark.parametrize(
  ("shape", "spec", "accumulators", "momentum"),
  [
    ((64, 8), P("m", None), (P("m"), P(None)), P(None, "m", None)),
    ((64, 8), P("m", "x"), (P("m"), P("x")), P(None, "m", "x")),
    ((64,), P("m"), (P("m"),), P(None, "m")),
    ((64, 4, 8), P("m", None, "x"), (P("m"), P(None), P("x")), P(None, "m", None, "x")),
    ((64, 8), P(("m", "d")), (P(("m", "d")), P(None)), P(None, ("m", "d"), None)),
    ((64, 8), None, (P(None), P(None)), P(None, None, None)),
  ],
)
def test_lazy_state_follows_the_table_rows(shape, spec, accumulators, momentum):
  rows = optax_sm3.sparse_rows(optax_sm3.sm3(0.1, momentum=0.9, weight_decay=0.01))
  state = optax_sm3.state_partition_specs(rows, jnp.zeros(shape), spec)
  assert isinstance(state, optax_sm3.SparseRowsState)
  assert state.accumulators == accumulators
  assert state.momentum == momentum
  assert state.last == P(accumulators[0][0])
  assert state.count == P()
  assert all(s == P() for s in state.coefficients)


def test_decay_only_state_has_no_momentum_spec():
  rows = optax_sm3.sparse_rows(optax_sm3.sm3(0.1, momentum=0.0, weight_decay=0.01))
  state = optax_sm3.state_partition_specs(rows, jnp.zeros((16, 4)), P("m", None))
  assert state.momentum is None
  assert state.last == P("m")


def test_dense_layout_state_is_sm3s():
  # Without momentum and decay the state is sm3's chain state, specs included.
  table = jax.ShapeDtypeStruct((64, 8), jnp.float32)
  rows = optax_sm3.sparse_rows(optax_sm3.sm3(0.1, momentum=0.0))
  got = optax_sm3.state_partition_specs(rows, table, P("m", None))
  assert got == optax_sm3.state_partition_specs(
    optax_sm3.sm3(0.1, momentum=0.0), table, P("m", None)
  )
  assert got[0].accumulators == (P("m"), P(None))


def test_state_shardings_of_sparse_rows():
  mesh = jax.make_mesh(
    (1,), ("model",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1]
  )
  rows = optax_sm3.sparse_rows(optax_sm3.sm3(0.1, momentum=0.9))
  table = jnp.ones((16, 4))
  table_sh = NamedSharding(mesh, P("model", None))
  out = optax_sm3.state_shardings(rows, table, table_sh)
  assert out.momentum == NamedSharding(mesh, P(None, "model", None))
  assert out.last == NamedSharding(mesh, P("model"))
  state = jax.jit(rows.init, out_shardings=out)(table)
  assert jax.tree.leaves(jax.tree.map(lambda x: x.sharding, state)) == (
    jax.tree.leaves(out)
  )
  step = jax.jit(rows.update, out_shardings=(table_sh, out))
  table, state = step(jnp.array([3, 3]), jnp.ones((2, 4)), state, table)
  assert state.last.sharding == out.last
  np.testing.assert_array_equal(state.accumulators[0][3], 4.0)


def test_bad_arguments():
  rows = optax_sm3.sparse_rows(optax_sm3.sm3(0.1, momentum=0.9))
  two = {"a": jnp.zeros((4, 2)), "b": jnp.zeros((4, 2))}
  with pytest.raises(ValueError, match="`params` must be the table"):
    optax_sm3.state_partition_specs(rows, two, {"a": P(), "b": P()})
  with pytest.raises(ValueError, match=r"param_specs.*rank 2"):
    optax_sm3.state_partition_specs(rows, jnp.zeros((4, 2)), P("m", None, None))


def _tables_opt(momentum, **kwargs):
  table_tx = optax_sm3.sm3(0.1, momentum=momentum)
  return optax_sm3.sparse_tables(optax.adam(0.1), table_tx, **kwargs)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sparse_tables_state_follows_each_table_and_the_rest(momentum):
  params = {
    "a": jax.ShapeDtypeStruct((64, 8), jnp.float32),
    "table": jax.ShapeDtypeStruct((1024, 8), jnp.float32),
    "w": jax.ShapeDtypeStruct((8, 4), jnp.float32),
  }
  specs = {"a": P(None, "x"), "table": P("m", None), "w": P(None, "m")}
  opt = _tables_opt(momentum, tables={"a": False, "table": True, "w": False})
  got = optax_sm3.state_partition_specs(opt, params, specs)
  # Each table's specs are sparse_rows' own for that table.
  rows = optax_sm3.sparse_rows(optax_sm3.sm3(0.1, momentum=momentum))
  assert got.tables == (
    optax_sm3.state_partition_specs(rows, params["table"], specs["table"]),
  )
  table_state = got.tables[0]
  accumulators = table_state.accumulators if momentum else table_state[0].accumulators
  assert accumulators == (P("m"), P(None))
  # The rest's state (tx over the params with the tables set to None).
  adam = got.rest[0]
  assert adam.mu == {"a": P(None, "x"), "table": None, "w": P(None, "m")}
  assert adam.nu == adam.mu


def test_sparse_tables_two_tables_in_leaf_order():
  params = {
    "a": jax.ShapeDtypeStruct((512, 8), jnp.float32),
    "b": jax.ShapeDtypeStruct((8, 4), jnp.float32),
    "c": jax.ShapeDtypeStruct((256, 8), jnp.float32),
  }
  specs = {"a": P("m"), "b": P(), "c": P(None, "m")}
  opt = _tables_opt(0.9, tables=lambda p: {"a": True, "b": False, "c": True})
  got = optax_sm3.state_partition_specs(opt, params, specs)
  assert [t.last for t in got.tables] == [P("m"), P(None)]
  assert [t.accumulators for t in got.tables] == [(P("m"), P(None)), (P(None), P("m"))]


def test_sparse_tables_same_shapes_same_specs_are_fine():
  shape = jax.ShapeDtypeStruct((128, 8), jnp.float32)
  params = {"a": shape, "b": shape}
  opt = _tables_opt(0.9, tables={"a": False, "b": True})
  got = optax_sm3.state_partition_specs(opt, params, {"a": P("m"), "b": P("m")})
  assert got.tables[0].last == P("m")
  assert got.rest[0].mu == {"a": P("m"), "b": None}


def test_sparse_tables_of_one_shape_told_apart_by_the_rest_state():
  shape = jax.ShapeDtypeStruct((128, 8), jnp.float32)
  params = {"a": shape, "b": shape}
  specs = {"a": P("m"), "b": P(None, "m")}
  # Adam's moments over the rest have None at the table: that tells them apart.
  opt = _tables_opt(0.9, tables={"a": False, "b": True})
  got = optax_sm3.state_partition_specs(opt, params, specs)
  assert got.tables[0].last == P(None)
  assert got.tables[0].accumulators == (P(None), P("m"))
  assert got.rest[0].mu == {"a": P("m"), "b": None}
  # sgd's state holds no such tree: the layout cannot be told, and says so.
  opt = optax_sm3.sparse_tables(
    optax.sgd(0.1), optax_sm3.sm3(0.1, momentum=0.9), tables={"a": False, "b": True}
  )
  with pytest.raises(ValueError, match="cannot be told"):
    optax_sm3.state_partition_specs(opt, params, specs)


# ---------------------------------------------------------------------------
# 8 CPU devices, in one subprocess.

_RUNS = [f"{mesh}/{config}" for mesh in worker.MESHES for config in worker.CONFIGS]


@pytest.fixture(scope="module")
def multi_device():
  return _subprocess.run_json_worker("_sparse_sharding_worker.py")


@pytest.mark.parametrize("run", _RUNS)
@pytest.mark.slow
def test_sharded_steps_match_one_device(multi_device, run):
  result = multi_device[run]
  assert result["rows_diff"] <= 1e-6
  assert result["table_diff"] <= 1e-6
  assert result["accumulator_diff"] <= 1e-6
  assert result["moved"] > 1e-2  # the comparison is not vacuous
  # Without momentum only the batches' rows move; with it every row does.
  assert result["rows_moved"] == (worker.ROWS if run.endswith("0.9") else 116)
  assert result["types_stable"]


@pytest.mark.parametrize("run", _RUNS)
@pytest.mark.slow
def test_table_and_row_state_cost_one_nth_per_device(multi_device, run):
  result = multi_device[run]
  expected = {"table": "P('model', None)", "row_accumulators": "P('model',)"}
  if run.endswith("0.9"):
    expected |= {"momentum": "P(None, 'model', None)", "last": "P('model',)"}
  assert result["specs"] == expected
  ways = result["row_ways"]
  assert ways == (8 if run.startswith("8/") else 4)
  for name, whole in result["whole_bytes"].items():
    assert result["bytes"][name] == [whole // ways], name
  # Replicated: the counter, the column accumulator and the catch-up ring.
  replicated = result["replicated"]
  block, blocks = _lazy_rows.geometry(worker.SWEEP_PERIOD)
  ring = 4 * 5 * (block + 1) * blocks if run.endswith("0.9") else 0
  assert sum(replicated.values()) == 4 + 4 * worker.DIM + ring, replicated
  assert result["replicated_specs"] == ["P()", "P(None,)"]


@pytest.mark.parametrize("run", _RUNS)
@pytest.mark.slow
def test_no_table_sized_collective(multi_device, run):
  result = multi_device[run]
  found = result["collectives"]
  shard = worker.ROWS * worker.DIM // result["row_ways"]
  batch_rows = worker.K + worker.ROWS // worker.SWEEP_PERIOD  # batch + sweep
  # The batch's rows live on some shard each: they must be combined.
  assert any(c["op"] == "all-reduce" for c in found["update"]), found
  for program, bound in [
    ("update", batch_rows * worker.DIM),
    ("lookup", len(worker.PROBE) * worker.DIM),
  ]:
    for c in found[program]:
      assert c["op"] in ("all-reduce", "all-gather"), (program, c)
      assert c["elements"] <= bound < shard, (program, c)
      if c["op"] == "all-gather":  # only the data-parallel ids
        assert c["elements"] <= worker.K, (program, c)
  assert found["sync"] == []  # row-local


@pytest.mark.slow
def test_explicit_mode_through_auto_axes(multi_device):
  result = multi_device["explicit"]
  assert result["after_init"] == result["after_update"] == result["after_sync"]
  assert "float32[1024@model,16]" in result["after_init"]  # the table
  assert "float32[1,1024@model,16]" in result["after_init"]  # its momentum
  assert "int32[1024@model]" in result["after_init"]  # last
  assert result["rows_diff"] <= 1e-6
  assert result["table_diff"] <= 1e-6


@pytest.mark.slow
def test_nnx_sparse_optimizer_on_a_row_sharded_table(multi_device):
  result = multi_device["nnx"]
  if result is None:
    pytest.skip("flax is not installed")
  assert result["diff"] <= 1e-6
  assert result["moved"] > 1e-2
  shard = worker.ROWS * worker.DIM * 4 // 8
  assert result["table_bytes"] == result["momentum_bytes"] == [shard]
  assert result["last_bytes"] == [worker.ROWS * 4 // 8]


@pytest.mark.slow
def test_hlo_check_sees_a_full_gather(multi_device):
  assert {"op": "all-gather", "elements": worker.ROWS * worker.DIM} in multi_device[
    "control"
  ]


@pytest.mark.parametrize("config", list(worker.CONFIGS))
@pytest.mark.slow
def test_sparse_tables_2_20_rows_keep_one_eighth_per_device(multi_device, config):
  result = multi_device[f"tables/{config}"]
  expected = {"row_accumulators": "P('model',)"}
  if config == "0.9":
    expected |= {"last": "P('model',)", "momentum": "P(None, 'model', None)"}
  assert result["specs"] == expected
  for name, whole in result["whole_bytes"].items():
    assert result["bytes"][name] == [whole // 8], name
  assert result["whole_bytes"]["row_accumulators"] == worker.BIG_ROWS * 4
  assert result["rest_spec"] == "P(None, 'model')"  # adam's mu of `w`
  assert result["diff"] <= 1e-6
  assert result["moved"] > 1e-2


@pytest.mark.slow
def test_sparse_embed_state_built_row_sharded(multi_device):
  result = multi_device["nnx_tables"]
  if result is None:
    pytest.skip("flax is not installed")
  assert result["metadata_specs"] == {
    "row_accumulators": "P('model',)",
    "last": "P('model',)",
    "momentum": "P(None, 'model', None)",
    "count": "P()",
  }
  for name, whole in result["whole_bytes"].items():
    assert result["bytes"][name] == [whole // 8], name
  assert result["diff"] <= 1e-6
  assert result["moved"] > 1e-2
