"""A drop-in that needs no tuning: the recipe's default rate, chosen by leaving workloads out.

:func:`optax_sm3.sm3_recipe`'s settings were chosen by the lever study
(``--levers``, :mod:`benchmarks._study`); this study chooses its peak rate,
the one number a user would otherwise tune, by the same protocol:

1. On every workload of :data:`RATE_WORKLOADS` the recipe trains at each
   rate of :data:`RATES` (seed 0, validation split), and Adam with each of
   three schedules on its own grid (3 rates a factor 2 apart, a best edge
   followed outwards); the tuned Adam is the best of the three.
2. For each workload in turn, the rate is chosen on the *other* workloads:
   the one whose worst validation gap to the tuned Adam is smallest; it is
   scored on the held-out workload's test split. The default is the rate
   the same rule picks on all workloads.
3. On every workload's test split (3 seeds; 5 on the syllable classifier):
   the recipe at the default rate (untuned), at its own best validation rate
   (tuned), the tuned Adam, and ``optax.adam(1e-3)`` (a user's habit).
4. The syllable classifier again at 5x the steps, 5 seeds, every setting (and
   every rate a fold chose) at its 1x rate.

Gaps are relative, as :mod:`benchmarks._study` defines them.

Usage (from the repository root)::

  python -m benchmarks.transfer              # the rate study (with --long 5)
  python -m benchmarks.transfer --long 0     # without the 5x-steps runs
  python -m benchmarks.transfer --levers     # the settings' study
  python -m benchmarks.transfer --quick      # a smoke run: 1/10 of the steps

Results go to ``--out`` (default ``results/recipe``, ``results/transfer``
for ``--levers``): ``transfer.json`` (every run; an interrupted study
resumes from it), ``transfer.md`` and ``summary.json`` (the tables and the
test runs' loss curves, which the docs keep as ``docs/_data/recipe.json``,
and ``docs/_data/transfer.json`` for ``--levers``).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from collections.abc import Sequence

from benchmarks import _report, _study, _workloads
from benchmarks._study import (
  CANDIDATES,
  RECIPE,
  SEEDS,
  Candidate,
  Study,
  _gap,
  _mean_std,
  _score,
  gap_table,
)

RATE_WORKLOADS = ("shakespeare-char", *_workloads.TRANSFER_NAMES)
RATES = tuple(2e-3 * 2.0**k for k in range(5))  # the recipe's grid: 2e-3 to 3.2e-2
ADAMS = CANDIDATES[:3]  # Adam's three schedules
HABIT = 1e-3  # optax.adam(1e-3): "adam constant" at 1e-3
LONG_WORKLOAD = "cmudict-syllables"
# The lever study's results (``--levers``), whose Adam runs the rate study
# reuses: the same code, workloads and seeds (the runs are deterministic: a
# rerun of "adam constant" at 0.004 on shakespeare-char gave its 2.1293).
LEVERS = pathlib.Path(__file__).parents[1] / "docs" / "_data" / "transfer.json"


def _committed_adam(study: Study, name: str) -> dict | None:
  """Adam's tuning on ``name`` from :data:`LEVERS`, its test runs put in the record.

  ``None`` where the lever study did not run ``name`` at these steps. Its
  grids were the same (3 rates, a best edge followed outwards), and each
  best rate it found lies inside its grid.
  """
  if study.steps_scale != 1.0 or not LEVERS.exists():
    return None
  levers = json.loads(LEVERS.read_text())
  if name not in levers["table"]:
    return None
  rows = levers["table"][name]["rows"]
  (fold,) = [
    r
    for r in levers["leave_one_out"]
    if r["workload"] == name and r["budget"] == _study.BUDGETS[0]
  ]
  steps = study.steps(name)
  for seed, metric in enumerate(fold["adam_test"]["metrics"]):
    key = f"{name}|{fold['adam']}|{steps}|{fold['adam_lr']!r}|{seed}|final"
    study.record["runs"].setdefault(key, {
      "metric": metric,
      "losses": fold["adam_test"]["losses"] if seed == 0 else [],
      "state_bytes": rows[fold["adam"]]["state_bytes"],
      "source": "docs/_data/transfer.json",
    })  # fmt: skip
  return {c.name: (rows[c.name]["valid"], rows[c.name]["learning_rate"]) for c in ADAMS}


def _seeds(name: str, seeds: int) -> int:
  # The syllable classifier's spread was as large as its gap: more seeds.
  return max(seeds, 5) if name == LONG_WORKLOAD else seeds


def rate_table(study: Study, names: Sequence[str]) -> dict:
  """Per workload: the recipe's validation metric at each rate and the tuned Adam.

  The recipe trains at every rate of :data:`RATES` (seed 0), followed past a
  best edge (for its own tuned rate); each of Adam's three schedules on its
  own grid, followed past a best edge. ``gaps[i]`` is the recipe's
  validation gap at ``RATES[i]`` to the best Adam.
  """
  table = {}
  for name in names:
    workload = study.workload(name)
    higher = workload.higher_is_better
    adams = _committed_adam(study, name) or {
      c.name: _score(study.tune(name, c), False, higher) for c in ADAMS
    }
    best = _score({k: {"metric": v[0]} for k, v in adams.items()}, False, higher)[1]
    recipe = study.sweep(name, RECIPE, RATES)
    table[name] = {
      "metric": workload.metric,
      "higher_is_better": higher,
      "tuned_adam": best,
      "adam_lr": adams[best][1],
      "adam_valid": adams[best][0],
      "adam_schedules": {
        k: {"valid": v[0], "learning_rate": v[1]} for k, v in adams.items()
      },
      "recipe_valid": {f"{lr:g}": r["metric"] for lr, r in sorted(recipe.items())},
      "gaps": [_gap(workload, recipe[lr]["metric"], adams[best][0]) for lr in RATES],
      "tuned_lr": _score(recipe, False, higher)[1],
    }
  return table


def choose_rate(table: dict, held_out: str | None = None) -> float:
  """The rate of :data:`RATES` whose worst validation gap, on all workloads but ``held_out``, is smallest.

  Ties of the worst gap (a small classifier's validation split has a few
  errors, so equal counts at several rates) go to the smaller second-worst
  gap, and so on; a diverged run counts as an infinite gap.
  """
  others = [n for n in table if n != held_out]

  def worst_first(i):
    gaps = [table[n]["gaps"][i] for n in others]
    return sorted((math.inf if g != g else g for g in gaps), reverse=True)

  return RATES[min(range(len(RATES)), key=worst_first)]


def _adam(name: str) -> Candidate:
  return next(c for c in ADAMS if c.name == name)


def score_rates(
  study: Study,
  table: dict,
  seeds: int,
  factor: float = 1.0,
  default: float | None = None,
  other_rates: Sequence[float] = (),
) -> list[dict]:
  """Test runs per workload: the untuned recipe, each fold's choice, the tuned ones.

  At ``factor`` x the steps every setting keeps its 1x rate. The runs go in
  order of importance across the workloads (the untuned recipe and the
  tuned Adam first), so that an interrupted study has those for all.
  """
  default = choose_rate(table) if default is None else default
  # Each fold's choice (at ``factor`` x, one workload has no others).
  folds = {
    name: choose_rate(table, name) if len(table) > 1 else default for name in table
  }
  # Every other rate a fold chose (and ``other_rates``) is scored on every
  # workload too.
  others = sorted({*folds.values(), *other_rates} - {default})
  plans = {}
  for name, row in table.items():
    plans[name] = {
      "untuned recipe": (RECIPE, default),
      "tuned adam": (_adam(row["tuned_adam"]), row["adam_lr"]),
      "held-out choice": (RECIPE, folds[name]),
      "tuned recipe": (RECIPE, row["tuned_lr"]),
      "adam(1e-3)": (ADAMS[0], HABIT),
    } | {f"recipe at {lr:g}": (RECIPE, lr) for lr in others}
  tests = {name: {} for name in table}
  for phase in (
    ("untuned recipe", "tuned adam"),
    ("held-out choice", "tuned recipe", "adam(1e-3)"),
    tuple(f"recipe at {lr:g}" for lr in others),
  ):
    for name, plan in plans.items():
      for key in phase:
        candidate, lr = plan[key]
        tests[name][key] = study.test(name, candidate, lr, _seeds(name, seeds), factor)
  out = []
  for name, by_key in tests.items():
    workload = study.workload(name)
    by_key = {key: by_key[key] for key in plans[name]}
    for test in by_key.values():
      test["gap"] = _gap(workload, test["mean"], by_key["tuned adam"]["mean"])
    out.append({
      "workload": name,
      "metric": workload.metric,
      "steps": study.steps(name, factor),
      "seeds": _seeds(name, seeds),
      "default": default,
      "fold_choice": folds[name],
      "other_rates": others,
      "tuned_adam": table[name]["tuned_adam"],
      "tests": by_key,
      "state_ratio": by_key["untuned recipe"]["state_bytes"] / by_key["tuned adam"]["state_bytes"],
    })  # fmt: skip
  return out


def _cell(metric: str, test: dict) -> str:
  return f"{_mean_std(metric, test)} ({test['gap']:+.2%})"


def rate_markdown(report: dict) -> str:
  """The default rate's tables: per workload, and per held-out fold."""
  default, scores = report["default"], report["scores"]
  others = scores[0]["other_rates"]
  lines = [
    f"Default rate {default:g}, chosen on {len(report['workloads'])} workloads "
    f"({report['wall_s'] / 60:.0f} min wall, `{report['command']}`). Test metric, "
    "mean ± std over the seeds (gap to the tuned Adam: relative loss, or relative "
    "error rate for the classifiers; positive is worse).",
    "",
    "| workload | `sm3_recipe(total_steps)` (untuned) | "
    + "".join(f"untuned at {lr:g} (a fold's choice) | " for lr in others)
    + "tuned recipe (rate) | tuned Adam (schedule, rate) | `adam(1e-3)` |",
    "|---|---:|" + "---:|" * (3 + len(others)),
  ]
  for r in scores:
    t, m = r["tests"], r["metric"]
    lines.append(
      f"| {r['workload']} | {_cell(m, t['untuned recipe'])} | "
      + "".join(f"{_cell(m, t[f'recipe at {lr:g}'])} | " for lr in others)
      + f"{_cell(m, t['tuned recipe'])} ({t['tuned recipe']['learning_rate']:g}) | "
      f"{_mean_std(m, t['tuned adam'])} ({r['tuned_adam'].removeprefix('adam ')}, "
      f"{t['tuned adam']['learning_rate']:g}) | {_cell(m, t['adam(1e-3)'])} |"
    )
  lines += [
    "",
    "Each workload's metric, seeds and optimizer state (the recipe's, at any rate):",
    "",
    "| workload | metric | seeds | recipe state | Adam state | ratio |",
    "|---|---|---:|---:|---:|---:|",
  ]
  lines += [
    f"| {r['workload']} | {r['metric']} | {r['seeds']} | "
    f"{_report.format_bytes(r['tests']['untuned recipe']['state_bytes'])} | "
    f"{_report.format_bytes(r['tests']['tuned adam']['state_bytes'])} | "
    f"{r['state_ratio']:.1%} |"
    for r in scores
  ]
  lines += [
    "",
    "Leave one workload out: the rate chosen on the others, scored on the held-out one.",
    "",
    "| held-out workload | rate chosen on the others | test | gap to tuned Adam |",
    "|---|---:|---:|---:|",
  ]
  lines += [
    f"| {r['workload']} | {r['fold_choice']:g} | "
    f"{_mean_std(r['metric'], r['tests']['held-out choice'])} | "
    f"{r['tests']['held-out choice']['gap']:+.2%} |"
    for r in scores
  ]
  names = report["workloads"]
  rows = [
    (f"{lr:g}", [report["table"][n]["gaps"][i] for n in names])
    for i, lr in enumerate(RATES)
  ]
  title = "The recipe's validation gap to the tuned Adam at each rate (seed 0):"
  lines += gap_table(title, "rate", names, rows)
  for long in report.get("long", []):
    lines += [
      "",
      f"{long['workload']} at {long['steps']} steps ({long['seeds']} seeds):",
      "",
      "| setting | rate | test | gap to tuned Adam |",
      "|---|---:|---:|---:|",
    ]
    lines += [
      f"| {key} | {test['learning_rate']:g} | {_mean_std(long['metric'], test)} | "
      f"{test['gap']:+.2%} |"
      for key, test in long["tests"].items()
    ]
  return "\n".join(lines)


def default_rate_study(
  study: Study, names: Sequence[str], seeds: int, long: float
) -> dict:
  """The tables of :func:`rate_markdown`: tune, choose, score (and ``long`` x steps)."""
  table = rate_table(study, names)
  report = {
    "workloads": list(names),
    "rates": list(RATES),
    "table": table,
    "default": choose_rate(table),
    "scores": score_rates(study, table, seeds),
  }
  if long and LONG_WORKLOAD in table:
    sub = {LONG_WORKLOAD: table[LONG_WORKLOAD]}
    others = report["scores"][0]["other_rates"]
    report["long"] = score_rates(study, sub, seeds, long, report["default"], others)
  return report


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.transfer", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--quick", action="store_true", help="a smoke run")
  parser.add_argument(
    "--levers",
    action="store_true",
    help="the lever study that chose the recipe's settings (not its rate)",
  )
  parser.add_argument(
    "--long",
    type=float,
    default=None,
    metavar="FACTOR",
    help="also run at FACTOR x the steps (default 5 for the rate study, "
    "none for --levers)",
  )
  parser.add_argument("--seeds", type=int, default=SEEDS, help="test seeds")
  parser.add_argument("--workloads", default=None, help="comma-separated names")
  parser.add_argument("--out", type=pathlib.Path, default=None)
  parser.add_argument("--no-progress", action="store_true")
  return parser.parse_args(argv)  # fmt: skip


def main(argv=None) -> dict:
  args = parse_args(argv)
  default_names = _study.WORKLOADS if args.levers else RATE_WORKLOADS
  names = tuple(args.workloads.split(",")) if args.workloads else default_names
  long = args.long if args.long is not None else (0.0 if args.levers else 5.0)
  out = args.out or pathlib.Path(
    "results/transfer" if args.levers else "results/recipe"
  )
  out.mkdir(parents=True, exist_ok=True)
  path = out / "transfer.json"
  record = json.loads(path.read_text()) if path.exists() else {"runs": {}}
  record.setdefault("wall_s", 0.0)

  def save():
    path.write_text(json.dumps(record))

  def progress(text):
    if not args.no_progress:
      print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

  start = time.perf_counter()
  scale, grid_size, extend = (0.1, 2, 0) if args.quick else (1.0, 3, 1)
  if not args.levers:
    extend = 0 if args.quick else 3
  study = Study(scale, grid_size, extend, record, save, progress, polyak=args.levers)
  if args.levers:
    table = _study.tuned_table(study, names)
    report = {
      "workloads": names,
      "table": table,
      "leave_one_out": _study.leave_one_out(study, table),
    }
    if long:
      report["long"] = _study.long_runs(study, table, long)
  else:
    report = default_rate_study(study, names, args.seeds, long)
  record["wall_s"] += time.perf_counter() - start
  report["wall_s"] = record["wall_s"]
  report["command"] = (
    "python -m benchmarks.transfer"
    + (" --levers" if args.levers else "")
    + (f" --long {long:g}" if args.levers and long else "")
  )
  record["report"] = report
  save()
  text = _study.markdown(report) if args.levers else rate_markdown(report)
  (out / "transfer.md").write_text(text + "\n")
  # The report without the per-run records: what the docs quote and plot.
  (out / "summary.json").write_text(json.dumps(report, indent=1) + "\n")
  print(text)
  return report


if __name__ == "__main__":
  main()
