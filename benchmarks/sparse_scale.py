"""How the sparse step's cost grows with the table, up to ``2**24`` and ``2**25`` rows.

Three sections, each writing ``results/sparse_scale_<section>.md`` and
``.json``: ``curve`` times ``optax_sm3.sparse_rows(optimizer).update``
(``--docs``: also ``docs/_data/sparse_scale.json``), ``nnx`` the NNX train step
of ``benchmarks._bags``, and ``plan`` computes a ``10**9 x 128`` table's state
and traffic. docs/guides/performance.md and scaling_out.md say what each measures.

Run from the repository root::

  python -m benchmarks.sparse_scale --section curve --docs   # about 9 min
  python -m benchmarks.sparse_scale --section nnx            # about 13 min
  python -m benchmarks.sparse_scale --section plan           # seconds
  python -m benchmarks.sparse_scale --quick                  # all, small
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import re
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import optax_sm3
from benchmarks import _report, _timing

DIM, BATCH = 64, 4096
ROWS = tuple(1 << p for p in (16, 18, 20, 22, 24))
# name: (optimizer, sparse_rows(sweep_period=...))
CURVE = {
  "sm3, momentum 0": (lambda: optax_sm3.sm3(0.1, momentum=0.0), None),
  "momentum 0.9": (lambda: optax_sm3.sm3(0.1, momentum=0.9), None),
  "momentum 0.9, weight decay 1e-4": (
    lambda: optax_sm3.sm3(0.1, momentum=0.9, weight_decay=1e-4),
    None,
  ),
  "sm3_recipe (beta 0.99)": (lambda: optax_sm3.sm3_recipe(1e-2, 1000), None),
  "momentum 0.9, sweep_period=1024": (lambda: optax_sm3.sm3(0.1, momentum=0.9), 1024),
}
DOCS = pathlib.Path(__file__).parents[1] / "docs" / "_data" / "sparse_scale.json"


LAWS = ("uniform", "zipf", "sequential")


def ids(rows: int, count: int, law: str, seed: int = 0) -> list[jax.Array]:
  """``count`` batches of ``BATCH`` ids over ``rows``, drawn by ``law``."""
  rng = np.random.default_rng(seed)
  out = []
  for step in range(count):
    if law == "uniform":
      batch = rng.integers(0, rows, BATCH)
    elif law == "zipf":  # Zipf ranks, spread over the table by a multiplicative hash.
      batch = (rng.zipf(1.2, BATCH) * 2654435761) % rows
    else:
      batch = (np.arange(BATCH) + step * BATCH) % rows
    out.append(jnp.asarray(batch, jnp.int32))
  return out


def time_update(name: str, rows: int, law: str, steps: int) -> dict:
  """One optimizer's ``sparse_rows`` step on a ``rows`` table."""
  make, period = CURVE[name]
  sparse = optax_sm3.sparse_rows(make(), sweep_period=period)
  update = jax.jit(sparse.update, donate_argnums=(2, 3))
  # Cheap to make at any size (the values do not change the step's work).
  table = 0.01 * (jax.lax.broadcasted_iota(jnp.float32, (rows, DIM), 0) % 17)
  state = sparse.init(table)
  grads = jax.random.normal(jax.random.key(1), (BATCH, DIM), jnp.float32)
  batches = ids(rows, steps + 2, law)
  compiled = update.lower(batches[0], grads, state, table).compile()
  times = []
  for i, batch in enumerate(batches):
    start = time.perf_counter()
    table, state = jax.block_until_ready(update(batch, grads, state, table))
    if i >= 2:  # compilation, then one warm step
      times.append(time.perf_counter() - start)
  return {
    "optimizer": name,
    "rows": rows,
    "ids": law,
    "median_s": statistics.median(times),
    "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
    "steps": steps,
  }


def curve(rows: tuple[int, ...], steps: int, docs: bool, out: str) -> list[dict]:
  """The ``curve`` section: every optimizer, size and id law, in one process."""
  import tqdm  # (the plan, which the tests read, runs without it)

  cases = [(n, r, law) for r in rows for n in CURVE for law in LAWS]
  records = [time_update(*case, steps) for case in tqdm.tqdm(cases, desc="curve")]
  result = {**_report.machine(), "dim": DIM, "batch": BATCH, "records": records}
  _report.save(out, "sparse_scale_curve", curve_markdown(records, steps), result)
  if docs:
    DOCS.write_text(json.dumps(result, indent=1) + "\n")
  return records


def curve_markdown(records: list[dict], steps: int) -> str:
  """The ``curve`` section's table: a row per optimizer and id law."""
  rows = sorted({r["rows"] for r in records})
  power = [f"2^{n.bit_length() - 1}" for n in rows]
  lines = [
    f"`sparse_rows(...).update`, V x {DIM} float32, {BATCH} ids a step (median of "
    f"{steps} steps, jitted, donated; {jax.devices()[0].device_kind}, jax "
    f"{jax.__version__}): step time (ms), then XLA temporaries",
    "",
    *_report.table(
      ["optimizer", "ids", *power, f"{power[-1]} / {power[0]}", "temporaries"],
      [_curve_row(records, name, law) for name in CURVE for law in LAWS],
      "ll" + "r" * (len(rows) + 2),
    ),
  ]
  return "\n".join(lines) + "\n"


def _curve_row(records, name, law):
  mine = [r for r in records if r["optimizer"] == name and r["ids"] == law]
  mine.sort(key=lambda r: r["rows"])
  ms = [1e3 * r["median_s"] for r in mine]
  temps = [r["temp_bytes"] for r in mine]
  span = " to ".join(
    dict.fromkeys(_report.format_bytes(f(temps), "MiB") for f in (min, max))
  )
  return [name, law, *(f"{t:.2f}" for t in ms), f"{ms[-1] / ms[0]:.2f}x", span]


def _cheap_init(key, shape, dtype):
  """A table made without a random generator (which needs 16 bytes an entry)."""
  del key
  rows = jax.lax.broadcasted_iota(jnp.float32, shape, 0)
  return (0.01 * (rows % 17 - 8)).astype(dtype)


def _peak_rss() -> int:
  """The process's peak resident bytes since it started or since the last reset."""
  status = pathlib.Path("/proc/self/status").read_text()
  return 1024 * int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))


def nnx_child(kind: str, rows: int, momentum: float, dtype: str, steps: int) -> dict:
  """One NNX train step, timed in this process (run as a child process)."""
  from flax import nnx

  from benchmarks import _bags

  model, optimizer, train_step = _bags.build(
    kind, rows, momentum, jnp.dtype(dtype), embedding_init=_cheap_init
  )
  state = [nnx.state(optimizer, nnx.OptState)]
  if kind == "sparse":
    state.append(nnx.state(model, optax_sm3.nnx.SparseState))
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  data = _bags.batches(rows, steps + 2, seed=0)
  setup_peak = 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  jax.block_until_ready(train_step(model, optimizer, *data[0]))  # compiles
  # The peak from here on: Linux resets VmHWM on "5" to clear_refs.
  pathlib.Path("/proc/self/clear_refs").write_text("5")
  step = functools.partial(train_step, model, optimizer)
  times = _timing.step_seconds(step, data[1:], untimed=1)
  return {
    "median_s": statistics.median(times),
    "state_bytes_per_row": state_bytes / rows,
    "setup_peak_rss_bytes": setup_peak,
    "training_peak_rss_bytes": _peak_rss(),
  }


NNX_CASES = [  # (kind, rows, momentum, dtype)
  (kind, rows, momentum, dtype)
  for rows, dtype in ((1 << 24, "float32"), (1 << 25, "bfloat16"))
  for momentum in (0.0, 0.9)
  for kind in ("sparse", "dense")
]


def nnx(cases: list, steps: dict, out: str) -> list[dict]:
  """The ``nnx`` section: each case in its own process (``steps`` by kind)."""
  import tqdm

  records = []
  for kind, rows, momentum, dtype in tqdm.tqdm(cases, desc="nnx"):
    record = {"kind": kind, "rows": rows, "momentum": momentum, "dtype": dtype}
    # A bfloat16 table's row writes cost O(V) on the CPU (XLA converts the
    # whole table to float32 around a bfloat16 scatter): dense-step counts.
    record["steps"] = steps["dense" if dtype == "bfloat16" else kind]
    case = json.dumps([kind, rows, momentum, dtype, record["steps"]])
    try:
      record.update(_timing.in_child("benchmarks.sparse_scale", "--child", case))
    except RuntimeError as error:  # Killed or out of memory: it does not fit.
      record["failed"] = str(error)[-300:]
    records.append(record)
  lines = [
    f"NNX train step, V x {DIM} table, {BATCH} ids a step (median of "
    f"{steps['sparse']} sparse float32 steps, {steps['dense']} others, nnx.jit, "
    f"donated; one process each; {jax.devices()[0].device_kind}, jax {jax.__version__})",
    "",
    "| path | table | momentum | step | peak memory: setup | training "
    "| state bytes per row |",
    "|---|---|---:|---:|---:|---:|---:|",
  ]
  gib = functools.partial(_report.format_bytes, unit="GiB")
  for r in records:
    table = f"2^{r['rows'].bit_length() - 1} {r['dtype']}"
    if "failed" in r:
      lines.append(f"| {r['kind']} | {table} | {r['momentum']} | did not fit | | | |")
      continue
    lines.append(
      f"| {r['kind']} | {table} | {r['momentum']} | {1e3 * r['median_s']:.1f} ms "
      f"| {gib(r['setup_peak_rss_bytes'])} | {gib(r['training_peak_rss_bytes'])} "
      f"| {r['state_bytes_per_row']:.1f} |"
    )
  table = "\n".join(lines) + "\n"
  result = {**_report.machine(), "steps": steps, "records": records}
  _report.save(out, "sparse_scale_nnx", table, result)
  return records


PLAN_ROWS, PLAN_DIM, PLAN_IDS = 10**9, 128, 1 << 16
PLAN = {
  "sm3_recipe": lambda: optax_sm3.sm3_recipe(1e-2, 1000),
  "momentum 0.9": lambda: optax_sm3.sm3(0.1, momentum=0.9),
  "momentum 0.9, mu_dtype bfloat16": lambda: optax_sm3.sm3(
    0.1, momentum=0.9, mu_dtype=jnp.bfloat16
  ),
}


def plan_case(name: str, devices: int) -> dict:
  """Per-device bytes and traffic of one optimizer on ``devices`` devices."""
  sparse = optax_sm3.sparse_rows(PLAN[name]())
  shape = jax.ShapeDtypeStruct((PLAN_ROWS, PLAN_DIM), jnp.float32)
  leaves = jax.tree.leaves(jax.eval_shape(sparse.init, shape))
  # Leaves with the table's rows (momentum is stored as (1, V, D)) are split.
  split = sum(x.size * x.dtype.itemsize for x in leaves if PLAN_ROWS in x.shape[:2])
  replicated = sum(x.size * x.dtype.itemsize for x in leaves) - split
  per_row = split / PLAN_ROWS  # bytes of state per row (momentum, accumulators, last)
  momentum = [x for x in leaves if x.ndim == 3]
  row = PLAN_DIM * 4 + sum(PLAN_DIM * x.dtype.itemsize for x in momentum)
  moves, ages = bool(momentum), name == "sm3_recipe"  # (beta 0.99, no momentum)
  k, sweep = PLAN_IDS, -(-PLAN_ROWS // max(1024, -(-PLAN_ROWS // 256)))
  # All-reduced per step (as in the compiled sharded step): the lookup's k
  # rows (with their momentum and `last` when rows move); the step's rows of
  # the table and momentum (the sweep's too when rows move), `last` of the
  # batch's and the sweep's rows, and the rows' accumulators (the sweep's
  # too when they age).
  message = k * (row + 4 * moves) + (k + sweep * moves) * row
  message += (k + sweep) * 4 + (k + sweep * ages) * 4
  ring = 2 * (devices - 1) / devices
  return {
    "optimizer": name,
    "devices": devices,
    "state_bytes_per_row": per_row,
    "table_bytes": PLAN_ROWS * PLAN_DIM * 4 / devices,
    "state_bytes": split / devices + replicated,
    "replicated_bytes": replicated,
    "moved_bytes": ring * message + (devices - 1) / devices * PLAN_IDS * 4,
    "sweep_rows": sweep,
  }


def plan(out: str) -> list[dict]:
  """The ``plan`` section: computed for every optimizer and device count."""
  records = [plan_case(n, d) for n in PLAN for d in (8, 64, 512)]
  fmt = functools.partial(_report.format_bytes, unit="GiB")
  lines = [
    f"A {PLAN_ROWS:.0e} x {PLAN_DIM} float32 table, rows split over N devices, "
    f"{PLAN_IDS} ids a step (computed: state bytes from jax.eval_shape, traffic "
    "from the sharded step's collectives)",
    "",
    "| optimizer | N | table per device | state per device (replicated) "
    "| state bytes per row | moved per step per device |",
    "|---|---:|---:|---:|---:|---:|",
  ]
  for r in records:
    lines.append(
      f"| {r['optimizer']} | {r['devices']} | {fmt(r['table_bytes'])} "
      f"| {fmt(r['state_bytes'])} ({_report.format_bytes(r['replicated_bytes'], 'MiB')}) "
      f"| {r['state_bytes_per_row']:.0f} "
      f"| {_report.format_bytes(r['moved_bytes'], 'MiB')} |"
    )
  _report.save(
    out,
    "sparse_scale_plan",
    "\n".join(lines) + "\n",
    {"rows": PLAN_ROWS, "dim": PLAN_DIM, "ids": PLAN_IDS, "records": records},
  )
  return records


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add = parser.add_argument
  add("--section", choices=("all", "curve", "nnx", "plan"), default="all")
  add("--quick", action="store_true", help="small tables, 5 steps")
  add("--docs", action="store_true", help="also write docs/_data/sparse_scale.json")
  add("--out", default="results", help="output folder")
  add("--child", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(nnx_child(*json.loads(args.child))))
    return {}
  results = {}
  if args.section in ("all", "plan"):
    results["plan"] = plan(args.out)
  if args.section in ("all", "curve"):
    rows = (1 << 14, 1 << 16) if args.quick else ROWS
    docs = args.docs and not args.quick
    results["curve"] = curve(rows, 5 if args.quick else 50, docs, args.out)
  if args.section in ("all", "nnx"):
    cases = NNX_CASES
    if args.quick:
      cases = [(k, r >> 10, m, d) for k, r, m, d in NNX_CASES]
    steps = {"sparse": 5, "dense": 5} if args.quick else {"sparse": 200, "dense": 10}
    results["nnx"] = nnx(cases, steps, args.out)
  return results


if __name__ == "__main__":
  main()
