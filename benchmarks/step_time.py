"""Step time and memory of SM3 next to optax's optimizers, on one CPU run.

One jitted train step (``update`` + ``optax.apply_updates``, parameters and
state donated) per optimizer, on a 34.6 M-parameter tree: an embedding
(200000, 128), dense kernels (1024, 4096) and (4096, 1024), a conv kernel
(3, 3, 256, 256) and a bias (4096,). Optimizers are timed round-robin, so
machine noise hits all of them alike; the report gives medians and ratios
taken within this run, the optimizer state bytes, and XLA's temporary bytes
for the step. A size sweep (about 1 M to 100 M parameters) shows how the
step time grows.

Usage (from the repository root)::

  python benchmarks/step_time.py            # full run, a few minutes
  python benchmarks/step_time.py --quick    # about a minute

Writes ``step_time.md`` and ``step_time.json`` under ``--out``
(``results/step_time`` by default) and prints the Markdown.

Ratios are medians of per-round ratios (see :func:`add_ratios`); the targets
of the performance issue are checked at the end (:data:`TARGETS`).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pathlib
import platform
import random
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

try:
  from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is in the [bench] extra
  tqdm = None

import optax_sm3

BASE_SHAPES = {
  "embedding": (200000, 128),
  "dense_in": (1024, 4096),
  "dense_out": (4096, 1024),
  "conv": (3, 3, 256, 256),
  "bias": (4096,),
}

LEARNING_RATE = 1e-3


def optimizers(with_direct: bool = False) -> dict[str, optax.GradientTransformation]:
  """The optimizers timed; ``with_direct`` adds SM3 without the CPU loop."""
  txs = {
    "optax.sgd": optax.sgd(LEARNING_RATE),
    "optax.adam": optax.adam(LEARNING_RATE),
    "optax.adafactor": optax.adafactor(LEARNING_RATE),
    "optax.sm3 (m=0)": optax.sm3(LEARNING_RATE, momentum=0.0),
    "optax.sm3 (m=0.9)": optax.sm3(LEARNING_RATE, momentum=0.9),
    "optax_sm3.sm3 (m=0)": optax_sm3.sm3(LEARNING_RATE, momentum=0.0),
    "optax_sm3.sm3 (m=0.9)": optax_sm3.sm3(LEARNING_RATE, momentum=0.9),
  }
  if with_direct:
    txs["optax_sm3.sm3 (m=0, block_size=0)"] = optax_sm3.sm3(
      LEARNING_RATE, momentum=0.0, block_size=0
    )
  return txs


# A transformer-like stack: many mid-sized matrices instead of one big table.
LAYERS, WIDTH = 12, 512


def transformer_shapes(layers: int, width: int = WIDTH) -> dict[str, tuple[int, ...]]:
  """Attention (4 x (d, d)) and MLP ((d, 4d), (4d, d)) kernels per layer."""
  shapes = {}
  for layer in range(layers):
    for name in ("q", "k", "v", "o"):
      shapes[f"{layer}/{name}"] = (width, width)
    shapes[f"{layer}/up"] = (width, 4 * width)
    shapes[f"{layer}/down"] = (4 * width, width)
  return shapes


def scaled_shapes(scale: float, tree: str = "embedding") -> dict[str, tuple[int, ...]]:
  """The tree with its leading (or, for the conv, last) axes scaled.

  For the transformer tree, the number of layers is scaled instead.
  """
  if tree == "transformer":
    return transformer_shapes(max(1, round(LAYERS * scale)))
  shapes = {}
  for name, shape in BASE_SHAPES.items():
    if name == "bias":
      shapes[name] = shape
    elif name == "conv":
      shapes[name] = (*shape[:3], max(1, round(shape[3] * scale)))
    else:
      shapes[name] = (max(1, round(shape[0] * scale)), *shape[1:])
  return shapes


def make_tree(shapes, dtype, seed):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
  return {
    name: (0.02 * jax.random.normal(key, shape)).astype(dtype)
    for key, (name, shape) in zip(keys, shapes.items(), strict=True)
  }


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


class Case:
  """One optimizer on one tree: a compiled, donated train step."""

  def __init__(self, tx, shapes, dtype):
    self.params = make_tree(shapes, dtype, seed=0)
    self.grads = make_tree(shapes, dtype, seed=1)
    self.state = tx.init(self.params)
    self.param_bytes = tree_bytes(self.params)
    self.state_bytes = tree_bytes(self.state)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    start = time.perf_counter()
    self.step = step.lower(self.params, self.state, self.grads).compile()
    self.compile_s = time.perf_counter() - start
    self.temp_bytes = self.step.memory_analysis().temp_size_in_bytes
    self.times: list[float] = []
    self.run(2)  # warm-up

  def run(self, steps: int) -> float:
    """Runs ``steps`` steps; returns seconds per step."""
    start = time.perf_counter()
    for _ in range(steps):
      self.params, self.state = self.step(self.params, self.state, self.grads)
    jax.block_until_ready(self.params)
    return (time.perf_counter() - start) / steps

  def close(self):
    del self.params, self.state, self.grads, self.step


def measure(txs, shapes, dtype, repeats, steps_per_repeat, progress, seed=0):
  """Round-robin timing of every optimizer; returns one row per optimizer.

  The order is shuffled every round (seeded): a step that runs right after
  another optimizer's pays for what that one left behind (its temporaries
  freed, the caches filled with its buffers), and no optimizer should always
  follow the same neighbour.
  """
  cases = {name: Case(tx, shapes, dtype) for name, tx in txs.items()}
  order = random.Random(seed)
  for _ in range(repeats):
    for case in order.sample(list(cases.values()), len(cases)):
      case.times.append(case.run(steps_per_repeat))
      progress.update(1)
  rows = {}
  for name, case in cases.items():
    rows[name] = {
      "round_ms": [1e3 * t for t in case.times],
      "median_ms": 1e3 * statistics.median(case.times),
      "min_ms": 1e3 * min(case.times),
      "max_ms": 1e3 * max(case.times),
      "param_bytes": case.param_bytes,
      "state_bytes": case.state_bytes,
      "temp_bytes": case.temp_bytes,
    }
    case.close()
  return rows


def add_ratios(rows):
  """Ratios to the baselines: the median over rounds of each round's ratio.

  Optimizers are timed round-robin, so the times of one round are taken
  moments apart; their ratio cancels the slow drifts of a shared machine's
  speed that a ratio of two medians would keep.
  """
  for row in rows.values():
    for base, key in (
      ("optax.adam", "vs_adam"),
      ("optax.sgd", "vs_sgd"),
      ("optax.sm3 (m=0)", "vs_optax_sm3_m0"),
    ):
      if base in rows:
        row[key] = statistics.median(
          t / b for t, b in zip(row["round_ms"], rows[base]["round_ms"], strict=True)
        )


# The targets of the performance issue, checked on the float32 tree:
# (what, optimizer row, metric of the row, upper bound).
TARGETS = (
  ("step time / optax.adam", "optax_sm3.sm3 (m=0)", "vs_adam", 0.6),
  ("step time / optax.sm3 (m=0)", "optax_sm3.sm3 (m=0)", "vs_optax_sm3_m0", 0.3),
  ("step time / optax.adam", "optax_sm3.sm3 (m=0.9)", "vs_adam", 0.8),
  ("XLA temporary / parameter bytes", "optax_sm3.sm3 (m=0)", "temp_fraction", 0.05),
  ("XLA temporary / parameter bytes", "optax_sm3.sm3 (m=0.9)", "temp_fraction", 0.05),
  ("optimizer state / parameter bytes", "optax_sm3.sm3 (m=0)", "state_fraction", 0.01),
)
# Step time ~ n ** b over the size sweep: at most linear growth means
# b <= 1 + GROWTH_TOLERANCE (b < 1: fixed per-step costs still amortising).
GROWTH_TOLERANCE = 0.1
# The exponent is fitted on sweep points with at least this many parameters
# (32 MiB of float32: past the last-level cache of the machines we run on), so
# fixed per-step costs and cache-resident small trees do not bend it.
GROWTH_FROM_PARAMS = 8_000_000


def add_fractions(rows):
  for row in rows.values():
    row["temp_fraction"] = row["temp_bytes"] / row["param_bytes"]
    row["state_fraction"] = row["state_bytes"] / row["param_bytes"]


def growth_exponent(sizes, times) -> float:
  """Least-squares slope of log(time) against log(size): 1 for linear growth.

  NaN when the sizes do not differ (there is no slope to fit).
  """
  if len(set(sizes)) < 2:
    return math.nan
  x = [math.log(n) for n in sizes]
  y = [math.log(t) for t in times]
  mx, my = statistics.fmean(x), statistics.fmean(y)
  return sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sum(
    (a - mx) ** 2 for a in x
  )


def growth_exponents(sweep, min_params: int = GROWTH_FROM_PARAMS) -> dict[str, float]:
  points = [p for p in sweep.values() if p["num_params"] >= min_params]
  if len(points) < 2:
    points = list(sweep.values())
  sizes = [p["num_params"] for p in points]
  return {
    name: growth_exponent(sizes, [p["rows"][name]["median_ms"] for p in points])
    for name in points[0]["rows"]
  }


def check_targets(result) -> list[dict]:
  """Each target with the value measured in this run and whether it is met."""
  rows = result["float32"]
  checks = [
    {
      "target": f"{name}: {what} <= {bound:g}",
      "value": rows[name][metric],
      "met": rows[name][metric] <= bound,
    }
    for what, name, metric, bound in TARGETS
    if name in rows and metric in rows[name]
  ]
  exponents = result.get("growth_exponents", {})
  for name in ("optax_sm3.sm3 (m=0)", "optax_sm3.sm3 (m=0.9)"):
    if name in exponents:
      checks.append(
        {
          "target": f"{name}: step time ~ n^b over the sweep, b <= "
          f"{1 + GROWTH_TOLERANCE:g} (at most linear)",
          "value": exponents[name],
          "met": exponents[name] <= 1 + GROWTH_TOLERANCE,
        }
      )
  return checks


def targets_table(checks) -> str:
  lines = [
    "#### Targets (float32 tree)",
    "",
    "| target | measured | met |",
    "|---|---:|:-:|",
  ]
  for c in checks:
    lines.append(
      f"| {c['target']} | {c['value']:.3g} | {'yes' if c['met'] else 'NO'} |"
    )
  return "\n".join(lines)


def _mb(n: int) -> str:
  return f"{n / 2**20:,.1f}"


def main_table(rows, title) -> str:
  lines = [
    f"#### {title}",
    "",
    "| optimizer | median step (ms) | vs adam | vs optax.sm3 (m=0) | vs sgd "
    "| state (MiB) | state / params | XLA temp (MiB) | temp / params |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for name, r in rows.items():
    lines.append(
      f"| {name} | {r['median_ms']:.1f} | {r.get('vs_adam', math.nan):.2f} "
      f"| {r.get('vs_optax_sm3_m0', math.nan):.2f} | {r.get('vs_sgd', math.nan):.2f} "
      f"| {_mb(r['state_bytes'])} | {r['state_fraction']:.2%} "
      f"| {_mb(r['temp_bytes'])} | {r['temp_fraction']:.2%} |"
    )
  return "\n".join(lines)


def sweep_table(sweep, exponents) -> str:
  names = list(next(iter(sweep.values()))["rows"])
  lines = [
    "#### Size sweep (float32): median step time in ms (ns per parameter)",
    "",
    "| parameters | " + " | ".join(names) + " |",
    "|---:|" + "---:|" * len(names),
  ]
  for point in sweep.values():
    n = point["num_params"]
    cells = [
      f"{point['rows'][k]['median_ms']:.1f} ({1e6 * point['rows'][k]['median_ms'] / n:.2f})"
      for k in names
    ]
    lines.append(f"| {n / 1e6:.1f} M | " + " | ".join(cells) + " |")
  if len(sweep) > 1:
    lines.append(
      f"| growth exponent b (time ~ n^b, n >= {GROWTH_FROM_PARAMS / 1e6:g} M) | "
      + " | ".join(f"{exponents[k]:.2f}" for k in names)
      + " |"
    )
  return "\n".join(lines)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--quick", action="store_true", help="fewer repeats, a shorter sweep"
  )
  parser.add_argument(
    "--repeats", type=int, default=None, help="timed rounds per optimizer"
  )
  parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
  parser.add_argument("--no-sweep", action="store_true", help="skip the size sweep")
  parser.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 run")
  parser.add_argument(
    "--tree",
    choices=("embedding", "transformer"),
    default="embedding",
    help="embedding: the 34.6 M-parameter tree above; transformer: 12 layers "
    f"of width {WIDTH} (37.7 M parameters in 72 matrices)",
  )
  parser.add_argument(
    "--scale",
    type=float,
    default=1.0,
    help="scale the tree's sizes (1 = the tree as described above; the sweep "
    "scales from there)",
  )
  parser.add_argument(
    "--with-direct",
    action="store_true",
    help="also time optax_sm3.sm3 with block_size=0 (no CPU loop)",
  )
  parser.add_argument("--out", default="results/step_time", help="output folder")
  args = parser.parse_args(argv)
  if args.repeats is None:
    args.repeats = 5 if args.quick else 11
  if args.repeats < 1 or args.steps < 1:
    parser.error("--repeats and --steps must be >= 1")
  if not args.scale > 0:
    parser.error("--scale must be > 0")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  txs = optimizers(args.with_direct)
  sweep_names = [
    "optax.sgd",
    "optax.adam",
    "optax.sm3 (m=0)",
    "optax_sm3.sm3 (m=0)",
    "optax_sm3.sm3 (m=0.9)",
  ]
  base_shapes = scaled_shapes(args.scale, args.tree)
  scales = [1 / 32, 1 / 4, 1] if args.quick else [1 / 32, 1 / 8, 1 / 4, 1 / 2, 1, 2, 3]
  # One tree per size: small scales of the transformer tree round to the same
  # number of layers.
  sweep_trees = {}
  for scale in [] if args.no_sweep else scales:
    shapes = scaled_shapes(scale * args.scale, args.tree)
    sweep_trees.setdefault(sum(math.prod(s) for s in shapes.values()), (scale, shapes))
  total = args.repeats * len(txs) * (1 if args.no_bf16 else 2)
  total += args.repeats * len(sweep_names) * len(sweep_trees)
  bar = (
    tqdm(total=total, desc="timing", unit="round", file=sys.stderr) if tqdm else None
  )
  progress = bar if bar is not None else type("P", (), {"update": lambda *_: None})()

  result = {
    "machine": {
      "platform": platform.platform(),
      "processor": platform.processor(),
      "jax": jax.__version__,
      "optax": optax.__version__,
      "optax_sm3": optax_sm3.__version__,
      "devices": [str(d) for d in jax.devices()],
      "cpus": os.cpu_count(),
    },
    "tree": args.tree,
    "scale": args.scale,
    "repeats": args.repeats,
    "steps_per_repeat": args.steps,
  }
  result["float32"] = measure(
    txs, base_shapes, jnp.float32, args.repeats, args.steps, progress
  )
  if not args.no_bf16:
    result["bfloat16"] = measure(
      txs, base_shapes, jnp.bfloat16, args.repeats, args.steps, progress
    )
  if not args.no_sweep:
    result["sweep"] = {}
    for n, (scale, shapes) in sweep_trees.items():
      rows = measure(
        {k: txs[k] for k in sweep_names},
        shapes,
        jnp.float32,
        args.repeats,
        args.steps,
        progress,
      )
      result["sweep"][f"{scale:g}"] = {"num_params": n, "rows": rows}
  if bar is not None:
    bar.close()
  for key in ("float32", "bfloat16"):
    if key in result:
      add_ratios(result[key])
      add_fractions(result[key])
  if "sweep" in result:
    result["growth_exponents"] = growth_exponents(result["sweep"])
  result["targets"] = check_targets(result)

  n = sum(math.prod(s) for s in base_shapes.values())
  machine = result["machine"]
  parts = [
    f"Parameter tree: {args.tree}, {n / 1e6:.1f} M values in "
    f"{len(base_shapes)} arrays; medians of {args.repeats} rounds "
    f"of {args.steps} steps, all optimizers timed round-robin (shuffled each round) in one run; ratios "
    "are medians of the per-round ratios "
    f"(jax {machine['jax']}, optax {machine['optax']}, {machine['cpus']} CPUs, "
    f"{len(machine['devices'])} device(s)).",
    "",
    main_table(result["float32"], "float32 parameters"),
  ]
  if "bfloat16" in result:
    parts += ["", main_table(result["bfloat16"], "bfloat16 parameters")]
  if "sweep" in result:
    parts += ["", sweep_table(result["sweep"], result["growth_exponents"])]
  if args.tree == "embedding":
    parts += ["", targets_table(result["targets"])]
  markdown = "\n".join(parts) + "\n"
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "step_time.md").write_text(markdown)
  (out / "step_time.json").write_text(json.dumps(result, indent=2))
  print(markdown)
  print(f"wrote {out / 'step_time.md'} and {out / 'step_time.json'}")
  return result


if __name__ == "__main__":
  main()
