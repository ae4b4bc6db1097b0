"""The sparse train steps the README and the guides teach, against dense SM3.

Each route's sparse step is the docs' code, line for line
(``tests/test_docs_donation.py`` checks it), on ``benchmarks._bags``' model;
its dense twin is the same step with dense pieces and ``_bags.dense_tx``, and
their first losses must agree. docs/guides/sparse_embeddings.md describes the
protocol and quotes the table.

Run from the repository root::

  python -m benchmarks.sparse_taught           # 2**20 rows, 5 runs
  python -m benchmarks.sparse_taught --quick   # 2**16 rows, 1 run
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

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
from benchmarks import _bags, _report
from benchmarks._bags import BAG, BAGS, DIM, MOMENTA
from benchmarks._timing import carried, step_seconds

ROUTES = ("nnx", "nnx_plain", "linen", "linen_state", "equinox")
# Routes timed together, block after block in each run.
GROUPS = (("nnx", "nnx_plain"), ("linen", "linen_state"), ("equinox",))
WARMUP = 2
LOSS_RTOL = 1e-4


def nnx_route(rows, momentum, sparse, call="cached_partial"):
  """``step(ids, y) -> loss`` of the taught NNX code (or its dense twin), called
  through ``nnx.cached_partial`` (as taught) or directly (``"plain"``)."""
  # Dense: `_bags.build`'s step; sparse: its model and optimizer, the README's step.
  model, optimizer, train_step = _bags.build(
    "sparse" if sparse else "dense", rows, momentum
  )
  if sparse:
    # The README's step:
    @nnx.jit(donate_argnums=(0, 1))  # model and optimizer are updated in place
    def train_step(model, optimizer, ids, y):
      loss_fn = lambda m: jnp.mean((m(ids) - y) ** 2)
      loss, grads = optax_sm3.nnx.value_and_grad(loss_fn)(model)  # table: (ids, rows)
      optimizer.update(model, grads)
      return loss

  if call == "plain":
    return functools.partial(train_step, model, optimizer)
  step = nnx.cached_partial(train_step, model, optimizer)  # walks the graphs once
  return step


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
      *_bags.optimizers(momentum), tables=_bags.tables
    )
    opt_state = opt.init(params)

    # The sparse guide's step:
    @functools.partial(jax.jit, donate_argnums=(0, 1))  # params, opt_state in place
    def linen_step(params, opt_state, ids, y):
      loss, grads = opt.value_and_grad(linen_loss)(params, opt_state, ids, y)
      params, opt_state = opt.step(params, grads, opt_state)
      return params, opt_state, loss

  else:
    tx = _bags.dense_tx(momentum)
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
      tx=optax_sm3.sparse_tables(*_bags.optimizers(momentum), tables=_bags.tables),
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
      tx=_bags.dense_tx(momentum),
    )

    @functools.partial(jax.jit, donate_argnums=0)
    def state_step(state, ids, y):
      loss, grads = jax.value_and_grad(linen_loss)(state.params, ids, y)
      return state.apply_gradients(grads=grads), loss

  return carried(state_step, state)


class EqxModel(eqx.Module):
  items: optax_sm3.equinox.SparseEmbedding
  head: eqx.nn.Linear

  def __init__(self, rows, key):
    k1, k2 = jax.random.split(key)
    self.items = optax_sm3.equinox.SparseEmbedding(rows, DIM, key=k1)
    self.head = eqx.nn.Linear(DIM, "scalar", key=k2)

  def __call__(self, ids):  # ids: (batch, bag) ints
    return jax.vmap(self.head)(self.items(ids).mean(axis=1))


eqx_loss = _bags.mse  # the mean squared error of the model's outputs


def equinox_route(rows, momentum, sparse):
  """``step(ids, y) -> loss`` of the taught Equinox code (or its dense twin)."""
  # Dense: the same model under eqx.filter_value_and_grad (a table-sized
  # gradient, as for eqx.nn.Embedding).
  model = EqxModel(rows, jax.random.key(0))
  if sparse:
    opt = optax_sm3.equinox.SparseOptimizer(*_bags.optimizers(momentum))
    state = opt.init(model)

    # The sparse guide's step:
    @eqx.filter_jit(donate="all")  # model and state are updated in place
    def eqx_step(model, state, ids, y):
      loss, grads = opt.filter_value_and_grad(eqx_loss)(model, state, ids, y)
      model, state = opt.step(model, grads, state)
      return loss, model, state

  else:
    tx = _bags.dense_tx(momentum)
    state = tx.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit(donate="all")
    def eqx_step(model, state, ids, y):
      loss, grads = eqx.filter_value_and_grad(eqx_loss)(model, ids, y)
      params = eqx.filter(model, eqx.is_inexact_array)
      updates, state = tx.update(grads, state, params)
      return loss, eqx.apply_updates(model, updates), state

  return carried(eqx_step, model, state, out=0)


BUILDERS = {
  "nnx": nnx_route,
  "nnx_plain": functools.partial(nnx_route, call="plain"),
  "linen": linen_route,
  "linen_state": linen_state_route,
  "equinox": equinox_route,
}


def _losses(step, data) -> list[float]:
  return [float(step(ids, y)) for ids, y in data]


def time_group(routes, rows, momentum, steps, dense_steps, runs) -> list[dict]:
  """``runs`` records per route; a run times every route's sparse steps, then its
  dense steps, so that one run's ratios see one load on a shared machine."""
  data = _bags.batches(rows, WARMUP + max(steps, dense_steps) + 1, seed=rows)
  sparse = {r: BUILDERS[r](rows, momentum, True) for r in routes}
  dense = {r: BUILDERS[r](rows, momentum, False) for r in routes}
  losses = {r: _losses(sparse[r], data[:WARMUP]) for r in routes}
  difference = {}
  for r in routes:
    a, b = np.array(losses[r]), np.array(_losses(dense[r], data[:WARMUP]))
    difference[r] = float(np.max(np.abs(a - b) / np.abs(b)))
  timed = data[WARMUP : WARMUP + steps + 1]
  dense_timed = data[WARMUP : WARMUP + dense_steps + 1]
  records = []
  for number in range(runs):
    median = {r: statistics.median(step_seconds(sparse[r], timed)) for r in routes}
    dense_median = {
      r: statistics.median(step_seconds(dense[r], dense_timed)) for r in routes
    }
    for route in routes:
      records.append({
        "route": route,
        "rows": rows,
        "momentum": momentum,
        "run": number,
        "sparse_median_s": median[route],
        "dense_median_s": dense_median[route],
        "speedup": dense_median[route] / median[route],
        "max_loss_rel_diff": difference[route],
        "warmup_losses": losses[route],
      })  # fmt: skip
    print(
      f"momentum {momentum:g} run {number}: "
      + ", ".join(f"{r['route']} {r['speedup']:.0f}x" for r in records[-len(routes) :]),
      file=sys.stderr,
    )
  return records


def summarize(records: list[dict]) -> list[dict]:
  """One row per (route, momentum, rows): medians over the runs."""
  rows = []
  keys = sorted({(r["route"], r["momentum"], r["rows"]) for r in records}, key=str)
  for key in [k for route in ROUTES for k in keys if k[0] == route]:
    runs = [r for r in records if (r["route"], r["momentum"], r["rows"]) == key]
    speedups = [r["speedup"] for r in runs]
    route, momentum, size = key
    rows.append({
      "route": route,
      "momentum": momentum,
      "rows": size,
      "runs": len(runs),
      "sparse_median_s": statistics.median(r["sparse_median_s"] for r in runs),
      "dense_median_s": statistics.median(r["dense_median_s"] for r in runs),
      "speedup": statistics.median(speedups),
      "speedup_min": min(speedups),
      "speedup_max": max(speedups),
      "max_loss_rel_diff": max(r["max_loss_rel_diff"] for r in runs),
    })  # fmt: skip
  return rows


def markdown(summary: list[dict], steps: int, dense_steps: int, command: str) -> str:
  sizes = ", ".join(f"{v:,}" for v in sorted({r["rows"] for r in summary}))
  lines = [
    f"The taught train steps (donated): {sizes} x {DIM} float32 table, {BAGS} bags "
    f"of {BAG} ids per step, linear head (adam); per run, the median of {steps} "
    f"sparse steps, then of {dense_steps} dense steps, of each route; every "
    f"figure the median over runs (of times, or of each run's speed-up); "
    f"{jax.devices()[0].device_kind}, jax {jax.__version__}. `{command}`",
    "",
    "| route | momentum | sparse step | dense step | speed-up | min - max "
    "| loss rel. diff. |",
    "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in summary:
    lines.append(
      f"| {r['route']} | {r['momentum']:g} | {1e3 * r['sparse_median_s']:.2f} ms "
      f"| {1e3 * r['dense_median_s']:.1f} ms | {r['speedup']:.0f}x "
      f"| {r['speedup_min']:.0f}x - {r['speedup_max']:.0f}x "
      f"| {r['max_loss_rel_diff']:.1e} |"
    )
  return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add = parser.add_argument
  add("--quick", action="store_true", help="2**16 rows, 1 run")
  add("--rows", type=int, help="table rows (2**20)")
  add("--runs", type=int, help="runs of every case (5)")
  add("--steps", type=int, default=8, help="timed sparse steps")
  add("--dense-steps", type=int, default=4, help="timed dense steps")
  add("--route", action="append", choices=ROUTES, help="routes (all)")
  add("--out", default="results", help="output folder")
  args = parser.parse_args(argv)
  rows = args.rows or (1 << 16 if args.quick else 1 << 20)
  runs = args.runs or (1 if args.quick else 5)
  load = os.getloadavg()
  start = time.perf_counter()
  records = []
  for group in GROUPS:
    chosen = tuple(r for r in group if r in (args.route or ROUTES))
    for momentum in MOMENTA if chosen else ():
      records += time_group(chosen, rows, momentum, args.steps, args.dense_steps, runs)
  summary = summarize(records)
  given = sys.argv[1:] if argv is None else list(argv)
  if "--out" in given:  # Where the files go is not part of the measurement.
    del given[given.index("--out") : given.index("--out") + 2]
  command = " ".join(["python -m benchmarks.sparse_taught", *given])
  wall = time.perf_counter() - start
  loads = f"{load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
  table = markdown(summary, args.steps, args.dense_steps, command)
  table += f"\nWall time {wall:.0f} s; load average (1 min) {loads}.\n"
  meta = {
    **_report.machine(),
    "wall_s": wall,
    "load_average": [load[0], os.getloadavg()[0]],
    "records": records,
    "summary": summary,
  }
  stem = "sparse_taught" + ("_quick" if args.quick else "")
  _report.save(args.out, stem, table, meta)
  return summary


if __name__ == "__main__":
  main()
