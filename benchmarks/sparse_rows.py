"""Row-sparse SM3 vs the dense path on big embedding tables.

For a ``V x 64`` float32 table and a batch of 4096 row indices per step, times
one jitted step (donated table and state) of

* sparse: ``optax_sm3.sparse_rows(optax_sm3.sm3(lr, ...)).update(indices,
  row_grads, ...)``;
* dense: the table-sized gradient ``zeros.at[indices].add(row_grads)`` (what
  ``jax.grad`` of ``table[indices]`` builds), ``optax_sm3.sm3(lr, ...).update``
  and ``optax.apply_updates``;

for each configuration in ``CONFIGS`` (plain SM3; EMA momentum 0.9, which the
sparse path applies lazily; momentum and decoupled weight decay), and reads
XLA's temporary-buffer size of each compiled step
(``compile().memory_analysis().temp_size_in_bytes``). Both paths give the
same rows (checked on the first step's batch, read through each path's
``read``). Ratios come from the same run.

A second section (``benchmarks._nnx_sparse_bench``, needs Flax) times the
whole Flax NNX train step of a bag-of-ids model: ``SparseEmbed`` +
``optax_sm3.nnx.value_and_grad`` + ``SparseOptimizer`` against ``nnx.Embed``
+ ``nnx.value_and_grad`` + ``nnx.Optimizer`` with the same optimizer, with
momentum 0 and 0.9, and checks the speed-up targets in the run.

``python -m benchmarks.sparse_taught`` times the train steps the README and
the guides show (NNX, linen, Equinox), as written.

Run from the repository root::

  python -m benchmarks.sparse_rows              # both sections, 1M and 4M rows
  python -m benchmarks.sparse_rows --quick      # 64k and 256k rows, fewer steps
  python -m benchmarks.sparse_rows --nnx-only   # the NNX section only

Writes ``results/sparse_rows[_quick].md`` and ``.json`` (functional section),
``results/sparse_rows_nnx[_quick].md`` and ``.json`` (NNX section) and prints
the tables.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

import optax_sm3
from benchmarks import _report

DIM = 64
BATCH = 4096
LEARNING_RATE = 0.1

# Hyperparameters shared by both paths of a configuration.
CONFIGS = {
  "sm3": {"momentum": 0.0},
  "momentum 0.9": {"momentum": 0.9},
  "momentum 0.9, weight decay 1e-4": {"momentum": 0.9, "weight_decay": 1e-4},
}


class Path(NamedTuple):
  """One way to train the table: ``init``, a jitted donating ``update``
  ``(indices, row_grads, state, table) -> (table, state)``, and ``read``
  ``(indices, state, table) -> rows`` (the rows the optimizer holds now)."""

  init: Callable
  update: Callable
  read: Callable


def functional_paths(config: dict, sweep_period: int | None = None) -> dict:
  """The ``sparse_rows`` path and the dense ``sm3`` path for ``config``."""
  extra = {} if sweep_period is None else {"sweep_period": sweep_period}
  dense = optax_sm3.sm3(LEARNING_RATE, **config)
  sparse = optax_sm3.sparse_rows(dense, **extra)

  def dense_update(indices, row_grads, state, table):
    grad = jnp.zeros_like(table).at[indices].add(row_grads)
    updates, state = dense.update(grad, state, table)
    return optax.apply_updates(table, updates), state

  return {
    "sparse": Path(
      sparse.init, jax.jit(sparse.update, donate_argnums=(2, 3)), sparse.lookup
    ),
    "dense": Path(
      dense.init,
      jax.jit(dense_update, donate_argnums=(2, 3)),
      lambda indices, state, table: table[indices],
    ),
  }


def _batches(rows: int, count: int, seed: int):
  rng = np.random.default_rng(seed)
  return [
    (
      jnp.asarray(rng.integers(0, rows, BATCH, dtype=np.int32)),
      jnp.asarray(rng.standard_normal((BATCH, DIM), dtype=np.float32)),
    )
    for _ in range(count)
  ]


def _table(rows: int) -> jax.Array:
  return jax.random.normal(jax.random.key(0), (rows, DIM), jnp.float32)


def time_paths(paths: dict, rows: int, steps: int, progress) -> dict:
  """Median step time and temporary bytes of each path on a ``rows`` table."""
  batches = _batches(rows, steps + 1, seed=rows)
  record = {"rows": rows, "dim": DIM, "batch": BATCH}
  first = {}
  for name, path in paths.items():
    table = _table(rows)
    state = path.init(table)
    compiled = path.update.lower(*batches[0], state, table).compile()
    record[f"{name}_temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
    times = []
    for i, (indices, grads) in enumerate(batches):
      start = time.perf_counter()
      table, state = path.update(indices, grads, state, table)
      jax.block_until_ready((table, state))
      elapsed = time.perf_counter() - start
      if i == 0:  # includes compilation
        first[name] = np.asarray(path.read(batches[0][0], state, table))
      else:
        times.append(elapsed)
      progress.update(1)
    record[f"{name}_median_s"] = statistics.median(times)
    del table, state
  return record, first


def run(sizes, steps, progress, configs=None, sweep_period=None) -> list[dict]:
  results = []
  for config_name, config in (configs or CONFIGS).items():
    for rows in sizes:
      paths = functional_paths(config, sweep_period)
      record, first = time_paths(paths, rows, steps, progress)
      record = {"config": config_name, **record}
      record["first_step_max_abs_difference"] = float(
        np.max(np.abs(first["sparse"] - first["dense"]))
      )
      record["speedup"] = record["dense_median_s"] / record["sparse_median_s"]
      record["temp_ratio"] = record["dense_temp_bytes"] / max(
        1, record["sparse_temp_bytes"]
      )
      results.append(record)
  return results


def markdown(results: list[dict], steps: int) -> str:
  lines = [
    f"SM3 step on a V x {DIM} float32 table, {BATCH} row indices per step "
    f"(median of {steps} steps, jitted, donated buffers; "
    f"{jax.devices()[0].device_kind}, jax {jax.__version__})",
    "",
    "| optimizer | rows V | sparse step | dense step | speed-up | sparse temp "
    "| dense temp | temp ratio |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in results:
    lines.append(
      f"| {r['config']} | {r['rows']:,} | {1e3 * r['sparse_median_s']:.2f} ms "
      f"| {1e3 * r['dense_median_s']:.1f} ms | {r['speedup']:.0f}x "
      f"| {_report.format_bytes(r['sparse_temp_bytes'], 'MiB')} "
      f"| {_report.format_bytes(r['dense_temp_bytes'], 'MiB')} "
      f"| {r['temp_ratio']:.0f}x |"
    )
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  """Runs the sections the flags ask for; returns their results by section."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add = parser.add_argument
  add("--quick", action="store_true", help="small tables, 3 steps")
  add("--steps", type=int, help="timed steps per path")
  add("--dense-steps", type=int, help="timed dense NNX steps (default: --steps)")
  add("--out", default="results", help="output folder")
  add("--section", choices=("all", "functional", "nnx"), default="all")
  add("--nnx-only", action="store_true", help="the NNX section only (--section nnx)")
  add("--rows", type=int, action="append", help="table sizes (default: by --quick)")
  add("--momentum", type=float, action="append", help="NNX momenta (0 and 0.9)")
  add("--sweep-period", type=int, help="sparse_rows(sweep_period=...)")
  add("--config", action="append", choices=list(CONFIGS), help="configurations")
  args = parser.parse_args(argv)
  for flag in ("steps", "dense_steps"):
    value = getattr(args, flag)
    if value is not None and value < 1:
      parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
  if args.rows and min(args.rows) < 1:
    parser.error(f"--rows must be >= 1, got {min(args.rows)}")
  section = "nnx" if args.nnx_only else args.section
  sizes = args.rows or ([1 << 16, 1 << 18] if args.quick else [1 << 20, 1 << 22])
  steps = args.steps or (3 if args.quick else 10)
  suffix = "_quick" if args.quick else ""
  results = {}

  if section in ("all", "functional"):
    configs = {name: CONFIGS[name] for name in args.config or CONFIGS}
    total = len(configs) * len(sizes) * 2 * (steps + 1)
    with tqdm.tqdm(total=total, desc="sparse_rows") as bar:
      results["functional"] = run(sizes, steps, bar, configs, args.sweep_period)
    _report.save(
      args.out,
      f"sparse_rows{suffix}",
      markdown(results["functional"], steps),
      {
        **_report.machine(),
        "steps": steps,
        "sweep_period": args.sweep_period,
        "results": results["functional"],
      },
    )

  if section in ("all", "nnx"):
    from benchmarks import _nnx_sparse_bench as nnx_bench

    momenta = tuple(args.momentum or nnx_bench.MOMENTA)
    nnx_steps = {"sparse": steps, "dense": args.dense_steps or steps}
    total = len(momenta) * len(sizes) * (sum(nnx_steps.values()) + 2 * nnx_bench.WARMUP)
    with tqdm.tqdm(total=total, desc="sparse_rows nnx") as bar:
      records = nnx_bench.run(sizes, nnx_steps, bar, momenta)
    checks = nnx_bench.check_targets(records)
    results["nnx"] = {"results": records, "targets": checks}
    _report.save(
      args.out,
      f"sparse_rows_nnx{suffix}",
      nnx_bench.markdown(records, checks, nnx_steps),
      {**_report.machine(), "steps": nnx_steps, "results": records, "targets": checks},
    )
  return results


if __name__ == "__main__":
  main()
