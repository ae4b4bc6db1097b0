"""The project's main job: SM3 against Adam & co. on real data.

Run ``python -m benchmarks`` (MovieLens-100k) or ``python -m benchmarks
--workloads all``; ``--help`` lists the flags. Results go to ``results/``:
``results.json`` and ``results.md`` (docs/_ext draws the docs' plots from
the JSON).
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import sys
import time

from benchmarks import _data, _optimizers, _report, _runner, _workloads


def _names(allowed: tuple[str, ...], what: str):
  def parse(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
      return list(allowed)
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
      raise argparse.ArgumentTypeError(
        f"unknown {what} {', '.join(map(repr, unknown)) or repr(text)}; allowed: "
        f"{', '.join(allowed)} (comma-separated) or 'all'"
      )
    return list(dict.fromkeys(names))

  return parse


def _positive(text: str) -> int:
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
  return int(text)


def parse_args(argv=None) -> argparse.Namespace:
  """Parses the command line (``argv`` defaults to ``sys.argv[1:]``)."""
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks",
    description="Compare optax-sm3 with optax optimizers on real data.",
  )
  add = parser.add_argument
  workloads, optimizers = _workloads.WORKLOAD_NAMES, tuple(_optimizers.OPTIMIZERS)
  add(
    "--workloads",
    type=_names(workloads, "workload"),
    default=["movielens"],
    help=f"comma-separated, from {', '.join(workloads)}, or 'all' (movielens)",
  )
  add(
    "--optimizers",
    type=_names(optimizers, "optimizer"),
    default=list(optimizers),
    help=f"comma-separated, from {', '.join(optimizers)} (default: all)",
  )
  add("--quick", action="store_true", help="a quarter of the steps, 2 seeds, 3 rates")
  add("--seeds", type=_positive, help="seeds per optimizer (3)")
  add("--steps", type=_positive, help="training steps per run (default: per workload)")
  add("--grid-size", type=_positive, help="learning rates tried per optimizer (4)")
  add("--out", type=pathlib.Path, default=pathlib.Path("results"), help="(results)")
  add("--no-progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  args.seeds = args.seeds or (2 if args.quick else 3)
  args.grid_size = args.grid_size or (3 if args.quick else 4)
  return args


def main(argv=None) -> int:
  """Runs the benchmark; returns the exit status."""
  args = parse_args(argv)
  try:
    workloads = [_workloads.build(name) for name in args.workloads]
  except _data.MissingDataError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  optimizers = [_optimizers.OPTIMIZERS[name] for name in args.optimizers]
  runs = sum(
    args.seeds + len(_runner.subgrid(o.grid, args.grid_size)) for o in optimizers
  )
  flags = sys.argv[1:] if argv is None else argv
  results = {
    "command": " ".join(["python -m benchmarks", *flags]),
    "seeds": args.seeds,
    "grid_size": args.grid_size,
    "machine": f"{platform.machine()} {platform.processor()} {platform.system()}",
    "workloads": {},
  }
  import tqdm  # (the bench extra: `import benchmarks.__main__` runs without it)

  start = time.perf_counter()
  runs *= len(workloads)
  with tqdm.tqdm(total=runs, unit="run", disable=args.no_progress) as bar:

    def progress(label):
      bar.set_postfix_str(label)
      bar.update()

    for workload in workloads:
      quick_steps = max(workload.steps // 4, 1) if args.quick else workload.steps
      results["workloads"][workload.name] = _runner.run_workload(
        workload,
        optimizers,
        steps=args.steps or quick_steps,
        seeds=args.seeds,
        grid_size=args.grid_size,
        progress=progress,
      )
  results["wall_s"] = time.perf_counter() - start
  paths = _report.write(results, args.out)
  print(_report.markdown(results))
  print(f"wall time {results['wall_s']:.0f} s; wrote", *map(str, paths.values()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
