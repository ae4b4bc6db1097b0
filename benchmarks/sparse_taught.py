"""The sparse train steps the README and the guides teach, against dense SM3.

Each route's train step below is the code the docs show, line for line
(``tests/test_docs_donation.py`` fails when a doc's step and this file's
drift apart), run on a bag-of-ids model: a ``V x 64`` float32 table averaged
over bags of 4 ids and a linear head, 1024 bags (4096 ids) per step:

* NNX: ``optax_sm3.nnx.SparseEmbed`` + ``value_and_grad`` + ``SparseOptimizer``
  in ``nnx.jit(donate_argnums=(0, 1))`` called through ``nnx.cached_partial``;
* linen: ``optax_sm3.linen.SparseEmbed`` + ``sparse_tables`` in
  ``jax.jit(donate_argnums=(0, 1))``;
* linen with Flax's ``TrainState`` idiom (``linen_state``):
  ``optax_sm3.linen.SparseTrainState`` in ``jax.jit(donate_argnums=0)``;
* Equinox: ``optax_sm3.equinox.SparseEmbedding`` + ``SparseOptimizer`` in
  ``eqx.filter_jit(donate="all")``.

The dense baseline of each route is the same step with the framework's dense
pieces (``nnx.Embed`` + ``nnx.Optimizer``; ``jax.value_and_grad`` + optax;
``eqx.filter_value_and_grad`` + optax; Flax's ``TrainState``),
``optax_sm3.sm3(0.1, momentum=m)``
on the table and ``optax.adam(1e-3)`` on the head through
``optax.multi_transform``, jitted and donated the same way. One run times
every case's sparse step for ``--steps`` steps, then its dense step for
``--dense-steps`` steps (each after an untimed one), ``--runs`` times over,
both steps built once (2 warm-up steps each, whose losses must agree); the
speed-up quoted is the median over the runs of each run's dense / sparse
ratio of median step times. The losses of the two paths are checked
to agree.

Run from the repository root::

  python -m benchmarks.sparse_taught                 # 2**20 rows, 5 runs
  python -m benchmarks.sparse_taught --quick         # 2**16 rows, 1 run

Writes ``results/sparse_taught[_quick].md`` and ``.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_sm3
import optax_sm3.equinox
import optax_sm3.linen
import optax_sm3.nnx

# The workload of benchmarks.sparse_rows' NNX section: the same model, table,
# bags, rates and dense twin (dense_tx: sm3 on the table, adam on the head).
from benchmarks import _nnx_sparse_bench as nnx_bench
from benchmarks import _report
from benchmarks._nnx_sparse_bench import (
  BAG,
  BAGS,
  DIM,
  HEAD_LEARNING_RATE,
  LEARNING_RATE,
  MOMENTA,
  batches,
  carried,
  dense_tx,
)

ROUTES = ("nnx", "linen", "linen_state", "equinox")
WARMUP = 2
# The targets: (momentum, rows) -> least speed-up.
TARGETS = {(momentum, rows): bound for momentum, rows, bound in nnx_bench.TARGETS}
LOSS_RTOL = 1e-4


def _tables(params):
  """The sparse tables of the linen model: its ``items``."""
  return jax.tree.map_with_path(
    lambda path, _: "items" in jax.tree_util.keystr(path), params
  )


# --- NNX --------------------------------------------------------------------


def nnx_route(rows, momentum, sparse):
  """``step(ids, y) -> loss`` of the taught NNX code (or its dense twin)."""
  if sparse:
    model = nnx_bench.Model(optax_sm3.nnx.SparseEmbed, rows, nnx.Rngs(0))
    optimizer = optax_sm3.nnx.SparseOptimizer(
      model,
      optax.adam(HEAD_LEARNING_RATE),
      optax_sm3.sm3(LEARNING_RATE, momentum=momentum),
    )

    # The README's step:
    @nnx.jit(donate_argnums=(0, 1))  # model and optimizer are updated in place
    def train_step(model, optimizer, ids, y):
      loss_fn = lambda m: jnp.mean((m(ids) - y) ** 2)
      loss, grads = optax_sm3.nnx.value_and_grad(loss_fn)(model)  # table: (ids, rows)
      optimizer.update(model, grads)
      return loss

    step = nnx.cached_partial(train_step, model, optimizer)  # walks the graphs once
    return step

  model, optimizer, dense_step = nnx_bench.build("dense", rows, momentum)
  return nnx.cached_partial(dense_step, model, optimizer)


# --- linen ------------------------------------------------------------------


class LinenModel(nn.Module):
  rows: int
  embed: type = optax_sm3.linen.SparseEmbed

  @nn.compact
  def __call__(self, ids):
    rows = self.embed(self.rows, DIM, name="items")(ids)
    return nn.Dense(1)(rows.mean(axis=1))[:, 0]


def _linen_setup(rows, sparse):
  """The linen model, its params and the guide's ``linen_loss``."""
  ids0 = jnp.zeros((BAGS, BAG), jnp.int32)
  linen_model = LinenModel(rows, optax_sm3.linen.SparseEmbed if sparse else nn.Embed)
  params = linen_model.init(jax.random.key(0), ids0)["params"]

  def linen_loss(params, ids, y):
    return jnp.mean((linen_model.apply({"params": params}, ids) - y) ** 2)

  return linen_model, params, linen_loss


def linen_route(rows, momentum, sparse):
  """``step(ids, y) -> loss`` of the taught linen code (or its dense twin)."""
  _, params, linen_loss = _linen_setup(rows, sparse)

  if sparse:
    opt = optax_sm3.linen.sparse_tables(
      optax.adam(HEAD_LEARNING_RATE),
      optax_sm3.sm3(LEARNING_RATE, momentum=momentum),
      tables=_tables,
    )
    opt_state = opt.init(params)

    # The sparse guide's step:
    @functools.partial(jax.jit, donate_argnums=(0, 1))  # params, opt_state in place
    def linen_step(params, opt_state, ids, y):
      loss, grads = opt.value_and_grad(linen_loss)(params, opt_state, ids, y)
      params, opt_state = opt.step(params, grads, opt_state)
      return params, opt_state, loss

  else:
    tx = dense_tx(momentum)
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def linen_step(params, opt_state, ids, y):
      loss, grads = jax.value_and_grad(linen_loss)(params, ids, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

  return carried(linen_step, params, opt_state)


def linen_state_route(rows, momentum, sparse):
  """``step(ids, y) -> loss`` of the taught ``SparseTrainState`` code (or its twin)."""
  from flax.training import train_state

  linen_model, params, linen_loss = _linen_setup(rows, sparse)

  if sparse:
    state = optax_sm3.linen.SparseTrainState.create(
      apply_fn=linen_model.apply,
      params=params,
      tx=optax_sm3.sparse_tables(
        optax.adam(HEAD_LEARNING_RATE),
        optax_sm3.sm3(LEARNING_RATE, momentum=momentum),
        tables=_tables,
      ),
    )

    # The sparse guide's step:
    @functools.partial(jax.jit, donate_argnums=0)  # the tables are updated in place
    def state_step(state, ids, y):
      loss, grads = state.value_and_grad(linen_loss)(ids, y)  # table: (ids, rows)
      return state.apply_gradients(grads=grads), loss

  else:
    state = train_state.TrainState.create(
      apply_fn=linen_model.apply,
      params=params,
      tx=dense_tx(momentum),
    )

    @functools.partial(jax.jit, donate_argnums=0)
    def state_step(state, ids, y):
      loss, grads = jax.value_and_grad(linen_loss)(state.params, ids, y)
      return state.apply_gradients(grads=grads), loss

  return carried(state_step, state)


# --- Equinox ----------------------------------------------------------------


class EqxModel(eqx.Module):
  items: optax_sm3.equinox.SparseEmbedding
  head: eqx.nn.Linear

  def __init__(self, rows, key):
    k1, k2 = jax.random.split(key)
    self.items = optax_sm3.equinox.SparseEmbedding(rows, DIM, key=k1)
    self.head = eqx.nn.Linear(DIM, "scalar", key=k2)

  def __call__(self, ids):  # ids: (batch, bag) ints
    return jax.vmap(self.head)(self.items(ids).mean(axis=1))


def eqx_loss(model, ids, y):
  return jnp.mean((model(ids) - y) ** 2)


def equinox_route(rows, momentum, sparse):
  """``step(ids, y) -> loss`` of the taught Equinox code (or its dense twin)."""
  # Dense: the same model under eqx.filter_value_and_grad (a table-sized
  # gradient, as for eqx.nn.Embedding).
  model = EqxModel(rows, jax.random.key(0))
  if sparse:
    opt = optax_sm3.equinox.SparseOptimizer(
      optax.adam(HEAD_LEARNING_RATE), optax_sm3.sm3(LEARNING_RATE, momentum=momentum)
    )
    state = opt.init(model)

    # The sparse guide's step:
    @eqx.filter_jit(donate="all")  # model and state are updated in place
    def eqx_step(model, state, ids, y):
      loss, grads = opt.filter_value_and_grad(eqx_loss)(model, state, ids, y)
      model, state = opt.step(model, grads, state)
      return loss, model, state

  else:
    tx = dense_tx(momentum)
    state = tx.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit(donate="all")
    def eqx_step(model, state, ids, y):
      loss, grads = eqx.filter_value_and_grad(eqx_loss)(model, ids, y)
      params = eqx.filter(model, eqx.is_inexact_array)
      updates, state = tx.update(grads, state, params)
      return loss, eqx.apply_updates(model, updates), state

  return carried(eqx_step, model, state, loss=0)


BUILDERS = {
  "nnx": nnx_route,
  "linen": linen_route,
  "linen_state": linen_state_route,
  "equinox": equinox_route,
}


def time_case(route, rows, momentum, steps, dense_steps, runs) -> list[dict]:
  """One route at one size and momentum: ``runs`` records, one per run.

  Both steps are built once; the losses of their first ``WARMUP`` steps (on
  the same batches) must agree. Each run is a block of ``steps + 1`` sparse
  steps then a block of ``dense_steps + 1`` dense steps (the first of each
  untimed): blocks, not alternating steps, since a dense step evicts the
  caches the next sparse step would find warm, and runs close in time, so
  that both sides of a ratio see the same load on a shared machine.
  """
  data = batches(rows, WARMUP + max(steps, dense_steps) + 1, seed=rows)
  kinds = ("sparse", "dense")
  run = {kind: BUILDERS[route](rows, momentum, kind == "sparse") for kind in kinds}
  losses = {k: [float(run[k](ids, y)) for ids, y in data[:WARMUP]] for k in kinds}
  a, b = np.array(losses["sparse"]), np.array(losses["dense"])
  difference = float(np.max(np.abs(a - b) / np.abs(b)))
  records = []
  for number in range(runs):
    sparse = nnx_bench.step_seconds(run["sparse"], data[WARMUP : WARMUP + steps + 1])
    dense = nnx_bench.step_seconds(
      run["dense"], data[WARMUP : WARMUP + dense_steps + 1]
    )
    record = {"route": route, "rows": rows, "momentum": momentum, "run": number}
    record["sparse_median_s"] = statistics.median(sparse)
    record["dense_median_s"] = statistics.median(dense)
    record["max_loss_rel_diff"] = difference
    record["speedup"] = record["dense_median_s"] / record["sparse_median_s"]
    records.append(record)
    print(
      f"{route} momentum {momentum:g} run {number}: {record['speedup']:.1f}x",
      file=sys.stderr,
    )
  del run
  return records


def summarize(records: list[dict]) -> list[dict]:
  """One row per (route, momentum, rows): medians over the runs."""
  rows = []
  keys = sorted({(r["route"], r["momentum"], r["rows"]) for r in records}, key=str)
  for route in ROUTES:
    for key in [k for k in keys if k[0] == route]:
      runs = [r for r in records if (r["route"], r["momentum"], r["rows"]) == key]
      speedups = [r["speedup"] for r in runs]
      rows.append(
        {
          "route": route,
          "momentum": key[1],
          "rows": key[2],
          "runs": len(runs),
          "sparse_median_s": statistics.median(r["sparse_median_s"] for r in runs),
          "dense_median_s": statistics.median(r["dense_median_s"] for r in runs),
          "speedup": statistics.median(speedups),
          "speedup_min": min(speedups),
          "speedup_max": max(speedups),
          "max_loss_rel_diff": max(r["max_loss_rel_diff"] for r in runs),
        }
      )
  return rows


def markdown(summary: list[dict], steps: int, dense_steps: int, command: str) -> str:
  lines = [
    f"The taught train steps (donated): V x {DIM} float32 table, {BAGS} bags of "
    f"{BAG} ids per step, linear head (adam); per run, the median of {steps} "
    f"sparse then {dense_steps} dense steps; speed-up = median over runs of "
    f"each run's dense / sparse; {jax.devices()[0].device_kind}, "
    f"jax {jax.__version__}. `{command}`",
    "",
    "| route | momentum | rows V | sparse step | dense step | speed-up "
    "| (min - max over runs) | target | max loss rel. diff. |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in summary:
    target = TARGETS.get((r["momentum"], r["rows"]))
    met = (
      ""
      if target is None
      else (f">= {target:g}x {'met' if r['speedup'] >= target else 'NOT met'}")
    )
    lines.append(
      f"| {r['route']} | {r['momentum']:g} | {r['rows']:,} "
      f"| {1e3 * r['sparse_median_s']:.2f} ms | {1e3 * r['dense_median_s']:.1f} ms "
      f"| {r['speedup']:.0f}x | {r['speedup_min']:.0f}x - {r['speedup_max']:.0f}x "
      f"| {met} | {r['max_loss_rel_diff']:.1e} |"
    )
  return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="2**16 rows, 1 run")
  parser.add_argument("--rows", type=int, default=None, help="table rows")
  parser.add_argument("--runs", type=int, default=None, help="runs of every case")
  parser.add_argument("--steps", type=int, default=8, help="timed sparse steps")
  parser.add_argument("--dense-steps", type=int, default=4, help="timed dense steps")
  parser.add_argument("--route", action="append", choices=ROUTES, help="routes")
  parser.add_argument("--momentum", type=float, action="append", help="momenta")
  parser.add_argument("--out", default="results", help="output folder")
  args = parser.parse_args(argv)
  rows = args.rows or (1 << 16 if args.quick else 1 << 20)
  runs = args.runs or (1 if args.quick else 5)
  routes = args.route or ROUTES
  momenta = args.momentum or MOMENTA
  records = []
  for route in routes:
    for momentum in momenta:
      records += time_case(route, rows, momentum, args.steps, args.dense_steps, runs)
  summary = summarize(records)
  given = sys.argv[1:] if argv is None else list(argv)
  if "--out" in given:  # Where the files go is not part of the measurement.
    del given[given.index("--out") : given.index("--out") + 2]
  command = " ".join(["python -m benchmarks.sparse_taught", *given])
  table = markdown(summary, args.steps, args.dense_steps, command.strip())
  stem = "sparse_taught" + ("_quick" if args.quick else "")
  meta = {**_report.machine(), "records": records, "summary": summary}
  _report.save(args.out, stem, table, meta)
  return summary


if __name__ == "__main__":
  main()
