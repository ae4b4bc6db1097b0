"""The Flax NNX section of ``benchmarks.sparse_rows``: a whole train step.

One model, an embedding table of ``V x 64`` float32 rows averaged over bags
of 4 ids and a linear head, trained two ways from the same initialisation on
the same batches (1024 bags, 4096 ids per step):

* sparse: ``optax_sm3.nnx.SparseEmbed`` + ``optax_sm3.nnx.value_and_grad`` +
  ``optax_sm3.nnx.SparseOptimizer(model, optax.adam(1e-3),
  optax_sm3.sm3(0.1, momentum=m))``;
* dense: ``nnx.Embed`` + ``nnx.value_and_grad`` + ``nnx.Optimizer`` with
  ``optax.multi_transform``: ``optax_sm3.sm3(0.1, momentum=m)`` on the table
  and ``optax.adam(1e-3)`` on the head, the same optimizer as the sparse one.

Each ``train_step`` is an ``nnx.jit`` with the model and the optimizer
donated. Measured: the median step time after ``WARMUP`` steps, XLA's
temporary buffers of the compiled step
(``train_step.lower(...).compile().memory_analysis()``), and the first
step's largest relative difference between the two models' parameters
(after ``optimizer.sync`` on the sparse one). Flax is imported here only,
so the functional section runs without it.

``profile_overhead`` (``python -m benchmarks.sparse_taught --profile``) times
the NNX step's forms on a small table, where what remains is the per-call
cost, and profiles where the plain ``nnx.jit`` step spends it.
"""

from __future__ import annotations

import cProfile
import functools
import itertools
import pstats
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_sm3
import optax_sm3.nnx
from benchmarks import _report

DIM = 64
BAGS = 1024
BAG = 4
LEARNING_RATE = 0.1
HEAD_LEARNING_RATE = 1e-3
MOMENTA = (0.0, 0.9)
# Untimed steps first: the first compiles; the second may retrace, since
# nnx.Optimizer stores multi_transform's state back with State nodes where
# tx.init gave tuples (a new input structure for nnx.jit).
WARMUP = 2

# The targets of the issue: (momentum, rows, least speed-up of the step).
TARGETS = ((0.0, 1 << 20, 50.0), (0.9, 1 << 20, 25.0))
# SM3 is exact on the looked-up rows: the models differ by float rounding only.
EQUALITY_TOLERANCE = 1e-5


class Model(nnx.Module):
  """Bag-of-ids regression: mean of the bag's rows, then a linear head."""

  def __init__(self, embed, rows: int, rngs: nnx.Rngs, param_dtype=jnp.float32, **kw):
    self.items = embed(rows, DIM, param_dtype=param_dtype, rngs=rngs, **kw)
    self.head = nnx.Linear(DIM, 1, rngs=rngs)

  def __call__(self, ids):  # ids: (bags, bag) ints
    return self.head(self.items(ids).mean(axis=1))[:, 0]


def _loss(model, ids, y):
  return jnp.mean((model(ids) - y) ** 2)


def _labels(params):
  return jax.tree_util.tree_map_with_path(
    lambda path, _: "table" if "items" in jax.tree_util.keystr(path) else "head",
    params,
  )


def dense_tx(momentum: float) -> optax.GradientTransformation:
  """The sparse optimizers' dense twin: ``sm3`` on the table (``items``), adam on the rest."""
  return optax.multi_transform(
    {
      "table": optax_sm3.sm3(LEARNING_RATE, momentum=momentum),
      "head": optax.adam(HEAD_LEARNING_RATE),
    },
    _labels,
  )


def build(kind: str, rows: int, momentum: float, param_dtype=jnp.float32, **kw):
  """``(model, optimizer, train_step)`` of the ``"sparse"`` or ``"dense"`` path
  (the table in ``param_dtype``; ``kw`` to the embedding, e.g. its init)."""
  if kind == "sparse":
    model = Model(optax_sm3.nnx.SparseEmbed, rows, nnx.Rngs(0), param_dtype, **kw)
    optimizer = optax_sm3.nnx.SparseOptimizer(
      model,
      optax.adam(HEAD_LEARNING_RATE),
      optax_sm3.sm3(LEARNING_RATE, momentum=momentum),
    )
    value_and_grad = optax_sm3.nnx.value_and_grad
  elif kind == "dense":
    model = Model(nnx.Embed, rows, nnx.Rngs(0), param_dtype, **kw)
    optimizer = nnx.Optimizer(model, dense_tx(momentum), wrt=nnx.Param)
    value_and_grad = nnx.value_and_grad
  else:
    raise ValueError(f"`kind` must be 'sparse' or 'dense', got {kind!r}")

  @nnx.jit(donate_argnums=(0, 1))
  def train_step(model, optimizer, ids, y):
    loss, grads = value_and_grad(_loss)(model, ids, y)
    optimizer.update(model, grads)
    return loss

  return model, optimizer, train_step


def functional_step(model, optimizer, value_and_grad=optax_sm3.nnx.value_and_grad):
  """The train step as ``jax.jit`` over ``nnx.split`` / ``nnx.merge``.

  The same computation as ``build(...)``'s ``nnx.jit`` step (sparse, or
  dense with ``value_and_grad=nnx.value_and_grad``), without ``nnx.jit``'s
  per-call traversal of the model and optimizer graphs: the state goes in
  and comes out as one pytree (donated). Returns ``(step, state)`` with
  ``step(state, ids, y) -> (loss, state)``.
  """
  graphdef, state = nnx.split((model, optimizer))

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(state, ids, y):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = value_and_grad(_loss)(model, ids, y)
    optimizer.update(model, grads)
    return loss, nnx.state((model, optimizer))

  return step, state


def functional_forward_backward(model, optimizer):
  """The sparse step's forward and backward alone, as ``jax.jit`` over ``nnx.merge``.

  ``optax_sm3.nnx.value_and_grad`` of the loss (the rows read through the
  tables' state, as in the step), no optimizer step, nothing donated.
  Returns ``(forward_backward, state)`` with ``forward_backward(state, ids,
  y) -> (loss, grads)``.
  """
  graphdef, state = nnx.split((model, optimizer))

  @jax.jit
  def forward_backward(state, ids, y):
    model, _ = nnx.merge(graphdef, state)
    return optax_sm3.nnx.value_and_grad(_loss)(model, ids, y)

  return forward_backward, state


def batches(rows: int, count: int, seed: int) -> list:
  """``count`` batches of ``(ids (BAGS, BAG) int32, targets (BAGS,) float32)``."""
  rng = np.random.default_rng(seed)
  return [
    (
      jnp.asarray(rng.integers(0, rows, (BAGS, BAG), dtype=np.int32)),
      jnp.asarray(rng.standard_normal(BAGS, dtype=np.float32)),
    )
    for _ in range(count)
  ]


def _params(model) -> dict:
  return {
    tuple(path): np.asarray(value[...])
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


def _max_relative_difference(a: dict, b: dict) -> float:
  if set(a) != set(b):
    raise ValueError(f"different parameters: {sorted(a)} vs {sorted(b)}")
  return max(
    float(np.max(np.abs(a[k] - b[k])) / max(float(np.max(np.abs(b[k]))), 1e-30))
    for k in a
  )


def carried(jitted, *carry, loss: int = -1):
  """``step(ids, y) -> loss`` of ``jitted(*carry, ids, y)``, keeping the carry.

  ``jitted`` returns the new carry with the loss at position ``loss``.
  """
  carry = list(carry)

  def step(ids, y):
    out = list(jitted(*carry, ids, y))
    value = out.pop(loss)
    carry[:] = out
    return value

  return step


def step_seconds(step, data, untimed: int = 1) -> list[float]:
  """Seconds of each ``step(ids, y)`` over ``data`` but the first ``untimed``."""
  times = []
  for i, (ids, y) in enumerate(data):
    start = time.perf_counter()
    jax.block_until_ready(step(ids, y))
    if i >= untimed:
      times.append(time.perf_counter() - start)
  return times


def time_case(rows: int, momentum: float, steps: dict, progress) -> dict:
  """Both paths at one size and momentum; ``steps`` timed steps per path."""
  data = batches(rows, max(steps.values()) + WARMUP, seed=rows)
  record = {"rows": rows, "dim": DIM, "ids_per_step": BAGS * BAG, "momentum": momentum}
  first = {}
  for kind in ("sparse", "dense"):
    model, optimizer, train_step = build(kind, rows, momentum)
    compiled = train_step.lower(model, optimizer, *data[0]).compile()
    record[f"{kind}_temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
    del compiled
    # The first step's parameters are the equality check.
    jax.block_until_ready(train_step(model, optimizer, *data[0]))
    if kind == "sparse":
      optimizer.sync(model)
    first[kind] = _params(model)
    times = step_seconds(
      functools.partial(train_step, model, optimizer),
      data[1 : steps[kind] + WARMUP],
      untimed=WARMUP - 1,
    )
    progress.update(steps[kind] + WARMUP)
    record[f"{kind}_median_s"] = statistics.median(times)
    record[f"{kind}_steps"] = steps[kind]
    record[f"{kind}_step_s"] = times  # Every timed step, for the spread.
    del model, optimizer, train_step
  # The sparse step once more, as jax.jit over nnx.split (no nnx.jit overhead).
  model, optimizer, _ = build("sparse", rows, momentum)
  step, state = functional_step(model, optimizer)
  del model, optimizer
  functional = carried(step, state, loss=0)
  del state
  times = step_seconds(functional, data[: steps["sparse"] + WARMUP], untimed=WARMUP)
  record["functional_median_s"] = statistics.median(times)
  record["functional_speedup"] = record["dense_median_s"] / statistics.median(times)
  record["first_step_max_relative_difference"] = _max_relative_difference(
    first["sparse"], first["dense"]
  )
  record["speedup"] = record["dense_median_s"] / record["sparse_median_s"]
  record["temp_ratio"] = record["dense_temp_bytes"] / max(
    1, record["sparse_temp_bytes"]
  )
  return record


def run(sizes, steps: dict, progress, momenta=MOMENTA) -> list[dict]:
  """One record per (momentum, rows), momentum-major."""
  return [
    time_case(rows, momentum, steps, progress) for momentum in momenta for rows in sizes
  ]


def check_targets(results: list[dict]) -> list[dict]:
  """Each target with the speed-up measured in this run and whether it is met.

  A target at a size the run did not reach (``--quick``) is checked at the
  nearest size the run has, and says so. Speed-ups must also grow with ``V``,
  and every case's first step must match the dense one to
  ``EQUALITY_TOLERANCE``.
  """
  checks = []
  for momentum, rows, bound in TARGETS:
    runs = [r for r in results if r["momentum"] == momentum]
    if not runs:
      continue
    at = min(runs, key=lambda r: (abs(np.log2(r["rows"] / rows)), -r["rows"]))
    where = f"{at['rows']:,} rows" + ("" if at["rows"] == rows else f" (not {rows:,})")
    checks.append(
      _report.check(
        f"momentum {momentum:g}, {where}: speed-up >= {bound:g}x",
        at["speedup"],
        at["speedup"] >= bound,
      )
    )
  for momentum in sorted({r["momentum"] for r in results}):
    runs = sorted(
      (r for r in results if r["momentum"] == momentum), key=lambda r: r["rows"]
    )
    if len(runs) > 1:
      speedups = [r["speedup"] for r in runs]
      checks.append(
        _report.check(
          f"momentum {momentum:g}: speed-up grows with V "
          f"({', '.join(f'{r:,}' for r in (x['rows'] for x in runs))} rows)",
          speedups[-1] / speedups[0],
          all(a < b for a, b in itertools.pairwise(speedups)),
        )
      )
  if results:
    worst = max(r["first_step_max_relative_difference"] for r in results)
    checks.append(
      _report.check(
        "first step, every case: max relative |sparse - dense| <= "
        f"{EQUALITY_TOLERANCE:g}",
        worst,
        worst <= EQUALITY_TOLERANCE,
      )
    )
  return checks


def markdown(results: list[dict], checks: list[dict], steps: dict) -> str:
  """The results table and the targets table."""
  lines = [
    f"Flax NNX train step (nnx.jit, model and optimizer donated): "
    f"V x {DIM} float32 table, {BAGS} bags of {BAG} ids per step, linear head "
    f"(adam); median of {steps['sparse']} sparse / {steps['dense']} dense steps "
    f"after {WARMUP} warm-up steps; {jax.devices()[0].device_kind}, "
    f"jax {jax.__version__}",
    "",
    "| momentum | rows V | SparseEmbed step | nnx.Embed step | speed-up "
    "| sparse temp | dense temp | first step max rel. diff. "
    "| SparseEmbed, jax.jit over nnx.split | its speed-up |",
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in results:
    lines.append(
      f"| {r['momentum']:g} | {r['rows']:,} | {1e3 * r['sparse_median_s']:.2f} ms "
      f"| {1e3 * r['dense_median_s']:.1f} ms | {r['speedup']:.0f}x "
      f"| {_report.format_bytes(r['sparse_temp_bytes'], 'MiB')} "
      f"| {_report.format_bytes(r['dense_temp_bytes'], 'MiB')} "
      f"| {r['first_step_max_relative_difference']:.1e} "
      f"| {1e3 * r['functional_median_s']:.2f} ms | {r['functional_speedup']:.0f}x |"
    )
  lines += ["", _report.targets_table(checks, "Targets (NNX train step)")]
  return "\n".join(lines) + "\n"


# --- Where the plain nnx.jit step's per-call time goes ------------------------

PROFILE_BLOCKS = 7


def _per_call(call, calls: int, blocks: int = PROFILE_BLOCKS) -> dict:
  """Median over ``blocks`` of ``calls`` calls: seconds per call, wall and CPU."""
  for _ in range(3):  # compiled and warm
    jax.block_until_ready(call())
  wall, cpu = [], []
  for _ in range(blocks):
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
      out = call()
    jax.block_until_ready(out)
    wall.append((time.perf_counter() - start) / calls)
    cpu.append((time.process_time() - start_cpu) / calls)
  return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu)}


def _flax_profile(call, calls: int) -> dict:
  """cProfile of ``calls`` calls: per call, the seconds in ``nnx.jit``'s parts.

  ``in``: flattening the arguments' graphs (``extract.to_tree``); ``out``:
  writing the results back into the objects (``extract.from_tree``);
  ``total``: the whole ``nnx.jit`` call, compiled computation included;
  ``nodes``: graph nodes flattened per call (``graphlib._graph_flatten``).
  """
  jax.block_until_ready(call())
  profile = cProfile.Profile()
  profile.enable()
  for _ in range(calls):
    out = call()
  jax.block_until_ready(out)
  profile.disable()
  found = {"in": 0.0, "out": 0.0, "total": 0.0, "nodes": 0}
  for (file, _, name), (_, ncalls, _, cumulative, _) in pstats.Stats(
    profile
  ).stats.items():
    if "flax/nnx" not in file.replace("\\", "/"):
      continue
    if name == "to_tree" and file.endswith("extract.py"):
      found["in"] += cumulative / calls
    elif name == "from_tree" and file.endswith("extract.py"):
      found["out"] += cumulative / calls
    elif name == "__call__" and file.endswith("compilation.py"):
      found["total"] = max(found["total"], cumulative / calls)
    elif name == "_graph_flatten":
      found["nodes"] += ncalls / calls
  return found


def profile_overhead(rows: int = 64, calls: int = 200, momentum: float = 0.0) -> dict:
  """Per-call seconds of the NNX step's forms on a small table, and a profile.

  On a ``rows``-row table the computation is small, so what remains is the
  per-call cost: the plain ``nnx.jit`` step, the same step through
  ``nnx.cached_partial``, with ``graph=False`` and as ``jax.jit`` over
  ``nnx.split`` / ``nnx.merge``; a no-op ``nnx.jit`` over ``(model,
  optimizer)``; the dense (``nnx.Embed`` + ``nnx.Optimizer``) step plain and
  split/merge. Then cProfile of ``calls`` plain steps, sparse and dense.
  """
  ids, y = batches(rows, 1, seed=0)[0]
  result = {}

  def noop_jit():
    @nnx.jit(donate_argnums=(0, 1))
    def noop(model, optimizer):
      return None

    return noop

  for kind in ("sparse", "dense"):
    model, optimizer, train_step = build(kind, rows, momentum)
    result[f"{kind} nnx.jit step"] = _per_call(
      functools.partial(train_step, model, optimizer, ids, y), calls
    )
    result[f"{kind} nnx.jit step, profiled"] = _flax_profile(
      functools.partial(train_step, model, optimizer, ids, y), calls
    )
    value_and_grad = optax_sm3.nnx.value_and_grad if kind == "sparse" else None
    step, state = functional_step(
      model, optimizer, value_and_grad or nnx.value_and_grad
    )
    functional = carried(step, state, loss=0)
    del state
    result[f"{kind} jax.jit over split/merge"] = _per_call(
      functools.partial(functional, ids, y), calls
    )
    model, optimizer, _ = build(kind, rows, momentum)
    noop = noop_jit()
    result[f"{kind} no-op nnx.jit"] = _per_call(
      functools.partial(noop, model, optimizer), calls
    )
    result[f"{kind} no-op nnx.jit, profiled"] = _flax_profile(
      functools.partial(noop, model, optimizer), calls
    )
  model, optimizer, train_step = build("sparse", rows, momentum)
  cached = nnx.cached_partial(train_step, model, optimizer)
  result["sparse nnx.cached_partial step"] = _per_call(
    functools.partial(cached, ids, y), calls
  )
  model, optimizer, _ = build("sparse", rows, momentum)

  @nnx.jit(donate_argnums=(0, 1), graph=False)
  def tree_step(model, optimizer, ids, y):
    loss, grads = optax_sm3.nnx.value_and_grad(_loss)(model, ids, y)
    optimizer.update(model, grads)
    return loss

  result["sparse nnx.jit(graph=False) step"] = _per_call(
    functools.partial(tree_step, model, optimizer, ids, y), calls
  )
  return result


def profile_markdown(result: dict, rows: int, calls: int) -> str:
  """The per-call times and the profiles as two tables."""
  lines = [
    f"Per call, {rows}-row table, {BAGS} bags of {BAG} ids, momentum 0: median "
    f"of {PROFILE_BLOCKS} blocks of {calls} calls (wall; process CPU, both cores); "
    f"jax {jax.__version__}",
    "",
    "| form | wall per call | CPU per call |",
    "|---|---:|---:|",
  ]
  profiled = {k: v for k, v in result.items() if k.endswith(", profiled")}
  for form, r in result.items():
    if form not in profiled:
      lines.append(
        f"| {form} | {1e3 * r['wall_s']:.3f} ms | {1e3 * r['cpu_s']:.3f} ms |"
      )
  lines += [
    "",
    f"cProfile of {calls} calls, per call (profiling slows Python ~2-3x): ",
    "",
    "| form | whole nnx.jit call | flatten in (to_tree) | write back (from_tree) "
    "| graph nodes flattened |",
    "|---|---:|---:|---:|---:|",
  ]
  for form, r in profiled.items():
    lines.append(
      f"| {form.removesuffix(', profiled')} | {1e3 * r['total']:.2f} ms "
      f"| {1e3 * r['in']:.2f} ms | {1e3 * r['out']:.2f} ms | {r['nodes']:.0f} |"
    )
  return "\n".join(lines) + "\n"
