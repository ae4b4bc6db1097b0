"""A row-sharded sparse table with momentum, trained across two processes.

The sibling of ``examples/multiprocess_train.py``, whose launcher it uses:
two local processes join one JAX cluster with ``jax.distributed.initialize``
(coordinator on 127.0.0.1, a free port, CPU collectives), four CPU devices
each, and build one global ``(model=4, data=2)`` mesh over the eight. The
embedding table's ``2**16`` rows are split over ``model``, whose devices span
both processes (each process holds half of the rows), and the batch over
``data``. The table trains with :func:`optax_sm3.sm3` (momentum 0.9,
decoupled weight decay), lazily and exactly, two ways:

* ``tables``: plain JAX, :func:`optax_sm3.sparse_tables` over
  ``{table, w, b}``, the state placed by :func:`optax_sm3.state_shardings`;
* ``nnx``: a Flax NNX model with :class:`optax_sm3.nnx.SparseEmbed`, trained
  by :class:`optax_sm3.nnx.SparseOptimizer`, the table's state placed by
  ``state_shardings(sparse_rows(optimizer.table_tx, ...), ...)``.

Meanwhile the launcher runs the same steps in one process on one device.
After the steps, ``sync`` brings every row up to date, and the script prints
per run the losses of both, the largest parameter difference (the match
needs at most ``TOLERANCE``) and how far the parameters moved (each must
move by over 100 x ``TOLERANCE``, so that the match is not vacuous), then
``MATCH`` or ``MISMATCH`` on its last line::

  python examples/multiprocess_sparse.py --steps 5

``--hlo DIR`` also writes process 0's compiled train steps to
``DIR/tables.hlo.txt`` and ``DIR/nnx.hlo.txt`` (the programs that ran),
and to ``DIR/row_split.json`` each device's shape of the table and of every
state leaf split like its rows; ``tests/test_multiprocess_sparse.py`` checks
the programs' collectives against both. Exit status 0
means both runs matched the single-process ones.
"""

from __future__ import annotations

import json
import os
import sys

# The launcher and the cluster's set-up are the dense example's.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from multiprocess_train import (
  LOCAL_DEVICES,
  NUM_PROCESSES,
  flat,
  joined,
  parse_args,
  run_cluster,
)

ROWS, DIM = 2**16, 16
BATCH, FIELDS = 32, 2  # BATCH * FIELDS ids a step, from all of the table
SWEEP_PERIOD = 1024  # each step catches up ROWS / SWEEP_PERIOD = 64 rows
MESH = ((4, 2), ("model", "data"))
TOLERANCE = 1e-5  # the largest |difference| of a parameter allowed


def tx():
  """The optimizer of every parameter, the table included."""
  import optax_sm3

  return optax_sm3.sm3(0.05, momentum=0.9, weight_decay=1e-3)


def batch(step):
  """The global batch of ``step``: ``(BATCH, FIELDS)`` ids and ``BATCH`` targets."""
  import numpy as np

  rng = np.random.default_rng(step)
  ids = rng.integers(0, ROWS, (BATCH, FIELDS)).astype(np.int32)
  return ids, np.sin(ids.sum(axis=1) / 1000.0).astype(np.float32)


def initial_params():
  import numpy as np

  rng = np.random.default_rng(0)
  return {
    "table": (0.5 * rng.normal(size=(ROWS, DIM))).astype(np.float32),
    "w": (0.3 * rng.normal(size=(DIM,))).astype(np.float32),
    "b": np.zeros((), np.float32),
  }


def tables_run():
  """``(opt, init, step, sync)`` of the plain-JAX run through ``sparse_tables``."""
  import jax.numpy as jnp

  import optax_sm3

  opt = optax_sm3.sparse_tables(
    tx(), tables={"table": True, "w": False, "b": False}, sweep_period=SWEEP_PERIOD
  )

  def loss_fn(params, ids, y):
    rows = optax_sm3.sparse_lookup(params["table"], ids)  # (BATCH, FIELDS, DIM)
    return jnp.mean((rows.mean(axis=1) @ params["w"] + params["b"] - y) ** 2)

  def step(params, state, ids, y):
    loss, grads = opt.value_and_grad(loss_fn)(params, state, ids, y)
    params, state = opt.step(params, grads, state)
    return params, state, loss

  def sync(params, state):
    """The parameters with every row brought up to date."""
    return opt.sync(params, state)[0]

  return opt, initial_params, step, sync


class _NNX:
  """The NNX run: a model of one SparseEmbed and a head, and its pure step."""

  def __init__(self):
    import jax.numpy as jnp
    from flax import nnx

    import optax_sm3
    import optax_sm3.nnx

    class Model(nnx.Module):
      def __init__(self, rngs):
        table = initial_params()["table"]
        self.embed = optax_sm3.nnx.SparseEmbed(
          ROWS, DIM, embedding_init=lambda *_: jnp.asarray(table), rngs=rngs
        )
        self.head = nnx.Linear(DIM, 1, rngs=rngs)

      def __call__(self, ids):
        return self.head(self.embed(ids).mean(axis=1))[:, 0]

    def loss_fn(model, ids, y):
      return jnp.mean((model(ids) - y) ** 2)

    self.model = Model(nnx.Rngs(0))
    self.optimizer = optax_sm3.nnx.SparseOptimizer(
      self.model, tx(), sweep_period=SWEEP_PERIOD
    )
    self.graphdef, _ = nnx.split((self.model, self.optimizer))
    self.loss_fn = loss_fn

  def state(self):
    from flax import nnx

    return nnx.state((self.model, self.optimizer))

  def step(self, state, ids, y):
    """The NNX train step as a pure function of ``nnx.state((model, optimizer))``."""
    from flax import nnx

    import optax_sm3.nnx

    model, optimizer = nnx.merge(self.graphdef, state)
    loss, grads = optax_sm3.nnx.value_and_grad(self.loss_fn)(model, ids, y)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  def sync(self, state):
    """The parameters with every row brought up to date."""
    from flax import nnx

    model, optimizer = nnx.merge(self.graphdef, state)
    optimizer.sync(model)
    return nnx.as_pure(nnx.state(model, nnx.Param))


def reference(steps):
  """One process, one device: ``{run: (params, initial params, losses)}``."""
  import jax
  from flax import nnx

  opt, init, step, sync = tables_run()
  params = init()
  state = opt.init(params)
  step = jax.jit(step, donate_argnums=(0, 1))
  losses = []
  for i in range(steps):
    params, state, loss = step(params, state, *batch(i))
    losses.append(float(loss))
  results = {"tables": (flat(jax.jit(sync)(params, state)), flat(init()), losses)}

  run = _NNX()
  start = flat(nnx.as_pure(nnx.state(run.model, nnx.Param)))
  state = run.state()
  step = jax.jit(run.step, donate_argnums=0)
  losses = []
  for i in range(steps):
    state, loss = step(state, *batch(i))
    losses.append(float(loss))
  results["nnx"] = (flat(jax.jit(run.sync)(state)), start, losses)
  return results


def worker(process_id, port, steps, out, hlo):
  """One of the cluster's processes."""
  import jax
  import numpy as np
  from flax import nnx
  from jax.experimental import multihost_utils
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  import optax_sm3

  def place(tree, shardings):
    """Global arrays from the same host values in every process."""

    def one(x, sharding):
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree, shardings)

  with joined(process_id, port):
    shape, names = MESH
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))
    table_sh = NamedSharding(mesh, P("model", None))
    data = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    saved, hlo_texts, row_split = {}, {}, {}

    def run(name, step, state_sh, state, sync):
      """Compiles ``step`` for the mesh and runs it; returns the last state."""
      ids, y = (place(x, data) for x in batch(0))
      step = jax.jit(
        step,
        in_shardings=(*state_sh, data, data),
        out_shardings=(*state_sh, replicated),
        donate_argnums=tuple(range(len(state))),
      )
      compiled = step.lower(*state, ids, y).compile()  # the program that runs
      hlo_texts[name] = compiled.as_text()
      # Each device's shape of every leaf split like the table's rows.
      row_split[name] = [
        list(leaf.addressable_shards[0].data.shape)
        for leaf in jax.tree.leaves(state)
        if ROWS in leaf.shape
      ]
      losses = []
      for i in range(steps):
        *state, loss = compiled(*state, *(place(x, data) for x in batch(i)))
        losses.append(float(loss))
      params = multihost_utils.process_allgather(sync(*state), tiled=True)
      saved[f"{name}/losses"] = np.asarray(losses)
      saved.update({f"{name}/{k}": v for k, v in flat(params).items()})
      return state

    # sparse_tables: the table's rows over `model`, w and b replicated.
    opt, init, step, sync = tables_run()
    param_sh = {"table": table_sh, "w": replicated, "b": replicated}
    params = place(init(), param_sh)
    state_sh = optax_sm3.state_shardings(opt, params, param_sh)
    state = jax.jit(opt.init, out_shardings=state_sh)(params)
    params, _ = run(
      "tables",
      step,
      (param_sh, state_sh),
      (params, state),
      jax.jit(sync, out_shardings=param_sh),
    )
    saved["rows_per_process"] = np.asarray(
      len({s.index[0].start for s in params["table"].addressable_shards})
      * ROWS
      // mesh.shape["model"]
    )

    # NNX: the table and its sparse_state split like the rows, the rest replicated.
    nnx_run = _NNX()
    embed = nnx_run.model.embed
    rows = optax_sm3.sparse_rows(nnx_run.optimizer.table_tx, sweep_period=SWEEP_PERIOD)
    table_state_sh = optax_sm3.state_shardings(rows, embed.embedding[...], table_sh)
    table_state = place(nnx.as_pure(embed.sparse_state), table_state_sh)
    nnx.update(embed.sparse_state, nnx.state(table_state))
    embed.embedding.value = place(embed.embedding[...], table_sh)
    state = jax.tree.map(
      lambda x: x if isinstance(x.sharding, NamedSharding) else place(x, replicated),
      nnx_run.state(),
    )
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    run("nnx", nnx_run.step, (state_sh,), (state,), jax.jit(nnx_run.sync))

    if process_id == 0:
      np.savez(out, **saved)
      if hlo:
        os.makedirs(hlo, exist_ok=True)
        for name, text in hlo_texts.items():
          with open(os.path.join(hlo, f"{name}.hlo.txt"), "w") as f:
            f.write(text)
        with open(os.path.join(hlo, "row_split.json"), "w") as f:
          json.dump(row_split, f)


def launch(steps, timeout, hlo):
  """Runs the cluster and the reference; returns the exit status."""
  import numpy as np

  args = ["--steps", str(steps)] + (["--hlo", os.path.abspath(hlo)] if hlo else [])
  expected, got = run_cluster(__file__, args, timeout, lambda: reference(steps))
  if got is None:
    return 1
  print(
    f"table {ROWS} x {DIM}, its rows split {MESH[0][0]} ways over "
    f"{NUM_PROCESSES} processes x {LOCAL_DEVICES} devices: "
    f"{int(got['rows_per_process'])} rows per process"
  )
  same = True
  for name, (params, start, losses) in expected.items():
    prefix = f"{name}/"
    mine = {k[len(prefix) :]: v for k, v in got.items() if k.startswith(prefix)}
    got_losses = mine.pop("losses")
    diff = max(float(np.max(np.abs(mine[k] - v))) for k, v in params.items())
    loss_diff = float(np.max(np.abs(got_losses - np.asarray(losses))))
    moved = {k: float(np.max(np.abs(v - start[k]))) for k, v in params.items()}
    ok = (
      sorted(mine) == sorted(params)
      and diff <= TOLERANCE
      and loss_diff <= TOLERANCE
      and min(moved.values()) > 100 * TOLERANCE
    )
    same = same and ok
    cluster = f"losses ({NUM_PROCESSES} processes x {LOCAL_DEVICES} devices):"
    for label, values in [
      (cluster, got_losses),
      ("losses (1 process, 1 device):", losses),
    ]:
      print(f"{name}: {label:{len(cluster)}} " + ", ".join(f"{x:.5f}" for x in values))
    print(
      f"{name}: max |param difference| = {diff:.2e}, max |loss difference| = "
      f"{loss_diff:.2e} (tolerance {TOLERANCE:.0e})"
    )
    print(
      f"{name}: largest change from the initial parameters: "
      + ", ".join(f"{k} {v:.2e}" for k, v in moved.items())
    )
  print("MATCH" if same else "MISMATCH")
  return 0 if same else 1


def main():
  hlo = (["--hlo"], {"help": "folder for process 0's compiled train steps"})
  args = parse_args(__doc__.splitlines()[0], timeout=300.0, more=[hlo])
  if args.worker is not None:
    worker(args.worker, args.port, args.steps, args.out, args.hlo)
    return 0
  return launch(args.steps, args.timeout, args.hlo)


if __name__ == "__main__":
  sys.exit(main())
