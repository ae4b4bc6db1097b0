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
  python -m benchmarks.step_isolated --devices 8        # sharded on 8 CPU devices

With ``--devices N`` every child process starts JAX with N CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set in its
environment before JAX is imported) on a one-axis mesh ``("x",)``, and shards
the tree as the sharding tests do (:func:`mesh_spec`): embedding-like and
down-projection matrices by rows, up-projection kernels by columns, the conv
kernel by output channels, vectors replicated. Parameters, gradients and state
(:func:`optax_sm3.state_shardings`) are placed so, and the donated step is
jitted with those shardings. Bytes are then per device (device 0's shards),
and the table also counts the all-gathers in the compiled step.

Writes ``step_isolated.md`` / ``.json`` under ``--out`` (default
``results/step_isolated``) and prints the Markdown with the targets of the
performance issue, met or not, computed in the run.
"""

from __future__ import annotations

import argparse
import json
import math
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
# --with-direct adds SM3 without the CPU loop (the form before the loop).
DIRECT = "optax_sm3.sm3 (m=0, block_size=0)"

# (what, optimizer, metric, upper bound) on the float32 and bfloat16 trees.
TARGETS = (
  ("step time / optax.adam", "optax_sm3.sm3 (m=0)", "vs_adam", 0.6),
  ("step time / optax.sgd", "optax_sm3.sm3 (m=0)", "vs_sgd", 1.6),
  ("step time / optax.adam", "optax_sm3.sm3 (m=0.9)", "vs_adam", 0.9),
)
# Compile time of the transformer tree, against Adam's.
COMPILE_TARGET = ("compile time / optax.adam", "optax_sm3.sm3 (m=0)", 2.0)
# With --devices N > 1: (what, optimizer, metric, upper bound) per dtype.
DEVICE_TARGETS = tuple(
  target
  for name in ("optax_sm3.sm3 (m=0)", "optax_sm3.sm3 (m=0.9)")
  for target in (
    ("XLA temporary / parameter bytes, per device", name, "temp_fraction", 0.05),
    ("step time / optax.adam", name, "vs_adam", 1.0),
  )
)
# Row-sharded matrices of the trees (the rest split their last axis).
ROW_SHARDED = ("embedding", "dense_out", "/o", "/down")


def mesh_spec(name: str, shape: tuple[int, ...], devices: int):
  """How the tree is sharded on the ``("x",)`` mesh, as the sharding tests do.

  Embedding and down-projection matrices by rows, other kernels by their
  last axis (columns, output channels); vectors and axes that ``devices``
  does not divide stay replicated.
  """
  from jax.sharding import PartitionSpec as P

  if len(shape) < 2:
    return P()
  axis = 0 if any(key in name for key in ROW_SHARDED) else len(shape) - 1
  if shape[axis] % devices:
    return P()
  return P(*(("x" if a == axis else None) for a in range(len(shape))))


class MeshCase:
  """``step_time.Case`` on a mesh of all devices, the tree sharded by ``mesh_spec``."""

  def __init__(self, tx, shapes, dtype):
    import functools

    import jax
    import optax
    from jax.sharding import AxisType, NamedSharding

    import optax_sm3
    from benchmarks import step_time

    devices = jax.device_count()
    mesh = jax.make_mesh((devices,), ("x",), axis_types=(AxisType.Auto,))
    param_sh = {
      k: NamedSharding(mesh, mesh_spec(k, s, devices)) for k, s in shapes.items()
    }
    self.params = jax.device_put(step_time.make_tree(shapes, dtype, 0), param_sh)
    self.grads = jax.device_put(step_time.make_tree(shapes, dtype, 1), param_sh)
    state_sh = optax_sm3.state_shardings(tx, self.params, param_sh)
    self.state = jax.jit(tx.init, out_shardings=state_sh)(self.params)
    first = jax.devices()[0]
    self.param_bytes = _device_bytes(self.params, first)
    self.state_bytes = _device_bytes(self.state, first)

    @functools.partial(
      jax.jit,
      donate_argnums=(0, 1),
      in_shardings=(param_sh, state_sh, param_sh),
      out_shardings=(param_sh, state_sh),
    )
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    start = time.perf_counter()
    self.step = step.lower(self.params, self.state, self.grads).compile()
    self.compile_s = time.perf_counter() - start
    # The partitioned program is per device: its temporary is each device's.
    self.temp_bytes = self.step.memory_analysis().temp_size_in_bytes
    self.all_gathers = sum(
      " all-gather(" in line or " all-gather-start(" in line
      for line in self.step.as_text().splitlines()
    )
    self.run(2)  # warm-up

  def run(self, steps: int) -> float:
    """Runs ``steps`` steps; returns seconds per step."""
    import jax

    start = time.perf_counter()
    for _ in range(steps):
      self.params, self.state = self.step(self.params, self.state, self.grads)
    jax.block_until_ready(self.params)
    return (time.perf_counter() - start) / steps


def _device_bytes(tree, device) -> int:
  """Bytes of ``tree`` held on ``device``."""
  import jax

  return sum(
    shard.data.nbytes
    for leaf in jax.tree.leaves(tree)
    for shard in leaf.addressable_shards
    if shard.device == device
  )


def child(
  name: str,
  tree: str,
  scale: float,
  dtype: str,
  steps: int,
  rounds: int,
  devices: int = 1,
):
  """Runs in its own process: one optimizer, prints one JSON line."""
  import jax
  import jax.numpy as jnp

  from benchmarks import step_time

  if jax.device_count() != devices:
    raise RuntimeError(f"expected {devices} devices, JAX has {jax.device_count()}")
  tx = step_time.optimizers(with_direct=True)[name]
  shapes = step_time.scaled_shapes(scale, tree)
  start = time.perf_counter()
  make = step_time.Case if devices == 1 else MeshCase
  case = make(tx, shapes, jnp.dtype(dtype))
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
        "all_gathers": getattr(case, "all_gathers", 0),
        "num_params": sum(math.prod(s) for s in shapes.values()),
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
    "--devices",
    str(args.devices),
  ]
  env = dict(os.environ)
  if args.devices > 1:
    # Read when JAX starts its CPU backend: set before the child imports JAX.
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (
      env.get("XLA_FLAGS", "")
      + f" --xla_force_host_platform_device_count={args.devices}"
    )
  result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
  if result.returncode != 0:
    raise RuntimeError(f"{name} ({dtype}) failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def measure(args, dtype: str, progress) -> dict:
  """Every optimizer once per pass, shuffled; per-pass ratios to the baselines."""
  order = random.Random(args.seed)
  names = [*NAMES, DIRECT] if args.with_direct else list(NAMES)
  passes = []
  for _ in range(args.passes):
    one = {}
    for name in order.sample(names, len(names)):
      one[name] = run_child(name, args, dtype)
      progress(f"{dtype} {name}: {one[name]['median_ms']:.1f} ms")
    passes.append(one)
  rows = {}
  for name in names:
    times = [p[name]["median_ms"] for p in passes]
    rows[name] = {
      "pass_ms": times,
      "median_ms": statistics.median(times),
      "compile_s": statistics.median(p[name]["compile_s"] for p in passes),
      **{k: passes[0][name][k] for k in ("param_bytes", "state_bytes", "temp_bytes")},
      "all_gathers": passes[0][name].get("all_gathers", 0),
      "num_params": passes[0][name]["num_params"],
    }
    rows[name]["temp_fraction"] = rows[name]["temp_bytes"] / rows[name]["param_bytes"]
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
  # The one-device targets; a sharded run has its own (DEVICE_TARGETS).
  for dtype in ("float32", "bfloat16") if result.get("devices", 1) == 1 else ():
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
  if result.get("devices", 1) > 1:
    for dtype in ("float32", "bfloat16"):
      for what, name, metric, bound in DEVICE_TARGETS:
        if dtype in result:
          value = result[dtype][name][metric]
          checks.append(
            {
              "target": f"{result['devices']} devices, {dtype}: {name}: {what} "
              f"<= {bound:g}",
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


def table(rows: dict, title: str, per_device: bool = False) -> str:
  """One row per optimizer; ``per_device``: bytes per device, all-gathers."""
  ratios = "state / params | XLA temp / params"
  if per_device:
    ratios = "state / params, per device | XLA temp / params, per device | all-gathers"
  lines = [
    f"#### {title}",
    "",
    f"| optimizer | median step (ms) | vs adam | vs sgd | compile (s) | compile vs adam "
    f"| {ratios} |",
    "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if per_device else ""),
  ]
  for name, r in rows.items():
    line = (
      f"| {name} | {r['median_ms']:.1f} | {r['vs_adam']:.2f} | {r['vs_sgd']:.2f} "
      f"| {r['compile_s']:.2f} | {r['compile_vs_adam']:.2f} "
      f"| {r['state_bytes'] / r['param_bytes']:.2%} "
      f"| {r['temp_bytes'] / r['param_bytes']:.2%} |"
    )
    if per_device:
      line += f" {r.get('all_gathers', 0)} |"
    lines.append(line)
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
  parser.add_argument(
    "--with-direct",
    action="store_true",
    help=f"also time {DIRECT!r} (SM3 without the CPU loop)",
  )
  parser.add_argument("--seed", type=int, default=0, help="seed of the pass orders")
  parser.add_argument("--out", default="results/step_isolated", help="output folder")
  parser.add_argument(
    "--devices",
    type=int,
    default=1,
    help="CPU devices per process; > 1 shards the tree on a mesh of them",
  )
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.passes is None:
    args.passes = 3 if args.quick else 7
  if args.scale is None:
    args.scale = 0.25 if args.quick else 1.0
  if min(args.passes, args.rounds, args.steps, args.devices) < 1 or not args.scale > 0:
    parser.error("--passes, --rounds, --steps, --devices must be >= 1 and --scale > 0")
  if args.child is not None and args.child not in (*NAMES, DIRECT):
    parser.error(f"--child must be one of {(*NAMES, DIRECT)}")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.child is not None:
    child(
      args.child,
      args.tree,
      args.scale,
      args.dtype,
      args.steps,
      args.rounds,
      args.devices,
    )
    return {}
  started = time.perf_counter()
  result = {
    "tree": args.tree,
    "scale": args.scale,
    "passes": args.passes,
    "rounds": args.rounds,
    "steps": args.steps,
    "cpus": os.cpu_count(),
    "devices": args.devices,
  }

  def progress(line):
    print(f"[{time.perf_counter() - started:6.0f} s] {line}", file=sys.stderr)

  result["float32"] = measure(args, "float32", progress)
  if not args.no_bf16:
    result["bfloat16"] = measure(args, "bfloat16", progress)
  result["targets"] = check_targets(result)
  n = result["float32"]["optax.adam"]["num_params"]
  sharded = args.devices > 1
  where = (
    f"{args.devices} CPU devices (one-axis mesh, tree sharded by "
    "`step_isolated.mesh_spec`)"
    if sharded
    else "1 device"
  )
  parts = [
    f"Tree: {args.tree} x {args.scale:g} ({n / 1e6:.1f} M parameters) on {where}; "
    f"one optimizer per process, {args.passes} passes in shuffled order, each "
    f"process the median of {args.rounds} rounds of {args.steps} steps; ratios are "
    f"medians of per-pass ratios; {os.cpu_count()} CPUs; wall time "
    f"{time.perf_counter() - started:.0f} s.",
    "",
    table(result["float32"], "float32 parameters", sharded),
  ]
  if "bfloat16" in result:
    parts += ["", table(result["bfloat16"], "bfloat16 parameters", sharded)]
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
