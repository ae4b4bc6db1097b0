"""The sparse train steps the README and the guides teach, against dense SM3.

Each route's train step below is the code the docs show, line for line
(``tests/test_docs_donation.py`` fails when a doc's step and this file's
drift apart), run on a bag-of-ids model: a ``V x 64`` float32 table averaged
over bags of 4 ids and a linear head, 1024 bags (4096 ids) per step:

* NNX: ``optax_sm3.nnx.SparseEmbed`` + ``value_and_grad`` + ``SparseOptimizer``
  in ``nnx.jit(donate_argnums=(0, 1))`` called through ``nnx.cached_partial``
  (``nnx``), the same step called directly (``nnx_plain``), and the same
  step as ``jax.jit`` over ``nnx.split`` / ``nnx.merge``, the state donated
  (``nnx_split_merge``: the computation without ``nnx.jit``'s per-call walk
  over the model and optimizer graphs);
* linen: ``optax_sm3.linen.SparseEmbed`` + ``sparse_tables`` in
  ``jax.jit(donate_argnums=(0, 1))``;
* linen with Flax's ``TrainState`` idiom (``linen_state``):
  ``optax_sm3.linen.SparseTrainState`` in ``jax.jit(donate_argnums=0)``;
* Equinox: ``optax_sm3.equinox.SparseEmbedding`` + ``SparseOptimizer`` in
  ``eqx.filter_jit(donate="all")``.

Beside them, the parts of a step: the bare update
(``optax_sm3.sparse_rows(optax_sm3.sm3(0.1, momentum=m)).update`` on the
step's 4096 ids, jitted with the table and state donated) and each
framework's forward and backward alone (its sparse ``value_and_grad`` of
the loss, jitted, no optimizer step). A step's overhead is its time over
their sum; the issue's bound is 1.3x, and 1.3x for ``nnx_plain`` over
``nnx_split_merge``.

The dense baseline of each route is the same step with the framework's dense
pieces (``nnx.Embed`` + ``nnx.Optimizer``; ``jax.value_and_grad`` + optax;
``eqx.filter_value_and_grad`` + optax; Flax's ``TrainState``),
``optax_sm3.sm3(0.1, momentum=m)``
on the table and ``optax.adam(1e-3)`` on the head through
``optax.multi_transform``, jitted and donated (and, for the NNX routes,
called) the same way. Every step is built once (2 warm-up steps each, the
sparse and dense losses checked to agree); one run times the blocks of
``time_group``, ``--runs`` times over; every figure is the median over the
runs, of step times or of each run's ratios.

Run from the repository root::

  python -m benchmarks.sparse_taught                 # 2**20 rows, 5 runs
  python -m benchmarks.sparse_taught --quick         # 2**16 rows, 1 run
  python -m benchmarks.sparse_taught --profile       # nnx.jit's per-call cost

Writes ``results/sparse_taught[_quick].md`` and ``.json`` (``--profile``:
``results/sparse_taught_profile``) and prints the table.
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

# The workload of benchmarks.sparse_rows' NNX section: the same model, table,
# bags, rates and dense twin (dense_tx: sm3 on the table, adam on the head).
from benchmarks import _nnx_sparse_bench as nnx_bench
from benchmarks import _report
from benchmarks import sparse_rows as sparse_rows_bench
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

ROUTES = ("nnx", "nnx_plain", "nnx_split_merge", "linen", "linen_state", "equinox")
WARMUP = 2
# The targets: (momentum, rows) -> least speed-up over the dense step;
# the most a step may cost over its parts (the bare update plus the model's
# forward and backward), and nnx_plain over nnx_split_merge.
TARGETS = {(momentum, rows): bound for momentum, rows, bound in nnx_bench.TARGETS}
OVERHEAD_BOUND = 1.3
LOSS_RTOL = 1e-4


def _tables(params):
  """The sparse tables of the linen model: its ``items``."""
  return jax.tree.map_with_path(
    lambda path, _: "items" in jax.tree_util.keystr(path), params
  )


# --- NNX --------------------------------------------------------------------


def nnx_route(rows, momentum, sparse, call="cached_partial"):
  """``step(ids, y) -> loss`` of the taught NNX code (or its dense twin).

  ``call``: ``"cached_partial"`` (as taught), ``"plain"`` (the same
  ``nnx.jit`` step called directly) or ``"split_merge"`` (the same step as
  ``jax.jit`` over ``nnx.split`` / ``nnx.merge``, without ``nnx.jit``'s
  per-call graph traversal).
  """
  if not sparse:
    model, optimizer, dense_step = nnx_bench.build("dense", rows, momentum)
    if call == "split_merge":
      step, state = nnx_bench.functional_step(model, optimizer, nnx.value_and_grad)
      return carried(step, state, loss=0)
    if call == "plain":
      return functools.partial(dense_step, model, optimizer)
    return nnx.cached_partial(dense_step, model, optimizer)

  model = nnx_bench.Model(optax_sm3.nnx.SparseEmbed, rows, nnx.Rngs(0))
  optimizer = optax_sm3.nnx.SparseOptimizer(
    model,
    optax.adam(HEAD_LEARNING_RATE),
    optax_sm3.sm3(LEARNING_RATE, momentum=momentum),
  )
  if call == "split_merge":
    step, state = nnx_bench.functional_step(model, optimizer)
    return carried(step, state, loss=0)

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


def nnx_forward_backward(rows, momentum):
  """``(ids, y) -> (loss, grads)``: the NNX model's forward and backward alone."""
  model, optimizer, _ = nnx_bench.build("sparse", rows, momentum)  # the same model
  forward_backward, state = nnx_bench.functional_forward_backward(model, optimizer)
  return functools.partial(forward_backward, state)


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


def linen_forward_backward(rows, momentum):
  """``(ids, y) -> (loss, grads)``: the linen model's forward and backward alone."""
  _, params, linen_loss = _linen_setup(rows, True)
  opt = optax_sm3.linen.sparse_tables(
    optax.adam(HEAD_LEARNING_RATE),
    optax_sm3.sm3(LEARNING_RATE, momentum=momentum),
    tables=_tables,
  )
  forward_backward = jax.jit(opt.value_and_grad(linen_loss))
  return functools.partial(forward_backward, params, opt.init(params))


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


def equinox_forward_backward(rows, momentum):
  """``(ids, y) -> (loss, grads)``: the Equinox model's forward and backward alone."""
  model = EqxModel(rows, jax.random.key(0))
  opt = optax_sm3.equinox.SparseOptimizer(
    optax.adam(HEAD_LEARNING_RATE), optax_sm3.sm3(LEARNING_RATE, momentum=momentum)
  )

  @eqx.filter_jit
  def forward_backward(model, state, ids, y):
    return opt.filter_value_and_grad(eqx_loss)(model, state, ids, y)

  return functools.partial(forward_backward, model, opt.init(model))


# --- The bare update and the timing -----------------------------------------

BUILDERS = {
  "nnx": nnx_route,
  "nnx_plain": functools.partial(nnx_route, call="plain"),
  "nnx_split_merge": functools.partial(nnx_route, call="split_merge"),
  "linen": linen_route,
  "linen_state": linen_state_route,
  "equinox": equinox_route,
}
# Routes timed together, block after block in each run (so that a ratio
# between two of them sees one load), with their model's forward and backward.
GROUPS = {
  ("nnx", "nnx_plain", "nnx_split_merge"): nnx_forward_backward,
  ("linen", "linen_state"): linen_forward_backward,
  ("equinox",): equinox_forward_backward,
}


@functools.cache
def _sparse_path(momentum):
  """``benchmarks.sparse_rows``' sparse path (one compiled update per momentum)."""
  return sparse_rows_bench.functional_paths({"momentum": momentum})["sparse"]


def bare_update(rows, momentum):
  """``(ids, y) -> (table, state)``: ``sparse_rows(sm3).update`` on the batch's ids.

  The table's row-sparse step alone, jitted with the table and state donated,
  on the step's 4,096 ids (row gradients drawn once).
  """
  path = _sparse_path(momentum)
  table = jax.random.normal(jax.random.key(0), (rows, DIM), jnp.float32)
  row_grads = jax.random.normal(jax.random.key(1), (BAGS * BAG, DIM), jnp.float32)
  carry = [path.init(table), table]
  del table

  def update(ids, y):
    table, state = path.update(ids.reshape(-1), row_grads, *carry)
    carry[:] = state, table
    return table, state

  return update


def _losses(step, data) -> list[float]:
  return [float(step(ids, y)) for ids, y in data]


def time_group(routes, rows, momentum, steps, dense_steps, runs) -> list[dict]:
  """Routes of one group at one size and momentum: ``runs`` records per route.

  Every route's sparse and dense steps, the group's forward and backward
  and the bare update are built once; each route's sparse and dense losses
  over ``WARMUP`` steps (on the same batches) must agree. Each run times, in
  blocks of ``steps + 1`` (``dense_steps + 1``) calls, the first untimed:
  every route's sparse step, the forward and backward, the bare update,
  then every route's dense step. Blocks, not alternating calls, since a
  dense step evicts the caches the next sparse step would find warm; one
  run's blocks close in time, so that the ratios of a run (each route's step
  over the bare update plus the forward and backward; ``nnx_plain`` over
  ``nnx_split_merge``; dense over sparse) see one load on a shared machine.
  """
  data = batches(rows, WARMUP + max(steps, dense_steps) + 1, seed=rows)
  sparse = {r: BUILDERS[r](rows, momentum, True) for r in routes}
  dense = {r: BUILDERS[r](rows, momentum, False) for r in routes}
  losses = {r: _losses(sparse[r], data[:WARMUP]) for r in routes}
  difference = {}
  for r in routes:
    a, b = np.array(losses[r]), np.array(_losses(dense[r], data[:WARMUP]))
    difference[r] = float(np.max(np.abs(a - b) / np.abs(b)))
  group = next(g for g in GROUPS if routes[0] in g)
  parts = {
    "forward_backward": GROUPS[group](rows, momentum),
    "bare_update": bare_update(rows, momentum),
  }
  for part in parts.values():  # compiled and warm
    nnx_bench.step_seconds(part, data[:WARMUP], untimed=WARMUP)
  timed, dense_timed = (
    data[WARMUP : WARMUP + steps + 1],
    data[WARMUP:][: dense_steps + 1],
  )
  records = []
  for number in range(runs):
    median = {
      r: statistics.median(nnx_bench.step_seconds(sparse[r], timed)) for r in routes
    }
    part = {
      k: statistics.median(nnx_bench.step_seconds(f, timed)) for k, f in parts.items()
    }
    dense_median = {
      r: statistics.median(nnx_bench.step_seconds(dense[r], dense_timed))
      for r in routes
    }
    for route in routes:
      record = {"route": route, "rows": rows, "momentum": momentum, "run": number}
      record["sparse_median_s"] = median[route]
      record["dense_median_s"] = dense_median[route]
      record["forward_backward_median_s"] = part["forward_backward"]
      record["bare_update_median_s"] = part["bare_update"]
      record["max_loss_rel_diff"] = difference[route]
      record["warmup_losses"] = losses[route]
      record["speedup"] = dense_median[route] / median[route]
      record["overhead"] = median[route] / (
        part["forward_backward"] + part["bare_update"]
      )
      if route == "nnx_plain" and "nnx_split_merge" in routes:
        record["vs_split_merge"] = median[route] / median["nnx_split_merge"]
      records.append(record)
    print(
      f"momentum {momentum:g} run {number}: "
      + ", ".join(f"{r['route']} {r['speedup']:.0f}x" for r in records[-len(routes) :]),
      file=sys.stderr,
    )
  del sparse, dense, parts
  return records


def summarize(records: list[dict]) -> list[dict]:
  """One row per (route, momentum, rows): medians over the runs."""
  rows = []
  keys = sorted({(r["route"], r["momentum"], r["rows"]) for r in records}, key=str)
  for route in ROUTES:
    for key in [k for k in keys if k[0] == route]:
      runs = [r for r in records if (r["route"], r["momentum"], r["rows"]) == key]
      speedups = [r["speedup"] for r in runs]
      row = {"route": route, "momentum": key[1], "rows": key[2], "runs": len(runs)}
      for field in (
        "sparse_median_s",
        "dense_median_s",
        "forward_backward_median_s",
        "bare_update_median_s",
        "overhead",
        "vs_split_merge",
      ):
        if field in runs[0]:
          row[field] = statistics.median(r[field] for r in runs)
      row["speedup"] = statistics.median(speedups)
      row["speedup_min"] = min(speedups)
      row["speedup_max"] = max(speedups)
      row["max_loss_rel_diff"] = max(r["max_loss_rel_diff"] for r in runs)
      rows.append(row)
  return rows


def _bound(value: float, bound: float, at_most: bool) -> str:
  met = value <= bound if at_most else value >= bound
  return f"{'<=' if at_most else '>='} {bound:g}x {'met' if met else 'NOT met'}"


def markdown(summary: list[dict], steps: int, dense_steps: int, command: str) -> str:
  sizes = ", ".join(f"{v:,}" for v in sorted({r["rows"] for r in summary}))
  lines = [
    f"The taught train steps (donated): {sizes} x {DIM} float32 table, {BAGS} bags "
    f"of {BAG} ids per step, linear head (adam); per run, the median of {steps} "
    f"sparse steps of each route, {steps} forward and backward passes, {steps} "
    f"bare updates, then {dense_steps} dense steps of each route; every figure "
    f"the median over runs (of times, or of each run's ratio); "
    f"{jax.devices()[0].device_kind}, jax {jax.__version__}. `{command}`",
    "",
    "| route | momentum | sparse step | bare update | fwd + bwd "
    "| step / (update + fwd + bwd) | target | dense step | speed-up "
    "| min - max | target | loss rel. diff. |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  ms = lambda seconds: f"{1e3 * seconds:.2f} ms"
  for r in summary:
    target = TARGETS.get((r["momentum"], r["rows"]))
    speedup = "" if target is None else _bound(r["speedup"], target, at_most=False)
    lines.append(
      f"| {r['route']} | {r['momentum']:g} "
      f"| {ms(r['sparse_median_s'])} | {ms(r['bare_update_median_s'])} "
      f"| {ms(r['forward_backward_median_s'])} | {r['overhead']:.2f}x "
      f"| {_bound(r['overhead'], OVERHEAD_BOUND, at_most=True)} "
      f"| {1e3 * r['dense_median_s']:.1f} ms "
      f"| {r['speedup']:.0f}x | {r['speedup_min']:.0f}x - {r['speedup_max']:.0f}x "
      f"| {speedup} | {r['max_loss_rel_diff']:.1e} |"
    )
  plain = [r for r in summary if "vs_split_merge" in r]
  if plain:
    lines += [
      "",
      "| momentum | nnx_plain / nnx_split_merge (nnx.jit's per-call cost) | target |",
      "|---:|---:|---:|",
    ]
    lines += [
      f"| {r['momentum']:g} | {r['vs_split_merge']:.2f}x "
      f"| {_bound(r['vs_split_merge'], OVERHEAD_BOUND, at_most=True)} |"
      for r in plain
    ]
  return "\n".join(lines) + "\n"


def profile(rows: int, out: str, calls: int = 200) -> dict:
  """``nnx_bench.profile_overhead``: the NNX step's per-call cost, and why."""
  load = os.getloadavg()[0]
  result = nnx_bench.profile_overhead(rows, calls)
  table = nnx_bench.profile_markdown(result, rows, calls)
  table += f"\nLoad average (1 min) {load:.1f} at the start.\n"
  _report.save(out, "sparse_taught_profile", table, {**_report.machine(), **result})
  return result


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
  parser.add_argument(
    "--profile",
    action="store_true",
    help="only where the NNX step's per-call time goes (64 rows, 200 calls)",
  )
  args = parser.parse_args(argv)
  if args.profile:
    return profile(args.rows or 64, args.out)
  rows = args.rows or (1 << 16 if args.quick else 1 << 20)
  runs = args.runs or (1 if args.quick else 5)
  routes = args.route or ROUTES
  momenta = args.momentum or MOMENTA
  load = os.getloadavg()
  start = time.perf_counter()
  records = []
  for group in GROUPS:
    chosen = tuple(r for r in group if r in routes)
    for momentum in momenta if chosen else ():
      records += time_group(chosen, rows, momentum, args.steps, args.dense_steps, runs)
  summary = summarize(records)
  given = sys.argv[1:] if argv is None else list(argv)
  if "--out" in given:  # Where the files go is not part of the measurement.
    del given[given.index("--out") : given.index("--out") + 2]
  command = " ".join(["python -m benchmarks.sparse_taught", *given])
  wall = time.perf_counter() - start
  loads = f"{load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
  table = markdown(summary, args.steps, args.dense_steps, command.strip())
  table += f"\nWall time {wall:.0f} s; load average (1 min) {loads}.\n"
  stem = "sparse_taught" + ("_quick" if args.quick else "")
  meta = {
    **_report.machine(),
    "wall_s": wall,
    "load_average": [load[0], os.getloadavg()[0]],
    "records": records,
    "summary": summary,
  }
  _report.save(args.out, stem, table, meta)
  return summary


if __name__ == "__main__":
  main()
