"""Step time with one optimizer per process, the figure the README quotes.

In one process (``benchmarks/step_time.py``) the optimizers share an
allocator and caches: a step that runs after another optimizer pays for what
that one left behind, and XLA's buffer reuse shifts the figures. Here every
measurement is a fresh process that builds one optimizer on the tree, compiles
its donated train step (the compile time is recorded), warms up and times
``--steps`` steps per round for ``--rounds`` rounds. The parent runs each
optimizer once per *pass*, in a shuffled order (seeded), for ``--passes``
passes; ratios are medians over passes of the per-pass ratios (the processes of
one pass run moments apart, so the slow drifts of a shared machine cancel).

Usage (from the repository root)::

  python -m benchmarks.step_isolated                    # f32 + bf16, embedding tree
  python -m benchmarks.step_isolated --tree transformer # 72 mid-sized matrices
  python -m benchmarks.step_isolated --quick            # a smaller tree, 3 passes

Writes ``step_isolated.md`` / ``.json`` under ``--out`` (default
``results/step_isolated``) and prints the Markdown with the targets of the
performance issue, met or not, computed in the run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import time

# The optimizers compared, by name (see benchmarks/step_time.py).
NAMES = (
  "optax.sgd",
  "optax.adam",
  "optax_sm3.sm3 (m=0)",
  "optax_sm3.sm3 (m=0.9)",
)

# (what, optimizer, metric, upper bound) on the float32 and bfloat16 trees.
TARGETS = (
  ("step time / optax.adam", "optax_sm3.sm3 (m=0)", "vs_adam", 0.6),
  ("step time / optax.sgd", "optax_sm3.sm3 (m=0)", "vs_sgd", 1.6),
  ("step time / optax.adam", "optax_sm3.sm3 (m=0.9)", "vs_adam", 0.9),
)
# Compile time of the transformer tree, against Adam's.
COMPILE_TARGET = ("compile time / optax.adam", "optax_sm3.sm3 (m=0)", 2.0)


def child(name: str, tree: str, scale: float, dtype: str, steps: int, rounds: int):
  """Runs in its own process: one optimizer, prints one JSON line."""
  import jax.numpy as jnp

  from benchmarks import step_time

  tx = step_time.optimizers()[name]
  shapes = step_time.scaled_shapes(scale, tree)
  start = time.perf_counter()
  case = step_time.Case(tx, shapes, jnp.dtype(dtype))
  setup_s = time.perf_counter() - start
  times = [case.run(steps) for _ in range(rounds)]
  print(
    json.dumps(
      {
        "median_ms": 1e3 * statistics.median(times),
        "param_bytes": case.param_bytes,
        "state_bytes": case.state_bytes,
        "temp_bytes": case.temp_bytes,
        # Lowering and compiling the donated train step, in a fresh process.
        "compile_s": case.compile_s,
        "setup_s": setup_s,
      }
    )
  )


def run_child(name, args, dtype) -> dict:
  command = [
    sys.executable,
    "-m",
    "benchmarks.step_isolated",
    "--child",
    name,
    "--tree",
    args.tree,
    "--scale",
    str(args.scale),
    "--dtype",
    dtype,
    "--steps",
    str(args.steps),
    "--rounds",
    str(args.rounds),
  ]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    raise RuntimeError(f"{name} ({dtype}) failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def measure(args, dtype: str, progress) -> dict:
  """Every optimizer once per pass, shuffled; per-pass ratios to the baselines."""
  order = random.Random(args.seed)
  passes = []
  for _ in range(args.passes):
    one = {}
    for name in order.sample(list(NAMES), len(NAMES)):
      one[name] = run_child(name, args, dtype)
      progress(f"{dtype} {name}: {one[name]['median_ms']:.1f} ms")
    passes.append(one)
  rows = {}
  for name in NAMES:
    times = [p[name]["median_ms"] for p in passes]
    rows[name] = {
      "pass_ms": times,
      "median_ms": statistics.median(times),
      "compile_s": statistics.median(p[name]["compile_s"] for p in passes),
      **{k: passes[0][name][k] for k in ("param_bytes", "state_bytes", "temp_bytes")},
    }
    for base, key in (("optax.adam", "vs_adam"), ("optax.sgd", "vs_sgd")):
      rows[name][key] = statistics.median(
        p[name]["median_ms"] / p[base]["median_ms"] for p in passes
      )
    rows[name]["compile_vs_adam"] = statistics.median(
      p[name]["compile_s"] / p["optax.adam"]["compile_s"] for p in passes
    )
  return rows


def check_targets(result: dict) -> list[dict]:
  checks = []
  for dtype in ("float32", "bfloat16"):
    for what, name, metric, bound in TARGETS:
      if dtype in result:
        value = result[dtype][name][metric]
        checks.append(
          {
            "target": f"{dtype}: {name}: {what} <= {bound:g}",
            "value": value,
            "met": value <= bound,
          }
        )
  if result["tree"] == "transformer":
    what, name, bound = COMPILE_TARGET
    value = result["float32"][name]["compile_vs_adam"]
    checks.append(
      {"target": f"{name}: {what} <= {bound:g}", "value": value, "met": value <= bound}
    )
  return checks


def table(rows: dict, title: str) -> str:
  lines = [
    f"#### {title}",
    "",
    "| optimizer | median step (ms) | vs adam | vs sgd | compile (s) | compile vs adam "
    "| state / params | XLA temp / params |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for name, r in rows.items():
    lines.append(
      f"| {name} | {r['median_ms']:.1f} | {r['vs_adam']:.2f} | {r['vs_sgd']:.2f} "
      f"| {r['compile_s']:.2f} | {r['compile_vs_adam']:.2f} "
      f"| {r['state_bytes'] / r['param_bytes']:.2%} "
      f"| {r['temp_bytes'] / r['param_bytes']:.2%} |"
    )
  return "\n".join(lines)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--quick", action="store_true", help="a quarter-size tree, 3 passes"
  )
  parser.add_argument(
    "--passes", type=int, default=None, help="processes per optimizer"
  )
  parser.add_argument("--rounds", type=int, default=5, help="timed rounds per process")
  parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
  parser.add_argument(
    "--tree", choices=("embedding", "transformer"), default="embedding"
  )
  parser.add_argument("--scale", type=float, default=None, help="scale the tree")
  parser.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 run")
  parser.add_argument("--seed", type=int, default=0, help="seed of the pass orders")
  parser.add_argument("--out", default="results/step_isolated", help="output folder")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.passes is None:
    args.passes = 3 if args.quick else 7
  if args.scale is None:
    args.scale = 0.25 if args.quick else 1.0
  if min(args.passes, args.rounds, args.steps) < 1 or not args.scale > 0:
    parser.error("--passes, --rounds, --steps must be >= 1 and --scale > 0")
  if args.child is not None and args.child not in NAMES:
    parser.error(f"--child must be one of {NAMES}")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.child is not None:
    child(args.child, args.tree, args.scale, args.dtype, args.steps, args.rounds)
    return {}
  started = time.perf_counter()
  result = {
    "tree": args.tree,
    "scale": args.scale,
    "passes": args.passes,
    "rounds": args.rounds,
    "steps": args.steps,
    "cpus": os.cpu_count(),
  }

  def progress(line):
    print(f"[{time.perf_counter() - started:6.0f} s] {line}", file=sys.stderr)

  result["float32"] = measure(args, "float32", progress)
  if not args.no_bf16:
    result["bfloat16"] = measure(args, "bfloat16", progress)
  result["targets"] = check_targets(result)
  n = result["float32"]["optax.adam"]["param_bytes"] / 4
  parts = [
    f"Tree: {args.tree} x {args.scale:g} ({n / 1e6:.1f} M parameters); one optimizer "
    f"per process, {args.passes} passes in shuffled order, each process the median "
    f"of {args.rounds} rounds of {args.steps} steps; ratios are medians of per-pass "
    f"ratios; {os.cpu_count()} CPUs; wall time {time.perf_counter() - started:.0f} s.",
    "",
    table(result["float32"], "float32 parameters"),
  ]
  if "bfloat16" in result:
    parts += ["", table(result["bfloat16"], "bfloat16 parameters")]
  parts += ["", "| target | measured | met |", "|---|---:|:-:|"]
  parts += [
    f"| {c['target']} | {c['value']:.3g} | {'yes' if c['met'] else 'NO'} |"
    for c in result["targets"]
  ]
  markdown = "\n".join(parts) + "\n"
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "step_isolated.md").write_text(markdown)
  (out / "step_isolated.json").write_text(json.dumps(result, indent=2))
  print(markdown)
  return result


if __name__ == "__main__":
  main()
