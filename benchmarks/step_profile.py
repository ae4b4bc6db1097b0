"""Where SM3's step time goes: each pass of the step timed on its own.

On one embedding-sized parameter (200000 x 128 float32 by default), round-robin:
a plain read, sgd's step (three parameter-sized streams, the unit of the table),
SM3's update pass and its accumulator pass (blocked and direct), the row and
the column maxima of ``nu`` alone, and whole steps of ``optax_sm3.sm3`` and
``optax.adam``; each time also in *stream-equivalents*: time / (sgd time / 3).

Usage (from the repository root)::

  python -m benchmarks.step_profile [--rows 200000] [--cols 128] [--rounds 11]
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import optax

import optax_sm3
from benchmarks import _report, _timing
from optax_sm3 import _accumulate, _blocks, _cover


def components(rows: int, cols: int, learning_rate: float = 1e-3):
  """name -> (function, arguments, donated argument indices, streams moved)."""
  shape = (rows, cols)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  p = 0.02 * jax.random.normal(keys[0], shape)
  g = 0.02 * jax.random.normal(keys[1], shape)
  accumulators = (
    jnp.abs(jax.random.normal(keys[2], (rows,))),
    jnp.abs(jax.random.normal(keys[2], (cols,))),
  )
  cover = _cover.make_cover(shape)
  shapes = [cover.broadcast_shape(group) for group in cover.groups]
  one = jnp.ones([], jnp.float32)

  def update_pass(p, g, r, c):
    nu = _blocks.estimate(g, (r, c), shapes, one, one)
    return p - learning_rate * _accumulate.scaled_update(g, nu, jnp.float32(1e-8))

  def accumulator_pass(block_size):
    def fn(g, r, c):
      return _accumulate.new_accumulators(g, (r, c), cover, one, one, "II", block_size)

    return fn

  def one_reduction(axis):
    def fn(g, r, c):
      return jnp.max(_blocks.estimate(g, (r, c), shapes, one, one), axis=axis)

    return fn

  lr, gra = learning_rate, (g, *accumulators)
  blocked = accumulator_pass(_accumulate.default_block_size(jnp.float32))
  steps = {
    "read: g.sum()": ((lambda g: g.sum()), (g,), (), 1),
    "sgd: p - lr * g": ((lambda p, g: p - lr * g), (p, g), (0,), 3),
    "sm3 update pass (old accumulators)": (update_pass, (p, *gra), (0,), 3),
    "sm3 accumulator pass, blocked": (blocked, gra, (), 1),
    "sm3 accumulator pass, direct": (accumulator_pass(0), gra, (), 1),
    "row maxima of nu alone (fused)": (one_reduction(1), gra, (), 1),
    "column maxima of nu alone (fused)": (one_reduction(0), gra, (), 1),
  }
  for name, tx, streams in (
    ("optax_sm3.sm3 (m=0) step", optax_sm3.sm3(lr, momentum=0.0), 4),
    ("optax_sm3.sm3 (m=0.9) step", optax_sm3.sm3(lr, momentum=0.9), 7),
    ("optax.adam step", optax.adam(lr), 10),
  ):
    steps[name] = (_timing.train_step(tx), (p, tx.init(p), g), (0, 1), streams)
  return steps


def profile(rows: int, cols: int, rounds: int, steps: int) -> dict[str, dict]:
  timers = {}
  for name, (fn, args, donate, streams) in components(rows, cols).items():
    args = jax.tree.map(lambda x: jnp.array(x, copy=True), args)  # shared arrays
    compiled, run = _timing.compiled_loop(fn, args, donate)
    run(steps)  # warm-up
    timers[name] = (run, streams, compiled.memory_analysis().temp_size_in_bytes)
  times = {name: [] for name in timers}
  for _ in range(rounds):
    for name, (run, _, _) in timers.items():
      times[name].append(run(steps))
  stream_ms = 1e3 * statistics.median(times["sgd: p - lr * g"]) / 3
  result = {}
  for name, (_, streams, temp) in timers.items():
    ms = 1e3 * statistics.median(times[name])
    result[name] = {
      "median_ms": ms,
      "stream_equivalents": ms / stream_ms,
      "streams_moved": streams,
      "temp_bytes": temp,
    }
  return result


def table(result, rows: int, cols: int) -> str:
  size = _report.format_bytes(rows * cols * 4, "MiB", 0)
  header = ["pass", "median (ms)", "stream-equivalents"]
  header += ["parameter-sized streams moved", "XLA temp (MiB)"]
  body = [
    (
      name,
      f"{r['median_ms']:.2f}",
      f"{r['stream_equivalents']:.1f}",
      r["streams_moved"],
      _report.format_bytes(r["temp_bytes"], "MiB", label=False),
    )
    for name, r in result.items()
  ]
  title = f"Parameter {rows} x {cols} float32 ({size}); "
  title += "one stream = one parameter-sized read or write at sgd's speed."
  return "\n".join([title, "", *_report.table(header, body)])


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  for flag, default in (("rows", 200_000), ("cols", 128), ("rounds", 11), ("steps", 5)):
    parser.add_argument(f"--{flag}", type=int, default=default)
  args = parser.parse_args(argv)
  if min(args.rows, args.cols, args.rounds, args.steps) < 1:
    parser.error("--rows, --cols, --rounds and --steps must be >= 1")
  result = profile(args.rows, args.cols, args.rounds, args.steps)
  print(table(result, args.rows, args.cols))
  return result


if __name__ == "__main__":
  main()
