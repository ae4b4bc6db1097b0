"""A drop-in that needs no tuning: the recipe's default rate and cool-down, chosen by leaving workloads out.

:func:`optax_sm3.sm3_recipe` trains at every ``(cool-down, rate)`` of :data:`GRID`;
the default is the setting whose worst validation gap to the tuned Adam is
smallest; docs/guides/recipe.md gives the protocol. ``--levers`` runs the study
that chose the recipe's other settings (:mod:`benchmarks._study`).

Usage (from the repository root)::

  python -m benchmarks.transfer              # the rate study (with --long 5)
  python -m benchmarks.transfer --long 0     # without the 5x-steps runs
  python -m benchmarks.transfer --levers     # the settings' study
  python -m benchmarks.transfer --quick      # a smoke run: 1/10 of the steps

Writes ``transfer.json`` (every run; a study resumes from it), ``transfer.md``
and ``summary.json`` (``docs/_data/recipe.json`` or ``transfer.json``) to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import sys
import time
from collections.abc import Sequence

import optax_sm3
from benchmarks import _report, _study, _workloads
from benchmarks._study import (
  RECIPE,
  Candidate,
  Study,
  _gap,
  _mean_std,
  _nan_max,
  _score,
)

RATE_WORKLOADS = ("shakespeare-char", *_workloads.TRANSFER_NAMES)
# The recipe's rates: 2e-3 to 3.2e-2, a factor sqrt(2) apart.
RATES = tuple(2e-3 * 2.0 ** (k / 2) for k in range(9))
# The cool-downs (fractions of the steps): the lever study's 10%, 30%, 50%,
# and every step after the 2% warm-up.
COOLDOWNS = (0.1, 0.3, 0.5, 0.98)
GRID = tuple((cooldown, lr) for cooldown in COOLDOWNS for lr in RATES)
# sm3_recipe's default before this study (scored beside the new one).
PREVIOUS_DEFAULT = (0.1, 4e-3)
ADAMS = _study.CANDIDATES[:3]  # Adam's three schedules
HABIT = 1e-3  # optax.adam(1e-3): "adam constant" at 1e-3
LONG_WORKLOAD = "cmudict-syllables"
# The lever study's results, whose Adam runs the rate study reuses (same code,
# workloads and seeds; a rerun of one gave the same metric).
LEVERS = pathlib.Path(__file__).parents[1] / "docs" / "_data" / "transfer.json"


def _committed_adam(study: Study, name: str) -> dict | None:
  """Adam's tuning on ``name`` from :data:`LEVERS` (``None`` if it lacks ``name``
  at these steps), its test runs put in the record."""
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


def recipe(cooldown: float) -> Candidate:
  """The recipe (:data:`RECIPE`'s settings) cooling down over ``cooldown`` of the steps."""
  if cooldown == RECIPE.decay:
    return RECIPE  # the lever study's own setting, whose runs this study shares
  return dataclasses.replace(
    RECIPE,
    name=f"recipe, cool-down {cooldown:.0%}",
    decay=cooldown,
    factory=functools.partial(optax_sm3.sm3_recipe, decay_fraction=cooldown),
  )


def _seeds(name: str, seeds: int) -> int:
  # The syllable classifier's spread was as large as its gap: more seeds.
  return max(seeds, 5) if name == LONG_WORKLOAD else seeds


def rate_table(study: Study, names: Sequence[str], long: float = 0.0) -> dict:
  """Per workload: the recipe's validation gap to the tuned Adam at each setting.

  ``gaps[i]`` is at ``GRID[i]`` (each cool-down's rates followed past a best
  edge); ``tuned`` is the workload's own best ``[cool-down, rate]``. With
  ``long``, :data:`LONG_WORKLOAD` also trains every setting at ``long`` x the
  steps (``long_gaps``), which the choice weighs as one more workload.
  """
  table = {}
  for name in names:
    workload = study.workload(name)
    higher = workload.higher_is_better
    adams = _committed_adam(study, name) or {
      c.name: _score(study.tune(name, c), False, higher) for c in ADAMS
    }
    best = _score({k: {"metric": v[0]} for k, v in adams.items()}, False, higher)[1]
    valid = {
      (cooldown, lr): run
      for cooldown in COOLDOWNS
      for lr, run in study.sweep(name, recipe(cooldown), RATES).items()
    }
    table[name] = {
      "metric": workload.metric,
      "higher_is_better": higher,
      "tuned_adam": best,
      "adam_lr": adams[best][1],
      "adam_valid": adams[best][0],
      "adam_schedules": {
        k: {"valid": v[0], "learning_rate": v[1]} for k, v in adams.items()
      },
      "recipe_valid": [[*s, r["metric"]] for s, r in sorted(valid.items())],
      "gaps": [_gap(workload, valid[s]["metric"], adams[best][0]) for s in GRID],
      "tuned": list(_score(valid, False, higher)[1]),
    }
    if long and name == LONG_WORKLOAD:
      adam = study.run(name, _adam(best), adams[best][1], 0, "tune", long)["metric"]
      table[name]["long_gaps"] = [
        _gap(workload, study.run(name, recipe(c), lr, 0, "tune", long)["metric"], adam)
        for c, lr in GRID
      ]
  return table


def choose_rate(table: dict, held_out: str | None = None) -> tuple[float, float]:
  """The ``(cool-down, rate)`` of :data:`GRID` whose worst validation gap, on all workloads but ``held_out``, is smallest.

  ``long_gaps`` count as one more workload's. Ties (a small classifier's few
  validation errors) go to the smaller second-worst gap, and so on, then to
  the earlier setting; a diverged run's gap is infinite.
  """
  others = [n for n in table if n != held_out]

  def worst_first(i):
    gaps = [
      table[n][k][i] for n in others for k in ("gaps", "long_gaps") if k in table[n]
    ]
    return sorted((math.inf if g != g else g for g in gaps), reverse=True)

  return GRID[min(range(len(GRID)), key=worst_first)]


def label(setting: Sequence[float]) -> str:
  """``"30% cool-down, 0.008"``: a ``(cool-down, rate)`` setting in tables."""
  cooldown, lr = setting
  return f"{cooldown:.0%} cool-down, {lr:g}"


def _adam(name: str) -> Candidate:
  return next(c for c in ADAMS if c.name == name)


def score_rates(
  study: Study,
  table: dict,
  seeds: int,
  factor: float = 1.0,
  other_settings: Sequence[Sequence[float]] = (),
  only: Sequence[str] | None = None,
) -> list[dict]:
  """Test runs per workload: the untuned recipe, each fold's choice, the tuned ones.

  Settings are chosen on ``table`` (1x) and keep their rate at ``factor`` x
  the steps; ``only`` names the workloads scored. The most important runs go
  first on every workload, so that an interrupted study has those for all.
  """
  default = choose_rate(table)
  folds = {name: choose_rate(table, name) for name in table}
  others = sorted({*folds.values(), *map(tuple, other_settings)} - {default})

  def at(setting):  # the recipe's (candidate, rate) at a (cool-down, rate)
    cooldown, lr = setting
    return recipe(cooldown), lr

  plans = {}
  for name in table if only is None else only:
    row = table[name]
    plans[name] = {
      "untuned recipe": at(default),
      "tuned adam": (_adam(row["tuned_adam"]), row["adam_lr"]),
      "held-out choice": at(folds[name]),
      "tuned recipe": at(row["tuned"]),
      "adam(1e-3)": (ADAMS[0], HABIT),
    } | {f"recipe at {label(s)}": at(s) for s in others}
  tests = {name: {} for name in plans}
  for phase in (
    ("untuned recipe", "tuned adam"),
    ("held-out choice", "tuned recipe", "adam(1e-3)"),
    tuple(f"recipe at {label(s)}" for s in others),
  ):
    for name, plan in plans.items():
      for key in phase:
        candidate, lr = plan[key]
        test = study.test(name, candidate, lr, _seeds(name, seeds), factor)
        if candidate.family == "sm3":
          test["cooldown"] = candidate.decay
        tests[name][key] = test
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
      "default": list(default),
      "fold_choice": list(folds[name]),
      "other_settings": [list(s) for s in others],
      "tuned_adam": table[name]["tuned_adam"],
      "tests": by_key,
      "state_ratio": by_key["untuned recipe"]["state_bytes"] / by_key["tuned adam"]["state_bytes"],
    })  # fmt: skip
  return out


def _cell(metric: str, test: dict) -> str:
  return f"{_mean_std(metric, test)} ({test['gap']:+.2%})"


def _setting(test: dict) -> str:
  """A test's ``(cool-down, rate)``, or Adam's rate alone."""
  if "cooldown" in test:
    return label((test["cooldown"], test["learning_rate"]))
  return f"{test['learning_rate']:g}"


def rate_markdown(report: dict) -> str:
  """The default setting's tables: per workload, and per held-out fold."""
  default, scores = report["default"], report["scores"]
  others = scores[0]["other_settings"]
  folds = [r["fold_choice"] for r in scores]

  def why(s):
    return "a fold's choice" if s in folds else "the previous default"

  lines = [
    f"Default {label(default)}, chosen on {len(report['workloads'])} workloads "
    f"({report['wall_s'] / 60:.0f} min wall, `{report['command']}`). Test metric, "
    "mean ± std over the seeds (gap to the tuned Adam: relative loss, or relative "
    "error rate for the classifiers; positive is worse).",
    "",
    "| workload | `sm3_recipe(total_steps)` (untuned) | tuned recipe (cool-down, rate) "
    "| tuned Adam (schedule, rate) | `adam(1e-3)` |",
    "|---|---:|---:|---:|---:|",
  ]
  for r in scores:
    t, m = r["tests"], r["metric"]
    lines.append(
      f"| {r['workload']} | {_cell(m, t['untuned recipe'])} | "
      f"{_cell(m, t['tuned recipe'])} ({_setting(t['tuned recipe'])}) | "
      f"{_mean_std(m, t['tuned adam'])} ({r['tuned_adam'].removeprefix('adam ')}, "
      f"{t['tuned adam']['learning_rate']:g}) | {_cell(m, t['adam(1e-3)'])} |"
    )
  lines += [
    "",
    "The recipe untuned at the other settings (test metric and gap, as above):",
    "",
    "| workload | " + " | ".join(f"{label(s)} ({why(s)})" for s in others) + " |",
    "|---|" + "---:|" * len(others),
  ]
  lines += [
    f"| {r['workload']} | "
    + " | ".join(
      _cell(r["metric"], r["tests"][f"recipe at {label(s)}"]) for s in others
    )
    + " |"
    for r in scores
  ]
  lines += [
    "",
    "Each workload's metric, seeds and optimizer state (the recipe's, at any setting):",
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
    "Leave one workload out: the setting chosen on the others, scored on the "
    "held-out one.",
    "",
    "| held-out workload | chosen on the others | test | gap to tuned Adam |",
    "|---|---:|---:|---:|",
  ]
  lines += [
    f"| {r['workload']} | {label(r['fold_choice'])} | "
    f"{_mean_std(r['metric'], r['tests']['held-out choice'])} | "
    f"{r['tests']['held-out choice']['gap']:+.2%} |"
    for r in scores
  ]
  # The validation gaps, in two tables (a column per workload would not fit a
  # page): the loss workloads, then the classifiers; the last table also has
  # the worst gap over every column, the one the choice minimises.
  table = report["table"]
  columns = [(n, "gaps") for n in report["workloads"]]
  columns += [(n, "long_gaps") for n in report["workloads"] if "long_gaps" in table[n]]
  groups = [
    (what, [c for c in columns if table[c[0]]["higher_is_better"] == higher])
    for higher, what in ((False, "the loss workloads"), (True, "the classifiers"))
  ]
  groups = [(what, group) for what, group in groups if group]
  for number, (what, group) in enumerate(groups):
    names = [n if key == "gaps" else f"{n} ({report['long_factor']:g}x steps)"
             for n, key in group]  # fmt: skip
    last = len(groups) > 1 and number == len(groups) - 1
    extra = ("worst of all",) if last else ()
    rows = []
    for i, setting in enumerate(report["grid"]):
      row = (label(setting), [table[n][key][i] for n, key in group])
      worst = _nan_max(table[n][key][i] for n, key in columns)
      rows.append((*row, f"{worst:+.2%}") if last else row)
    title = (
      f"The recipe's validation gap to the tuned Adam at each setting (seed 0), {what}:"
    )
    lines += _study.gap_table(title, "cool-down, rate", names, rows, *extra)
  for long in report.get("long", []):
    lines += [
      "",
      f"{long['workload']} at {long['steps']} steps ({long['seeds']} seeds; every "
      "setting as chosen at the 1x steps):",
      "",
      "| setting | cool-down, rate | test | gap to tuned Adam |",
      "|---|---:|---:|---:|",
    ]
    lines += [
      f"| {key} | {_setting(test)} | {_mean_std(long['metric'], test)} | "
      f"{test['gap']:+.2%} |"
      for key, test in long["tests"].items()
    ]
  return "\n".join(lines)


def headline_markdown(report: dict) -> str:
  """The README's table: per workload (and at ``long`` x), the untuned recipe against the tuned Adam."""
  lines = [
    "| workload | metric | untuned `sm3_recipe` | tuned Adam | gap | `adam(1e-3)`'s gap "
    "| state / Adam's |",
    "|---|---|---:|---:|---:|---:|---:|",
  ]
  rows = [(r["workload"], r) for r in report["scores"]]
  rows += [(f"{r['workload']}, {r['steps']} steps", r) for r in report.get("long", [])]
  for name, r in rows:
    t, m = r["tests"], r["metric"]
    lines.append(
      f"| {name} | {m} | {_mean_std(m, t['untuned recipe'])} | "
      f"{_mean_std(m, t['tuned adam'])} | {t['untuned recipe']['gap']:+.1%} | "
      f"{t['adam(1e-3)']['gap']:+.1%} | {r['state_ratio']:.1%} |"
    )
  return "\n".join(lines)


def default_rate_study(
  study: Study, names: Sequence[str], seeds: int, long: float
) -> dict:
  """The tables of :func:`rate_markdown`: tune, choose, score (and ``long`` x steps)."""
  table = rate_table(study, names, long)
  report = {
    "workloads": list(names),
    "grid": [list(s) for s in GRID],
    "long_factor": long,
    "table": table,
    "default": list(choose_rate(table)),
    "scores": score_rates(study, table, seeds, other_settings=[PREVIOUS_DEFAULT]),
  }
  if long and LONG_WORKLOAD in table:
    report["long"] = score_rates(
      study, table, seeds, long, [PREVIOUS_DEFAULT], only=[LONG_WORKLOAD]
    )
  return report


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.transfer", description=__doc__.split("\n")[0]
  )
  add = parser.add_argument
  add("--quick", action="store_true", help="a smoke run")
  add("--levers", action="store_true", help="the study of the recipe's settings")
  add("--long", type=float, metavar="FACTOR", help="FACTOR x steps too (5, --levers 0)")
  add("--seeds", type=int, default=_study.SEEDS, help="test seeds")
  add("--workloads", default=None, help="comma-separated names")
  add("--out", type=pathlib.Path, default=None)
  add("--no-progress", action="store_true")
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  default_names = _study.WORKLOADS if args.levers else RATE_WORKLOADS
  names = tuple(args.workloads.split(",")) if args.workloads else default_names
  long = args.long if args.long is not None else (0.0 if args.levers else 5.0)
  out = args.out or pathlib.Path("results", "transfer" if args.levers else "recipe")
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
  scale, grid_size = (0.1, 2) if args.quick else (1.0, 3)
  extend = 0 if args.quick else 1 if args.levers else 3
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
  flags = " --levers" + (f" --long {long:g}" if long else "") if args.levers else ""
  report["command"] = "python -m benchmarks.transfer" + flags
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
