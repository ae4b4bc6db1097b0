"""Multi-device checks for tests/test_sparse_sharding.py, run in a subprocess.

A row-sharded embedding table trained by :func:`optax_sm3.sparse_rows` on 8
CPU devices, against the same steps on one device. Like
``tests/_sharding_worker.py`` (whose HLO parser it reuses), it sets
``XLA_FLAGS`` itself and prints one JSON object of measurements on its last
stdout line; the assertions live in the test module.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_sm3

ROWS, DIM, K, STEPS = 1024, 16, 32, 5
SWEEP_PERIOD = 64  # a sweep block of 1024 / 64 = 16 rows per step
# The tables' optimizer of each config: optax_sm3.sm3(0.1, **CONFIGS[config]).
CONFIGS = {
  "0.0": {"momentum": 0.0},
  "0.9": {"momentum": 0.9, "weight_decay": 0.01},
}
# Rows split over "model"; on the 4x2 mesh the batch is split over "data".
MESHES = {"8": ((8,), ("model",), P()), "4x2": ((4, 2), ("model", "data"), P("data"))}


def table_and_batches():
  rng = np.random.default_rng(0)
  table = (0.5 * rng.normal(size=(ROWS, DIM))).astype(np.float32)
  # Ids drawn from a few hundred rows, with repeats, so that rows fall behind.
  batches = [
    (
      rng.integers(0, 300, K).astype(np.int32),
      rng.normal(size=(K, DIM)).astype(np.float32),
    )
    for _ in range(STEPS)
  ]
  return table, batches


def table_tx(config):
  return optax_sm3.sm3(0.1, **CONFIGS[config])


def make_opt(config):
  return optax_sm3.sparse_rows(table_tx(config), sweep_period=SWEEP_PERIOD)


PROBE = np.arange(0, 300, 7, dtype=np.int32)  # rows read through lookup


@functools.cache
def reference(config):
  opt = make_opt(config)
  table, batches = table_and_batches()
  table = jax.device_put(table, jax.devices()[0])
  state = opt.init(table)
  for ids, grads in batches:
    table, state = opt.update(ids, grads, state, table)
  rows = opt.lookup(PROBE, state, table)
  table, state = opt.sync(state, table)
  return np.asarray(rows), np.asarray(table), state


def per_device_bytes(leaf):
  counts = {}
  for shard in leaf.addressable_shards:
    counts[str(shard.device)] = counts.get(str(shard.device), 0) + shard.data.nbytes
  return sorted(set(counts.values()))


def sharded_run(mesh_name, config):
  from _sharding_worker import collectives  # tests/ is on sys.path

  shape, names, batch_spec = MESHES[mesh_name]
  mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))
  opt = make_opt(config)
  table, batches = table_and_batches()
  table_sh = NamedSharding(mesh, P("model", None))
  ids_sh = NamedSharding(mesh, batch_spec)
  grads_sh = NamedSharding(mesh, P(*batch_spec, None))
  state_sh = optax_sm3.state_shardings(opt, table, table_sh)
  table = jax.device_put(table, table_sh)
  state = jax.jit(opt.init, out_shardings=state_sh)(table)
  init_types = [str(x.sharding) for x in jax.tree.leaves(state)]
  update = jax.jit(
    opt.update,
    in_shardings=(ids_sh, grads_sh, state_sh, table_sh),
    out_shardings=(table_sh, state_sh),
    donate_argnums=(2, 3),
  )
  ids0, grads0 = batches[0]
  # Compiled once each: the programs whose HLO is read are the ones run.
  update = update.lower(ids0, grads0, state, table).compile()
  lookup = (
    jax.jit(opt.lookup, in_shardings=(None, state_sh, table_sh))
    .lower(PROBE, state, table)
    .compile()
  )
  sync = (
    jax.jit(opt.sync, out_shardings=(table_sh, state_sh)).lower(state, table).compile()
  )
  hlo = {"update": update, "lookup": lookup, "sync": sync}
  hlo = {k: v.as_text() for k, v in hlo.items()}
  for ids, grads in batches:
    table, state = update(
      jax.device_put(ids, ids_sh), jax.device_put(grads, grads_sh), state, table
    )
  after_types = [str(x.sharding) for x in jax.tree.leaves(state)]
  rows = np.asarray(lookup(PROBE, state, table))
  table, state = sync(state, table)
  ref_rows, ref_table, ref_state = reference(config)
  initial = table_and_batches()[0]
  accumulators = (
    state.accumulators
    if isinstance(state, optax_sm3.SparseRowsState)
    else state[0].accumulators
  )
  ref_accumulators = jax.tree.leaves(
    ref_state.accumulators
    if isinstance(ref_state, optax_sm3.SparseRowsState)
    else ref_state[0].accumulators
  )
  sharded = {"table": table, "row_accumulators": accumulators[0]}
  if isinstance(state, optax_sm3.SparseRowsState):
    sharded |= {"momentum": state.momentum, "last": state.last}
  sharded_ids = {id(x) for x in sharded.values()}
  replicated = {
    jax.tree_util.keystr(path): leaf.nbytes
    for path, leaf in jax.tree_util.tree_leaves_with_path(state)
    if id(leaf) not in sharded_ids
  }
  return {
    "rows_diff": float(np.max(np.abs(rows - ref_rows))),
    "table_diff": float(np.max(np.abs(np.asarray(table) - ref_table))),
    "accumulator_diff": max(
      float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
      for a, b in zip(jax.tree.leaves(accumulators), ref_accumulators, strict=True)
    ),
    "moved": float(np.max(np.abs(ref_table - initial))),
    "rows_moved": int(np.sum(np.any(ref_table != initial, axis=1))),
    "types_stable": init_types == after_types,
    "specs": {k: str(v.sharding.spec) for k, v in sharded.items()},
    "bytes": {k: per_device_bytes(v) for k, v in sharded.items()},
    "whole_bytes": {k: v.nbytes for k, v in sharded.items()},
    "replicated": replicated,
    "replicated_specs": sorted(
      {str(x.sharding.spec) for x in jax.tree.leaves(state) if id(x) not in sharded_ids}
    ),
    "row_ways": mesh.shape["model"],
    "collectives": {k: collectives(v) for k, v in hlo.items()},
  }


def explicit_run():
  """Explicit sharding mode: the steps run under ``jax.sharding.auto_axes``."""
  mesh = jax.make_mesh((4, 2), ("model", "data"), axis_types=(AxisType.Explicit,) * 2)
  opt = make_opt("0.9")
  table, batches = table_and_batches()
  with jax.set_mesh(mesh):
    table_spec = P("model", None)
    specs = optax_sm3.state_partition_specs(opt, table, table_spec)
    table = jax.device_put(table, NamedSharding(mesh, table_spec))
    state_sh = optax_sm3.state_shardings(opt, table, NamedSharding(mesh, table_spec))
    state = jax.jit(opt.init, out_shardings=state_sh)(table)
    types = lambda tree: [str(jax.typeof(x)) for x in jax.tree.leaves(tree)]
    after_init = types((table, state))
    auto = jax.sharding.auto_axes
    update = jax.jit(auto(opt.update, out_sharding=(table_spec, specs)))
    lookup = jax.jit(auto(opt.lookup, out_sharding=P()))
    sync = jax.jit(auto(opt.sync, out_sharding=(table_spec, specs)))
    for ids, grads in batches:
      ids = jax.device_put(ids, NamedSharding(mesh, P("data")))
      grads = jax.device_put(grads, NamedSharding(mesh, P("data", None)))
      table, state = update(ids, grads, state, table)
    after_update = types((table, state))
    rows = np.asarray(lookup(PROBE, state, table))
    table, state = sync(state, table)
    after_sync = types((table, state))
  ref_rows, ref_table, _ = reference("0.9")
  return {
    "after_init": after_init,
    "after_update": after_update,
    "after_sync": after_sync,
    "rows_diff": float(np.max(np.abs(rows - ref_rows))),
    "table_diff": float(np.max(np.abs(np.asarray(table) - ref_table))),
  }


def _nnx_step():
  """The jitted NNX train step both SparseOptimizer runs take."""
  from flax import nnx

  from optax_sm3 import nnx as sparse_nnx

  @nnx.jit
  def step(model, optimizer, ids):
    loss = lambda m, ids: jnp.sum(jnp.sin(m(ids)))
    _, grads = sparse_nnx.value_and_grad(loss)(model, ids)
    optimizer.update(model, grads)

  return step


def nnx_run():
  """SparseOptimizer on a row-sharded SparseEmbed, against one device."""
  from flax import nnx

  from optax_sm3 import nnx as sparse_nnx

  def build():
    model = sparse_nnx.SparseEmbed(ROWS, DIM, rngs=nnx.Rngs(0))
    optimizer = sparse_nnx.SparseOptimizer(model, optax_sm3.sm3(0.1), table_tx("0.9"))
    return model, optimizer

  step = _nnx_step()

  batches = [ids for ids, _ in table_and_batches()[1]]
  reference = build()
  every = jnp.arange(ROWS)
  initial = reference[0](every)
  for ids in batches:
    step(*reference, ids)
  mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
  table_sh = NamedSharding(mesh, P("model", None))
  model, optimizer = build()
  # The table's state has the structure of sparse_rows(table_tx).init(table)
  # (docs/guides/scaling_out.md).
  rows = optax_sm3.sparse_rows(optimizer.table_tx)
  state_sh = optax_sm3.state_shardings(rows, model.embedding[...], table_sh)
  model.embedding.value = jax.device_put(model.embedding[...], table_sh)
  state = jax.device_put(nnx.as_pure(model.sparse_state), state_sh)
  nnx.update(model.sparse_state, nnx.state(state))
  for ids in batches:
    step(model, optimizer, ids)
  state = nnx.as_pure(model.sparse_state)
  return {
    "diff": float(jnp.max(jnp.abs(model(every) - reference[0](every)))),
    "moved": float(jnp.max(jnp.abs(model(every) - initial))),
    "table_bytes": per_device_bytes(model.embedding[...]),
    "momentum_bytes": per_device_bytes(state.momentum),
    "last_bytes": per_device_bytes(state.last),
  }


BIG_ROWS, BIG_DIM = 2**20, 4  # the sparse_tables and SparseEmbed runs


def big_batches():
  rng = np.random.default_rng(1)
  table = (0.5 * rng.normal(size=(BIG_ROWS, BIG_DIM))).astype(np.float32)
  ids = [rng.integers(0, BIG_ROWS, K).astype(np.int32) for _ in range(STEPS)]
  return table, ids


def tables_run(config):
  """``sparse_tables`` over {table, w} with a 2**20-row table split over rows."""
  import optax

  table, batches = big_batches()
  w = np.linspace(-1.0, 1.0, BIG_DIM * 8, dtype=np.float32).reshape(BIG_DIM, 8)
  opt = optax_sm3.sparse_tables(
    optax.adam(0.01), table_tx(config), tables={"table": True, "w": False}
  )

  def loss(params, ids):
    rows = optax_sm3.sparse_lookup(params["table"], ids)
    return jnp.sum(jnp.sin(rows @ params["w"]))

  def step(state, params, ids):
    if hasattr(opt, "step"):  # step(params, grads, state)
      _, grads = opt.value_and_grad(loss)(params, state, ids)
      return opt.step(params, grads, state)
    # The NamedTuple API that `step` replaces (kept until both are committed).
    _, grads = opt.value_and_grad(loss)(state, params, ids)
    return opt.update(grads, state, params)

  def train(params, state, step, sync):
    for ids in batches:
      params, state = step(state, params, ids)
    return sync(params, state)

  one = jax.devices()[0]
  plain = {"table": jax.device_put(table, one), "w": jax.device_put(w, one)}
  ref_params, _ = train(plain, opt.init(plain), jax.jit(step), jax.jit(opt.sync))

  mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
  param_sh = {
    "table": NamedSharding(mesh, P("model", None)),
    "w": NamedSharding(mesh, P(None, "model")),
  }
  params = jax.device_put({"table": table, "w": w}, param_sh)
  state_sh = optax_sm3.state_shardings(opt, params, param_sh)
  state = jax.jit(opt.init, out_shardings=state_sh)(params)
  table_state = state.tables[0]
  lazy = isinstance(table_state, optax_sm3.SparseRowsState)
  accumulators = table_state.accumulators if lazy else table_state[0].accumulators
  row_state = {"row_accumulators": accumulators[0]}
  if lazy:
    row_state |= {"last": table_state.last, "momentum": table_state.momentum}
  rest_mu = state.rest[0].mu["w"]
  # The step as state_shardings' docs say: the state's shardings in and out.
  sharded_step = jax.jit(step, out_shardings=(param_sh, state_sh))
  sync = jax.jit(opt.sync, out_shardings=(param_sh, state_sh))
  free = jax.jit(step)(state, params, batches[0])[1]  # XLA's choice, a record
  params, state = train(params, state, sharded_step, sync)
  drift = {
    jax.tree_util.keystr(path): str(leaf.sharding.spec)
    for (path, leaf), want in zip(
      jax.tree_util.tree_leaves_with_path(free), jax.tree.leaves(state_sh), strict=True
    )
    if not leaf.sharding.is_equivalent_to(want, leaf.ndim)
  }
  return {
    "specs": {k: str(v.sharding.spec) for k, v in row_state.items()},
    "bytes": {k: per_device_bytes(v) for k, v in row_state.items()},
    "whole_bytes": {k: v.nbytes for k, v in row_state.items()},
    "rest_spec": str(rest_mu.sharding.spec),
    "free_jit_drift": drift,
    "diff": max(
      float(np.max(np.abs(np.asarray(params[k]) - np.asarray(ref_params[k]))))
      for k in ("table", "w")
    ),
    "moved": float(np.max(np.abs(np.asarray(ref_params["table"]) - table))),
  }


def nnx_tables_run():
  """SparseEmbed annotated with ``out_sharding``: its state built row-sharded."""
  from flax import nnx

  from optax_sm3 import nnx as sparse_nnx
  from optax_sm3._sparse import _nnx_state

  table, batches = big_batches()
  init = lambda *_: jnp.asarray(table)

  def build(metadata):
    model = sparse_nnx.SparseEmbed(
      BIG_ROWS,
      BIG_DIM,
      embedding_init=init,
      rngs=nnx.Rngs(0),
      embedding_metadata=metadata,
    )
    optimizer = sparse_nnx.SparseOptimizer(model, optax_sm3.sm3(0.1), table_tx("0.9"))
    return model, optimizer

  step = _nnx_step()

  reference = build({})
  for ids in batches:
    step(*reference, ids)
  every = jnp.arange(0, BIG_ROWS, 97)
  mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
  with jax.set_mesh(mesh):
    model, optimizer = build({"out_sharding": ("model", None)})
    as_built = per_device_bytes(nnx.as_pure(model.sparse_state).accumulators[0])
    model.sparse_state = nnx.data(
      _nnx_state.sparse_state_variables(
        model.sparse_rows, model.embedding, sparse_nnx.SparseState
      )
    )
    specs = nnx.as_pure(nnx.get_partition_spec(model.sparse_state))
    for ids in batches:
      step(model, optimizer, ids)
    state = nnx.as_pure(model.sparse_state)
    rows = np.asarray(model(every))
  return {
    "as_built_row_accumulator_bytes": as_built,
    "metadata_specs": {
      "row_accumulators": str(specs.accumulators[0]),
      "last": str(specs.last),
      "momentum": str(specs.momentum),
      "count": str(specs.count),
    },
    "bytes": {
      "row_accumulators": per_device_bytes(state.accumulators[0]),
      "last": per_device_bytes(state.last),
      "momentum": per_device_bytes(state.momentum),
    },
    "whole_bytes": {
      "row_accumulators": state.accumulators[0].nbytes,
      "last": state.last.nbytes,
      "momentum": state.momentum.nbytes,
    },
    "diff": float(np.max(np.abs(rows - np.asarray(reference[0](every))))),
    "moved": float(np.max(np.abs(rows - table[::97]))),
  }


def main():
  assert jax.device_count() == 8, jax.devices()
  results = {
    f"{mesh}/{config}": sharded_run(mesh, config)
    for mesh in MESHES
    for config in CONFIGS
  }
  results["explicit"] = explicit_run()
  try:
    import flax  # noqa: F401
  except ImportError:  # the nnx extra is not installed
    results["nnx"] = None
    results["nnx_tables"] = None
  else:
    results["nnx"] = nnx_run()
    results["nnx_tables"] = nnx_tables_run()
  for config in CONFIGS:
    results[f"tables/{config}"] = tables_run(config)
  # A control for the HLO parser: replicating the row-sharded table must
  # show up as an all-gather of the whole table.
  from _sharding_worker import collectives

  mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
  gather = jax.jit(
    lambda x: x * 2,
    in_shardings=NamedSharding(mesh, P("model", None)),
    out_shardings=NamedSharding(mesh, P()),
  )
  results["control"] = collectives(
    gather.lower(jnp.zeros((ROWS, DIM))).compile().as_text()
  )
  print(json.dumps(results))


if __name__ == "__main__":
  import _subprocess  # this script's folder, tests/, is on sys.path

  _subprocess.force_cpu_devices(8)
  main()
