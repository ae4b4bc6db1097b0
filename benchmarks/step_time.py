"""Step time and memory of SM3 next to optax's optimizers.

One jitted, donated train step per optimizer, timed round-robin;
docs/guides/performance.md describes the modes and quotes their tables.

Usage (from the repository root)::

  python -m benchmarks.step_time [--tree transformer] [--with-direct]
  python -m benchmarks.step_time --isolated [--tree transformer]
  python -m benchmarks.step_time --isolated --tree table --with-direct --no-bf16
  python -m benchmarks.step_time --isolated --devices 8 --repeats 3 --with-direct

Writes ``step_time.md`` and ``.json`` (``step_isolated.*``) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_sm3
from benchmarks import _report, _timing

BASE_SHAPES = {
  "embedding": (200000, 128),
  "dense_in": (1024, 4096),
  "dense_out": (4096, 1024),
  "conv": (3, 3, 256, 256),
  "bias": (4096,),
}
# A transformer-like stack: many mid-sized matrices instead of one big table.
LAYERS, WIDTH = 12, 512
ROUNDS = 5  # isolated: timed rounds per process
SWEEP = (1 / 32, 1 / 8, 1 / 4, 1 / 2, 1, 2, 3)  # the size sweep's scales

LEARNING_RATE = 1e-3
M0, M9 = "optax_sm3.sm3 (m=0)", "optax_sm3.sm3 (m=0.9)"
# SM3 without the CPU loop, timed with --with-direct.
DIRECT = "optax_sm3.sm3 (m=0, block_size=0)"
# The optimizers of an isolated run and of the size sweep.
ISOLATED_NAMES = ("optax.sgd", "optax.adam", M0, M9)
SWEEP_NAMES = (*ISOLATED_NAMES[:2], "optax.sm3 (m=0)", M0, M9)


def optimizers(with_direct: bool = False) -> dict[str, optax.GradientTransformation]:
  """The optimizers timed; ``with_direct`` adds SM3 without the CPU loop."""
  lr = LEARNING_RATE
  txs = {
    "optax.sgd": optax.sgd(lr),
    "optax.adam": optax.adam(lr),
    "optax.adafactor": optax.adafactor(lr),
    **{f"optax.sm3 (m={m:g})": optax.sm3(lr, momentum=m) for m in (0.0, 0.9)},
    **{f"optax_sm3.sm3 (m={m:g})": optax_sm3.sm3(lr, momentum=m) for m in (0.0, 0.9)},
  }
  if with_direct:
    txs[DIRECT] = optax_sm3.sm3(lr, momentum=0.0, block_size=0)
  return txs


def scaled_shapes(scale: float, tree: str = "embedding") -> dict[str, tuple[int, ...]]:
  """The tree with its leading (for the conv, last) axes, or its number of
  transformer layers, scaled; ``"table"`` is the embedding tree's table alone."""
  if tree == "transformer":
    d = WIDTH
    kernels = {**dict.fromkeys("qkvo", (d, d)), "up": (d, 4 * d), "down": (4 * d, d)}
    layers = max(1, round(LAYERS * scale))
    return {f"{i}/{k}": shape for i in range(layers) for k, shape in kernels.items()}
  shapes = dict(BASE_SHAPES)
  for name, shape in BASE_SHAPES.items():
    if name == "conv":
      shapes[name] = (*shape[:3], max(1, round(shape[3] * scale)))
    elif name != "bias":
      shapes[name] = (max(1, round(shape[0] * scale)), *shape[1:])
  return {"embedding": shapes["embedding"]} if tree == "table" else shapes


def num_params(shapes) -> int:
  return sum(math.prod(s) for s in shapes.values())


def make_tree(shapes, dtype, seed):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
  return {
    name: (0.02 * jax.random.normal(key, shape)).astype(dtype)
    for key, (name, shape) in zip(keys, shapes.items(), strict=True)
  }


# Row-sharded matrices of the trees (the rest split their last axis).
ROW_SHARDED = ("embedding", "dense_out", "/o", "/down")


def mesh_spec(name: str, shape: tuple[int, ...], devices: int) -> P:
  """The tree's sharding on the ``("x",)`` mesh (:data:`ROW_SHARDED` by rows, other
  kernels by their last axis; vectors and indivisible axes replicated)."""
  if len(shape) < 2:
    return P()
  axis = 0 if any(key in name for key in ROW_SHARDED) else len(shape) - 1
  if shape[axis] % devices:
    return P()
  return P(*(("x" if a == axis else None) for a in range(len(shape))))


def device_bytes(tree) -> int:
  """Bytes of ``tree`` held on the first device (all of it, unless sharded)."""
  first = jax.devices()[0]
  return sum(
    shard.data.nbytes
    for leaf in jax.tree.leaves(tree)
    for shard in leaf.addressable_shards
    if shard.device == first
  )


class Case:
  """One optimizer on one tree: a compiled, donated train step (on ``devices > 1``,
  sharded by :func:`mesh_spec` and :func:`optax_sm3.state_shardings`)."""

  def __init__(self, tx, shapes, dtype, devices: int = 1):
    params, grads = make_tree(shapes, dtype, seed=0), make_tree(shapes, dtype, seed=1)
    shardings = {}
    if devices > 1:
      mesh = jax.make_mesh((devices,), ("x",), axis_types=(AxisType.Auto,))
      param_sh = {
        k: NamedSharding(mesh, mesh_spec(k, s, devices)) for k, s in shapes.items()
      }
      params, grads = jax.device_put((params, grads), (param_sh, param_sh))
      state_sh = optax_sm3.state_shardings(tx, params, param_sh)
      state = jax.jit(tx.init, out_shardings=state_sh)(params)
      shardings = {
        "in_shardings": (param_sh, state_sh, param_sh),
        "out_shardings": (param_sh, state_sh),
      }
    else:
      state = tx.init(params)

    start = time.perf_counter()
    step, args = _timing.train_step(tx), (params, state, grads)
    # ``run(steps)``: seconds per step.
    compiled, self.run = _timing.compiled_loop(step, args, (0, 1), **shardings)
    info = {
      "compile_s": time.perf_counter() - start,
      "param_bytes": device_bytes(params),
      "state_bytes": device_bytes(state),
      # A partitioned program is per device: so is its temporary.
      "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
      "all_gathers": sum(
        " all-gather(" in line or " all-gather-start(" in line
        for line in compiled.as_text().splitlines()
      ),
      "num_params": num_params(shapes),
    }
    for key in ("temp", "state"):
      info[f"{key}_fraction"] = info[f"{key}_bytes"] / info["param_bytes"]
    self.info = info
    self.run(2)  # warm-up


def round_robin(names, sample, repeats: int, progress) -> dict[str, dict]:
  """Each name's ``sample(name)`` once per round, in an order shuffled every round
  so that no optimizer always pays for what the same neighbour left behind."""
  order = random.Random(0)
  samples = {name: [] for name in names}
  for _ in range(repeats):
    for name in order.sample(list(names), len(names)):
      samples[name].append(sample(name))
      progress.set_postfix_str(f"{name}: {samples[name][-1]['ms']:.1f} ms")
      progress.update()
  rows = {}
  for name, runs in samples.items():
    times = [s["ms"] for s in runs]
    rows[name] = {
      "round_ms": times,
      "round_compile_s": [s["compile_s"] for s in runs],
      "median_ms": statistics.median(times),
      "min_ms": min(times),
      "max_ms": max(times),
      "compile_s": statistics.median(s["compile_s"] for s in runs),
      **{k: v for k, v in runs[0].items() if k not in ("ms", "compile_s")},
    }
  return rows


def child(name, tree, scale, dtype, steps, devices) -> dict:
  """One optimizer, measured in its own process (``--child``)."""
  if jax.device_count() != devices:
    raise RuntimeError(f"expected {devices} devices, JAX has {jax.device_count()}")
  tx = optimizers(with_direct=True)[name]
  case = Case(tx, scaled_shapes(scale, tree), jnp.dtype(dtype), devices)
  times = [case.run(steps) for _ in range(ROUNDS)]
  return {"ms": 1e3 * statistics.median(times), **case.info}


def measure(args, names, dtype: str, scale: float, progress) -> dict[str, dict]:
  """The rows of ``names`` on the tree at ``scale``, by the mode of ``args``."""
  if args.isolated:

    def sample(name):
      case = [name, args.tree, scale, dtype, args.steps, args.devices]
      module = "benchmarks.step_time"
      return _timing.in_child(module, "--child", json.dumps(case), devices=args.devices)

  else:
    txs = optimizers(args.with_direct)
    shapes = scaled_shapes(scale, args.tree)
    cases = {name: Case(txs[name], shapes, jnp.dtype(dtype)) for name in names}

    def sample(name):
      return {"ms": 1e3 * cases[name].run(args.steps), **cases[name].info}

  rows = round_robin(names, sample, args.repeats, progress)
  add_ratios(rows)
  return rows


# (ratio, baseline, per-round figure): each a median of per-round ratios.
RATIOS = (
  ("vs_adam", "optax.adam", "round_ms"),
  ("vs_sgd", "optax.sgd", "round_ms"),
  ("vs_optax_sm3_m0", "optax.sm3 (m=0)", "round_ms"),
  ("compile_vs_adam", "optax.adam", "round_compile_s"),
)


def add_ratios(rows):
  """Ratios to the baselines: the median of per-round ratios (a round's times
  are moments apart, so their ratio cancels a shared machine's slow drifts)."""
  for row in rows.values():
    for key, base, figure in RATIOS:
      if base in rows and figure in row:
        row[key] = statistics.median(
          t / b for t, b in zip(row[figure], rows[base][figure], strict=True)
        )


# The growth exponent is fitted on trees past the last-level cache (32 MiB of
# float32), which fixed per-step costs and cache-resident trees do not bend.
GROWTH_FROM_PARAMS = 8_000_000


def growth_exponent(sizes, times) -> float:
  """Least-squares slope of log(time) on log(size) (1: linear); NaN for one size."""
  if len(set(sizes)) < 2:
    return math.nan
  logs = [math.log(n) for n in sizes], [math.log(t) for t in times]
  return statistics.linear_regression(*logs).slope


def growth_exponents(sweep, min_params: int = GROWTH_FROM_PARAMS) -> dict[str, float]:
  """Each optimizer's :func:`growth_exponent` on the sweep's large points."""
  points = [p for p in sweep.values() if p["num_params"] >= min_params]
  if len(points) < 2:
    points = list(sweep.values())
  sizes = [p["num_params"] for p in points]
  return {
    name: growth_exponent(sizes, [p["rows"][name]["median_ms"] for p in points])
    for name in points[0]["rows"]
  }


def _percent(key):
  return lambda r: f"{r[key] / r['param_bytes']:.2%}"


def _ratio(key):
  return lambda r: f"{r.get(key, math.nan):.2f}"


def _mib(key):
  return lambda r: _report.format_bytes(r[key], "MiB", label=False)


# A table column: its header and the cell of a row (", per device" added on a mesh).
CELLS = {
  "median step (ms)": lambda r: f"{r['median_ms']:.1f}",
  "vs adam": _ratio("vs_adam"),
  "vs optax.sm3 (m=0)": _ratio("vs_optax_sm3_m0"),
  "vs sgd": _ratio("vs_sgd"),
  "compile (s)": lambda r: f"{r['compile_s']:.2f}",
  "compile vs adam": _ratio("compile_vs_adam"),
  "state (MiB)": _mib("state_bytes"),
  "state / params": _percent("state_bytes"),
  "XLA temp (MiB)": _mib("temp_bytes"),
  "temp / params": _percent("temp_bytes"),
  "XLA temp / params": _percent("temp_bytes"),
  "all-gathers": lambda r: str(r.get("all_gathers", 0)),
}
_TIMES = ["median step (ms)", "vs adam", "vs optax.sm3 (m=0)", "vs sgd"]
_MEMORY = ["state (MiB)", "state / params", "XLA temp (MiB)", "temp / params"]
IN_PROCESS_COLUMNS = [*_TIMES, *_MEMORY]
ISOLATED_COLUMNS = ["median step (ms)", "vs adam", "vs sgd", "compile (s)"]
ISOLATED_COLUMNS += ["compile vs adam", "state / params", "XLA temp / params"]
DEVICE_COLUMNS = [*ISOLATED_COLUMNS[:5], "state / params, per device"]
DEVICE_COLUMNS += ["XLA temp / params, per device", "all-gathers"]


def table(rows, title: str, columns=ISOLATED_COLUMNS) -> str:
  """One row per optimizer, one column per header in ``columns``."""
  body = [
    [name, *(CELLS[c.removesuffix(", per device")](r) for c in columns)]
    for name, r in rows.items()
  ]
  return "\n".join([f"#### {title}", "", *_report.table(["optimizer", *columns], body)])


def sweep_table(sweep, exponents) -> str:
  """The size sweep's step times, and the growth exponents fitted on it."""
  names = list(next(iter(sweep.values()))["rows"])
  rows = []
  for point in sweep.values():
    n = point["num_params"]
    times = [point["rows"][k]["median_ms"] for k in names]
    rows.append([f"{n / 1e6:.1f} M", *(f"{t:.1f} ({1e6 * t / n:.2f})" for t in times)])
  if len(sweep) > 1:
    label = f"growth exponent b (time ~ n^b, n >= {GROWTH_FROM_PARAMS / 1e6:g} M)"
    rows.append([label, *(f"{exponents[k]:.2f}" for k in names)])
  title = "#### Size sweep (float32): median step time in ms (ns per parameter)"
  lines = _report.table(["parameters", *names], rows, "r" * (len(names) + 1))
  return "\n".join([title, "", *lines])


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add = parser.add_argument
  add("--isolated", action="store_true", help="one optimizer per process")
  add("--repeats", type=int, help="rounds per optimizer (isolated: processes)")
  add("--steps", type=int, default=3, help="steps per timed round")
  add("--no-sweep", action="store_true", help="skip the size sweep (in-process only)")
  add("--no-bf16", action="store_true", help="skip the bfloat16 run")
  add("--tree", choices=("embedding", "transformer", "table"), default="embedding")
  add("--scale", type=float, default=1.0, help="scale the tree (and the sweep)")
  add("--with-direct", action="store_true", help=f"also time {DIRECT!r}")
  add("--devices", type=int, default=1, help="> 1: a mesh of CPU devices, isolated")
  add("--out", default="results/step_time", help="output folder")
  add("--child", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.isolated = args.isolated or args.devices > 1
  args.repeats = args.repeats or (7 if args.isolated else 11)
  if min(args.repeats, args.steps, args.devices) < 1:
    parser.error("--repeats, --steps and --devices must be >= 1")
  if not args.scale > 0:
    parser.error("--scale must be > 0")
  return args


def markdown(args, result, wall_s: float) -> str:
  """The run's tables under a line that says what ran where."""
  shapes = scaled_shapes(args.scale, args.tree)
  if args.isolated:
    how = (
      f"one optimizer per process, {args.repeats} passes in shuffled order, each "
      f"process the median of {ROUNDS} rounds of {args.steps} steps; ratios "
      "are medians of per-pass ratios"
    )
    columns = ISOLATED_COLUMNS if args.devices == 1 else DEVICE_COLUMNS
  else:
    how = (
      f"all optimizers in one process, {args.repeats} rounds of {args.steps} "
      "steps round-robin (shuffled each round); ratios are medians of the "
      "per-round ratios"
    )
    columns = IN_PROCESS_COLUMNS
  where = "1 device"
  if args.devices > 1:
    where = f"{args.devices} CPU devices (one-axis mesh, tree sharded by `step_time.mesh_spec`)"
  machine = result["machine"]
  parts = [
    f"Tree: {args.tree} x {args.scale:g} ({num_params(shapes) / 1e6:.1f} M parameters "
    f"in {len(shapes)} arrays) on {where}; {how}; jax {machine['jax']}, optax "
    f"{machine['optax']}, {machine['cpus']} CPUs; wall time {wall_s:.0f} s."
  ]
  for dtype in ("float32", "bfloat16"):
    if dtype in result:
      parts += ["", table(result[dtype], f"{dtype} parameters", columns)]
  if "sweep" in result:
    parts += ["", sweep_table(result["sweep"], result["growth_exponents"])]
  return "\n".join(parts) + "\n"


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.child is not None:
    print(json.dumps(child(*json.loads(args.child))))
    return {}
  import tqdm

  started = time.perf_counter()
  names = list(ISOLATED_NAMES if args.isolated else optimizers())
  names += [DIRECT] if args.with_direct else []
  dtypes = ["float32"] + ([] if args.no_bf16 else ["bfloat16"])
  # One point per tree size: small scales of the transformer tree round to
  # the same number of layers.
  sweep_scales = {}
  for scale in () if args.no_sweep or args.isolated else SWEEP:
    n = num_params(scaled_shapes(scale * args.scale, args.tree))
    sweep_scales.setdefault(n, scale)
  runs = len(names) * len(dtypes) + len(SWEEP_NAMES) * len(sweep_scales)
  result = {
    # The parent of isolated runs leaves the devices to its children.
    "machine": _report.machine(backend=not args.isolated),
    "isolated": args.isolated,
    **{k: getattr(args, k) for k in ("tree", "scale", "repeats", "steps")},
    **({"rounds": ROUNDS, "devices": args.devices} if args.isolated else {}),
  }
  total = args.repeats * runs
  with tqdm.tqdm(total=total, desc="timing", unit="round", file=sys.stderr) as bar:
    for dtype in dtypes:
      result[dtype] = measure(args, names, dtype, args.scale, bar)
    if sweep_scales:
      result["sweep"] = {
        f"{scale:g}": {
          "num_params": n,
          "rows": measure(args, SWEEP_NAMES, "float32", scale * args.scale, bar),
        }
        for n, scale in sweep_scales.items()
      }
      result["growth_exponents"] = growth_exponents(result["sweep"])
  text = markdown(args, result, time.perf_counter() - started)
  stem = "step_isolated" if args.isolated else "step_time"
  _report.save(args.out, stem, text, result)
  return result


if __name__ == "__main__":
  main()
