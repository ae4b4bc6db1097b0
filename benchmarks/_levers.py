"""The lever study (``python -m benchmarks.transfer --levers``).

Every candidate (SM3 with one lever changed at a time, and Adam with three
schedules) trains on every workload of :data:`WORKLOADS` with each rate of a
small grid (seed 0, validation split; a best rate on the grid's edge is
followed one rate outwards). Then, for each workload in turn, the settings are
chosen on the *other* workloads only: the candidate, within a memory budget,
whose worst validation gap to the tuned Adam over those workloads is
smallest. On the held-out workload that candidate's rate is tuned on its
validation split, as every optimizer's is, and it trains with 3 seeds on the
whole training split, scored on the test split against the tuned Adam (the
best of Adam's three schedules on that workload's validation split), also
with 3 seeds. This runs for two budgets: optimizer state at most 3% of
Adam's (no momentum) and at most 30% (bfloat16 momentum).

Gaps are relative: the loss ratio minus 1 for the language models, the
error-rate ratio minus 1 (error = 1 - accuracy) for the classifier, so a
positive gap is worse than Adam.

Every SM3 run also keeps a Polyak average of the parameters
(:func:`optax_sm3.polyak_averaging`, decay 0.95, float32) and is scored with
it too: ``+polyak`` candidates reuse the runs, and their state counts the
average. (In bfloat16, or at decay 0.99, the average scored worse than the
last parameters on the character transformer's validation split: 2.227 and
2.150 against 2.164 with a constant rate, where 0.95 in float32 gave 2.106.)

Usage (from the repository root)::

  python -m benchmarks.transfer --levers --long 5   # ~1 h on 2 cores

Results go to ``--out`` (default ``results/transfer``): ``transfer.json``
(every run; an interrupted study resumes from it), ``transfer.md`` and
``summary.json`` (the tables and the test runs' loss curves, which the docs
keep as ``docs/_data/transfer.json``).
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks._study import (
  BASE,
  CANDIDATES,
  POLYAK,
  RECIPE,
  SEEDS,
  Study,
  _fmt,
  _gap,
  _nan_max,
  _score,
)

WORKLOADS = ("shakespeare-char", "code-char", "wiki-word", "cmudict-syllables")
BUDGETS = (0.03, 0.30)  # optimizer state / Adam's


def tuned_table(study: Study, names: Sequence[str], factor: float = 1.0) -> dict:
  """Per workload and candidate: validation metric, rate and state share.

  ``+polyak`` variants of the SM3 candidates are scored from the same runs.
  """
  table = {}
  for name in names:
    workload = study.workload(name)
    rows = {}
    for candidate in CANDIDATES:
      runs = study.tune(name, candidate, factor)
      first = next(iter(runs.values()))
      for polyak in (False, True) if candidate.family == "sm3" else (False,):
        metric, lr = _score(runs, polyak, workload.higher_is_better)
        rows[candidate.name + (POLYAK if polyak else "")] = {
          "candidate": candidate.name,
          "polyak": polyak,
          "valid": metric,
          "learning_rate": lr,
          "state_bytes": first["state_bytes"]
          + (first["polyak_bytes"] if polyak else 0),
        }
    adam = {k: r for k, r in rows.items() if k.startswith("adam")}
    best_adam = _score(
      {k: {"metric": r["valid"]} for k, r in adam.items()},
      False,
      workload.higher_is_better,
    )[1]
    adam_bytes = rows[best_adam]["state_bytes"]
    for row in rows.values():
      row["gap"] = _gap(workload, row["valid"], rows[best_adam]["valid"])
      row["memory"] = row["state_bytes"] / adam_bytes
    table[name] = {"tuned_adam": best_adam, "rows": rows}
  return table


def choose(table: dict, held_out: str, budget: float) -> str:
  """The SM3 setting with the smallest worst gap on the other workloads."""
  others = [n for n in table if n != held_out]
  pool = [
    k
    for k, r in table[held_out]["rows"].items()
    if not k.startswith("adam")
    and all(table[n]["rows"][k]["memory"] <= budget for n in table)
  ]
  return min(pool, key=lambda k: _nan_max(table[n]["rows"][k]["gap"] for n in others))


def _test(study: Study, name: str, row: dict, factor: float = 1.0) -> dict:
  candidate = next(c for c in CANDIDATES if c.name == row["candidate"])
  lr, polyak = row["learning_rate"], row["polyak"]
  return study.test(name, candidate, lr, SEEDS, factor, polyak)


def leave_one_out(study: Study, table: dict) -> list[dict]:
  """For each budget and held-out workload: the choice and its test figures."""
  out = []
  for budget in BUDGETS:
    for name in table:
      chosen = choose(table, name, budget)
      rows = table[name]["rows"]
      adam_name = table[name]["tuned_adam"]
      sm3 = _test(study, name, rows[chosen])
      adam = _test(study, name, rows[adam_name])
      workload = study.workload(name)
      out.append({
        "budget": budget,
        "workload": name,
        "metric": workload.metric,
        "chosen": chosen,
        "chosen_lr": rows[chosen]["learning_rate"],
        "adam": adam_name,
        "adam_lr": rows[adam_name]["learning_rate"],
        "sm3": sm3,
        "adam_test": adam,
        "gap": _gap(workload, sm3["mean"], adam["mean"]),
        "memory": rows[chosen]["memory"],
      })  # fmt: skip
  return out


def long_runs(study: Study, table: dict, factor: float) -> list[dict]:
  """The recipe, its base and the tuned Adam on the first workload, at 1x and ``factor`` x.

  Both keep their settings from the 1x study. At ``factor`` x the rate is
  re-tuned between the 1x rate and half of it (longer runs tend to want
  lower peaks), on the validation split with seed 0; then 3 seeds on test.
  """
  name = next(iter(table))
  workload = study.workload(name)
  rows = table[name]["rows"]
  out = []
  for key in (RECIPE.name, BASE.name, table[name]["tuned_adam"]):
    candidate = next(c for c in CANDIDATES if c.name == key)
    lr = rows[key]["learning_rate"]
    for length in (1.0, factor):
      if length != 1.0:
        runs = {
          rate: study.run(name, candidate, rate, 0, "tune", length)
          for rate in (lr / 2, lr)
        }
        lr = _score(runs, False, workload.higher_is_better)[1]
      row = {"candidate": key, "polyak": False, "learning_rate": lr}
      out.append({
        "workload": name,
        "steps": study.steps(name, length),
        "candidate": key,
        "learning_rate": lr,
        "test": _test(study, name, row, length),
      })  # fmt: skip
  return out


def markdown(report: dict) -> str:
  """The leave-one-out tables, the levers' worth and the long runs."""
  lines = [
    f"Leave-one-workload-out on {', '.join(report['workloads'])} "
    f"({report['wall_s'] / 60:.0f} min wall, `{report['command']}`). "
    "Test metric, mean ± std over 3 seeds; gap: relative loss (LMs) or "
    "relative error rate (classifier) against the tuned Adam; positive is worse.",
  ]
  for budget in BUDGETS:
    lines += [
      "",
      f"Budget: state at most {budget:.0%} of Adam's.",
      "",
      "| held-out workload | chosen on the others | SM3 test | tuned Adam | Adam test | gap | state / Adam's |",
      "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["leave_one_out"]:
      if r["budget"] != budget:
        continue
      lines.append(
        f"| {r['workload']} | {r['chosen']} | "
        f"{_fmt(r['metric'], r['sm3']['mean'])} ± {_fmt(r['metric'], r['sm3']['std'])} | "
        f"{r['adam']} | {_fmt(r['metric'], r['adam_test']['mean'])} ± "
        f"{_fmt(r['metric'], r['adam_test']['std'])} | {r['gap']:+.2%} | {r['memory']:.1%} |"
      )
  names = report["workloads"]
  lines += [
    "",
    "Each setting's validation gap to the tuned Adam (seed 0, best rate of its grid):",
    "",
    "| setting | " + " | ".join(names) + " | worst | state / Adam's |",
    "|---|" + "---:|" * (len(names) + 2),
  ]
  table = report["table"]
  for key in table[names[0]]["rows"]:
    gaps = [table[n]["rows"][key]["gap"] for n in names]
    memory = max(table[n]["rows"][key]["memory"] for n in names)
    label = f"{key} (`sm3_recipe`)" if key == RECIPE.name else key
    lines.append(
      f"| {label} | "
      + " | ".join(f"{g:+.2%}" for g in gaps)
      + f" | {_nan_max(gaps):+.2%} | {memory:.1%} |"
    )
  if report.get("long"):
    lines += [
      "",
      "Training length (test metric, 3 seeds, rates re-tuned at each length):",
      "",
      "| workload | steps | setting | rate | test |",
      "|---|---:|---|---:|---:|",
    ]
    for r in report["long"]:
      lines.append(
        f"| {r['workload']} | {r['steps']} | {r['candidate']} | "
        f"{r['learning_rate']:.3g} | {r['test']['mean']:.4f} ± {r['test']['std']:.4f} |"
      )
  return "\n".join(lines)
